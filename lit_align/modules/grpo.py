"""``GRPOModule``: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath): sample a group of completions
per prompt, score them, and use each completion's reward relative to its group as the advantage of all its tokens:
no value model, a k3 KL penalty to a frozen reference inside the loss."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MeanMetric

from lit_align.data.preference import PreferenceCollator
from lit_align.forward import backbone_hidden_states, eval_mode, response_rewards, unembedding_logps
from lit_align.generation import Generator, HFGenerator
from lit_align.losses import GRPO_LOSS_TYPES, grpo_advantages, grpo_policy_loss
from lit_align.models import load_frozen_reward_model
from lit_align.modules.base import AlignModule, check_options, real_rows, sampling_checks, zero_dropout
from lit_align.ops import completion_mask
from lit_align.parallel import fsdp_root, run_forward
from lit_align.rewards import RewardFunction, score_text


@dataclass
class GroupRollout:
    """One batch of prompts, ``group_size`` sampled completions each (``N = B x G`` completions of at most ``R``
    tokens), and what GRPO needs about them."""

    examples: list[dict[str, Any]]  # per prompt: prompt_ids (real tokens), response_ids (its G completions)
    completion_mask: torch.Tensor  # [N, R] 1 up to and including each completion's first EOS
    loss_mask: torch.Tensor  # [N, R] the tokens the loss counts: completion_mask, less truncated completions if asked
    rewards: torch.Tensor  # [N] the weighted sum of the reward functions (after any missing-EOS penalty)
    rewards_per_fn: torch.Tensor  # [N, F] each reward function's (or the reward model's) scores
    advantages: torch.Tensor  # [N]
    zero_std: torch.Tensor  # [N] bool: the completion's group had equal rewards (no signal)
    has_eos: torch.Tensor  # [N] bool
    old_logps: torch.Tensor | None  # [N, R] when the policy moves before the last use of the rollout
    ref_logps: torch.Tensor | None  # [N, R] when kl_coef != 0


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
        scale_rewards: ``"group"`` (divide by the group's standard deviation, the paper), ``"batch"`` or ``"none"``
            (Dr. GRPO).
        clip_eps, clip_eps_high: the ratio's clip range ``[1 - clip_eps, 1 + clip_eps_high]`` (``clip_eps_high``
            defaults to ``clip_eps``; DAPO uses 0.28).
        num_iterations: optimisation passes over each rollout batch (the paper's ``mu``; 1 is on-policy).
        mini_batch_size: prompts (each with its whole group) per optimizer step; ``None``: the whole batch, one
            step per pass.
        max_new_tokens, temperature, top_p: sampling (log-probs are taken at the same temperature).
        missing_eos_penalty: subtracted from the reward of completions that never emit EOS (``None``: none).
        mask_truncated_completions: leave completions that never emit EOS (cut at ``max_new_tokens``) out of the
            loss (DAPO's overlong filtering, Yu et al. 2025); they still count in their group's advantages.
        max_grad_norm: gradient clipping (``None``: none).
        share_prompt: pack a prompt and its group in one row (needs an attention implementation that takes a custom
            mask, sdpa or eager); false scores one row per completion.
        generator: the sampling engine (default :class:`~lit_align.generation.HFGenerator`, Hugging Face
            ``generate`` with each prompt prefilled once for its group).
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
        scale_rewards: Literal["group", "batch", "none"] = "group",
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
        sampling_seed: int | None = None,
        disable_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if disable_dropout and self.residual_dropout:
            raise ValueError("residual_dropout needs disable_dropout: false (GRPO disables dropout by default)")
        reward_fns = [] if reward_fn is None else list(reward_fn) if isinstance(reward_fn, Sequence) else [reward_fn]
        if not reward_fns and reward_model is None:
            raise ValueError("GRPO needs a reward: set reward_fn (one or a list) or reward_model")
        if reward_fns and reward_model is not None:
            raise ValueError("set reward_fn or reward_model, not both")
        n_rewards = max(len(reward_fns), 1)
        if reward_weights is not None and len(reward_weights) != n_rewards:
            raise ValueError(f"reward_weights has {len(reward_weights)} weights for {n_rewards} reward functions")
        if group_size < 2:
            raise ValueError(f"group_size must be at least 2 (advantages are relative to the group), got {group_size}")
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {GRPO_LOSS_TYPES}")
        if scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"unknown scale_rewards {scale_rewards!r}; choose 'group', 'batch' or 'none'")
        check_options(
            *sampling_checks(max_new_tokens, temperature, top_p),
            ("num_iterations", num_iterations, num_iterations >= 1, "at least 1"),
            ("mini_batch_size", mini_batch_size, mini_batch_size is None or mini_batch_size >= 1, "at least 1"),
            ("kl_coef", kl_coef, kl_coef >= 0, ">= 0"),
            ("clip_eps", clip_eps, clip_eps > 0, "positive"),
            ("clip_eps_high", clip_eps_high, clip_eps_high is None or clip_eps_high > 0, "positive"),
            ("max_grad_norm", max_grad_norm, max_grad_norm is None or max_grad_norm > 0, "positive"),
        )
        self.automatic_optimization = False
        self.reward_fns, self.reward_model_name = reward_fns, reward_model
        self.reward_weights = torch.tensor(reward_weights or [1.0] * n_rewards, dtype=torch.float32)
        self.group_size, self.kl_coef = group_size, kl_coef
        self.loss_type, self.scale_rewards = loss_type, scale_rewards
        self.clip_eps, self.clip_eps_high = clip_eps, clip_eps_high
        self.num_iterations, self.mini_batch_size = num_iterations, mini_batch_size
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.missing_eos_penalty, self.max_grad_norm = missing_eos_penalty, max_grad_norm
        self.mask_truncated_completions = mask_truncated_completions
        self.disable_dropout = disable_dropout
        self.generator = generator or HFGenerator()
        self.sampling_seed = sampling_seed
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id, share_prompt=share_prompt)
        self.ref_model: nn.Module | None = None
        self.reward_model: nn.Module | None = None
        self.reward_offset = 0.0
        names = [
            "reward_mean", "reward_std", "zero_std_fraction", "kl", "entropy", "clip_low", "clip_high",
            "policy_loss", "response_length", "no_eos_fraction",
        ]  # fmt: skip
        if len(reward_fns) > 1:
            names += [f"reward_{i}" for i in range(len(reward_fns))]
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

    @contextmanager
    def _reference(self):
        """The reference policy: the frozen copy, or with LoRA the policy with its adapters disabled."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        with eval_mode(self.model), self.model.disable_adapter():
            yield self.model

    # ----- per-token log-probs ----------------------------------------------------------------------------------------
    def collate(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """A packed scoring batch (:class:`~lit_align.data.PreferenceCollator` layout) of prompts and their groups,
        on the module's device."""
        batch = self.collator([{**e, "pairs": []} for e in examples])
        return {k: v.to(self.device) for k, v in batch.items()}

    def completion_logps(
        self, model: nn.Module, batch: Mapping[str, torch.Tensor], width: int, entropy: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """``[n, width]`` log-probs of the completion tokens of ``batch`` under ``model`` at the sampling temperature
        (zero past each completion's end), with ``[M]`` per-token entropies when ``entropy``."""

        def forward() -> Any:
            hidden = backbone_hidden_states(model, batch)
            return unembedding_logps(
                model, hidden[batch["target_row"], batch["target_col"]], batch["target_id"],
                temperature=self.temperature, return_entropy=entropy,
            )  # fmt: skip

        out = run_forward(fsdp_root(model), forward)
        flat = out[0] if entropy else out
        lengths = batch["response_lengths"]
        which = batch["target_response"]
        offsets = torch.arange(len(which), device=which.device) - (lengths.cumsum(0) - lengths)[which]
        logps = flat.new_zeros(len(lengths), width).index_put((which, offsets), flat)
        return (logps, out[1]) if entropy else (logps,)

    # ----- sampling and scoring -----------------------------------------------------------------------------------
    def sample(self, prompts: Mapping[str, Any], n: int) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor]:
        """``n`` completions per prompt: ``(examples, completion_mask [B n, R], completion_ids [B n, R])``."""
        tok = self.tokenizer
        with eval_mode(self.model), self.sampling_context():
            completions = self.generator(
                self.model, prompts["input_ids"], prompts["attention_mask"], max_new_tokens=self.max_new_tokens,
                temperature=self.temperature, top_p=self.top_p, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, num_samples=n, seeds=self.completion_seeds(prompts, n),
            )  # fmt: skip
        mask = completion_mask(completions, tok.eos_token_id)
        completions = completions.masked_fill(mask == 0, tok.pad_token_id)
        lengths = mask.sum(-1).tolist()
        ids = completions.tolist()
        examples = []
        for b, (row, row_mask) in enumerate(zip(prompts["input_ids"], prompts["attention_mask"])):
            group = range(b * n, (b + 1) * n)
            examples.append({"prompt_ids": row[row_mask.bool()].tolist(),
                             "response_ids": [ids[i][: lengths[i]] for i in group]})  # fmt: skip
        return examples, mask, completions

    def compute_rewards(
        self, prompts: Sequence[str], completions: Sequence[str], batch: Mapping[str, torch.Tensor],
        references: Sequence[str] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``[N, F]`` scores of each completion by each reward function (given the data's ``references`` when it has
        them), or ``[N, 1]`` by the reward model, read at each completion's last token of the packed ``batch``."""
        if self.reward_fns:
            columns = [score_text(fn, prompts, completions, references) for fn in self.reward_fns]
            return torch.stack(columns, -1).to(self.device)
        return (response_rewards(self.reward_model, batch) - self.reward_offset).unsqueeze(-1)

    @torch.no_grad()
    def rollout(self, prompts: Mapping[str, Any]) -> GroupRollout:
        """Sample ``group_size`` completions per prompt, score them, compute group-relative advantages, and the
        old-policy and reference log-probs the updates need."""
        g, tok = self.group_size, self.tokenizer
        examples, mask, completions = self.sample(prompts, g)
        has_eos = ((completions == tok.eos_token_id) & (mask == 1)).any(-1)
        n_prompts, width = len(examples), mask.shape[1]
        step = self.mini_batch_size or n_prompts
        chunks = [examples[s : s + step] for s in range(0, n_prompts, step)]
        batches = [self.collate(chunk) for chunk in chunks]
        if self.reward_fns:
            texts = tok.batch_decode(completions, skip_special_tokens=True)
            repeat = lambda values: [v for v in values for _ in range(g)]  # noqa: E731
            references = repeat(prompts["references"]) if "references" in prompts else None
            per_fn = self.compute_rewards(repeat(prompts["prompt_text"]), texts, {}, references)
        else:
            per_fn = torch.cat([self.compute_rewards([], [], b) for b in batches])
        rewards = (per_fn * self.reward_weights.to(per_fn.device)).sum(-1)
        if self.missing_eos_penalty is not None:
            rewards = rewards - self.missing_eos_penalty * (~has_eos).float()
        batch_std = None
        if self.scale_rewards == "batch" and self._trainer is not None and self.trainer.world_size > 1:
            batch_std = self.all_gather(rewards).flatten().std()  # the batch is every device's
        advantages, zero_std = grpo_advantages(rewards, g, self.scale_rewards, batch_std=batch_std)
        policy_moves = self.num_iterations > 1 or len(chunks) > 1
        old_logps = ref_logps = None
        if policy_moves:
            with eval_mode(self.model):
                old_logps = torch.cat([self.completion_logps(self.model, b, width)[0] for b in batches])
        if self.kl_coef != 0:
            with self._reference() as reference:
                ref_logps = torch.cat([self.completion_logps(reference, b, width)[0] for b in batches])
        loss_mask = mask * has_eos.unsqueeze(-1) if self.mask_truncated_completions else mask
        return GroupRollout(examples, mask, loss_mask, rewards, per_fn, advantages, zero_std, has_eos, old_logps,
                            ref_logps)  # fmt: skip

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
        g, width = self.group_size, rollout.completion_mask.shape[1]
        rows = torch.tensor([p * g + k for p in prompt_idx for k in range(g)], device=self.device)
        batch = self.collate([rollout.examples[p] for p in prompt_idx])
        logps, entropy = self.completion_logps(self.model, batch, width, entropy=True)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        loss, stats = grpo_policy_loss(
            logps, pick(rollout.old_logps), rollout.advantages[rows], rollout.loss_mask[rows],
            ref_logps=pick(rollout.ref_logps), kl_coef=self.kl_coef, clip_eps=self.clip_eps,
            clip_eps_high=self.clip_eps_high, loss_type=self.loss_type, max_completion_length=self.max_new_tokens,
            n_tokens=n_tokens,
        )  # fmt: skip
        return loss, {**stats, "policy_loss": loss.detach(), "entropy": entropy.mean()}

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        rollout = self.rollout(batch)
        optimizer = self.optimizers()
        n_prompts = len(rollout.examples)
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
                for key, value in parts.items():
                    stats.setdefault(key, []).append(value.detach())
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.step()
        mask = rollout.completion_mask.float()
        values = {
            "reward_mean": rollout.rewards.mean(),
            "reward_std": rollout.rewards.std() if rollout.rewards.numel() > 1 else torch.zeros(()),
            "zero_std_fraction": rollout.zero_std.float().mean(),
            "response_length": mask.sum(-1).mean(),
            "no_eos_fraction": (~rollout.has_eos).float().mean(),
            **{k: torch.stack(v).mean() for k, v in stats.items()},
        }
        if rollout.rewards_per_fn.shape[1] > 1:
            values.update({f"reward_{i}": col.mean() for i, col in enumerate(rollout.rewards_per_fn.unbind(-1))})
        for name, value in values.items():
            metric = self.train_metrics[name]
            metric(value.to(self.device).float())
            self.log(f"train/{name}", metric, on_step=True, on_epoch=True, prog_bar=name in ("reward_mean", "kl"),
                     batch_size=mask.shape[0])  # fmt: skip

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """One sampled completion per prompt: its mean reward and length."""
        examples, mask, completions = self.sample(batch, 1)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True) if self.reward_fns else []
        per_fn = self.compute_rewards(batch["prompt_text"], texts, {} if self.reward_fns else self.collate(examples),
                                      batch.get("references"))  # fmt: skip
        rewards = (per_fn * self.reward_weights.to(per_fn.device)).sum(-1)
        real = real_rows(batch, len(rewards), self.device)
        for name, value in (("reward_mean", rewards), ("response_length", mask.float().sum(-1))):
            self.val_metrics[name].update(value[real])  # per prompt: the mean over every held-out prompt
            self.log(f"val/{name}", self.val_metrics[name])
