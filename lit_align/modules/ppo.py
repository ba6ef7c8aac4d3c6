"""``PPOModule``: RLHF with PPO as in InstructGPT (Ouyang et al. 2022, step 3): a per-token KL penalty to the SFT
policy, an adaptive or fixed KL coefficient, GAE, separate policy and value optimizers, and the pre-training mix
(PPO-ptx)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric

from lit_align.forward import backbone_hidden_states, eval_mode, labelled_nll, score_head
from lit_align.losses import (
    gae,
    kl_penalty,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
    truncated_importance_weights,
    whiten,
)
from lit_align.models import OFFSET_KEY, load_frozen_reward_model, unwrap_model
from lit_align.modules.base import AlignModule, check_options, real_rows, sampling_checks, zero_dropout
from lit_align.optim import WarmupCosineLR
from lit_align.parallel import fsdp_root, run_forward
from lit_align.rewards import RewardFunction
from lit_align.rollout import Experience, Generator, RolloutStage, to_completions


# ----- KL controllers ----------------------------------------------------------------------------------------------
class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019 (sec. 2.2): ``beta <- beta (1 + K_beta e)`` with the proportional error
    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``K_beta = n_steps / horizon``: the coefficient rises while the
    measured KL is above the target and falls while below.

    Args:
        kl_coef: initial coefficient.
        target: target KL per sequence (nats).
        horizon: steps (samples) over which the error is corrected.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# ----- rollouts -------------------------------------------------------------------------------------------------------
@dataclass
class PPORollout:
    """A batch's :class:`~lit_align.rollout.Experience` (one completion per prompt: ``B`` completions of at most
    ``R`` tokens) and everything PPO computes from it, all ``[B, R]`` (0 past each completion's end) or ``[B]``."""

    experience: Experience
    logps: torch.Tensor  # log-probs of the sampled tokens under the policy when sampled
    ref_logps: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # [B] reward model / function scores, as scored (before any penalty or normalisation)
    rewards: torch.Tensor  # per-token rewards: score at the last token minus kl_coef * KL
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor  # per-token KL estimate
    entropy: torch.Tensor  # [] mean entropy of the sampled tokens' distributions
    token_weights: torch.Tensor | None = None  # truncated importance weights against the sampler, if asked
    mismatch: dict[str, torch.Tensor] | None = None  # the sampler's log-probs against the trainer's

    @property
    def mask(self) -> torch.Tensor:
        return self.experience.completion_mask


class ValueHead(nn.Module):
    """A scalar value per position on the policy's (detached) hidden states: no second transformer."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)


class PPOModule(AlignModule):
    """PPO for RLHF, InstructGPT's step 3: sample responses to prompts, score them with the reward model, and
    maximise ``r(x, y) - beta log(pi(y|x) / pi_SFT(y|x))`` (the penalty per token) plus ``gamma`` times the
    pre-training log-likelihood (PPO-ptx), with Lightning's manual optimisation.

    Four roles: the policy (``model``, from SFT), a frozen reference (a copy of the starting policy), the reward
    (a ``RewardModule`` export, ``"tiny"``, or a ``reward_fn``), and a value model (initialised from the reward model
    as InstructGPT did, or a value head on the policy to save memory).

    Each training step takes one batch of prompts: rollout (sampling with the KV cache, then micro-batched forward
    passes for log-probs, reference log-probs and values; no ``[B, T, V]`` tensor is kept), rewards, GAE, then
    ``ppo_epochs`` passes over mini-batches, each a policy step (clipped surrogate, plus ``ptx_coef`` times the
    pre-training NLL of a ``ptx`` batch) and a value step (clipped value loss), with gradient clipping. The KL
    controller is updated after each rollout and checkpointed with the RNG streams (sampling resumes exactly).

    Use ``max_epochs``/``limit_train_batches`` to bound a run: with manual optimisation Lightning counts every
    optimizer step (policy and value) in ``global_step``.

    Args:
        reward_model: a ``RewardModule`` export directory, a ``*ForSequenceClassification`` hub id, or ``"tiny"``
            (an untrained preset, to try the pipeline); ignored when ``reward_fn`` is given.
        reward_fn: a :class:`~lit_align.rewards.RewardFunction` (or, from Python, any callable
            ``(prompts, responses) -> [N]``) scoring text.
        value_model: ``"reward"`` (a trainable copy of the reward model, InstructGPT) or ``"policy_head"`` (a scalar
            head on the policy's hidden states; with ``reward_fn`` and no reward model this is the only choice).
        value_lr: learning rate of the value optimizer (default ``lr``).
        kl_coef: initial coefficient of the per-token KL penalty (InstructGPT's beta).
        kl_estimator: ``"k1"`` (``log pi - log pi_ref``) or ``"k3"``.
        adaptive_kl: adapt ``kl_coef`` towards ``kl_target`` (Ziegler et al. 2019) over ``kl_horizon`` samples.
        kl_target: with ``adaptive_kl``, the KL to the reference (summed over a completion's tokens, in nats) that
            the controller steers ``kl_coef`` towards.
        kl_horizon: with ``adaptive_kl``, the controller's horizon in sampled completions: the larger, the slower
            ``kl_coef`` moves.
        max_new_tokens: the most tokens sampled per completion.
        temperature: sampling temperature (1.0 samples the policy's own distribution, which PPO's ratios assume).
        top_p: nucleus sampling's probability mass (1.0: no truncation).
        missing_eos_penalty: subtracted from the score of responses that never emit EOS (``None``: no penalty).
        reward_clip: clip scores to ``[-reward_clip, reward_clip]`` (``None``: no clipping), after normalising.
        normalize_scores: standardise the scores of each rollout batch (zero mean, unit variance) before the KL
            penalty is added; the logged ``reward_mean`` stays the raw score.
        whiten_advantages: normalise advantages per rollout batch.
        num_iterations: passes over each rollout batch (PPO's epochs; ``ppo_epochs`` is its deprecated name).
        mini_batch_size: prompts (each with its completion) per PPO mini-batch, and per forward micro-batch in the
            rollout: the same unit as GRPO's.
        clip_eps: PPO's ratio clip: the surrogate is clipped to ``[1 - clip_eps, 1 + clip_eps]``.
        value_clip_eps: the value loss's clip: a new value estimate counts at most this far from the rollout's.
        gamma: GAE's discount per token (1.0: none, as InstructGPT).
        lam: GAE's lambda, trading the advantage's bias (0) against its variance (1).
        ptx_coef: weight of the pre-training log-likelihood (InstructGPT's gamma; needs ``pretrain_data`` on the
            ``PromptDataModule``). 0 turns PPO-ptx off.
        max_grad_norm: gradient clipping for both optimizers (``None``: none).
        generator: the sampling engine (default :class:`~lit_align.rollout.HFGenerator`, Hugging Face ``generate``;
            :class:`~lit_align.rollout.VLLMGenerator` for vLLM).
        tis_cap: with a generator that returns its own log-probs (vLLM), weight each token's surrogate by the
            truncated importance ratio ``min(pi_trainer / pi_sampler, tis_cap)``; ``None``: no correction (the
            mismatch is still logged as ``rollout/logp_diff_mean`` and ``_max``).
        sampling_seed: the seed completions are sampled from, each completion from its own seed hashed from this,
            the batch and its prompt (so sampling is the same on any number of devices and in a resumed run);
            ``None``: the run's ``seed_everything`` seed.
        disable_dropout: set every dropout in the policy to 0, so that the probability ratio is exactly 1 before an
            update.
        ppo_epochs: deprecated name of ``num_iterations``.
        *args, **kwargs: :class:`~lit_align.modules.base.AlignModule`'s arguments.
    """

    frozen_modules = ("ref_model", "reward_model")
    trainable_modules = ("value_model",)

    def __init__(
        self,
        *args: Any,
        reward_model: str | None = "tiny",
        reward_fn: RewardFunction | None = None,
        value_model: Literal["reward", "policy_head"] = "reward",
        value_lr: float | None = None,
        kl_coef: float = 0.02,
        kl_estimator: Literal["k1", "k3"] = "k1",
        adaptive_kl: bool = False,
        kl_target: float = 6.0,
        kl_horizon: int = 10_000,
        max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        missing_eos_penalty: float | None = None,
        reward_clip: float | None = None,
        normalize_scores: bool = False,
        whiten_advantages: bool = True,
        num_iterations: int = 4,
        mini_batch_size: int = 4,
        clip_eps: float = 0.2,
        value_clip_eps: float = 0.2,
        gamma: float = 1.0,
        lam: float = 0.95,
        ptx_coef: float = 0.0,
        max_grad_norm: float | None = 1.0,
        generator: Generator | None = None,
        tis_cap: float | None = None,
        sampling_seed: int | None = None,
        disable_dropout: bool = True,
        ppo_epochs: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if ppo_epochs is not None:
            rank_zero_warn("PPOModule(ppo_epochs=...) is deprecated: it is num_iterations, as in GRPOModule",
                           DeprecationWarning)  # fmt: skip
            num_iterations = ppo_epochs
        if disable_dropout and self.residual_dropout:
            raise ValueError("residual_dropout needs disable_dropout: false (PPO disables dropout by default)")
        if reward_fn is None and reward_model is None:
            raise ValueError("PPO needs a reward: set reward_model (a RewardModule export or 'tiny') or reward_fn")
        if value_model == "reward" and reward_fn is not None:
            value_model = "policy_head"  # no reward model to initialise a value model from
        check_options(
            ("value_model", value_model, value_model in ("reward", "policy_head"), "'reward' or 'policy_head'"),
            ("kl_estimator", kl_estimator, kl_estimator in ("k1", "k3"), "'k1' or 'k3'"),
            ("kl_coef", kl_coef, kl_coef >= 0, ">= 0"),
            ("kl_target", kl_target, not adaptive_kl or kl_target > 0, "positive with adaptive_kl"),
            ("kl_horizon", kl_horizon, not adaptive_kl or kl_horizon > 0, "positive with adaptive_kl"),
            ("value_lr", value_lr, value_lr is None or value_lr > 0, "positive"),
            *sampling_checks(max_new_tokens, temperature, top_p),
            ("reward_clip", reward_clip, reward_clip is None or reward_clip > 0, "positive"),
            ("num_iterations", num_iterations, num_iterations >= 1, "at least 1"),
            ("mini_batch_size", mini_batch_size, mini_batch_size >= 1, "at least 1"),
            ("clip_eps", clip_eps, clip_eps > 0, "positive"),
            ("value_clip_eps", value_clip_eps, value_clip_eps > 0, "positive"),
            ("gamma", gamma, 0 <= gamma <= 1, "in [0, 1]"),
            ("lam", lam, 0 <= lam <= 1, "in [0, 1]"),
            ("ptx_coef", ptx_coef, ptx_coef >= 0, ">= 0"),
            ("max_grad_norm", max_grad_norm, max_grad_norm is None or max_grad_norm > 0, "positive"),
            ("tis_cap", tis_cap, tis_cap is None or tis_cap >= 1, "at least 1"),
        )
        self.automatic_optimization = False
        self.reward_model_name = reward_model if reward_fn is None else None
        self.value_model_kind, self.value_lr = value_model, value_lr
        self.kl_estimator = kl_estimator
        self.kl_controller = (
            AdaptiveKLController(kl_coef, kl_target, kl_horizon) if adaptive_kl else FixedKLController(kl_coef)
        )
        self.reward_clip, self.normalize_scores = reward_clip, normalize_scores
        self.whiten_advantages, self.num_iterations = whiten_advantages, num_iterations
        self.mini_batch_size, self.tis_cap = mini_batch_size, tis_cap
        self.clip_eps, self.value_clip_eps, self.gamma, self.lam = clip_eps, value_clip_eps, gamma, lam
        self.ptx_coef, self.max_grad_norm, self.disable_dropout = ptx_coef, max_grad_norm, disable_dropout
        self.sampling_seed = sampling_seed
        # one completion per prompt: one row each (nothing to share)
        self.rollout_stage = RolloutStage(
            self.tokenizer, generator, 1, max_new_tokens, temperature, top_p, share_prompt=False,
            reward_fns=[reward_fn] if reward_fn is not None else [], missing_eos_penalty=missing_eos_penalty,
        )  # fmt: skip
        self.ref_model: nn.Module | None = None
        self.reward_model: nn.Module | None = None
        self.value_model: nn.Module | None = None
        self.reward_offset = 0.0
        names = (
            "reward_mean", "reward_std", "kl", "kl_coef", "entropy", "clip_fraction", "approx_kl", "policy_loss",
            "value_loss", "explained_variance", "response_length", "no_eos_fraction", "ptx_loss",
        )  # fmt: skip
        if generator is not None and generator.returns_logps:
            names += ("rollout/logp_diff_mean", "rollout/logp_diff_max")
        self.train_metrics = nn.ModuleDict({name: MeanMetric() for name in names})
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in ("reward_mean", "kl", "response_length")})

    # ----- the four roles ---------------------------------------------------------------------------------------------
    def configure_roles(self) -> None:
        if self.disable_dropout:
            zero_dropout(self.model)
        if self.ref_model is None:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        if self.reward_model is None and self.reward_model_name is not None:
            self.reward_model, self.reward_offset = load_frozen_reward_model(
                self.reward_model_name, self.tokenizer, self.model_name_or_path, self.dtype_name,
                self.trust_remote_code, empty=self.empty_init,
            )  # fmt: skip
        if self.value_model is None:
            if self.value_model_kind == "reward":
                self.value_model = copy.deepcopy(self.reward_model).requires_grad_(True).train()
                vars(self.value_model.config).pop(OFFSET_KEY, None)  # values are the raw head: no reward offset
            else:
                self.value_model = ValueHead(unwrap_model(self.model).config.hidden_size)

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
            # Called before DDP wraps the module: PPO's policy and value steps each use only part of the parameters,
            # which DDP's reducer must be told to expect.
            strategy._ddp_kwargs["find_unused_parameters"] = True
            rank_zero_info("lit_align: PPO under DDP: find_unused_parameters=True (policy and value steps each use "
                           "part of the parameters)")  # fmt: skip

    def optimizer_steps_per_batch(self) -> int:
        prompts = getattr(self.trainer.datamodule, "batch_size", None) or 1
        return 2 * self.num_iterations * -(-prompts // self.mini_batch_size)  # a policy and a value step each

    @property
    def value_is_head(self) -> bool:
        return isinstance(unwrap_model(self.value_model), ValueHead)

    # ----- values -------------------------------------------------------------------------------------------------
    def token_values(
        self, batch: Mapping[str, torch.Tensor], width: int, policy_hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[n, width]`` value estimates at the positions that predict each completion token of a packed ``batch``
        (the value head reads the policy's hidden states there, detached)."""

        def forward() -> torch.Tensor:
            if self.value_is_head:
                hidden = policy_hidden.detach()
            else:
                hidden = backbone_hidden_states(self.value_model, batch)[batch["target_row"], batch["target_col"]]
            return score_head(self.value_model)(hidden).squeeze(-1).float()

        return to_completions(run_forward(fsdp_root(self.value_model), forward), batch, width)

    # ----- the rollout ------------------------------------------------------------------------------------------------
    def sample(self, prompts: Mapping[str, Any]) -> Experience:
        """A completion of the policy for each prompt."""
        return self.sample_policy(self.rollout_stage, prompts)

    @torch.no_grad()
    def rollout(self, prompts: Mapping[str, Any]) -> PPORollout:
        """Sample a response to every prompt and compute log-probs, reference log-probs, values, rewards and
        advantages, in micro-batches of ``mini_batch_size`` prompts."""
        stage = self.rollout_stage
        experience = self.sample(prompts)
        n, width, step = len(experience.prompt_ids), experience.width, self.mini_batch_size
        batches = [stage.pack(experience, range(s, min(s + step, n)), self.device) for s in range(0, n, step)]
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("logps", "ref_logps", "values", "entropy")}
        with eval_mode(self.model), eval_mode(self.value_model):  # no dropout in the old values either
            for batch in batches:
                out = stage.completion_logps(self.model, batch, width, entropy=True, hidden=self.value_is_head)
                parts["logps"].append(out.logps)
                parts["entropy"].append(out.entropy)
                parts["ref_logps"].append(stage.completion_logps(self.ref_model, batch, width).logps)
                parts["values"].append(self.token_values(batch, width, out.hidden))
        logps, ref_logps, values = (torch.cat(parts[k]) for k in ("logps", "ref_logps", "values"))
        stage.score(experience, self.reward_model, self.reward_offset, batches)
        mask = experience.completion_mask
        raw_scores, scores = experience.scores[:, 0], experience.rewards  # rewards: less the missing-EOS penalty
        if self.normalize_scores:  # over every rank's scores (one device with the whole batch would)
            mean, var = self.global_moments(scores, torch.ones_like(scores), unbiased=True)
            scores = (scores - mean) / (var.sqrt() + 1e-8)
        if self.reward_clip is not None:
            scores = scores.clamp(-self.reward_clip, self.reward_clip)
        kl = kl_penalty(logps, ref_logps, self.kl_estimator) * mask
        rewards = -self.kl_controller.value * kl
        last = (mask.sum(-1) - 1).clamp(min=0)
        rewards[torch.arange(len(last), device=last.device), last] += scores
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        if self.whiten_advantages:
            advantages = whiten(advantages, mask, moments=self.global_moments(advantages, mask))
        token_weights = None
        if self.tis_cap is not None and experience.sampler_logps is not None:
            token_weights = truncated_importance_weights(logps, experience.sampler_logps, mask, self.tis_cap)
        entropy = torch.cat(parts["entropy"]).mean() if parts["entropy"] else torch.zeros(())
        return PPORollout(experience, logps, ref_logps, values, raw_scores, rewards, advantages, returns, kl, entropy,
                          token_weights, stage.mismatch(experience, logps))  # fmt: skip

    # ----- optimisation -----------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        policy = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        value = self.make_optimizer([p for p in self.value_model.parameters() if p.requires_grad])
        for optimizer, lr in ((policy, self.lr), (value, self.value_lr or self.lr)):
            for group in optimizer.param_groups:
                group["lr"] = lr
        schedulers = [(self.lr_scheduler_factory or WarmupCosineLR)(opt) for opt in (policy, value)]
        return [policy, value], [{"scheduler": s, "interval": "step"} for s in schedulers]

    def ptx_loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Mean negative log-likelihood of a pre-training batch (every labelled token)."""
        return labelled_nll(self.model, batch)[0]

    def _optimizer_step(self, optimizer: Any, loss: torch.Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()  # gradients are clipped in on_before_optimizer_step, after any AMP unscaling
        # Freed at once rather than at the next step: the policy's and the value model's gradients (a whole model's
        # size each) are then never held together (measured in benchmarks/ppo_memory.py).
        optimizer.zero_grad()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        super().on_before_optimizer_step(optimizer)
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")

    def ppo_update(self, rollout: PPORollout, ptx_batch: Mapping[str, torch.Tensor] | None) -> dict[str, float]:
        """``num_iterations`` passes of policy and value steps over mini-batches of ``rollout``."""
        policy_opt, value_opt = self.optimizers()
        stats: dict[str, list[float]] = {k: [] for k in ("clip_fraction", "approx_kl", "policy_loss", "value_loss",
                                                          "ptx_loss")}  # fmt: skip
        n = rollout.mask.shape[0]
        for _ in range(self.num_iterations):
            order = torch.randperm(n).tolist()
            for start in range(0, n, self.mini_batch_size):
                idx = order[start : start + self.mini_batch_size]
                batch = self.rollout_stage.pack(rollout.experience, idx, self.device)
                loss, hidden, parts = self.policy_objective(rollout, idx, ptx_batch, batch)
                self._optimizer_step(policy_opt, loss)
                self.rollout_stage.generator.weights_changed()
                rows = torch.tensor(idx, device=self.device)
                values = self.token_values(batch, rollout.experience.width, hidden)
                value_loss, _ = ppo_value_loss(
                    values, rollout.values[rows], rollout.returns[rows], rollout.mask[rows], self.value_clip_eps,
                    n_tokens=self.rank_share(rollout.mask[rows].sum()),
                )  # fmt: skip
                self._optimizer_step(value_opt, value_loss)
                for key, value in {**parts, "value_loss": value_loss}.items():
                    stats[key].append(float(value.detach()))
        return {k: sum(v) / len(v) for k, v in stats.items() if v}

    def policy_objective(
        self, rollout: PPORollout, idx: Sequence[int], ptx_batch: Mapping[str, torch.Tensor] | None,
        batch: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:  # fmt: skip
        """The policy's loss on the rollout rows ``idx`` (packed, unless ``batch`` holds them packed already): PPO's
        clipped surrogate plus ``ptx_coef`` times the pre-training NLL of ``ptx_batch`` (PPO-ptx, Ouyang et al. 2022
        eq. 2). Returns ``(loss, the policy's hidden states at the completion tokens (for a value head), parts)``."""
        idx = [int(i) for i in idx]
        batch = batch if batch is not None else self.rollout_stage.pack(rollout.experience, idx, self.device)
        rows = torch.tensor(idx, device=self.device)
        mask = rollout.mask[rows]
        out = self.rollout_stage.completion_logps(
            self.model, batch, rollout.experience.width, hidden=self.value_is_head
        )
        weights = None if rollout.token_weights is None else rollout.token_weights[rows]
        policy_loss, clip_fraction, approx_kl = ppo_policy_loss(
            out.logps, rollout.logps[rows], rollout.advantages[rows], mask, self.clip_eps,
            self.rank_share(mask.sum()), token_weights=weights,
        )  # fmt: skip
        parts = {"policy_loss": policy_loss, "clip_fraction": clip_fraction, "approx_kl": approx_kl}
        loss = policy_loss
        if self.ptx_coef > 0 and ptx_batch is not None:
            parts["ptx_loss"] = self.ptx_loss(ptx_batch)
            loss = loss + self.ptx_coef * parts["ptx_loss"]
        return loss, out.hidden, parts

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        prompts, ptx_batch = (batch["prompts"], batch.get("ptx")) if "prompts" in batch else (batch, None)
        rollout = self.rollout(prompts)
        stats = self.ppo_update(rollout, ptx_batch)
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.step()
        mask = rollout.mask.float()
        kl_per_sequence = (rollout.kl * mask).sum(-1)
        # every rank moves the coefficient by the same, global, measurement
        global_kl = self.trainer.strategy.reduce(kl_per_sequence.mean(), reduce_op="mean")
        self.kl_controller.update(float(global_kl), n_steps=mask.shape[0] * self.trainer.world_size)
        residual = (rollout.returns - rollout.values) * mask
        explained = 1 - masked_mean((residual - masked_mean(residual, mask)) ** 2, mask) / masked_mean(
            (rollout.returns - masked_mean(rollout.returns, mask)) ** 2, mask
        ).clamp(min=1e-8)
        values = {
            "reward_mean": rollout.scores.mean(),
            "reward_std": rollout.scores.std(unbiased=False),
            "kl": kl_per_sequence.mean(),
            "kl_coef": torch.tensor(self.kl_controller.value),
            "entropy": rollout.entropy,
            "explained_variance": explained,
            "response_length": mask.sum(-1).mean(),
            "no_eos_fraction": (~rollout.experience.has_eos).float().mean(),
            **{k: torch.tensor(v) for k, v in stats.items()},
            **(rollout.mismatch or {}),
        }
        for name, value in values.items():
            metric = self.train_metrics[name]
            metric(value.to(self.device).float())
            key = name if "/" in name else f"train/{name}"  # the rollout's own metrics are named in full
            self.log(key, metric, on_step=True, on_epoch=True, prog_bar=name in ("reward_mean", "kl"),
                     batch_size=mask.shape[0])  # fmt: skip

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        rollout = self.rollout(batch)
        mask = rollout.mask.float()
        real = real_rows(batch, len(mask), self.device)
        for name, value in (("reward_mean", rollout.scores), ("kl", (rollout.kl * mask).sum(-1)),
                            ("response_length", mask.sum(-1))):  # fmt: skip
            self.val_metrics[name].update(value[real])  # per prompt: the mean over every held-out prompt
            self.log(f"{self.held_out_split}/{name}", self.val_metrics[name])

    def export_hf(self, path: str | Path, merge_lora: bool = True) -> Path:
        """The policy as :meth:`AlignModule.export_hf` saves it, and the trained value model in ``value_model/``
        under it: a ``*ForSequenceClassification`` directory (``value_model="reward"``) whose scalar head, applied
        at every position, gives the values; or, for ``"policy_head"``, ``model.safetensors`` holding the head
        (``score.weight [1, H]``, ``score.bias [1]``) that applies to the policy's final hidden states."""
        path = super().export_hf(path, merge_lora)
        self.save_hf("value_model", path / "value_model")
        return path

    # ----- checkpoint extras ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lit_align"]["kl_controller"] = self.kl_controller.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("lit_align", {}).get("kl_controller")
        if state is not None:
            self.kl_controller.load_state_dict(state)
