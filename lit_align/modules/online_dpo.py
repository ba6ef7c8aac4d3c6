"""``OnlineDPOModule``: online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"):
sample two completions per prompt from the current policy, let a reward decide which is preferred, and take a DPO
step on that fresh pair."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn
from torchmetrics import MeanMetric

from lit_align.forward import eval_mode
from lit_align.losses import (
    ONLINE_DPO_TIES,
    REFERENCE_FREE_LOSS_TYPES,
    check_dpo_options,
    online_dpo_loss,
    score_pairs,
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

GROUP_SIZE = 2  # samples per prompt: the two responses the annotator compares (Guo et al. 2024, algorithm 1)


class OnlineDPOModule(AlignModule):
    """Online DPO (Guo et al. 2024, algorithm 1; TRL's ``OnlineDPOTrainer``): for each prompt of a batch sample two
    completions from the current policy, score them with reward functions or a reward model (the "AI feedback"),
    take the higher-scored one as chosen and the other as rejected (:func:`~lit_align.losses.score_pairs`), and
    minimise the DPO-family loss of those pairs against a frozen reference (:func:`~lit_align.losses.dpo_loss`).
    DPO on preferences that stay on-policy as the policy moves; one optimizer step per prompt batch.

    Sampling goes through the shared :class:`~lit_align.rollout.RolloutStage` (Hugging Face ``generate`` or vLLM,
    each completion from its own keyed seed, so a run resumes exactly); the log-probs of policy and reference come
    from one packed row per prompt (the prompt once, its two completions after it, each seeing only the prompt and
    itself) at temperature 1: the loss is on the policy itself, whatever temperature it was sampled at (as TRL).

    Pairs whose two completions scored the same carry no preference (``ties``): ``"skip"`` (default) leaves them out
    of the loss, ``"keep"`` trains on them with the first sample as chosen, as TRL 1.16 does. Either way they are
    counted (``train/tie_fraction``). The implicit-reward metrics describe every pair.

    Args:
        reward_fn: a :class:`~lit_align.rewards.RewardFunction` or a list of them (scores are combined with
            ``reward_weights``); from Python any callable ``(prompts, completions) -> [N]``.
        reward_weights: one weight per reward function (default all 1).
        reward_model: a ``RewardModule`` export directory or ``*ForSequenceClassification`` id scoring the
            policy's token ids (used when no ``reward_fn`` is given), or ``"tiny"`` (untrained, to try the pipeline).
        beta: strength of the KL regularisation towards the reference (DPO's beta; IPO's tau).
        loss_type: the DPO loss on each sampled pair, one of :class:`~lit_align.modules.dpo.DPOModule`'s
            (``sigmoid`` is DPO; ``ipo`` is length-normalised, as TRL's ``DPOTrainer``, where TRL's online trainer
            uses the unnormalised log-ratio difference). Reference-free losses (``simpo``) need no reference model.
        label_smoothing: assumed label-noise rate (cDPO with ``sigmoid``, ``robust``, ``exo_pair``).
        simpo_gamma: SimPO's target reward margin.
        discopop_tau: DiscoPOP's temperature.
        rpo_alpha: weight of an extra per-token NLL loss on the preferred completion (RPO); ``None`` for none.
        ties: ``"skip"`` or ``"keep"`` (above).
        max_new_tokens: the most tokens sampled per completion.
        temperature: sampling temperature.
        top_p: nucleus sampling's probability mass (1.0: no truncation).
        missing_eos_penalty: subtracted from the score of completions that never emit EOS, before pairing (as
            TRL; ``None``: none).
        max_grad_norm: gradient clipping (``None``: none).
        share_prompt: pack a prompt and its two completions in one row (needs an attention implementation that takes
            a custom mask, sdpa or eager); false scores one row per completion.
        generator: the sampling engine (default :class:`~lit_align.rollout.HFGenerator`;
            :class:`~lit_align.rollout.VLLMGenerator` for vLLM, which is told after every optimizer step to take the
            new weights).
        sampling_seed: the seed completions are sampled from (each completion from its own seed hashed from this,
            the epoch and its prompt); ``None``: the run's ``seed_everything`` seed.
        disable_dropout: set every dropout in the policy to 0 (as TRL), so that the policy's log-probs are those of
            the same deterministic function as the reference's.
        *args, **kwargs: :class:`~lit_align.modules.base.AlignModule`'s arguments.
    """

    frozen_modules = ("ref_model", "reward_model")

    def __init__(
        self,
        *args: Any,
        reward_fn: RewardFunction | list[RewardFunction] | None = None,
        reward_weights: list[float] | None = None,
        reward_model: str | None = None,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        discopop_tau: float = 0.05,
        rpo_alpha: float | None = None,
        ties: Literal["skip", "keep"] = "skip",
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        missing_eos_penalty: float | None = None,
        max_grad_norm: float | None = 1.0,
        share_prompt: bool = True,
        generator: Generator | None = None,
        sampling_seed: int | None = None,
        disable_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if disable_dropout and self.residual_dropout:
            raise ValueError("residual_dropout needs disable_dropout: false (online DPO disables dropout by default)")
        reward_fns = reward_functions("online DPO", reward_fn, reward_weights, reward_model)
        check_dpo_options(loss_type, beta, label_smoothing, discopop_tau, rpo_alpha)
        check_options(
            *sampling_checks(max_new_tokens, temperature, top_p),
            ("ties", ties, ties in ONLINE_DPO_TIES, f"one of {ONLINE_DPO_TIES}"),
            ("max_grad_norm", max_grad_norm, max_grad_norm is None or max_grad_norm > 0, "positive"),
        )
        self.automatic_optimization = False
        self.reward_model_name = reward_model
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.simpo_gamma, self.discopop_tau, self.rpo_alpha = simpo_gamma, discopop_tau, rpo_alpha
        self.reference_free = loss_type in REFERENCE_FREE_LOSS_TYPES
        self.ties, self.max_new_tokens, self.max_grad_norm = ties, max_new_tokens, max_grad_norm
        self.disable_dropout, self.sampling_seed = disable_dropout, sampling_seed
        self.rollout_stage = RolloutStage(
            self.tokenizer, generator, GROUP_SIZE, max_new_tokens, temperature, top_p, share_prompt=share_prompt,
            reward_fns=reward_fns, reward_weights=reward_weights, missing_eos_penalty=missing_eos_penalty,
        )  # fmt: skip
        self.ref_model: nn.Module | None = None
        self.reward_model: nn.Module | None = None
        self.reward_offset = 0.0
        names = [
            "loss", "reward_mean", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected", "score_margin", "tie_fraction", "response_length", "no_eos_fraction",
        ]  # fmt: skip
        if not self.reference_free:
            names.append("kl")
        if len(reward_fns) > 1:
            names += [f"reward_{i}" for i in range(len(reward_fns))]
        if generator is not None and generator.returns_logps:
            names += ["rollout/logp_diff_mean", "rollout/logp_diff_max"]
        self.train_metrics = nn.ModuleDict({_key(name): MeanMetric() for name in names})
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in ("reward_mean", "response_length")})

    # ----- the roles --------------------------------------------------------------------------------------------------
    def configure_roles(self) -> None:
        if self.disable_dropout:
            zero_dropout(self.model)
        if not self.reference_free and self.ref_model is None and self.lora is None:
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        if self.reward_model is None and self.reward_model_name is not None:
            self.reward_model, self.reward_offset = load_frozen_reward_model(
                self.reward_model_name, self.tokenizer, self.model_name_or_path, self.dtype_name,
                self.trust_remote_code, empty=self.empty_init,
            )  # fmt: skip

    # ----- the rollout ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, prompts: Mapping[str, Any]) -> tuple[Experience, dict[str, torch.Tensor], torch.Tensor | None]:
        """Sample two completions per prompt and score them: ``(experience, packed, ref_logps)``, the packed scoring
        rows of every prompt with its completions (on the module's device) and the reference's summed completion
        log-probs ``[N]`` (``None`` for reference-free losses)."""
        stage = self.rollout_stage
        experience = self.sample(prompts)
        packed = stage.pack(experience, device=self.device)
        stage.score(experience, self.reward_model, self.reward_offset, [packed])
        ref_logps = None
        if not self.reference_free:
            with reference_policy(self.model, self.ref_model) as reference:
                ref_logps = stage.completion_logps(reference, packed, experience.width, temperature=1.0).logps.sum(-1)
        return experience, packed, ref_logps

    def sample(self, prompts: Mapping[str, Any], group_size: int | None = None) -> Experience:
        """Completions of the policy for a batch of prompts (two each, or ``group_size``)."""
        return self.sample_policy(self.rollout_stage, prompts, group_size)

    # ----- optimisation -----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if getattr(datamodule, "pretrain_data", None) is not None:
            raise ValueError("online DPO has no pre-training mix: set pretrain_data: null on the PromptDataModule")

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        super().on_before_optimizer_step(optimizer)
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")

    def compute_loss(
        self, experience: Experience, logps: torch.Tensor, ref_logps: torch.Tensor | None, n_pairs: Any = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The online DPO loss of a scored ``experience`` given the policy's summed completion log-probs ``logps``
        ``[N]`` (with their graph) and the reference's ``[N]``, and the values behind the metrics."""
        lengths = experience.completion_mask.sum(-1).to(logps.device)
        loss, pairs = online_dpo_loss(
            logps, ref_logps, experience.rewards.to(logps.device), lengths, GROUP_SIZE, self.ties, n_pairs,
            beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            simpo_gamma=self.simpo_gamma, discopop_tau=self.discopop_tau, rpo_alpha=self.rpo_alpha,
        )  # fmt: skip
        chosen, rejected, rewards = pairs["chosen"], pairs["rejected"], experience.rewards.to(logps.device)
        margins = pairs["chosen_rewards"] - pairs["rejected_rewards"]
        mask = experience.completion_mask.float()
        values = {
            "loss": loss.detach(),
            "reward_mean": rewards,
            "rewards/chosen": pairs["chosen_rewards"],
            "rewards/rejected": pairs["rejected_rewards"],
            "rewards/margins": margins,
            "rewards/accuracies": (margins > 0).float(),
            "logps/chosen": logps[chosen].detach(),
            "logps/rejected": logps[rejected].detach(),
            "score_margin": rewards[chosen] - rewards[rejected],
            "tie_fraction": pairs["tie"].float(),
            "response_length": mask.sum(-1),
            "no_eos_fraction": (~experience.has_eos).float(),
        }
        if ref_logps is not None:  # the mean sequence-level log-ratio of the samples, an estimate of KL(pi || ref)
            values["kl"] = (logps.detach() - ref_logps).float()
        if experience.scores.shape[1] > 1:
            values.update({f"reward_{i}": col for i, col in enumerate(experience.scores.unbind(-1))})
        return loss, values

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        experience, packed, ref_logps = self.rollout(batch)
        stage = self.rollout_stage
        token_logps = stage.completion_logps(self.model, packed, experience.width, temperature=1.0).logps
        tie = score_pairs(experience.rewards.to(self.device), GROUP_SIZE)[2]
        n_pairs = self.rank_share((~tie if self.ties == "skip" else torch.ones_like(tie)).sum())  # the global mean
        loss, values = self.compute_loss(experience, token_logps.sum(-1), ref_logps, n_pairs)
        if experience.sampler_logps is not None:  # the engine's log-probs against the policy as it sampled
            values.update(stage.mismatch(experience, self._sampling_logps(packed, experience, token_logps)))
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()  # clipped in on_before_optimizer_step, after any AMP unscaling
        stage.generator.weights_changed()
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.step()
        for name, value in values.items():
            metric = self.train_metrics[_key(name)]
            metric(value.detach().to(self.device).float())
            key = name if name.startswith("rollout/") else f"train/{name}"
            self.log(key, metric, on_step=True, on_epoch=True, prog_bar=name in ("loss", "reward_mean"),
                     batch_size=len(experience.prompt_ids))  # fmt: skip
        return loss.detach()

    @torch.no_grad()
    def _sampling_logps(self, packed: Mapping[str, torch.Tensor], experience: Experience, logps: torch.Tensor):
        """The policy's completion log-probs at the sampling temperature (``logps``, taken at 1, when they agree)."""
        if self.rollout_stage.temperature == 1.0:
            return logps.detach()
        with eval_mode(self.model):
            return self.rollout_stage.completion_logps(self.model, packed, experience.width).logps

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """One sampled completion per prompt: its mean reward and length."""
        experience = self.sample(batch, group_size=1)
        packed = [] if self.rollout_stage.reward_fns else [self.rollout_stage.pack(experience, device=self.device)]
        scores = self.rollout_stage.score(experience, self.reward_model, self.reward_offset, packed).scores
        rewards = (scores * self.rollout_stage.reward_weights.to(scores.device)).sum(-1)  # no missing-EOS penalty
        real = real_rows(batch, len(rewards), self.device)
        for name, value in (("reward_mean", rewards), ("response_length", experience.completion_mask.float().sum(-1))):
            self.val_metrics[name].update(value.to(self.device)[real])  # per prompt: the mean over held-out prompts
            self.log(f"{self.held_out_split}/{name}", self.val_metrics[name])


def _key(name: str) -> str:
    return name.replace("/", "_")
