"""exp.nb_07b: the Runner on several processes (torch.distributed, gloo, CPU).

Spawning costs seconds, so the checks that need 2 processes are grouped: one launch runs every fit of
`test_two_ranks`, and each fault has its own launch. Processes meet through a file in a temporary folder
(`launch`) or on a port torchrun picks (`--standalone`): tests may run in parallel. The children get
OMP_NUM_THREADS=1 and one torch thread each.
"""
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ['OMP_NUM_THREADS'] = '1'   # inherited by the spawned processes
from exp.nb_07b import *  # noqa: E402
from torch.utils.data import DistributedSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --- helpers the processes import from this module (spawn pickles functions and classes by name) ----------------

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

def an_epoch(cbs, n=40, bs=4, lr=0.1):
    return partial(get_learn_run, [4, 8], make_data(n, bs), lr, conv_layer, cbs=cbs + [partial(AvgStatsCallback, accuracy)],
                   norm=SyncBatchNorm)

class NanOnRank1(Callback):
    "Makes rank 1's training loss NaN at step 1 (before StopOnNanCallback looks at it)."
    _order = -1
    def after_loss(self):
        if get_rank() == 1 and self.in_train and self.n_iter == 1: self.run.loss = self.loss * float('nan')

def checks_on_two_ranks(jobs, ckpt):
    "Every fit of `jobs`, then a checkpoint: how many times this rank called torch.save, and whether it can read the file."
    res = fit_workers(jobs)
    saves, save = [], torch.save
    torch.save = lambda *a, **k: (saves.append(1), save(*a, **k))
    try: save_model(nn.Linear(2, 2), ckpt)
    finally: torch.save = save
    return res, len(saves), set(torch.load(ckpt)) == {'weight', 'bias'}

def weights_diff(a, b): return max((a[k].float() - b[k].float()).abs().max().item() for k in a if torch.is_tensor(a[k]))

NORMS = {'no norm': None, 'LayerNorm': layer_norm, 'SyncBatchNorm': SyncBatchNorm,
         'SyncRunningBatchNorm': SyncRunningBatchNorm, 'BatchNorm on each rank': BatchNorm}


