"""Held-out evaluation of trained policies, the same way for each: on the same held-out prompts, the mean reward of
their samples under a trained reward model, their KL to a baseline policy (the SFT policy), their win rate against
the baseline's samples judged by that reward model, and, where the data has reference answers (GSM8K), the
accuracy of their greedy answers.

Every number is computed from the samples themselves (no training-time metric is reused), so that SFT, PPO, DPO and
GRPO policies, trained on different data with different objectives, are measured on one scale:

- ``reward``: ``mean_x r(x, y)``, ``y ~ pi(.|x)`` at temperature 1 (the RL objective's first term);
- ``kl``: ``mean_x sum_t [log pi(y_t|x, y_<t) - log pi_base(y_t|x, y_<t)]`` on the same samples, the Monte Carlo
  estimate of ``KL(pi || pi_base)`` per sequence in nats (InstructGPT's KL to the SFT policy);
- ``win_rate``: the share of prompts whose sample the reward model prefers to the baseline's sample for the same
  prompt, ties counted half (0.5 for the baseline itself), with its standard error ``win_rate_se`` over prompts;
- ``accuracy``: the share of greedy answers whose final number equals the reference's
  (:class:`~lit_align.rewards.NumericAnswerReward`).

The comparison is paired: every policy draws prompt ``i``'s sample from the same seed (common random numbers), so
two policies that differ little give the same text where they agree, a tie, and the differences between policies
are measured with less noise than independent samples would give. Samples are drawn by
:func:`~lit_align.rollout.sampling.generate_ids`, keyed: each depends on the seed and its prompt's
index only, so the numbers do not change with the batch size.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lit_align.ops import pad_sequences, position_ids_from_mask

__all__ = ["EvalPrompts", "completion_logps", "evaluate_policy", "win_rate"]


@dataclass
class EvalPrompts:
    """Held-out prompts: ``ids`` as the policy's tokenizer encodes them for generation (with BOS where it uses
    one), their text, and optional reference answers."""

    ids: list[list[int]]
    texts: list[str]
    references: list[str] | None = None

    @classmethod
    def from_datamodule(cls, datamodule: Any, limit: int | None = None) -> EvalPrompts:
        """The held-out split (``val_data``, or the ``val_fraction`` of ``train_data``) of a set-up
        :class:`~lit_align.PromptDataModule`, at most ``limit`` prompts, in the split's order."""
        datamodule.setup("validate")
        examples = list(datamodule.val_dataset or [])[:limit]
        if not examples:
            raise ValueError("the evaluation data has no held-out prompts: set val_fraction > 0 or val_data")
        references = [e["reference"] for e in examples] if all("reference" in e for e in examples) else None
        return cls([list(e["prompt_ids"]) for e in examples], [e["prompt_text"] for e in examples], references)


@torch.no_grad()
def completion_logps(
    model: nn.Module, prompt_ids: Sequence[list[int]], completion_ids: Sequence[list[int]], batch_size: int = 16
) -> torch.Tensor:
    """``[N]`` fp32 ``sum_t log pi(y_t | x, y_<t)`` of each completion given its prompt (right-padded batches)."""
    device = next(model.parameters()).device
    totals = []
    for start in range(0, len(prompt_ids), batch_size):
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids[start : start + batch_size],
                                                  completion_ids[start : start + batch_size])]  # fmt: skip
        input_ids = pad_sequences(seqs, 0).to(device)
        mask = pad_sequences([[1] * len(s) for s in seqs], 0).to(device)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
        logps = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
        take = torch.zeros_like(logps, dtype=torch.bool)
        for row, (p, c) in enumerate(zip(prompt_ids[start : start + batch_size],
                                         completion_ids[start : start + batch_size])):  # fmt: skip
            take[row, len(p) - 1 : len(p) - 1 + len(c)] = True
        totals.append((logps * take).sum(-1))
    return torch.cat(totals) if totals else torch.zeros(0)


def win_rate(rewards: torch.Tensor, baseline_rewards: torch.Tensor) -> tuple[float, float]:
    """The share of prompts where ``rewards`` beats ``baseline_rewards``, ties counted half, and its standard error
    over prompts (the standard deviation of the per-prompt outcomes 1, 0.5, 0 over the square root of their number;
    0 for a single prompt)."""
    if rewards.shape != baseline_rewards.shape or rewards.numel() == 0:
        raise ValueError(f"win_rate needs two equal, non-empty shapes; got {rewards.shape}, {baseline_rewards.shape}")
    outcomes = (rewards > baseline_rewards).double() + 0.5 * (rewards == baseline_rewards).double()
    se = outcomes.std() / outcomes.numel() ** 0.5 if outcomes.numel() > 1 else torch.tensor(0.0)
    return float(outcomes.mean()), float(se)


@dataclass
class PolicyEval:
    """One policy's held-out numbers (``None`` where they do not apply) and its samples' text."""

    reward: float | None = None
    kl: float | None = None
    win_rate: float | None = None
    win_rate_se: float | None = None
    accuracy: float | None = None
    response_length: float | None = None
    samples: list[str] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        names = ("reward", "kl", "win_rate", "win_rate_se", "accuracy", "response_length")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def evaluate_policy(
    policy: nn.Module,
    tokenizer: Any,
    prompts: EvalPrompts,
    *,
    baseline: nn.Module | None = None,
    baseline_samples: Mapping[str, Any] | None = None,
    reward_model: Any = None,
    verifiable: EvalPrompts | None = None,
    max_new_tokens: int = 48,
    seed: int = 0,
    batch_size: int = 16,
) -> tuple[PolicyEval, dict[str, Any]]:
    """Evaluate ``policy`` as the module docstring says. ``baseline`` is the policy the KL is taken to;
    ``baseline_samples`` the baseline's own evaluation (the second value this function returns for it), for the win
    rate; ``reward_model`` a :class:`~lit_align.RewardScorer`; ``verifiable`` prompts with references. Returns the
    numbers and what a later call needs as ``baseline_samples`` (the samples' ids and rewards)."""
    from lit_align.rewards import NumericAnswerReward
    from lit_align.rollout.sampling import generate_ids

    result = PolicyEval()
    stream = (seed, "evaluate")
    completions = [c[0] for c in generate_ids(policy, tokenizer, prompts.ids, max_new_tokens=max_new_tokens,
                                              temperature=1.0, batch_size=batch_size, stream=stream,
                                              keep_stop=True)]  # fmt: skip
    result.samples = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    result.response_length = sum(len(c) for c in completions) / len(completions)
    rewards = None
    if reward_model is not None:
        rewards = reward_model.score(prompts.texts, result.samples, batch_size=batch_size).float().cpu()
        result.rewards = rewards.tolist()
        result.reward = float(rewards.mean())
        if baseline_samples is not None:
            result.win_rate, result.win_rate_se = win_rate(rewards, torch.tensor(baseline_samples["rewards"]))
    if baseline is not None:
        kl = completion_logps(policy, prompts.ids, completions, batch_size) - completion_logps(
            baseline, prompts.ids, completions, batch_size
        )
        result.kl = float(kl.mean())
    if verifiable is not None and verifiable.references is not None:
        greedy = generate_ids(policy, tokenizer, verifiable.ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
        answers = [tokenizer.decode(c[0], skip_special_tokens=True) for c in greedy]
        result.accuracy = float(NumericAnswerReward()(verifiable.texts, answers, verifiable.references).mean())
    gc.collect()
    return result, {"ids": completions, "rewards": result.rewards}
