"""``AlignModule``: the thin base every method shares (policy loading, optimizer injection, export)."""

from __future__ import annotations

import math
import os
import pickle
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from safetensors.torch import save_file
from torch import nn
from torchmetrics import Metric
from transformers import PreTrainedTokenizerBase

from lit_align.checksums import write_checksums
from lit_align.models import (
    TINY,
    eos_not_pad_in_config,
    keep_rotary_fp32,
    load_causal_lm,
    load_tokenizer,
    lora_state_dict,
    resolve_dtype,
    unwrap_model,
)
from lit_align.optim import WarmupCosineLR, default_optimizer
from lit_align.parallel import full_state_dict, transformer_blocks


@dataclass
class LoRA:
    """LoRA adapters through PEFT (Hu et al. 2021); only the adapters train.

    Args:
        r: adapter rank.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or ``"all-linear"``.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = field(default="all-linear")


class _ResidualDropout:
    """Forward hook: dropout on a sub-layer's output before it joins the residual stream."""

    def __init__(self, p: float) -> None:
        self.p = p

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training or self.p == 0:
            return output
        if isinstance(output, tuple):
            return (F.dropout(output[0], self.p, True), *output[1:])
        return F.dropout(output, self.p, True)


def add_residual_dropout(model: nn.Module, p: float) -> int:
    """Apply dropout with probability ``p`` to every attention and MLP sub-layer output of ``model``'s transformer
    blocks (residual dropout, as in GPT-2 and InstructGPT; Llama-family models have none built in).

    Returns the number of blocks hooked; raises if ``model`` has no block with ``self_attn``/``attn`` and ``mlp``.
    """
    blocks = [
        b for b in transformer_blocks(model) if hasattr(b, "mlp") and (hasattr(b, "self_attn") or hasattr(b, "attn"))
    ]
    if not blocks:
        raise ValueError(f"residual_dropout: found no transformer block with attn and mlp in {type(model).__name__}")
    hook = _ResidualDropout(p)
    for block in blocks:
        attention = block.self_attn if hasattr(block, "self_attn") else block.attn
        attention.register_forward_hook(hook)
        block.mlp.register_forward_hook(hook)
    return len(blocks)


