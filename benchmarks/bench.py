"""Benchmarks of the library, each figure a ratio of two timings taken in one run.

    python benchmarks/bench.py                          # every section
    python benchmarks/bench.py dataloader               # some sections
    python benchmarks/bench.py --only rbn,compile,telemetry --threads 1,2

Each ratio is the median over `--repeats` alternating runs of ours and the reference, so a noisy
machine slows both sides alike. Sections register themselves in SECTIONS; `--only` takes their short
names (ALIASES). With `--threads 1,2` every section runs once per torch thread count, its rows prefixed
with it. On a CUDA GPU the RunningBatchNorm rows are measured there too (synchronised around each
timing), with the number of host-device synchronisations per training step. Every name of the library comes
from exp.nb_07b, the last module, so each figure is of the version a student ends with.
"""
import argparse, os, platform, statistics, sys, time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SECTIONS = {}

def section(f):
    "Register a benchmark section: a function returning rows `(what, ours_s, reference_s, ratio)`."
    SECTIONS[f.__name__] = f
    return f

def timed(f):
    "Seconds one call of `f` takes."
    start = time.perf_counter(); f()
    return time.perf_counter() - start

def compare(ours, reference, repeats):
    "Median seconds of `ours` and `reference`, and the median of their per-repeat ratios."
    ours(); reference()  # warm up
    pairs = [(timed(ours), timed(reference)) for _ in range(repeats)]
    return (statistics.median(o for o, _ in pairs), statistics.median(r for _, r in pairs),
            statistics.median(o / r for o, r in pairs))

# --- DataLoader against slicing the tensors directly ---------------------------------------------

@section
def dataloader(repeats):
    "An epoch of pure loading (50,000 MNIST-shaped items) against indexing the tensors directly."
    from exp.nb_07b import DataLoader, Dataset, Sampler
    x, y = torch.rand(50_000, 784), torch.randint(0, 10, (50_000,))
    ds = Dataset(x, y)
    rows = []
    for bs in (2, 32, 512):
        def ours_in_order():
            for xb, yb in DataLoader(ds, Sampler(ds, bs)): pass
        def slicing():
            for i in range(0, len(x), bs): xb, yb = x[i:i + bs], y[i:i + bs]
        def ours_shuffled():
            for xb, yb in DataLoader(ds, Sampler(ds, bs, shuffle=True)): pass
        def indexing_shuffled():
            idxs = torch.randperm(len(x))
            for i in range(0, len(x), bs):
                b = idxs[i:i + bs]; xb, yb = x[b], y[b]
        rows.append((f'DataLoader in order, bs={bs} / slicing', *compare(ours_in_order, slicing, repeats)))
        rows.append((f'DataLoader shuffled, bs={bs} / indexing by randperm', *compare(ours_shuffled, indexing_shuffled, repeats)))
    return rows

# --- activation telemetry: training with ActivationStatsCallback against without ----------------

@section
def telemetry(repeats):
    "An epoch of the lesson's CNN (10,000 MNIST-shaped items) with the activation-statistics callback against without."
    from exp.nb_07b import (ActivationStatsCallback, DataBunch, Dataset, DeviceCallback, BatchTransformXCallback,
                            conv_layer, get_dls, get_learn_run, mnist_view)
    x, y = torch.randn(12_000, 784), torch.randint(0, 10, (12_000,))
    rows = []
    batch_sizes = (32, 512) if not torch.cuda.is_available() else (32, 512, 2048)
    for bs in batch_sizes:
        data = DataBunch(*get_dls(Dataset(x[:10_000], y[:10_000]), Dataset(x[10_000:], y[10_000:]), bs), c=10)
        def epoch(with_telemetry):
            cbs = [DeviceCallback, partial(BatchTransformXCallback, mnist_view)]
            if with_telemetry: cbs.append(ActivationStatsCallback)
            learn, run = get_learn_run([8, 16, 32, 32], data, 0.4, conv_layer, cbs=cbs, bn=False, leak=0.1, sub=0.4, maxv=6.)
            def fit():
                run.fit(1, learn)
                if torch.cuda.is_available(): torch.cuda.synchronize()
            return fit
        rows.append((f'epoch with activation telemetry / without, bs={bs}', *compare(epoch(True), epoch(False), repeats)))
    return rows

