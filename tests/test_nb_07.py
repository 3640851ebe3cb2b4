"""Behaviour of nb_07's norm layers: equal to PyTorch's own (also under autocast), and RunningBatchNorm against a reference.

The RunningBatchNorm tests run on notebook 07's layer and on the two of notebook 07a that replace it (the exported
RunningBatchNorm and FastRunningBatchNorm): what they compute is the same; 07a's own engineering is tested in
tests/test_nb_07a.py."""
import ast
import copy
import inspect
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import exp.nb_06 as nb_06
import exp.nb_07 as nb_07
import exp.nb_07a as nb_07a
from exp.nb_07 import (AvgStatsCallback, BatchNorm, BatchTransformXCallback, DataBunch, Dataset, GeneralRelu, GroupNorm,
                       InstanceNorm, LayerNorm, RunningBatchNorm, accuracy, conv_layer, get_cnn_model, get_dls,
                       get_learn_run, init_cnn, mnist_view)
from exp.nb_07a import FastRunningBatchNorm

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU; this machine has none')
EVERY_RBN = [RunningBatchNorm, nb_07a.RunningBatchNorm, FastRunningBatchNorm]
RBNS = pytest.mark.parametrize('RBN', EVERY_RBN, ids=['nb_07', 'nb_07a', 'fast'])


def randomise_(m, seed=0):
    "Give every parameter of `m` random values, so that affine parameters are really tested."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters(): p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + 1)
    return m


def batch(shape=(6, 4, 5, 7), seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)


