"""Behaviour of nb_05c, the engineering around 05b's lesson: ProgressCallback and its display modes, the
sync-free StopOnNanCallback, a Runner that fails well (every after_fit runs, bad arguments refused at once),
LR_Find's and ParamScheduler's checks, and explore_lr_find."""
import copy, io, math, sys
from contextlib import contextmanager
from functools import partial

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

import exp.nb_05b as nb_05b
import exp.nb_05c as nb_05c
from exp.nb_05c import (AvgStatsCallback, Callback, CancelTrainException, DataBunch, Dataset, LR_Find, Learner,
                        ParamScheduler, ProgressCallback, Recorder, Runner, StopOnNanCallback, accuracy,
                        format_time, get_dls, progress_mode, sched_lin)
from test_nb_05b import C, FIT, N_IN, Counting, Log, assert_same_state, clone_state, scheduled_loss, toy_learner

@pytest.mark.parametrize('kwargs', [dict(max_iter=0), dict(max_iter=-3), dict(max_iter=2.5), dict(min_lr=0),
                                    dict(min_lr=-1e-3), dict(min_lr=1., max_lr=1.), dict(min_lr=1., max_lr=0.1),
                                    dict(min_lr=float('nan')), dict(max_lr=float('nan'))])
def test_lr_find_validates_arguments(kwargs):
    with pytest.raises(ValueError, match='LR_Find'): LR_Find(**kwargs)


def test_lr_find_warns_when_the_data_runs_out():
    learn = toy_learner()   # 3 training batches an epoch
    with pytest.warns(UserWarning, match='data ran out after 6 of 101 steps'):
        Runner(cb_funcs=LR_Find).fit(2, learn)


# --- StopOnNanCallback ----------------------------------------------------------------------------

def all_finite(model): return all(bool(p.isfinite().all()) for p in model.parameters())


@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_stop_on_nan_stops_at_the_first_bad_loss_on_cpu(bad, capsys):
    factors = [1.] * 10
    factors[4] = bad    # epoch 1 (3 steps an epoch), iteration 4
    learn = toy_learner(loss_func=scheduled_loss(factors))
    log = Log()
    run = Runner(cbs=log, cb_funcs=[StopOnNanCallback, Counting])
    run.fit(3, learn)
    assert run.stop_on_nan.found_at == (1, 4)
    assert 'at epoch 1, step 1 of the epoch (step 4 of the fit, both counted from 0)' in capsys.readouterr().out
    assert log.log[-5:] == ['after_pred', 'after_loss', 'after_batch', 'after_cancel_train', 'after_fit']
    assert run.counting.steps == 4                      # stopped before the bad step
    assert all_finite(learn.model)


def test_stop_on_nan_does_nothing_on_a_finite_run(capsys):
    log = Log()
    run = Runner(cbs=log, cb_funcs=StopOnNanCallback)
    run.fit(2, toy_learner())
    assert run.stop_on_nan.found_at is None and log.log == FIT
    assert capsys.readouterr().out == ''


@contextmanager
def no_value_reads(monkeypatch, allowed):
    "Make reading a tensor's value (what syncs with a GPU) raise, except while `allowed()` is true."
    for name in ('__bool__', 'item', '__float__', '__int__', '__index__', 'tolist'):
        original = getattr(torch.Tensor, name)
        def guarded(self, *args, _original=original, _name=name):
            if not allowed(): raise AssertionError(f'a tensor value was read ({_name}) outside a check')
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, guarded)
    yield


class WatchedStopOnNan(StopOnNanCallback):
    "Reading tensor values is only allowed in `check`; records the n_iter of each check."
    reading = False
    def begin_fit(self):
        super().begin_fit(); self.checks = []
    def check(self, stop=True):
        self.checks.append(self.n_iter)
        WatchedStopOnNan.reading = True
        try: return super().check(stop)
        finally: WatchedStopOnNan.reading = False


