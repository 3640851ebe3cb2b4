"Tests of exp.nb_00 beyond the data (tests/test_data.py): the test helpers, quick mode, and the namespace it exports."
import pytest, torch
from torch import tensor

import exp.nb_00 as nb
from exp.nb_00 import equals, near, quick_mode, quick_subset, test, test_eq, test_near, test_near_zero

# what the notebooks and the lesson's code rely on, via `from exp.nb_00 import *` (through 05 and on)
NAMESPACE = ['math', 'os', 're', 'partial', 'Path', 'plt', 'torch', 'F', 'nn', 'optim', 'tensor']
# what notebook 05 exported before its data cells moved here (all but `normalize`, which stays in 05)
MOVED = ['test', 'equals', 'near', 'test_eq', 'test_near', 'test_near_zero', 'quick_mode', 'quick_subset',
         'get_data', 'MIRRORS', 'SHA256', 'DATASETS', 'TRAIN_IMAGES', 'TRAIN_LABELS', 'N_TRAIN', 'N_VALID',
         'DOWNLOAD_TIMEOUT', 'CorruptFileError', 'DataUnavailableError', 'dataset_name', 'parse_idx', 'gunzip',
         'read_idx', 'verified', 'data_dir', 'cache_dir', 'find_in_path', 'read_user_file', 'fetch', 'save',
         'unavailable_message', 'download', 'from_cache', 'load_file']
PRIVATE_IMPORTS = ['gzip', 'hashlib', 'struct', 'tempfile', 'time', 'urllib', 'warnings', 'zlib', 'HTTPException',
                   'IncompleteRead']

def test_star_import_gives_the_namespace_and_the_moved_names():
    scope = {}
    exec('from exp.nb_00 import *', scope)
    missing = [n for n in NAMESPACE + MOVED + ['DOWNLOAD_DEADLINE'] if n not in scope]
    assert not missing, f'not exported by exp.nb_00: {missing}'
    assert scope['F'] is torch.nn.functional and scope['tensor'] is torch.tensor and scope['nn'] is torch.nn
    assert 'normalize' not in scope  # stays in notebook 05

def test_data_imports_stay_private_once_there_is_an_all():
    if not hasattr(nb, '__all__'): pytest.skip('exp/nb_00.py has no __all__ (exporter without it)')
    assert not set(PRIVATE_IMPORTS) & set(nb.__all__)
    assert set(NAMESPACE + MOVED) <= set(nb.__all__)

def test_helpers():
    test_eq(tensor([1, 2]), tensor([1, 2]))
    test_eq('a', 'a')
    with pytest.raises(AssertionError, match='==:'): test_eq(tensor([1, 2]), tensor([1, 3]))
    with pytest.raises(AssertionError): test_eq(tensor([1, 2]), tensor([1, 2, 3]))
    assert equals([1, 2], tensor([1, 2])) and not equals(tensor([1.]), tensor([1, 2]))
    test_near(tensor([1.0, 2.0]), tensor([1.0001, 2.0]))
    assert near(1.0, 1.0005) and not near(1.0, 1.1)
    with pytest.raises(AssertionError, match='near'): test_near(tensor(1.0), tensor(1.1))
    test_near_zero(tensor([1e-4, -2e-4]))
    with pytest.raises(AssertionError, match='Near zero'): test_near_zero(tensor([0.1]))
    test(3, 2, int.__gt__, 'greater')
    with pytest.raises(AssertionError, match='greater'): test(2, 3, int.__gt__, 'greater')

def test_helpers_are_not_collected_as_tests():
    for helper in (test, test_eq, test_near, test_near_zero): assert helper.__test__ is False

@pytest.mark.parametrize('value, quick', [(None, False), ('', False), ('0', False), ('1', True), ('yes', True)])
def test_quick_mode_and_subset(monkeypatch, value, quick):
    if value is None: monkeypatch.delenv('EXP_QUICK', raising=False)
    else: monkeypatch.setenv('EXP_QUICK', value)
    assert quick_mode() is quick
    data = torch.zeros(10, 4), torch.arange(10), torch.ones(5, 4), torch.arange(5)
    sizes = [len(t) for t in quick_subset(*data, n_train=3, n_valid=2)]
    assert sizes == ([3, 3, 2, 2] if quick else [10, 10, 5, 5])


def test_torch_threads_sets_and_restores_the_number_of_threads():
    import torch
    from exp.nb_00 import torch_threads
    before = torch.get_num_threads()
    with torch_threads(1): assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ZeroDivisionError):
        with torch_threads(1): 1 / 0
    assert torch.get_num_threads() == before   # put back after an error too
    for bad in (0, -1, 1.5, '2'):
        with pytest.raises(ValueError, match='torch_threads: n must be an integer >= 1'):
            with torch_threads(bad): pass