def outputs_and_grads(m, x, params, seed=2):
    "Output of `m(x)` and the gradients of a random projection of it w.r.t. `x` and `params`."
    x = x.clone().requires_grad_()
    y = m(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return (y.detach(), *torch.autograd.grad(y, [x, *params], g))


def equal(a, b):
    "Equal tensors, or equal other values (a state dict's extra state)."
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def assert_close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- BatchNorm against nn.BatchNorm2d -----------------------------------------------------------

def test_batchnorm_matches_pytorch_in_training_and_eval():
    ours, theirs = randomise_(BatchNorm(4, mom=0.2)), nn.BatchNorm2d(4, momentum=0.2)
    with torch.no_grad(): theirs.weight.copy_(ours.mults.flatten()); theirs.bias.copy_(ours.adds.flatten())
    for step in range(4):
        x = batch(seed=step) * (step + 1)
        o, t = outputs_and_grads(ours, x, [ours.mults, ours.adds]), outputs_and_grads(theirs, x, [theirs.weight, theirs.bias])
        assert_close(o[0], t[0]); assert_close(o[1], t[1])
        assert_close(o[2].flatten(), t[2]); assert_close(o[3].flatten(), t[3])
    assert_close(ours.means.flatten(), theirs.running_mean)
    assert_close(ours.vars.flatten(), theirs.running_var)
    ours.eval(); theirs.eval()
    x = batch(seed=9)
    o, t = outputs_and_grads(ours, x, [ours.mults, ours.adds]), outputs_and_grads(theirs, x, [theirs.weight, theirs.bias])
    for a, b in zip(o, t): assert_close(a.flatten(), b.flatten())


def test_batchnorm_shapes_names_and_defaults():
    bn = BatchNorm(3)
    assert (bn.mom, bn.eps) == (0.1, 1e-5)
    assert bn.mults.shape == bn.adds.shape == bn.means.shape == bn.vars.shape == (1, 3, 1, 1)
    assert {n for n, _ in bn.named_buffers()} == {'means', 'vars'}
    assert {n for n, _ in bn.named_parameters()} == {'mults', 'adds'}
    with pytest.raises(ValueError, match='more than one value'): bn(torch.randn(1, 3, 1, 1))


def test_batchnorm_eval_changes_no_statistics():
    bn = BatchNorm(4).eval()
    bn(batch())
    assert torch.equal(bn.means, torch.zeros(1, 4, 1, 1)) and torch.equal(bn.vars, torch.ones(1, 4, 1, 1))


# --- LayerNorm, InstanceNorm, GroupNorm against PyTorch -------------------------------------------

def test_layernorm_matches_f_layer_norm():
    ln = randomise_(LayerNorm())
    assert ln.eps == 1e-5 and ln.mult.shape == ln.add.shape == ()
    x = batch()
    def theirs(x, w, b): return F.layer_norm(x, x.shape[1:], eps=1e-5) * w + b
    w, b = ln.mult.detach().clone().requires_grad_(), ln.add.detach().clone().requires_grad_()
    for a, e in zip(outputs_and_grads(ln, x, [ln.mult, ln.add]), outputs_and_grads(lambda x: theirs(x, w, b), x, [w, b])):
        assert_close(a, e)
    ln.eval()  # no running statistics: evaluation is the same computation
    assert_close(ln(x), theirs(x, w, b).detach())


def test_instancenorm_matches_f_instance_norm_with_the_lessons_eps():
    inorm = randomise_(InstanceNorm(4))
    assert inorm.eps == 1.0 and inorm.mults.shape == (1, 4, 1, 1)
    x = batch()
    w, b = inorm.mults.detach().flatten().requires_grad_(), inorm.adds.detach().flatten().requires_grad_()
    theirs = lambda x: F.instance_norm(x, weight=w, bias=b, eps=1.0)
    o, t = outputs_and_grads(inorm, x, [inorm.mults, inorm.adds]), outputs_and_grads(theirs, x, [w, b])
    for a, e in zip(o, t): assert_close(a.flatten(), e.flatten())
    small = randomise_(InstanceNorm(4, eps=1e-5))
    assert_close(small(x), F.instance_norm(x, weight=small.mults.flatten(), bias=small.adds.flatten()))


@pytest.mark.parametrize('groups', [1, 2, 4])
def test_groupnorm_matches_nn_groupnorm(groups):
    ours, theirs = randomise_(GroupNorm(groups, 4)), nn.GroupNorm(groups, 4)
    with torch.no_grad(): theirs.weight.copy_(ours.mults.flatten()); theirs.bias.copy_(ours.adds.flatten())
    x = batch()
    o, t = outputs_and_grads(ours, x, [ours.mults, ours.adds]), outputs_and_grads(theirs, x, [theirs.weight, theirs.bias])
    for a, e in zip(o, t): assert_close(a.flatten(), e.flatten())
    assert_close(ours(x.transpose(2, 3)), theirs(x.transpose(2, 3)).detach())  # non-contiguous input


def test_groupnorm_rejects_channels_that_do_not_split():
    with pytest.raises(ValueError, match='5 channels'): GroupNorm(2, 5)


@pytest.mark.parametrize('groups', [0, -2, 3])
def test_groupnorm_rejects_zero_negative_and_non_dividing_groups_clearly(groups):
    with pytest.raises(ValueError, match=rf'8 channels do not split into {groups} groups.*one of \[1, 2, 4, 8\]'):
        GroupNorm(groups, 8)


# --- RunningBatchNorm against a reference written step by step --------------------------------------

class ReferenceRBN:
    """RunningBatchNorm written out as in the lesson: EWMAs of the sums, the sums of squares and the counts,
    each started at zero and debiased, the momenta, counts and debias factor in Python floats. Gradients
    flow through the current batch's sums only. Run in float64, where E[x^2] - E[x]^2 is exact enough."""
    def __init__(self, mults, adds, mom=0.1, eps=1e-5):
        self.mults, self.adds, self.mom, self.eps = mults, adds, mom, eps
        nf = mults.shape[1]
        self.sums, self.sqrs = torch.zeros(1, nf, 1, 1, dtype=torch.float64), torch.zeros(1, nf, 1, 1, dtype=torch.float64)
        self.count, self.dbias, self.seen = 0., 0., 0

    def __call__(self, x, training):
        if training:
            bs = x.shape[0]
            mom = 1 - (1 - self.mom) / math.sqrt(bs - 1) if bs > 1 else self.mom
            self.sums = self.sums.detach() * (1 - mom) + x.sum((0, 2, 3), keepdim=True) * mom
            self.sqrs = self.sqrs.detach() * (1 - mom) + (x * x).sum((0, 2, 3), keepdim=True) * mom
            self.count = self.count * (1 - mom) + x.numel() / x.shape[1] * mom
            self.dbias = self.dbias * (1 - mom) + mom
            self.seen += bs
        if not self.seen: mean, var = torch.tensor(0.), torch.tensor(1.)
        else:
            sums, sqrs, count = self.sums / self.dbias, self.sqrs / self.dbias, self.count / self.dbias
            mean = sums / count
            var = sqrs / count - mean * mean
            if self.seen < 20: var = var.clamp_min(0.01)
        return (x - mean) / (var + self.eps).sqrt() * self.mults + self.adds


def reference_for(rbn):
    "A float64 `ReferenceRBN` with the parameters of `rbn` (and its own leaf copies of them)."
    mults, adds = rbn.mults.detach().double().requires_grad_(), rbn.adds.detach().double().requires_grad_()
    return ReferenceRBN(mults, adds, mom=rbn.mom, eps=rbn.eps)


def step_both(rbn, ref, x, training, seed, dtype=torch.float32):
    "One step of `rbn` (in `dtype`) and of `ref` (in float64) on `x`: their outputs and gradients, as float64."
    rbn.train(training)
    x64 = x.double().requires_grad_()
    y_ref = ref(x64, training)
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grads_ref = torch.autograd.grad(y_ref, [x64, ref.mults, ref.adds], g)
    x = x.to(dtype).requires_grad_()
    y = rbn(x)
    grads = torch.autograd.grad(y, [x, rbn.mults, rbn.adds], g.to(dtype))
    return (y.double(), *(t.double() for t in grads)), (y_ref.detach(), *grads_ref)


@RBNS
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_running_batchnorm_matches_reference_over_50_steps(RBN, dtype, tol):
    rbn = randomise_(RBN(3, mom=0.1)).to(dtype)
    ref = reference_for(rbn)
    sizes = [1, 2, 5, 1, 3, 32, 2, 7] * 7
    for step, bs in enumerate(sizes[:50]):
        training = step % 10 != 9 and step != 0  # an evaluation every tenth step, and before any training
        x = batch((bs, 3, 4, 5), seed=step) * (1 + step % 3) + step % 4
        if step < 3: x = x * 0.01  # variances below the early clamp's 0.01
        ours, theirs = step_both(rbn, ref, x, training, step, dtype)
        for a, e in zip(ours, theirs): assert_close(a, e, tol)
    assert rbn.batch == sum(bs for i, bs in enumerate(sizes[:50]) if i % 10 != 9 and i != 0)
    torch.testing.assert_close(float(rbn.count) / ref.dbias, ref.count / ref.dbias, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)


@RBNS
def test_running_batchnorm_is_exact_far_from_zero(RBN):
    "Mean 3000, std 1: E[x^2] - E[x]^2 in float32 loses the variance (once NaN); ours matches float64 in training and eval."
    rbn = randomise_(RBN(4))
    ref = reference_for(rbn)
    for step, bs in enumerate([2, 8, 1, 32, 4, 16, 3, 8]):
        x = batch((bs, 4, 5, 5), seed=step) / 3 + 3000  # batch() has std 3: std 1 here
        for training in (True, False):
            ours, theirs = step_both(rbn, ref, x, training, step)
            assert all(torch.isfinite(t).all() for t in ours)
            for a, e in zip(ours, theirs): assert_close(a, e, 2e-3)
    torch.testing.assert_close(rbn.vars.flatten().double(), (ref.sqrs / ref.count - (ref.sums / ref.count) ** 2).flatten(),
                               rtol=1e-3, atol=0)


@RBNS
def test_running_batchnorm_is_exact_far_from_zero_from_its_first_step(RBN):
    "A fresh layer (means 0) meets batches of mean 3000: its first steps too match float64 (the merge must not cancel)."
    rbn = RBN(8)
    ref = reference_for(rbn)
    for step in range(3):
        x = torch.randn(32, 8, 6, 6, generator=torch.Generator().manual_seed(step)) + 3000
        ours, theirs = step_both(rbn, ref, x, True, step)
        assert_close(ours[0], theirs[0], 2e-3)










@RBNS
def test_running_batchnorm_gradients_pass_gradcheck(RBN):
    "The gradients against finite differences, with and without the early variance clamp."
    rbn = randomise_(RBN(2)).double()
    for bs, spread in ((1, 0.01), (2, 1), (9, 0.02), (20, 0.01), (3, 1)):  # clamped, free, clamped, past it
        x = (batch((bs, 2, 3, 3), seed=bs, dtype=torch.float64) * spread).requires_grad_()
        extra = rbn.get_extra_state()
        def one_step(x, mults, adds):  # always from the same running statistics
            buffers = {k: v.clone() for k, v in rbn.named_buffers()}
            rbn.set_extra_state(extra)
            return torch.func.functional_call(rbn, {'mults': mults, 'adds': adds, **buffers}, (x,))
        assert torch.autograd.gradcheck(one_step, (x, rbn.mults, rbn.adds))
        rbn.set_extra_state(extra)
        rbn(x)


def test_running_batchnorm_is_plain_autograd_with_second_derivatives():
    "No custom autograd Function: the second derivative exists and is right."
    rbn = randomise_(RunningBatchNorm(2)).double()
    for step in range(2): rbn(batch((4, 2, 3, 3), seed=step, dtype=torch.float64))
    x = batch((3, 2, 3, 3), seed=5, dtype=torch.float64).requires_grad_()
    extra, params = rbn.get_extra_state(), dict(rbn.named_parameters())
    def one_step(x):  # always from the same running statistics
        rbn.set_extra_state(extra)
        return torch.func.functional_call(rbn, {**params, **{k: v.clone() for k, v in rbn.named_buffers()}}, (x,))
    assert torch.autograd.gradgradcheck(one_step, (x,))
    def nodes(fn): return [fn, *(n for f, _ in fn.next_functions if f is not None for n in nodes(f))]
    custom = torch.autograd.function.BackwardCFunction
    assert not any(isinstance(n, custom) for n in nodes(rbn(x.clone().requires_grad_()).grad_fn))




@RBNS
def test_running_batchnorm_trains_on_single_items(RBN):
    rbn = RBN(4)
    for step in range(30):
        y = rbn(batch((1, 4, 3, 3), seed=step))
        assert torch.isfinite(y).all()
    y = rbn(torch.zeros(1, 4, 1, 1))  # one value per channel: no variance at all
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(rbn.mults.grad).all() and torch.isfinite(rbn.adds.grad).all()


@RBNS
@pytest.mark.parametrize('shape', [(0, 4, 5, 5), (3, 4, 0, 2)])
def test_running_batchnorm_passes_an_empty_batch_through_and_keeps_its_state(RBN, shape):
    rbn = RBN(4)
    rbn(batch(seed=0))
    state = copy.deepcopy(rbn.state_dict())
    x = torch.empty(shape, requires_grad=True)
    y = rbn(x)
    assert y.shape == shape
    y.sum().backward()
    for k, v in rbn.state_dict().items(): assert equal(v, state[k]), k


@RBNS
def test_running_batchnorm_is_the_identity_before_training(RBN):
    rbn = RBN(4).eval()
    x = batch()
    assert_close(rbn(x), x * (1 + 1e-5) ** -0.5)


@RBNS
def test_running_batchnorm_eval_uses_the_running_statistics(RBN):
    rbn = randomise_(RBN(4))
    for step in range(5): rbn(batch(seed=step))
    rbn.eval()
    state = copy.deepcopy(rbn.state_dict())
    x1, x2 = batch(seed=10), batch(seed=11) * 5 + 3
    y1 = rbn(x1)
    assert_close(y1, ((x1 - rbn.means) / (rbn.vars + rbn.eps).sqrt() * rbn.mults + rbn.adds).detach())
    assert_close(rbn(x1[:2]), y1[:2])  # each item on its own: no batch statistics in evaluation
    rbn(x2)
    for k, v in rbn.state_dict().items(): assert equal(v, state[k]), k


@RBNS
def test_running_batchnorm_gradients_reach_mults_and_adds_in_training(RBN):
    rbn = RBN(4)
    x = batch().requires_grad_()
    (rbn(x) * torch.arange(4.).view(1, 4, 1, 1)).pow(2).sum().backward()
    for t in (x.grad, rbn.mults.grad, rbn.adds.grad):
        assert t is not None and torch.isfinite(t).all() and t.abs().sum() > 0
    rbn.zero_grad()
    rbn.eval()
    rbn(x).sum().backward()
    assert rbn.adds.grad.abs().sum() > 0 and rbn.mults.grad.abs().sum() > 0


@RBNS
def test_running_batchnorm_names_and_defaults(RBN):
    rbn = RBN(3)
    assert (rbn.mom, rbn.eps) == (0.1, 1e-5)
    assert {n for n, _ in rbn.named_parameters()} == {'mults', 'adds'}
    assert set(rbn.state_dict()) == {'mults', 'adds', 'means', 'vars', '_extra_state'}  # count and batch: the extra state
    assert rbn.mults.shape == rbn.means.shape == rbn.vars.shape == (1, 3, 1, 1)
    assert (float(rbn.count), int(rbn.batch)) == (0, 0)
    rbn(torch.randn(5, 3, 2, 2))
    assert int(rbn.batch) == 5 and float(rbn.count) == pytest.approx(20 * (1 - 0.9 / 2))
    assert rbn.state_dict()['_extra_state'] == {'count': pytest.approx(20 * (1 - 0.9 / 2)), 'batch': 5}


@RBNS
def test_running_batchnorm_forward_never_asks_the_device_for_a_value(RBN, monkeypatch):
    "`.item()`, `bool()`, `float()`, `int()` or `.tolist()` on a tensor would stall a GPU until it catches up."
    rbn = RBN(4)
    x = batch().requires_grad_()
    def refuse(*args, **kwargs): raise AssertionError('a host-device synchronisation')
    for name in ('item', '__bool__', '__float__', '__int__', '__index__', 'tolist', 'cpu', 'numpy'):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for training, bs in ((True, 1), (True, 6), (False, 6), (True, 2), (True, 0)):
        rbn.train(training)
        y = rbn(x[:bs])
        if training: y.sum().backward()
    monkeypatch.undo()
    assert torch.isfinite(x.grad).all()


# --- every norm layer: what they show, what they refuse --------------------------------------------

def test_norm_layers_show_their_settings():
    assert repr(BatchNorm(8)) == 'BatchNorm(8, mom=0.1, eps=1e-05)'
    assert repr(LayerNorm(eps=0.1)) == 'LayerNorm(eps=0.1)'
    assert repr(InstanceNorm(8)) == 'InstanceNorm(8, eps=1.0)'
    assert repr(GroupNorm(2, 8)) == 'GroupNorm(2, 8, eps=1e-05)'
    assert repr(RunningBatchNorm(8, mom=0.2)) == 'RunningBatchNorm(8, mom=0.2, eps=1e-05)'
    assert repr(FastRunningBatchNorm(8)) == 'FastRunningBatchNorm(8, mom=0.1, eps=1e-05)'
    assert 'BatchNorm(8, mom=0.1, eps=1e-05)' in repr(conv_layer(1, 8))


def test_norm_layers_keep_the_lessons_signatures():
    sig = lambda f: str(inspect.signature(f))
    assert sig(BatchNorm) == sig(RunningBatchNorm) == sig(FastRunningBatchNorm) == '(nf, mom=0.1, eps=1e-05)'
    assert sig(LayerNorm) == '(eps=1e-05)' and sig(InstanceNorm) == '(nf, eps=1.0)'
    assert sig(GroupNorm) == '(groups, nf, eps=1e-05)'
    assert sig(conv_layer).startswith('(ni, nf, ks=3, stride=2, bn=True')


def test_no_torchscript_leftovers_and_no_imports_but_the_previous_notebook():
    for cls in (BatchNorm, LayerNorm, InstanceNorm, GroupNorm, *EVERY_RBN):
        assert '__constants__' not in vars(cls), cls
    tree = ast.parse(Path(nb_07.__file__).read_text())
    imports = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [i for i in imports if ' import __all__ ' not in i] == ['from exp.nb_06b import *']  # and the exporter's __all__


def test_init_cnn_and_get_learn_run_are_notebook_06s():
    assert nb_07.init_cnn is nb_06.init_cnn and nb_07.get_learn_run is nb_06.get_learn_run


# --- every norm layer: state_dict and devices ---------------------------------------------------------

def all_norms():
    return {'BatchNorm': BatchNorm(4), 'LayerNorm': LayerNorm(), 'InstanceNorm': InstanceNorm(4),
            'GroupNorm': GroupNorm(2, 4), 'RunningBatchNorm': RunningBatchNorm(4), 'RunningBatchNorm (07a)': nb_07a.RunningBatchNorm(4),
            'FastRunningBatchNorm': FastRunningBatchNorm(4)}


@pytest.mark.parametrize('name', list(all_norms()))
def test_norm_round_trips_through_state_dict(name, tmp_path):
    trained = randomise_(all_norms()[name])
    for step in range(3): trained(batch(seed=step))
    trained.eval()
    path = tmp_path / 'norm.pt'
    torch.save(trained.state_dict(), path)
    fresh = all_norms()[name]
    fresh.load_state_dict(torch.load(path))
    fresh.eval()
    assert set(fresh.state_dict()) == set(trained.state_dict())
    for (k, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()): assert equal(a, b), k
    x = batch(seed=7)
    assert torch.equal(fresh(x), trained(x))
    fresh.train(); trained.train()  # and training goes on from the same state (RunningBatchNorm: count and batch too)
    assert torch.equal(fresh(x), trained(x))
    for (k, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()): assert equal(a, b), k


@pytest.mark.parametrize('name', list(all_norms()))
@pytest.mark.parametrize('training', [True, False])
def test_norm_refuses_an_input_of_another_dtype_clearly(name, training):
    m = all_norms()[name].train(training)
    with pytest.raises(TypeError, match=r'torch\.float32 parameters but got a torch\.float64 input.*x\.float\(\).*layer\.double\(\)'):
        m(batch(dtype=torch.float64))
    m64 = all_norms()[name].double().train(training)
    with pytest.raises(TypeError, match=r'torch\.float64 parameters but got a torch\.float32 input.*x\.double\(\).*layer\.float\(\)'):
        m64(batch())
    with pytest.raises(TypeError, match=r'torch\.float32 parameters but got a torch\.bfloat16 input.*x\.float\(\).*layer\.to\(torch\.bfloat16\)'):
        m(batch(dtype=torch.bfloat16))


@pytest.mark.parametrize('name', list(all_norms()))
def test_norm_moves_with_its_buffers(name):
    m = all_norms()[name]
    m64 = m.to(torch.float64)
    assert all(t.dtype == torch.float64 for t in [*m64.parameters(), *m64.buffers()] if t.is_floating_point())
    y = m64(batch(dtype=torch.float64))
    assert y.dtype == torch.float64
    meta = all_norms()[name].to('meta')
    assert all(t.device.type == 'meta' for t in [*meta.parameters(), *meta.buffers()])
    assert meta(torch.empty(6, 4, 5, 7, device='meta')).shape == (6, 4, 5, 7)


@cuda
@pytest.mark.parametrize('name', list(all_norms()))
def test_norm_runs_on_cuda_with_its_buffers(name):
    m, ref = all_norms()[name], all_norms()[name]
    m = m.cuda()
    assert all(t.is_cuda for t in [*m.parameters(), *m.buffers()])
    for step in range(3):
        x = batch(seed=step)
        assert_close(m(x.cuda()).cpu(), ref(x).detach(), 1e-4)


@cuda
@RBNS
def test_running_batchnorm_training_step_never_synchronises_on_cuda(RBN):
    model = nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), RBN(8), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(10)).cuda()
    x, y = torch.randn(2, 1, 8, 8, device='cuda'), torch.randint(0, 10, (2,), device='cuda')
    model(x)  # materialise the lazy layer
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for training in (True, True, False):
            model.train(training)
            loss = F.cross_entropy(model(x), y)
            if training: loss.backward(); opt.step(); opt.zero_grad()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# --- conv_layer, init_cnn, get_learn_run -----------------------------------------------------------------

