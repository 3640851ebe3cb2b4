"""Behaviour of nb_06, the lesson's module: device and batch-transform callbacks, the CNN, the lesson's hooks and
telemetry (lists and `histc`), init, GeneralRelu. The improved telemetry of 06b is tested in test_nb_06b.py."""
import gc
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exp.nb_06 import (ActivationStatsCallback, AvgStatsCallback, BatchTransformXCallback, CancelTrainException,
                       Callback, CudaCallback, DataBunch, Dataset, DeviceCallback, GeneralRelu, Hook, Hooks,
                       Lambda, ListContainer, Recorder, StopOnNanCallback, accuracy, append_hist, append_stats,
                       append_stats_and_hist, children, conv2d, conv_layer, default_device, flatten, get_cnn_layers,
                       get_cnn_model, get_dls, get_hist, get_learn_run, get_min, get_runner, init_cnn, mnist_resize,
                       mnist_view, normalize_to, plot_hists, plot_hooks_stats, plot_mins, view_tfm)

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU; this machine has none')
NFS = [4, 8]


def image_bunch(n_train=40, n_valid=20, bs=8, seed=0):
    "MNIST-shaped random data: vectors of 784 values, 10 classes."
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_valid, 784, generator=g)
    y = torch.randint(0, 10, (n_train + n_valid,), generator=g)
    return DataBunch(*get_dls(Dataset(x[:n_train], y[:n_train]), Dataset(x[n_train:], y[n_train:]), bs), c=10)


def forward_hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def cbfs(): return [Recorder, partial(AvgStatsCallback, accuracy), DeviceCallback, partial(BatchTransformXCallback, mnist_view)]


@pytest.fixture
def plt_agg():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    yield plt
    plt.close('all')


# --- small pieces --------------------------------------------------------------------------------

def test_normalize_to_uses_training_statistics():
    train, valid = torch.tensor([1., 2., 3., 4.]), torch.tensor([2.5, 6.5])
    tn, vn = normalize_to(train, valid)
    assert tn.mean().abs() < 1e-6 and torch.isclose(tn.std(), torch.tensor(1.))
    m, s = train.mean(), train.std()
    assert torch.allclose(vn, (valid - m) / s)


def test_lambda_flatten_resize_and_view_tfm():
    x = torch.arange(2 * 784.).view(2, 784)
    assert mnist_resize(x).shape == (2, 1, 28, 28)
    assert torch.equal(mnist_view(x), mnist_resize(x))
    assert flatten(torch.zeros(3, 2, 5, 5)).shape == (3, 50)
    assert Lambda(flatten)(torch.zeros(3, 2, 2)).shape == (3, 4)
    assert view_tfm(2, 2)(torch.zeros(3, 8)).shape == (6, 2, 2)


def test_cnn_model_shapes():
    data = image_bunch()
    layers = get_cnn_layers(data, [8, 16, 32, 32], conv2d)
    convs = [l[0] for l in layers[:4]]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (1, 8, 5, 2), (8, 16, 3, 2), (16, 32, 3, 2), (32, 32, 3, 2)]
    model = get_cnn_model(data, [8, 16, 32, 32], conv_layer, leak=0.1)
    assert isinstance(model[0][1], GeneralRelu) and model[0][1].leak == 0.1
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


# --- GeneralRelu ---------------------------------------------------------------------------------

@pytest.mark.parametrize('leak,sub,maxv', [(None, None, None), (0.1, None, None), (None, 0.4, None),
                                           (None, None, 6.), (0.1, 0.4, 6.), (0.2, 0.5, None)])
def test_general_relu_equals_its_definition(leak, sub, maxv):
    x = torch.randn(1000) * 5
    expected = F.leaky_relu(x, leak) if leak is not None else F.relu(x)
    if sub is not None: expected = expected - sub
    if maxv is not None: expected = expected.clamp(max=maxv)
    assert torch.equal(GeneralRelu(leak, sub, maxv)(x), expected)


