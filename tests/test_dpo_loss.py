"""The DPO loss family: hand-computed values, and TRL 1.16's own ``DPOTrainer._compute_loss`` on random inputs."""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from lit_align.losses import DPO_LOSS_TYPES, dpo_loss


def test_sigmoid_at_equal_policy_and_reference_is_ln2():
    """h = 0 when policy == reference, so -log sigmoid(0) = ln 2 and both implicit rewards are 0."""
    logps = torch.tensor([-12.5, -3.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(logps, logps - 1, logps, logps - 1)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))
    assert torch.equal(chosen_rewards, torch.zeros(2)) and torch.equal(rejected_rewards, torch.zeros(2))


def test_sigmoid_and_cdpo_by_hand():
    """Chosen log-ratio +2, rejected -1, beta 0.5: beta h = 1.5. DPO: -log sigmoid(1.5) = log(1 + e^-1.5).
    cDPO with eps 0.1: 0.9 log(1 + e^-1.5) + 0.1 log(1 + e^1.5)."""
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -20.0, -12.0, -19.0))
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    assert chosen_rewards.item() == pytest.approx(1.0) and rejected_rewards.item() == pytest.approx(-0.5)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-1.5)) + 0.1 * math.log1p(math.exp(1.5))
    assert losses.item() == pytest.approx(expected, abs=1e-6)


def test_ipo_and_simpo_are_length_normalised_by_hand():
    """IPO: chosen log-ratio 4 over 4 tokens, rejected -2 over 2 tokens: h' = 1 - (-1) = 2; beta 0.25 gives
    (2 - 1/(2 * 0.25))^2 = 0. SimPO: average log-probs -1 and -3, beta 2, gamma 0.5: -log sigmoid(2 * 2 - 0.5)."""
    n_c, n_r = torch.tensor([4]), torch.tensor([2])
    losses, _, _ = dpo_loss(
        torch.tensor([-4.0]), torch.tensor([-8.0]), torch.tensor([-8.0]), torch.tensor([-6.0]),
        beta=0.25, loss_type="ipo", chosen_lengths=n_c, rejected_lengths=n_r,
    )  # fmt: skip
    assert losses.item() == pytest.approx(0.0, abs=1e-7)
    losses, chosen_rewards, _ = dpo_loss(
        torch.tensor([-4.0]), torch.tensor([-6.0]), None, None,
        beta=2.0, loss_type="simpo", simpo_gamma=0.5, chosen_lengths=n_c, rejected_lengths=n_r,
    )  # fmt: skip
    assert losses.item() == pytest.approx(math.log1p(math.exp(-3.5)), abs=1e-6)
    assert chosen_rewards.item() == pytest.approx(-2.0)


def test_rpo_alpha_adds_per_token_nll_of_chosen():
    """Chosen log-prob -6 over 3 tokens: NLL per token 2; rpo_alpha 0.5 adds 1 to the DPO loss of ln 2."""
    x = torch.tensor([-6.0])
    losses, _, _ = dpo_loss(x, x - 1, x, x - 1, rpo_alpha=0.5, chosen_lengths=torch.tensor([3]),
                            rejected_lengths=torch.tensor([3]))  # fmt: skip
    assert losses.item() == pytest.approx(math.log(2) + 1.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_is_fp32_and_finite_for_half_precision_inputs(dtype):
    big = torch.tensor([-3000.0, -10.0], dtype=dtype)
    for loss_type in DPO_LOSS_TYPES:
        smoothing = 1e-3 if loss_type == "exo_pair" else 0.0
        n = torch.tensor([100, 5])
        losses, cr, rr = dpo_loss(big, big.flip(0), big.flip(0), big, loss_type=loss_type, label_smoothing=smoothing,
                                  chosen_lengths=n, rejected_lengths=n)  # fmt: skip
        assert losses.dtype == torch.float32 and cr.dtype == torch.float32, loss_type
        assert torch.isfinite(losses).all(), loss_type  # even at a log-ratio of thousands


def test_bad_arguments_are_named():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown DPO loss_type 'dpo'"):
        dpo_loss(x, x, x, x, loss_type="dpo")
    with pytest.raises(ValueError, match="needs reference log-probs"):
        dpo_loss(x, x, None, None)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="exo_pair"):
        dpo_loss(x, x, x, x, loss_type="exo_pair")