# --- the Runner with its usual callbacks against a hand-written PyTorch loop -----------------------

RUNNER_SIZES = ((2, 2_000), (32, 10_000), (512, 10_000))  # batch size, training items (a fifth as many to validate)

@section
def runner(repeats):
    "An epoch of the lesson's CNN (10,000 MNIST-shaped items, then 2,000 to validate; at bs=2, 2,000 then 400): our Runner with its usual callbacks against a hand-written loop."
    import copy, io
    from contextlib import redirect_stdout
    import torch.nn.functional as F
    from torch import optim
    from exp.nb_07b import (AvgStatsCallback, BatchTransformXCallback, DataBunch, Dataset, DeviceCallback, Learner,
                            ParamScheduler, Recorder, Runner, accuracy, combine_scheds, conv_layer, get_cnn_model,
                            get_dls, init_cnn, sched_cos, view_tfm)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12_000, 784, generator=g), torch.randint(0, 10, (12_000,), generator=g)
    sched = combine_scheds([0.3, 0.7], [sched_cos(0.3, 0.6), sched_cos(0.6, 0.2)])
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    def sync():
        if device.type == 'cuda': torch.cuda.synchronize()
    rows = []
    for bs, n_train in RUNNER_SIZES:  # bs=2: the Runner's dispatch of every event at every tiny step
        n_valid = n_train // 5
        x_train, y_train, x_valid, y_valid = x[:n_train], y[:n_train], x[10_000:10_000 + n_valid], y[10_000:10_000 + n_valid]
        data = DataBunch(*get_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), bs), c=10)
        model = get_cnn_model(data, [8, 16, 32, 32], conv_layer, bn=False)
        init_cnn(model)
        init = copy.deepcopy(model.state_dict())
        def start():
            "Every repeat from the same weights and the same shuffle."
            model.load_state_dict(init)
            torch.manual_seed(1)
            return optim.SGD(model.parameters(), lr=sched(0.))
        def ours():
            learn = Learner(model, start(), F.cross_entropy, data)
            run = Runner(cb_funcs=[partial(AvgStatsCallback, accuracy), Recorder, partial(ParamScheduler, 'lr', sched),
                                   partial(BatchTransformXCallback, view_tfm(1, 28, 28)), DeviceCallback])
            with redirect_stdout(io.StringIO()): run.fit(1, learn)  # AvgStatsCallback prints the epoch's stats
            sync()
            return run.avg_stats.valid_stats.avg_stats
        def reference():
            opt = start()
            model.to(device)
            model.train()
            lrs, losses, n_epochs, iters = [], [], 0., (n_train + bs - 1) // bs
            tot_loss, tot_acc, count = 0., 0., 0
            idxs = torch.randperm(n_train)
            for i in range(0, n_train, bs):
                b = idxs[i:i + bs]
                xb, yb = x_train[b].to(device).view(-1, 1, 28, 28), y_train[b].to(device)
                for pg in opt.param_groups: pg['lr'] = sched(n_epochs)  # one epoch: position = epochs done
                pred = model(xb)
                loss = F.cross_entropy(pred, yb)
                with torch.no_grad():
                    tot_loss = tot_loss + loss.detach() * len(xb)
                    tot_acc = tot_acc + (pred.detach().argmax(dim=1) == yb).float().mean() * len(xb)
                    count += len(xb)
                loss.backward(); opt.step(); opt.zero_grad()
                lrs.append(opt.param_groups[0]['lr']); losses.append(loss.detach())
                n_epochs += 1. / iters
            model.eval()
            tot_loss, tot_acc, count = 0., 0., 0
            with torch.no_grad():
                for i in range(0, n_valid, 2 * bs):
                    xb, yb = x_valid[i:i + 2 * bs].to(device).view(-1, 1, 28, 28), y_valid[i:i + 2 * bs].to(device)
                    pred = model(xb)
                    loss = F.cross_entropy(pred, yb)
                    tot_loss = tot_loss + loss * len(xb)
                    tot_acc = tot_acc + (pred.argmax(dim=1) == yb).float().mean() * len(xb)
                    count += len(xb)
            sync()
            return [float(tot_loss) / count, float(tot_acc) / count]
        a, b = ours(), reference()  # the same computation, or the comparison means nothing
        if not torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-3, atol=1e-4):
            raise AssertionError(f'runner: ours and the reference differ at bs={bs}: valid [loss, accuracy] {a} != {b}')
        items = '' if n_train == 10_000 else f' ({n_train:,} items)'
        rows.append((f'epoch of the CNN, Runner + 5 callbacks / hand-written loop, bs={bs}{items}', *compare(ours, reference, repeats)))
    return rows