def test_general_relu_keeps_its_input_and_backpropagates():
    x = torch.randn(100, requires_grad=True)
    y = x * 2  # a non-leaf tensor autograd needs for the backward of the product
    before = y.detach().clone()
    out = GeneralRelu(leak=0.1, sub=0.4, maxv=1.)(y)
    assert torch.equal(y.detach(), before)
    out.sum().backward()
    slope = torch.where(y.detach() > 0, 1., 0.1) * (out.detach() < 1.)
    assert torch.allclose(x.grad, 2 * slope)


# --- init ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('uniform', [False, True])
def test_init_cnn_gives_kaiming_std_and_zero_bias(uniform):
    data = image_bunch()
    torch.manual_seed(0)
    model = get_cnn_model(data, [32, 64, 64], conv_layer)
    init_cnn(model, uniform=uniform)
    for l in model[:3]:
        conv = l[0]
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        expected = math.sqrt(2 / (1 + 0.1 ** 2)) / math.sqrt(fan_in)
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
        assert torch.count_nonzero(conv.bias) == 0


# --- hooks ---------------------------------------------------------------------------------------

def test_append_stats_values_on_a_known_input():
    lin = nn.Identity()
    h = Hook(lin, append_stats)
    x = torch.tensor([[-1., 0.5, 2., 9.5, 20.]])
    lin(x)
    ms, ss = h.stats   # the lesson's unpacking: lists of means and standard deviations, one per step
    assert ms == [x.mean()] and ss == [x.std()]
    lin.eval(); lin(x)  # not recorded outside training
    assert len(h.stats[0]) == 1
    h.remove()


def test_hooks_are_removed_after_with_block_and_after_exception():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    with Hooks(model, append_stats) as hooks:
        assert forward_hook_count(model) == 3
        model(torch.randn(4, 3))
        assert all(len(h.stats[0]) == 1 for h in hooks)
    assert forward_hook_count(model) == 0
    with pytest.raises(ZeroDivisionError):
        with Hooks(model, append_stats):
            assert forward_hook_count(model) == 3
            1 / 0
    assert forward_hook_count(model) == 0


def test_hooks_delitem_and_del_remove_hooks():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    hooks = Hooks(model, append_stats)
    del hooks[0]
    assert len(model[0]._forward_hooks) == 0 and len(model[2]._forward_hooks) == 1 and len(hooks) == 2
    del hooks
    gc.collect()
    assert forward_hook_count(model) == 0


def test_list_container_indexing():
    lc = ListContainer(list('abcdef'))
    assert lc[1] == 'b' and lc[1:3] == ['b', 'c'] and lc[[0, 5]] == ['a', 'f']
    assert lc[[True, False, True, False, False, True]] == ['a', 'c', 'f']
    assert lc[torch.tensor([True, False, True, False, False, True])] == ['a', 'c', 'f']
    assert lc[torch.tensor([2, 3])] == ['c', 'd']
    assert len(lc) == 6 and list(lc) == list('abcdef')
    lc[0] = 'z'; del lc[1]
    assert list(lc) == list('zcdef')
    with pytest.raises(IndexError, match='boolean mask of length 2 for a ListContainer of 5 items'): lc[[True, False]]
    assert repr(ListContainer(range(3))) == 'ListContainer (3 items)\n[0, 1, 2]'
    assert repr(ListContainer(range(20))).endswith('...]')


def test_children():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    assert children(model) == [model[0], model[1]]


def test_get_runner_includes_nan_guard_and_accepts_instances():
    data = image_bunch()
    model = get_cnn_model(data, NFS, conv2d)
    rec = Recorder()
    learn, run = get_runner(model, data, lr=0.3, cbs=[rec, partial(AvgStatsCallback, accuracy)])
    assert run.recorder is rec and isinstance(run.stop_on_nan, StopOnNanCallback)
    assert learn.opt.param_groups[0]['lr'] == 0.3 and learn.loss_func is F.cross_entropy
    _, run = get_runner(model, data, stop_on_nan=False)
    assert not any(isinstance(cb, StopOnNanCallback) for cb in run.cbs)