# checks (the n_iter of each): after_loss of steps 2, 5, 8..., the end of each training pass (3, 6...),
# and after_fit (which reads nothing once a bad loss was found)
@pytest.mark.parametrize('bad_at,found_at,checks,steps', [
    (4, (1, 4), [2, 3, 5, 6], 5),   # found at the check of step 5, which takes no step
    (5, (1, 5), [2, 3, 5, 6], 5),   # the bad loss is at a check: stopped before its step
    (3, (1, 3), [2, 3, 5, 6], 5),   # the first step after the end-of-pass check
    (2, (0, 2), [2, 3], 2),
    (6, (2, 6), [2, 3, 5, 6, 8, 9], 8),
])
def test_stop_on_nan_checks_every_n_steps_and_finds_the_exact_step(bad_at, found_at, checks, steps, monkeypatch, capsys):
    factors = [1.] * 12
    factors[bad_at] = float('nan')
    learn = toy_learner(loss_func=scheduled_loss(factors))
    data = learn.data
    data.train_dl.sampler.shuffle = False     # no randperm: the data loader reads no tensor values
    cb = WatchedStopOnNan(check_every=3)
    run = Runner(cbs=cb, cb_funcs=Counting)
    with no_value_reads(monkeypatch, lambda: WatchedStopOnNan.reading or not run.in_train):
        run.fit(4, learn)
    assert cb.found_at == found_at
    assert cb.checks == checks
    assert run.counting.steps == steps
    assert f'epoch {found_at[0]}, step {found_at[1] - 3 * found_at[0]} of the epoch (step {found_at[1]} of the fit' in capsys.readouterr().out


def test_stop_on_nan_check_every_none_checks_each_step_on_cpu():
    cb = WatchedStopOnNan()
    Runner(cbs=cb).fit(2, toy_learner())
    assert cb.checks == [0, 1, 2, 3, 3, 4, 5, 6, 6]   # each step, and the end of each training pass


def test_stop_on_nan_reports_a_bad_loss_when_the_fit_is_cancelled_between_checks(capsys):
    factors = [1.] * 10
    factors[1] = float('nan')
    class StopAt2(Callback):
        def after_batch(self):
            if self.in_train and self.n_iter == 2: raise CancelTrainException()
    run = Runner(cb_funcs=[partial(StopOnNanCallback, check_every=100), StopAt2])
    run.fit(2, toy_learner(loss_func=scheduled_loss(factors)))
    assert run.stop_on_nan.found_at == (0, 1)
    assert 'epoch 0, step 1 of the epoch (step 1 of the fit' in capsys.readouterr().out


def test_stop_on_nan_resets_between_fits():
    learn = toy_learner(loss_func=scheduled_loss([1., float('nan')]))
    run = Runner(cb_funcs=StopOnNanCallback)
    run.fit(1, learn)
    assert run.stop_on_nan.found_at == (0, 1)
    learn.model = nn.Sequential(nn.Linear(N_IN, 5), nn.ReLU(), nn.Linear(5, C))
    learn.opt = optim.SGD(learn.model.parameters(), lr=0.1)
    run.fit(1, learn)
    assert run.stop_on_nan.found_at is None


@pytest.mark.parametrize('check_every', [0, -1, 2.5])
def test_stop_on_nan_validates_check_every(check_every):
    with pytest.raises(ValueError, match='check_every'): StopOnNanCallback(check_every=check_every)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_stop_on_nan_on_cuda_never_syncs_between_checks(capsys):
    dev = torch.device('cuda')
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, N_IN, generator=g).to(dev), torch.randint(0, C, (64,), generator=g).to(dev)
    data = DataBunch(*get_dls(Dataset(x, y), Dataset(x[:8], y[:8]), 2), C)
    data.train_dl.sampler = [slice(i, i + 2) for i in range(0, 64, 2)]   # no index tensor copied to the GPU (a sync)
    bad = torch.zeros(40, device=dev)
    bad[37] = float('nan')                    # step 37: epoch 1 (32 steps an epoch), iteration 37
    def loss_func(pred, yb, i=[0]):
        loss = F.cross_entropy(pred, yb)
        if torch.is_grad_enabled():
            loss = loss + bad[i[0] % 40]; i[0] += 1
        return loss
    model = nn.Sequential(nn.Linear(N_IN, 5), nn.ReLU(), nn.Linear(5, C)).to(dev)
    learn = Learner(model, optim.SGD(model.parameters(), lr=0.1), loss_func, data)

    class Strict(StopOnNanCallback):
        "Any synchronising operation outside `check` raises."
        def begin_fit(self): super().begin_fit(); self.checks = 0
        def begin_epoch(self): torch.cuda.set_sync_debug_mode('error')
        def check(self, stop=True):
            self.checks += 1
            torch.cuda.set_sync_debug_mode('default')
            try: return super().check(stop)
            finally:
                if self.in_train: torch.cuda.set_sync_debug_mode('error')
        def after_fit(self):
            torch.cuda.set_sync_debug_mode('default'); super().after_fit()
    cb = Strict(check_every=10)
    try: Runner(cbs=cb).fit(3, learn)
    finally: torch.cuda.set_sync_debug_mode('default')
    assert cb.found_at == (1, 37)
    assert cb.checks == 6   # n_iter 9, 19, 29, the end of epoch 0, 39 (found), after_fit
    out = capsys.readouterr().out
    assert 'at epoch 1, step ' in out and '(step 37 of the fit' in out

