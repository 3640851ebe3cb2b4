"""Behaviour of nb_05b: exceptions as control flow, the new Callback / Runner, LR_Find,
StopOnNanCallback and ProgressCallback."""
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

import exp.nb_05 as nb_05
import exp.nb_05b as nb_05b
from exp.nb_05b import (AvgStatsCallback, Callback, CancelBatchException, CancelEpochException,
                        CancelTrainException, DataBunch, Dataset, LR_Find, Learner, ParamScheduler,
                        ProgressCallback, Recorder, Runner, StopOnNanCallback, TrainEvalCallback, accuracy,
                        debiased_ewma, format_time, get_dls, progress_mode, sched_lin)

# --- tiny synthetic data: 3 training batches (2, 2, 2) and 2 validation batches (4, 4) -------------

N_IN, C = 4, 3

def toy_bunch(n_train=6, n_valid=8, bs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_train, x_valid = torch.randn(n_train, N_IN, generator=g), torch.randn(n_valid, N_IN, generator=g)
    y_train, y_valid = torch.randint(0, C, (n_train,), generator=g), torch.randint(0, C, (n_valid,), generator=g)
    return DataBunch(*get_dls(Dataset(x_train, y_train), Dataset(x_valid, y_valid), bs), C)

def toy_learner(data=None, lr=0.1, momentum=0., loss_func=F.cross_entropy, seed=0):
    data = data or toy_bunch()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(N_IN, 5), nn.ReLU(), nn.Linear(5, C))
    return Learner(model, optim.SGD(model.parameters(), lr=lr, momentum=momentum), loss_func, data)

def scheduled_loss(factors):
    "Cross-entropy times `factors[i]` at the i-th training loss (1 after the list ends; validation untouched)."
    calls = []
    def loss_func(pred, yb):
        loss = F.cross_entropy(pred, yb)
        if not torch.is_grad_enabled(): return loss
        i = len(calls); calls.append(i)
        return loss * (factors[i] if i < len(factors) else 1.)
    return loss_func

def clone_state(learn):
    return copy.deepcopy(learn.model.state_dict()), copy.deepcopy(learn.opt.state_dict())

def assert_same_state(learn, state):
    model_state, opt_state = state
    now = learn.model.state_dict()
    assert now.keys() == model_state.keys()
    for k in model_state: assert torch.equal(now[k], model_state[k]), k
    opt_now = learn.opt.state_dict()
    assert [{k: v for k, v in g.items()} for g in opt_now['param_groups']] == opt_state['param_groups']
    assert opt_now['state'].keys() == opt_state['state'].keys()
    for i in opt_state['state']:
        for k, v in opt_state['state'][i].items(): assert torch.equal(opt_now['state'][i][k], v), (i, k)

# --- the exact event sequence ---------------------------------------------------------------------

T = ['begin_batch', 'after_pred', 'after_loss', 'after_backward', 'after_step', 'after_batch']  # a training batch
V = ['begin_batch', 'after_pred', 'after_loss', 'after_batch']                                  # a validation batch
TRAIN_PASS, VALID_PASS = T * 3, V * 2
EPOCH = ['begin_epoch', *TRAIN_PASS, 'begin_validate', *VALID_PASS, 'after_epoch']
FIT = ['begin_fit', *EPOCH, *EPOCH, 'after_fit']


class Log(Callback):
    "Logs every event through `__call__`; raises `exc` the first time `event` comes (in the phase `in_train`, if given)."
    def __init__(self, event=None, exc=None, in_train=None):
        self.log, self.event, self.exc, self.phase, self.raised = [], event, exc, in_train, False
    def __call__(self, cb_name):
        self.log.append(cb_name)
        if (cb_name == self.event and not self.raised
                and (self.phase is None or self.run.in_train == self.phase)):
            self.raised = True
            raise self.exc(f'raised in {cb_name}')
        return super().__call__(cb_name)