def test_conv_layer_with_and_without_a_norm_layer():
    layer = conv_layer(3, 8, 5, leak=0.1, sub=0.4, maxv=6.)
    conv, relu, bn = layer
    assert isinstance(conv, nn.Conv2d) and conv.bias is None and conv.kernel_size == (5, 5)
    assert conv.stride == (2, 2) and conv.padding == (2, 2)
    assert isinstance(relu, GeneralRelu) and (relu.leak, relu.sub, relu.maxv) == (0.1, 0.4, 6.)
    assert isinstance(bn, BatchNorm) and bn.mults.shape == (1, 8, 1, 1)
    plain = conv_layer(3, 8, bn=False)
    assert len(plain) == 2 and plain[0].bias is not None
    assert isinstance(conv_layer(3, 8, norm=nn.BatchNorm2d)[2], nn.BatchNorm2d)
    assert isinstance(conv_layer(3, 8, norm=partial(GroupNorm, 2))[2], GroupNorm)
    assert conv_layer(3, 8, norm=lambda nf: LayerNorm(), bias=True)[0].bias is not None
    assert conv_layer(3, 8)(torch.randn(2, 3, 9, 9)).shape == (2, 8, 5, 5)


def test_init_cnn_reaches_nested_convolutions_and_skips_missing_biases():
    torch.manual_seed(0)
    model = nn.Sequential(conv_layer(16, 64), nn.Sequential(conv_layer(64, 64, bn=False), nn.Sequential(nn.Conv2d(64, 32, 3))))
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None: nn.init.constant_(m.bias, 1.)
    init_cnn(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    for conv in convs:
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (1 + 0.1 ** 2) / fan_in), rel=0.1)
        assert conv.bias is None or torch.count_nonzero(conv.bias) == 0