# --- ProgressCallback -----------------------------------------------------------------------------

def fit_with_progress(epochs=2, **kwargs):
    run = Runner(cb_funcs=[partial(AvgStatsCallback, accuracy), partial(ProgressCallback, **kwargs)])
    run.fit(epochs, toy_learner())
    return run


def test_progress_off_prints_nothing_and_leaves_avg_stats_printing(capsys):
    buf = io.StringIO()
    run = Runner(cb_funcs=partial(ProgressCallback, mode='off', file=buf))
    run.fit(2, toy_learner())
    assert buf.getvalue() == '' and capsys.readouterr() == ('', '')
    fit_with_progress(mode='off', file=buf)
    assert buf.getvalue() == ''
    assert capsys.readouterr().out.count('train:') == 2   # AvgStatsCallback prints as usual


def test_progress_text_writes_bars_and_one_row_per_epoch(capsys):
    buf = io.StringIO()
    run = fit_with_progress(epochs=2, mode='text', file=buf, refresh_secs=0, mininterval=0)
    out = buf.getvalue()
    lines = [l.split('\r')[-1] for l in out.split('\n')]
    header = [l for l in lines if l.split()[:1] == ['epoch']]
    assert len(header) == 1 and header[0].split() == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time']
    rows = [l.split() for l in lines if l.split() and l.split()[0].isdigit()]
    assert [r[0] for r in rows] == ['0', '1']
    train_loss, valid_loss, acc = run.avg_stats.train_stats.avg_stats[0], *run.avg_stats.valid_stats.avg_stats
    assert [float(v) for v in rows[-1][1:4]] == pytest.approx([train_loss, valid_loss, acc], abs=1e-6)
    assert 'epoch 0 train' in out and 'epoch 1 valid' in out and '3/3' in out and '2/2' in out
    assert out.count('0/3') == 2 and out.count('0/2') == 2   # a new bar for each pass
    assert 'loss ' in out                               # the running loss on the bar
    assert capsys.readouterr().out == ''                # AvgStatsCallback's lines were taken over
    assert run.avg_stats.print_stats                    # ... and given back


def test_progress_reads_the_loss_at_most_every_refresh_secs(monkeypatch):
    reads = []
    original = ProgressCallback.mean_loss
    monkeypatch.setattr(ProgressCallback, 'mean_loss', lambda self, t: reads.append(t) or original(self, t))
    fit_with_progress(epochs=2, mode='text', file=io.StringIO(), refresh_secs=1e9)
    assert len(reads) == 4      # once per pass, for the table: none per batch
    reads.clear()
    fit_with_progress(epochs=2, mode='text', file=io.StringIO(), refresh_secs=0)
    assert len(reads) == 4 + 10  # and once per batch when asked to refresh every time


def test_progress_auto_mode(monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self): return True
    monkeypatch.setattr(nb_05c, 'in_notebook', lambda: False)
    monkeypatch.setattr(sys, 'stdout', io.StringIO())
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    assert progress_mode('auto') == 'off'
    buf = io.StringIO()
    run = Runner(cb_funcs=ProgressCallback)
    run.fit(1, toy_learner())
    assert sys.stdout.getvalue() == '' and sys.stderr.getvalue() == ''
    assert progress_mode('auto', FakeTTY()) == 'text'
    monkeypatch.setattr(sys, 'stderr', FakeTTY())
    assert progress_mode('auto') == 'text'
    Runner(cb_funcs=ProgressCallback).fit(1, toy_learner())
    assert 'epoch 0 train' in sys.stderr.getvalue()
    monkeypatch.setattr(nb_05c, 'in_notebook', lambda: True)
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    monkeypatch.setattr(nb_05c.importlib.util, 'find_spec', lambda name: object())   # ipywidgets, even where it is missing
    assert progress_mode('auto') == 'notebook'
    monkeypatch.setattr(nb_05c.importlib.util, 'find_spec', lambda name: None)   # no ipywidgets
    assert progress_mode('auto') == 'text' and progress_mode('notebook') == 'text'
    assert progress_mode('off') == 'off' and progress_mode('text') == 'text'


