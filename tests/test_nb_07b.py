"""exp.nb_07b: the Runner on several processes (torch.distributed, gloo, CPU).

Spawning costs seconds, so the checks that need 2 processes are grouped: one launch runs every fit of
`test_two_ranks`, and each fault has its own launch. Processes meet through a file in a temporary folder
(`launch`) or on a port torchrun picks (`--standalone`): tests may run in parallel. The children get
OMP_NUM_THREADS=1 and one torch thread each.
"""
import io
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path, PureWindowsPath

import pytest
import torch

os.environ['OMP_NUM_THREADS'] = '1'   # inherited by the spawned processes
sys.path.insert(0, str(Path(__file__).resolve().parent))   # `dist_helpers`, for this process and those it spawns
from exp.nb_07b import *  # noqa: E402
from dist_helpers import *  # noqa: E402
from torch.utils.data import DistributedSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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
        assert weights_diff(with_cb.weights, without.weights) == 0
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
             (an_epoch([AllReduceGradsCallback, DistributedCallback, FaultCallback(1, 1, 'begin_batch')]),),
             (an_epoch([DDPCallback, FaultCallback(1, 1, 'after_loss', CancelBatchException)]),),  # one batch skipped by all
             (an_epoch([DDPCallback, FaultCallback(0, 2, 'begin_batch', CancelEpochException)]),)]  # an epoch cut short
    ckpt = tmp_path / 'model.pt'
    res = launch(checks_on_two_ranks, 2, args=(jobs, ckpt), timeout=30, threads=1)
    r0, r1 = res
    fits0, fits1 = r0['fits'], r1['fits']

    for (name, cb), f0, f1 in zip(cases, fits0, fits1):
        one = fit_worker(five_steps(NORMS[name], [], 8, world=1))
        assert f0.n_iter == f1.n_iter == one.n_iter == 5
        if name != 'BatchNorm on each rank':   # (whose running statistics are each rank's own)
            assert weights_diff(f0.weights, f1.weights) == 0, (name, cb)   # the ranks agree exactly
        diff = weights_diff(one.weights, f0.weights)
        if name == 'BatchNorm on each rank': assert diff > 1e-3, (name, cb, diff)
        else: assert diff < 1e-6, (name, cb, diff)

    bs1 = fits0[len(cases)]
    one = fit_worker(five_steps(RunningBatchNorm, [], 2, world=1))
    assert weights_diff(one.weights, bs1.weights) < 1e-6

    valid = fits0[len(cases) + 1]                      # the trained model on the 11 validation items, in this process
    learn, _ = an_epoch([], n=40, bs=2)()
    learn.model.load_state_dict(valid.weights)
    learn.model.eval()
    xv, yv = learn.data.valid_ds.x, learn.data.valid_ds.y
    with torch.no_grad(): pred = learn.model(xv)
    assert valid.valid_count == fits1[len(cases) + 1].valid_count == 11
    assert abs(valid.valid[0] - F.cross_entropy(pred, yv).item()) < 1e-6
    assert abs(valid.valid[1] - accuracy(pred, yv).item()) < 1e-6

    cancel, nan, lrf, by_hand, batch, epoch = [(a.n_iter, b.n_iter) for a, b in zip(fits0[-6:], fits1[-6:])]
    assert cancel == (3, 3)      # rank 1 cancelled in after_step of step 2: both ranks end that batch, then stop
    assert nan == (2, 2)         # stopped before the backward pass of step 1
    assert lrf == (4, 4)         # LR_Find(max_iter=3) stops after the step that reaches it
    assert by_hand == (2, 2)
    assert batch == (5, 5)       # 40 items, batches of 4 on 2 ranks: 5 steps, one of them cancelled on both ranks
    assert epoch == (3, 3)       # rank 0 ended the epoch in step 2 (which counts): rank 1 too
    assert weights_diff(fits0[-2].weights, fits1[-2].weights) == 0

    assert r0['lr'][0] == r1['lr'][0] and r0['lr'][1] == r1['lr'][1] and len(r0['lr'][1]) == 7   # one suggestion
    assert res.stdout[1] == ''                                    # one voice
    assert 'valid:' in res.stdout[0] and 'CancelTrainException on rank 1' in res.stdout[0]
    assert (r0['saves'], r1['saves']) == (1, 0) and r0['readable'] and r1['readable']
    assert [p.name for p in tmp_path.iterdir()] == ['model.pt']