@pytest.mark.parametrize('norm', [None, nn.BatchNorm2d, *EVERY_RBN, partial(GroupNorm, 2)])
def test_get_learn_run_trains_a_cnn_with_norm_layers(norm):
    torch.manual_seed(0)
    x = torch.zeros(200, 784); y = torch.arange(200) % 2
    x[y == 1, :392] = 1.  # class 1: the top half of the image is bright
    x += torch.randn_like(x) * 0.1
    data = DataBunch(*get_dls(Dataset(x[:160], y[:160]), Dataset(x[160:], y[160:]), 16), c=2)
    cbs = [partial(AvgStatsCallback, accuracy, print_stats=False), partial(BatchTransformXCallback, mnist_view)]
    learn, run = get_learn_run([4, 8], data, 0.3, conv_layer, cbs=cbs, norm=norm)
    kind = norm.func if isinstance(norm, partial) else norm or BatchNorm
    assert sum(isinstance(m, kind) for m in learn.model.modules()) == 2
    run.fit(3, learn)
    assert run.avg_stats.valid_stats.avg_stats[1] == 1.0


# --- the 2-D norms check their input (issue 15, item 3) ------------------------------------------------

def norms_2d():
    return {'BatchNorm': BatchNorm(4), 'InstanceNorm': InstanceNorm(4), 'GroupNorm': GroupNorm(2, 4),
            'RunningBatchNorm': RunningBatchNorm(4), 'RunningBatchNorm (07a)': nb_07a.RunningBatchNorm(4),
            'FastRunningBatchNorm': FastRunningBatchNorm(4)}