class Counting(Callback):
    "Counts the forward passes, losses and optimizer steps that really happened."
    _order = -5
    def begin_fit(self):
        self.preds = self.losses = self.steps = 0
        self.hook = self.model.register_forward_pre_hook(lambda *_: self.count('preds'))
        self.loss_func, step = self.learn.loss_func, self.opt.step
        self.learn.loss_func = lambda *args: self.count('losses') or self.loss_func(*args)
        self.opt.step = lambda *args, **kwargs: self.count('steps') or step(*args, **kwargs)
    def count(self, what): setattr(self, what, getattr(self, what) + 1)
    def after_fit(self):
        self.hook.remove()
        self.learn.loss_func = self.loss_func
        del self.opt.step


def run_logged(log, epochs=2):
    run = Runner(cbs=[log, Counting()])
    run.fit(epochs, toy_learner())
    return run


def test_event_sequence_of_a_fit():
    log = Log()
    run = run_logged(log)
    assert log.log == FIT
    assert run.n_iter == 6 and run.n_epochs == pytest.approx(2.0)
    assert (run.counting.preds, run.counting.losses, run.counting.steps) == (10, 10, 6)   # 2 epochs of 3 training and 2 validation batches
    assert run.learn is None


def cancel_cases():
    "(event, phase, exception, expected events, exception that must escape) derived from the Runner's contract."
    E1 = [*EPOCH, 'after_fit']   # the second epoch, untouched, then the end
    cases = []
    # a batch event of the first training batch (the cut is what ran before the raise, the raise included)
    for k, event in enumerate(T[:-1]):
        cut = T[:k + 1]
        cases += [
            (event, True, CancelBatchException,   # rest of the batch skipped, the other batches run
             ['begin_fit', 'begin_epoch', *cut, 'after_cancel_batch', 'after_batch', *T, *T,
              'begin_validate', *VALID_PASS, 'after_epoch', *E1], None),
            (event, True, CancelEpochException,   # rest of the training pass skipped, validation runs
             ['begin_fit', 'begin_epoch', *cut, 'after_batch', 'after_cancel_epoch',
              'begin_validate', *VALID_PASS, 'after_epoch', *E1], None),
            (event, True, CancelTrainException,   # everything after stops; after_batch and after_fit run
             ['begin_fit', 'begin_epoch', *cut, 'after_batch', 'after_cancel_train', 'after_fit'], None)]
    # after_batch of the first training batch: the batch is over
    cases += [
        ('after_batch', True, CancelBatchException, ['begin_fit', 'begin_epoch', *T, 'after_fit'], CancelBatchException),
        ('after_batch', True, CancelEpochException,
         ['begin_fit', 'begin_epoch', *T, 'after_cancel_epoch', 'begin_validate', *VALID_PASS, 'after_epoch', *E1], None),
        ('after_batch', True, CancelTrainException, ['begin_fit', 'begin_epoch', *T, 'after_cancel_train', 'after_fit'], None)]
    # a batch event of the first validation batch
    start = ['begin_fit', 'begin_epoch', *TRAIN_PASS, 'begin_validate']
    cases += [
        ('after_loss', False, CancelBatchException,
         [*start, 'begin_batch', 'after_pred', 'after_loss', 'after_cancel_batch', 'after_batch', *V, 'after_epoch', *E1], None),
        ('after_loss', False, CancelEpochException,
         [*start, 'begin_batch', 'after_pred', 'after_loss', 'after_batch', 'after_cancel_epoch', 'after_epoch', *E1], None),
        ('after_loss', False, CancelTrainException,
         [*start, 'begin_batch', 'after_pred', 'after_loss', 'after_batch', 'after_cancel_train', 'after_fit'], None)]
    # the events outside any batch
    cases += [
        ('begin_fit', None, CancelBatchException, ['begin_fit', 'after_fit'], CancelBatchException),
        ('begin_fit', None, CancelEpochException, ['begin_fit', 'after_fit'], CancelEpochException),
        ('begin_fit', None, CancelTrainException, ['begin_fit', 'after_cancel_train', 'after_fit'], None),
        ('begin_epoch', None, CancelBatchException, ['begin_fit', 'begin_epoch', 'after_fit'], CancelBatchException),
        ('begin_epoch', None, CancelEpochException,   # the training pass is skipped, validation runs
         ['begin_fit', 'begin_epoch', 'after_cancel_epoch', 'begin_validate', *VALID_PASS, 'after_epoch', *E1], None),
        ('begin_epoch', None, CancelTrainException, ['begin_fit', 'begin_epoch', 'after_cancel_train', 'after_fit'], None),
        ('begin_validate', None, CancelBatchException,
         ['begin_fit', 'begin_epoch', *TRAIN_PASS, 'begin_validate', 'after_fit'], CancelBatchException),
        ('begin_validate', None, CancelEpochException,  # the validation pass is skipped
         ['begin_fit', 'begin_epoch', *TRAIN_PASS, 'begin_validate', 'after_cancel_epoch', 'after_epoch', *E1], None),
        ('begin_validate', None, CancelTrainException,
         ['begin_fit', 'begin_epoch', *TRAIN_PASS, 'begin_validate', 'after_cancel_train', 'after_fit'], None),
        ('after_epoch', None, CancelBatchException, ['begin_fit', *EPOCH, 'after_fit'], CancelBatchException),
        ('after_epoch', None, CancelEpochException, ['begin_fit', *EPOCH, 'after_fit'], CancelEpochException),
        ('after_epoch', None, CancelTrainException, ['begin_fit', *EPOCH, 'after_cancel_train', 'after_fit'], None),
        ('after_fit', None, CancelBatchException, FIT, CancelBatchException),
        ('after_fit', None, CancelEpochException, FIT, CancelEpochException),
        ('after_fit', None, CancelTrainException, FIT, CancelTrainException)]
    return cases