def whole_set(res, data):
    "The loss and accuracy of `res`'s weights on the whole validation set of `data`, in this process."
    learn, _ = an_epoch([], data=data)()
    learn.model.load_state_dict(res.weights)
    learn.model.eval()
    with torch.no_grad(): pred = learn.model(data.valid_ds.x)
    return [F.cross_entropy(pred, data.valid_ds.y).item(), accuracy(pred, data.valid_ds.y).item()]


def printed_stats(out, which):
    "The numbers AvgStatsCallback printed on the line `which: [...]`."
    return [float(v) for v in re.search(rf'^{which}: \[(.*)\]$', out, re.M).group(1).split(',')]


def test_what_rank_0_prints_is_the_statistics_of_every_rank():
    """The epoch's lines that rank 0 prints (AvgStatsCallback's, ProgressCallback's row) are the whole set's: the ranks sum their
    totals at the end of their validation passes, before any callback's after_epoch (DistributedCallback runs last)."""
    uneven, one_item = make_data(40, 2, nv=9), make_data(40, 2, nv=1)   # validation: 2 batches on rank 0, 1 on rank 1; 0 on rank 1
    jobs = [(an_epoch([DDPCallback], data=uneven),),
            (an_epoch([DDPCallback, partial(ProgressCallback, 'text')], data=uneven),),
            (an_epoch([DDPCallback], data=one_item),),
            (an_epoch([DDPCallback, CancelInValidation(0, CancelEpochException)], data=uneven),),   # rank 0 validates 1 batch
            (an_epoch([DDPCallback, CancelInValidation(1, CancelTrainException, at=0)], data=uneven),)]
    (plain, progress, single, cut, stop), (plain1, _, _, cut1, stop1) = launch(fits_and_prints, 2, args=(jobs,), timeout=30, threads=1)
    for r, data in ((plain, uneven), (single, one_item)):
        want = whole_set(r.fit, data)
        assert r.fit.valid_count == len(data.valid_ds)
        assert printed_stats(r.stdout, 'valid') == pytest.approx(want, abs=2e-6), (r.stdout, want)
        assert printed_stats(r.stdout, 'train') == pytest.approx(r.train, abs=2e-6)     # summed too: as every rank holds it
    assert plain.train == plain1.train and plain.valid == plain1.valid
    row = progress.stdout.strip().splitlines()[-1].split()                        # epoch train_loss valid_loss accuracy time
    assert [float(v) for v in row[2:4]] == pytest.approx(whole_set(progress.fit, uneven), abs=2e-6), progress.stdout
    assert cut.fit.valid_count == cut1.fit.valid_count == 4 + 4                   # rank 0's first batch, rank 1's only one
    assert printed_stats(cut.stdout, 'valid') == pytest.approx(cut.valid, abs=2e-6)
    assert stop.fit.n_iter == stop1.fit.n_iter == 10 and 'valid:' not in stop.stdout   # both stop before printing
    assert 'CancelTrainException on rank 1' in stop.stdout


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


# --- on one rank: a process group of one, in this process -------------------------------------------------------

@pytest.fixture
def one_rank(tmp_path):
    "A gloo process group of one process: this one."
    init_distributed(0, 1, rendezvous_uri(tmp_path), timeout=30, backend='gloo')
    yield
    dist.destroy_process_group()


def test_ddp_takes_the_device_from_the_model_on_a_cuda_machine(one_rank, monkeypatch):
    "launch's models stay on the CPU: DDP must not be told a GPU because the machine has one (issue 23, item 1)."
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    res = fit_worker(five_steps(None, [DDPCallback], 4, world=1))
    assert res.n_iter == 5


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_sync_statistics_count_and_sum_in_float32_or_wider(one_rank, dtype):
    "80,000 values per channel: beyond float16's largest number (65504); sums in bfloat16 lose most of them."
    x = (torch.randn(8, 2, 100, 100, generator=torch.Generator().manual_seed(0)) * 0.99 + 0.3).to(dtype)
    for layer in (SyncBatchNorm(2).to(dtype), SyncRunningBatchNorm(2).to(dtype)):
        bs, n, mean, var = layer.batch_stats(x)
        want = x.double()
        assert (int(bs), int(n)) == (8, 80_000)
        assert mean.dtype == var.dtype == dtype
        tol = 2 * torch.finfo(dtype).eps
        assert torch.allclose(mean.double().flatten(), want.mean((0, 2, 3)), atol=tol, rtol=tol)
        assert torch.allclose(var.double().flatten(), want.var((0, 2, 3), unbiased=False), atol=tol, rtol=tol)
        assert layer(x).isfinite().all()


