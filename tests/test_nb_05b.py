"""Behaviour of nb_05b, the lesson's code: exceptions as control flow, the new Callback / Runner, the callbacks
of notebook 05 on it, LR_Find and the lesson's StopOnNanCallback. The engineering (05c) is tested in test_nb_05c.py."""
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
                        Recorder, Runner, StopOnNanCallback, TrainEvalCallback, accuracy,
                        debiased_ewma, get_dls, sched_lin)

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
                           partial(ParamScheduler, 'lr', sched_lin(0.1, 0.2))])
    assert isinstance(run.train_eval, TrainEvalCallback)
    assert isinstance(run.avg_stats, AvgStatsCallback) and isinstance(run.recorder, Recorder)
    assert isinstance(run.lr_find, LR_Find) and isinstance(run.stop_on_nan, StopOnNanCallback)
    assert isinstance(run.param_scheduler, ParamScheduler)


def test_callback_dispatch_and_debug_hook():
    class Two(Callback):
        def begin_fit(self): return True
        def after_fit(self): return None
    cb = Two()
    assert cb('begin_fit') is True and cb('after_fit') is False and cb('after_loss') is False


def test_one_callback_class_tree_without_multiple_inheritance():
    "05b defines its callbacks afresh, as the lesson does: single inheritance from 05b's own Callback."
    for cls in (TrainEvalCallback, AvgStatsCallback, Recorder, ParamScheduler, LR_Find, StopOnNanCallback):
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

def test_returning_true_from_begin_batch_is_ignored():
    class ReturnsTrue(Callback):
        def begin_batch(self): return True
        def after_pred(self): return True
    log = Log()
    run = Runner(cbs=log, cb_funcs=[ReturnsTrue, Counting])
    run.fit(2, toy_learner())
    assert log.log == FIT and run.counting.steps == 6


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


# --- the lesson's StopOnNanCallback, and the dispatch -------------------------------------------------

@pytest.mark.parametrize('bad', [float('nan'), float('inf')])
def test_lesson_stop_on_nan_stops_before_the_first_bad_step(bad):
    factors = [1.] * 10
    factors[4] = bad    # epoch 1 (3 steps an epoch), iteration 4
    learn = toy_learner(loss_func=scheduled_loss(factors))
    log = Log()
    run = Runner(cbs=log, cb_funcs=[StopOnNanCallback, Counting])
    run.fit(3, learn)
    assert log.log[-5:] == ['after_pred', 'after_loss', 'after_batch', 'after_cancel_train', 'after_fit']
    assert run.counting.steps == 4 and run.n_iter == 5
    assert all(bool(p.isfinite().all()) for p in learn.model.parameters())


def test_callbacks_are_sorted_once_per_fit_and_events_they_lack_are_not_looked_up_on_the_runner(monkeypatch):
    class Late(Callback):
        _order = 3
        def begin_fit(self): seen.append('late')
    class Early(Callback):
        _order = -3
        def begin_fit(self): seen.append('early')
    seen, run = [], Runner(cb_funcs=[Late, Early])
    sorts = []
    monkeypatch.setattr(nb_05b, 'sorted', lambda *a, **k: sorts.append(1) or sorted(*a, **k), raising=False)
    run.fit(1, toy_learner())
    assert seen == ['early', 'late'] and [type(cb) for cb in run.cbs] == [Early, TrainEvalCallback, Late]
    assert sorts == []                     # no sorting per event
    looked_up = []
    class Spy(Runner):
        def __getattr__(self, k): looked_up.append(k); raise AttributeError(k)
    spy = Spy(cb_funcs=Late)
    spy.fit(1, toy_learner())
    assert not [k for k in looked_up if k.startswith(('begin_', 'after_'))]
