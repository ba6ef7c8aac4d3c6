"""``GRPOModule``: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath): sample a group of completions
per prompt, score them, and use each completion's reward relative to its group as the advantage of all its tokens:
no value model, a k3 KL penalty to a frozen reference inside the loss."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MeanMetric

from lit_align.forward import eval_mode
from lit_align.losses import (
    ADVANTAGE_ESTIMATORS,
    GRPO_LOSS_TYPES,
    check_importance_sampling,
    grpo_advantages,
    grpo_policy_loss,
    reinforce_pp_advantages,
    rloo_advantages,
    truncated_importance_weights,
)
from lit_align.models import load_frozen_reward_model
from lit_align.modules.base import (
    AlignModule,
    check_options,
    real_rows,
    reward_functions,
    sampling_checks,
    zero_dropout,
)
from lit_align.modules.reference import reference_policy
from lit_align.rewards import RewardFunction
from lit_align.rollout import Experience, Generator, RolloutStage


@dataclass
class GroupRollout:
    """A batch's :class:`~lit_align.rollout.Experience` (``B`` prompts, ``G`` completions each, ``N = B x G``) and what
    GRPO computes from it."""

    experience: Experience
    loss_mask: torch.Tensor  # [N, R] the tokens the loss counts: completion tokens, less truncated ones if asked
    advantages: torch.Tensor  # [N]
    zero_std: torch.Tensor  # [N] bool: the completion's group had equal rewards (no signal)
    old_logps: torch.Tensor | None  # [N, R] when the policy moves before the last use of the rollout
    ref_logps: torch.Tensor | None  # [N, R] when kl_coef != 0
    token_weights: torch.Tensor | None = None  # [N, R] truncated importance weights against the sampler, if asked
    mismatch: dict[str, torch.Tensor] | None = None  # the sampler's log-probs against the trainer's
    reward_kl: torch.Tensor | None = None  # [] mean per-token k1 KL taken from the rewards (kl_in_reward)


class GRPOModule(AlignModule):
    """GRPO (DeepSeekMath, Shao et al. 2024, sec. 4): for each prompt sample ``group_size`` completions, score them
    with reward functions or a reward model, and take ``(r_i - mean(r_group)) / std(r_group)`` as the advantage of
    every token of completion ``i``; maximise PPO's clipped surrogate with that advantage minus ``kl_coef`` times
    the ``k3`` KL estimate to a frozen reference (eq. 3-4). No value model.

    Each training step takes one batch of prompts (``batch_size`` on the ``PromptDataModule``): sampling with the
    KV cache (``B x G`` sequences), scoring, then ``num_iterations`` passes over mini-batches of prompts, each one
    optimizer step. The log-prob passes (policy, old policy, reference) pack each prompt and its ``G`` completions
    into one row whose attention mask keeps completions from seeing each other (``share_prompt``), so a prompt is
    forwarded once per group instead of ``G`` times; the unembedding runs only at positions that predict completion
    tokens.

    Use ``max_epochs``/``limit_train_batches`` to bound a run: with manual optimisation Lightning counts every
    optimizer step in ``global_step``.

    Args:
        reward_fn: a :class:`~lit_align.rewards.RewardFunction` or a list of them (scores are combined with
            ``reward_weights``); from Python any callable ``(prompts, completions) -> [N]``.
        reward_weights: one weight per reward function (default all 1).
        reward_model: a ``RewardModule`` export directory or ``*ForSequenceClassification`` id scoring the
            policy's token ids (used when no ``reward_fn`` is given), or ``"tiny"`` (untrained, to try the pipeline).
        group_size: completions sampled per prompt (the paper's ``G``).
        kl_coef: the coefficient of the KL penalty (the paper's beta, 0.04 there); 0 needs no reference model.
        loss_type: how tokens are aggregated, see :func:`~lit_align.losses.grpo_policy_loss`: ``"dapo"`` (token
            sum over the generation batch's token count, the default), ``"grpo"`` (the paper's per-completion mean),
            ``"bnpo"``, ``"dr_grpo"``.
        advantage_estimator: the baseline a completion's reward is measured against. ``"grpo"``: its group's mean
            (the paper). ``"rloo"``: the mean of the *other* completions of its prompt (REINFORCE leave-one-out,
            Ahmadian et al. 2024, :func:`~lit_align.losses.rloo_advantages`). ``"reinforce_pp"``: its group's mean,
            normalised over the whole batch (REINFORCE++-baseline, Hu et al. 2025,
            :func:`~lit_align.losses.reinforce_pp_advantages`).
        scale_rewards: what the centred rewards are divided by: ``"group"`` (the group's standard deviation, the
            paper), ``"batch"`` (the batch's: of the rewards for ``grpo`` as TRL's GRPO, of the advantages for
            ``rloo``, TRL's ``normalize_advantages``) or ``"none"`` (Dr. GRPO). Default: ``group`` for ``grpo``,
            ``none`` for ``rloo``, ``batch`` for ``reinforce_pp`` (the only one it takes).
        kl_in_reward: subtract ``kl_coef`` times each completion's summed ``k1`` KL to the reference from its reward
            (RLOO's and InstructGPT's placement, as TRL's ``RLOOTrainer``) instead of adding the ``k3`` estimate to the
            loss (GRPO's).
        importance_sampling_level: ``"token"`` (per-token ratios, GRPO), ``"sequence"`` (GSPO, Zheng et al. 2025: one
            length-normalised ratio per completion) or ``"sequence_sum"`` (the completion's whole probability ratio,
            as TRL's ``RLOOTrainer``); see :func:`~lit_align.losses.grpo_policy_loss`. The sequence levels take
            ``loss_type: grpo``.
        clip_eps: the lower side of the ratio's clip range ``[1 - clip_eps, 1 + clip_eps_high]``.
        clip_eps_high: its upper side (default ``clip_eps``; DAPO's clip-higher uses 0.28).
        num_iterations: optimisation passes over each rollout batch (the paper's ``mu``; 1 is on-policy).
        mini_batch_size: prompts (each with its whole group) per optimizer step; ``None``: the whole batch, one
            step per pass.
        max_new_tokens: the most tokens sampled per completion.
        temperature: sampling temperature; log-probs are taken at the same temperature.
        top_p: nucleus sampling's probability mass (1.0: no truncation).
        missing_eos_penalty: subtracted from the reward of completions that never emit EOS (``None``: none).
        mask_truncated_completions: leave completions that never emit EOS (cut at ``max_new_tokens``) out of the
            loss (DAPO's overlong filtering, Yu et al. 2025); they still count in their group's advantages.
        max_grad_norm: gradient clipping (``None``: none).
        share_prompt: pack a prompt and its group in one row (needs an attention implementation that takes a custom
            mask, sdpa or eager); false scores one row per completion.
        generator: the sampling engine (default :class:`~lit_align.rollout.HFGenerator`, Hugging Face ``generate``
            with each prompt prefilled once for its group; :class:`~lit_align.rollout.VLLMGenerator` for vLLM).
        tis_cap: with a generator that returns its own log-probs (vLLM), weight each token's surrogate by the
            truncated importance ratio ``min(pi_trainer / pi_sampler, tis_cap)`` (TIS, as verl and TRL apply it);
            ``None``: no correction (the mismatch is still logged as ``rollout/logp_diff_mean`` and ``_max``).
        sampling_seed: the seed completions are sampled from, each completion from its own seed hashed from this,
            the batch and its prompt (so sampling is the same on any number of devices and in a resumed run);
            ``None``: the run's ``seed_everything`` seed.
        disable_dropout: set every dropout in the policy to 0, so that the ratio is exactly 1 before an update.
        *args, **kwargs: :class:`~lit_align.modules.base.AlignModule`'s arguments.
    """

    frozen_modules = ("ref_model", "reward_model")

    def __init__(
        self,
        *args: Any,
        reward_fn: RewardFunction | list[RewardFunction] | None = None,
        reward_weights: list[float] | None = None,
        reward_model: str | None = None,
        group_size: int = 8,
        kl_coef: float = 0.04,
        loss_type: Literal["dapo", "grpo", "bnpo", "dr_grpo"] = "dapo",
        advantage_estimator: Literal["grpo", "rloo", "reinforce_pp"] = "grpo",
        scale_rewards: Literal["group", "batch", "none"] | None = None,
        kl_in_reward: bool = False,
        importance_sampling_level: Literal["token", "sequence", "sequence_sum"] = "token",
        clip_eps: float = 0.2,
        clip_eps_high: float | None = None,
        num_iterations: int = 1,
        mini_batch_size: int | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        missing_eos_penalty: float | None = None,
        mask_truncated_completions: bool = False,
        max_grad_norm: float | None = 1.0,
        share_prompt: bool = True,
        generator: Generator | None = None,
        tis_cap: float | None = None,
        sampling_seed: int | None = None,
        disable_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if disable_dropout and self.residual_dropout:
            raise ValueError("residual_dropout needs disable_dropout: false (GRPO disables dropout by default)")
        reward_fns = reward_functions("GRPO", reward_fn, reward_weights, reward_model)
        if group_size < 2:
            raise ValueError(f"group_size must be at least 2 (advantages are relative to the group), got {group_size}")
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {GRPO_LOSS_TYPES}")
        if advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"unknown advantage_estimator {advantage_estimator!r}; choose one of "
                             f"{ADVANTAGE_ESTIMATORS}")  # fmt: skip
        if scale_rewards is None:
            scale_rewards = {"grpo": "group", "rloo": "none", "reinforce_pp": "batch"}[advantage_estimator]
        allowed = {"grpo": ("group", "batch", "none"), "rloo": ("batch", "none"), "reinforce_pp": ("batch",)}
        if scale_rewards not in allowed[advantage_estimator]:
            raise ValueError(
                f"unknown scale_rewards {scale_rewards!r} for advantage_estimator {advantage_estimator!r}; choose one "
                f"of {allowed[advantage_estimator]}"
            )
        check_importance_sampling(importance_sampling_level, loss_type)
        if kl_in_reward and kl_coef == 0:
            raise ValueError("kl_in_reward takes the KL penalty from the rewards: it needs kl_coef > 0")
        check_options(
            *sampling_checks(max_new_tokens, temperature, top_p),
            ("num_iterations", num_iterations, num_iterations >= 1, "at least 1"),
            ("mini_batch_size", mini_batch_size, mini_batch_size is None or mini_batch_size >= 1, "at least 1"),
            ("kl_coef", kl_coef, kl_coef >= 0, ">= 0"),
            ("clip_eps", clip_eps, clip_eps > 0, "positive"),
            ("clip_eps_high", clip_eps_high, clip_eps_high is None or clip_eps_high > 0, "positive"),
            ("max_grad_norm", max_grad_norm, max_grad_norm is None or max_grad_norm > 0, "positive"),
            ("tis_cap", tis_cap, tis_cap is None or tis_cap >= 1, "at least 1"),
        )
        self.automatic_optimization = False
        self.reward_model_name = reward_model
        self.group_size, self.kl_coef = group_size, kl_coef
        self.loss_type, self.scale_rewards = loss_type, scale_rewards
        self.advantage_estimator, self.kl_in_reward = advantage_estimator, kl_in_reward
        self.importance_sampling_level = importance_sampling_level
        self.clip_eps, self.clip_eps_high, self.tis_cap = clip_eps, clip_eps_high, tis_cap
        self.num_iterations, self.mini_batch_size = num_iterations, mini_batch_size
        self.max_new_tokens = max_new_tokens
        self.max_grad_norm = max_grad_norm
        self.mask_truncated_completions = mask_truncated_completions
        self.disable_dropout = disable_dropout
        self.sampling_seed = sampling_seed
        self.rollout_stage = RolloutStage(
            self.tokenizer, generator, group_size, max_new_tokens, temperature, top_p, share_prompt=share_prompt,
            reward_fns=reward_fns, reward_weights=reward_weights, missing_eos_penalty=missing_eos_penalty,
        )  # fmt: skip
        self.ref_model: nn.Module | None = None
        self.reward_model: nn.Module | None = None
        self.reward_offset = 0.0
        names = [
            "reward_mean", "reward_std", "zero_std_fraction", "kl", "entropy", "clip_low", "clip_high",
            "policy_loss", "response_length", "no_eos_fraction",
        ]  # fmt: skip
        if len(reward_fns) > 1:
            names += [f"reward_{i}" for i in range(len(reward_fns))]
        if generator is not None and generator.returns_logps:
            names += ["rollout/logp_diff_mean", "rollout/logp_diff_max"]
        self.train_metrics = nn.ModuleDict({name: MeanMetric() for name in names})
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in ("reward_mean", "response_length")})

    # ----- the roles --------------------------------------------------------------------------------------------------
    def configure_roles(self) -> None:
        if self.disable_dropout:
            zero_dropout(self.model)
        if self.kl_coef != 0 and self.ref_model is None and self.lora is None:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        if self.reward_model is None and self.reward_model_name is not None:
            self.reward_model, self.reward_offset = load_frozen_reward_model(
                self.reward_model_name, self.tokenizer, self.model_name_or_path, self.dtype_name,
                self.trust_remote_code, empty=self.empty_init,
            )  # fmt: skip

    # ----- the rollout ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: Mapping[str, Any]) -> GroupRollout:
        """Sample ``group_size`` completions per prompt, score them, and compute group-relative advantages and the
        old-policy and reference log-probs the updates need (packed per mini-batch of prompts)."""
        stage = self.rollout_stage
        experience = self.sample(prompts)
        n_prompts, width = len(experience.prompt_ids), experience.width
        step = self.mini_batch_size or n_prompts
        batches = [stage.pack(experience, range(s, min(s + step, n_prompts)), self.device)
                   for s in range(0, n_prompts, step)]  # fmt: skip
        rewards = stage.score(experience, self.reward_model, self.reward_offset, batches).rewards
        mask = experience.completion_mask
        policy_moves = self.num_iterations > 1 or len(batches) > 1
        old_logps = ref_logps = token_weights = reward_kl = None
        mismatch: dict[str, torch.Tensor] = {}
        # With one update per rollout and no KL in the reward, the update's own forward gives the trainer's
        # log-probs of the sampling policy: the sampler is compared with them there, without a forward of its own.
        if policy_moves or self.kl_in_reward:
            with eval_mode(self.model):
                old_logps = torch.cat([stage.completion_logps(self.model, b, width).logps for b in batches])
            mismatch = stage.mismatch(experience, old_logps)
            if self.tis_cap is not None and experience.sampler_logps is not None:
                token_weights = truncated_importance_weights(old_logps, experience.sampler_logps, mask, self.tis_cap)
        if self.kl_coef != 0:
            with reference_policy(self.model, self.ref_model) as reference:
                ref_logps = torch.cat([stage.completion_logps(reference, b, width).logps for b in batches])
        loss_mask = mask * experience.has_eos.unsqueeze(-1) if self.mask_truncated_completions else mask
        if self.kl_in_reward:  # k1 summed over each completion's loss tokens, from the policy that sampled it
            kl = (old_logps - ref_logps) * loss_mask
            rewards = rewards - self.kl_coef * kl.sum(-1).to(rewards.device, rewards.dtype)
            reward_kl = kl.sum() / loss_mask.sum().clamp(min=1)
            ref_logps = None  # the loss has no KL term
        old_logps = old_logps if policy_moves else None  # else the ratio is exactly 1: no need to keep it
        advantages, zero_std = self.advantages(rewards)
        return GroupRollout(experience, loss_mask, advantages, zero_std, old_logps, ref_logps, token_weights, mismatch,
                            reward_kl)  # fmt: skip

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(advantages [N], zero_std [N])`` of a rollout's rewards by ``advantage_estimator`` and
        ``scale_rewards``; a batch-wide standard deviation is taken over every device's completions."""
        estimator, scale, g = self.advantage_estimator, self.scale_rewards, self.group_size
        batch_std = None
        if scale == "batch" and self._trainer is not None and self.trainer.world_size > 1:
            unscaled = {"grpo": rewards, "rloo": rloo_advantages(rewards, g)[0],
                        "reinforce_pp": grpo_advantages(rewards, g, "none")[0]}[estimator]  # fmt: skip
            batch_std = self.all_gather(unscaled).flatten().std()  # the batch is every device's
        if estimator == "rloo":
            return rloo_advantages(rewards, g, normalize=scale == "batch", batch_std=batch_std)
        if estimator == "reinforce_pp":
            return reinforce_pp_advantages(rewards, g, batch_std=batch_std)
        return grpo_advantages(rewards, g, scale, batch_std=batch_std)

    def sample(self, prompts: Mapping[str, Any], group_size: int | None = None) -> Experience:
        """Completions of the policy for a batch of prompts (``group_size`` each, default the module's)."""
        return self.sample_policy(self.rollout_stage, prompts, group_size)

    # ----- optimisation -----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if getattr(datamodule, "pretrain_data", None) is not None:
            raise ValueError("GRPO has no pre-training mix: set pretrain_data: null on the PromptDataModule")

    def optimizer_steps_per_batch(self) -> int:
        prompts = getattr(self.trainer.datamodule, "batch_size", None) or 1
        return self.num_iterations * -(-prompts // (self.mini_batch_size or prompts))

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        super().on_before_optimizer_step(optimizer)
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")

    def policy_objective(
        self, rollout: GroupRollout, prompt_idx: Sequence[int], n_tokens: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GRPO's loss on the prompts ``prompt_idx`` of ``rollout`` (all their completions), with its statistics."""
        experience = rollout.experience
        rows = experience.rows(prompt_idx).to(self.device)
        batch = self.rollout_stage.pack(experience, prompt_idx, self.device)
        logps, entropy, _ = self.rollout_stage.completion_logps(self.model, batch, experience.width, entropy=True)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        token_weights = pick(rollout.token_weights)
        if experience.sampler_logps is not None and rollout.mismatch is not None and not rollout.mismatch:
            # one update per rollout (rows: every completion, in order): this forward is the sampling policy's
            trainer_logps = logps.detach()
            rollout.mismatch = self.rollout_stage.mismatch(experience, trainer_logps)
            if self.tis_cap is not None:
                token_weights = rollout.token_weights = truncated_importance_weights(
                    trainer_logps, experience.sampler_logps, experience.completion_mask, self.tis_cap
                )
        loss, stats = grpo_policy_loss(
            logps, pick(rollout.old_logps), rollout.advantages[rows], rollout.loss_mask[rows],
            ref_logps=pick(rollout.ref_logps), kl_coef=0.0 if self.kl_in_reward else self.kl_coef,
            clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high, loss_type=self.loss_type,
            max_completion_length=self.max_new_tokens, n_tokens=n_tokens, token_weights=token_weights,
            importance_sampling_level=self.importance_sampling_level,
        )  # fmt: skip
        if rollout.reward_kl is not None:  # the KL was taken from the rewards, not the loss
            stats["kl"] = rollout.reward_kl
        return loss, {**stats, "policy_loss": loss.detach(), "entropy": entropy.mean()}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        rollout = self.rollout(batch)
        experience = rollout.experience
        optimizer = self.optimizers()
        n_prompts = len(experience.prompt_ids)
        step = self.mini_batch_size or n_prompts
        n_steps = -(-n_prompts // step)
        n_tokens = None
        if self.loss_type == "dapo":  # every step's tokens over the generation batch's mean, across devices
            total = self.trainer.strategy.reduce(rollout.loss_mask.sum().float(), reduce_op="sum")
            n_tokens = total / (self.trainer.world_size * n_steps)
        stats: dict[str, list[torch.Tensor]] = {}
        for _ in range(self.num_iterations):
            order = torch.randperm(n_prompts).tolist() if n_steps > 1 else list(range(n_prompts))
            for start in range(0, n_prompts, step):
                loss, parts = self.policy_objective(rollout, order[start : start + step], n_tokens)
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()  # clipped in on_before_optimizer_step, after any AMP unscaling
                self.rollout_stage.generator.weights_changed()
                for key, value in parts.items():
                    stats.setdefault(key, []).append(value.detach())
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.step()
        mask, rewards = experience.completion_mask.float(), experience.rewards
        values = {
            "reward_mean": rewards.mean(),
            "reward_std": rewards.std() if rewards.numel() > 1 else torch.zeros(()),
            "zero_std_fraction": rollout.zero_std.float().mean(),
            "response_length": mask.sum(-1).mean(),
            "no_eos_fraction": (~experience.has_eos).float().mean(),
            **{k: torch.stack(v).mean() for k, v in stats.items()},
            **(rollout.mismatch or {}),
        }
        if experience.scores.shape[1] > 1:
            values.update({f"reward_{i}": col.mean() for i, col in enumerate(experience.scores.unbind(-1))})
        for name, value in values.items():
            metric = self.train_metrics[name]
            metric(value.to(self.device).float())
            key = name if "/" in name else f"train/{name}"  # the rollout's own metrics are named in full
            self.log(key, metric, on_step=True, on_epoch=True, prog_bar=name in ("reward_mean", "kl"),
                     batch_size=mask.shape[0])  # fmt: skip

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """One sampled completion per prompt: its mean reward and length."""
        experience = self.sample(batch, group_size=1)
        packed = [] if self.rollout_stage.reward_fns else [self.rollout_stage.pack(experience, device=self.device)]
        scores = self.rollout_stage.score(experience, self.reward_model, self.reward_offset, packed).scores
        rewards = (scores * self.rollout_stage.reward_weights.to(scores.device)).sum(-1)  # no missing-EOS penalty
        real = real_rows(batch, len(rewards), self.device)
        for name, value in (("reward_mean", rewards), ("response_length", experience.completion_mask.float().sum(-1))):
            self.val_metrics[name].update(value[real])  # per prompt: the mean over every held-out prompt
            self.log(f"{self.held_out_split}/{name}", self.val_metrics[name])
