"""Benchmarks of the library, each figure a ratio of two timings taken in one run.

    python benchmarks/bench.py                  # every section
    python benchmarks/bench.py dataloader       # some sections

Each ratio is the median over `--repeats` alternating runs of ours and the reference, so a noisy
machine slows both sides alike. Sections register themselves in SECTIONS.
"""
import argparse, platform, statistics, sys, time
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
    from exp.nb_05 import DataLoader, Dataset, Sampler
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

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('sections', nargs='*', help=f'sections to run (default: all): {", ".join(SECTIONS)}')
    parser.add_argument('--repeats', type=int, default=5, help='timed repeats per figure (median taken)')
    args = parser.parse_args(argv)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown: parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    torch.manual_seed(0)
    print(f'machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, '
          f'{"CUDA " + torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"}; median of {args.repeats}')
    print(f'| benchmark | ours (s) | reference (s) | ratio |\n|---|---:|---:|---:|')
    for name in args.sections or SECTIONS:
        for what, ours, ref, ratio in SECTIONS[name](args.repeats):
            print(f'| {what} | {ours:.4f} | {ref:.4f} | {ratio:.2f}x |', flush=True)

if __name__ == '__main__':
    main()