# --- the whole sequence in quick mode (run_notebooks.py --quick) ---------------------------------

@section
def quick_run(repeats):
    "Seconds per notebook of `run_notebooks.py --quick` (a temporary output folder), and the total against its 10-minute budget."
    import io, os, tempfile
    import run_notebooks as rn
    if not os.environ.get('EXP_DATA_DIR'): return [('quick run: skipped, EXP_DATA_DIR is not set', None, None, None)]
    paths, n = rn.numbered_notebooks(rn.NBS_DIR), max(1, min(repeats, 3))  # a run takes minutes: at most 3
    times, totals = {p.stem: [] for p in paths}, []
    for _ in range(n):
        with tempfile.TemporaryDirectory() as out:
            runs = rn.run_notebooks(paths, out_dir=out, quick=True, out=io.StringIO())
        failed = [r for r in runs if r.failure]
        if failed: raise RuntimeError(rn.failure_report(failed[0]))
        for r in runs: times[r.name].append(r.seconds)
        totals.append(sum(r.seconds for r in runs))
    rows = [(f'quick run: {name} (median of {n})', statistics.median(ts), None, None) for name, ts in times.items()]
    total = statistics.median(totals)
    return rows + [(f'quick run: all {len(paths)} notebooks / the 10-minute budget', total, 600., total / 600)]

# --- RunningBatchNorm (plain and fast) and the lesson's version against nn.BatchNorm2d ---------------

class LessonRunningBatchNorm(torch.nn.Module):
    "The lesson's RunningBatchNorm as it was shown (07_batchnorm), kept here as the reference to beat."
    def __init__(self, nf, mom=0.1, eps=1e-5):
        super().__init__()
        self.mom, self.eps = mom, eps
        self.mults = torch.nn.Parameter(torch.ones (nf, 1, 1))
        self.adds  = torch.nn.Parameter(torch.zeros(nf, 1, 1))
        self.register_buffer('sums', torch.zeros(1, nf, 1, 1))
        self.register_buffer('sqrs', torch.zeros(1, nf, 1, 1))
        self.register_buffer('batch', torch.tensor(0.))
        self.register_buffer('count', torch.tensor(0.))
        self.register_buffer('step', torch.tensor(0.))
        self.register_buffer('dbias', torch.tensor(0.))

    def update_stats(self, x):
        import math
        bs, nc, *_ = x.shape
        self.sums.detach_()
        self.sqrs.detach_()
        dims = (0, 2, 3)
        s = x.sum(dims, keepdim=True)
        ss = (x * x).sum(dims, keepdim=True)
        c = self.count.new_tensor(x.numel() / nc)
        mom1 = 1 - (1 - self.mom) / math.sqrt(bs - 1)
        self.mom1 = self.dbias.new_tensor(mom1)
        self.sums.lerp_(s, self.mom1)
        self.sqrs.lerp_(ss, self.mom1)
        self.count.lerp_(c, self.mom1)
        self.dbias = self.dbias * (1 - self.mom1) + self.mom1
        self.batch += bs
        self.step += 1

    def forward(self, x):
        if self.training: self.update_stats(x)
        sums, sqrs, c = self.sums, self.sqrs, self.count
        if self.step < 100:
            sums = sums / self.dbias
            sqrs = sqrs / self.dbias
            c = c / self.dbias
        means = sums / c
        vars = (sqrs / c).sub_(means * means)
        if bool(self.batch < 20): vars.clamp_min_(0.01)
        x = (x - means).div_((vars.add_(self.eps)).sqrt())
        return x.mul_(self.mults).add_(self.adds)

NFS = [8, 16, 32, 64, 64]  # notebook 07's network, the lesson's: the last convolution sees 1x1 pixels