def test_progress_rejects_unknown_modes():
    with pytest.raises(ValueError, match='progress mode'): ProgressCallback(mode='fancy')
    with pytest.raises(ValueError, match='progress mode'): progress_mode('on')


def test_progress_survives_a_cancelled_fit():
    buf = io.StringIO()
    class Stop(Callback):
        def after_step(self):
            if self.n_iter == 1: raise CancelTrainException()
    run = Runner(cb_funcs=[partial(AvgStatsCallback, accuracy), partial(ProgressCallback, mode='text', file=buf), Stop])
    run.fit(2, toy_learner())
    assert run.progress.bar is None and run.avg_stats.print_stats
    assert 'epoch 0 train' in buf.getvalue()


def test_progress_without_avg_stats_and_format_time():
    buf = io.StringIO()
    Runner(cb_funcs=partial(ProgressCallback, mode='text', file=buf)).fit(1, toy_learner())
    header = [l for l in buf.getvalue().split('\n') if 'train_loss' in l]
    assert header[0].split() == ['epoch', 'train_loss', 'valid_loss', 'time']
    assert format_time(5.42) == '0:05.4' and format_time(125) == '2:05.0' and format_time(0.04) == '0:00.0'
    assert format_time(59.97) == '1:00.0'   # the time column shows tenths: a sub-second epoch is not 0:00


# --- when a fit fails, bad arguments ---------------------------------------------------------------

class FailsToBegin(Callback):
    _order = -1
    def begin_fit(self): raise RuntimeError('begin_fit failed')


def test_failure_in_begin_fit_reaches_the_user_unchanged():
    buf = io.StringIO()
    learn = toy_learner(momentum=0.9)
    run = Runner(cb_funcs=[FailsToBegin, partial(AvgStatsCallback, accuracy), StopOnNanCallback, LR_Find,
                           partial(ProgressCallback, mode='text', file=buf), Recorder])
    with pytest.raises(RuntimeError, match='begin_fit failed') as e: run.fit(1, learn)
    assert not getattr(e.value, '__notes__', None)   # no AttributeError from an after_fit (all_ok, shown)
    assert run.learn is None and run.avg_stats.print_stats and buf.getvalue() == ''
    run.cbs = [cb for cb in run.cbs if not isinstance(cb, FailsToBegin)]   # the same runner fits afterwards
    with pytest.warns(UserWarning, match='LR_Find: the data ran out'): run.fit(1, learn)
    assert run.stop_on_nan.found_at is None and 'train_loss' in buf.getvalue()


def test_every_after_fit_runs_and_the_first_error_is_raised():
    ran = []
    class BadCleanup(Callback):
        _order = 1
        def after_fit(self):
            ran.append('bad')
            raise KeyError('cleanup')
    class Last(Callback):
        _order = 2
        def after_fit(self): ran.append('last')
    class FailsInBatch(Callback):
        def after_pred(self): raise ValueError('shape error')
    learn = toy_learner()
    before = clone_state(learn)
    buf = io.StringIO()
    run = Runner(cb_funcs=[FailsInBatch, LR_Find, BadCleanup, Last, partial(ProgressCallback, mode='text', file=buf)])
    with pytest.raises(ValueError, match='shape error') as e: run.fit(1, learn)
    assert ran == ['bad', 'last'] and run.learn is None and run.progress.bar is None
    assert e.value.__notes__ == ["then BadCleanup.after_fit failed too: KeyError: 'cleanup'"]
    assert_same_state(learn, before)                 # LR_Find's after_fit ran
    ran.clear()
    with pytest.raises(KeyError, match='cleanup'): Runner(cb_funcs=[BadCleanup, Last]).fit(1, toy_learner())
    assert ran == ['bad', 'last']
    ran.clear()
    with pytest.raises(KeyboardInterrupt):           # an interrupt too: every after_fit, then the interrupt
        Runner(cb_funcs=[partial(Log, 'after_step', KeyboardInterrupt), BadCleanup, Last]).fit(1, toy_learner())
    assert ran == ['bad', 'last']


