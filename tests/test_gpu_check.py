"""benchmarks/gpu_check.py: on the CPU every part is a row saying why it was skipped; the CUDA-only tests are
found by their skip marks; on a CUDA machine (faked) each part runs the command it should."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
import gpu_check as gc  # noqa: E402

NO_GPU = dict(os.environ, CUDA_VISIBLE_DEVICES='')  # as on a machine without one, even where there is one


def script(*args):
    return subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu_check.py'), *args], cwd=ROOT, env=NO_GPU,
                          capture_output=True, text=True, timeout=300)


def test_on_the_cpu_every_part_is_a_row_saying_why_it_was_skipped():
    done = script()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith('gpu_check: no CUDA GPU, torch ') and lines[0].endswith('budget 8 minutes')
    assert lines[1:3] == ['| part | result | seconds | details |', '|---|---|---:|---|']
    reason = 'no CUDA GPU (torch.cuda.is_available() is False)'
    assert lines[3:7] == [f'| {title} | skipped | - | {reason} |' for title in gc.TITLES.values()]
    assert lines[7].startswith('| total | ok | ') and lines[7].endswith(' | within the 8-minute budget |')
    assert len(lines) == 8  # no log folder when nothing ran


def test_parts_chooses_the_rows_and_an_unknown_part_is_exit_2():
    lines = script('--parts', 'ddp,epoch').stdout.splitlines()
    assert [line.split(' | ')[0] for line in lines[3:-1]] == ['| 07b with NCCL on every GPU', "| epochs of 07's CNN"]
    done = script('--parts', 'epoch,gpus')
    assert done.returncode == 2 and 'unknown part(s) gpus' in done.stderr and 'tests, notebooks, epoch, ddp' in done.stderr


def test_the_tests_part_selects_exactly_the_tests_that_skip_without_cuda(tmp_path):
    (tmp_path / 'test_some.py').write_text(
        "import pytest\n"
        "cuda = pytest.mark.skipif(True, reason='needs a CUDA GPU; this machine has none')\n"
        "@cuda\ndef test_on_cuda(): pass\n"
        "@pytest.mark.skipif(True, reason='needs a GPU')\ndef test_on_a_gpu(): pass\n"
        "@pytest.mark.skipif(True, reason='set EXP_DATA_DIR')\ndef test_with_data(): pass\n"
        "def test_anywhere(): pass\n")
    done = script('--list-tests', '--tests', str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    listed = [line.split('::')[1] for line in done.stdout.splitlines() if '::' in line]
    assert listed == ['test_on_cuda', 'test_on_a_gpu']


def test_on_a_cuda_machine_each_part_runs_its_command(monkeypatch, capsys):
    import torch
    import torch.distributed as dist
    commands = []
    def run_command(cmd, timeout, log):
        commands.append([str(c) for c in cmd])
        return 0, '  00_data   3.0s  ok\n  07b_distributed   9.5s  ok\nlast line of the output\n'
    monkeypatch.setattr(gc, 'cuda_available', lambda: True)
    monkeypatch.setattr(gc, 'gpu_count', lambda: 2)
    monkeypatch.setattr(gc, 'need_mnist', lambda: None)
    monkeypatch.setattr(gc, 'run_command', run_command)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'Fake GPU')
    monkeypatch.setattr(dist, 'is_nccl_available', lambda: True)
    monkeypatch.setitem(gc.PARTS, 'epoch', lambda args, logs: [("epoch of 07's CNN, bs=512: RunningBatchNorm", 'ok', 1.5, 'x')])
    assert gc.main([]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith('gpu_check: 2 x Fake GPU, torch ')
    tests, check, notebooks, ddp = commands
    assert tests[1:5] == ['-m', 'pytest', '-p', 'gpu_check'] and tests[-1] == 'tests'
    assert check[1:] == [str(ROOT / 'notebook2script.py'), '--check']
    assert notebooks[1:4] == [str(ROOT / 'run_notebooks.py'), '--quick', '--no-export'] and '--out' in notebooks
    assert ddp[1:5] == ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    assert ddp[5:] == [str(ROOT / 'examples' / 'train_distributed.py'), '--epochs', '1']
    assert out[3:7] == ['| CUDA-only tests | ok | 0.0 | last line of the output |'.replace('0.0', out[3].split(' | ')[2]),
                        f"| notebooks in quick mode | ok | {out[4].split(' | ')[2]} | 00 3s, 07b 10s |",
                        "| epoch of 07's CNN, bs=512: RunningBatchNorm | ok | 1.5 | x |",
                        f"| 07b with NCCL on 2 GPUs | ok | {out[6].split(' | ')[2]} | last line of the output |"]


def test_a_failing_part_is_a_row_and_the_exit_status_is_1(monkeypatch, capsys):
    monkeypatch.setattr(gc, 'cuda_available', lambda: True)
    monkeypatch.setattr(gc, 'gpu_count', lambda: 1)
    monkeypatch.setattr(gc, 'run_command', lambda cmd, timeout, log: (1, '3 passed, 1 failed in 2.0s\n'))
    import torch
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'Fake GPU')
    monkeypatch.setitem(gc.PARTS, 'epoch', lambda args, logs: 1 / 0)
    assert gc.main(['--parts', 'tests,epoch']) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[3].startswith('| CUDA-only tests | FAILED | ') and out[3].endswith(' | 3 passed, 1 failed in 2.0s |')
    assert out[4] == "| epochs of 07's CNN | FAILED | - | ZeroDivisionError: division by zero |"


def test_without_local_mnist_the_notebooks_and_ddp_parts_are_skipped_not_downloaded(monkeypatch, capsys, tmp_path):
    import torch
    monkeypatch.setenv('EXP_DATA_DIR', str(tmp_path))
    monkeypatch.setattr(gc, 'cuda_available', lambda: True)
    monkeypatch.setattr(gc, 'gpu_count', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'Fake GPU')
    monkeypatch.setattr(gc, 'run_command', lambda *a: pytest.fail('nothing should run'))
    assert gc.main(['--parts', 'notebooks,ddp']) == 0
    out = capsys.readouterr().out.splitlines()
    why = f'no MNIST in {tmp_path / "mnist"}: set EXP_DATA_DIR to the folder holding mnist/'
    assert out[3:5] == [f'| notebooks in quick mode | skipped | - | {why} |', f'| 07b with NCCL on every GPU | skipped | - | {why} |']


def test_the_epoch_part_times_both_norms_at_both_batch_sizes(monkeypatch, capsys):
    "The GPU path run on the CPU: synchronisation and the sync count faked, 640 random images."
    import torch
    import bench
    from exp.nb_07b import DataBunch, Dataset, get_dls
    g = torch.Generator().manual_seed(0)
    ds = Dataset(torch.randn(640, 784, generator=g), torch.randint(0, 10, (640,), generator=g))
    monkeypatch.setattr(gc, 'mnist_data', lambda bs: (DataBunch(*get_dls(ds, ds, bs), c=10), 'random images'))
    monkeypatch.setattr(gc, 'cuda_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'synchronize', lambda *a: None)
    models = []
    monkeypatch.setattr(bench, 'syncs_per_step', lambda model, bs: models.append(model) or 0)
    rows = gc.part_epoch(None, None)
    assert [what for what, *_ in rows] == [f"epoch of 07's CNN, bs={bs}: {norm}" for bs in (512, 32)
                                           for norm in ('nn.BatchNorm2d', 'RunningBatchNorm', 'FastRunningBatchNorm')]
    assert all(result == 'ok' and seconds > 0 for _, result, seconds, _ in rows)
    assert rows[1][3].startswith('2 steps of random images, ') and 'x nn.BatchNorm2d; 0 host-device syncs' in rows[1][3]
    convs = [m for m in models[0].modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 64]
    assert type(models[1][0][2]).__name__ == 'RunningBatchNorm'
