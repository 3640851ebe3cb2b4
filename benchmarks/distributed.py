"""An epoch of notebook 07's CNN on 1 process against 2 (gloo, CPU), and the all-reduce's share of a training step.

    EXP_DATA_DIR=../shared/data python benchmarks/distributed.py              # full MNIST epoch, 2 repeats
    EXP_DATA_DIR=../shared/data python benchmarks/distributed.py --items 5000 --repeats 1

Every process uses one torch thread. The whole batch is the same in every row (`--bs`, default 512: one
process with batches of 512, two with 256 each), so every row takes the same number of steps. Rows:
- 1 process, BatchNorm;
- 2 processes, DDPCallback, BatchNorm on each rank;
- 2 processes, DDPCallback, SyncBatchNorm;
- 2 processes, by hand (AllReduceGradsCallback + DistributedCallback), BatchNorm on each rank: here the
  time spent in the gradients' all-reduce is measured directly (it does not overlap the backward pass, as
  DDP's does), and the time in DistributedCallback's agreements on cancels.
An epoch is training plus validation (10,000 images), timed on rank 0 from `fit` to its return; the
figure is the median over the repeats. Prints one Markdown table.
"""
import argparse
import statistics
import time

from exp.nb_07b import *


class TimedAllReduce(AllReduceGradsCallback):
    "AllReduceGradsCallback, timing its all-reduce."
    def begin_fit(self):
        super().begin_fit()
        self.secs = 0.
    def after_backward(self):
        start = time.perf_counter()
        super().after_backward()
        self.secs += time.perf_counter() - start


class TimedDistributed(DistributedCallback):
    "DistributedCallback, timing its agreements."
    def set_runner(self, run):   # the start of each fit
        super().set_runner(run)
        self.secs, self.n = 0., 0
    def agree(self, *args, **kwargs):
        start = time.perf_counter()
        try: return super().agree(*args, **kwargs)
        finally: self.secs, self.n = self.secs + time.perf_counter() - start, self.n + 1


def load(items):
    x_train, y_train, x_valid, y_valid = get_data()
    x_train, x_valid = normalize_to(x_train, x_valid)
    n = items or len(x_train)
    return x_train[:n].view(-1, 1, 28, 28), y_train[:n], x_valid.view(-1, 1, 28, 28), y_valid


def epoch(kind, items, bs, repeats):
    "Seconds per epoch (median of `repeats`) and, by hand, the seconds in the all-reduce and the agreements."
    x_train, y_train, x_valid, y_valid = load(items)
    world = get_world_size()
    data = DataBunch(*get_dist_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), bs // world), c=10)
    norm = SyncBatchNorm if kind == 'sync' else BatchNorm
    cbs = {'one': [], 'ddp': [DDPCallback], 'sync': [DDPCallback], 'hand': [TimedAllReduce, TimedDistributed]}[kind]
    times, parts = [], []
    for _ in range(repeats):
        torch.manual_seed(0)
        learn, run = get_learn_run([8, 16, 32, 32], data, 0.4, conv_layer, cbs=cbs + [partial(AvgStatsCallback, accuracy, print_stats=False)],
                                   norm=norm)
        if is_dist(): dist.barrier()
        start = time.perf_counter()
        run.fit(1, learn)
        times.append(time.perf_counter() - start)
        if kind == 'hand': parts.append((run.timed_all_reduce.secs, run.timed_distributed.secs, run.timed_distributed.n, run.n_iter))
    return statistics.median(times), parts, run.avg_stats.valid_stats.avg_stats[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--items', type=int, default=0, help='training images (default: all 50,000)')
    p.add_argument('--bs', type=int, default=512, help='the whole batch (default 512)')
    p.add_argument('--repeats', type=int, default=2)
    args = p.parse_args(argv)
    if args.repeats < 1: p.error('--repeats must be at least 1')
    torch.set_num_threads(1)
    rows = [('1 process, BatchNorm', epoch('one', args.items, args.bs, args.repeats))]
    for kind, name in [('ddp', '2 processes, DDPCallback, BatchNorm on each rank'), ('sync', '2 processes, DDPCallback, SyncBatchNorm'),
                       ('hand', '2 processes, by hand, BatchNorm on each rank')]:
        rows.append((name, launch(epoch, 2, args=(kind, args.items, args.bs, args.repeats), threads=1)[0]))
    base = rows[0][1][0]
    print(f'| run (whole batch {args.bs}, {args.items or 50000} training images, 1 thread per process) | s per epoch | ratio to 1 process | validation accuracy |')
    print('|---|---:|---:|---:|')
    for name, (secs, _, acc) in rows: print(f'| {name} | {secs:.2f} | {secs / base:.2f}x | {acc:.4f} |')
    reduce_s, agree_s, n_agree, steps = rows[-1][1][1][-1]
    print(f'\nBy hand, last repeat: {steps} training steps, {rows[-1][1][0]:.2f} s; the gradients\' all-reduce took {reduce_s:.2f} s '
          f'({reduce_s / rows[-1][1][0]:.0%} of the epoch, {1000 * reduce_s / steps:.2f} ms per step); '
          f'{n_agree} agreements on cancels took {agree_s:.2f} s ({agree_s / rows[-1][1][0]:.0%}, {1e6 * agree_s / n_agree:.0f} us each).')


if __name__ == '__main__':
    main()