def test_runner_refuses_bad_arguments():
    with pytest.raises(TypeError, match=r'cbs= takes callback objects, got the class LR_Find: pass LR_Find\(\) in cbs=, or LR_Find in cb_funcs='):
        Runner(cbs=LR_Find)
    with pytest.raises(TypeError, match='cb_funcs= takes classes or functions that make a callback, got a Recorder object: pass it in cbs='):
        Runner(cb_funcs=Recorder())
    for name, attr in (('DataCallback', 'data'), ('Fit', 'fit'), ('OneBatch', 'one_batch'), ('Epoch', 'epoch')):
        with pytest.raises(ValueError, match=f"would be reachable as run.{attr}, but run.{attr} is the runner's own"):
            Runner(cb_funcs=type(name, (Callback,), {}))
    assert isinstance(Runner(cb_funcs=type('StopCallback', (Callback,), {})).stop, Callback)   # no run.stop flag here
    log = Log()
    run = Runner(cbs=log)
    run.fit(0, toy_learner())
    assert log.log == []
    with pytest.raises(ValueError, match='epochs must be a whole number >= 0, got -1'): run.fit(-1, toy_learner())


def test_param_scheduler_names_the_optimizers_hyper_parameters():
    for pname in ('mom', 'lrr'):
        learn = toy_learner(momentum=0.9)
        with pytest.raises(ValueError, match=f"ParamScheduler\\('{pname}'\\): SGD has no hyper-parameter '{pname}'; its hyper-parameters are 'lr', 'momentum'"):
            Runner(cb_funcs=partial(ParamScheduler, pname, sched_lin(0.9, 0.5))).fit(1, learn)
        assert pname not in learn.opt.param_groups[0]


@pytest.mark.parametrize('kwargs', [dict(max_lr=math.inf), dict(min_lr=1e-3, max_lr=1e-5), dict(min_lr=-math.inf)])
def test_lr_find_refuses_a_non_finite_or_inverted_range(kwargs):
    with pytest.raises(ValueError, match=r'LR_Find: need 0 < min_lr < max_lr < inf'): LR_Find(**kwargs)


def jupyterlab_text(out):
    "What JupyterLab (or a terminal) shows for a stream with '\\r': each '\\r' goes back to the start of the line and overwrites."
    lines = []
    for line in out.split('\n'):
        shown = ''
        for part in line.split('\r'): shown = part + shown[len(part):]
        lines.append(shown)
    return lines


def test_progress_text_rows_have_no_trailing_spaces():
    buf = io.StringIO()
    fit_with_progress(epochs=2, mode='text', file=buf, refresh_secs=0, mininterval=0)
    lines = [l for l in jupyterlab_text(buf.getvalue()) if l]
    assert [l.split()[0] for l in lines] == ['epoch', '0', '1']
    assert all(l == l.rstrip() for l in lines), [l for l in lines if l != l.rstrip()]
    assert {len(l) for l in lines} == {len(lines[0])}


NOTEBOOK_FIT = """
import torch
from functools import partial
from torch import nn, optim
import torch.nn.functional as F
from exp.nb_05c import *
torch.manual_seed(0)
x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
data = DataBunch(*get_dls(Dataset(x, y), Dataset(x, y), 4), 3)
model = nn.Sequential(nn.Linear(4, 3))
run = Runner(cb_funcs=[partial(AvgStatsCallback, accuracy), ProgressCallback])
run.fit(2, Learner(model, optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, data))
print(progress_mode('auto'))
"""


def test_progress_notebook_mode_saves_no_widget(tmp_path):
    nbformat, nbclient = pytest.importorskip('nbformat'), pytest.importorskip('nbclient')
    pytest.importorskip('ipywidgets'); pytest.importorskip('ipykernel')
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(NOTEBOOK_FIT)])
    nbclient.NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}}).execute()
    outputs = nb.cells[0].outputs
    assert outputs[-1].text == 'notebook\n'   # it ran in widget mode
    shown = [o for o in outputs if o.output_type == 'display_data']
    assert all(list(o.data) == ['text/plain'] for o in shown), [list(o.data) for o in shown]
    table = [o.data['text/plain'] for o in shown if o.data['text/plain']]
    assert len(table) == 1
    rows = table[0].split('\n')
    assert rows[0].split() == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time'] and [r.split()[0] for r in rows[1:]] == ['0', '1']
    saved = nbformat.writes(nbformat.v4.new_notebook(cells=nb.cells))   # the cell and its outputs, as saved
    assert 'widget-view' not in saved and '0%' not in saved
    nb.metadata.pop('widgets', None)   # as run_notebooks.py saves it (JupyterLab keeps no widget state by default)
    nbconvert = pytest.importorskip('nbconvert')
    html, _ = nbconvert.HTMLExporter().from_notebook_node(nb)
    assert 'train_loss' in html and '0%|' not in html and 'widget-view' not in html