def test_get_learn_run_trains_a_cnn():
    torch.manual_seed(0)
    x = torch.zeros(200, 784); y = torch.arange(200) % 2
    x[y == 1, :392] = 1.  # class 1: the top half of the image is bright
    data = DataBunch(*get_dls(Dataset(x[:160], y[:160]), Dataset(x[160:], y[160:]), 16), c=2)
    learn, run = get_learn_run(NFS, data, 0.3, conv_layer, cbs=cbfs(), leak=0.1, sub=0.4, maxv=6.)
    run.fit(3, learn)
    assert run.avg_stats.valid_stats.avg_stats[1] == 1.0


def test_device_callback_moves_model_and_batches_to_the_cpu():
    data = image_bunch()
    seen = []
    class Watch(Callback):
        _order = 3
        def begin_batch(self): seen.append((self.xb.device, self.yb.device, self.xb.shape[1:]))
    model = get_cnn_model(data, NFS, conv2d)
    learn, run = get_runner(model, data, cbs=[partial(DeviceCallback, 'cpu'), partial(BatchTransformXCallback, mnist_view), Watch])
    run.fit(1, learn)
    assert isinstance(run.device, DeviceCallback) and run.device.device == torch.device('cpu')
    assert all(d1.type == 'cpu' and d2.type == 'cpu' and s == (1, 28, 28) for d1, d2, s in seen) and len(seen) == 5 + 2
    assert DeviceCallback().device == default_device()


def test_cuda_callback_without_gpu_warns_each_time_and_trains_on_the_cpu(monkeypatch):
    "Re-running a notebook cell that makes one says it again (the warning was remembered on the class)."
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    import warnings
    for _ in range(2):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter('always')   # as a notebook cell that shows what it says
            cb = CudaCallback()
        assert [str(w.message) for w in said if 'CudaCallback' in str(w.message)] == [
            'CudaCallback: this machine has no CUDA device, so training runs on the CPU']
        assert cb.device == torch.device('cpu')
    data = image_bunch()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn, run = get_runner(get_cnn_model(data, NFS, conv2d), data, cbs=[CudaCallback, partial(BatchTransformXCallback, mnist_view)])
    run.fit(1, learn)
    assert next(learn.model.parameters()).device.type == 'cpu'


@cuda_only
def test_device_callback_moves_model_and_batches_to_cuda():
    data = image_bunch()
    seen = []
    class Watch(Callback):
        _order = 3
        def begin_batch(self): seen.append(self.xb.device.type)
    model = get_cnn_model(data, NFS, conv2d)
    learn, run = get_runner(model, data, cbs=[CudaCallback, partial(BatchTransformXCallback, mnist_view), Watch])
    run.fit(1, learn)
    assert next(model.parameters()).device.type == 'cuda' and set(seen) == {'cuda'}


# --- telemetry callback --------------------------------------------------------------------------

# The telemetry callback's fits (records, leaves no hooks after 20 fits, a cancel or an error) are tested on this
# module's ActivationStatsCallback and on 06b's, by the same tests, in tests/test_nb_06b.py.


def test_init_cnn_reaches_nested_convolutions_without_bias():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.ReLU(), nn.BatchNorm2d(4)),
                          nn.Sequential(nn.Sequential(nn.Conv2d(4, 8, 3)), nn.ReLU()))
    nn.init.constant_(model[1][0][0].bias, 1.)
    torch.manual_seed(0)
    init_cnn(model)
    inner = model[1][0][0]
    fan_in = 4 * 9
    assert inner.weight.std().item() == pytest.approx(math.sqrt(2 / 1.01) / math.sqrt(fan_in), rel=0.15)
    assert torch.count_nonzero(inner.bias) == 0