def test_groupnorm_refuses_a_flat_batch_instead_of_returning_a_new_shape():
    with pytest.raises(ValueError, match=r'GroupNorm expected a 4-D \(N, C, H, W\) input with C=4 channels, got shape \(8, 4\)'):
        GroupNorm(2, 4)(torch.randn(8, 4))


@pytest.mark.parametrize('name', list(norms_2d()))
@pytest.mark.parametrize('shape', [(8, 4), (4, 5, 7), (6, 4, 3, 4, 4), (6, 3, 5, 7), (6, 8, 5, 7)])
@pytest.mark.parametrize('training', [True, False])
def test_2d_norms_refuse_other_shapes_and_channel_counts_with_one_clear_error(name, shape, training):
    m = norms_2d()[name].train(training)
    fix = 'for 8 channels' if shape == (6, 8, 5, 7) else 'for 3 channels' if len(shape) == 4 else r'reshape it to \(N, 4, H, W\)'
    with pytest.raises(ValueError, match=rf'{type(m).__name__} expected a 4-D \(N, C, H, W\) input with C=4 channels, '
                                         rf'got shape {re_shape(shape)}: .*{fix}'):
        m(torch.randn(shape))


def re_shape(shape): return str(tuple(shape)).replace('(', r'\(').replace(')', r'\)')