# --- 05c's classes under 05b's names -----------------------------------------------------------------

def test_05c_redefines_the_engineered_classes_under_the_same_names():
    for cls in (ProgressCallback, StopOnNanCallback):
        assert cls.__mro__[1:] == (Callback, object), cls
    for cls, lesson in ((Runner, nb_05b.Runner), (LR_Find, nb_05b.LR_Find), (ParamScheduler, nb_05b.ParamScheduler)):
        assert cls is not lesson and cls.__mro__[1] is lesson and cls.__name__ == lesson.__name__
    run = Runner(cb_funcs=[LR_Find, StopOnNanCallback, partial(ProgressCallback, mode='off'),
                           partial(ParamScheduler, 'lr', sched_lin(0.1, 0.2))])
    assert isinstance(run.progress, ProgressCallback) and isinstance(run.stop_on_nan, StopOnNanCallback)
    assert isinstance(run.lr_find, LR_Find) and isinstance(run.param_scheduler, ParamScheduler)


def test_an_error_the_caller_is_handling_is_not_taken_for_the_fits():
    class BadCleanup(Callback):
        def after_fit(self): raise KeyError('cleanup')
    try: raise OSError('handled by the caller')
    except OSError:
        with pytest.raises(KeyError, match='cleanup'): Runner(cb_funcs=BadCleanup).fit(1, toy_learner())
        Runner().fit(1, toy_learner())   # and a fit that succeeds raises nothing


# --- in_notebook: a kernel, whatever the shell's class is called (Colab) --------------------------

class ColabShell:
    "Stands in for Colab's shell: another class name than ipykernel's, and a kernel."
    kernel, config = object(), {}

class TerminalShell:
    "Stands in for a terminal IPython: no kernel."
    config = {'TerminalIPythonApp': {}}

class TerminalShellWithKernelConfig:
    "A terminal IPython whose ipython_config.py sets kernel options (old tutorials do): still no kernel."
    config = {'IPKernelApp': {'matplotlib': 'inline'}}


@pytest.mark.parametrize('shell,expected', [(ColabShell(), True), (TerminalShell(), False),
                                            (TerminalShellWithKernelConfig(), False), (None, False)])
def test_in_notebook_detects_a_kernel_not_a_class_name(shell, expected, monkeypatch):
    IPython = pytest.importorskip('IPython')
    monkeypatch.setattr(IPython, 'get_ipython', lambda: shell)
    assert nb_05c.in_notebook() is expected
    if expected: assert progress_mode('auto') == 'notebook'


# --- ProgressCallback where its mode cannot work -----------------------------------------------------

def test_progress_notebook_mode_outside_jupyter_falls_back_to_text_once(capsys):
    assert not nb_05c.in_notebook()
    buf = io.StringIO()
    run = Runner(cb_funcs=[partial(AvgStatsCallback, accuracy), partial(ProgressCallback, mode='notebook', file=buf)])
    run.fit(2, toy_learner())
    run.fit(1, toy_learner())
    out = buf.getvalue()
    assert "text/plain" not in out and "text/plain" not in capsys.readouterr().out   # no display dicts printed
    said = [l for l in out.split('\n') if l.startswith('ProgressCallback:')]
    assert len(said) == 1 and 'text' in said[0] and 'Jupyter kernel' in said[0]      # once, saying why
    rows = [l.split('\r')[-1].split() for l in out.split('\n')]
    assert [r[0] for r in rows if r and r[0].isdigit()] == ['0', '1', '0']            # the table, as text