CASES = cancel_cases()

@pytest.mark.parametrize('event,phase,exc,expected,escapes', CASES,
                         ids=[f"{c[2].__name__[6:-9]}-{c[0]}-{ {True: 'train', False: 'valid', None: 'fit'}[c[1]]}" for c in CASES])
def test_cancel_exceptions(event, phase, exc, expected, escapes):
    log = Log(event, exc, phase)
    if escapes is None: run = run_logged(log)
    else:
        with pytest.raises(escapes, match=f'raised in {event}'): run = run_logged(log)
        run = None
    assert log.raised
    assert log.log == expected
    if run is not None:
        # what ran really ran, and nothing else: one forward per after_pred, one step per after_step
        assert run.counting.preds == expected.count('after_pred')
        assert run.counting.losses == expected.count('after_loss')
        assert run.counting.steps == expected.count('after_step')
        assert run.n_iter == sum(1 for i, e in enumerate(expected) if e == 'after_batch' and _in_train_at(expected, i))


def _in_train_at(events, i):
    "Whether the runner was training at position `i` of the event list: the last pass opened before it."
    opened = [e for e in events[:i] if e in ('begin_epoch', 'begin_validate')]
    return bool(opened) and opened[-1] == 'begin_epoch'


@pytest.mark.parametrize('error', [ValueError, KeyboardInterrupt])
def test_other_exceptions_run_after_batch_and_after_fit_then_propagate(error):
    log = Log('after_pred', error, True)
    with pytest.raises(error, match='raised in after_pred'): run_logged(log)
    assert log.log == ['begin_fit', 'begin_epoch', 'begin_batch', 'after_pred', 'after_batch', 'after_fit']


def test_error_in_the_model_propagates_unchanged():
    log = Log()
    learn = toy_learner()
    learn.model = nn.Linear(N_IN + 1, C)   # wrong input size
    with pytest.raises(RuntimeError, match='shapes cannot be multiplied'): Runner(cbs=log).fit(1, learn)
    assert log.log == ['begin_fit', 'begin_epoch', 'begin_batch', 'after_batch', 'after_fit']


def test_returning_true_from_begin_epoch_or_begin_validate_skips_the_pass_quietly():
    class SkipTraining(Callback):
        def begin_epoch(self): return True
    class SkipValidation(Callback):
        def begin_validate(self): return True
    for cb, expected in ((SkipTraining, ['begin_epoch', 'begin_validate', *VALID_PASS, 'after_epoch']),
                         (SkipValidation, ['begin_epoch', *TRAIN_PASS, 'begin_validate', 'after_epoch'])):
        log = Log()
        Runner(cbs=[log, cb()]).fit(1, toy_learner())
        assert log.log == ['begin_fit', *expected, 'after_fit']


