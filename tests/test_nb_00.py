"Tests of exp.nb_00 beyond the data (tests/test_data.py): the namespace it exports, the test helpers, quick mode, torch_threads."
import pytest, torch
from torch import tensor

import exp.nb_00 as nb
from exp.nb_00 import equals, near, quick_mode, quick_subset, test, test_eq, test_near, test_near_zero, torch_threads

# what the notebooks and the lesson's code rely on, via `from exp.nb_00 import *` (through 05 and on)
NAMESPACE = ['math', 'os', 're', 'partial', 'Path', 'plt', 'torch', 'F', 'nn', 'optim', 'tensor']
PUBLIC = ['test', 'equals', 'near', 'test_eq', 'test_near', 'test_near_zero', 'quick_mode', 'quick_subset',
          'torch_threads', 'get_data', 'dataset_name', 'parse_idx', 'read_idx', 'CorruptFileError',
          'DataUnavailableError', 'MIRRORS', 'SHA256', 'DATASETS', 'N_TRAIN', 'N_VALID', 'DOWNLOAD_TIMEOUT',
          'DOWNLOAD_DEADLINE']
# imported or defined only for the download: they must not reach every later notebook's namespace
PRIVATE = ['gzip', 'hashlib', 'struct', 'tempfile', 'time', 'urllib', 'warnings', 'zlib', 'HTTPException',
           'contextmanager', 'mock', 'save', 'fetch', 'download', 'verified', 'load_file']

def test_star_import_gives_a_working_namespace():
    scope = {}
    exec('from exp.nb_00 import *', scope)
    missing = [n for n in NAMESPACE + PUBLIC if n not in scope]
    assert not missing, f'not exported by exp.nb_00: {missing}'
    exec('x = F.relu(tensor([-1., 2.])) @ nn.Linear(2, 1).weight.T\n'
         'step = partial(optim.SGD, lr=0.1)\n'
         'name = Path(os.path.join("a", "b.gz")).suffix + re.sub("z", "", "z") + str(math.floor(1.5))\n'
         'fig = plt.figure(); plt.close(fig)', scope)
    assert scope['x'].shape == (1,) and scope['name'] == '.gz1'
    assert 'normalize' not in scope  # defined in notebook 05
    leaked = [n for n in PRIVATE if n in scope]
    assert not leaked, f'exp.nb_00 exports {leaked}'

def test_all_lists_the_public_names_and_nothing_private():
    assert hasattr(nb, '__all__'), 'exp/nb_00.py has no __all__: `from exp.nb_00 import *` would give every import'
    assert set(NAMESPACE + PUBLIC) <= set(nb.__all__)
    assert not set(PRIVATE) & set(nb.__all__)
    assert not [n for n in nb.__all__ if n.startswith('_')]
    assert [n for n in nb.__all__ if not hasattr(nb, n)] == []

def test_helpers():
    test_eq(tensor([1, 2]), tensor([1, 2]))
    test_eq('a', 'a')
    with pytest.raises(AssertionError, match='==:'): test_eq(tensor([1, 2]), tensor([1, 3]))
    with pytest.raises(AssertionError): test_eq(tensor([1, 2]), tensor([1, 2, 3]))  # another shape
    assert equals([1, 2], tensor([1, 2])) and not equals(tensor([1.]), tensor([1, 2]))
    test_near(tensor([1.0, 2.0]), tensor([1.0001, 2.0]))
    assert near(1.0, 1.0005) and not near(1.0, 1.1)
    with pytest.raises(AssertionError, match='near'): test_near(tensor(1.0), tensor(1.1))
    test_near_zero(tensor([1e-4, -2e-4]))
    with pytest.raises(AssertionError, match='Near zero'): test_near_zero(tensor([0.0, 0.1]))
    test_near_zero(tensor([0.05]), tol=0.1)
    test(3, 2, int.__gt__, 'greater')
    with pytest.raises(AssertionError, match='greater'): test(2, 3, int.__gt__, 'greater')
    with pytest.raises(AssertionError, match='lt:\n2\n1'): test(2, 1, lambda a, b: a < b, 'lt')

@pytest.mark.parametrize('value, quick', [(None, False), ('', False), ('0', False), ('1', True), ('yes', True)])
def test_quick_mode_and_subset(monkeypatch, value, quick):
    if value is None: monkeypatch.delenv('EXP_QUICK', raising=False)
    else: monkeypatch.setenv('EXP_QUICK', value)
    assert quick_mode() is quick
    data = torch.zeros(10, 4), torch.arange(10), torch.ones(5, 4), torch.arange(5)
    subset = quick_subset(*data, n_train=3, n_valid=2)
    assert [len(t) for t in subset] == ([3, 3, 2, 2] if quick else [10, 10, 5, 5])
    assert all(torch.equal(s, d[:len(s)]) for s, d in zip(subset, data))  # the first items, in order
    assert [len(t) for t in quick_subset(*data)] == [10, 10, 5, 5]  # the defaults are larger than this data

def test_quick_mode_follows_the_environment_as_it_changes(monkeypatch):
    monkeypatch.setenv('EXP_QUICK', '1')
    assert quick_mode()
    monkeypatch.setenv('EXP_QUICK', '0')
    assert not quick_mode()

def test_torch_threads_sets_and_restores_the_number_of_threads():
    before = torch.get_num_threads()
    with torch_threads(1): assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ZeroDivisionError):
        with torch_threads(1): 1 / 0
    assert torch.get_num_threads() == before   # put back after an error too
    for bad in (0, -1, 1.5, '2'):
        with pytest.raises(ValueError, match='torch_threads: n must be an integer >= 1'):
            with torch_threads(bad): pass