def test_get_learn_run_takes_an_init_function():
    data = image_bunch()
    calls = []
    learn, run = get_learn_run(NFS, data, 0.1, conv_layer, init=lambda m: calls.append(m) or nn.init.zeros_(m[0][0].weight))
    assert calls == [learn.model] and torch.count_nonzero(learn.model[0][0].weight) == 0


def test_get_runner_takes_callbacks_made_and_to_make():
    data = image_bunch()
    made = Recorder()
    learn, run = get_runner(get_cnn_model(data, NFS, conv2d), data,
                            cbs=[made, partial(BatchTransformXCallback, mnist_view), AvgStatsCallback([accuracy])])
    assert run.recorder is made and isinstance(run.batch_transform_x, BatchTransformXCallback)
    assert isinstance(run.avg_stats, AvgStatsCallback) and isinstance(run.stop_on_nan, StopOnNanCallback)


def test_device_callback_refuses_the_meta_device():
    with pytest.raises(ValueError, match="DeviceCallback\\('meta'\\).*wipe its weights.*'cpu' or 'cuda'"):
        DeviceCallback('meta')
    data = image_bunch()
    model = get_cnn_model(data, NFS, conv2d)
    weights = model[0][0].weight.detach().clone()
    with pytest.raises(ValueError, match='meta'): get_runner(model, data, cbs=[partial(DeviceCallback, 'meta')])
    assert model[0][0].weight.device.type == 'cpu' and torch.equal(model[0][0].weight, weights)


def test_a_fit_that_fails_leaves_no_telemetry_hook():
    "Another callback's after_fit that fails first must not leave the telemetry hooks registered."
    data = image_bunch()
    class AfterFitFails(Callback):
        def after_fit(self): raise RuntimeError('after_fit failed')
    class BeginFitFails(Callback):
        _order = 2
        def begin_fit(self): raise ValueError('begin_fit failed')
    class StepFails(Callback):
        def after_step(self): raise ValueError('after_step failed')
    for failing in (BeginFitFails, StepFails):
        model = get_cnn_model(data, NFS, conv_layer)
        learn, run = get_runner(model, data, cbs=cbfs() + [AfterFitFails, ActivationStatsCallback, failing])
        with pytest.raises((ValueError, RuntimeError)): run.fit(1, learn)
        assert forward_hook_count(model) == 0


def test_default_device_picks_cuda_then_mps_then_the_cpu(monkeypatch):
    for cuda, mps, expected in [(True, True, 'cuda'), (True, False, 'cuda'), (False, True, 'mps'), (False, False, 'cpu')]:
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: mps)
        assert default_device() == torch.device(expected)
        assert DeviceCallback().device == torch.device(expected)
    import warnings
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)
    with warnings.catch_warnings(record=True) as said:   # a Mac: CudaCallback says so, and trains on its GPU
        warnings.simplefilter('always')
        assert CudaCallback().device == torch.device('mps')
    assert 'runs on the MPS' in str(said[0].message)


def test_normalize_to_refuses_a_constant_training_set():
    for train in (torch.full((10, 784), 0.5), torch.tensor([3.])):
        with pytest.raises(ValueError, match="normalize_to: the training set's standard deviation is (0.0|nan).*all its values the same"):
            normalize_to(train, torch.ones(2, 784))


def test_a_deep_copy_of_a_hooked_model_carries_its_own_copy_of_the_hook():
    "The lesson's behaviour, which 06b changes: deepcopy copies the Hook with the module (its bound method holds it)."
    import copy
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with Hooks(model[:1], append_stats) as hooks:
        model(torch.randn(2, 3))
        ema = copy.deepcopy(model)   # an average of the weights kept as a copy
        ema(torch.randn(2, 3)); ema(torch.randn(2, 3))
    ema(torch.randn(2, 3))   # after the model's hooks were removed
    carried = next(iter(ema[0]._forward_hooks.values())).__self__
    assert len(hooks[0].stats[0]) == 1 and forward_hook_count(model) == 0
    assert carried is not hooks[0] and len(carried.stats[0]) == 4   # the model's row, copied, and the copy's 3


