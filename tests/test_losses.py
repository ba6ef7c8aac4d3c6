"""Pure maths, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from lit_align.losses import masked_mean, selective_log_softmax, sequence_logps, sft_loss, token_logps
from lit_align.ops import IGNORE_INDEX


def test_masked_mean_by_hand_and_empty_mask_is_zero():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(1.5)
    assert torch.allclose(masked_mean(values, mask, dim=1), torch.tensor([1.5, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_selective_log_softmax_matches_log_softmax(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 50) * 4).to(dtype)
    index = torch.randint(0, 50, (3, 5))
    expected = torch.log_softmax(logits.float(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    got = selective_log_softmax(logits, index)
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-5)


def test_token_and_sequence_logps_by_hand():
    """Vocabulary of 2 with logits (0, ln 3): p(token 1) = 3/4, p(token 0) = 1/4. Sequence [bos, 1, 0] with the
    first label masked: logps of tokens 1 and 0 are ln 3/4 and ln 1/4; the pad position is masked out."""
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(1, 4, 2)
    labels = torch.tensor([[IGNORE_INDEX, 1, 0, IGNORE_INDEX]])
    logps, mask = token_logps(logits, labels)
    assert mask.tolist() == [[True, True, False]]
    assert torch.allclose(logps, torch.tensor([[math.log(0.75), math.log(0.25), 0.0]]))
    total, n = sequence_logps(logits, labels)
    assert total.item() == pytest.approx(math.log(0.75) + math.log(0.25)) and n.item() == 2


def test_sft_loss_by_hand():
    """Same set-up: mean NLL over the two labelled tokens = -(ln 3/4 + ln 1/4) / 2; the argmax is token 1, so one
    of the two predictions is right."""
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(1, 4, 2)
    labels = torch.tensor([[IGNORE_INDEX, 1, 0, IGNORE_INDEX]])
    loss, correct, n = sft_loss(logits, labels)
    assert loss.item() == pytest.approx(-(math.log(0.75) + math.log(0.25)) / 2)
    assert correct.item() == 1 and n.item() == 2


def test_sft_loss_with_no_labels_is_zero_not_nan():
    loss, _, n = sft_loss(torch.randn(1, 3, 4, requires_grad=True), torch.full((1, 3), IGNORE_INDEX))
    assert n.item() == 0 and loss.item() == 0.0


def test_linear_log_probs_gradients_temperature_entropy_and_frozen_head():
    """The tiled log-probs match log_softmax((h W^T) / T) gathered, their gradients pass torch's numerical check
    (tiles smaller than the rows), the entropy matches the full softmax's, and a frozen head needs no weight grad."""
    from lit_align.losses import linear_log_probs

    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (7,))
    assert torch.autograd.gradcheck(lambda h, w, b: linear_log_probs(h, w, t, b, budget=22, temperature=0.7), (h, w, b))
    logps, correct, entropy = linear_log_probs(h, w, t, b, temperature=0.7, return_correct=True, return_entropy=True)
    full = torch.log_softmax((h @ w.T + b) / 0.7, -1)
    assert torch.allclose(logps, full.gather(-1, t[:, None]).squeeze(-1))
    assert torch.allclose(entropy, -(full.exp() * full).sum(-1))
    assert torch.equal(correct, full.argmax(-1) == t)
    hidden = h.detach().requires_grad_(True)
    linear_log_probs(hidden, w.detach(), t).sum().backward()
    assert hidden.grad is not None
