"""One command that checks the course on a CUDA machine, printing one table.

    python benchmarks/gpu_check.py                      # every part (meant to take under 8 minutes on one modern GPU)
    python benchmarks/gpu_check.py --parts tests,epoch  # some parts
    python benchmarks/gpu_check.py --list-tests         # only list the CUDA-only tests it would run

The parts:
  tests      the tests that skip without CUDA (a `skipif` mark whose reason names CUDA or a GPU), run on the GPU
  notebooks  every notebook in quick mode, `run_notebooks.py --quick --no-export`, saved into a temporary folder
  epoch      an epoch of notebook 07's CNN (filters 8-16-32-64-64) at batch sizes 512 and 32, with nn.BatchNorm2d, with
             RunningBatchNorm and with FastRunningBatchNorm (the second epoch timed, synchronised), and the host-device
             syncs of one training step
  ddp        07b on every local GPU, one process each, with NCCL:
             torchrun --standalone --nproc_per_node=<GPUs> examples/train_distributed.py --epochs 1

Where a part cannot run (no CUDA GPU, no NCCL, no data) it is a row saying why it was skipped, so the script runs
on the CPU too. Set EXP_DATA_DIR to the folder holding mnist/ (else the data comes from the cache or a download).
Each part's whole output is kept in a log folder, named at the end. Exit status: 0 if no part failed, 1 if one
did, 2 for bad arguments.
"""
import argparse, os, re, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'benchmarks')]  # exp/ and bench.py
BUDGET = 8 * 60  # seconds all parts together should take on one modern GPU
CUDA_REASON = re.compile(r'\b(cuda|gpus?)\b', re.IGNORECASE)
TIMEOUTS = {'tests': 120, 'notebooks': 240, 'ddp': 90}  # seconds: 7.5 minutes at most, with the epochs' minute


class Skip(Exception):
    "A part that cannot run on this machine; the message says why."


# --- as a pytest plugin (`-p gpu_check`): keep only the tests that skip without CUDA ----------------

def needs_cuda(item):
    "Whether the test `item` carries a skipif mark whose reason names CUDA or a GPU."
    return any(CUDA_REASON.search(str(m.kwargs.get('reason', ''))) for m in item.iter_markers('skipif'))


def pytest_collection_modifyitems(config, items):
    "Deselect every test that runs without CUDA: those are checked on the CPU already."
    keep = [item for item in items if needs_cuda(item)]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep


# --- running things ---------------------------------------------------------------------------------

def cuda_available():
    import torch
    return torch.cuda.is_available()


def gpu_count():
    import torch
    return torch.cuda.device_count()


def env():
    "The environment of the commands: ours, with the project and benchmarks/ first on PYTHONPATH."
    paths = [str(ROOT), str(ROOT / 'benchmarks'), os.environ.get('PYTHONPATH')]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))


def run_command(cmd, timeout, log):
    "Run `cmd` in the project root with its output in the file `log`; (exit status, output). 124: timed out."
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env(), timeout=timeout, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
        status, output = done.returncode, done.stdout
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors='replace') if isinstance(e.stdout, bytes) else e.stdout or ''
        status, output = 124, out + f'\n(stopped after {timeout} s)'
    log.write_text(' '.join(map(str, cmd)) + '\n\n' + output)
    return status, output


def last_line(output):
    "The last non-empty line of a command's output."
    return next((line.strip() for line in reversed(output.splitlines()) if line.strip()), '(no output)')


def need_cuda():
    if not cuda_available(): raise Skip('no CUDA GPU (torch.cuda.is_available() is False)')


def need_mnist():
    "Skip unless MNIST is on this machine (EXP_DATA_DIR, or get_data's cache): a download may hang for minutes."
    from exp.nb_00 import TRAIN_IMAGES, TRAIN_LABELS, _cache_dir
    folder = Path(os.environ['EXP_DATA_DIR']).expanduser() if os.environ.get('EXP_DATA_DIR') else _cache_dir()
    if not all((folder / 'mnist' / f'{f}.gz').is_file() for f in (TRAIN_IMAGES, TRAIN_LABELS)):
        raise Skip(f'no MNIST in {folder / "mnist"}: set EXP_DATA_DIR to the folder holding mnist/')


# --- the parts: each returns rows (what, result, seconds or None, details) --------------------------

