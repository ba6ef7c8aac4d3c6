"""The frozen reference policy of the offline preference methods (DPO, KTO), however it is provided: a frozen copy,
the policy with its LoRA adapter disabled, or log-probs precomputed once and cached on disk.

The functions take the method's module, which keeps the reference's settings as attributes: ``reference`` (``"copy"``,
``"precomputed"``, ``"adapter"`` or ``"none"``), ``ref_model`` (the frozen copy, one of its ``frozen_modules``, or
``None``), ``ref_model_name``, ``ref_cache_dir``, ``ref_batch_size`` and ``policy_changed`` (whether the policy may
differ from its source: after a weight load or an optimizer step it can no longer stand in for the reference). Its
DataModule's examples hold ``prompt_ids`` and ``response_ids`` (K lists), and its collator batches them for
:func:`~lit_align.forward.response_logps` (``ref_logps`` [N] when every example carries them), as
:class:`~lit_align.data.PreferenceCollator` does."""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_align.checkpoint import archive_problem
from lit_align.forward import eval_mode, response_logps
from lit_align.models import load_causal_lm
from lit_align.parallel import full_tensor

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """Where precomputed reference log-probs are kept: ``$LIT_ALIGN_CACHE/reference_logps``, by default under
    ``~/.cache/lit_align``."""
    root = os.environ.get("LIT_ALIGN_CACHE") or Path.home() / ".cache" / "lit_align"
    return Path(root) / "reference_logps"


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer of ``model`` (names, dtypes, shapes and values), the same whether the
    model is whole or sharded (each sharded tensor is gathered in turn: every rank must call it)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        tensor = full_tensor(tensor).detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def examples_fingerprint(examples: Sequence[Mapping[str, Any]]) -> str:
    """A hash of the token ids of every example (so of the data and the tokenizer that produced them)."""
    digest = hashlib.blake2b(digest_size=16)
    for example in examples:
        digest.update(repr((example["prompt_ids"], example["response_ids"])).encode())
    return digest.hexdigest()


def build_reference(module: Any) -> nn.Module:
    """A frozen reference policy: ``module.ref_model_name`` if given, else a copy of the (just built, untrained)
    policy."""
    if module.ref_model_name is not None:
        reference = load_causal_lm(module.ref_model_name, module.tokenizer, module.dtype_name, module.trust_remote_code,
                                   empty=module.empty_init)  # fmt: skip
    else:
        reference = copy.deepcopy(module.model)
    return reference.requires_grad_(False).eval()


@contextmanager
def reference_policy(model: nn.Module, ref_model: nn.Module | None) -> Iterator[nn.Module]:
    """The reference policy to score with: the frozen copy ``ref_model`` when there is one, else (LoRA) the policy
    ``model`` in eval mode with its adapters disabled."""
    if ref_model is not None:
        yield ref_model
        return
    with eval_mode(model), model.disable_adapter():
        yield model