def _drop_frozen(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    for name in module.frozen_modules:
        for key in [k for k in state_dict if k.startswith(f"{prefix}{name}.")]:
            del state_dict[key]


def _keep_frozen(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    module.on_weights_loaded()
    for name in module.frozen_modules:
        frozen = getattr(module, name, None)
        if frozen is not None:
            for key, tensor in frozen.state_dict().items():
                state_dict.setdefault(f"{prefix}{name}.{key}", tensor)


def zero_dropout(model: nn.Module) -> None:
    """Set every ``nn.Dropout`` in ``model`` to ``p = 0`` (on-policy ratios and DPO's step-0 identity need a
    deterministic policy)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def real_rows(batch: Mapping[str, Any], n: int, device: Any) -> torch.Tensor:
    """``[n]`` booleans: the rows of a prompt batch that are real, not the padding that evens out the ranks'
    held-out sets (:meth:`~lit_align.data.base.RecordsDataModule.neutral_example`)."""
    if "is_padding" in batch:
        return ~batch["is_padding"].to(device)
    return torch.ones(n, dtype=torch.bool, device=device)


def check_options(*checks: tuple[str, Any, bool, str]) -> None:
    """Raise a ``ValueError`` naming the first option whose check fails: each check is ``(name, value, holds,
    what it must be)``. Modules call it in ``__init__``, so a bad setting fails when the config is read, not at the
    first training step."""
    for name, value, holds, expected in checks:
        if not holds:
            raise ValueError(f"{name}={value!r}: must be {expected}")


def reward_functions(method: str, reward_fn: Any, reward_weights: Any, reward_model: str | None) -> list[Any]:
    """The reward functions of an on-policy ``method`` as a list (one, a list, or none when ``reward_model`` scores),
    checked: exactly one of ``reward_fn`` and ``reward_model``, and one weight per reward function."""
    reward_fns = [] if reward_fn is None else list(reward_fn) if isinstance(reward_fn, Sequence) else [reward_fn]
    if not reward_fns and reward_model is None:
        raise ValueError(f"{method} needs a reward: set reward_fn (one or a list) or reward_model")
    if reward_fns and reward_model is not None:
        raise ValueError("set reward_fn or reward_model, not both")
    n_rewards = max(len(reward_fns), 1)
    if reward_weights is not None and len(reward_weights) != n_rewards:
        raise ValueError(f"reward_weights has {len(reward_weights)} weights for {n_rewards} reward functions")
    return reward_fns


def sampling_checks(max_new_tokens: int, temperature: float, top_p: float) -> tuple[tuple[str, Any, bool, str], ...]:
    """:func:`check_options` checks of the sampling settings the on-policy methods share."""
    return (
        ("max_new_tokens", max_new_tokens, max_new_tokens >= 1, "at least 1"),
        ("temperature", temperature, temperature > 0, "positive"),
        ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
    )


def _plain_data(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain_data(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain_data(v) for k, v in value.items())
    return False


class AlignModule(L.LightningModule):
    """Base of the alignment methods: owns the policy, its tokenizer, the optimizer and schedule, and export.

    Args:
        model: ``"tiny"`` (the embedded offline preset), a Hugging Face hub id or local directory, or an already built
            causal LM (``nn.Module``) for use in your own project.
        tokenizer: a tokenizer or its name/path; by default the one that goes with ``model``.
        lr: peak learning rate, applied to whichever optimizer is used: it replaces the optimizer's own ``lr``,
            which a printed or saved config therefore leaves out (setting that one to another value is an error).
        optimizer: optimizer factory (``class_path`` in YAML); default AdamW with betas (0.9, 0.95), as InstructGPT.
        lr_scheduler: schedule factory, stepped every optimizer step (PPO and GRPO: every rollout batch); default
            :class:`~lit_align.optim.WarmupCosineLR` (3% warm-up, cosine decay to 10%).
        dtype: dtype to load the weights in (``"bfloat16"``, ``"float16"``, ``"float32"``); by default as stored for
            hub models and fp32 for ``tiny``. Mixed precision is the Trainer's ``precision``.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        lora: train LoRA adapters instead of all weights (needs ``pip install lit-align[peft]``).
        residual_dropout: dropout on every attention/MLP output before the residual add (InstructGPT used 0.2);
            ``None`` leaves the model as it is.
        trust_remote_code: allow hub models and tokenizers to run their own code. Off unless you trust the source.
        export_dir: write the trained policy here as a Hugging Face directory (safetensors) when fitting ends.
        max_nonfinite_steps: optimizer steps whose gradients hold a NaN or infinity are skipped (no update, no
            optimizer-state change) and counted; once more than this many were skipped, training stops with an
            error naming the step and the batch. (Under ``16-mixed`` the gradient scaler's own overflow skips,
            with a finite loss, are normal and not counted.)
    """

    def __init__(
        self,
        model: str | nn.Module = TINY,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        lr: float = 1e-5,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        lora: LoRA | None = None,
        residual_dropout: float | None = None,
        trust_remote_code: bool = False,
        export_dir: str | None = None,
        max_nonfinite_steps: int = 5,
    ) -> None:
        super().__init__()
        if isinstance(lora, Mapping):  # from a checkpoint's hyper-parameters
            lora = LoRA(**lora)
        resolve_dtype(dtype)
        check_options(
            ("lr", lr, lr > 0, "positive"),
            ("residual_dropout", residual_dropout, residual_dropout is None or 0 <= residual_dropout < 1, "in [0, 1)"),
            ("max_nonfinite_steps", max_nonfinite_steps, max_nonfinite_steps >= 0, ">= 0"),
            ("lora.r", lora and lora.r, lora is None or lora.r >= 1, "at least 1"),
        )
        objects = {"model": model, "tokenizer": tokenizer, "optimizer": optimizer, "lr_scheduler": lr_scheduler}
        self.save_hyperparameters(ignore=[name for name, value in objects.items() if not isinstance(value, str)])
        if lora is not None:
            self.hparams["lora"] = asdict(lora)
        # Checkpoints hold plain data only (they load with weights_only=True): objects passed from Python (a reward
        # function, a generator, ...) are not saved; pass them again to load_from_checkpoint.
        for key in [k for k, v in self.hparams.items() if not _plain_data(v)]:
            del self.hparams[key]
        if isinstance(model, nn.Module) and tokenizer is None:
            raise ValueError("a model given as an nn.Module needs its tokenizer")
        if isinstance(tokenizer, PreTrainedTokenizerBase):
            self.tokenizer = tokenizer
        else:
            self.tokenizer = load_tokenizer(tokenizer or model, trust_remote_code=trust_remote_code)
        self.model_name_or_path = model if isinstance(model, str) else None
        self.lr, self.optimizer_factory, self.lr_scheduler_factory = lr, optimizer, lr_scheduler
        self.dtype_name, self.trust_remote_code = dtype, trust_remote_code
        self.gradient_checkpointing, self.lora, self.residual_dropout = gradient_checkpointing, lora, residual_dropout
        self.export_dir = export_dir
        self.max_nonfinite_steps, self.nonfinite_steps = max_nonfinite_steps, 0
        self._rng_to_restore: dict[str, Any] | None = None
        self._current_batch: tuple[int, Any] | None = None
        self._last_loss: torch.Tensor | None = None
        # Frozen helpers (reference, reward model) are re-created from their source, never saved: strip them from
        # state dicts, and put the live ones back in before a (strict) load.
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_keep_frozen)
        self.model: nn.Module | None = None
        if isinstance(model, nn.Module):
            self.model = self._prepare_model(model)

    #: names of frozen sub-modules that checkpoints leave out (re-created from their source on load)
    frozen_modules: tuple[str, ...] = ()

    def on_weights_loaded(self) -> None:
        """Called whenever a state dict is loaded into the module (a checkpoint, a resume)."""

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        # The models are created in configure_model, by the Trainer. A state dict can arrive before that, in a
        # process where it never ran: the main process after a ddp_spawn run, where Lightning hands back the
        # trained weights. Create them (whole) first, so that the module is usable after fit.
        if self.model is None and any(key.startswith("model.") for key in state_dict):
            self.configure_model()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def train(self, mode: bool = True) -> AlignModule:
        super().train(mode)
        for name in self.frozen_modules:  # frozen helpers stay in eval mode: no dropout in a reference, ever
            frozen = getattr(self, name, None)
            if frozen is not None:
                frozen.eval()
        return self

    # ----- the policy -------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Create the policy and the method's other models (:meth:`configure_roles`), then, when the strategy gives a
        device mesh (``FSDP2Strategy``, Lightning's ``ModelParallelStrategy``), shard them with FSDP2: the trainable
        ones always, the frozen ones unless the strategy replicates them. Called by the Trainer, inside the
        strategy's initialisation context; once the models exist it does nothing more."""
        mesh = getattr(self, "_device_mesh", None)
        # Under sharding only rank 0 reads the weights; the other ranks build the models' architecture (parameters
        # on the meta device) and receive each weight's shard from rank 0 once the models are sharded: no rank
        # but the first ever holds a whole model.
        self.empty_init = (
            mesh is not None and self.model is None and self.trainer.world_size > 1 and (self.trainer.global_rank != 0)
        )
        if self.model is None:
            self.model = self._prepare_model(self.build_model())
        self.configure_roles()
        if mesh is not None:
            self._shard(mesh)
        self.empty_init = False

    #: whether :meth:`build_model` (and the roles' loaders) must build the architecture only (see configure_model)
    empty_init: bool = False

    def configure_roles(self) -> None:
        """Create the method's models besides the policy (reference, reward, value model) from the policy as built,
        before anything is sharded. Override in a method; it must do nothing for a role that already exists."""

    def sampling_context(self, generator: Any = None) -> Any:
        """The context to sample from the policy in: with a sharded policy and the strategy's
        ``gather_for_generation`` (the default), the whole policy all-gathered once for the rollout (no collective
        while decoding), unless the ``generator`` keeps its own copy of the weights; otherwise nothing."""
        from lit_align.parallel import gathered
        from lit_align.strategies import sharding_options

        options = sharding_options(self.trainer.strategy if self._trainer is not None else None)
        own = getattr(generator, "owns_weights", False)
        return gathered(self.model, enabled=options["gather_for_generation"] and not own)

    def sample_policy(self, stage: Any, prompts: Mapping[str, Any], group_size: int | None = None) -> Any:
        """Completions of the policy for a batch of prompts through a :class:`~lit_align.rollout.RolloutStage`
        (``group_size`` each, default the stage's), each from its own seed in the run's sampling stream; the engine
        is told to free what it holds once sampling is done."""
        with self.sampling_context(stage.generator):
            experience = stage.sample(self.model, prompts, self.sampling_stream(), group_size)
        stage.generator.release()
        return experience

    #: names of trainable sub-modules besides the policy (PPO's value model), sharded like it
    trainable_modules: tuple[str, ...] = ()

    def _shard(self, mesh: Any) -> None:
        from lit_align.parallel import is_sharded

        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                "lit_align's modules shard data-parallel (FSDP2) and do not use tensor parallelism: use "
                "lit_align.strategies.FSDP2Strategy, or ModelParallelStrategy with tensor_parallel_size=1 and "
                "data_parallel_size equal to the number of devices"
            )
        for name in ("model", *self.trainable_modules, *self.frozen_modules):
            module = getattr(self, name, None)
            if module is not None and not is_sharded(unwrap_model(module)):
                self.distribute(module, frozen=name in self.frozen_modules)

    def distribute(self, module: nn.Module, frozen: bool) -> nn.Module:
        """Put a model built for this module onto the ranks of its device mesh: sharded with FSDP2 (a frozen one
        replicated instead when the strategy says so), each rank receiving its part of rank 0's weights (the other
        ranks built it with :attr:`empty_init`). A collective: every rank calls it. Returns ``module``."""
        from lit_align.parallel import broadcast_weights, materialize, shard
        from lit_align.strategies import sharding_options

        mesh = self._device_mesh
        mesh = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        options = sharding_options(self.trainer.strategy)
        # the whole weights, on rank 0 only (the others hold a skeleton), kept until they are handed out
        weights = {k: v for k, v in module.state_dict().items()} if self.trainer.global_rank == 0 else {}
        if not (frozen and options["replicate_frozen"]):
            shard(unwrap_model(module), mesh, options["reshard_after_forward"], frozen=frozen)
        if self.trainer.world_size > 1:
            materialize(module, self.trainer.strategy.root_device)
            broadcast_weights(module, weights)
        return module

    def build_model(self) -> nn.Module:
        """Load the network named by ``model`` (a causal LM here; the reward model overrides this)."""
        return load_causal_lm(self.model_name_or_path, self.tokenizer, self.dtype_name, self.trust_remote_code,
                              empty=self.empty_init)  # fmt: skip

    def _prepare_model(self, model: nn.Module) -> nn.Module:
        keep_rotary_fp32(model)  # also a model passed in, should the Trainer cast it (bf16-true)
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if isinstance(embeddings, nn.Embedding):
            # A config's pad id becomes the embedding's padding_idx, whose row gets no gradient: with pad == eos the
            # EOS embedding (where rewards are read, what ends every response) would never train. Padding positions
            # are masked and carry no loss, so every row may train.
            embeddings.padding_idx = None
        if self.residual_dropout is not None:
            add_residual_dropout(model, self.residual_dropout)
        if self.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if self.lora is not None:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=self.lora.r,
                lora_alpha=self.lora.alpha,
                lora_dropout=self.lora.dropout,
                target_modules=self.lora.target_modules,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, config)
        # from_pretrained returns models in eval mode and Lightning keeps the modes it finds: a trainable model
        # trains in train mode whatever its origin (dropout, residual dropout), frozen helpers stay in eval.
        return model.train()

    def on_validation_start(self) -> None:
        # Validation draws no random number from the training streams: they are set aside and validation runs on a
        # stream seeded by the step (repeatable, and the same in a resumed run), so that a run resumed from a
        # checkpoint that a validation followed continues exactly as the uninterrupted one.
        self._training_rng = _get_rng_states()
        torch.manual_seed(VALIDATION_SEED + (self.trainer.global_step if self._trainer is not None else 0))

    def on_validation_end(self) -> None:
        if getattr(self, "_training_rng", None) is not None:
            _set_rng_states(self._training_rng)
            self._training_rng = None

    # ----- held-out metrics: validation and test ------------------------------------------------------------------
    @property
    def held_out_split(self) -> str:
        """The prefix of the held-out metrics: ``"test"`` while the Trainer tests (``lit-align test``,
        ``trainer.test``), else ``"val"``. Every method computes its held-out metrics in ``validation_step`` and logs
        them under ``f"{self.held_out_split}/..."``; :meth:`test_step` runs the same step, so ``test/...`` is computed
        exactly as ``val/...`` is."""
        return "test" if self._trainer is not None and self.trainer.testing else "val"

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """The held-out metrics of ``validation_step``, on the DataModule's test loader, logged as ``test/...``."""
        return self.validation_step(batch, batch_idx)

    def on_test_start(self) -> None:
        self.on_validation_start()  # the same random stream and set-up (a precomputed reference) as validation

    def on_test_end(self) -> None:
        self.on_validation_end()

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    # ----- lit-align predict --------------------------------------------------------------------------------------
    #: the most tokens :meth:`predict_step` generates per prompt, for a method without a ``max_new_tokens`` of its own
    predict_max_new_tokens: int = 64

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict[str, Any]]:
        """``lit-align predict`` (``trainer.predict``): the policy's greedy completion of each prompt of the batch (the
        DataModule's predict loader: the held-out split, see
        :meth:`~lit_align.data.base.RecordsDataModule.predict_dataloader`), as ``[{"prompt", "completion"}]``. At
        most the method's own ``max_new_tokens`` (the methods that sample) or :attr:`predict_max_new_tokens` tokens,
        stopped at EOS or the chat template's end of turn; the prompt is the batch's ``prompt_text`` where it has
        one, else its tokens decoded. For other settings (sampling, several samples) use ``lit-align generate`` on
        the export."""
        from lit_align.rollout.sampling import batch_prompt_ids, decode_prompt, generate_ids

        prompts = batch_prompt_ids(batch)
        stage = getattr(self, "rollout_stage", None)
        max_new_tokens = getattr(stage, "max_new_tokens", None) or self.predict_max_new_tokens
        with self.sampling_context():
            completions = generate_ids(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                       batch_size=max(len(prompts), 1))  # fmt: skip
        texts = batch.get("prompt_text") or [decode_prompt(self.tokenizer, ids) for ids in prompts]
        return [
            {"prompt": text, "completion": self.tokenizer.decode(samples[0], skip_special_tokens=True)}
            for text, samples in zip(texts, completions)
        ]

    def on_validation_epoch_start(self) -> None:
        # Metric states reset under inference mode (by a previous trainer.validate) become inference tensors, which
        # fit's validation loop (run under no_grad) cannot update in place: start each epoch from normal tensors.
        # Only validation metrics (named val*): training metrics may be mid-epoch.
        with torch.inference_mode(False):
            for name, metric in self.named_modules():
                if isinstance(metric, Metric) and name.startswith("val"):
                    metric.reset()

    # ----- optimisation -----------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates (override to add heads or exclude parts)."""
        return [p for p in self.parameters() if p.requires_grad]

    def make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        """The injected ``optimizer`` factory over ``params``, or :func:`~lit_align.optim.default_optimizer`: fused
        where the parameters allow it, except under Lightning's AMP plugin (``16-mixed``, ``bf16-mixed``), which
        refuses gradient clipping with an optimizer that unscales gradients itself."""
        if self.optimizer_factory is not None:
            return self.optimizer_factory(params)
        from lightning.pytorch.plugins.precision import MixedPrecision

        amp = self._trainer is not None and isinstance(self.trainer.precision_plugin, MixedPrecision)
        return default_optimizer(params, fused=False if amp else None)

    def configure_optimizers(self) -> Any:
        optimizer = self.make_optimizer(self.trainable_parameters())
        for group in optimizer.param_groups:
            group["lr"] = self.lr
        scheduler = (self.lr_scheduler_factory or WarmupCosineLR)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # The run length is filled in here, not in configure_optimizers: asking for it there makes Lightning set up
        # the training data before a checkpoint's data position is restored, and a resumed run would replay data.
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
                scheduler.set_total_steps(self.scheduler_steps())

    def scheduler_steps(self) -> int:
        """How many times the schedule will be stepped in this run."""
        total = self.trainer.estimated_stepping_batches
        if not self.automatic_optimization and self.trainer.max_steps > 0:
            # max_steps counts optimizer steps; on-policy methods step their schedules once per rollout batch
            total = min(total, math.ceil(self.trainer.max_steps / self.optimizer_steps_per_batch()))
        return int(total)

    def optimizer_steps_per_batch(self) -> int:
        """Optimizer steps (as Lightning's ``global_step`` counts them) per training batch."""
        return 1

    # ----- numerical guard --------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._current_batch = (batch_idx, batch)
        if self._rng_to_restore is not None:  # first step after a resume: continue the RNG streams exactly
            _set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    # ----- the global batch under data parallelism ------------------------------------------------------------------
    def rank_share(self, count: torch.Tensor) -> torch.Tensor:
        """``count`` (tokens, sequences) summed over the data-parallel ranks and divided by their number. A rank's
        sum divided by it is a loss whose average over the ranks, which is what data parallelism's gradient
        averaging takes, is the mean over the global batch: N ranks with batch B train as one device with N x B."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return count.float()
        return self.trainer.strategy.reduce(count.float(), reduce_op="sum") / world

    def global_moments(
        self, values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, variance)`` of ``values`` where ``mask`` is true, over every data-parallel rank's batch (the
        variance with Bessel's correction over the global count when ``unbiased``)."""
        mask = mask.to(values.dtype)
        n = self.rank_share(mask.sum())
        mean = self.rank_share((values * mask).sum()) / n.clamp(min=1)
        var = self.rank_share((((values - mean) ** 2) * mask).sum()) / n.clamp(min=1)
        if unbiased:
            total = n * (self.trainer.world_size if self._trainer is not None else 1)
            var = var * total / (total - 1).clamp(min=1)
        return mean, var

    def sampling_stream(self) -> tuple[Any, ...]:
        """What completions sampled now are seeded by, besides their prompt's key (see
        :func:`~lit_align.rollout.completion_seeds`): ``sampling_seed`` (by default the run's ``seed_everything``
        seed) and the phase (training: the epoch; validation: the step), so that a completion is the same on any
        number of ranks and in a resumed run."""
        seed = getattr(self, "sampling_seed", None)
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        if self._trainer is None:  # called directly: a new stream every call
            self._direct_calls = getattr(self, "_direct_calls", 0) + 1
            return (seed, "direct", self._direct_calls)
        if self.trainer.training:  # a prompt is seen once an epoch
            return (seed, "train", self.current_epoch)
        return (seed, "eval", self.global_step)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._last_loss = loss.detach()

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()) if grads else True
        if self._trainer is not None:  # sharded gradients: every rank must take the same decision
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        loss_finite = self._last_loss is None or bool(torch.isfinite(self._last_loss))
        if loss_finite and str(self.trainer.precision) == "16-mixed":
            return  # the gradient scaler skips this step and lowers its scale
        for group in optimizer.param_groups:  # no gradient, no update: optimizers skip parameters without one
            for p in group["params"]:
                p.grad = None
        self.nonfinite_steps += 1
        batch_idx, batch = self._current_batch or (None, None)
        where = (
            f"step {self.trainer.global_step} (epoch {self.trainer.current_epoch}, batch {batch_idx}, "
            f"fingerprint {batch_fingerprint(batch)})"
        )
        what = "loss" if not loss_finite else "gradient"
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)
        if self.nonfinite_steps > self.max_nonfinite_steps:
            raise FloatingPointError(
                f"non-finite {what} at {where}: {self.nonfinite_steps} steps skipped, more than "
                f"max_nonfinite_steps={self.max_nonfinite_steps}; stopping"
            )
        rank_zero_warn(f"non-finite {what} at {where}: step skipped ({self.nonfinite_steps} so far)")

    # ----- checkpoint extras --------------------------------------------------------------------------------------
    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, weights_only: bool = True, **kwargs: Any):
        """Lightning's ``load_from_checkpoint``, made safe: ``weights_only=True`` only (a checkpoint is data, never
        code), the file's checksums verified first, an error naming the file when it is refused or damaged, the
        classes its hyper-parameters name held to the config allow-list (:mod:`lit_align.security`), and
        ``trust_remote_code`` never taken from them (pass it here to trust a model's code). A distributed checkpoint
        (a directory of shards, as ``FSDP2Strategy`` writes) is verified and consolidated first."""
        from lit_align import security
        from lit_align.checkpoint import CheckpointError, SafeCheckpointIO, consolidated_checkpoint, verify_checkpoint

        if not weights_only:
            raise CheckpointError(f"{checkpoint_path}: lit_align loads checkpoints with weights_only=True only")
        for name in security.CALLER_ONLY_HPARAMS:
            kwargs.setdefault(name, False)
        with consolidated_checkpoint(checkpoint_path) as path, security.guarded():
            verify_checkpoint(path)
            try:
                return super().load_from_checkpoint(path, *args, weights_only=True, **kwargs)
            except (pickle.UnpicklingError, EOFError) as error:
                raise SafeCheckpointIO.explain(checkpoint_path, error) from error
            except RuntimeError as error:
                if "zip archive" not in str(error) and "corrupted" not in str(error):
                    raise
                raise SafeCheckpointIO.explain(checkpoint_path, error) from error

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Every rank's RNG streams (every rank builds the checkpoint; one writes it), so that each continues its own.
        states = _get_rng_states()
        if self._trainer is not None and self.trainer.world_size > 1:
            per_rank: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(per_rank, states)
        else:
            per_rank = [states]
        checkpoint["lit_align"] = {"rng_per_rank": per_rank, "nonfinite_steps": self.nonfinite_steps}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        extras = checkpoint.get("lit_align", {})
        self.nonfinite_steps = extras.get("nonfinite_steps", 0)
        per_rank = extras.get("rng_per_rank") or ([extras["rng"]] if "rng" in extras else [])
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        if per_rank and len(per_rank) != world and self._trainer is not None:  # resuming on another rank count
            rank_zero_warn(
                f"the checkpoint holds the RNG streams of {len(per_rank)} rank(s), this run has {world}: sampling and "
                "dropout continue from other streams (the run is not an exact continuation)"
            )
        self._rng_to_restore = per_rank[rank % len(per_rank)] if per_rank else None

    # ----- export -----------------------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        if self.export_dir is not None:
            self.export_hf(self.export_dir)

    def export_hf(self, path: str | Path, merge_lora: bool = True) -> Path:
        """Save the policy and tokenizer as a Hugging Face directory (safetensors) that
        ``AutoModelForCausalLM.from_pretrained`` loads, with a manifest of its files' SHA-256 digests
        (:mod:`lit_align.checksums`) that lit_align's loaders verify. LoRA adapters are merged into a copy of the
        weights unless ``merge_lora`` is false (then the adapter alone is saved). Under sharded strategies the full
        weights are gathered first; rank 0 writes."""
        return self.save_hf("model", path, merge_lora)

    def save_hf(self, name: str, path: str | Path, merge_lora: bool = True) -> Path:
        """Write the sub-module ``name`` (``"model"``, or a method's own such as PPO's ``"value_model"``) to the
        directory ``path``: a transformers model through ``save_pretrained``, with the tokenizer; any other module as
        its state dict in ``model.safetensors``; then the directory's checksum manifest. The full weights are
        gathered from a sharded model parameter by parameter (every rank takes part), LoRA adapters merged into them
        (no copy of the model is made); rank 0 writes."""
        path = Path(path)
        model = getattr(self, name)
        inner = unwrap_model(model)
        state_dict = full_state_dict(inner)  # on rank 0 (every rank for an unsharded model)
        writer = self._trainer is None or self.trainer.is_global_zero
        if writer and hasattr(model, "peft_config"):
            state_dict = lora_state_dict(model, state_dict, merge=merge_lora)
        if writer and hasattr(model, "peft_config") and not merge_lora:
            model.peft_config["default"].save_pretrained(path)
            save_file(state_dict, path / "adapter_model.safetensors", metadata={"format": "pt"})
            self.tokenizer.save_pretrained(path)
            write_checksums(path)
        elif writer and hasattr(inner, "save_pretrained"):
            with eos_not_pad_in_config(inner, self.tokenizer):
                inner.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
            write_checksums(path)
        elif writer:
            path.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
            save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
            write_checksums(path)
        if self._trainer is not None:
            self.trainer.strategy.barrier("lit_align.export_hf")
        return path


VALIDATION_SEED = 0x5EED  # validation's own random stream starts here (plus the global step)


def batch_fingerprint(batch: Any) -> str:
    """A short hash of a batch's token ids (to name a batch in messages and compare runs), or ``"-"``."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(ids, torch.Tensor):
        return "-"
    import hashlib

    return hashlib.blake2b(ids.detach().cpu().numpy().tobytes(), digest_size=6).hexdigest()


def _get_rng_states() -> dict[str, Any]:
    """Every RNG stream a training step may draw from, in types ``torch.load(weights_only=True)`` accepts."""
    version, mt_state, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "python": (version, list(mt_state), gauss),
        "numpy": (np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    version, mt_state, gauss = states["python"]
    random.setstate((version, tuple(mt_state), gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = states["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
