"""Behaviour of every name exported by nb_05: the training loop lesson 10 starts from."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim, tensor

from exp.nb_05 import (AvgStats, AvgStatsCallback, Callback, DataBunch, DataLoader, Dataset, Learner,
                       ParamScheduler, Recorder, Runner, Sampler, TrainEvalCallback, accuracy, annealer,
                       camel2snake, collate, combine_scheds, cos_1cycle_anneal, create_learner, get_dls, get_model,
                       get_model_func, listify,
                       normalize, sched_cos, sched_exp, sched_lin, sched_no,
                       test_eq, test_near)


def toy_data(n_train=10, n_valid=7, n_in=4, c=3, seed=0):
    "A tiny classification problem with an uneven number of items."
    g = torch.Generator().manual_seed(seed)
    x_train, x_valid = torch.randn(n_train, n_in, generator=g), torch.randn(n_valid, n_in, generator=g)
    y_train, y_valid = torch.randint(0, c, (n_train,), generator=g), torch.randint(0, c, (n_valid,), generator=g)
    return Dataset(x_train, y_train), Dataset(x_valid, y_valid)


def toy_bunch(bs=4, **kw):
    train_ds, valid_ds = toy_data(**kw)
    return DataBunch(*get_dls(train_ds, valid_ds, bs), c=3)


class EventLog(Callback):
    "Records every event it sees, with whether the runner is training."
    events = ['begin_fit', 'begin_epoch', 'begin_batch', 'after_pred', 'after_loss', 'after_backward',
              'after_step', 'after_batch', 'begin_validate', 'after_epoch', 'after_fit']
    def __init__(self): self.log = []
    def __getattr__(self, k):
        if k in EventLog.events: return lambda: self.log.append(k)
        return super().__getattr__(k)


# --- statistics before any epoch ----------------------------------------------------------------

def test_avg_stats_repr_and_values_before_any_epoch():
    stats = AvgStats([accuracy], False)
    assert repr(stats) == 'valid: [nan, nan]' and all(math.isnan(o) for o in stats.avg_stats)
    assert stats.count == 0 and stats.all_stats == [0., 0.]


def test_normalize_and_accuracy():
    x = tensor([1., 3., 5.])
    test_eq(normalize(x, 3., 2.), tensor([-1., 0., 1.]))
    out = tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    test_near(accuracy(out, tensor([1, 0, 0, 0])), 0.75)


# --- data ----------------------------------------------------------------------------------------

def test_dataset_indexing_and_length_check():
    ds = Dataset(torch.arange(10).float(), torch.arange(10) * 2)
    assert len(ds) == 10
    x, y = ds[tensor([1, 3])]
    test_eq(x, tensor([1., 3.])); test_eq(y, tensor([2, 6]))
    with pytest.raises(ValueError, match='x has 3 items but y has 2'): Dataset(torch.zeros(3), torch.zeros(2))


def test_sampler_covers_everything_once():
    ds = Dataset(torch.arange(10), torch.arange(10))
    batches = [torch.arange(10)[i] for i in Sampler(ds, 4)]
    assert [b.tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(Sampler(ds, 4)) == 3
    torch.manual_seed(0)
    shuffled = torch.cat(list(Sampler(ds, 3, shuffle=True)))
    assert sorted(shuffled.tolist()) == list(range(10))
    assert shuffled.tolist() != list(range(10))
    with pytest.raises(ValueError, match='batch size'): Sampler(ds, 0)


def test_collate_stacks_items():
    xs, ys = collate([(tensor([1., 2.]), tensor(0)), (tensor([3., 4.]), tensor(1))])
    test_eq(xs, tensor([[1., 2.], [3., 4.]])); test_eq(ys, tensor([0, 1]))


def test_dataloader_batch_read_equals_item_by_item():
    class ItemByItem(Dataset):
        batch_indexable = False
        calls = 0
        def __getitem__(self, i):
            ItemByItem.calls += 1
            return super().__getitem__(i)
    x, y = torch.randn(10, 3), torch.arange(10)
    fast, slow = Dataset(x, y), ItemByItem(x, y)
    for shuffle in (False, True):
        torch.manual_seed(1); a = list(DataLoader(fast, Sampler(fast, 4, shuffle)))
        torch.manual_seed(1); b = list(DataLoader(slow, Sampler(slow, 4, shuffle)))
        assert len(a) == len(b) == 3
        for (xa, ya), (xb, yb) in zip(a, b): test_eq(xa, xb); test_eq(ya, yb)
    assert ItemByItem.calls == 20


def test_dataloader_reads_each_batch_with_one_index_operation():
    class CountingDataset(Dataset):
        reads = 0
        def __getitem__(self, i):
            CountingDataset.reads += 1
            return super().__getitem__(i)
    ds = CountingDataset(torch.randn(100, 3), torch.arange(100))
    dl = DataLoader(ds, Sampler(ds, 32, shuffle=True))
    assert len(dl) == 4 and len(list(dl)) == 4
    assert CountingDataset.reads == 4


def test_get_dls_and_databunch():
    train_ds, valid_ds = toy_data(n_train=10, n_valid=7)
    train_dl, valid_dl = get_dls(train_ds, valid_ds, 4)
    assert train_dl.sampler.shuffle and not valid_dl.sampler.shuffle
    assert [len(xb) for xb, _ in train_dl] == [4, 4, 2]
    assert [len(xb) for xb, _ in valid_dl] == [7]  # batch 8: twice the training batch
    data = DataBunch(train_dl, valid_dl, c=3)
    assert data.train_ds is train_ds and data.valid_ds is valid_ds and data.c == 3


def test_get_model_and_learner():
    data = toy_bunch()
    model, opt = get_model(data, lr=0.3, nh=5)
    assert [type(l) for l in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (model[0].in_features, model[0].out_features, model[2].out_features) == (4, 5, 3)
    assert isinstance(opt, optim.SGD) and opt.param_groups[0]['lr'] == 0.3
    learn = Learner(model, opt, F.cross_entropy, data)
    assert (learn.model, learn.opt, learn.loss_func, learn.data) == (model, opt, F.cross_entropy, data)


def test_create_learner_and_get_model_func_as_in_the_lesson():
    data = toy_bunch()
    learn = create_learner(get_model, F.cross_entropy, data)
    assert isinstance(learn.model, nn.Sequential) and learn.opt.param_groups[0]['lr'] == 0.5
    assert learn.loss_func is F.cross_entropy and learn.data is data
    learn = create_learner(get_model_func(0.3), F.cross_entropy, data)
    assert learn.opt.param_groups[0]['lr'] == 0.3 and learn.model[2].out_features == 3


# --- callbacks and the runner --------------------------------------------------------------------

def test_camel2snake_and_listify():
    assert camel2snake('AvgStatsCallback') == 'avg_stats_callback'
    assert camel2snake('TrainEvalCallback') == 'train_eval_callback'
    assert listify(None) == [] and listify([1]) == [1] and listify('ab') == ['ab']
    assert listify((1, 2)) == [1, 2] and listify(5) == [5] and listify(range(2)) == [0, 1]


def test_callback_name_and_fallthrough():
    class AvgStatsCallback2(Callback): pass
    class Recorder2(Callback): pass
    assert Recorder2().name == 'recorder2'
    assert TrainEvalCallback().name == 'train_eval'
    assert Callback().name == 'callback'
    cb = Recorder2()
    with pytest.raises(AttributeError, match='not attached'): cb.model
    class Fake: model = 'the model'
    cb.set_runner(Fake())
    assert cb.model == 'the model'


def test_runner_event_sequence_and_counters():
    data = toy_bunch(bs=4)  # 3 training batches (4, 4, 2), 1 validation batch (7)
    log = EventLog()
    run = Runner(cbs=log)
    run.fit(2, Learner(*get_model(data), F.cross_entropy, data))
    train_batch = ['begin_batch', 'after_pred', 'after_loss', 'after_backward', 'after_step', 'after_batch']
    valid_batch = ['begin_batch', 'after_pred', 'after_loss', 'after_batch']
    epoch = ['begin_epoch'] + train_batch * 3 + ['begin_validate'] + valid_batch + ['after_epoch']
    assert log.log == ['begin_fit'] + epoch * 2 + ['after_fit']
    assert run.n_iter == 6 and run.n_epochs == pytest.approx(2.0)
    assert run.event_log is log


def test_runner_orders_callbacks_and_names_them():
    calls = []
    class First(Callback):
        _order = -1
        def begin_fit(self): calls.append('first')
    class Last(Callback):
        _order = 5
        def begin_fit(self): calls.append('last')
    data = toy_bunch()
    run = Runner(cbs=[Last()], cb_funcs=[First])
    run.fit(1, Learner(*get_model(data), F.cross_entropy, data))
    assert calls == ['first', 'last']
    assert isinstance(run.first, First) and isinstance(run.last, Last)


def test_returning_true_from_begin_fit_skips_training_but_runs_after_fit():
    class Refuse(Callback):
        def begin_fit(self): return True
    data = toy_bunch()
    log = EventLog()
    run = Runner(cbs=[Refuse(), log])
    run.fit(1, Learner(*get_model(data), F.cross_entropy, data))
    assert log.log == ['begin_fit', 'after_fit'] and run.n_iter == 0


def test_run_stop_ends_the_epoch():
    class StopAt2(Callback):
        def after_batch(self):
            if self.in_train and self.n_iter == 2: self.run.stop = True
    data = toy_bunch(bs=2)  # 5 training batches
    run = Runner(cb_funcs=StopAt2)
    run.fit(2, Learner(*get_model(data), F.cross_entropy, data))
    assert run.n_iter == 2 + 5  # the first epoch stopped after 2 steps, the second ran in full


def test_train_eval_callback_switches_modes():
    seen = []
    class Watch(Callback):
        _order = 1
        def begin_batch(self): seen.append((self.in_train, self.model.training))
    data = toy_bunch(bs=4)
    run = Runner(cb_funcs=Watch)
    run.fit(1, Learner(*get_model(data), F.cross_entropy, data))
    assert seen == [(True, True)] * 3 + [(False, False)]


def test_training_reduces_loss():
    torch.manual_seed(0)
    x = torch.randn(200, 2)
    y = (x[:, 0] > 0).long()
    data = DataBunch(*get_dls(Dataset(x, y), Dataset(x, y), 20), c=2)
    run = Runner(cb_funcs=partial(AvgStatsCallback, accuracy))
    run.fit(5, Learner(*get_model(data, lr=0.5, nh=8), F.cross_entropy, data))
    assert run.avg_stats.valid_stats.avg_stats[1] > 0.95


# --- statistics ----------------------------------------------------------------------------------

def test_avg_stats_weighted_by_batch_size_with_uneven_batches():
    data = toy_bunch(bs=4, n_train=10, n_valid=7)
    torch.manual_seed(0)
    model, opt = get_model(data, lr=0.0)  # lr 0: the model does not change, so we can recompute
    run = Runner(cb_funcs=partial(AvgStatsCallback, accuracy))
    run.fit(1, Learner(model, opt, F.cross_entropy, data))
    ds = data.train_ds
    with torch.no_grad():
        pred = model(ds.x)
        loss, acc = F.cross_entropy(pred, ds.y).item(), accuracy(pred, ds.y).item()
    train = run.avg_stats.train_stats
    assert train.count == 10
    assert train.avg_stats[0] == pytest.approx(loss, rel=1e-5)
    assert train.avg_stats[1] == pytest.approx(acc, rel=1e-5)
    valid = run.avg_stats.valid_stats
    vds = data.valid_ds
    assert valid.count == 7
    assert valid.avg_stats[1] == pytest.approx(accuracy(model(vds.x), vds.y).item(), rel=1e-5)


def test_avg_stats_uneven_batches_differ_from_mean_of_means():
    class B: pass
    stats = AvgStats([accuracy], in_train=False); stats.reset()
    # batch of 3, all right; batch of 1, wrong: item-weighted accuracy is 3/4, mean of means 1/2
    for pred, y in [(tensor([[1., 0.]] * 3), tensor([0, 0, 0])), (tensor([[1., 0.]]), tensor([1]))]:
        b = B(); b.xb, b.yb, b.pred = pred, y, pred; b.loss = F.cross_entropy(pred, y)
        stats.accumulate(b)
    assert stats.count == 4
    assert stats.avg_stats[1] == pytest.approx(0.75)
    assert 'valid' in repr(stats)
    empty = AvgStats([accuracy], True); empty.reset()
    assert all(math.isnan(v) for v in empty.avg_stats)


def test_avg_stats_callback_prints_each_epoch(capsys):
    data = toy_bunch()
    run = Runner(cb_funcs=partial(AvgStatsCallback, [accuracy]))
    run.fit(2, Learner(*get_model(data), F.cross_entropy, data))
    out = capsys.readouterr().out.splitlines()
    assert [l.split(':')[0] for l in out] == ['train', 'valid', 'train', 'valid']


# --- schedules -----------------------------------------------------------------------------------

def test_annealers():
    assert sched_lin(1, 3)(0.5) == pytest.approx(2)
    assert sched_cos(1, 3)(0.) == pytest.approx(1) and sched_cos(1, 3)(1.) == pytest.approx(3)
    assert sched_cos(1, 3)(0.5) == pytest.approx(2)
    assert sched_no(1, 3)(0.7) == 1
    assert sched_exp(1, 100)(0.5) == pytest.approx(10)
    @annealer
    def sched_sq(start, end, pos): return start + pos ** 2 * (end - start)
    assert sched_sq(0, 4)(0.5) == pytest.approx(1)
    up, down = cos_1cycle_anneal(0.1, 1.0, 0.01)
    assert up(0) == pytest.approx(0.1) and up(1) == pytest.approx(1.0) and down(1) == pytest.approx(0.01)


def test_combine_scheds_values_and_edges():
    sched = combine_scheds([0.3, 0.7], [sched_lin(0, 1), sched_lin(1, 0)])
    assert sched(0.) == pytest.approx(0)
    assert sched(0.15) == pytest.approx(0.5)
    assert sched(0.3) == pytest.approx(1)
    assert sched(0.65) == pytest.approx(0.5)
    assert sched(1.) == pytest.approx(0)  # the lesson's version indexed past the end here


@pytest.mark.parametrize('pcts,n,msg', [([0.3, 0.6], 2, 'sum to 1'), ([0.5, 0.5], 3, '2 percentages but 3'),
                                        ([1.2, -0.2], 2, 'positive')])
def test_combine_scheds_rejects_bad_percentages(pcts, n, msg):
    with pytest.raises(ValueError, match=msg): combine_scheds(pcts, [sched_no(1, 1)] * n)


# --- recorder and param scheduler ----------------------------------------------------------------

def test_recorder_and_param_scheduler_follow_the_schedule():
    data = toy_bunch(bs=2)  # 5 training steps per epoch
    sched = sched_lin(1.0, 0.0)
    run = Runner(cb_funcs=[Recorder, partial(ParamScheduler, 'lr', sched)])
    run.fit(2, Learner(*get_model(data), F.cross_entropy, data))
    expected = [sched(i / 10) for i in range(10)]
    assert run.recorder.lrs[0] == pytest.approx(expected)
    assert len(run.recorder.losses) == 10
    assert run.recorder.loss_values().shape == (10,)


def test_param_scheduler_one_schedule_per_group_and_mismatch():
    data = toy_bunch(bs=5)
    model, _ = get_model(data)
    opt = optim.SGD([{'params': model[0].parameters()}, {'params': model[2].parameters()}], lr=0.1)
    run = Runner(cb_funcs=[Recorder, partial(ParamScheduler, 'lr', [sched_no(0.01, 0), sched_no(0.2, 0)])])
    run.fit(1, Learner(model, opt, F.cross_entropy, data))
    assert run.recorder.lrs == [[0.01, 0.01], [0.2, 0.2]]
    bad = Runner(cb_funcs=partial(ParamScheduler, 'lr', [sched_no(0.1, 0)] * 3))
    with pytest.raises(ValueError, match='3 schedules for 2 parameter groups'):
        bad.fit(1, Learner(model, opt, F.cross_entropy, data))


def test_recorder_plots(monkeypatch):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    data = toy_bunch(bs=2)
    run = Runner(cb_funcs=[Recorder, partial(ParamScheduler, 'lr', sched_exp(1e-3, 1.0))])
    run.fit(1, Learner(*get_model(data), F.cross_entropy, data))
    plt.figure(); run.recorder.plot_lr()
    assert list(plt.gca().lines[0].get_ydata()) == run.recorder.lrs[-1]
    plt.figure(); run.recorder.plot_loss(skip_last=1)
    assert len(plt.gca().lines[0].get_ydata()) == 4
    plt.figure(); run.recorder.plot(skip_last=2)
    assert plt.gca().get_xscale() == 'log' and len(plt.gca().lines[0].get_xdata()) == 3
    plt.close('all')


# --- the runner fails clearly (under the hood of notebook 05) ------------------------------------

def toy_learner(bs=4):
    data = toy_bunch(bs=bs)
    return Learner(*get_model(data), F.cross_entropy, data)


def test_returning_true_from_begin_batch_skips_the_batch_as_in_lesson_9():
    class SkipOdd(Callback):
        def begin_batch(self): return self.in_train and self.run.n_batch % 2 == 1
    class CountBatches(Callback):
        _order = -1
        def begin_fit(self): self.run.n_batch = 0
        def after_batch(self): self.run.n_batch += 1
    log = EventLog()
    run = Runner(cbs=log, cb_funcs=[CountBatches, SkipOdd])
    run.fit(1, toy_learner())   # 3 training batches: the second is skipped
    train = log.log[log.log.index('begin_epoch') + 1:log.log.index('begin_validate')]
    full = ['begin_batch', 'after_pred', 'after_loss', 'after_backward', 'after_step', 'after_batch']
    assert train == full + ['begin_batch', 'after_batch'] + full
    assert run.n_iter == 3   # TrainEvalCallback still counts it in after_batch


def test_runner_refuses_swapped_callback_arguments():
    with pytest.raises(TypeError, match=r"cbs= takes callback objects, got the class Recorder: pass Recorder\(\) in cbs=, or Recorder in cb_funcs="):
        Runner(cbs=Recorder)
    with pytest.raises(TypeError, match=r"cb_funcs= takes classes or functions that make a callback, got a Recorder object: pass it in cbs="):
        Runner(cb_funcs=[Recorder()])
    run = Runner(cbs=[Recorder()], cb_funcs=[partial(AvgStatsCallback, accuracy)])   # the right way round
    assert isinstance(run.recorder, Recorder) and isinstance(run.avg_stats, AvgStatsCallback)


@pytest.mark.parametrize('cls_name,attr', [('DataCallback', 'data'), ('Fit', 'fit'), ('StopCallback', 'stop'),
                                           ('Model', 'model'), ('NIter', 'n_iter'), ('Cbs', 'cbs')])
def test_runner_refuses_callback_names_it_uses(cls_name, attr):
    cls = type(cls_name, (Callback,), {})
    with pytest.raises(ValueError, match=f"{cls_name} would be reachable as run.{attr}, but run.{attr} is the runner's own; rename"):
        Runner(cb_funcs=cls)
    with pytest.raises(ValueError, match=f"run.{attr}"): Runner(cbs=cls())


def test_fit_zero_and_negative_epochs(capsys):
    log = EventLog()
    run = Runner(cbs=log)
    run.fit(0, toy_learner())
    assert log.log == [] and capsys.readouterr() == ('', '')
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match=f'epochs must be a whole number >= 0, got {bad}'): run.fit(bad, toy_learner())
    assert log.log == []


def test_every_after_fit_runs_and_the_first_error_is_raised():
    ran = []
    class FailsToBegin(Callback):
        _order = -1
        def begin_fit(self): raise RuntimeError('begin_fit failed')
    class NeedsBeginFit(Callback):   # its after_fit reads what its begin_fit set: fails when that never ran
        def begin_fit(self): self.started = True
        def after_fit(self):
            ran.append('needs')
            assert self.started
    class BadCleanup(Callback):
        _order = 1
        def after_fit(self):
            ran.append('bad')
            raise KeyError('cleanup')
    class Last(Callback):
        _order = 2
        def after_fit(self): ran.append('last')
    run = Runner(cb_funcs=[FailsToBegin, NeedsBeginFit, BadCleanup, Last])
    with pytest.raises(RuntimeError, match='begin_fit failed') as e: run.fit(1, toy_learner())
    assert ran == ['needs', 'bad', 'last'] and run.learn is None
    notes = e.value.__notes__
    assert len(notes) == 2 and 'NeedsBeginFit.after_fit failed too: AttributeError' in notes[0]
    assert notes[1] == "then BadCleanup.after_fit failed too: KeyError: 'cleanup'"
    # a failure only in after_fit: that one is raised, the others still run
    ran.clear()
    run = Runner(cb_funcs=[BadCleanup, Last])
    with pytest.raises(KeyError, match='cleanup'): run.fit(1, toy_learner())
    assert ran == ['bad', 'last'] and run.learn is None


def test_param_scheduler_names_the_optimizers_hyper_parameters():
    data = toy_bunch()
    model, _ = get_model(data)
    for pname in ('mom', 'lrr'):
        opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        run = Runner(cb_funcs=partial(ParamScheduler, pname, sched_no(0.5, 0.5)))
        with pytest.raises(ValueError, match=f"ParamScheduler\\('{pname}'\\): SGD has no hyper-parameter '{pname}'; its hyper-parameters are 'lr', 'momentum'"):
            run.fit(1, Learner(model, opt, F.cross_entropy, data))
        assert pname not in opt.param_groups[0] and opt.param_groups[0]['lr'] == 0.1
    run = Runner(cb_funcs=[partial(ParamScheduler, 'momentum', sched_lin(0.9, 0.5))])
    run.fit(1, Learner(model, opt, F.cross_entropy, data))
    assert opt.param_groups[0]['momentum'] == pytest.approx(sched_lin(0.9, 0.5)(2 / 3))


@pytest.mark.parametrize('pcts', [[math.nan, 1.], [0.5, math.nan], [math.inf, -math.inf]])
def test_combine_scheds_refuses_nan_percentages(pcts):
    with pytest.raises(ValueError, match='percentages must be positive and sum to 1'): combine_scheds(pcts, [sched_no(1, 1)] * 2)


@pytest.mark.parametrize('start,end', [(1., -0.01), (-1., 1.), (0., 1.), (1., 0.), (math.nan, 1.)])
def test_sched_exp_refuses_non_positive_ends(start, end):
    with pytest.raises(ValueError, match='sched_exp: start and end must be positive numbers'): sched_exp(start, end)


def test_avg_stats_and_recorder_read_no_tensor_value_while_training(monkeypatch):
    "Reading a tensor's value waits for a GPU: the statistics and the recorder keep tensors until the epoch ends."
    bunch = toy_bunch()
    bunch.train_dl.sampler.shuffle = False        # no randperm: the data loader reads no tensor values
    learn = Learner(*get_model(bunch, lr=0.1, nh=5), F.cross_entropy, bunch)
    run = Runner(cb_funcs=[partial(AvgStatsCallback, accuracy), Recorder,
                           partial(ParamScheduler, 'lr', sched_lin(0.1, 0.01))])
    for name in ('__bool__', 'item', '__float__', '__int__', '__index__', 'tolist'):
        def guarded(self, *args, _original=getattr(torch.Tensor, name), _name=name):
            if run.in_train: raise AssertionError(f'a tensor value was read ({_name}) during a training step')
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, guarded)
    run.fit(2, learn)
    monkeypatch.undo()
    assert len(run.recorder.losses) == 6 and all(torch.is_tensor(l) for l in run.recorder.losses)
    assert run.avg_stats.train_stats.count == 10


# --- the notebook's own cells ------------------------------------------------------------------

def notebook_cell(cell_id, nb='nbs/05_training_loop.ipynb'):
    "The source of the cell with id `cell_id` in notebook `nb` (relative to the repository)."
    import json, pathlib
    cells = json.loads((pathlib.Path(__file__).parent.parent / nb).read_text())['cells']
    return ''.join(next(c['source'] for c in cells if c['id'] == cell_id))


def test_the_tensor_sums_cell_inspects_its_own_fits_avg_stats(capsys):
    "Under the hood, 'Statistics that do not wait for the GPU' fits with AvgStatsCallback and reads that fit's sums."
    ns = {}
    exec('from exp.nb_05 import *', ns)
    g = torch.Generator().manual_seed(0)
    ns.update(small_ds=Dataset(torch.randn(10, 784, generator=g), torch.randint(0, 10, (10,), generator=g)),
              c=10, loss_func=F.cross_entropy)   # what the notebook's earlier cells bound; no `stats` of cell 28
    exec(notebook_cell('e5704555'), ns)
    out = capsys.readouterr().out
    assert "sums Tensor ['Tensor']" in out and 'a loss the Recorder kept: Tensor' in out
    assert 'train:' in out and 'valid:' in out        # AvgStatsCallback printed the epoch
    stats = ns['train_stats']
    assert stats is ns['run'].avg_stats.train_stats and stats.count == 10
    # what the prose promises: the sums (all_stats) are printed, and the averages are those sums over the count
    assert f'sums (all_stats) {[round(o, 4) for o in stats.all_stats]} over 10 items' in out
    assert f'averages (avg_stats) {[round(o, 4) for o in stats.avg_stats]}' in out
    assert stats.all_stats[0] == pytest.approx(10 * stats.avg_stats[0])
