"""GKD's generalized JSD (Agarwal et al. 2024): by hand at the ends (beta 0 and 1 are the forward and reverse KL),
against TRL 1.16's own ``GKDTrainer.generalized_jsd_loss`` and ``ChunkedDivergenceFunction`` on random inputs, and
the tiled version through both unembeddings equal to the untiled one, value and gradient, while never holding a
``[tokens, vocabulary]`` tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from lit_align.losses import generalized_jsd, generalized_jsd_loss, linear_generalized_jsd
from lit_align.ops import IGNORE_INDEX

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


def _logits(*shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 2, torch.randn(*shape, generator=g, dtype=dtype) * 2


def test_the_ends_are_forward_and_reverse_kl_and_the_middle_is_symmetric_by_hand():
    """Two distributions over three tokens, p_S = (0.5, 0.25, 0.25) and p_T = (0.25, 0.25, 0.5): beta = 0 is
    KL(p_T || p_S) = 0.25 ln 0.5 + 0.5 ln 2 = 0.25 ln 2; beta = 1 is KL(p_S || p_T) = 0.5 ln 2 + 0.25 ln 0.5 =
    0.25 ln 2 too (this pair is a mirror image); beta = 0.5 is the JSD with M = (3/8, 1/4, 3/8):
    0.5 (0.25 ln(2/3) + 0.5 ln(4/3)) + 0.5 (0.5 ln(4/3) + 0.25 ln(2/3)) = 0.75 ln(4/3) - 0.25 ln(3/2) ... per side,
    and a divergence of a distribution from itself is 0 for every beta."""
    import math

    ps = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    pt = torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64)
    s, t = ps.log(), pt.log()
    assert generalized_jsd(s, t, beta=0.0).item() == pytest.approx(0.25 * math.log(2), abs=1e-12)
    assert generalized_jsd(s, t, beta=1.0).item() == pytest.approx(0.25 * math.log(2), abs=1e-12)
    m = 0.5 * (ps + pt)
    jsd = 0.5 * (pt * (pt / m).log()).sum() + 0.5 * (ps * (ps / m).log()).sum()
    expected = 0.5 * (0.25 * math.log(2 / 3) + 0.5 * math.log(4 / 3)) * 2
    assert jsd.item() == pytest.approx(expected, abs=1e-12)
    assert generalized_jsd(s, t, beta=0.5).item() == pytest.approx(expected, abs=1e-12)
    # an asymmetric pair tells the ends apart: forward KL(p_T || p_S) at beta = 0
    pt2 = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    assert generalized_jsd(s, pt2.log(), beta=0.0).item() == pytest.approx((pt2 * (pt2 / ps).log()).sum().item())
    assert generalized_jsd(s, pt2.log(), beta=1.0).item() == pytest.approx((ps * (ps / pt2).log()).sum().item())
    for beta in BETAS:
        assert generalized_jsd(s, s, beta=beta).item() == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ValueError, match="beta=1.5"):
        generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="temperature=0"):
        generalized_jsd(s, t, temperature=0)


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("beta", BETAS)
def test_matches_trls_gkd_loss(beta, reduction):
    """``generalized_jsd_loss`` equals TRL 1.16's ``GKDTrainer.generalized_jsd_loss`` (fp64, 1e-6 here 1e-12) on
    random logits with a label mask, at a temperature, for every reduction and the global-count normaliser."""
    pytest.importorskip("trl", minversion="1.16")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher = _logits(3, 7, 11)
    labels = torch.randint(0, 11, (3, 7), generator=torch.Generator().manual_seed(1))
    labels[0, :3] = IGNORE_INDEX
    labels[2, 5:] = IGNORE_INDEX
    for kwargs in ({"labels": labels}, {}):
        ours = generalized_jsd_loss(student, teacher, beta=beta, temperature=0.7, reduction=reduction, **kwargs)
        trl = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=0.7, reduction=reduction,
                                              **kwargs)  # fmt: skip
        assert ours.shape == trl.shape
        assert torch.allclose(ours, trl, atol=1e-12, rtol=0), (ours, trl)
    ours = generalized_jsd_loss(student, teacher, labels, beta=beta, n_tokens=40)
    trl = GKDTrainer.generalized_jsd_loss(student, teacher, labels, beta=beta, num_items_in_batch=40)
    assert torch.allclose(ours, trl, atol=1e-12, rtol=0)
    # the batchmean is the mean per-token divergence
    per_token = generalized_jsd(student, teacher, beta=beta, temperature=0.7)[labels != IGNORE_INDEX]
    batchmean = generalized_jsd_loss(student, teacher, labels, beta=beta, temperature=0.7)
    assert torch.allclose(per_token.mean(), batchmean, atol=1e-12)


def _heads(m=37, h_s=16, h_t=24, v=53, dtype=torch.float64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return {
        "student_hidden": make(m, h_s).requires_grad_(), "student_weight": (make(v, h_s) * 0.5).requires_grad_(),
        "teacher_hidden": make(m, h_t), "teacher_weight": make(v, h_t) * 0.7,
        "student_bias": make(v).requires_grad_() if bias else None, "teacher_bias": make(v) if bias else None,
    }  # fmt: skip


def _untiled(x, beta, temperature):
    student = F.linear(x["student_hidden"], x["student_weight"], x["student_bias"])
    teacher = F.linear(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"])
    return generalized_jsd(student, teacher, beta=beta, temperature=temperature)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("beta", BETAS)
def test_tiled_divergence_and_gradient_equal_the_untiled(beta, dtype, tol):
    """Tiles of 2 rows (a budget of 4 V logits over 37 positions: 19 tiles, the last one short): the per-token
    divergence and, for a random weighting of the tokens, the gradients with respect to the student's hidden states,
    unembedding weight and bias equal the untiled computation's (fp64 1e-6, fp32 1e-5); the teacher (of another
    hidden width) gets no gradient."""
    x = _heads(dtype=dtype)
    weights = torch.rand(37, generator=torch.Generator().manual_seed(3), dtype=dtype)
    tiled = linear_generalized_jsd(**x, beta=beta, temperature=0.8, budget=4 * 53)
    grads = torch.autograd.grad((tiled * weights).sum(), [x["student_hidden"], x["student_weight"], x["student_bias"]])
    untiled = _untiled(x, beta, 0.8)
    expected = torch.autograd.grad((untiled * weights).sum(),
                                   [x["student_hidden"], x["student_weight"], x["student_bias"]])  # fmt: skip
    assert tiled.dtype == untiled.dtype
    assert torch.allclose(tiled, untiled, atol=tol, rtol=0)
    for got, want in zip(grads, expected):
        assert torch.allclose(got, want, atol=tol, rtol=0), (got - want).abs().max()


def test_tiled_without_biases_and_a_tile_of_everything():
    """No biases, and a budget larger than all the logits (one tile): still the untiled values and gradient."""
    x = _heads(bias=False)
    tiled = linear_generalized_jsd(**x, beta=0.5)
    (grad,) = torch.autograd.grad(tiled.sum(), [x["student_weight"]])
    untiled = _untiled(x, 0.5, 1.0)
    (expected,) = torch.autograd.grad(untiled.sum(), [x["student_weight"]])
    assert torch.allclose(tiled, untiled, atol=1e-10) and torch.allclose(grad, expected, atol=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_matches_trls_chunked_divergence(beta):
    """The tiled divergence equals TRL 1.16's ``ChunkedDivergenceFunction`` (``DistillationTrainer``'s loss, its
    torch path; fp32 throughout there) and so does the gradient to the student's hidden states and weight (1e-5
    absolute and relative: fp32 sums of gradients up to about 6)."""
    pytest.importorskip("trl", minversion="1.16")
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    x = _heads(dtype=torch.float32)
    ours = linear_generalized_jsd(**x, beta=beta, temperature=0.9, budget=8 * 53)
    student = (x["student_hidden"], x["student_weight"], x["student_bias"])
    trl, _ = ChunkedDivergenceFunction.apply(*student, x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"],
                                             beta, 0.9)  # fmt: skip
    assert torch.allclose(ours, trl, atol=1e-5, rtol=0)
    inputs = [x["student_hidden"], x["student_weight"]]
    for got, want in zip(torch.autograd.grad(ours.sum(), inputs), torch.autograd.grad(trl.sum(), inputs)):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)  # fp32 sums over 37 rows of gradients up to ~6


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_a_large_vocabulary_is_never_held_as_tokens_by_vocabulary():
    """256 positions over a vocabulary of 32,768 (8.4 M logits per model): with a budget of 2^20 logits the forward
    and backward run in tiles of 16 rows, and no operation produces a tensor larger than one tile of one model
    (16 x 32,768 elements, 1/16 of the logits; the weights, 32,768 x 8, are smaller), while the untiled computation
    makes 256 x 32,768 ones. The values still agree (fp32, 1e-5)."""
    m, v = 256, 32768
    x = _heads(m=m, h_s=8, h_t=8, v=v, dtype=torch.float32, bias=False)
    with _LargestTensor() as tiled_mode:
        tiled = linear_generalized_jsd(**x, beta=0.5, budget=1 << 20)
        tiled.sum().backward()
    rows = (1 << 20) // (2 * v)
    assert rows == 16 and tiled_mode.largest == rows * v  # > 1 tile: 16 of them
    with _LargestTensor() as untiled_mode:
        untiled = _untiled(x, 0.5, 1.0)
    assert untiled_mode.largest >= m * v
    assert torch.allclose(tiled, untiled.detach(), atol=1e-5)


def test_mismatched_vocabularies_are_refused():
    """A teacher whose unembedding has another number of rows: an error naming both sizes."""
    x = _heads()
    x["teacher_weight"] = x["teacher_weight"][:50]
    x["teacher_bias"] = None
    with pytest.raises(ValueError, match="53 rows and the teacher's 50"):
        linear_generalized_jsd(**x)