def test_iters_is_set_before_the_pass_begins():
    seen = []
    class SeeIters(Callback):
        def begin_epoch(self): seen.append(self.iters)
        def begin_validate(self): seen.append(self.iters)
    Runner(cb_funcs=SeeIters).fit(1, toy_learner())
    assert seen == [3, 2]


def test_callbacks_run_in_order_and_are_found_by_name():
    calls = []
    def make(name, order):
        return type(name, (Callback,), {'_order': order, 'begin_fit': lambda self: calls.append(name)})
    A, B, Cc, D = make('A', 2), make('B', -1), make('Cc', 1), make('D', 1)
    class Spy(TrainEvalCallback):
        def begin_fit(self): calls.append('train_eval'); super().begin_fit()
    run = Runner(cbs=[A(), Cc()], cb_funcs=[B, D])
    run.cbs[0] = Spy()   # the TrainEvalCallback the runner made, order 0, first among equals
    run.fit(1, toy_learner())
    assert calls == ['B', 'train_eval', 'Cc', 'D', 'A']
    assert [type(cb) for cb in (run.a, run.b, run.cc, run.d)] == [A, B, Cc, D]


def test_callback_names_on_the_runner():
    run = Runner(cb_funcs=[partial(AvgStatsCallback, accuracy), Recorder, LR_Find, StopOnNanCallback,
                           partial(ProgressCallback, mode='off'), partial(ParamScheduler, 'lr', sched_lin(0.1, 0.2))])
    assert isinstance(run.train_eval, TrainEvalCallback)
    assert isinstance(run.avg_stats, AvgStatsCallback) and isinstance(run.recorder, Recorder)
    assert isinstance(run.lr_find, LR_Find) and isinstance(run.stop_on_nan, StopOnNanCallback)
    assert isinstance(run.progress, ProgressCallback) and isinstance(run.param_scheduler, ParamScheduler)


def test_callback_dispatch_and_debug_hook():
    class Two(Callback):
        def begin_fit(self): return True
        def after_fit(self): return None
    cb = Two()
    assert cb('begin_fit') is True and cb('after_fit') is False and cb('after_loss') is False


def test_one_callback_class_tree_without_multiple_inheritance():
    "05b defines its callbacks afresh, as the lesson does: single inheritance from 05b's own Callback."
    for cls in (TrainEvalCallback, AvgStatsCallback, Recorder, ParamScheduler, LR_Find, StopOnNanCallback, ProgressCallback):
        assert cls.__mro__[1:] == (Callback, object), cls
    assert Callback.__mro__ == (Callback, object) and not issubclass(Callback, nb_05.Callback)
    assert Runner is not nb_05.Runner and not issubclass(Recorder, nb_05.Recorder)


@pytest.mark.parametrize('start_in_train', [True, False])
def test_lr_find_puts_back_train_or_eval_mode_of_every_module(start_in_train):
    learn = toy_learner(lr=0.1)
    learn.model.train(start_in_train)
    learn.model[0].train(not start_in_train)   # a mixed model: one layer in the other mode
    modes = [m.training for m in learn.model.modules()]
    Runner(cb_funcs=partial(LR_Find, max_iter=3)).fit(2, learn)
    assert [m.training for m in learn.model.modules()] == modes


def test_rebased_callbacks_still_work():
    learn = toy_learner(lr=0.1)
    run = Runner(cb_funcs=[partial(AvgStatsCallback, accuracy, print_stats=False), Recorder,
                           partial(ParamScheduler, 'lr', sched_lin(0.1, 0.4))])
    run.fit(2, learn)
    assert run.avg_stats.valid_stats.count == 8 and run.avg_stats.train_stats.count == 6
    assert len(run.recorder.losses) == 6
    assert run.recorder.lrs[0] == pytest.approx([0.1, 0.15, 0.2, 0.25, 0.3, 0.35])


