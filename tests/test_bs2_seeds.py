"Tests of benchmarks/bs2_seeds.py and benchmarks/layernorm_ablation.py (and study_results.py, which they share): their tables, resuming, and the ablation's layer."
import json, sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import bs2_seeds, layernorm_ablation  # noqa: E402
import exp.nb_07 as nb  # noqa: E402

META = {'command': 'python benchmarks/bs2_seeds.py', 'machine': 'm', 'torch': 't', 'date': 'd', 'recipe': bs2_seeds.RECIPE}


def rec(norm, seed, acc, **kw): return {'norm': norm, 'seed': seed, 'valid_acc': acc, 'seconds': 60., **kw}


def test_bs2_table_shows_each_seed_the_mean_and_the_range():
    runs = {'BatchNorm2d/seed0': rec('BatchNorm2d', 0, 0.24, train_loss=2.35),
            'BatchNorm2d/seed1': rec('BatchNorm2d', 1, 0.286, train_loss=2.6e19),
            'RunningBatchNorm/seed1': rec('RunningBatchNorm', 1, None, train_loss=None)}
    table = bs2_seeds.table({'runs': runs, 'meta': META})
    assert '| norm | seed 0 | seed 1 | mean | min-max |' in table
    assert '| nn.BatchNorm2d | 24.0 | 28.6 | 26.3 | 24.0-28.6 |' in table
    assert '| RunningBatchNorm | … | NaN |  |  |' in table    # not run; a run whose accuracy is not a number (no mean)
    assert 'GroupNorm' not in table                          # a norm without runs gets no row
    assert '3 runs, 3 minutes of training' in table
    assert 'above 10 or not a number) in: nn.BatchNorm2d seed 1 (2.6e+19), RunningBatchNorm seed 1 (NaN).' in table


def test_bs2_reruns_only_runs_made_with_other_code(tmp_path, monkeypatch):
    x = torch.randn(8, 784)
    monkeypatch.setattr(nb, 'get_data', lambda: (x, torch.zeros(8).long(), x, torch.zeros(8).long()))
    calls = []
    def fake_run(nb_, data2, norm, seed):
        calls.append((norm, seed))
        return rec(norm, seed, 0.5, code=bs2_seeds.code_of(nb_, norm), steps=4, train_loss=1.)
    monkeypatch.setattr(bs2_seeds, 'run_one', fake_run)
    old = rec('GroupNorm', 0, 0.9, code='old-code', train_loss=1.)
    current = rec('BatchNorm2d', 0, 0.2, code=bs2_seeds.code_of(nb, 'BatchNorm2d'), train_loss=2.3)
    (tmp_path / 'bs2_seeds.json').write_text(json.dumps({'runs': {'GroupNorm/seed0': old, 'BatchNorm2d/seed0': current},
                                                        'meta': META}))
    before = torch.get_num_threads()
    try: bs2_seeds.main(['--norms', 'BatchNorm2d', 'GroupNorm', '--seeds', '0', '--out', str(tmp_path)])
    finally: torch.set_num_threads(before)
    assert calls == [('GroupNorm', 0)]
    runs = json.loads((tmp_path / 'bs2_seeds.json').read_text())['runs']
    assert runs['GroupNorm/seed0']['valid_acc'] == 0.5 and runs['BatchNorm2d/seed0']['valid_acc'] == 0.2
    assert '| GroupNorm (4 groups) | 50.0 |' in (tmp_path / 'bs2_seeds.md').read_text()


def test_bs2_refuses_a_results_file_of_another_recipe(tmp_path, capsys):
    (tmp_path / 'bs2_seeds.json').write_text(json.dumps({'runs': {'x': rec('BatchNorm2d', 0, 0.2, train_loss=2.3)},
                                                        'meta': dict(META, recipe='another network')}))
    with pytest.raises(SystemExit): bs2_seeds.main(['--seeds', '0', '--out', str(tmp_path)])
    assert 'another recipe' in capsys.readouterr().err


def test_ablation_layernorm_is_the_notebooks_or_the_lessons():
    x = torch.randn(4, 8, 5, 5) * 3 + 1
    assert torch.allclose(layernorm_ablation.AblationLayerNorm(unbiased=False)(x), nb.LayerNorm()(x), atol=1e-6)
    m, v = x.mean((1, 2, 3), keepdim=True), x.var((1, 2, 3), keepdim=True)   # the lesson's forward
    assert torch.allclose(layernorm_ablation.AblationLayerNorm(unbiased=True)(x), (x - m) / (v + 1e-5).sqrt(), atol=1e-6)


def test_ablation_run_records_the_step_it_diverged_at():
    torch.manual_seed(0)
    x, y = torch.randn(1024, 784), torch.randint(0, 10, (1024,))
    data = nb.DataBunch(*nb.get_dls(nb.Dataset(x, y), nb.Dataset(x[:100], y[:100]), 512), 10)
    calm = layernorm_ablation.run_one(nb, data, 'biased', True, 0.1, 0, 100)
    wild = layernorm_ablation.run_one(nb, data, 'unbiased', False, 1e30, 0, 100)
    assert calm['diverged_at'] is None and calm['train_loss'] is not None and 0 < calm['peak_activation'] < 1e3
    assert wild['diverged_at'] in (0, 1) and wild['train_loss'] is None


def test_ablation_table_counts_divergences_per_variant_and_lr():
    runs = {}
    for seed, div in ((0, 34), (1, None)):
        r = {'estimator': 'biased', 'bias': True, 'lr': 0.8, 'seed': seed, 'diverged_at': div, 'valid_acc': 0.96,
             'peak_activation': 1e20 if div else 18., 'seconds': 10.}
        runs[layernorm_ablation.key(r)] = r
    table = layernorm_ablation.table({'runs': runs, 'meta': {'recipe': 'r', 'command': 'c', 'machine': 'm', 'torch': 't', 'date': 'd'}})
    assert "| notebook 07's (variance / n, conv bias) | 1/2 NaN (step 34); 96.0 |" in table
    assert "| the lesson's (variance / (n-1), conv bias) | … |" in table
    assert '1e+20 to 1e+20 in the runs that diverged, 18 to 18 in the others' in table


def test_both_studies_say_when_there_is_no_json_to_make_a_table_from(tmp_path, capsys):
    for study in (bs2_seeds, layernorm_ablation):
        with pytest.raises(SystemExit): study.main(['--table', '--out', str(tmp_path)])
        assert 'does not exist' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []   # nothing written


def test_ablation_refuses_a_results_file_of_another_recipe_and_leaves_it(tmp_path, capsys):
    path = tmp_path / 'layernorm_ablation.json'
    path.write_text(json.dumps({'runs': {'x': {}}, 'meta': dict(META, recipe='another network')}))
    before, threads = path.read_text(), torch.get_num_threads()
    try:
        with pytest.raises(SystemExit): layernorm_ablation.main(['--seeds', '0', '--out', str(tmp_path)])
    finally: torch.set_num_threads(threads)   # the script runs on one thread
    assert 'another recipe' in capsys.readouterr().err and path.read_text() == before
