"""How many torch threads small and large batches want, on an idle machine and on a busy one.

    python benchmarks/threads.py                 # notebook 07's CNN (8-16-32-64-64), batch sizes 2, 32 and 512
    python benchmarks/threads.py --busy 2        # the same while 2 busy-looping processes compete for the cores

Each figure is the median time of one training step (forward, backward, SGD step) of notebook 07's CNN with
RunningBatchNorm, measured with 1 and with 2 torch intra-op threads, alternating, in one run. `--busy N` starts N
processes that spin on the CPU for the whole measurement (and stops them at the end), which is what a shared
machine does to a run: torch's threads then wait for each other at every operation.
"""
import argparse, multiprocessing, os, platform, statistics, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spin(stop):
    "Keep one core busy until `stop` is set."
    while not stop.is_set(): pass


def step_timer(bs, n_steps):
    "A function timing `n_steps` training steps of 07's CNN at batch size `bs`, in seconds per step."
    import torch
    import torch.nn.functional as F
    from exp.nb_07b import RunningBatchNorm, conv_layer, get_cnn_model, optim
    class Data: c = 10
    torch.manual_seed(0)
    model = get_cnn_model(Data, [8, 16, 32, 64, 64], conv_layer, norm=RunningBatchNorm)  # 07's network
    opt = optim.SGD(model.parameters(), lr=0.1)
    xb, yb = torch.randn(bs, 1, 28, 28), torch.randint(0, 10, (bs,))
    def timed():
        start = time.perf_counter()
        for _ in range(n_steps):
            F.cross_entropy(model(xb), yb).backward()
            opt.step(); opt.zero_grad()
        return (time.perf_counter() - start) / n_steps
    timed()   # warm up
    return timed


def measure(repeats):
    "Median seconds per step for each (batch size, threads)."
    import torch
    results = {}
    for bs, n_steps in ((2, 100), (32, 30), (512, 3)):
        timer, times = step_timer(bs, n_steps), {1: [], 2: []}
        for _ in range(repeats):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                times[threads].append(timer())
        results[bs] = {t: statistics.median(ts) for t, ts in times.items()}
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--busy', type=int, default=0, metavar='N', help='busy-looping processes to run meanwhile (default 0)')
    p.add_argument('--repeats', type=int, default=5, help='alternating repeats per figure (default 5)')
    args = p.parse_args(argv)
    if args.busy < 0 or args.repeats < 1: p.error('--busy must be >= 0 and --repeats >= 1')
    import torch
    stop = multiprocessing.Event()
    burners = [multiprocessing.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.busy)]
    for b in burners: b.start()
    try: results = measure(args.repeats)
    finally:
        stop.set()
        for b in burners: b.join()
    print(f'{os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__}, {args.busy} busy processes beside')
    print('| batch size | 1 thread (ms/step) | 2 threads (ms/step) | 2 threads / 1 thread |')
    print('|---:|---:|---:|---:|')
    for bs, r in results.items():
        print(f'| {bs} | {r[1] * 1e3:.2f} | {r[2] * 1e3:.2f} | {r[2] / r[1]:.2f}x |')


if __name__ == '__main__':
    main()