def test_avg_stats_print_stats(capsys):
    Runner(cb_funcs=partial(AvgStatsCallback, accuracy)).fit(1, toy_learner())
    assert capsys.readouterr().out.count('train:') == 1
    Runner(cb_funcs=partial(AvgStatsCallback, accuracy, print_stats=False)).fit(1, toy_learner())
    assert capsys.readouterr().out == ''

# --- LR_Find --------------------------------------------------------------------------------------

class LrSpy(Callback):
    "The lr of every parameter group at each optimizer step, and whether validation ran."
    _order = 5
    def begin_fit(self): self.lrs, self.valid_batches = [], 0
    def after_backward(self): self.lrs.append([pg['lr'] for pg in self.opt.param_groups])
    def after_batch(self):
        if not self.in_train: self.valid_batches += 1


def test_lr_find_schedule_and_stop_at_max_iter():
    learn = toy_learner()   # 3 batches an epoch: the search spans 5 epochs, with no validation
    run = Runner(cb_funcs=[partial(LR_Find, max_iter=12, min_lr=1e-6, max_lr=1e-4), LrSpy])
    run.fit(10, learn)
    lrf, spy = run.lr_find, run.lr_spy
    expected = [1e-6 * (1e-4 / 1e-6) ** (i / 12) for i in range(13)]
    assert [lrs[0] for lrs in spy.lrs] == pytest.approx(expected, rel=1e-12)
    assert lrf.lrs == pytest.approx(expected, rel=1e-12)
    assert len(lrf.losses) == 13 and run.n_iter == 13     # max_iter + 1 steps, the last at max_lr
    assert lrf.lrs[-1] == pytest.approx(1e-4)
    assert lrf.stop_reason == 'it reached max_lr'
    assert spy.valid_batches == 0
    assert all(isinstance(l, float) for l in lrf.losses)


def test_lr_find_sets_every_param_group():
    learn = toy_learner(toy_bunch(n_train=40))
    m = learn.model
    learn.opt = optim.SGD([{'params': m[0].parameters()}, {'params': m[2].parameters(), 'lr': 3.}], lr=1.)
    run = Runner(cb_funcs=[partial(LR_Find, max_iter=4, min_lr=1e-5, max_lr=1e-3), LrSpy])
    run.fit(1, learn)
    assert all(a == b for a, b in run.lr_spy.lrs)
    assert [pg['lr'] for pg in learn.opt.param_groups] == [1., 3.]


@pytest.mark.parametrize('bad,stop_at', [(25., 3), (float('nan'), 2), (float('inf'), 4)])
def test_lr_find_stops_early_on_a_diverging_loss(bad, stop_at):
    factors = [1., 1., 1., 1., 1.]
    factors[stop_at] = bad
    learn = toy_learner(toy_bunch(n_train=40), loss_func=scheduled_loss(factors))
    run = Runner(cb_funcs=[partial(LR_Find, max_iter=100, min_lr=1e-8, max_lr=1e-6), Counting])
    run.fit(1, learn)
    lrf = run.lr_find
    assert len(lrf.losses) == stop_at + 1 and run.n_iter == stop_at + 1
    assert lrf.stop_reason == 'the loss exploded'
    assert run.counting.steps == stop_at            # the exploded batch takes no step
    assert not math.isfinite(lrf.losses[-1]) or lrf.losses[-1] > 10 * min(lrf.losses[:-1])


def test_lr_find_does_not_stop_on_a_loss_below_ten_times_the_best():
    learn = toy_learner(toy_bunch(n_train=40), loss_func=scheduled_loss([1., 1., 5., 1.]))
    run = Runner(cb_funcs=partial(LR_Find, max_iter=6, min_lr=1e-8, max_lr=1e-6))
    run.fit(1, learn)
    assert len(run.lr_find.losses) == 7 and run.lr_find.stop_reason == 'it reached max_lr'