def tests_command(paths, *extra):
    "The pytest command that runs only the CUDA-only tests found under `paths`."
    return [sys.executable, '-m', 'pytest', '-p', 'gpu_check', '-q', '-p', 'no:cacheprovider', '--continue-on-collection-errors', *extra, *paths]


def part_tests(args, logs):
    "The CUDA-only tests, run on the GPU."
    need_cuda()
    start = time.perf_counter()
    status, output = run_command(tests_command(args.tests), TIMEOUTS['tests'], logs / 'tests.log')
    summary = last_line(output)
    if status == 5: return [('CUDA-only tests', 'FAILED', time.perf_counter() - start, 'no test that skips without CUDA was found')]
    return [('CUDA-only tests', 'ok' if status == 0 else 'FAILED', time.perf_counter() - start, summary)]


def part_notebooks(args, logs):
    "Every notebook in quick mode on the GPU, saved in a temporary folder."
    need_cuda(); need_mnist()
    start = time.perf_counter()
    status, output = run_command([sys.executable, str(ROOT / 'notebook2script.py'), '--check'], 60, logs / 'export-check.log')
    if status: return [('notebooks in quick mode', 'FAILED', None, f'exp/ is out of date with the notebooks ({last_line(output)}): '
                        'run python notebook2script.py --all')]
    with tempfile.TemporaryDirectory(prefix='gpu_check_nbs_') as out:
        cmd = [sys.executable, str(ROOT / 'run_notebooks.py'), '--quick', '--no-export', '--out', out,
               '--timeout', str(TIMEOUTS['notebooks'])]
        status, output = run_command(cmd, TIMEOUTS['notebooks'], logs / 'notebooks.log')
    times = re.findall(r'^  (\S+)\s+([\d.]+)s  (\S.*)$', output, re.MULTILINE)  # the summary's lines
    each = ', '.join(f'{name.split("_")[0]} {float(s):.0f}s' + ('' if how == 'ok' else f' {how}') for name, s, how in times)
    why = '' if status == 0 else f' ({last_line(output)})'
    return [('notebooks in quick mode', 'ok' if status == 0 else 'FAILED', time.perf_counter() - start, (each or '-') + why)]


def mnist_data(bs):
    "Notebook 07's data at batch size `bs`: MNIST if it can be had without a download, else random images."
    import torch
    from exp.nb_07b import DataBunch, Dataset, get_data, get_dls, normalize_to
    try:
        if not os.environ.get('EXP_DATA_DIR'): raise FileNotFoundError('EXP_DATA_DIR is not set')
        x_train, y_train, x_valid, y_valid = get_data()
        what = 'MNIST'
    except (OSError, ValueError) as e:
        g = torch.Generator().manual_seed(0)
        x_train, y_train = torch.rand(50_000, 784, generator=g), torch.randint(0, 10, (50_000,), generator=g)
        x_valid, y_valid = x_train[:10_000], y_train[:10_000]
        what = f'random images ({e})'
    x_train, x_valid = normalize_to(x_train, x_valid)
    return DataBunch(*get_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), bs), c=10), what


def timed_epoch(data, norm):
    "Seconds of the second epoch (training and validation) of 07's CNN with `norm` on the GPU, synchronised; the model."
    import torch
    from functools import partial
    from exp.nb_07b import BatchTransformXCallback, DeviceCallback, conv_layer, get_learn_run, mnist_view
    torch.manual_seed(0)
    learn, run = get_learn_run([8, 16, 32, 64, 64], data, 0.4, conv_layer, norm=norm,
                               cbs=[DeviceCallback, partial(BatchTransformXCallback, mnist_view)])
    run.fit(1, learn)  # the first epoch warms up CUDA's kernels and allocator
    torch.cuda.synchronize()
    start = time.perf_counter()
    run.fit(1, learn)
    torch.cuda.synchronize()
    return time.perf_counter() - start, learn.model