def test_the_rendezvous_is_a_file_uri_on_windows_too():
    assert rendezvous_uri(r'C:\Users\me\AppData\Local\Temp\launch-x', PureWindowsPath) == \
        'file:///C:/Users/me/AppData/Local/Temp/launch-x/rendezvous'
    assert rendezvous_uri('/tmp/launch-x') == 'file:///tmp/launch-x/rendezvous'


@pytest.mark.parametrize('error, timeout', [
    (dist.DistBackendError('[PG 0 Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=7, OpType=ALLREDUCE) '
                           'ran for 3004 milliseconds before timing out.'), True),                              # NCCL's words
    (dist.DistNetworkError('Socket Timeout'), True),
    (RuntimeError('[/pytorch/gloo/transport/tcp/pair.cc:534] Timed out waiting 3000ms for recv operation to complete'), True),
    (dist.DistBackendError('Connection closed by peer [10.0.0.2]:4242'), False),
    (RuntimeError('CUDA out of memory'), False)])
def test_timeouts_are_recognised_by_type_then_wording(error, timeout):
    def fails(): raise error
    if timeout:
        with pytest.raises(RankTimeoutError, match='did not answer within timeout=7 s') as e:
            run_in_group(fails, timeout=7)
        assert e.value.__cause__ is error and 'pair.cc' not in str(e.value)
    else:
        with pytest.raises(type(error)) as e: run_in_group(fails, timeout=7)
        assert e.value is error


def test_launch_names_what_was_changed_in_the_notebook_but_not_exported(tmp_path, monkeypatch):
    "The processes import exp.nb_07b: a definition of the notebook (here a module standing for __main__) that differs is named."
    (tmp_path / 'a_notebook.py').write_text(
        'from exp.nb_07b import *\n'
        'def get_rank(): return dist.get_rank() if is_dist() else 0\n'                  # as exported
        'def get_world_size(): return 2   # edited, not exported\n'
        'class ShardSampler():\n    def set_epoch(self, epoch): self.epoch = epoch + 1\n'
        'class AllReduceSum(torch.autograd.Function):\n    @staticmethod\n    def forward(ctx, x): return x\n'   # (a class in a class)
        'def my_helper(): pass\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    import a_notebook
    assert stale_names(a_notebook) == ['get_world_size', 'ShardSampler', 'AllReduceSum']
    with pytest.warns(UserWarning, match='get_world_size, ShardSampler, AllReduceSum changed in this notebook but not in exp.nb_07b.*export'):
        warn_if_stale(a_notebook)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        warn_if_stale()   # this test module defines nothing of exp.nb_07b


def test_a_model_is_saved_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / 'w.pt'
    path.write_text('the old weights')
    def half_written(obj, f, *a, **k):
        Path(f).write_text('half')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', half_written)
    with pytest.raises(OSError, match='disk full'): save_model(nn.Linear(2, 2), path)
    assert path.read_text() == 'the old weights' and [p.name for p in tmp_path.iterdir()] == ['w.pt']


def test_the_example_script_checks_where_it_saves_before_training(tmp_path):
    cmd = [sys.executable, str(ROOT / 'examples' / 'train_distributed.py'), '--items', '64', '--save', str(tmp_path / 'no' / 'w.pt')]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(ROOT)})
    assert out.returncode == 2 and '--save' in out.stderr and 'no such folder' in out.stderr, out.stderr[-2000:]
    assert 'validation accuracy' not in out.stdout


# --- uneven data and ranks that leave -----------------------------------------------------------------------------

@pytest.mark.parametrize('kind, words', [('counts', r'different numbers of training batches in epoch 0 \(rank 0 6, rank 1 5\)'),
                                         ('empty', r'empty training batch at step 1 \(batch sizes: rank 0 4, rank 1 0\)')])
def test_uneven_data_fails_at_once_on_every_rank(kind, words):
    start = time.monotonic()
    with pytest.raises(RankFailedError, match=r'^rank \d failed first: UnevenDataError: .*' + words):
        launch(fit_workers, 2, args=([(an_epoch([DDPCallback], data=uneven_data(kind)),)],), timeout=120, threads=1)
    assert time.monotonic() - start < 60   # not the 120 s of the timeout


