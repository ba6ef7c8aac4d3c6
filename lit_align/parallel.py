"""Sharded training with FSDP2 (torch's ``fully_shard``), the way Lightning's ``ModelParallelStrategy`` documents it:
each module shards its models in ``configure_model`` on the strategy's device mesh. These helpers are what every
method shares: sharding a transformer (each decoder layer, then the rest), running a computation that reads the
root's parameters directly (the backbone, then the tiled unembedding) as one FSDP forward, gathering the policy once
for sampling, and collecting full weights for exports and fingerprints.

Without a mesh (one device, DDP) every helper is a plain call, so the modules have one code path.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

_CALL = "_lit_align_forward"  # the method registered with FSDP as a forward


def is_sharded(model: nn.Module | None) -> bool:
    """Whether ``model`` is the root of an FSDP2-sharded module tree."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers model: the classes it names in ``_no_split_modules``, else every module
    with an attention and an MLP sub-layer; the outermost only (a matching module inside another is part of it)."""
    names = set(getattr(model, "_no_split_modules", None) or [])

    def is_block(module: nn.Module) -> bool:
        if names:
            return type(module).__name__ in names
        return hasattr(module, "mlp") and (hasattr(module, "self_attn") or hasattr(module, "attn"))

    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # parents before children
        if id(module) in inside or not is_block(module):
            continue
        blocks.append(module)
        inside |= {id(m) for m in module.modules()}
    return blocks


def shard(model: nn.Module, mesh: Any, reshard_after_forward: bool = True, frozen: bool = False) -> nn.Module:
    """Shard ``model`` with FSDP2 over ``mesh``: each transformer block is its own unit (all-gathered for its
    forward and backward, freed after when ``reshard_after_forward``), and so are untied input and output
    embeddings; the root holds the rest (final norm, score or value head, tied embeddings). Frozen models shard the
    same way; their parameters simply get no gradients. ``model`` may be a transformers model or any module (a value
    head): without blocks it is one unit. The root of a trainable model stays gathered from its forward to its
    backward (FSDP's default); a ``frozen`` model has no backward, so its root is freed after every forward too.
    Returns ``model`` (now an ``FSDPModule``), with :func:`run_forward` and ``generate`` registered as forwards."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    units = list(transformer_blocks(model))
    # Untied input and output embeddings are units of their own (with a large vocabulary they are a good part of the
    # model): gathered only around their own use, not for the whole forward and backward as the root's weights are.
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    outputs = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if inputs is not None and outputs is not None and getattr(outputs, "weight", None) is not inputs.weight:
        units += [inputs, outputs]
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
        unit._lit_align_reshard = reshard_after_forward
    if outputs in units:  # the tiled unembedding reads its weight directly: a forward of its own (run_forward)
        setattr(outputs, _CALL, types.MethodType(_call, outputs))
        register_fsdp_forward_method(outputs, _CALL)
    setattr(model, _CALL, types.MethodType(_call, model))
    fully_shard(model, mesh=mesh, reshard_after_forward=True if frozen else None)  # None: FSDP's choice for a root
    model._lit_align_reshard = frozen
    register_fsdp_forward_method(model, _CALL)
    if hasattr(model, "generate"):
        register_fsdp_forward_method(model, "generate")
    return model


def _call(self: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def run_forward(model: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` as a forward of ``model``'s FSDP root when it is sharded: the root's parameters
    (embeddings, final norm, output head) are all-gathered for it, and their gradients are reduce-scattered in the
    backward. The modules read the backbone and the head directly (no ``[tokens, vocabulary]`` logits), which
    FSDP's hooks on ``forward`` would not see. A plain call otherwise."""
    if not is_sharded(model):
        return fn(*args, **kwargs)
    return getattr(model, _CALL)(fn, *args, **kwargs)


def fsdp_root(model: nn.Module) -> nn.Module:
    """The module that :func:`shard` made the root: ``model`` or, for a PEFT model, the transformers model inside."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner if is_sharded(inner) else model


def model_forward(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a function whose first argument is a model so that it runs as one forward of that model's FSDP root
    (see :func:`run_forward`)."""

    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return run_forward(fsdp_root(model), fn, model, *args, **kwargs)

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    wrapper.__wrapped__ = fn
    return wrapper


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the block, every parameter of a sharded ``model`` is all-gathered once and stays whole: a sampling
    loop then runs with no collective at all, so ranks whose completions end at different steps cannot issue
    mismatched collectives, and no layer is gathered again at every decoding step. Costs the full model's memory on
    every rank for the duration. Yields whether the model was gathered (false when not sharded or not ``enabled``)."""
    modules = _fsdp_modules(fsdp_root(model)) if enabled else []
    if not modules:
        yield False
        return
    root = fsdp_root(model)
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    root._lit_align_gathered = True
    try:
        yield True
    finally:
        root._lit_align_gathered = False
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(getattr(module, "_lit_align_reshard", True), recurse=False)


def needs_synced_steps(model: nn.Module) -> bool:
    """Whether sampling from ``model`` must keep every rank stepping together (``synced_gpus``): it is sharded and
    not :func:`gathered`, so every decoding step all-gathers its layers."""
    import torch.distributed as dist

    root = fsdp_root(model)
    return is_sharded(root) and not getattr(root, "_lit_align_gathered", False) and dist.get_world_size() > 1


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly DTensor-sharded) tensor; a collective when sharded: every rank must call it."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with whole tensors on the CPU. From a sharded model it is gathered parameter by
    parameter and kept on rank 0 only (other ranks get an empty dict); a collective, every rank must call it."""
    if not _fsdp_modules(model):
        return {name: value.detach().cpu() for name, value in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def streamed_state_dict(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``model.state_dict()`` one whole entry at a time, on every rank, on the model's device: a sharded entry is
    all-gathered just before it is yielded, so no more than one whole parameter is gathered at a time (to stream
    weights into a sampling engine). Tied weights appear under each of their names. A collective: every rank must
    consume it to the end."""
    for name, value in model.state_dict().items():
        yield name, full_tensor(value.detach())


def materialize(model: nn.Module, device: torch.device | str) -> None:
    """Give a model built with parameters on the ``meta`` device (see :func:`lit_align.models.empty_weights`) real,
    uninitialised storage on ``device`` (its shards only, when sharded); its buffers keep their values."""
    if not any(p.device.type == "meta" for p in model.parameters()):
        return
    buffers = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()
               if buffer is not None]  # fmt: skip
    model.to_empty(device=device)
    for module, name, buffer in buffers:
        module._buffers[name] = buffer.to(device)


def broadcast_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load rank 0's whole ``weights`` (the other ranks pass ``{}``) into ``model`` on every rank, each keeping its
    shard of a sharded parameter: one rank reads a checkpoint, all get it. A collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=options)