# ----- against TRL ---------------------------------------------------------------------------------------------------
def _trl_loss(loss_type, beta, label_smoothing, pc, pr, rc, rr, n_c, n_r, discopop_tau=0.05):
    """TRL's ``DPOTrainer._compute_loss`` itself, on a stand-in model whose per-token log-probs sum to the given
    sequence log-probs over completions of the given lengths (precomputed-reference mode)."""
    from trl import DPOTrainer

    pairs, length = len(pc), int(max(n_c.max(), n_r.max())) + 2
    lengths = torch.cat([n_c, n_r])
    completion_mask = (torch.arange(length) >= 1) & (torch.arange(length) <= lengths[:, None])
    shift_mask = completion_mask[:, 1:].float()
    per_token = shift_mask * (torch.cat([pc, pr]) / lengths)[:, None]
    zeros = torch.zeros_like(per_token)

    class Model:
        training = True

        def __call__(self, **kwargs):
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer = SimpleNamespace(
        model=Model(),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        args=SimpleNamespace(discopop_tau=discopop_tau),
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(2 * pairs, length, dtype=torch.long),
        "attention_mask": torch.ones(2 * pairs, length, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics


TRL_TYPES = [t for t in DPO_LOSS_TYPES if t not in ("simpo", "orpo")]  # in TRL's CPO and ORPO trainers, not DPO


@pytest.mark.parametrize("loss_type", TRL_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_every_loss_type_matches_trl(loss_type, beta):
    pytest.importorskip("trl", minversion="1.16")  # a test dependency (the [test] extra): present in CI
    generator = torch.Generator().manual_seed(zlib.crc32(f"{loss_type}{beta}".encode()))
    pairs = 6
    pc, pr, rc, rr = (-(torch.rand(pairs, generator=generator, dtype=torch.float64) * 40).float() for _ in range(4))
    n_c = torch.randint(1, 30, (pairs,), generator=generator)
    n_r = torch.randint(1, 30, (pairs,), generator=generator)
    smoothing = {"robust": 0.2, "exo_pair": 1e-3}.get(loss_type, 0.0)
    expected, metrics = _trl_loss(loss_type, beta, smoothing, pc, pr, rc, rr, n_c, n_r)
    # TRL sums the log-probs token by token, so compare with the sums it actually saw.
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=smoothing,
        chosen_lengths=n_c, rejected_lengths=n_r,
    )  # fmt: skip
    assert losses.mean().item() == pytest.approx(expected.item(), abs=1e-6, rel=1e-6)
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
    assert (chosen_rewards > rejected_rewards).float().mean().item() == pytest.approx(metrics["rewards/accuracies"])


# ----- ORPO ----------------------------------------------------------------------------------------------------------
def _trl_orpo(beta, chosen_avg, rejected_avg, chosen_token_logps):
    """TRL's ``ORPOTrainer.odds_ratio_loss`` itself, and its loss ``nll - mean(odds-ratio term)`` with the NLL as TRL
    computes it: cross-entropy over the batch's chosen tokens."""
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, chosen_rewards, rejected_rewards, ratio, log_odds = ORPOTrainer.odds_ratio_loss(
        trainer, chosen_avg, rejected_avg
    )
    nll = -torch.cat(chosen_token_logps).mean()
    return nll - losses.mean(), losses, chosen_rewards, log_odds  # log_odds: TRL's batch mean


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trls_odds_ratio_loss(beta):
    """Per pair, ORPO's odds-ratio term equals TRL 1.16's ``odds_ratio_loss`` on random average log-probs (near 0
    too, where ``log(1 - e^a)`` cancels); with equal chosen lengths the whole loss equals TRL's ``nll - mean(term)``
    (TRL's NLL is the mean over the batch's chosen tokens; ours is per example, the same here)."""
    pytest.importorskip("trl", minversion="1.16")
    from lit_align.losses import orpo_log_odds_ratio

    generator = torch.Generator().manual_seed(11)
    pairs, length = 7, 5
    token_c = -torch.rand(pairs, length, generator=generator, dtype=torch.float64) * 3
    token_c[0] = -1e-4  # a response the policy is almost sure of: P close to 1
    n_c = torch.full((pairs,), length)
    n_r = torch.randint(1, 30, (pairs,), generator=generator)
    pr = -torch.rand(pairs, generator=generator, dtype=torch.float64) * 40
    pc = token_c.sum(-1)
    expected, trl_terms, trl_chosen_rewards, trl_log_odds = _trl_orpo(beta, pc / n_c, pr / n_r, list(token_c))
    losses, chosen_rewards, _ = dpo_loss(pc, pr, None, None, beta=beta, loss_type="orpo", chosen_lengths=n_c,
                                         rejected_lengths=n_r)  # fmt: skip
    log_odds, term = orpo_log_odds_ratio(pc / n_c, pr / n_r)
    assert torch.allclose(beta * term.double(), trl_terms.double(), atol=1e-6)
    assert log_odds.mean().item() == pytest.approx(trl_log_odds.item(), abs=1e-5)  # TRL returns the batch mean
    assert losses.mean().item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.allclose(chosen_rewards, trl_chosen_rewards.float(), atol=1e-6)


def test_orpo_by_hand():
    """One pair, average log-probs ``a_w = ln 0.5`` and ``a_l = ln 0.25``: odds 1 and 1/3, log odds ratio ln 3, loss
    ``-ln 0.5 - beta log sigmoid(ln 3) = ln 2 - beta ln 0.75``; reference-free (no reference log-probs)."""
    losses, _, _ = dpo_loss(torch.tensor([2 * math.log(0.5)]), torch.tensor([3 * math.log(0.25)]), None, None,
                            beta=0.5, loss_type="orpo", chosen_lengths=torch.tensor([2]),
                            rejected_lengths=torch.tensor([3]))  # fmt: skip
    assert losses.item() == pytest.approx(math.log(2) - 0.5 * math.log(0.75), rel=1e-6)


def test_orpo_gradient_is_finite_for_a_response_the_policy_is_certain_of():
    """fp32 log-softmax returns exactly 0 for a token whose logit leads by ~17; an average log-prob of 0 makes
    ``log(1 - e^0) = -inf``: the average is capped just below 0, so the loss and its gradient stay finite."""
    chosen = torch.tensor([0.0, -3.0], requires_grad=True)
    losses, _, _ = dpo_loss(chosen, torch.tensor([-5.0, -4.0]), None, None, beta=0.1, loss_type="orpo",
                            chosen_lengths=torch.tensor([2, 3]), rejected_lengths=torch.tensor([2, 3]))  # fmt: skip
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()
