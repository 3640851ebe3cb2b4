"""What the processes of tests/test_nb_07b.py run: functions, classes and data they import by name.

`launch` pickles a function as its module and name, and each new process imports that module. This module is
found as `dist_helpers` because tests/ is on `sys.path` (test_nb_07b.py puts it there; a spawned process gets its
parent's `sys.path`); a script started as a subprocess gets tests/ through PYTHONPATH.
"""
import contextlib
import io
import os
import time
from pathlib import Path
from typing import NamedTuple

from exp.nb_07b import *


def layer_norm(nf): return LayerNorm()


def make_data(n, bs, nv=11, seed=0):
    "`n` random 12x12 training images and `nv` validation ones (10 classes), in shards of `bs` per rank."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 10, (n,), generator=g)
    xv, yv = torch.randn(nv, 1, 12, 12, generator=g), torch.randint(0, 10, (nv,), generator=g)
    return DataBunch(*get_dist_dls(Dataset(x, y), Dataset(xv, yv), bs), c=10)


def five_steps(norm, cbs, bs, world=2, lr=0.1):
    "5 steps of SGD with momentum, batches of `bs` on each of `world` ranks, notebook 07's CNN with `norm` (None: no norm)."
    kw = dict(bn=False) if norm is None else dict(norm=norm)
    return partial(get_learn_run, [4, 8], make_data(5 * bs * world, bs), lr, conv_layer, cbs=cbs,
                   opt_func=partial(optim.SGD, momentum=0.9), **kw)


def an_epoch(cbs, n=40, bs=4, lr=0.1, data=None):
    return partial(get_learn_run, [4, 8], data or make_data(n, bs), lr, conv_layer,
                   cbs=cbs + [partial(AvgStatsCallback, accuracy)], norm=SyncBatchNorm)


class NanOnRank1(Callback):
    "Makes rank 1's training loss NaN at step 1 (before StopOnNanCallback looks at it)."
    _order = -1
    def after_loss(self):
        if get_rank() == 1 and self.in_train and self.n_iter == 1: self.run.loss = self.loss * float('nan')


def lr_find_fit(n=80, bs=4, max_iter=6):
    "An LR finder on every rank, under DDPCallback; what it suggests and the losses it recorded."
    torch.manual_seed(0)
    learn, run = an_epoch([DDPCallback, LR_Find(max_iter=max_iter)], n=n, bs=bs)()
    run.fit(1, learn)
    return run.lr_find.suggested_lr, run.lr_find.losses


def checks_on_two_ranks(jobs, ckpt):
    """Every fit of `jobs`, an LR finder, then a checkpoint: the fits' results, the LR finder's suggestion, how many
    times this rank called torch.save, and whether it can read the file."""
    res = fit_workers(jobs)
    lr = lr_find_fit()
    saves, save = [], torch.save
    torch.save = lambda *a, **k: (saves.append(1), save(*a, **k))
    try: save_model(nn.Linear(2, 2), ckpt)
    finally: torch.save = save
    return dict(fits=res, lr=lr, saves=len(saves), readable=set(torch.load(ckpt)) == {'weight', 'bias'})


def weights_diff(a, b): return max((a[k].float() - b[k].float()).abs().max().item() for k in a if torch.is_tensor(a[k]))


NORMS = {'no norm': None, 'LayerNorm': layer_norm, 'SyncBatchNorm': SyncBatchNorm,
         'SyncRunningBatchNorm': SyncRunningBatchNorm, 'BatchNorm on each rank': BatchNorm}


class EmptyOnRank1Sampler():
    "Batches of 4 of 16 items in order, except that rank 1's batch at step 1 is empty."
    def __len__(self): return 4
    def __iter__(self):
        for i in range(4): yield torch.arange(0) if (get_rank() == 1 and i == 1) else torch.arange(4 * i, 4 * i + 4)


def uneven_data(kind):
    "Training data that is not shared evenly: 'counts' (rank 0 6 batches, rank 1 5) or 'empty' (an empty batch on rank 1)."
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(41, 1, 12, 12, generator=g), torch.randint(0, 10, (41,), generator=g)
    ds = Dataset(x, y)
    sampler = ShardSampler(ds, 4) if kind == 'counts' else EmptyOnRank1Sampler()
    return DataBunch(DataLoader(ds, sampler), DataLoader(ds, ShardSampler(ds, 8)), c=10)


def leave_on_rank1():
    "Rank 1 leaves the run with exit status 0 while rank 0 waits for it in an all-reduce."
    if get_rank() == 1: os._exit(0)
    dist.all_reduce(torch.ones(1))


def note_pid_and_wait(folder):
    "Write this process's pid into `folder`, then wait (for a signal to the parent that launched it)."
    Path(folder, f'pid{get_rank()}').write_text(str(os.getpid()))
    print('waiting', flush=True)
    time.sleep(600)


class CancelInValidation(Callback):
    "On rank `rank`, raise `fault` at the start of validation batch `at` (counted from 0) of each epoch."
    def __init__(self, rank, fault, at=1): self.rank, self.fault, self.at = rank, fault, at
    def begin_validate(self): self.seen = 0
    def begin_batch(self):
        if self.in_train: return
        self.seen += 1
        if get_rank() == self.rank and self.seen - 1 == self.at: raise self.fault()


class Printed(NamedTuple):
    "A fit's `FitResult`, what this rank printed during it, and its `AvgStats` totals' averages after it (train, valid)."
    fit: FitResult
    stdout: str
    train: list
    valid: list


def fits_and_prints(jobs):
    "`fit_worker(*job)` for each job, each with what this rank printed during it and the statistics it held after it."
    out = []
    for job in jobs:
        learn_run, printed = job[0], io.StringIO()
        runs = []
        def keep(): learn, run = learn_run(); runs.append(run); return learn, run
        with contextlib.redirect_stdout(printed): res = fit_worker(keep, *job[1:])
        stats = getattr(runs[0], 'avg_stats', None)
        out.append(Printed(res, printed.getvalue(), stats and stats.train_stats.avg_stats, stats and stats.valid_stats.avg_stats))
    return out
