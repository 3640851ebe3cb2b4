"""benchmarks/norm_study.py: its learning-rate rule, one run of a cell, the table it writes, bad arguments."""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
import norm_study as ns  # noqa: E402
from exp.nb_07 import Dataset  # noqa: E402


def test_peak_lr_rule():
    assert [round(ns.peak_lr(bs), 4) for bs in ns.BATCH_SIZES] == [0.4, 0.5657, 0.8, 1.6]


def test_lr_schedule_warms_up_then_anneals():
    sched, peak = ns.lr_schedule(32), ns.peak_lr(32)
    assert sched(0.) == pytest.approx(peak / 10)
    assert sched(0.25) == pytest.approx(peak)
    assert sched(1.) == pytest.approx(peak / 20)
    assert sched(0.1) < sched(0.2) < sched(0.25) > sched(0.5) > sched(0.9)


@pytest.fixture
def tiny_data(monkeypatch):
    "Random MNIST-shaped data instead of get_data: 64 training and 40 validation images."
    g = torch.Generator().manual_seed(0)
    train = Dataset(torch.randn(64, 784, generator=g), torch.randint(0, 10, (64,), generator=g))
    valid = Dataset(torch.randn(40, 784, generator=g), torch.randint(0, 10, (40,), generator=g))
    monkeypatch.setattr(ns, 'load', lambda dataset, n_train=None, n_valid=None: (train, valid))
    return train, valid


@pytest.mark.parametrize('norm', ns.NORMS)
def test_run_one_trains_each_norm_and_is_repeatable(tiny_data, norm):
    job = ('mnist', norm, 8, 3, None, None, None)
    r = ns.run_one(job)
    assert (r['dataset'], r['norm'], r['bs'], r['seed']) == ('mnist', norm, 8, 3)
    assert r['steps'] == 8 and r['lr'] == pytest.approx(ns.peak_lr(8))
    assert r['valid_acc'] * 40 == pytest.approx(round(r['valid_acc'] * 40))  # a count of 40 images
    assert 0 <= r['valid_acc'] <= 1
    again = ns.run_one(job)
    assert (again['valid_acc'], again['train_loss']) == (r['valid_acc'], r['train_loss'])


def test_run_one_stops_after_max_steps(tiny_data, monkeypatch):
    seen = []
    original = ns.StopAfter
    def spy(n):
        cb = original(n)
        after = cb.after_batch
        def after_batch():
            if cb.in_train: seen.append(cb.n_iter)
            after()
        cb.after_batch = after_batch
        return cb
    monkeypatch.setattr(ns, 'StopAfter', spy)
    ns.run_one(('mnist', 'BatchNorm', 2, 0, None, None, 5))
    assert max(seen) == 5  # 32 steps in the epoch, stopped at the fifth


def record(dataset, norm, bs, seed, acc, diverged=None):
    return {'dataset': dataset, 'norm': norm, 'bs': bs, 'seed': seed, 'lr': ns.peak_lr(bs), 'valid_acc': acc,
            'train_loss': None, 'diverged_at': diverged, 'steps': 1, 'seconds': 1800.}


def test_table_means_ranges_divergences_and_missing_cells():
    runs = [record('mnist', 'BatchNorm', 2, 0, 0.90), record('mnist', 'BatchNorm', 2, 1, 0.96),
            record('mnist', 'LayerNorm', 2, 0, 0.10, [0, 5]), record('mnist', 'LayerNorm', 2, 1, 0.12),
            record('mnist', 'GroupNorm', 32, 0, 0.98)]
    results = {'runs': {ns.key(r): r for r in runs},
               'meta': {'seeds': [0, 1], 'recipe': 'RECIPE.', 'command': 'CMD', 'machine': 'MACHINE',
                        'torch': 'T', 'date': 'D'}}
    md = ns.table(results)
    lines = md.splitlines()
    assert 'seeds 0, 1' in lines[0] and 'RECIPE.' in lines[0]
    assert '5 runs, 2.5 hours of training' in lines[2]
    assert '| BatchNorm | 93.0 (90.0-96.0) | … | … | … |' in lines
    assert '| LayerNorm | 11.0 (10.0-12.0) †1 | … | … | … |' in lines
    assert '| GroupNorm | … | … | 98.0 [1/2] | … |' in lines
    assert md.count('| none | … | … | … | … |') == 2  # both datasets