def test_a_hook_function_cannot_change_the_output():
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    def returns_zeros(hook, mod, inp, outp): return torch.zeros_like(outp)
    h = Hook(lin, returns_zeros)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    h.remove()


def test_lesson_histograms_get_hist_get_min_and_plots(plt_agg):
    lin = nn.Identity()
    with Hooks([lin], append_stats_and_hist) as hooks:
        for x in (torch.tensor([0.1, 0.2, 5., 20.]), torch.tensor([-1., 0.3, 9.9, 9.9])): lin(x)
    h = hooks[0]
    assert len(h.stats[0]) == 2 and len(h.hists) == 2 and torch.equal(h.hists[0], torch.tensor([0.1, 0.2, 5., 20.]).histc(40, 0, 10))
    assert get_hist(h).shape == (40, 2) and torch.allclose(get_hist(h)[0], torch.tensor([2., 0.]).log1p())
    assert get_min(h).tolist() == pytest.approx([2 / 3, 1 / 3])
    wide = Hook(lin, partial(append_hist, hist_range=(-7, 7), bins=14))
    lin(torch.tensor([-1., 0.5]))
    assert torch.equal(wide.hists[0], torch.tensor([-1., 0.5]).histc(14, -7, 7)) and wide.hist_range == (-7, 7)
    plot_hooks_stats(hooks)
    assert [len(l.get_ydata()) for l in plt_agg.gcf().axes[0].lines] == [2]
    plot_hists(hooks); plot_mins(hooks)
    assert plt_agg.gcf().axes[0].get_ylim() == (0, 1)



class DeviceOnlyTensor(torch.Tensor):
    "Stands in for a CUDA tensor: NumPy cannot read it (as matplotlib does) until `.cpu()` moves it."
    def numpy(self, *args, **kwargs): raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() first")
    def cpu(self, *args, **kwargs): return self.as_subclass(torch.Tensor)


def test_plots_move_statistics_on_the_device_to_the_cpu(plt_agg):
    "append_stats keeps `outp.mean()` on the device; plot_hooks_stats used to hand those to matplotlib (TypeError on CUDA)."
    lin = nn.Identity()
    with Hooks([lin], append_stats_and_hist) as hooks:
        for x in (torch.tensor([0.1, 0.2, 5., 20.]), torch.tensor([-1., 0.3, 9.9, 9.9])): lin(x)
    h = hooks[0]
    h.stats = tuple([t.as_subclass(DeviceOnlyTensor) for t in xs] for xs in h.stats)
    with pytest.raises(TypeError, match='cuda'): torch.stack(h.stats[0]).numpy()   # the stand-in behaves as a GPU tensor
    plot_hooks_stats(hooks)
    means, stds = [l.get_ydata() for ax in plt_agg.gcf().axes[:2] for l in ax.lines]
    assert means.tolist() == pytest.approx([6.325, 4.775]) and len(stds) == 2


@cuda_only
def test_lesson_telemetry_on_cuda_records_on_the_gpu_and_plots(plt_agg):
    data = image_bunch()
    learn, run = get_learn_run(NFS, data, 0.1, conv_layer, cbs=[DeviceCallback('cuda'), partial(BatchTransformXCallback, mnist_view)])
    with Hooks(children(learn.model)[:2], append_stats_and_hist) as hooks:
        run.fit(1, learn)
    assert hooks[0].stats[0][0].device.type == 'cuda' and len(hooks[0].stats[0]) == len(data.train_dl)
    plot_hooks_stats(hooks); plot_hists(hooks); plot_mins(hooks)
    assert [len(l.get_ydata()) for l in plt_agg.gcf().axes[0].lines] == [len(data.train_dl)]
