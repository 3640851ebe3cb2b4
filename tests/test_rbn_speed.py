"""Notebook 07a's RunningBatchNorm under torch.compile: compiled once, and the same numbers as in eager mode.

Under compile its state (`means`, `vars`, and `count_t`, `batch_t`) is tensors replaced at each step: notebook 07's
Python numbers `count` and `batch`, changed in `forward`, make dynamo recompile at every step (shown), and a buffer
changed in place let the compiled backward read it after the change (wrong gradients, silently: AOTAutograd's
partitioner may recompute a read of a mutated input in the backward, pytorch/pytorch PR 197039). Cheap backends
only ('eager', 'aot_eager'): no C compiler needed.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import exp.nb_07 as nb_07
from exp.nb_07a import FastRunningBatchNorm, RunningBatchNorm

dynamo = pytest.importorskip('torch._dynamo')
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402


def cnn(norm, seed=0):
    "A small version of notebook 07's CNN: two (conv, norm, ReLU) blocks, pooling and a linear layer."
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1, bias=False), norm(4), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, 2, 1, bias=False), norm(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def batches(n, bs=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 1, 8, 8, generator=g) * 2 + 1, torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def train(model, data, lr=0.1):
    "SGD steps on `data`; each step's loss and the gradients of the input, detached."
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for x, y in data:
        x = x.clone().requires_grad_()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        out.append((loss.detach(), x.grad))
        opt.step(); opt.zero_grad()
    return out


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize('backend', ['eager', 'aot_eager'])
def test_compiled_running_batchnorm_compiles_once_in_10_steps_and_matches_eager(backend):
    eager, compiled = cnn(RunningBatchNorm), cnn(RunningBatchNorm)
    counter = CompileCounterWithBackend(backend)
    data = batches(10)  # 10 training steps: through the early clamp (20 items) and past it
    want, got = train(eager, data), train(torch.compile(compiled, backend=counter), data)
    assert counter.frame_count == 1, f'{counter.frame_count} compiles'
    assert dict(dynamo.utils.counters['graph_break']) == {}
    for step, ((l1, g1), (l2, g2)) in enumerate(zip(want, got)):
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6, msg=lambda m: f'loss, step {step}: {m}')
        torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6, msg=lambda m: f'input gradient, step {step}: {m}')
    for (k, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        if isinstance(a, torch.Tensor): torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=k)
        else: assert b == pytest.approx(a), k  # count and batch, the extra state
    assert compiled[1].batch_t.item() == 20 and compiled[1].count_t.item() == pytest.approx(eager[1].count, rel=1e-6)


def test_notebook_07s_running_batchnorm_recompiles_at_every_step_which_is_why_07a_has_tensors():
    counter = CompileCounterWithBackend('eager')
    train(torch.compile(cnn(nb_07.RunningBatchNorm), backend=counter), batches(4))
    assert counter.frame_count >= 3


def test_eager_steps_after_compiled_ones_read_the_tensors_once_and_go_on_with_host_numbers():
    model, twin = cnn(RunningBatchNorm), cnn(RunningBatchNorm)
    data = batches(8)
    train(torch.compile(model, backend=CompileCounterWithBackend('eager')), data[:4])
    train(twin, data[:4])
    want, got = train(twin, data[4:]), train(model, data[4:])   # eager now: the first step reads count_t and batch_t
    for (l1, g1), (l2, g2) in zip(want, got):
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6); torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    assert model[1].host_of is None and model[1].batch == twin[1].batch == 16   # host numbers, the tensors left behind


def test_compiled_steps_after_eager_ones_start_from_the_host_numbers():
    "Eager steps leave the tensors behind; the first compiled step makes them from the host numbers (one more compile)."
    model, twin = cnn(RunningBatchNorm), cnn(RunningBatchNorm)
    data = batches(8)
    train(model, data[:4]); train(twin, data[:4])
    counter = CompileCounterWithBackend('eager')
    want, got = train(twin, data[4:]), train(torch.compile(model, backend=counter), data[4:])
    for (l1, g1), (l2, g2) in zip(want, got):
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6); torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)
    assert counter.frame_count <= 2 and model[1].get_extra_state() == pytest.approx(twin[1].get_extra_state())


def test_compiled_running_batchnorm_evaluates_after_training_with_one_more_compile():
    model = cnn(RunningBatchNorm)
    counter = CompileCounterWithBackend('eager')
    compiled = torch.compile(model, backend=counter)
    train(compiled, batches(3))
    model.eval()
    x = batches(1, seed=5)[0][0]
    with torch.no_grad(): y = compiled(x)
    assert counter.frame_count == 2  # one graph for training, one for evaluation
    with torch.no_grad(): torch.testing.assert_close(y, model(x))


def test_means_and_vars_are_replaced_not_changed_in_place():
    rbn = RunningBatchNorm(3)
    before = {k: (v, v._version) for k, v in rbn.named_buffers() if k in ('means', 'vars')}
    rbn(torch.randn(4, 3, 2, 2))
    for k, (v, version) in before.items():
        assert getattr(rbn, k) is not v and v._version == version, k
    assert rbn.batch_t.dtype == torch.int64 and rbn.count_t.dtype == rbn.means.dtype == torch.float32


def test_count_and_batch_are_saved_as_numbers_and_old_checkpoints_load():
    "The state dict keeps the format of checkpoints where count and batch were Python numbers."
    rbn = RunningBatchNorm(3)
    for bs in (2, 5): rbn(torch.randn(bs, 3, 2, 2))
    state = rbn.state_dict()
    assert set(state) == {'mults', 'adds', 'means', 'vars', '_extra_state'}
    assert state['_extra_state'] == {'count': pytest.approx(rbn.count), 'batch': 7}
    assert isinstance(state['_extra_state']['count'], float) and isinstance(state['_extra_state']['batch'], int)
    old = {'mults': torch.ones(1, 3, 1, 1), 'adds': torch.zeros(1, 3, 1, 1), 'means': torch.zeros(1, 3, 1, 1), 'vars': torch.ones(1, 3, 1, 1), '_extra_state': {'count': 12.5, 'batch': 30}}
    fresh = FastRunningBatchNorm(3)
    fresh.load_state_dict(old)
    count, seen = fresh.state(True)
    assert (fresh.count, fresh.batch) == (12.5, 30) and (count.item(), seen.item()) == (12.5, 30) and seen.dtype == torch.int64


@pytest.mark.parametrize('RBN', [RunningBatchNorm, FastRunningBatchNorm])
def test_momentum_takes_a_tensor_batch_size_without_reading_it(RBN):
    rbn = RBN(3)
    for bs in (1, 2, 5, 32):
        assert rbn.momentum(torch.tensor(bs)).item() == pytest.approx(rbn.momentum(bs), rel=1e-6)


def test_state_follows_the_module_to_another_device_and_dtype():
    rbn = RunningBatchNorm(3).double()
    assert rbn.count_t.dtype == torch.float64 and rbn.batch_t.dtype == torch.int64
    assert RunningBatchNorm(3).half().count_t.dtype == torch.float32   # never narrower than float32
    meta = copy.deepcopy(rbn).to('meta')
    assert meta.count_t.device.type == meta.batch_t.device.type == 'meta'