def test_a_rank_that_exits_with_status_0_is_named():
    with pytest.raises(RankFailedError, match=r'^rank 1 failed first: its process ended \(exit status 0\) before `fn` returned'):
        launch(leave_on_rank1, 2, timeout=60, threads=1)


# --- the parent of launch: killed, terminated, interrupted --------------------------------------------------------

def gone(pid):
    "Whether process `pid` has ended (a zombie counts as ended: its parent is gone, init reaps it)."
    try: return Path(f'/proc/{pid}/stat').read_text().split(') ')[1][0] in 'ZX'
    except (FileNotFoundError, ProcessLookupError, IndexError): return True


@pytest.mark.skipif(not Path('/proc/self/stat').exists(), reason='reads process states from /proc (Linux)')
@pytest.mark.parametrize('how', ['SIGTERM', 'SIGKILL', 'SIGINT'])
def test_the_workers_end_with_their_parent_and_leave_nothing(tmp_path, how):
    tmp, pids = tmp_path / 'tmp', tmp_path / 'pids'
    tmp.mkdir(), pids.mkdir()
    script = f'from exp.nb_07b import launch\nimport dist_helpers\nlaunch(dist_helpers.note_pid_and_wait, 2, args=({str(pids)!r},), threads=1)'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TMPDIR': str(tmp), 'PYTHONPATH': f'{ROOT}{os.pathsep}{ROOT / "tests"}'}
    parent = subprocess.Popen([sys.executable, '-c', script], env=env, cwd=ROOT, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(pids.iterdir())) < 2 and time.monotonic() < deadline and parent.poll() is None: time.sleep(0.2)
        workers = [int(p.read_text()) for p in pids.iterdir()]
        assert len(workers) == 2, parent.communicate(timeout=10)
        if how == 'SIGINT': os.killpg(parent.pid, signal.SIGINT)          # Ctrl-C in a terminal: the whole group
        else: os.kill(parent.pid, getattr(signal, how))
        out, err = parent.communicate(timeout=30)
        deadline = time.monotonic() + 30
        while not all(gone(w) for w in workers) and time.monotonic() < deadline: time.sleep(0.2)
        assert all(gone(w) for w in workers)
        assert list(tmp.iterdir()) == []                                   # launch's folder, no error files
        if how == 'SIGINT':
            assert err.count('Traceback') == 1 and 'KeyboardInterrupt: launch: interrupted; its 2 processes were stopped' in err
            assert 'Process SpawnProcess' not in err, err
    finally:
        if parent.poll() is None: parent.kill()


def test_local_device_follows_default_device(monkeypatch):
    "CUDA: this rank's own GPU; else whatever notebook 06's default_device picks (MPS on a Mac, the CPU)."
    import exp.nb_07b as nb
    monkeypatch.setattr(nb, 'default_device', lambda: torch.device('mps'))
    assert nb.local_device() == torch.device('mps')
    monkeypatch.setattr(nb, 'default_device', lambda: torch.device('cuda'))
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setenv('LOCAL_RANK', '3')
    assert nb.local_device() == torch.device('cuda', 1)


def test_launch_refuses_what_only_the_notebook_has(monkeypatch):
    "A function of a notebook's cells (module __main__, no file) cannot be imported by the new processes: one clear error."
    import types
    notebook = types.ModuleType('__main__')
    monkeypatch.setitem(sys.modules, '__main__', notebook)
    def mine(): pass
    class MyCallback(Callback): pass
    for f in (mine, MyCallback): f.__module__, f.__qualname__ = '__main__', f.__name__; setattr(notebook, f.__name__, f)
    with pytest.raises(ValueError, match='mine defined in this notebook.*export it'): launch(mine)
    with pytest.raises(ValueError, match=r'^launch: MyCallback defined in this notebook'):   # in what is sent, too
        launch(fit_workers, args=([(partial(get_learn_run, cbs=[MyCallback()]),)],))
    import exp.nb_07b as nb
    worker = nb._worker
    monkeypatch.setattr(worker, '__module__', '__main__')
    with pytest.raises(ValueError, match="notebook's own launch.*from exp.nb_07b import launch"): launch(all_reduce_demo)