def part_epoch(args, logs):
    "An epoch of 07's CNN with nn.BatchNorm2d, RunningBatchNorm and FastRunningBatchNorm at batch sizes 512 and 32, and the syncs."
    need_cuda()
    import torch
    from bench import syncs_per_step
    from exp.nb_07b import FastRunningBatchNorm, RunningBatchNorm
    rows = []
    for bs in (512, 32):
        data, what = mnist_data(bs)
        times = {}
        for name, norm in (('nn.BatchNorm2d', torch.nn.BatchNorm2d), ('RunningBatchNorm', RunningBatchNorm),
                           ('FastRunningBatchNorm', FastRunningBatchNorm)):
            seconds, model = timed_epoch(data, norm)
            times[name] = seconds
            syncs = syncs_per_step(model, bs)
            ratio = f', {seconds / times["nn.BatchNorm2d"]:.2f}x nn.BatchNorm2d' if name != 'nn.BatchNorm2d' else ''
            rows.append((f'epoch of 07\'s CNN, bs={bs}: {name}', 'ok', seconds,
                         f'{len(data.train_dl)} steps of {what}{ratio}; {syncs} host-device syncs per training step'))
    return rows


def part_ddp(args, logs):
    "07b's training script on every local GPU, one process each, with NCCL."
    need_cuda(); need_mnist()
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_nccl_available(): raise Skip('this PyTorch has no NCCL')
    n = gpu_count()
    start = time.perf_counter()
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}',
           str(ROOT / 'examples' / 'train_distributed.py'), '--epochs', '1']
    status, output = run_command(cmd, TIMEOUTS['ddp'], logs / 'ddp.log')
    return [(f'07b with NCCL on {n} GPU{"s" * (n > 1)}', 'ok' if status == 0 else 'FAILED', time.perf_counter() - start,
             last_line(output))]


PARTS = {'tests': part_tests, 'notebooks': part_notebooks, 'epoch': part_epoch, 'ddp': part_ddp}
TITLES = {'tests': 'CUDA-only tests', 'notebooks': 'notebooks in quick mode', 'epoch': "epochs of 07's CNN",
          'ddp': '07b with NCCL on every GPU'}


def list_tests(paths):
    "Print the tests the `tests` part runs (collected, not run); the exit status."
    with tempfile.TemporaryDirectory(prefix='gpu_check_') as logs:
        status, output = run_command(tests_command(paths, '--collect-only'), 300, Path(logs) / 'list.log')
    print(output.rstrip())
    return 0 if status in (0, 5) else 1


def cell(v):
    return '-' if v is None else f'{v:.1f}'


def main(argv=None):
    p = argparse.ArgumentParser(prog='gpu_check.py', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--parts', default=','.join(PARTS), help=f'comma-separated parts to run (default: all): {", ".join(PARTS)}')
    p.add_argument('--tests', nargs='+', default=['tests'], help='where the tests part looks for tests (default: tests)')
    p.add_argument('--list-tests', action='store_true', help='list the CUDA-only tests and exit')
    args = p.parse_args(argv)
    parts = [name.strip() for name in args.parts.split(',') if name.strip()]
    unknown = [name for name in parts if name not in PARTS]
    if unknown or not parts: p.error(f'--parts: unknown part(s) {", ".join(unknown) or "(none given)"}; choose from {", ".join(PARTS)}')
    if args.list_tests: return list_tests(args.tests)
    import torch
    logs = Path(tempfile.mkdtemp(prefix='gpu_check_'))
    where = f'{gpu_count()} x {torch.cuda.get_device_name()}' if cuda_available() else 'no CUDA GPU'
    print(f'gpu_check: {where}, torch {torch.__version__}, CUDA {torch.version.cuda or "-"}; budget {BUDGET // 60} minutes')
    print('| part | result | seconds | details |\n|---|---|---:|---|', flush=True)
    start, failed = time.perf_counter(), False
    for name in parts:
        try: rows = PARTS[name](args, logs)
        except Skip as e: rows = [(TITLES[name], 'skipped', None, str(e))]
        except Exception as e:  # one part's failure is a row; the others still run
            rows = [(TITLES[name], 'FAILED', None, f'{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ""}')]
        for what, result, seconds, details in rows:
            failed = failed or result == 'FAILED'
            print(f'| {what} | {result} | {cell(seconds)} | {details.replace("|", "/")} |', flush=True)
    total = time.perf_counter() - start
    print(f'| total | {"over budget" if total > BUDGET else "ok"} | {total:.1f} | '
          f'{"within" if total <= BUDGET else "over"} the {BUDGET // 60}-minute budget |')
    if any(logs.iterdir()): print(f'logs: {logs}')
    else: logs.rmdir()
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
