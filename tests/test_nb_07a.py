"""Notebook 07a's engineering of the norm layers: the exported RunningBatchNorm (host numbers in eager mode, tensors
under torch.compile or for tensor batch sizes; non-finite batches; float16 counts; loading), FastRunningBatchNorm's
hand-written backward pass. What every RunningBatchNorm computes is tested in tests/test_nb_07.py, on these too;
torch.compile in tests/test_rbn_speed.py."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import exp.nb_07 as nb_07
import exp.nb_07a as nb_07a
from exp.nb_07a import FastRunningBatchNorm, RunningBatchNorm
from test_nb_07 import assert_close, batch, equal, outputs_and_grads, randomise_

RBNS = pytest.mark.parametrize('RBN', [RunningBatchNorm, FastRunningBatchNorm], ids=['nb_07a', 'fast'])


def test_nb_07a_replaces_running_batchnorm_under_the_same_name_and_exports_every_name_of_nb_07():
    assert RunningBatchNorm is not nb_07.RunningBatchNorm and RunningBatchNorm.__name__ == 'RunningBatchNorm'
    assert issubclass(RunningBatchNorm, nb_07.RunningBatchNorm) and issubclass(FastRunningBatchNorm, RunningBatchNorm)
    assert set(nb_07.__all__) <= set(nb_07a.__all__) and {'FastRunningBatchNorm', 'warnings'} <= set(nb_07a.__all__)


@RBNS
@pytest.mark.parametrize('bad', ['x + 1e20', 'x * 1e20', 'x * inf', 'x * nan'])
def test_running_batchnorm_state_survives_a_non_finite_batch(RBN, bad):
    "A batch whose statistics overflow (or hold inf or NaN) leaves the running statistics as they were."
    rbn = RBN(4)
    for step in range(3): rbn(batch(seed=step))
    means, vars = rbn.means.clone(), rbn.vars.clone()
    rbn(eval(bad, {'x': batch(seed=3), 'inf': math.inf, 'nan': math.nan}))
    assert torch.equal(rbn.means, means) and torch.equal(rbn.vars, vars)
    for step in range(4, 8):
        rbn.train(step % 2 == 0)
        assert torch.isfinite(rbn(batch(seed=step))).all()
    assert torch.isfinite(rbn.means).all() and torch.isfinite(rbn.vars).all()
    assert not torch.equal(rbn.means, means)  # and later batches still move them


@RBNS
def test_running_batchnorm_keeps_the_other_channels_when_one_is_not_finite(RBN):
    rbn = RBN(4)
    rbn(batch(seed=0))
    means, vars = rbn.means.clone(), rbn.vars.clone()
    x = batch(seed=1)
    x[0, 2, 0, 0] = float('nan')
    y = rbn(x)
    assert torch.isfinite(y[:, [0, 1, 3]]).all()
    assert torch.equal(rbn.means[:, 2], means[:, 2]) and torch.equal(rbn.vars[:, 2], vars[:, 2])
    assert not torch.equal(rbn.means[:, [0, 1, 3]], means[:, [0, 1, 3]])


@RBNS
def test_running_batchnorm_first_batch_huge_then_normal(RBN):
    rbn = RBN(4)
    rbn(batch(seed=0) * 1e20)
    for step in range(1, 5):
        rbn.train(step != 3)
        assert torch.isfinite(rbn(batch(seed=step))).all()


@pytest.mark.parametrize('bs', [1, 2, 32])
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fast_running_batchnorm_equals_running_batchnorm(bs, dtype, tol):
    "Outputs, gradients of the input and the parameters, and the running state, step by step, in training and eval."
    plain = randomise_(RunningBatchNorm(3)).to(dtype)
    fast = FastRunningBatchNorm(3).to(dtype)
    fast.load_state_dict(plain.state_dict())
    for step in range(24):  # through the early clamp (20 items) and past it
        training = step % 5 != 4
        x = batch((bs, 3, 4, 5), seed=step, dtype=dtype) * (0.02 if step < 3 else 1)
        a, b = (outputs_and_grads(m.train(training), x, [m.mults, m.adds], seed=step) for m in (plain, fast))
        for u, v in zip(a, b): assert_close(u, v, tol)
        for (k, u), v in zip(plain.state_dict().items(), fast.state_dict().values()):
            if isinstance(u, torch.Tensor): assert_close(u, v, tol)
            else: assert u == pytest.approx(v, rel=1e-12), k


def test_fast_running_batchnorm_refuses_a_second_derivative():
    "The hand-written backward is not itself differentiable: asking for it is an error, not a wrong number."
    rbn = FastRunningBatchNorm(2)
    x = batch((3, 2, 3, 3)).requires_grad_()
    gx, = torch.autograd.grad(rbn(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError): torch.autograd.grad(gx.sum(), x)


@RBNS
def test_running_batchnorm_warns_when_a_state_dict_without_its_count_is_loaded_loosely(RBN):
    trained = RBN(4)
    for step in range(3): trained(batch(seed=step))
    model = nn.Sequential(nn.Identity(), trained)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith('_extra_state')}
    fresh = nn.Sequential(nn.Identity(), RBN(4))
    with pytest.warns(UserWarning, match=r'1\._extra_state|count'):
        fresh.load_state_dict(state, strict=False)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the whole state dict: no warning
        fresh.load_state_dict(model.state_dict())
    assert (fresh[1].count, fresh[1].batch) == (trained.count, trained.batch)


def test_fast_running_batchnorm_has_its_own_backward_and_running_batchnorm_none():
    def nodes(fn): return [fn, *(n for f, _ in fn.next_functions if f is not None for n in nodes(f))]
    custom = torch.autograd.function.BackwardCFunction
    x = batch((3, 2, 3, 3), dtype=torch.float64).requires_grad_()
    assert not any(isinstance(n, custom) for n in nodes(RunningBatchNorm(2).double()(x).grad_fn))
    assert any(isinstance(n, custom) for n in nodes(FastRunningBatchNorm(2).double()(x).grad_fn))


class TensorSizes:
    "A mixin whose `batch_stats` gives the batch size and count as 0-dim tensors, as 07b's synchronised norms do."
    tensor_sizes = True
    def batch_stats(self, x):
        bs, n, m, v = super().batch_stats(x)
        return (torch.tensor(bs), torch.tensor(n), m, v) if self.tensor_sizes else (bs, n, m, v)


def with_tensor_sizes(RBN, *args): return type('TensorSized', (TensorSizes, RBN), {})(*args)


@RBNS
def test_host_and_tensor_forms_agree_and_hand_over(RBN):
    "Eager steps (host numbers), steps with tensor batch sizes (the tensor form), eager again: the same as host numbers only."
    plain, mixed = randomise_(RBN(3)).double(), with_tensor_sizes(RBN, 3).double()
    mixed.load_state_dict(plain.state_dict())
    for step, bs in enumerate([2, 1, 5, 3, 2, 7, 4, 2, 1, 6, 9, 2]):
        mixed.tensor_sizes = 3 <= step < 8
        x = batch((bs, 3, 4, 5), seed=step, dtype=torch.float64) * (0.02 if step < 4 else 1)   # the early clamp, then not
        for m in (plain, mixed): m.train(step % 4 != 3)
        a = outputs_and_grads(plain, x, [plain.mults, plain.adds], seed=step)
        b = outputs_and_grads(mixed, x, [mixed.mults, mixed.adds], seed=step)
        for u, v in zip(a, b): assert_close(u, v, 1e-10)
        assert mixed.get_extra_state() == pytest.approx(plain.get_extra_state(), rel=1e-12)


@RBNS
def test_tensor_form_replaces_its_state_and_never_reads_a_device_value(RBN, monkeypatch):
    "With tensor batch sizes (07b) the state is new tensors at each step, never changed in place (torch.compile's rule)."
    rbn = with_tensor_sizes(RBN, 4)
    rbn(batch())
    def refuse(*args, **kwargs): raise AssertionError('a host-device synchronisation')
    for name in ('item', '__bool__', '__float__', '__int__', '__index__', 'tolist', 'cpu', 'numpy'):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for training, bs in ((True, 1), (True, 6), (False, 6), (True, 2)):
        before = {k: (v, v._version) for k, v in rbn.named_buffers()}
        rbn.train(training)
        rbn(batch((bs, 4, 5, 7), seed=bs).requires_grad_()).sum().backward()
        for k, (v, version) in before.items():
            assert v._version == version, k
            assert (getattr(rbn, k) is not v) == training, k
    monkeypatch.undo()
    assert rbn.get_extra_state()['batch'] == 6 + 1 + 6 + 2 and rbn.batch_t.dtype == torch.int64


@RBNS
def test_eager_steps_keep_count_and_batch_on_the_host_and_make_the_tensors_only_when_asked(RBN):
    rbn = RBN(4)
    before = rbn.count_t
    for bs in (2, 5, 1): rbn(batch((bs, 4, 3, 3), seed=bs))
    assert isinstance(rbn.count, float) and rbn.batch == 8 and rbn.host_of is None and rbn.count_t is before
    count, seen = rbn.state(True)
    assert count.item() == pytest.approx(rbn.count, rel=1e-6) and seen.item() == 8 and rbn.host_of[0] is rbn.count_t


@RBNS
def test_count_tensor_keeps_float32_or_wider_when_the_layer_changes_dtype(RBN):
    rbn = RBN(4)
    for step in range(3): rbn(batch((512, 4, 14, 14), seed=step))   # a count of about 96,000: past float16's 65504
    count = rbn.count
    half = copy.deepcopy(rbn).half()
    assert half.count == count and half.state(False)[0] == count   # the host numbers stay current: nothing to read
    assert half.count_t.dtype == torch.float32 and half.state(True)[0].item() == pytest.approx(count, rel=1e-6)
    half.state(False)   # both forms current now, and after a conversion too
    assert half.half().host_of[0] is half.count_t and half.count_t.dtype == torch.float32
    assert copy.deepcopy(rbn).double().count_t.dtype == torch.float64
    meta = copy.deepcopy(rbn).to('meta')
    assert meta.count_t.device.type == meta.batch_t.device.type == 'meta'


def small_cnn(seed=0):
    "A small CNN with the exported RunningBatchNorm, on the CPU."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1, bias=False), RunningBatchNorm(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def compile_batches(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 1, 8, 8, generator=g), torch.randint(0, 10, (2,), generator=g), torch.randn(4, 1, 8, 8, generator=g)


@pytest.fixture
def fresh_dynamo():
    dynamo = pytest.importorskip('torch._dynamo')
    dynamo.reset()
    yield
    dynamo.reset()


def test_compile_for_training_moves_the_model_to_the_device_first(fresh_dynamo, monkeypatch, capsys):
    "The Runner's DeviceCallback moves the model only at begin_fit: compiled before, on CPU weights, it met GPU inputs."
    monkeypatch.setattr(nb_07a, 'default_device', lambda: torch.device('meta'))   # a device the inputs go to, not the CPU
    model = small_cnn()
    compiled = nb_07a.compile_for_training(model, *compile_batches(), backend='eager')
    out = capsys.readouterr().out
    assert 'running eager' not in out and 'not available' not in out, out
    assert compiled is not model and all(p.device.type == 'meta' for p in model.parameters())
    assert model.training and all(p.grad is None or not p.grad.any() for p in model.parameters() if p.device.type != 'meta')


def test_compile_for_training_raises_errors_that_are_not_the_compilers(fresh_dynamo, capsys):
    "A model whose tensors sit on two devices is a bug in the model: raised, never reported as 'compiling failed'."
    class TwoDevices(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(64, 10)
        def forward(self, x): return self.lin(x.flatten(1).to('meta'))   # the weights stay on the CPU
    with pytest.raises(RuntimeError, match='(?i)device'):
        nb_07a.compile_for_training(TwoDevices(), *compile_batches(), device='cpu', backend='eager')
    out = capsys.readouterr().out
    assert 'running eager' not in out and 'not available' not in out, out


def test_compile_for_training_runs_eager_when_the_backend_fails(fresh_dynamo, capsys):
    def no_compiler(gm, inputs): raise RuntimeError('no C++ compiler found (simulated)')
    model = small_cnn()
    got = nb_07a.compile_for_training(model, *compile_batches(), device='cpu', backend=no_compiler)
    out = capsys.readouterr().out
    assert got is model and 'running eager' in out and 'no C++ compiler' in out, out
    assert model.training and all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert torch.isfinite(got(compile_batches()[0])).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_compile_for_training_on_cuda_compiles_on_the_gpu(fresh_dynamo, capsys):
    "On a GPU (inductor, CUDA graphs): a CPU model is moved and compiled, and trains as its eager twin does."
    xb, yb, xv = compile_batches()
    eager, model = small_cnn().cuda(), small_cnn()
    compiled = nb_07a.compile_for_training(model, xb, yb, xv)
    assert 'running eager' not in capsys.readouterr().out and compiled is not model
    assert all(p.device.type == 'cuda' for p in model.parameters())
    for _ in range(2): torch.nn.functional.cross_entropy(eager(xb.cuda()), yb.cuda()).backward()   # the same warm-up
    eager.zero_grad()
    losses = {}
    for name, m in (('eager', eager), ('compiled', compiled)):
        opt, losses[name] = torch.optim.SGD(m.parameters(), lr=0.1), []
        for step in range(5):
            x, y, _ = compile_batches(seed=10 + step)
            loss = torch.nn.functional.cross_entropy(m(x.cuda()), y.cuda())
            loss.backward(); opt.step(); opt.zero_grad()
            losses[name].append(loss.item())
    assert losses['compiled'] == pytest.approx(losses['eager'], rel=1e-3, abs=1e-4)