def reference_logps(module: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """``[N]`` reference log-probs of the batch's responses (``None`` when reference-free)."""
    if module.reference == "none":
        return None
    if module.reference == "precomputed":
        if "ref_logps" not in batch:
            raise RuntimeError(
                "reference='precomputed' but the batch carries no 'ref_logps': they are attached to the "
                "DataModule's examples when fitting starts (pass the DataModule to trainer.fit)"
            )
        return batch["ref_logps"].float()
    with torch.no_grad(), reference_policy(module.model, module.ref_model) as reference:
        return response_logps(reference, batch)


def attach_reference_logps(module: Any) -> None:
    """With ``reference="precomputed"``, attach ``ref_logps`` to the examples of the Trainer's DataModule (called
    when fitting starts, and when validating on its own)."""
    if module.reference != "precomputed":
        return
    datamodule = getattr(module.trainer, "datamodule", None)
    if datamodule is None or not hasattr(datamodule, "train_dataset"):
        raise RuntimeError("reference='precomputed' needs the DataModule passed to the Trainer")
    precompute_reference(module, datamodule)


@torch.no_grad()
def precompute_reference(module: Any, datamodule: Any) -> None:
    """Attach ``ref_logps`` to every training and validation example of ``datamodule`` that lacks them, from the disk
    cache when present, else by one forward-only pass of the reference (then cached). The reference is the starting
    policy itself when training has not begun (no second copy), else it is re-created from its source."""
    trainer = module.trainer
    splits = {"train": datamodule.train_dataset or [], "val": datamodule.val_dataset or []}
    reference, fingerprint = None, None
    for split, examples in splits.items():
        if not examples or all("ref_logps" in e for e in examples):
            continue
        if reference is None:
            reference = _reference_for_precompute(module)
            fingerprint = weights_fingerprint(reference)
        key = hashlib.blake2b(
            f"{CACHE_VERSION}:{fingerprint}:{examples_fingerprint(examples)}:{trainer.precision}".encode(),
            digest_size=16,
        ).hexdigest()
        path = Path(module.ref_cache_dir) / f"{key}.pt"
        # Decided by all ranks together: nodes that do not share the cache directory compute it together (the
        # computation is a collective), and each node's first rank writes its own copy.
        if trainer.strategy.reduce_boolean_decision(path.exists(), all=True):
            values = load_cache(path, len(examples))
            rank_zero_info(f"lit_align: reference log-probs for {split} ({len(examples)} examples) from {path}")
        else:
            values = _compute_reference_logps(module, reference, examples, datamodule)
            if trainer.local_rank == 0 and not path.exists():
                save_cache(path, values)
            rank_zero_info(f"lit_align: reference log-probs for {split} computed and cached at {path}")
        for example, logps in zip(examples, values):
            example["ref_logps"] = logps.tolist()
    if reference is not None and reference is not module.model:
        del reference


def _reference_for_precompute(module: Any) -> nn.Module:
    if module.ref_model_name is None and not module.policy_changed:
        return module.model  # still the starting policy
    if module.ref_model_name is None and module.model_name_or_path is None:
        raise RuntimeError("cannot re-create the reference of a policy given as an nn.Module; pass ref_model")
    name = module.ref_model_name or module.model_name_or_path
    load = (name, module.tokenizer, module.dtype_name, module.trust_remote_code)
    if getattr(module, "_device_mesh", None) is None:
        return load_causal_lm(*load).to(module.device).eval()
    # sharded like the models configure_model made: rank 0 reads it, the others receive their shards
    empty = module.trainer.world_size > 1 and module.trainer.global_rank != 0
    reference = load_causal_lm(*load, empty=empty)
    return module.distribute(reference.requires_grad_(False).eval(), frozen=True)


def _compute_reference_logps(
    module: Any, reference: nn.Module, examples: Sequence[Mapping[str, Any]], datamodule: Any
) -> list[torch.Tensor]:
    """Reference log-probs of each example's responses; ranks share the work and exchange the results."""
    trainer = module.trainer
    world, rank = trainer.world_size, trainer.global_rank
    batch_size = module.ref_batch_size or datamodule.batch_size
    mine = list(range(rank, len(examples), world))
    results: dict[int, torch.Tensor] = {}
    # as many forward passes on every rank (a sharded reference all-gathers in each): the last may be a repeat
    passes = math.ceil(math.ceil(len(examples) / world) / batch_size)
    with eval_mode(reference):
        for start in range(0, passes * batch_size, batch_size):
            indices = mine[start : start + batch_size] or [0]  # [0]: a repeat, its values are not kept
            batch = datamodule.collator([without_ref(examples[i]) for i in indices])
            batch = {k: v.to(module.device) for k, v in batch.items()}
            with trainer.precision_plugin.forward_context():
                logps = response_logps(reference, batch).float().cpu()
            sizes = [len(examples[i]["response_ids"]) for i in indices]
            for i, values in zip(mine[start : start + batch_size], logps.split(sizes)):
                results[i] = values
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, results)
        results = {i: v for part in gathered for i, v in part.items()}
    return [results[i] for i in range(len(examples))]


def without_ref(example: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in example.items() if k != "ref_logps"}


def save_cache(path: Path, values: list[torch.Tensor]) -> None:
    """Write atomically: a run killed mid-write never leaves a torn cache file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"version": CACHE_VERSION, "logps": values}, tmp)
    os.replace(tmp, path)


def load_cache(path: Path, n_examples: int) -> list[torch.Tensor]:
    try:
        problem = archive_problem(path)
        if problem is not None:
            raise ValueError(problem)
        data = torch.load(path, weights_only=True)
        values = data["logps"]
        if len(values) != n_examples:
            raise ValueError(f"{len(values)} entries for {n_examples} examples")
        return values
    except Exception as error:  # noqa: BLE001 - any unreadable cache is reported the same way
        # The cause stays chained; the message does not repeat torch's advice to load unsafely.
        message = f"reference log-prob cache {path} is unreadable ({error}); delete it to recompute"
        raise RuntimeError(message) from error