def test_check_nchw_passes_a_good_batch_and_is_exported():
    assert nb_07.check_nchw(BatchNorm(3), torch.empty(0, 3, 1, 1)) is None
    assert 'check_nchw' in nb_07.__all__ and 'check_dtype' in nb_07.__all__


@RBNS
@pytest.mark.parametrize('bad', [torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5), torch.randn(2, 4, 5, 5, dtype=torch.float64)])
def test_running_batchnorm_state_does_not_move_when_the_forward_raises(RBN, bad):
    rbn = RBN(4)
    for step in range(2): rbn(batch(seed=step))
    before = copy.deepcopy(rbn.state_dict())
    with pytest.raises((ValueError, TypeError)): rbn(bad)
    after = rbn.state_dict()
    assert set(after) == set(before)
    for k in before: assert equal(after[k], before[k]), k
    assert (rbn.count, rbn.batch) == (before['_extra_state']['count'], before['_extra_state']['batch'])




# --- one method gives every statistic of the batch: batch_stats (for norms synchronised across processes) --

def test_batchnorm_batch_stats_is_the_contract():
    bn = BatchNorm(4)
    x = batch().requires_grad_()
    bs, n, m, v = bn.batch_stats(x)
    assert (bs, n) == (6, 6 * 5 * 7) and m.shape == v.shape == (1, 4, 1, 1)
    assert_close(m.flatten(), x.mean((0, 2, 3)).detach()); assert_close(v.flatten(), x.var((0, 2, 3), correction=0).detach())
    (gx,) = torch.autograd.grad((m + v).sum(), [x])
    assert gx.abs().sum() > 0  # differentiable


