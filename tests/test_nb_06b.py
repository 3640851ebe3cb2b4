"""Behaviour of nb_06b: the telemetry of notebook 06 made robust and fast, under the same names. Statistics kept on
the device in one tape, in float32, without a host sync; one-pass and deterministic histograms; hooks that are removed
when dropped, record only their module and never change its output; plots that say what a row is."""
import copy
import gc
import math
import types
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import exp.nb_06 as nb_06

from exp.nb_06b import (ActivationStatsCallback, AvgStatsCallback, BatchTransformXCallback, CancelTrainException,
                        Callback, DataBunch, Dataset, DeviceCallback, Hook, Hooks, Recorder, StatsTape, accuracy,
                        append_hist, append_stats, append_stats_and_hist, bincount_histogram, calls_per_step, children,
                        conv_layer, explore_telemetry, get_cnn_model, get_dls, get_hist, get_learn_run, get_min,
                        get_runner, histc_histogram, histogram, histogram_fn, hook_stats, layer_name, mean_std,
                        means_stds, mnist_view, moments, plot_hists, plot_hooks_stats, plot_layer, plot_mins,
                        sorted_histogram)

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


# --- telemetry callback --------------------------------------------------------------------------

# notebook 06's callback (the lesson's) and this chapter's, by the same tests
both_telemetry_callbacks = pytest.mark.parametrize('Telemetry', [nb_06.ActivationStatsCallback, ActivationStatsCallback],
                                                   ids=['nb_06', 'nb_06b'])


@both_telemetry_callbacks
def test_activation_stats_callback_records_and_leaves_no_hooks(Telemetry):
    data = image_bunch(n_train=40, bs=8)  # 5 training steps per epoch
    model = get_cnn_model(data, NFS, conv_layer)
    learn, run = get_runner(model, data, cbs=cbfs() + [Telemetry])
    run.fit(2, learn)
    hooks = run.activation_stats.hooks
    assert len(hooks) == len(children(model))
    assert all(len(h.stats[0]) == 10 and len(h.hists) == 10 for h in hooks)
    assert forward_hook_count(model) == 0


@both_telemetry_callbacks
def test_twenty_fits_with_telemetry_leave_no_hooks_and_no_growing_state(Telemetry):
    data = image_bunch(n_train=16, n_valid=8, bs=8)  # 2 training steps per epoch
    model = get_cnn_model(data, NFS, conv_layer)
    telemetry = Telemetry(modules=lambda m: children(m)[:2])
    learn, run = get_runner(model, data, cbs=cbfs() + [telemetry])
    for _ in range(20):
        run.fit(1, learn)
        assert forward_hook_count(model) == 0
        assert len(telemetry.hooks) == 2 and all(len(h.stats[0]) == 2 for h in telemetry.hooks)


@both_telemetry_callbacks
def test_telemetry_hooks_removed_when_training_is_cancelled_or_fails(Telemetry):
    data = image_bunch()
    class Boom(Callback):
        def __init__(self, exc): self.exc = exc
        def after_step(self): raise self.exc
    for exc in (CancelTrainException(), ValueError('boom')):
        model = get_cnn_model(data, NFS, conv_layer)
        learn, run = get_runner(model, data, cbs=cbfs() + [Telemetry, partial(Boom, exc)])
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
    with pytest.raises(TypeError, match="'not a module' is not a module"):
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


# --- platforms: float32 statistics (MPS), deterministic histograms (CUDA) ----------------------------------------

class DtypeSpy(TorchFunctionMode):
    "Records the dtype of every tensor a torch function returns."
    def __init__(self):
        super().__init__()
        self.dtypes = set()
    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor): self.dtypes.add(t.dtype)
        return out


def test_statistics_never_use_float64():
    "Apple's GPUs (mps) have no float64: recording and reading the statistics must not need it."
    lin = nn.Identity()
    both, stats = Hook(lin, append_stats_and_hist), Hook(lin, append_stats)
    with DtypeSpy() as spy:
        for _ in range(3): lin(torch.randn(64, 8) * 5 + 100)
        hook_stats(both), hook_stats(stats), mean_std(torch.randn(10))
    assert torch.float64 not in spy.dtypes and torch.float32 in spy.dtypes
    ms, ss, _ = hook_stats(both)
    assert ms.dtype == ss.dtype == torch.float32 and len(ms) == 3


