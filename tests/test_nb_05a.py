"""Behaviour of every name exported by nb_05a: stable logsumexp / log_softmax and the multi-label loss,
checked against torch and torch.nn.functional on random and on extreme logits."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from exp.nb_05a import binary_cross_entropy_with_logits, log_softmax, logsumexp, multilabel_loss

TOL = dict(rtol=1e-5, atol=1e-5)
SHAPES = [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 5)]
EXTREME = [100., 1e4]


def close(a, b, **kw):
    torch.testing.assert_close(a, b, **{**TOL, **kw})


def randn(*shape, scale=3., seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def extreme_logits(big):
    "Rows of huge logits: all positive, all negative, mixed, tied at the top, and with small ones."
    return torch.tensor([[big, big / 2, -big, 0., 1.],
                         [big, big, big, big, big],
                         [-big, -big, -big, -big, -big],
                         [-big, -big / 2, 0., big / 2, big],
                         [big, big, -big, 5., -5.],
                         [-big, 3., -big, -2., 0.5]])


def value_and_grad(f, x):
    "f(x) and the gradient of f(x).sum() with respect to x."
    x = x.detach().clone().requires_grad_()
    res = f(x)
    return res.detach(), torch.autograd.grad(res.sum(), x)[0]


def dims(shape): return range(-len(shape), len(shape))


# --- what the module exports ---------------------------------------------------------------------

def test_exports_the_four_functions_and_nb_05():
    names = {}
    exec('from exp.nb_05a import *', names)
    for n in ['logsumexp', 'log_softmax', 'binary_cross_entropy_with_logits', 'multilabel_loss',
              'Runner', 'test_eq', 'F', 'torch']:
        assert n in names, n
    for n in ['SlowCalculator', 'SloppyAdder', 'slow_calculation', 'naive_bce', '_finite_max']:
        assert n not in names, n


def test_functions_have_docstrings():
    for f in (logsumexp, log_softmax, binary_cross_entropy_with_logits, multilabel_loss):
        assert f.__doc__ and '\n' not in f.__doc__.strip()


# --- logsumexp -------------------------------------------------------------------------------------

@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('keepdim', [False, True])
def test_logsumexp_matches_torch_on_random_inputs(shape, keepdim):
    x = randn(*shape)
    for dim in dims(shape):
        res = logsumexp(x, dim, keepdim=keepdim)
        close(res, torch.logsumexp(x, dim, keepdim=keepdim))


def test_logsumexp_defaults_to_last_dim_without_keepdim():
    x = randn(3, 4)
    assert logsumexp(x).shape == (3,)
    close(logsumexp(x), torch.logsumexp(x, -1))
    assert logsumexp(x, 0, keepdim=True).shape == (1, 4)


def test_logsumexp_of_small_values_is_the_naive_formula():
    x = torch.tensor([[0., 0.], [1., 2.]])
    close(logsumexp(x), x.exp().sum(-1).log())
    close(logsumexp(x)[0], torch.tensor(math.log(2.)))


@pytest.mark.parametrize('big', EXTREME)
def test_logsumexp_extreme_logits_finite_and_equal_to_torch(big):
    x = extreme_logits(big)
    res = logsumexp(x)
    assert res.isfinite().all()
    close(res, torch.logsumexp(x, -1))
    close(res, torch.logsumexp(x.double(), -1).float())
    assert not x.exp().sum(-1).log().isfinite().all()  # the naive formula fails on these


def test_logsumexp_all_minus_inf_row_is_minus_inf_not_nan():
    x = torch.tensor([[-math.inf, -math.inf, -math.inf], [-math.inf, 0., 1.], [-math.inf, -math.inf, 2.]])
    res = logsumexp(x)
    assert not res.isnan().any()
    assert res[0] == -math.inf
    close(res, torch.logsumexp(x, -1))


def test_logsumexp_plus_inf_gives_plus_inf():
    x = torch.tensor([[math.inf, 0.], [math.inf, -math.inf]])
    close(logsumexp(x), torch.logsumexp(x, -1))


@pytest.mark.parametrize('shape', SHAPES)
def test_logsumexp_gradient_is_softmax_and_matches_torch(shape):
    x = randn(*shape, seed=1)
    for dim in dims(shape):
        _, g = value_and_grad(lambda x: logsumexp(x, dim), x)
        _, g_ref = value_and_grad(lambda x: torch.logsumexp(x, dim), x)
        close(g, g_ref)
        close(g, x.softmax(dim))


@pytest.mark.parametrize('big', EXTREME)
def test_logsumexp_gradient_finite_at_extreme_logits(big):
    x = extreme_logits(big)
    _, g = value_and_grad(logsumexp, x)
    assert g.isfinite().all()
    _, g64 = value_and_grad(lambda x: torch.logsumexp(x, -1), x.double())
    close(g, g64.float())
    # torch's float32 gradient, exp(x - result), inherits the rounding of a result near 1e4 (~1e-4)
    _, g32 = value_and_grad(lambda x: torch.logsumexp(x, -1), x)
    close(g, g32, atol=1e-5 if big <= 100 else 5e-4)
    close(g[4, :2], torch.tensor([0.5, 0.5]))  # two tied maxima share the gradient exactly


def test_logsumexp_keeps_dtype():
    x = randn(3, 4, dtype=torch.float64)
    assert logsumexp(x).dtype == torch.float64
    torch.testing.assert_close(logsumexp(x), torch.logsumexp(x, -1), rtol=1e-12, atol=1e-12)


# --- log_softmax -----------------------------------------------------------------------------------

@pytest.mark.parametrize('shape', SHAPES)
def test_log_softmax_matches_F_on_random_inputs(shape):
    x = randn(*shape, seed=2)
    for dim in dims(shape):
        res = log_softmax(x, dim)
        assert res.shape == x.shape
        close(res, F.log_softmax(x, dim))
        close(res.exp().sum(dim), torch.ones(()).expand_as(res.sum(dim)))


def test_log_softmax_defaults_to_last_dim():
    x = randn(3, 4)
    close(log_softmax(x), F.log_softmax(x, -1))


@pytest.mark.parametrize('big', EXTREME)
def test_log_softmax_extreme_logits_finite_and_equal_to_F(big):
    x = extreme_logits(big)
    res = log_softmax(x)
    assert res.isfinite().all()
    close(res, F.log_softmax(x, -1))
    close(res, F.log_softmax(x.double(), -1).float())


def test_log_softmax_subtracts_the_max_before_rounding():
    "Near 1e4 float32 is spaced ~1e-3 apart: log(1/2) must not come out as -0.6934."
    x = torch.tensor([[1e4, 1e4], [-1e4, -1e4]])
    close(log_softmax(x), torch.full((2, 2), math.log(0.5)), atol=1e-6, rtol=0)


@pytest.mark.parametrize('big', EXTREME)
def test_log_softmax_gradient_finite_and_equal_to_F(big):
    for x in (extreme_logits(big), randn(4, 6, seed=3)):
        _, g = value_and_grad(log_softmax, x)
        assert g.isfinite().all()
        _, g_ref = value_and_grad(lambda x: F.log_softmax(x, -1), x)
        close(g, g_ref)


def test_log_softmax_with_minus_inf_entries_matches_F():
    x = torch.tensor([[-math.inf, 0., 1.], [2., -math.inf, -math.inf]])
    res = log_softmax(x)
    assert not res.isnan().any()
    close(res, F.log_softmax(x, -1))


def test_log_softmax_gives_cross_entropy():
    x, y = randn(5, 7, seed=4), torch.tensor([0, 6, 3, 3, 1])
    close(-log_softmax(x)[range(5), y].mean(), F.cross_entropy(x, y))


# --- binary_cross_entropy_with_logits --------------------------------------------------------------

@pytest.mark.parametrize('shape', SHAPES)
def test_bce_with_logits_matches_F_with_soft_targets(shape):
    x = randn(*shape, seed=5)
    y = torch.rand(*shape, generator=torch.Generator().manual_seed(6))
    res = binary_cross_entropy_with_logits(x, y)
    assert res.shape == ()
    close(res, F.binary_cross_entropy_with_logits(x, y))


def test_bce_with_logits_is_the_mean_of_the_definition():
    x, y = randn(4, 3, seed=7), torch.rand(4, 3, generator=torch.Generator().manual_seed(8))
    p = x.sigmoid()
    close(binary_cross_entropy_with_logits(x, y), (-(y * p.log() + (1 - y) * (1 - p).log())).mean())


@pytest.mark.parametrize('big', EXTREME)
def test_bce_with_logits_extreme_logits_finite_and_equal_to_F(big):
    x = extreme_logits(big)
    g = torch.Generator().manual_seed(9)
    for y in (torch.zeros_like(x), torch.ones_like(x), torch.randint(0, 2, x.shape, generator=g).float(),
              torch.rand(x.shape, generator=g)):
        res = binary_cross_entropy_with_logits(x, y)
        assert res.isfinite()
        close(res, F.binary_cross_entropy_with_logits(x, y))
        # and elementwise, through a one-element mean
        for xi, yi in zip(x.flatten(), y.flatten()):
            close(binary_cross_entropy_with_logits(xi[None], yi[None]),
                  F.binary_cross_entropy_with_logits(xi[None], yi[None]))


@pytest.mark.parametrize('big', EXTREME)
def test_bce_with_logits_gradient_finite_and_equal_to_F(big):
    x = extreme_logits(big)
    y = torch.rand(x.shape, generator=torch.Generator().manual_seed(10))
    _, g = value_and_grad(lambda x: binary_cross_entropy_with_logits(x, y), x)
    assert g.isfinite().all()
    _, g_ref = value_and_grad(lambda x: F.binary_cross_entropy_with_logits(x, y), x)
    close(g, g_ref)
    close(g, (x.sigmoid() - y) / x.numel())


def test_bce_with_logits_gradient_at_exactly_zero_logits():
    "sigmoid(0) - y = 0.5 - y: a `clamp_min(0)` formulation gives 1 - y here."
    x, y = torch.zeros(3), torch.tensor([0., 0.5, 1.])
    _, g = value_and_grad(lambda x: binary_cross_entropy_with_logits(x, y), x)
    close(g * 3, torch.tensor([0.5, 0., -0.5]))


def test_bce_with_logits_keeps_tiny_losses_of_confident_right_answers():
    "log1p: the loss of logit 30 for target 1 is e^-30, not 0 (relative error, no absolute slack)."
    x = torch.tensor([20., 30., 50., -20., -30., -50.])
    y = (x > 0).float()
    exact = torch.tensor([math.log1p(math.exp(-abs(v))) for v in x.tolist()])
    for xi, yi, ei in zip(x, y, exact):
        res = binary_cross_entropy_with_logits(xi[None], yi[None])
        assert res > 0
        torch.testing.assert_close(res, ei, rtol=1e-5, atol=0)
    torch.testing.assert_close(binary_cross_entropy_with_logits(x[:3], y[:3]),
                               F.binary_cross_entropy_with_logits(x[:3], y[:3]), rtol=1e-5, atol=0)


def test_bce_with_logits_accepts_int_and_bool_targets():
    x = randn(3, 4, seed=11)
    y = torch.randint(0, 2, (3, 4), generator=torch.Generator().manual_seed(12))
    expected = F.binary_cross_entropy_with_logits(x, y.float())
    close(binary_cross_entropy_with_logits(x, y), expected)
    close(binary_cross_entropy_with_logits(x, y.bool()), expected)


def test_bce_with_logits_keeps_dtype():
    x, y = randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    res = binary_cross_entropy_with_logits(x, y)
    assert res.dtype == torch.float64
    torch.testing.assert_close(res, F.binary_cross_entropy_with_logits(x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('yshape', [(2,), (2, 5, 1), (5,), (2, 1), (1, 5)])
def test_bce_with_logits_shape_mismatch_is_a_clear_error(yshape):
    "Also shapes that would broadcast: a silent broadcast would give a wrong loss."
    with pytest.raises(ValueError, match=r'same shape.*\(2, 5\).*' + re.escape(str(tuple(yshape)))):
        binary_cross_entropy_with_logits(torch.zeros(2, 5), torch.zeros(yshape))


# --- multilabel_loss -------------------------------------------------------------------------------

def test_multilabel_loss_lesson_example():
    out = torch.tensor([[0.02, -2.49, -1.75, 2.07, 1.25], [-1.42, -3.93, -3.19, 0.63, -0.19]])
    targ = torch.tensor([[0, 0, 0, 1, 1], [1, 0, 0, 1, 1]])
    res = multilabel_loss(out, targ)
    close(res, F.binary_cross_entropy_with_logits(out, targ.float()))
    close(res, torch.tensor(0.4230), atol=1e-4, rtol=0)


@pytest.mark.parametrize('shape', [(4, 5), (8, 3), (1, 10)])
def test_multilabel_loss_matches_F_and_averages_labels_then_items(shape):
    g = torch.Generator().manual_seed(13)
    x, y = torch.randn(shape, generator=g) * 4, torch.randint(0, 2, shape, generator=g)
    res = multilabel_loss(x, y)
    close(res, F.binary_cross_entropy_with_logits(x, y.float()))
    per_label = F.binary_cross_entropy_with_logits(x, y.float(), reduction='none')
    close(res, per_label.mean(1).mean(0))


@pytest.mark.parametrize('big', EXTREME)
def test_multilabel_loss_extreme_logits(big):
    x = extreme_logits(big)
    y = (x > 0).long()
    y[0] = 0  # an item with no label at all
    res, g = value_and_grad(lambda x: multilabel_loss(x, y), x)
    assert res.isfinite() and g.isfinite().all()
    close(res, F.binary_cross_entropy_with_logits(x, y.float()))
    _, g_ref = value_and_grad(lambda x: F.binary_cross_entropy_with_logits(x, y.float()), x)
    close(g, g_ref)


def test_multilabel_loss_scores_every_label_unlike_softmax_cross_entropy():
    x = randn(3, 5, seed=14)
    y = torch.zeros(3, 5)
    y[0, [1, 3]] = 1  # two labels
    y[2, 4] = 1       # one label; item 1 has none
    base = multilabel_loss(x, y)
    # adding a constant to every logit of an item leaves softmax unchanged but not the sigmoids
    shifted = x + torch.tensor([[2.], [0.], [0.]])
    assert not torch.isclose(multilabel_loss(shifted, y), base)
    close(F.cross_entropy(shifted, y.argmax(1)), F.cross_entropy(x, y.argmax(1)))
    # confident right answers for every label, including "none", give a loss near zero
    assert multilabel_loss((y * 2 - 1) * 20, y) < 1e-8


def test_multilabel_loss_shape_mismatch():
    "Class indices, as softmax cross-entropy takes them, are refused."
    with pytest.raises(ValueError, match='same shape'):
        multilabel_loss(torch.zeros(4, 3), torch.tensor([0, 2, 1, 1]))



# --- the notebook's own cells: what **kwargs hides, reading the source ----------------------------

def notebook_cells(*cell_ids, nb='nbs/05a_foundations.ipynb'):
    "The sources of the cells with ids `cell_ids` in notebook `nb` (relative to the repository), joined."
    import json, pathlib
    cells = {c['id']: ''.join(c['source']) for c in json.loads((pathlib.Path(__file__).parent.parent / nb).read_text())['cells']}
    return '\n'.join(cells[i] for i in cell_ids)


def run_05a_cells(*cell_ids):
    ns = {}
    exec('from exp.nb_05a import *\nimport inspect', ns)
    exec(notebook_cells(*cell_ids), ns)
    return ns


def test_kwargs_swallow_a_misspelt_keyword_and_the_two_fixes_refuse_it(capsys):
    run_05a_cells('449590fe')
    assert capsys.readouterr().out.splitlines() == ["Brilliant! We've finished epoch 1!", "Awesome! We've finished epoch 2!"]
    ns = run_05a_cells('449590fe', '528fc868', '22b6b104')
    out = capsys.readouterr().out
    assert "TypeError: show_progress() got an unexpected keyword argument 'exclamaton'" in out
    assert "when the callback is made, TypeError: progress_callback: unknown keyword argument(s) ['exclamaton']" in out
    assert "show_progress takes ['exclamation']" in out
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['lr'\]"): ns['progress_callback'](exclamation='Hi', lr=0.1)


def test_reading_the_source_cells_show_get_dls_and_kaimings_code_without_its_docstring(capsys):
    ns = run_05a_cells('60e6d655', '6ecdd7e4')
    out = capsys.readouterr().out
    assert 'def get_dls(train_ds, valid_ds, bs, **kwargs):' in out
    assert "DataLoader takes ['ds', 'sampler', 'collate_fn']" in out and "unexpected keyword argument 'colate_fn'" in out
    assert 'torch/nn/init.py' in out and 'std = gain / math.sqrt(fan)' in out and 'Kaiming normal distribution' not in out
    def documented(x):
        "Doc."
        return x
    def bare(x): return x
    assert ns['source_code'](documented) == '    def documented(x):\n        return x\n'
    assert ns['source_code'](bare).strip() == 'def bare(x): return x'