class TwoBatches:
    "A mixin whose `batch_stats` are those of `x` together with another batch, as a norm synchronised over two processes sees them."
    other = None
    def batch_stats(self, x):
        bs, n, m, v = super().batch_stats(torch.cat([x, self.other]))
        return bs, n, m, v


@pytest.mark.parametrize('Norm', [BatchNorm, *EVERY_RBN])
def test_norms_take_every_batch_statistic_from_batch_stats(Norm):
    synced = type('Synced', (TwoBatches, Norm), {})(4)
    whole = Norm(4)
    randomise_(synced); whole.load_state_dict(synced.state_dict())
    for step, (b1, b2) in enumerate([(1, 1), (2, 3), (1, 2), (3, 3)]):
        x, other = batch((b1, 4, 3, 3), seed=2 * step), batch((b2, 4, 3, 3), seed=2 * step + 1)
        synced.other = other
        o = outputs_and_grads(synced, x, [])[0]
        e = outputs_and_grads(whole, torch.cat([x, other]), [])[0][:b1]
        assert_close(o, e)
    for k, a in whole.state_dict().items(): assert equal(synced.state_dict()[k], a) or torch.allclose(synced.state_dict()[k], a), k


# --- mixed precision (issue 23, item 2) and half precision (issue 24, items 4 and 7) ------------------------------

def pytorchs(name, layer):
    "PyTorch's own layer for one of `all_norms()`, with the same parameters (a function of x for LayerNorm and InstanceNorm)."
    if name == 'LayerNorm': return lambda x: F.layer_norm(x, x.shape[1:]) * layer.mult + layer.add
    if name == 'InstanceNorm': return lambda x: F.instance_norm(x, weight=layer.mults.flatten(), bias=layer.adds.flatten(), eps=1.)
    theirs = nn.GroupNorm(2, 4) if name == 'GroupNorm' else nn.BatchNorm2d(4)   # RunningBatchNorm's first batch: batch norm
    with torch.no_grad(): theirs.weight.copy_(layer.mults.flatten()); theirs.bias.copy_(layer.adds.flatten())
    return theirs


@pytest.mark.parametrize('name', list(all_norms()))
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float32])
def test_norms_under_autocast_match_pytorchs(name, dtype):
    "Under autocast (bfloat16 on the CPU), each layer takes the activations, as PyTorch's own: its output dtype, close values."
    layer = randomise_(all_norms()[name])
    theirs = pytorchs(name, layer)
    x = batch(dtype=dtype).requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y, want = layer(x), theirs(x)
    assert y.dtype == want.dtype == dtype
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=3e-2)
    gx, *gp = torch.autograd.grad(y.float().pow(2).sum(), [x, *layer.parameters()])
    assert gx.dtype == dtype and all(torch.isfinite(g).all() for g in [gx, *gp])
    for b in layer.buffers():
        if b.is_floating_point(): assert b.dtype == torch.float32 and torch.isfinite(b).all()
    if name == 'BatchNorm':  # the running statistics too, in float32
        assert_close(layer.means.flatten(), theirs.running_mean, 1e-2); assert_close(layer.vars.flatten(), theirs.running_var, 2e-2)


@pytest.mark.parametrize('name', list(all_norms()))
def test_a_genuine_dtype_mismatch_outside_autocast_is_still_refused(name):
    with torch.autocast('cpu', dtype=torch.bfloat16): all_norms()[name](batch(dtype=torch.bfloat16))   # fine under autocast
    with pytest.raises(TypeError, match=r'torch\.float32 parameters but got a torch\.bfloat16 input'):
        all_norms()[name](batch(dtype=torch.bfloat16))


