"""Behaviour of nb_06: device and batch-transform callbacks, the CNN, hooks and telemetry, init, GeneralRelu."""
import gc
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exp.nb_06 import (ActivationStatsCallback, AvgStatsCallback, BatchTransformXCallback, CancelTrainException,
                       Callback, CudaCallback, DataBunch, Dataset, DeviceCallback, GeneralRelu, Hook, Hooks,
                       Lambda, ListContainer, Recorder, StopOnNanCallback, accuracy, append_stats, children,
                       conv2d, conv_layer, default_device, flatten, get_cnn_layers, get_cnn_model, get_dls,
                       get_hist, get_learn_run, get_min, get_runner, hook_stats, init_cnn, mnist_resize,
                       mnist_view, normalize_to, view_tfm, StatsTape, append_hist, append_stats_and_hist,
                       histogram, layer_name, mean_std, moments, plot_hists, plot_hooks_stats, plot_mins)

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
    ms, ss = h.stats   # the lesson's unpacking: means and standard deviations
    assert torch.allclose(ms[:10], x.mean().view(1)) and torch.allclose(ss[:10], x.std().view(1))
    assert ms[:10].device.type == 'cpu' and list(ms) == [x.mean()]
    lin.eval(); lin(x)  # not recorded outside training
    assert len(h.stats[0]) == 1
    h.remove()


def test_append_hist_records_histograms_apart_from_the_stats():
    lin = nn.Identity()
    x = torch.tensor([[-1., 0.5, 2., 9.5, 20.]])
    h = Hook(lin, append_stats_and_hist)
    lin(x)
    means, stds, hists = hook_stats(h)
    assert torch.equal(hists[0], x.histc(40, 0, 10)) and hists[0].sum() == 3  # -1 and 20 are outside [0, 10]
    assert len(h.stats) == 2 and len(h.hists) == 1
    wide = Hook(lin, partial(append_hist, hist_range=(-7, 7), bins=14))
    lin(x)
    assert torch.equal(wide.hists[0], x.histc(14, -7, 7)) and not hasattr(wide, 'stats')


def test_hook_stats_with_no_steps_gives_empty_tensors():
    h = Hook(nn.Identity(), append_stats)
    assert [t.shape for t in hook_stats(h)] == [(0,), (0,), (0,)]   # nothing recorded yet: no crash
    class Bare: pass
    assert [t.numel() for t in hook_stats(Bare())] == [0, 0, 0]


def test_stats_tape_keeps_values_in_one_growing_buffer():
    tape = StatsTape()
    for i in range(200): tape.append(torch.tensor(float(i)))
    assert len(tape) == 200 and torch.equal(tape.values(), torch.arange(200.))
    assert len(tape.buf) == 256   # doubled from 64: three allocations for 200 values
    assert tape[-1] == 199 and list(tape[:3]) == [0., 1., 2.]
    import numpy as np
    assert np.asarray(tape).shape == (200,)   # so plt.plot(tape) works
    rows = StatsTape()
    for i in range(3): rows.append(torch.full((4,), float(i)))
    assert rows.values().shape == (3, 4)


def test_stats_tapes_plot_like_the_lesson():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    lin = nn.Linear(3, 3)
    with Hooks([lin], append_stats) as hooks:
        for _ in range(12): lin(torch.randn(5, 3))
        fig, (ax0, ax1) = plt.subplots(1, 2)
        for h in hooks:
            ms, ss = h.stats
            ax0.plot(ms[:10]); ax1.plot(ss)
    assert len(ax0.lines[0].get_ydata()) == 10 and len(ax1.lines[0].get_ydata()) == 12
    plt.close(fig)


def test_get_hist_and_get_min_on_a_known_histogram():
    class H: pass
    h = H()
    h.hists = StatsTape()
    for row in ([2., 2., 4., 2.], [0., 1., 1., 2.]): h.hists.append(torch.tensor(row))
    hist = get_hist(h)
    assert hist.shape == (4, 2)
    assert torch.allclose(hist[:, 0], torch.tensor([2., 2., 4., 2.]).log1p())
    assert torch.allclose(get_min(h), torch.tensor([0.4, 0.25]))
    assert torch.allclose(get_min(h, slice(2, 4)), torch.tensor([0.6, 0.75]))


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


# --- runners and callbacks -----------------------------------------------------------------------

def cbfs(): return [Recorder, partial(AvgStatsCallback, accuracy), DeviceCallback, partial(BatchTransformXCallback, mnist_view)]


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