def test_progress_text_without_stderr_shows_nothing_and_does_not_fail(monkeypatch, capsys):
    monkeypatch.setattr(sys, 'stderr', None)   # pythonw, a service
    assert progress_mode('text') == 'off' and progress_mode('auto') == 'off'
    run = Runner(cb_funcs=[partial(AvgStatsCallback, accuracy), partial(ProgressCallback, mode='text')])
    run.fit(2, toy_learner())
    assert run.n_iter == 6 and capsys.readouterr().out.count('valid:') == 2   # AvgStatsCallback prints as usual
    assert progress_mode('text', io.StringIO()) == 'text'                     # a stream given explicitly still works


# --- explore_lr_find -----------------------------------------------------------------------------

def lr_find_run():
    run = Runner(cb_funcs=partial(LR_Find, max_iter=8))
    run.fit(3, toy_learner())
    return run.lr_find


def test_lr_find_figure_and_explore_outside_a_kernel_draw_the_curve():
    lrf = lr_find_run()
    fig = nb_05c.lr_find_figure(lrf, skip_last=2, beta=0.5)
    lines = fig.axes[0].get_lines()
    assert list(lines[0].get_xdata()) == pytest.approx(lrf.lrs[:-2]) and lrf.smooth_beta == 0.9   # beta put back
    assert list(lines[1].get_ydata()) == pytest.approx(nb_05b.debiased_ewma(lrf.losses, 0.5)[:-2])
    plt.close('all')
    assert nb_05c.explore_lr_find(lrf, skip_last=1) is None   # no kernel here: the curve, on the current figure
    assert list(plt.gca().get_lines()[0].get_xdata()) == pytest.approx(lrf.lrs[:-1])
    plt.close('all')


NOTEBOOK_EXPLORE = ["""
from functools import partial
from exp.nb_05c import *
torch.manual_seed(0)
x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
data = DataBunch(*get_dls(Dataset(x, y), Dataset(x, y), 4), 3)
model = nn.Sequential(nn.Linear(4, 3))
run = Runner(cb_funcs=partial(LR_Find, max_iter=20))
run.fit(2, Learner(model, optim.SGD(model.parameters(), lr=0.1), F.cross_entropy, data))
explore_lr_find(run.lr_find)
""", "print('next cell')"]


def test_explore_lr_find_leaves_an_image_in_the_saved_notebook(tmp_path):
    nbformat, nbclient = pytest.importorskip('nbformat'), pytest.importorskip('nbclient')
    pytest.importorskip('ipywidgets'); pytest.importorskip('ipykernel')
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in NOTEBOOK_EXPLORE])
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name='python3', resources={'metadata': {'path': str(tmp_path)}})
    client.execute()
    outputs = nb.cells[0].outputs
    assert [o.output_type for o in outputs] == ['display_data'], outputs
    assert 'image/png' in outputs[0].data and 'application/vnd.jupyter.widget-view+json' not in outputs[0].data
    nb.metadata.pop('widgets', None)   # as run_notebooks.py saves it
    assert 'widget-view' not in nbformat.writes(nb)


# --- the events go only to the callbacks that handle them ------------------------------------------

def test_05c_runner_sends_each_event_only_to_the_callbacks_that_handle_it(monkeypatch):
    calls = []
    original = Callback.__call__
    monkeypatch.setattr(Callback, '__call__', lambda self, name: calls.append((type(self).__name__, name)) or original(self, name))
    class Counts(Callback):
        _order = 2
        def after_step(self): seen.append(('counts', self.n_iter))
    class First(Callback):
        _order = -1
        def after_step(self): seen.append(('first', self.n_iter))
    seen, log = [], Log()
    run = Runner(cbs=log, cb_funcs=[Counts, First])
    run.fit(2, toy_learner())
    assert log.log == FIT                                            # a callback with its own __call__ gets every event
    # (after_fit goes to every callback: end_fit calls each one on its own, so that one failing stops none)
    assert {name for cls, name in calls if cls == 'Counts'} == {'after_step', 'after_fit'}
    assert {name for cls, name in calls if cls == 'TrainEvalCallback'} == {'begin_fit', 'after_batch', 'begin_epoch', 'begin_validate', 'after_fit'}
    assert seen == [(who, i) for i in range(6) for who in ('first', 'counts')]   # in _order, at every step
    calls.clear()
    run.add_cb(type('Late', (Callback,), {'after_epoch': lambda self: seen.append('late')})())   # added between fits
    run.fit(1, toy_learner())
    assert seen[-1] == 'late'