@pytest.mark.parametrize('norm', [BatchNorm, LayerNorm, InstanceNorm, partial(GroupNorm, 2), *EVERY_RBN])
def test_a_cnn_trains_under_autocast_with_every_norm(norm):
    "Notebook 07's network: a few SGD steps under autocast (convolutions in bfloat16, the norms' statistics in float32)."
    torch.manual_seed(0)
    class Data: c = 10
    make = (lambda nf: LayerNorm()) if norm is LayerNorm else norm
    model = get_cnn_model(Data, [8, 16, 32], conv_layer, norm=make, bias=norm is LayerNorm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.arange(8) % 10
    losses = []
    for step in range(5):
        with torch.autocast('cpu', dtype=torch.bfloat16): loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step(); opt.zero_grad(); losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]


@RBNS
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_counts_and_statistics_stay_in_float32(RBN, dtype):
    "A float16 count overflowed (inf at step 4 in the issue's probe) and the means stopped moving: batches of mean 5, then -5."
    rbn = RBN(2).to(dtype)
    g = torch.Generator().manual_seed(0)
    for step in range(8):
        x = (torch.randn(512, 2, 14, 14, generator=g) + (5 if step < 4 else -5)).to(dtype)
        y = rbn(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
    count = rbn.get_extra_state()['count']
    assert math.isfinite(count) and count > 65504   # past float16's largest number
    assert rbn.means.dtype == rbn.vars.dtype == torch.float32
    torch.testing.assert_close(rbn.means.flatten(), torch.full((2,), -5.), atol=0.05, rtol=0)
    torch.testing.assert_close(rbn.vars.flatten(), torch.ones(2), atol=0.1, rtol=0)


@RBNS
@pytest.mark.parametrize('mom', [0, 0., -0.1, 1.5, float('nan')])
def test_running_batchnorm_refuses_a_momentum_outside_the_lessons_range(RBN, mom):
    with pytest.raises(ValueError, match=r'mom must be in \(0, 1\].*got'): RBN(4, mom=mom)


@RBNS
def test_running_batchnorm_takes_a_momentum_of_one_as_batch_norm_on_each_batch(RBN):
    rbn, bn = RBN(4, mom=1), nn.BatchNorm2d(4)
    for step in range(3):
        x = batch(seed=step)
        assert_close(rbn(x), bn(x).detach(), 1e-4)


@cuda
@pytest.mark.parametrize('name', list(all_norms()))
def test_norms_under_cuda_autocast_take_float16_as_nn_batchnorm2d_does(name):
    "On a GPU autocast gives float16 activations: each layer returns float16 (as nn.BatchNorm2d), statistics in float32."
    layer, bn = randomise_(all_norms()[name]).cuda(), nn.BatchNorm2d(4).cuda()
    x = batch().cuda().half().requires_grad_()
    with torch.autocast('cuda', dtype=torch.float16):
        y, want = layer(x), bn(x)
    assert y.dtype == want.dtype == torch.float16 and torch.isfinite(y).all()
    (gx,) = torch.autograd.grad(y.float().sum(), [x])
    assert torch.isfinite(gx).all()
    assert all(b.dtype == torch.float32 for b in layer.buffers() if b.is_floating_point())


class NormStudyRunningBatchNorm(RunningBatchNorm):
    "The merge of the 2026-12-01 RunningBatchNorm that made results/norm_study.md: a float32 count tensor, share = 1/(1+r)."
    def update_stats(self, x):
        bs, n, m, v = self.batch_stats(x)
        mom = self.momentum(bs)
        count = torch.as_tensor(self.count, dtype=torch.float32)
        r = count * (1 - mom) / (mom * n)               # the old statistics' weight against this batch's
        share = 1 / (1 + r)
        mean = torch.lerp(self.means, m, share)
        var = torch.lerp(self.vars, v, share) + share * share * r * (self.means - m) ** 2
        ok = var.isfinite().detach()                    # it kept the old statistics where the new were not finite
        self.means, self.vars = torch.where(ok, mean, self.means).detach(), torch.where(ok, var, self.vars).detach()
        self.count, self.batch = count * (1 - mom) + mom * n, self.batch + bs
        return mean, var


def test_rbn_computes_what_the_norm_study_ran():
    "Notebook 07's RunningBatchNorm equals, to float32 rounding, the version behind results/norm_study.md (as notebook 07 says)."
    torch.manual_seed(0)
    new, old = RunningBatchNorm(8), NormStudyRunningBatchNorm(8)
    with torch.no_grad():
        new.mults.normal_(1, 0.3); new.adds.normal_(0, 0.3); old.mults.copy_(new.mults); old.adds.copy_(new.adds)
    for step, bs in enumerate([2] * 60 + [1, 3, 7, 32, 512] + [2] * 20):
        x = (torch.randn(bs, 8, 4, 4) * (1 + step % 5) + step % 3).requires_grad_()
        y1, y2 = new(x), old(x)
        g = torch.randn_like(y1)
        for a, b in zip(torch.autograd.grad(y1, [x, new.mults, new.adds], g), torch.autograd.grad(y2, [x, old.mults, old.adds], g)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.vars, old.vars, rtol=1e-5, atol=1e-6)
    new.eval(), old.eval()
    x = torch.randn(4, 8, 4, 4)
    torch.testing.assert_close(new(x), old(x), rtol=1e-5, atol=1e-5)