def test_cuda_callback_without_gpu_warns_once_and_trains_on_the_cpu(monkeypatch):
    if torch.cuda.is_available(): pytest.skip('this machine has a GPU')
    monkeypatch.setattr(CudaCallback, 'warned', False)
    with pytest.warns(UserWarning, match='no CUDA device.*CPU'): cb = CudaCallback()
    assert cb.device == torch.device('cpu')
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # a second one would fail here
        data = image_bunch()
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

def test_activation_stats_callback_records_and_leaves_no_hooks():
    data = image_bunch(n_train=40, bs=8)  # 5 training steps per epoch
    model = get_cnn_model(data, NFS, conv_layer)
    learn, run = get_runner(model, data, cbs=cbfs() + [ActivationStatsCallback])
    run.fit(2, learn)
    hooks = run.activation_stats.hooks
    assert len(hooks) == len(children(model))
    assert all(len(h.stats[0]) == 10 and len(h.hists) == 10 for h in hooks)
    assert forward_hook_count(model) == 0


def test_twenty_fits_with_telemetry_leave_no_hooks_and_no_growing_state():
    data = image_bunch(n_train=16, n_valid=8, bs=8)  # 2 training steps per epoch
    model = get_cnn_model(data, NFS, conv_layer)
    telemetry = ActivationStatsCallback(modules=lambda m: children(m)[:2])
    learn, run = get_runner(model, data, cbs=cbfs() + [telemetry])
    for _ in range(20):
        run.fit(1, learn)
        assert forward_hook_count(model) == 0
        assert len(telemetry.hooks) == 2 and all(len(h.stats[0]) == 2 for h in telemetry.hooks)


def test_telemetry_hooks_removed_when_training_is_cancelled_or_fails():
    data = image_bunch()
    class Boom(Callback):
        def __init__(self, exc): self.exc = exc
        def after_step(self): raise self.exc
    for exc in (CancelTrainException(), ValueError('boom')):
        model = get_cnn_model(data, NFS, conv_layer)
        learn, run = get_runner(model, data, cbs=cbfs() + [ActivationStatsCallback, partial(Boom, exc)])
        if isinstance(exc, ValueError):
            with pytest.raises(ValueError, match='boom'): run.fit(1, learn)
        else:
            run.fit(1, learn)
        assert forward_hook_count(model) == 0
        assert len(run.activation_stats.hooks[0].stats[0]) == 1


def test_telemetry_makes_no_per_batch_cpu_copy(monkeypatch):
    "The statistics stay where the activations are: no `.cpu()` / `.item()` while training."
    data = image_bunch()
    model = get_cnn_model(data, NFS, conv_layer)
    learn, run = get_runner(model, data, cbs=[partial(BatchTransformXCallback, mnist_view), ActivationStatsCallback],
                            stop_on_nan=False)
    def forbidden(*args, **kwargs): raise AssertionError('host transfer during training')
    monkeypatch.setattr(torch.Tensor, 'cpu', forbidden)
    monkeypatch.setattr(torch.Tensor, 'item', forbidden)
    run.fit(1, learn)
    monkeypatch.undo()
    assert len(run.activation_stats.hooks[0].stats[0]) == 5


def test_a_dropped_hook_is_unregistered():
    lin = nn.Linear(2, 2)
    h = Hook(lin, append_stats)
    assert len(lin._forward_hooks) == 1
    del h   # no remove(): the module must not keep it alive and recording
    assert len(lin._forward_hooks) == 0
    hooks = Hooks([lin, lin], append_stats)
    assert len(lin._forward_hooks) == 2
    del hooks
    assert len(lin._forward_hooks) == 0


def test_a_half_built_hooks_leaves_nothing_registered():
    lin = nn.Linear(2, 2)
    with pytest.raises(AttributeError):
        Hooks([lin, lin, 'not a module'], append_stats)
    gc.collect()
    assert len(lin._forward_hooks) == 0


def test_hook_and_hooks_removal_is_idempotent():
    lin = nn.Linear(2, 2)
    h = Hook(lin, append_stats)
    h.remove(); h.remove()
    hooks = Hooks([lin], append_stats)
    hooks.remove(); hooks.remove()
    del hooks[0]
    assert len(lin._forward_hooks) == 0 and len(hooks) == 0


