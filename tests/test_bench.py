"""benchmarks/bench.py runs and prints its table (a smoke test: the timings themselves are never asserted)."""
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import bench  # noqa: E402

ROW = re.compile(r'^\| (.+) \| (\d+\.\d{4}) \| (\d+\.\d{4}) \| (\d+\.\d\d)x \|$')


def test_sections_print_one_row_per_figure(capsys):
    bench.main(['dataloader', 'running_batchnorm', '--repeats', '1'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('machine: ') and lines[0].endswith('median of 1')
    assert lines[1:3] == ['| benchmark | ours (s) | reference (s) | ratio |', '|---|---:|---:|---:|']
    rows = [ROW.match(l) for l in lines[3:]]
    assert all(rows), [l for l, r in zip(lines[3:], rows) if not r]
    assert len(rows) == 6 + 9  # 3 batch sizes x (in order, shuffled); 3 batch sizes x 3 comparisons
    names = [r.group(1) for r in rows]
    assert names[:2] == ['DataLoader in order, bs=2 / slicing', 'DataLoader shuffled, bs=2 / indexing by randperm']
    assert names[6:9] == [f"training step of 07's CNN, bs=2: {n} / nn.BatchNorm2d" for n in
                          ('RunningBatchNorm', 'FastRunningBatchNorm', "the lesson's RunningBatchNorm")]
    assert all(float(r.group(4)) > 0 for r in rows)


def test_only_and_threads_run_each_chosen_section_once_per_thread_count(monkeypatch, capsys):
    seen = []
    def fake(repeats):
        seen.append(torch.get_num_threads())
        return [('fake figure', 1.0, 2.0, 0.5)]
    monkeypatch.setitem(bench.SECTIONS, 'fake', fake)
    monkeypatch.setitem(bench.ALIASES, 'f', 'fake')
    before = torch.get_num_threads()
    bench.main(['--only', 'f', '--threads', '1,2', '--repeats', '1'])
    lines = capsys.readouterr().out.splitlines()
    assert seen == [1, 2] and torch.get_num_threads() == before
    assert ', 1, 2 torch threads, ' in lines[0]
    assert lines[3:] == ['| 1 thread: fake figure | 1.0000 | 2.0000 | 0.50x |', '| 2 threads: fake figure | 1.0000 | 2.0000 | 0.50x |']


def test_compiled_rows_compare_with_eager_and_with_compiled_batchnorm(monkeypatch, capsys):
    monkeypatch.setenv('BENCH_COMPILE_BACKEND', 'eager')  # dynamo without a C compiler: quick
    monkeypatch.setattr(bench, 'STEPS', ((2, 2),))
    bench.main(['--only', 'compile', '--repeats', '1'])
    rows = [ROW.match(l) for l in capsys.readouterr().out.splitlines()[3:]]
    assert all(rows) and [r.group(1) for r in rows] == [
        "training step of 07's CNN, bs=2: RunningBatchNorm compiled (eager) / eager",
        "training step of 07's CNN, bs=2: RunningBatchNorm compiled / nn.BatchNorm2d compiled (eager)"]


def test_the_runner_section_has_a_batch_size_2_row(monkeypatch, capsys):
    monkeypatch.setattr(bench, 'RUNNER_SIZES', ((2, 60), (32, 10_000)))
    monkeypatch.setattr(bench, 'compare', lambda ours, reference, repeats: (1.0, 1.0, 1.0))  # ours == reference is checked first
    bench.main(['--only', 'runner', '--repeats', '1'])
    rows = [ROW.match(l) for l in capsys.readouterr().out.splitlines()[3:]]
    assert all(rows) and [r.group(1) for r in rows] == [
        'epoch of the CNN, Runner + 5 callbacks / hand-written loop, bs=2 (60 items)',
        'epoch of the CNN, Runner + 5 callbacks / hand-written loop, bs=32']


def test_the_running_batchnorm_rows_train_notebook_07s_network():
    shapes = []
    model = bench.norm_cnn(torch.nn.BatchNorm2d)
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d): m.register_forward_hook(lambda mod, i, out: shapes.append(tuple(out.shape[1:])))
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert shapes == [(8, 14, 14), (16, 7, 7), (32, 4, 4), (64, 2, 2), (64, 1, 1)]  # the last sees 1x1 pixels
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 5


def test_library_names_come_from_the_last_module():
    import re as regex
    source = (Path(bench.__file__)).read_text()
    assert set(regex.findall(r'from (exp\.nb_\w+) import', source)) == {'exp.nb_07b'}


@pytest.mark.parametrize('argv, message', [(['nonsense'], 'unknown section(s) nonsense'),
                                           (['--only', 'rbn,nonsense'], 'unknown --only name(s) nonsense'),
                                           (['--threads', '0'], '--threads takes positive thread counts'),
                                           (['--threads', 'two'], '--threads takes positive thread counts'),
                                           (['--repeats', '0'], '--repeats must be at least 1')])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e: bench.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