def norm_cnn(norm, nfs=NFS):
    "Notebook 07's CNN for MNIST: `get_cnn_model` with its conv_layer (convolution, ReLU, then `norm`), filters `nfs`."
    from types import SimpleNamespace
    from exp.nb_07b import conv_layer, get_cnn_model
    return get_cnn_model(SimpleNamespace(c=10), nfs, conv_layer, norm=norm)

def cnn_steps(model, bs, n, device='cpu'):
    "A function running `n` training steps (forward, backward, SGD) of `model` on one random MNIST-shaped batch."
    import torch.nn.functional as F
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(bs, 1, 28, 28, device=device), torch.randint(0, 10, (bs,), device=device)
    def run():
        for _ in range(n):
            F.cross_entropy(model(x), y).backward(); opt.step(); opt.zero_grad()
        if device == 'cuda': torch.cuda.synchronize()
    return run

def seeded(norm, device='cpu'):
    torch.manual_seed(0)
    return norm_cnn(norm).to(device)

def per_step(row, n):
    "A `compare` row of `n`-step runs as seconds per step (the ratio is unchanged)."
    ours, ref, ratio = row
    return ours / n, ref / n, ratio

def same_as_lesson(name, norm, bs, device):
    "Check that `norm` computes what the lesson's RunningBatchNorm computes (else a ratio means nothing)."
    torch.manual_seed(1)
    x = torch.randn(bs, 1, 28, 28, device=device)
    ours, lesson = seeded(norm, device), seeded(LessonRunningBatchNorm, device)
    theirs = lesson.state_dict()  # same weights; the lesson's mults and adds are (nf, 1, 1), ours (1, nf, 1, 1)
    lesson.load_state_dict({k: v.reshape(theirs[k].shape) for k, v in ours.state_dict().items() if k in theirs}, strict=False)
    if not torch.allclose(ours(x), lesson(x), rtol=1e-4, atol=1e-5):
        raise AssertionError(f"running_batchnorm: {name} and the lesson's RunningBatchNorm differ at bs={bs} on {device}")

def syncs_per_step(model, bs):
    "Host-device synchronisations in one CUDA training step, counted by torch.cuda.set_sync_debug_mode('warn')."
    import warnings
    step = cnn_steps(model, bs, 1, 'cuda')
    step()  # warm up
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try:
            import torch.nn.functional as F
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            x, y = torch.randn(bs, 1, 28, 28, device='cuda'), torch.randint(0, 10, (bs,), device='cuda')
            F.cross_entropy(model(x), y).backward(); opt.step(); opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum('synchroniz' in str(w.message) for w in caught)

STEPS = ((2, 100), (32, 30), (512, 3))  # batch size, training steps per timed run

@section
def running_batchnorm(repeats):
    "Training steps (forward, backward, SGD) of notebook 07's CNN (8-16-32-64-64) on MNIST-shaped batches: each RunningBatchNorm against nn.BatchNorm2d."
    from exp.nb_07b import FastRunningBatchNorm, RunningBatchNorm
    norms = {'RunningBatchNorm': RunningBatchNorm, 'FastRunningBatchNorm': FastRunningBatchNorm,
             "the lesson's RunningBatchNorm": LessonRunningBatchNorm}
    rows = []
    for device in ['cpu'] + (['cuda'] if torch.cuda.is_available() else []):
        on = '' if device == 'cpu' else ' on CUDA'
        for bs, n in STEPS:
            for name in ('RunningBatchNorm', 'FastRunningBatchNorm'): same_as_lesson(name, norms[name], bs, device)
            for name, norm in norms.items():
                row = compare(cnn_steps(seeded(norm, device), bs, n, device),
                              cnn_steps(seeded(torch.nn.BatchNorm2d, device), bs, n, device), repeats)
                rows.append((f"training step of 07's CNN{on}, bs={bs}: {name} / nn.BatchNorm2d", *per_step(row, n)))
            if device == 'cuda':
                for name, norm in {**norms, 'nn.BatchNorm2d': torch.nn.BatchNorm2d}.items():
                    rows.append((f'host-device syncs per training step on CUDA, bs={bs}: {name}',
                                 float(syncs_per_step(seeded(norm, device), bs)), None, None))
    return rows

