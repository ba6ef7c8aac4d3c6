"""``DistillModule``: on-policy distillation / GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes"): the student samples completions of the prompts and is trained to match a
frozen teacher's next-token distribution at every token of them, through a generalized JSD."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from lit_align.forward import backbone_hidden_states
from lit_align.losses import linear_generalized_jsd
from lit_align.models import (
    TINY,
    empty_weights,
    keep_rotary_fp32,
    load_causal_lm,
    load_tokenizer,
    resolve_dtype,
    tiny_config,
    unwrap_model,
)
from lit_align.modules.base import AlignModule, check_options, real_rows, sampling_checks, zero_dropout
from lit_align.ops import pad_sequences
from lit_align.parallel import fsdp_root, full_tensor, run_forward
from lit_align.rollout import Experience, Generator, RolloutStage, completion_seeds


def load_teacher(
    name: str, student_tokenizer: PreTrainedTokenizerBase, student_name: str | None, dtype: str | None,
    trust_remote_code: bool = False, seed: int | None = None, empty: bool = False,
) -> nn.Module:  # fmt: skip
    """The teacher, frozen in eval mode: a causal LM from the hub or a local directory, or ``"tiny"`` (the embedded
    preset; with ``seed``, initialised from that seed instead of the preset's own, so that it differs from a tiny
    student). Its tokenizer must be the student's: distillation compares next-token distributions id by id."""
    if name != student_name and load_tokenizer(name, trust_remote_code).get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(
            f"teacher {name!r} has another tokenizer than the student; distillation compares their next-token "
            "distributions token id by token id, so the vocabularies must be the same"
        )
    if name == TINY and seed is not None:
        with empty_weights() if empty else nullcontext(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = keep_rotary_fp32(LlamaForCausalLM(tiny_config(student_tokenizer)))
        dtype = resolve_dtype(dtype)
        model = model.to(dtype) if dtype is not None else model
    else:
        model = load_causal_lm(name, student_tokenizer, dtype, trust_remote_code, empty=empty)
    return model.requires_grad_(False).eval()


def _plain_head(model: nn.Module, role: str) -> nn.Module:
    """The output head of ``model`` when the tiled divergence can read it (a linear layer, no logit transform)."""
    lm = unwrap_model(model)
    head = lm.get_output_embeddings()
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    transformed = getattr(config, "final_logit_softcapping", None) is not None or getattr(
        config, "logit_scale", None
    ) not in (None, 1.0)
    if not isinstance(head, nn.Linear) or transformed:
        raise ValueError(
            f"the {role}'s output head ({type(head).__name__}, {type(lm).__name__}) is not a plain linear layer "
            "without logit scaling or soft-capping, which the tiled distillation loss needs"
        )
    return head


class DistillModule(AlignModule):
    """On-policy distillation / GKD (Agarwal et al. 2024): for each prompt the student (``model``) samples
    ``num_samples`` completions (the paper's on-policy data; with probability ``1 - lmbda`` a batch uses the data's
    own completions instead, when the ``PromptDataModule`` keeps them with ``completions: true``), then the loss is
    the generalized JSD between the student's and a frozen teacher's next-token distributions at every completion
    token (:func:`~lit_align.losses.generalized_jsd`, eq. 1 of the paper: ``beta = 0`` the forward
    ``KL(teacher || student)``, ``beta = 1`` the reverse ``KL(student || teacher)``, as TRL's ``GKDTrainer``),
    averaged over the batch's completion tokens (over every device's, so N devices train as one with N x the batch).

    The divergence is computed through the packed prompt + completion rows of the rollout stage (a prompt forwarded
    once for its completions) and the two unembeddings a tile of tokens at a time
    (:func:`~lit_align.losses.linear_generalized_jsd`): neither model's ``[tokens, vocabulary]`` logits are held.
    The gradient flows through the divergence only, not through the sampling (as in the paper and TRL).

    Args:
        teacher: the teacher: a hub id or local directory of a causal LM with the student's tokenizer, or ``"tiny"``
            (the embedded preset, with ``teacher_seed``: to try the pipeline offline). Frozen, in eval mode, sharded
            like the policy under FSDP2 (a frozen role), never in checkpoints (re-created from this on load).
        teacher_seed: with ``teacher: tiny`` only: initialise it from this seed instead of the preset's (``None``:
            the preset itself, which is a tiny student's own starting point).
        beta: the generalized JSD's interpolation, in ``[0, 1]`` (0: forward KL, 1: reverse KL; 0.5, the default as
            in TRL's GKD, the symmetric JSD).
        temperature: sampling temperature, also applied to both models' logits in the divergence (TRL's
            ``DistillationTrainer``).
        lmbda: the fraction of batches trained on the student's samples (the paper's lambda; 1 fully on-policy).
            The others use the data's completions (supervised KD); prompt-only data is always on-policy.
        num_samples: completions sampled per prompt.
        max_new_tokens: the most tokens sampled per completion; the data's completions are cut there too.
        top_p: nucleus sampling's probability mass (1.0: no truncation).
        max_grad_norm: gradient clipping (``None``: none).
        share_prompt: pack a prompt and its completions in one row (sdpa or eager attention); false: a row each.
        generator: the sampling engine (default :class:`~lit_align.rollout.HFGenerator`).
        sampling_seed: the seed completions (and the on-policy draw of each batch) are derived from, per batch and
            prompt, so that a run is the same on any number of devices and when resumed; ``None``: the run's seed.
        disable_dropout: set every dropout in the student to 0.
        *args, **kwargs: :class:`~lit_align.modules.base.AlignModule`'s arguments.
    """

    frozen_modules = ("teacher_model",)

    def __init__(
        self,
        *args: Any,
        teacher: str | nn.Module = TINY,
        teacher_seed: int | None = None,
        beta: float = 0.5,
        temperature: float = 1.0,
        lmbda: float = 0.5,
        num_samples: int = 1,
        max_new_tokens: int = 64,
        top_p: float = 1.0,
        max_grad_norm: float | None = 1.0,
        share_prompt: bool = True,
        generator: Generator | None = None,
        sampling_seed: int | None = None,
        disable_dropout: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if disable_dropout and self.residual_dropout:
            raise ValueError("residual_dropout needs disable_dropout: false (distillation disables dropout by default)")
        check_options(
            *sampling_checks(max_new_tokens, temperature, top_p),
            ("beta", beta, 0 <= beta <= 1, "in [0, 1] (0: forward KL(teacher || student), 1: reverse KL)"),
            ("lmbda", lmbda, 0 <= lmbda <= 1, "in [0, 1]"),
            ("num_samples", num_samples, num_samples >= 1, "at least 1"),
            ("max_grad_norm", max_grad_norm, max_grad_norm is None or max_grad_norm > 0, "positive"),
            ("teacher_seed", teacher_seed, teacher_seed is None or teacher == TINY, "set only with teacher: tiny"),
        )
        self.automatic_optimization = False
        self.teacher_name = teacher if isinstance(teacher, str) else None
        self.teacher_seed = teacher_seed
        self.beta, self.temperature, self.lmbda = beta, temperature, lmbda
        self.num_samples, self.max_new_tokens = num_samples, max_new_tokens
        self.max_grad_norm, self.disable_dropout, self.sampling_seed = max_grad_norm, disable_dropout, sampling_seed
        self.rollout_stage = RolloutStage(self.tokenizer, generator, num_samples, max_new_tokens, temperature, top_p,
                                          share_prompt=share_prompt)  # fmt: skip
        self.teacher_model: nn.Module | None = None
        if isinstance(teacher, nn.Module):  # from Python: a model already built (not saved in checkpoints)
            self.teacher_model = teacher.requires_grad_(False).eval()
        names = ["loss", "divergence", "response_length", "no_eos_fraction", "on_policy"]
        self.train_metrics = nn.ModuleDict({name: MeanMetric() for name in names})
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in ("divergence", "response_length")})

    # ----- the roles --------------------------------------------------------------------------------------------------
    def configure_roles(self) -> None:
        if self.disable_dropout:
            zero_dropout(self.model)
        if self.teacher_model is None:
            self.teacher_model = load_teacher(
                self.teacher_name, self.tokenizer, self.model_name_or_path, self.dtype_name, self.trust_remote_code,
                seed=self.teacher_seed, empty=self.empty_init,
            )  # fmt: skip
        student, teacher = _plain_head(self.model, "student"), _plain_head(self.teacher_model, "teacher")
        if student.weight.shape[0] != teacher.weight.shape[0]:
            raise ValueError(
                f"the student's vocabulary has {student.weight.shape[0]} entries and the teacher's "
                f"{teacher.weight.shape[0]}: distillation needs one shared vocabulary (the same tokenizer and size)"
            )

    # ----- the divergence ---------------------------------------------------------------------------------------------
    def token_divergence(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[M]`` the generalized JSD between the student and the teacher at each completion token of a packed
        ``batch`` (:meth:`~lit_align.rollout.RolloutStage.pack`, in its ``target_*`` order); differentiable with
        respect to the student. Each model runs as one forward of its FSDP root when sharded; the teacher's output
        head is gathered whole for the loss (its gradient-free backward needs it)."""
        rows, cols = batch["target_row"], batch["target_col"]
        teacher = self.teacher_model
        with torch.no_grad():
            teacher_hidden = run_forward(fsdp_root(teacher), lambda: backbone_hidden_states(teacher, batch)[rows, cols])
            teacher_head = _plain_head(teacher, "teacher")
            teacher_weight = full_tensor(teacher_head.weight.detach())
            teacher_bias = None if teacher_head.bias is None else full_tensor(teacher_head.bias.detach())
        student_head = _plain_head(self.model, "student")

        def divergence(hidden: torch.Tensor) -> torch.Tensor:
            return linear_generalized_jsd(
                hidden, student_head.weight, teacher_hidden, teacher_weight, self.beta, self.temperature,
                student_bias=student_head.bias, teacher_bias=teacher_bias,
            )  # fmt: skip

        def forward() -> torch.Tensor:
            hidden = backbone_hidden_states(self.model, batch)[rows, cols]
            # A head sharded as an FSDP unit of its own is gathered for this, and its gradient reduce-scattered.
            return run_forward(student_head, divergence, hidden)

        return run_forward(fsdp_root(self.model), forward)

    # ----- the data ---------------------------------------------------------------------------------------------------
    def sample(self, prompts: Mapping[str, Any], group_size: int | None = None) -> Experience:
        """Completions of the student for a batch of prompts (``num_samples`` each, or ``group_size``)."""
        return self.sample_policy(self.rollout_stage, prompts, group_size)

    def dataset_experience(self, prompts: Mapping[str, Any]) -> Experience:
        """The data's own completions of a batch (``completion_ids``), cut at ``max_new_tokens``, as an
        :class:`~lit_align.rollout.Experience` of one completion per prompt."""
        tok = self.tokenizer
        ids = [list(c)[: self.max_new_tokens] for c in prompts["completion_ids"]]
        completion_ids = pad_sequences(ids, tok.pad_token_id, "right").to(prompts["input_ids"].device)
        mask = pad_sequences([[1] * len(c) for c in ids], 0, "right").to(completion_ids.device)
        has_eos = torch.tensor([bool(c) and c[-1] == tok.eos_token_id for c in ids], device=completion_ids.device)
        return Experience(
            prompt_ids=[row[m.bool()].tolist() for row, m in zip(prompts["input_ids"], prompts["attention_mask"])],
            prompt_text=list(prompts["prompt_text"]), references=None, group_size=1, completion_ids=completion_ids,
            completion_mask=mask, completion_text=tok.batch_decode(completion_ids, skip_special_tokens=True),
            has_eos=has_eos,
        )  # fmt: skip

    def on_policy(self, prompts: Mapping[str, Any], batch_idx: int) -> bool:
        """Whether this batch trains on the student's samples: always without the data's completions, else with
        probability ``lmbda``, drawn from the sampling stream and the batch index (the same on every rank and in a
        resumed run, and drawing nothing from the global RNG)."""
        if "completion_ids" not in prompts or self.lmbda >= 1:
            return True
        draw = completion_seeds(*self.sampling_stream(), "lmbda", keys=[batch_idx], num_samples=1).item() / 2.0**63
        return draw < self.lmbda

    # ----- optimisation -----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if getattr(datamodule, "pretrain_data", None) is not None:
            raise ValueError("distillation has no pre-training mix: set pretrain_data: null on the PromptDataModule")
        if self.lmbda < 1 and datamodule is not None and not getattr(datamodule, "completions", False):
            rank_zero_warn(
                f"lmbda={self.lmbda} asks for the data's own completions on {1 - self.lmbda:.0%} of the batches, but "
                "the PromptDataModule keeps none (completions: false): every batch is trained on-policy"
            )

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        super().on_before_optimizer_step(optimizer)
        if self.max_grad_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        on_policy = self.on_policy(batch, batch_idx)
        experience = self.sample(batch) if on_policy else self.dataset_experience(batch)
        packed = self.rollout_stage.pack(experience, device=self.device)
        divergence = self.token_divergence(packed)
        n_tokens = self.rank_share(torch.tensor(divergence.numel(), device=self.device))
        loss = divergence.sum() / n_tokens.clamp(min=1)  # the global batch's token mean (see rank_share)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()  # clipped in on_before_optimizer_step, after any AMP unscaling
        self.rollout_stage.generator.weights_changed()
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.step()
        mask = experience.completion_mask.float()
        values = {  # per-token and per-completion means, weighted by their counts across steps and devices
            "loss": (loss.detach(), 1),
            "divergence": (divergence.detach().mean(), divergence.numel()),
            "response_length": (mask.sum(-1).mean(), mask.shape[0]),
            "no_eos_fraction": ((~experience.has_eos).float().mean(), mask.shape[0]),
            "on_policy": (torch.tensor(float(on_policy)), 1),
        }
        for name, (value, weight) in values.items():
            metric = self.train_metrics[name]
            metric(value.to(self.device).float(), weight)
            self.log(f"train/{name}", metric, on_step=True, on_epoch=True, prog_bar=name == "divergence",
                     batch_size=mask.shape[0])  # fmt: skip

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """One sampled completion per held-out prompt, scored by the teacher: the divergence at each of its tokens
        (``val/divergence``: the mean over every held-out completion token, the number distillation lowers) and its
        length."""
        experience = self.sample(batch, group_size=1)
        packed = self.rollout_stage.pack(experience, device=self.device)
        divergence = self.token_divergence(packed)
        real = real_rows(batch, len(experience.prompt_ids), self.device)
        self.val_metrics["divergence"].update(divergence[real[packed["target_response"]]].float())
        self.val_metrics["response_length"].update(experience.completion_mask.float().sum(-1)[real])
        for name in ("divergence", "response_length"):
            self.log(f"{self.held_out_split}/{name}", self.val_metrics[name])