def test_telemetry_memory_stays_flat_over_400_steps():
    "One small tensor kept per step fragmented the heap: 663 MB of growth over these 400 steps before StatsTape."
    import os
    if not os.path.exists('/proc/self/statm'): pytest.skip('needs /proc to read the resident memory')
    def rss_mb(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(256 * 25, 784, generator=g), torch.randint(0, 10, (256 * 25,), generator=g)
    data = DataBunch(*get_dls(Dataset(x, y), Dataset(x[:256], y[:256]), 256), c=10)
    seen = []
    class Memory(Callback):
        def after_batch(self):
            if self.in_train and self.n_iter in (50, 450): seen.append(rss_mb())
    learn, run = get_learn_run([8, 16], data, 0.1, conv_layer,
                               cbs=[partial(BatchTransformXCallback, mnist_view), ActivationStatsCallback, Memory])
    run.fit(19, learn)   # 25 steps per epoch: 475 steps
    assert len(run.activation_stats.hooks[0].stats[0]) == 475
    assert seen[1] - seen[0] < 100, f'memory grew by {seen[1] - seen[0]:.0f} MB over 400 steps'


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


# --- telemetry: clear errors, odd cases, the fast statistics ------------------------------------

@pytest.fixture
def plt_agg():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    yield plt
    plt.close('all')


def test_append_stats_on_a_tuple_output_names_the_module():
    lstm = nn.LSTM(3, 4)
    with Hooks([lstm], append_stats_and_hist):
        with pytest.raises(TypeError, match=r"LSTM\(3, 4\).*got a tuple, not a tensor.*output\[0\]"):
            lstm(torch.randn(5, 2, 3))
    assert forward_hook_count(lstm) == 0


def test_plots_work_when_a_hooked_child_never_ran(plt_agg):
    model, unused = nn.Sequential(nn.Linear(3, 3), nn.ReLU()), nn.Linear(3, 3)
    with Hooks([model[0], unused, model[1]], append_stats_and_hist) as hooks:
        for _ in range(3): model(torch.randn(4, 3))
    assert [len(hook_stats(h)[0]) for h in hooks] == [3, 0, 3]
    assert get_min(hooks[1]).shape == (0,) and get_hist(hooks[1]).numel() == 0
    plot_hooks_stats(hooks)
    assert [len(l.get_ydata()) for l in plt_agg.gcf().axes[0].lines] == [3, 0, 3]
    assert 'no steps recorded' in plt_agg.gcf().axes[0].get_legend().get_texts()[1].get_text()
    plot_hists(hooks)
    hist_axes = plt_agg.gcf().axes
    assert [t.get_text() for t in hist_axes[1].texts] == ['no steps recorded']
    assert hist_axes[0].get_title() == '0: linear 3->3' and hist_axes[2].get_title() == '2: ReLU'
    plot_mins(hooks)
    assert [t.get_text() for t in plt_agg.gcf().axes[1].texts] == ['no steps recorded']


def test_plots_before_any_fit_say_to_fit_first(plt_agg):
    cb = ActivationStatsCallback()
    for plot in (cb.plot_stats, cb.plot_hists, cb.plot_mins):
        with pytest.raises(ValueError, match='recorded nothing yet.*run a fit with it first'): plot()
    for plot in (plot_hooks_stats, plot_hists, plot_mins):
        with pytest.raises(ValueError, match='nothing to plot'): plot([])


def test_stats_tape_keeps_a_float_after_an_int():
    for first, then in ((torch.tensor(2), torch.tensor(2.7)), (2, 2.7)):
        tape = StatsTape()
        tape.append(first); tape.append(then)
        assert tape.values().tolist() == pytest.approx([2., 2.7]) and tape.buf.is_floating_point()
    tape = StatsTape()
    for i in range(100): tape.append(torch.tensor(i))
    tape.append(torch.tensor(0.5))
    assert torch.equal(tape.values(), torch.cat([torch.arange(100.), torch.tensor([0.5])]))
    tape.append(torch.tensor(7))   # an int after floats is stored as a float
    assert tape.values()[-1] == 7. and tape.buf.dtype == torch.float32


def test_get_min_is_zero_not_nan_when_nothing_is_in_range(plt_agg):
    lin = nn.Identity()
    h = Hook(lin, append_stats_and_hist)
    lin(torch.full((10,), -0.4))          # all below the range (0, 10)
    lin(torch.tensor([0.1, 0.2, 5.]))
    assert get_min(h).tolist() == pytest.approx([0., 2 / 3])
    plot_mins([h])
    assert '1 steps: nothing in range' in plt_agg.gcf().axes[0].get_title()


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


@pytest.mark.parametrize('make', [lambda g: torch.randn(512, 8, 14, 14, generator=g).relu_(),
                                  lambda g: torch.randn(32, 10, generator=g) * 3 + 1,
                                  lambda g: torch.tensor([-1., 0.5, 2., 9.5, 20.]),
                                  lambda g: torch.randn(2, 8, 1, 1, generator=g) + 50,
                                  lambda g: torch.randn(64, 4, 4, 4, generator=g) + 3000])   # far from 0: no cancellation
def test_mean_std_matches_torch(make):
    x = make(torch.Generator().manual_seed(0))
    mean, std = mean_std(x)
    ref_std, ref_mean = torch.std_mean(x.double())
    assert float(mean) == pytest.approx(float(ref_mean), rel=1e-5, abs=1e-6)
    assert float(std) == pytest.approx(float(ref_std), rel=1e-4)
    d = x.double().flatten() - float(x.flatten()[0])
    assert moments(x).tolist() == pytest.approx([x.numel(), float(x.flatten()[0]), float(d.sum()), float((d ** 2).sum())], rel=1e-5, abs=1e-3)


def test_mean_std_edge_cases():
    mean, std = mean_std(torch.full((7,), -0.4))
    assert float(mean) == pytest.approx(-0.4) and float(std) == pytest.approx(0., abs=1e-3)   # never NaN from rounding
    mean, std = mean_std(torch.tensor([3.]))
    assert float(mean) == 3. and math.isnan(float(std))   # as torch.std: one value has no sample std


def test_histogram_matches_histc():
    g = torch.Generator().manual_seed(0)
    scratch = {}
    for x, rng in [(torch.randn(512, 8, 14, 14, generator=g).relu_() * 3, (0, 10)),
                   (torch.randn(10_000, generator=g) * 4, (-7, 7)),
                   (torch.randn(32, 10, generator=g) * 4, (-7, 7))]:
        counts = histogram(x, 40, *rng, scratch)   # one scratch dict reused across sizes
        assert torch.equal(counts.float(), x.histc(40, *rng)) and scratch['n'] == x.numel()
        assert torch.equal(histogram(x, 14, *rng).float(), x.histc(14, *rng))
    odd = torch.tensor([float('nan'), float('inf'), -float('inf'), 1e30, -1e30, 0., 9.99, 10.])
    assert histogram(odd, 40, 0, 10).tolist() == [1] + [0] * 38 + [1]   # NaN, infinities and 10 itself not counted


def test_hook_records_moments_and_reads_means_and_stds():
    lin = nn.Identity()
    h = Hook(lin, append_stats)
    xs = [torch.tensor([1., 2., 3.]), torch.tensor([0., 4.])]
    for x in xs: lin(x)
    assert h.moments.values().tolist() == [[3., 1., 3., 5.], [2., 0., 4., 16.]]   # count, first value, sums about it
    ms, ss = h.stats
    assert torch.allclose(ms[:], torch.stack([x.mean() for x in xs])) and torch.allclose(ss[:], torch.stack([x.std() for x in xs]))
    assert len(ms) == 2 and list(ms) == [2., 2.]
    with pytest.raises(TypeError, match='read-only'): ms.append(1.)


def test_layer_names():
    data = image_bunch()
    model = get_cnn_model(data, NFS, conv_layer, leak=0.1)
    assert [layer_name(m) for m in model] == ['conv 1->4 + GeneralRelu', 'conv 4->8 + GeneralRelu', 'AdaptiveAvgPool2d',
                                              'flatten', 'linear 8->10']


def test_stats_and_hist_in_one_row_read_like_the_separate_hooks():
    lin = nn.Identity()
    both, stats, hist = Hook(lin, append_stats_and_hist), Hook(lin, append_stats), Hook(lin, append_hist)
    g = torch.Generator().manual_seed(0)
    for x in (torch.randn(100, generator=g).relu(), torch.randn(50, generator=g) * 3):
        lin(x)
    separate = (*hook_stats(stats)[:2], hook_stats(hist)[2])
    assert all(torch.allclose(a, b) for a, b in zip(hook_stats(both), separate))
    assert both.rows.values().shape == (2, 4 + 40) and len(both.stats[0]) == 2 and len(both.hists) == 2