def compile_backend():
    "inductor where it can build its C++ (a C compiler on the PATH) or runs on a GPU, else aot_eager."
    import shutil
    return 'inductor' if torch.cuda.is_available() or shutil.which(os.environ.get('CXX', 'g++')) else 'aot_eager'

@section
def compiled_rbn(repeats):
    "Training steps of notebook 07's CNN with RunningBatchNorm compiled by torch.compile, against eager and against a compiled nn.BatchNorm2d."
    import torch._dynamo
    from exp.nb_07b import RunningBatchNorm
    backend = os.environ.get('BENCH_COMPILE_BACKEND') or compile_backend()
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    rows = []
    for bs, n in STEPS:
        torch._dynamo.reset()  # each batch size and thread count compiled afresh, outside the timings
        eager, compiled = seeded(RunningBatchNorm, device), torch.compile(seeded(RunningBatchNorm, device), backend=backend)
        compiled_bn = torch.compile(seeded(torch.nn.BatchNorm2d, device), backend=backend)
        x = torch.randn(bs, 1, 28, 28, device=device)
        if not torch.allclose(eager(x), compiled(x), rtol=1e-4, atol=1e-5):  # one training-mode step each
            raise AssertionError(f'compiled_rbn: the compiled model and the eager one differ at bs={bs}')
        ours = cnn_steps(compiled, bs, n, device)
        rows.append((f"training step of 07's CNN, bs={bs}: RunningBatchNorm compiled ({backend}) / eager",
                     *per_step(compare(ours, cnn_steps(eager, bs, n, device), repeats), n)))
        rows.append((f"training step of 07's CNN, bs={bs}: RunningBatchNorm compiled / nn.BatchNorm2d compiled ({backend})",
                     *per_step(compare(ours, cnn_steps(compiled_bn, bs, n, device), repeats), n)))
    return rows

ALIASES = {'dataloader': 'dataloader', 'telemetry': 'telemetry', 'runner': 'runner', 'quick': 'quick_run',
           'rbn': 'running_batchnorm', 'compile': 'compiled_rbn'}

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('sections', nargs='*', help=f'sections to run (default: all): {", ".join(SECTIONS)}')
    parser.add_argument('--only', default='', help=f'comma-separated short names of sections: {", ".join(ALIASES)}')
    parser.add_argument('--threads', default='', help='comma-separated torch thread counts, each a run of the sections (default: as set)')
    parser.add_argument('--repeats', type=int, default=5, help='timed repeats per figure (median taken)')
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown: parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    only = [a for a in args.only.split(',') if a]
    bad = [a for a in only if a not in ALIASES]
    if bad: parser.error(f"unknown --only name(s) {', '.join(bad)}; choose from {', '.join(ALIASES)}")
    if args.repeats < 1: parser.error(f'--repeats must be at least 1, got {args.repeats}')
    try: threads = [int(t) for t in args.threads.split(',') if t.strip()]
    except ValueError: threads = [0]
    if any(t < 1 for t in threads): parser.error(f'--threads takes positive thread counts such as 1,2; got {args.threads!r}')
    names = list(dict.fromkeys([*args.sections, *(ALIASES[a] for a in only)])) or list(SECTIONS)
    torch.manual_seed(0)
    shown = ', '.join(map(str, threads)) if threads else str(torch.get_num_threads())
    print(f'machine: {platform.machine()}, {os.cpu_count()} CPUs, {shown} torch threads, torch {torch.__version__}, '
          f'{"CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"}; median of {args.repeats}')
    print(f'| benchmark | ours (s) | reference (s) | ratio |\n|---|---:|---:|---:|')
    before = torch.get_num_threads()
    try:
        for t in threads or [None]:
            if t: torch.set_num_threads(t)
            prefix = f'{t} thread{"s" * (t > 1)}: ' if len(threads) > 1 else ''
            for name in names:
                for what, ours, ref, ratio in SECTIONS[name](args.repeats):
                    cell = lambda v, fmt: '-' if v is None else fmt.format(v)  # rows with no reference show '-'
                    print(f'| {prefix}{what} | {cell(ours, "{:.4f}")} | {cell(ref, "{:.4f}")} | {cell(ratio, "{:.2f}x")} |', flush=True)
    finally:
        torch.set_num_threads(before)

if __name__ == '__main__':
    main()