def test_lr_find_puts_weights_and_optimizer_back():
    learn = toy_learner(toy_bunch(n_train=40), lr=0.05, momentum=0.9)
    Runner().fit(1, learn)                          # momentum buffers now exist
    assert learn.opt.state_dict()['state']
    before = clone_state(learn)
    class Watch(Callback):                          # the search does change the weights as it goes
        _order = 5
        def after_step(self): self.moved = not torch.equal(self.model[0].weight, before[0]['0.weight'])
    run = Runner(cb_funcs=[partial(LR_Find, max_iter=10, min_lr=1e-3, max_lr=1.), Watch])
    run.fit(2, learn)
    assert run.watch.moved
    assert_same_state(learn, before)
    assert learn.opt.param_groups[0]['lr'] == 0.05 and learn.opt.param_groups[0]['momentum'] == 0.9
    assert {id(p) for p in learn.model.parameters()} == {id(q) for g in learn.opt.param_groups for q in g['params']}


def test_lr_find_without_momentum_state_leaves_no_state():
    learn = toy_learner(toy_bunch(n_train=40), momentum=0.9)   # no step yet: no momentum buffers
    before = clone_state(learn)
    Runner(cb_funcs=partial(LR_Find, max_iter=5)).fit(1, learn)
    assert learn.opt.state_dict()['state'] == {}
    assert_same_state(learn, before)


@pytest.mark.parametrize('error', [ValueError, KeyboardInterrupt])
def test_lr_find_restores_when_the_search_fails(error):
    learn = toy_learner(toy_bunch(n_train=40), momentum=0.9)
    Runner().fit(1, learn)
    before = clone_state(learn)
    class Boom(Callback):
        _order = 5
        def after_step(self):
            if self.n_iter == 3: raise error('boom')
    with pytest.raises(error, match='boom'):
        Runner(cb_funcs=[partial(LR_Find, max_iter=10, min_lr=1e-3, max_lr=1.), Boom]).fit(1, learn)
    assert_same_state(learn, before)


@pytest.mark.parametrize('kwargs', [dict(max_iter=0), dict(max_iter=-3), dict(max_iter=2.5), dict(min_lr=0),
                                    dict(min_lr=-1e-3), dict(min_lr=1., max_lr=1.), dict(min_lr=1., max_lr=0.1),
                                    dict(min_lr=float('nan')), dict(max_lr=float('nan'))])
def test_lr_find_validates_arguments(kwargs):
    with pytest.raises(ValueError, match='LR_Find'): LR_Find(**kwargs)


def test_lr_find_warns_when_the_data_runs_out():
    learn = toy_learner()   # 3 training batches an epoch
    with pytest.warns(UserWarning, match='data ran out after 6 of 101 steps'):
        Runner(cb_funcs=LR_Find).fit(2, learn)


def test_debiased_ewma():
    assert debiased_ewma([]) == []
    assert debiased_ewma([3., 3., 3.]) == pytest.approx([3., 3., 3.])
    # beta 0.5: raw averages 0.5, 1.25 -> divided by 0.5 and 0.75
    assert debiased_ewma([1., 2.], beta=0.5) == pytest.approx([1., 1.25 / 0.75])


def test_suggested_lr_and_plot():
    lrf = LR_Find()
    assert lrf.suggested_lr is None
    lrf.lrs = [10. ** (i / 10 - 3) for i in range(40)]
    # the loss falls until step 25, then rises; non-finite at the end
    lrf.losses = [3. - 0.1 * i for i in range(26)] + [0.5 + 0.4 * i for i in range(1, 13)] + [math.inf, math.nan]
    smooth = debiased_ewma(lrf.losses[:38], 0.9)
    assert lrf.smoothed_losses() == pytest.approx(smooth)
    i_min = smooth.index(min(smooth))
    assert 25 <= i_min < 30                     # smoothing lags the raw minimum a little
    assert lrf.suggested_lr == pytest.approx(lrf.lrs[i_min] / 10)
    plt.figure()
    lrf.plot(skip_last=2)
    ax = plt.gca()
    assert ax.get_xscale() == 'log'
    marks = [l for l in ax.get_lines() if 'suggested' in l.get_label()]
    assert len(marks) == 1 and marks[0].get_xdata()[0] == pytest.approx(lrf.suggested_lr)
    assert len(ax.get_lines()[0].get_xdata()) == 38
    plt.close('all')