def test_write_is_atomic_and_round_trips(tmp_path):
    results = {'runs': {}, 'meta': {'seeds': [0], 'recipe': '', 'command': '', 'machine': '', 'torch': '', 'date': ''}}
    ns.write(results, tmp_path / 'out' / 'norm_study.json', tmp_path / 'out' / 'norm_study.md')
    assert json.loads((tmp_path / 'out' / 'norm_study.json').read_text()) == results
    assert (tmp_path / 'out' / 'norm_study.md').read_text() == ns.table(results)
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['norm_study.json', 'norm_study.md']


def test_table_without_a_study_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e: ns.main(['--table', '--out', str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / 'norm_study.json') in err and 'run the study first' in err


def test_workers_must_be_positive(capsys):
    with pytest.raises(SystemExit) as e: ns.main(['--workers', '0'])
    assert e.value.code == 2 and '--workers must be at least 1' in capsys.readouterr().err


def test_the_study_trains_notebook_07s_network():
    import re
    nb = json.loads((ROOT / 'nbs' / '07_batchnorm.ipynb').read_text())
    lines = [l for c in nb['cells'] if c['cell_type'] == 'code' for l in ''.join(c['source']).splitlines()]
    nfs = [json.loads(re.findall(r'\[[\d, ]+\]', l)[-1]) for l in lines if re.match(r'[\w, ]*\bnfs = ', l)]
    assert nfs == [ns.NFS] == [[8, 16, 32, 64, 64]]  # the lesson's: the last convolution sees 1x1 pixels


def test_run_one_builds_the_network_whose_last_convolution_sees_one_pixel(tiny_data, monkeypatch):
    shapes = []
    original = ns.conv_for
    def spy(norm):
        layer = original(norm)
        def made(*args, **kwargs):
            m = layer(*args, **kwargs)
            m.register_forward_hook(lambda mod, inp, out: shapes.append(tuple(out.shape[1:])))
            return m
        return made
    monkeypatch.setattr(ns, 'conv_for', spy)
    ns.run_one(('mnist', 'RunningBatchNorm', 8, 0, None, None, 1))
    assert shapes[:5] == [(8, 14, 14), (16, 7, 7), (32, 4, 4), (64, 2, 2), (64, 1, 1)]


def test_the_table_header_names_the_network():
    assert '8-16-32-64-64' in ns.RECIPE


def test_a_study_made_with_another_recipe_is_not_resumed(tmp_path, capsys):
    old = {'runs': {'mnist/BatchNorm/bs2/seed0': record('mnist', 'BatchNorm', 2, 0, 0.9)},
           'meta': {'seeds': [0], 'recipe': 'conv 8-16-32-32 ...', 'command': '', 'machine': '', 'torch': '', 'date': ''}}
    (tmp_path / 'norm_study.json').write_text(json.dumps(old))
    with pytest.raises(SystemExit) as e: ns.main(['--out', str(tmp_path), '--seeds', '0'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'another recipe' in err and 'conv 8-16-32-32' in err and '--out' in err
    assert json.loads((tmp_path / 'norm_study.json').read_text()) == old  # untouched


def meta(seeds):
    return {'seeds': seeds, 'recipe': ns.RECIPE, 'command': 'CMD', 'machine': 'M', 'torch': 'T', 'date': 'D'}


WRITER = '''
import json, sys, time
sys.path.insert(0, {bench!r})
import norm_study as ns
from pathlib import Path
seed, out = int(sys.argv[1]), Path(sys.argv[2])
results = {{'runs': {{}}, 'meta': dict({meta!r}, seeds=[seed])}}  # as `--seeds <seed>` would
while not (out / 'go').exists(): time.sleep(0.01)  # both writers start together
for i, norm in enumerate(ns.NORMS * 4):
    r = dict(dataset=ns.DATASETS[i % 2], norm=norm, bs=ns.BATCH_SIZES[i // 6 % 4], seed=seed, lr=0.4, valid_acc=0.5,
             train_loss=None, diverged_at=None, steps=1, seconds=1.)
    results['runs'][ns.key(r)] = r
    ns.write(results, out / 'norm_study.json', out / 'norm_study.md')
'''


def test_two_studies_writing_one_folder_at_once_lose_no_run(tmp_path):
    import subprocess
    code = WRITER.format(bench=str(ROOT / 'benchmarks'), meta=meta([0]))
    writers = [subprocess.Popen([sys.executable, '-c', code, str(seed), str(tmp_path)]) for seed in (0, 1)]
    (tmp_path / 'go').touch()
    assert [w.wait(timeout=120) for w in writers] == [0, 0]
    results = json.loads((tmp_path / 'norm_study.json').read_text())
    assert len(results['runs']) == 2 * 24 and {r['seed'] for r in results['runs'].values()} == {0, 1}
    assert results['meta']['seeds'] == [0, 1]
    assert '48 runs' in (tmp_path / 'norm_study.md').read_text()


@pytest.mark.parametrize('content, why', [
    (b'', 'is empty'), (b'{"runs": {"mnist/none', 'is not complete JSON'), (b'[1, 2]', 'holds a JSON list'),
    (b'{"meta": {}}', "has no 'runs'"), (b'{"runs": [1, 2]}', "has no 'runs'"),
    (b'{"runs": {"a": 3}}', "run 'a' is not an object"),
    (b'{"runs": {"mnist/none/bs2/seed0": {"dataset": "mnist", "norm": "none"}}}', 'lacks a valid bs, seed'),
    (b'{"runs": {"mnist/none/bs2/seed0": {"dataset": "mnist", "norm": "none", "bs": 2, "seed": 0, "valid_acc": 0.5, '
     b'"seconds": 1, "diverged_at": 7}}}', 'lacks a valid diverged_at'),
    (b'\x89PNG\r\n\x1a\n\x00\xff\xfe', 'not text')])
def test_resuming_from_a_truncated_or_foreign_file_is_one_line_naming_it(tmp_path, capsys, content, why):
    (tmp_path / 'norm_study.json').write_bytes(content)
    for argv in (['--out', str(tmp_path), '--seeds', '0'], ['--table', '--out', str(tmp_path)]):
        with pytest.raises(SystemExit) as e: ns.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count('\n') == 1, err
        assert str(tmp_path / 'norm_study.json') in err and why in err and 'not a norm-study results file' in err
    assert (tmp_path / 'norm_study.json').read_bytes() == content  # untouched


def test_the_header_names_the_seeds_the_numbers_come_from():
    runs = [record('mnist', 'BatchNorm', 2, 0, 0.90), record('mnist', 'BatchNorm', 2, 1, 0.96)]
    resumed = ns.table({'runs': {ns.key(r): r for r in runs}, 'meta': meta([0])})  # resumed with --seeds 0
    assert 'mean over seeds 0, 1 (min-max in brackets)' in resumed.splitlines()[0]
    assert '| BatchNorm | 93.0 (90.0-96.0) | … | … | … |' in resumed
    one = ns.table({'runs': {ns.key(runs[0]): runs[0]}, 'meta': meta([0])})
    assert 'one run per cell (seed 0)' in one.splitlines()[0] and 'brackets' not in one and 'mean' not in one.splitlines()[0]
    assert '| BatchNorm | 90.0 | … | … | … |' in one
    part = ns.table({'runs': {ns.key(runs[0]): runs[0]}, 'meta': meta([0, 1])})
    assert '| BatchNorm | 90.0 [1/2] |' in part and '[k/2]: only k of the seeds 0, 1 run yet' in part


def test_smoke_runs_go_to_a_fresh_folder_each(tmp_path, monkeypatch, capsys):
    import tempfile
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    monkeypatch.setattr(ns, 'finished', lambda jobs, workers: (record(*job[:4], 0.5) for job in jobs))
    folders = []
    for _ in range(2):
        ns.main(['--smoke'])
        out = capsys.readouterr().out
        folders.append(Path(next(l for l in out.splitlines() if l.startswith('smoke run into ')).split(' into ')[1]))
        assert '0 of 48 runs done already' in out  # nothing taken over from an earlier smoke run
    assert folders[0] != folders[1] and all(f.parent == tmp_path for f in folders)
    assert all(len(json.loads((f / 'norm_study.json').read_text())['runs']) == 48 for f in folders)