def test_sorted_histogram_matches_histc():
    g = torch.Generator().manual_seed(0)
    for x, rng in [(torch.randn(512, 8, 14, 14, generator=g).relu_() * 3, (0, 10)),
                   (torch.randn(10_000, generator=g) * 4, (-7, 7)), (torch.randn(32, 10, generator=g) * 4, (-7, 7))]:
        assert torch.equal(sorted_histogram(x, 40, *rng).float(), x.histc(40, *rng))
    odd = torch.tensor([float('nan'), float('inf'), -float('inf'), 1e30, -1e30, 0., 9.99, 10.])
    assert sorted_histogram(odd, 40, 0, 10).tolist() == odd.histc(40, 0, 10).tolist()   # 10 itself in the last bin, as histc


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_the_histogram_on_cuda_is_deterministic_when_asked():
    "`histc` raises on CUDA under deterministic algorithms: the CUDA path must choose another op (device type faked)."
    on_cuda = types.SimpleNamespace(device=torch.device('cuda'))
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert histogram_fn(on_cuda) is histc_histogram
        torch.use_deterministic_algorithms(True)
        assert histogram_fn(on_cuda) is sorted_histogram
        assert histogram_fn(torch.zeros(3)) is bincount_histogram
    finally: torch.use_deterministic_algorithms(before)


def test_telemetry_works_with_deterministic_algorithms(deterministic):
    data = image_bunch()
    learn, run = get_runner(get_cnn_model(data, NFS, conv_layer), data, cbs=cbfs() + [partial(ActivationStatsCallback, hist_range=(-7, 7))])
    run.fit(1, learn)
    assert all(len(h.hists) == 5 and hook_stats(h)[2].sum() > 0 for h in run.activation_stats.hooks[:2])


@cuda_only
def test_telemetry_on_cuda_with_deterministic_algorithms(deterministic):
    x = torch.randn(512, 8, 14, 14, device='cuda')
    assert torch.equal(histogram(x, 40, -7, 7).float().cpu(), x.cpu().histc(40, -7, 7))
    data = image_bunch()
    learn, run = get_runner(get_cnn_model(data, NFS, conv_layer), data, cbs=cbfs() + [ActivationStatsCallback])
    run.fit(1, learn)
    assert next(learn.model.parameters()).device.type == 'cuda' and len(run.activation_stats.hooks[0].hists) == 5


# --- hooks that record only what they hooked, and say what a row is ------------------------------------------------

def test_a_hook_does_not_record_a_deep_copy_of_its_module():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with Hooks(model, append_stats_and_hist) as hooks:
        model(torch.randn(2, 3))
        ema = copy.deepcopy(model)   # an average of the weights kept as a copy: not the model
        ema(torch.randn(2, 3)); ema(torch.randn(2, 3))
        assert [len(h.stats[0]) for h in hooks] == [1, 1]
        model(torch.randn(2, 3))
        assert [len(h.stats[0]) for h in hooks] == [2, 2]


def test_a_hook_function_cannot_change_the_output():
    lin = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    def returns_zeros(hook, mod, inp, outp): return torch.zeros_like(outp)
    h = Hook(lin, returns_zeros)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    h.remove()


def test_an_inverted_hist_range_is_refused():
    for make in (lambda: ActivationStatsCallback(hist_range=(10, 0)), lambda: histogram(torch.randn(9), 40, 10, 0),
                 lambda: append_hist(Hook(nn.Identity(), append_stats), nn.Identity(), None, torch.randn(3), hist_range=(5, 5))):
        with pytest.raises(ValueError, match=r'hist_range=\((10|5), (0|5)\).*low end.*below the high end'): make()
    assert bincount_histogram(torch.tensor([1., 9.]), 10, 0, 10).tolist() == [0, 1] + [0] * 7 + [1]