def test_recorder_plot_is_loss_against_lr_on_a_log_axis():
    learn = toy_learner(toy_bunch(n_train=40))
    run = Runner(cb_funcs=[partial(LR_Find, max_iter=10), Recorder])
    run.fit(1, learn)
    assert run.recorder.lrs[-1] == run.lr_find.lrs
    plt.figure()
    run.recorder.plot(skip_last=2)
    line = plt.gca().get_lines()[0]
    assert plt.gca().get_xscale() == 'log'
    assert list(line.get_xdata()) == pytest.approx(run.lr_find.lrs[:-2])
    assert list(line.get_ydata()) == pytest.approx(run.lr_find.losses[:-2], rel=1e-6)
    plt.close('all')

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
    data.train_dl.sampler.shuffle = False     # slices: no index tensors copied to the GPU
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
    monkeypatch.setattr(nb_05b, 'in_notebook', lambda: False)
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
    monkeypatch.setattr(nb_05b, 'in_notebook', lambda: True)
    monkeypatch.setattr(sys, 'stderr', io.StringIO())
    assert progress_mode('auto') == 'notebook'
    monkeypatch.setattr(nb_05b.importlib.util, 'find_spec', lambda name: None)   # no ipywidgets
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


def test_returning_true_from_begin_batch_is_ignored():
    class ReturnsTrue(Callback):
        def begin_batch(self): return True
        def after_pred(self): return True
    log = Log()
    run = Runner(cbs=log, cb_funcs=[ReturnsTrue, Counting])
    run.fit(2, toy_learner())
    assert log.log == FIT and run.counting.steps == 6


def test_param_scheduler_names_the_optimizers_hyper_parameters():
    for pname in ('mom', 'lrr'):
        learn = toy_learner(momentum=0.9)
        with pytest.raises(ValueError, match=f"ParamScheduler\\('{pname}'\\): SGD has no hyper-parameter '{pname}'; its hyper-parameters are 'lr', 'momentum'"):
            Runner(cb_funcs=partial(ParamScheduler, pname, sched_lin(0.9, 0.5))).fit(1, learn)
        assert pname not in learn.opt.param_groups[0]


@pytest.mark.parametrize('offset', [-10., -2.])
def test_lr_find_works_for_negative_losses(offset):
    learn = toy_learner(toy_bunch(n_train=40), loss_func=lambda pred, yb: F.cross_entropy(pred, yb) + offset)
    run = Runner(cb_funcs=partial(LR_Find, max_iter=8, min_lr=1e-8, max_lr=1e-6))
    run.fit(1, learn)
    lrf = run.lr_find
    assert max(lrf.losses) < 0 and len(lrf.losses) == 9 and lrf.stop_reason == 'it reached max_lr'
    assert lrf.suggested_lr > 1e-9


def test_lr_find_a_first_loss_of_zero_does_not_explode():
    factors = [0., 1., 1., 1.]   # the first loss is 0, then positive
    learn = toy_learner(toy_bunch(n_train=40), loss_func=scheduled_loss(factors))
    run = Runner(cb_funcs=partial(LR_Find, max_iter=5, min_lr=1e-8, max_lr=1e-6))
    run.fit(1, learn)
    assert run.lr_find.losses[0] == 0 and len(run.lr_find.losses) == 6 and run.lr_find.stop_reason == 'it reached max_lr'


def test_lr_find_still_stops_on_a_loss_rising_far_above_a_negative_best():
    factors = [1., 1., 1., -30.]   # a loss shifted by -2: about -1, then far above it
    shifted = scheduled_loss(factors)
    learn = toy_learner(toy_bunch(n_train=40), loss_func=lambda pred, yb: -(shifted(pred, yb) - 2.))
    run = Runner(cb_funcs=partial(LR_Find, max_iter=100, min_lr=1e-8, max_lr=1e-6))
    run.fit(1, learn)
    assert run.lr_find.stop_reason == 'the loss exploded' and len(run.lr_find.losses) == 4


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
from exp.nb_05b import *
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