# --- in one process ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('n', [11, 12, 40])
@pytest.mark.parametrize('world', [2, 3])
def test_shards_are_disjoint_cover_the_data_and_reshuffle_alike(n, world):
    ds = Dataset(torch.arange(float(n)), torch.arange(n))
    def shards(shuffle, epoch=0, bs=2):
        out = []
        for rank in range(world):
            s = ShardSampler(ds, bs, shuffle=shuffle, seed=3, rank=rank, world_size=world)
            s.set_epoch(epoch)
            batches = list(s)
            assert len(batches) == len(s)
            out.append(torch.cat(batches).tolist())
        return out
    valid = shards(False)
    assert sorted(sum(valid, [])) == list(range(n))                          # every item once, nothing padded
    for epoch in (0, 1):
        train = shards(True, epoch)
        flat = sum(train, [])
        assert len(flat) == len(set(flat)) == n - n % world                    # disjoint; n % world dropped
        assert {len(t) for t in train} == {n // world}                         # the same number of batches everywhere
    assert shards(True, 0) != shards(True, 1) and shards(True, 1) == shards(True, 1)   # set_epoch: a new order, the same on every call


def test_validation_counts_each_item_once_where_distributed_sampler_pads():
    ds = Dataset(torch.arange(11.), torch.arange(11))
    ours = [torch.cat(list(ShardSampler(ds, 4, rank=r, world_size=2))).tolist() for r in (0, 1)]
    theirs = [list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert sorted(ours[0] + ours[1]) == list(range(11))
    assert len(theirs[0] + theirs[1]) == 12 and len(set(theirs[0] + theirs[1])) == 11


def test_without_world_size_everything_runs_in_one_process(monkeypatch):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    assert init_distributed() is False and not is_dist() and (get_rank(), get_world_size(), is_main()) == (0, 1, True)
    for norm, plain in ((SyncBatchNorm, BatchNorm), (SyncRunningBatchNorm, RunningBatchNorm)):
        with_cb = fit_worker(an_epoch([DDPCallback]) if norm is SyncBatchNorm else five_steps(norm, [DDPCallback], 4, world=1))
        without = fit_worker(an_epoch([]) if norm is SyncBatchNorm else five_steps(plain, [], 4, world=1))
        assert weights_diff(with_cb['weights'], without['weights']) == 0
    x = torch.randn(4, 3, 5, 5)
    assert all(torch.equal(a, b) for a, b in zip(SyncBatchNorm(3).batch_stats(x)[2:], BatchNorm(3).batch_stats(x)[2:]))


def test_fault_callback_names_the_events_it_knows():
    with pytest.raises(ValueError, match="event must be one of .*'begin_batch'.*got 'after_fit'"):
        FaultCallback(event='after_fit')


# --- on two processes --------------------------------------------------------------------------------------------

def test_two_ranks(tmp_path):
    cases = [(name, cb) for name in NORMS for cb in (AllReduceGradsCallback, DDPCallback)]
    jobs = [(five_steps(NORMS[name], [cb], 4),) for name, cb in cases]
    jobs += [(five_steps(SyncRunningBatchNorm, [DDPCallback], 1),),                          # batch size 1 per rank
             (an_epoch([DDPCallback], n=40, bs=2),),                                         # validation over 11 items
             (an_epoch([DDPCallback, FaultCallback(1, 2, 'after_step')]),),                  # a cancel on rank 1
             (an_epoch([DDPCallback, NanOnRank1()]),),                                       # a NaN loss on rank 1
             (an_epoch([DDPCallback, LR_Find(max_iter=3)], n=80),),
             (an_epoch([AllReduceGradsCallback, DistributedCallback, FaultCallback(1, 1, 'begin_batch')]),)]
    ckpt = tmp_path / 'model.pt'
    res = launch(checks_on_two_ranks, 2, args=(jobs, ckpt), timeout=30, threads=1)
    (fits0, saves0, read0), (fits1, saves1, read1) = res

    for (name, cb), f0, f1 in zip(cases, fits0, fits1):
        one = fit_worker(five_steps(NORMS[name], [], 8, world=1))
        assert f0['n_iter'] == f1['n_iter'] == one['n_iter'] == 5
        if name != 'BatchNorm on each rank':   # (whose running statistics are each rank's own)
            assert weights_diff(f0['weights'], f1['weights']) == 0, (name, cb)   # the ranks agree exactly
        diff = weights_diff(one['weights'], f0['weights'])
        if name == 'BatchNorm on each rank': assert diff > 1e-3, (name, cb, diff)
        else: assert diff < 1e-6, (name, cb, diff)

    bs1 = fits0[len(cases)]
    one = fit_worker(five_steps(RunningBatchNorm, [], 2, world=1))
    assert weights_diff(one['weights'], bs1['weights']) < 1e-6

    valid = fits0[len(cases) + 1]                      # the trained model on the 11 validation items, in this process
    learn, _ = an_epoch([], n=40, bs=2)()
    learn.model.load_state_dict(valid['weights'])
    learn.model.eval()
    xv, yv = learn.data.valid_ds.x, learn.data.valid_ds.y
    with torch.no_grad(): pred = learn.model(xv)
    assert valid['valid_count'] == fits1[len(cases) + 1]['valid_count'] == 11
    assert abs(valid['valid'][0] - F.cross_entropy(pred, yv).item()) < 1e-6
    assert abs(valid['valid'][1] - accuracy(pred, yv).item()) < 1e-6

    cancel, nan, lrf, by_hand = [(a['n_iter'], b['n_iter']) for a, b in zip(fits0[-4:], fits1[-4:])]
    assert cancel == (3, 3)      # rank 1 cancelled in after_step of step 2: both ranks end that batch, then stop
    assert nan == (2, 2)         # stopped before the backward pass of step 1
    assert lrf == (4, 4)         # LR_Find(max_iter=3) stops after the step that reaches it
    assert by_hand[0] == by_hand[1] == 2

    assert res.stdout[1] == ''                                    # one voice
    assert 'valid:' in res.stdout[0] and 'CancelTrainException on rank 1' in res.stdout[0]
    assert (saves0, saves1) == (1, 0) and read0 and read1 and [p.name for p in tmp_path.iterdir()] == ['model.pt']


def test_a_raising_rank_ends_the_run():
    start = time.monotonic()
    with pytest.raises(RankFailedError, match='^rank 1 failed first: ValueError: rank 1 failed at training step 2'):
        launch(fit_workers, 2, args=([(an_epoch([DDPCallback, FaultCallback(1, 2, 'begin_batch', ValueError)]),)],),
               timeout=120, threads=1)
    assert time.monotonic() - start < 30   # not the 120 s of the timeout: the failure ends the run


def test_a_silent_rank_ends_the_run_at_the_timeout():
    with pytest.raises(RankFailedError, match=r'^rank 0 failed first: RankTimeoutError: rank 0: the other ranks did not answer within timeout=3 s'):
        launch(fit_workers, 2, args=([(an_epoch([DDPCallback, FaultCallback(1, 2, 'begin_batch', 'hang')]),)],),
               timeout=3, threads=1)


@pytest.mark.skipif(not os.environ.get('EXP_DATA_DIR'), reason='the script trains on MNIST: set EXP_DATA_DIR')
def test_the_example_script_runs_under_torchrun(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(ROOT / 'examples' / 'train_distributed.py'), '--items', '512', '--bs', '64', '--save', str(tmp_path / 'w.pt')]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('validation accuracy') == 1 and '2 process(es) x batches of 64, 512 training images' in out.stdout
    assert set(torch.load(tmp_path / 'w.pt')) >= {'0.0.weight'}


def test_nccl_only_where_each_local_process_has_a_gpu_of_its_own(monkeypatch):
    "Two processes sharing one GPU cannot use NCCL (it refuses two ranks on one device): gloo then."
    from exp.nb_07b import dist_backend
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    assert (dist_backend(1), dist_backend(2)) == ('nccl', 'gloo')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert dist_backend(1) == 'gloo'