def test_a_layer_called_twice_per_step_is_said_and_plotted_at_its_steps(plt_agg):
    class Twice(nn.Module):
        def __init__(self, block): super().__init__(); self.block = block
        def forward(self, x): return self.block(self.block(x))
    data = image_bunch()   # 5 training steps
    model = get_cnn_model(data, [4, 4], conv_layer)
    model[1] = Twice(model[1])
    learn, run = get_runner(model, data, cbs=cbfs() + [partial(ActivationStatsCallback, modules=lambda m: [m[0], m[1].block])])
    with pytest.warns(UserWarning, match=r'conv 4->4 \+ GeneralRelu ran 10 times in 5 training steps.*2 rows per step'):
        run.fit(1, learn)
    once, twice = run.activation_stats.hooks
    assert len(twice.stats[0]) == 10 and calls_per_step(twice) == 2 and calls_per_step(once) == 1
    run.activation_stats.plot_stats()
    lines = plt_agg.gcf().axes[0].lines
    assert lines[1].get_xdata().tolist() == [i / 2 for i in range(10)]   # two calls to a step
    assert '2 calls per step' in plt_agg.gcf().axes[0].get_legend().get_texts()[1].get_text()
    run.activation_stats.plot_mins()
    assert plt_agg.gcf().axes[1].get_xlabel() == 'training step (2 calls per step)'


def test_explore_telemetry_draws_a_plain_figure_outside_a_kernel(plt_agg):
    data = image_bunch()
    learn, run = get_runner(get_cnn_model(data, NFS, conv_layer), data, cbs=cbfs() + [ActivationStatsCallback])
    run.fit(1, learn)
    hooks = run.activation_stats.hooks
    assert explore_telemetry(hooks) is None   # no kernel here: the figure, and no widget
    axes = plt_agg.gcf().axes
    assert len(axes) == 3 and len(axes[0].lines[0].get_xdata()) == 5 and axes[2].images
    plot_layer(hooks, layer=1, steps=(1, 4))
    assert len(plt_agg.gcf().axes[0].lines[0].get_xdata()) == 3 and plt_agg.gcf().axes[0].get_title().startswith('1: ')
    with pytest.raises(ValueError, match='nothing to plot'): explore_telemetry([])



def test_explore_telemetry_in_a_kernel_adds_sliders_over_layer_and_steps(plt_agg, monkeypatch):
    "In a notebook kernel with ipywidgets: no figure at once, sliders over layer and steps, each position drawn by plot_layer."
    ipywidgets = pytest.importorskip('ipywidgets')
    import exp.nb_06b as nb_06b
    data = image_bunch()
    learn, run = get_runner(get_cnn_model(data, NFS, conv_layer), data, cbs=cbfs() + [ActivationStatsCallback])
    run.fit(1, learn)
    plt_agg.close('all')
    calls = []
    monkeypatch.setattr(nb_06b, 'widgets_missing', lambda: None)
    monkeypatch.setattr(nb_06b, 'sliders_until_next_cell', lambda figure, **sliders: calls.append((figure, sliders)))
    explore_telemetry(run.activation_stats.hooks)
    assert len(calls) == 1 and not plt_agg.get_fignums()   # nothing drawn before the sliders
    figure, sliders = calls[0]
    layer, steps = sliders['layer'], sliders['steps']
    assert isinstance(layer, ipywidgets.IntSlider) and isinstance(steps, ipywidgets.IntRangeSlider)
    assert (layer.min, layer.max) == (0, len(run.activation_stats.hooks) - 1) and (steps.min, steps.max, steps.value) == (0, 5, (0, 5))
    fig = figure(layer=layer.max, steps=(1, 3))   # as moving the sliders would
    assert fig.axes[0].get_title().startswith(f'{layer.max}: ') and len(fig.axes[0].lines[0].get_xdata()) == 2
    assert not plt_agg.get_fignums()   # closed: shown where it is displayed, not again at the end of the cell