"""Loading causal LMs and tokenizers: the embedded ``tiny`` preset, a local directory, or a Hugging Face hub id."""

from __future__ import annotations

import difflib
import os
import types
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerBase,
)

from lit_align.checksums import verify_checksums

TINY = "tiny"
TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"

# A small Llama-architecture model that trains in seconds on a CPU. Untied embeddings so that the unembedding is a
# separate matrix, as in the models users bring.
TINY_CONFIG: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)

TINY_SEED = 0

# A directory holds a tokenizer if it has one of these (what AutoTokenizer reads for the common tokenizer kinds).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


class ModelLoadError(ValueError):
    """A model or tokenizer (``model``, ``tokenizer``, ``ref_model``, ...) that cannot be loaded: a directory that
    holds none, a hub id that cannot be reached or does not exist. The message says which and what to do, on one
    line; the error from transformers or the hub, when there was one, is its ``__cause__``."""


class ModelPathNotFoundError(ModelLoadError, FileNotFoundError):
    """A model or tokenizer named by a local path (see :func:`looks_like_path`) that does not exist."""


def looks_like_path(name: str) -> bool:
    """Whether ``name`` means a local directory rather than a Hugging Face hub id (``namespace/name``): it exists,
    starts with ``.``, ``/`` or ``~``, has more than one ``/`` (no hub id has), or has a separator and its parent
    directory exists (``runs/sft/exprt`` from where ``runs/sft`` is)."""
    if name in (".", "..") or name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or Path(name).exists():
        return True
    separators = name.count("/") + (name.count(os.sep) if os.sep != "/" else 0)
    return separators > 1 or (separators == 1 and Path(name).expanduser().parent.is_dir())


def check_local_source(name: str, kind: str) -> None:
    """Raise a :class:`ModelLoadError` naming ``name`` when it is a local path (:func:`looks_like_path`) that does not
    exist or is not a directory holding a ``kind``: ``"model"`` (a ``config.json``) or ``"tokenizer"`` (one of
    :data:`TOKENIZER_FILES`). ``"tiny"`` and hub ids pass."""
    name = os.fspath(name)
    if name == TINY or not looks_like_path(name):
        return
    path = Path(name).expanduser()
    where = str(path.resolve())
    if not path.exists():
        siblings = [p.name for p in path.parent.iterdir()] if path.parent.is_dir() else []
        near = difflib.get_close_matches(path.name, siblings, n=1)
        hint = f"; did you mean {str(path.parent / near[0])!r}?" if near else ""
        raise ModelPathNotFoundError(f"{name!r} does not exist (no such directory: {where}){hint}")
    if not path.is_dir():
        raise ModelLoadError(f"{name!r} is a file; a {kind} is a Hugging Face directory (config.json, ...)")
    has_config = (path / "config.json").is_file()
    if kind == "model" and not has_config:
        raise ModelLoadError(
            f"{name!r} holds no model: no config.json in {where} (expected a Hugging Face model directory, "
            "such as an export_dir)"
        )
    if kind == "tokenizer" and not any((path / file).is_file() for file in TOKENIZER_FILES):
        held = "no tokenizer (no" if has_config else "no model or tokenizer (no config.json, no"
        raise ModelLoadError(
            f"{name!r} holds {held} tokenizer.json, tokenizer_config.json or the like in {where}); expected a Hugging "
            "Face model directory, such as an export_dir"
        )


_UNREACHABLE = {"LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectionError", "ConnectTimeout"}


@contextmanager
def explained_load_errors(what: str, name: str) -> Iterator[None]:
    """Within the block (a ``from_pretrained``), an ``OSError`` from transformers or the hub becomes a one-line
    :class:`ModelLoadError` that names ``name`` and what to do: no network or ``HF_HUB_OFFLINE`` (and not cached), no
    such repository (or a gated one), or another reason, whose first line it quotes."""
    try:
        yield
    except ModelLoadError:
        raise
    except OSError as error:
        chain: list[BaseException] = []
        cause: BaseException | None = error
        while cause is not None and cause not in chain:
            chain.append(cause)
            cause = cause.__cause__ or cause.__context__
        kinds = {type(e).__name__ for e in chain}
        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        if kinds & _UNREACHABLE:
            why, fix = ("HF_HUB_OFFLINE is set", ", or unset HF_HUB_OFFLINE") if offline else ("no network", "")
            message = (
                f"cannot reach the Hugging Face hub for {name!r} ({why}, and it is not in the local cache); "
                f"pass a local directory{fix}"
            )
        elif kinds & {"RepositoryNotFoundError", "GatedRepoError"}:
            message = (
                f"{name!r} is neither a local directory nor a Hugging Face hub repository you can read (a "
                "typo, or a gated or private one: log in with `hf auth login`)"
            )
        else:
            first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
            message = f"cannot load the {what} {name!r}: {first}"
        raise ModelLoadError(message) from error


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype name (``"bfloat16"``, ``"float16"``, ``"float32"``) or ``torch.dtype`` as a ``torch.dtype``; ``None``
    stays ``None``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def keep_rotary_fp32(model: nn.Module) -> nn.Module:
    """Keep the tables of ``model``'s rotary position embeddings (``inv_freq`` and the like) in fp32 through every
    later dtype cast, ``model.to(torch.bfloat16)`` or a Trainer's ``bf16-true``, as ``from_pretrained(...,
    dtype=...)`` leaves them. A cast alone rounds them, and the model trained would then compute other rotation
    angles than its export reloaded in the same dtype. Modules are recognised by name, as transformers does."""
    for module in model.modules():
        if "RotaryEmbedding" in type(module).__name__ and "_apply" not in vars(module):
            module._apply = types.MethodType(_apply_keeping_fp32, module)  # deepcopy rebinds it to the copy
    return model


def _apply_keeping_fp32(module: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    kept = {name: b for name, b in module._buffers.items() if b is not None and b.dtype == torch.float32}
    type(module)._apply(module, fn, recurse)
    for name, before in kept.items():
        after = module._buffers[name]
        if after is not None and after.dtype != torch.float32:  # cast: keep the fp32 values, take the new device
            module._buffers[name] = before.to(after.device)
    return module


@contextmanager
def eos_not_pad_in_config(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Within the block (an export), a ``*ForSequenceClassification`` whose pad id is an EOS id has no pad id in its
    config. transformers reads such a model's score at the last token that is not the pad id: with pad == eos that
    is the token before the EOS that lit_align reads the reward at. With no pad id it reads a lone sequence at its
    last token, ours, and refuses a batch ("Cannot handle batch sizes > 1 if no padding token is defined") rather
    than misread right-padded rows. The tokenizer keeps padding with EOS; lit_align reads from the attention mask."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    pad = config.pad_token_id
    unset = type(model).__name__.endswith("ForSequenceClassification") and pad is not None
    unset = unset and pad in {tokenizer.eos_token_id, *eos}
    if unset:
        config.pad_token_id = None
    try:
        yield
    finally:
        if unset:
            config.pad_token_id = pad


def load_tokenizer(name_or_path: str = TINY, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The embedded tokenizer for ``"tiny"``, else ``AutoTokenizer.from_pretrained(name_or_path)``.

    A tokenizer without a pad token gets ``pad_token = eos_token`` (the pad == eos case our data code is built for).
    """
    path = TOKENIZER_DIR if name_or_path == TINY else name_or_path
    check_local_source(name_or_path, "tokenizer")
    verify_checksums(path)
    with explained_load_errors("tokenizer", name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {name_or_path!r} has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_config(tokenizer: PreTrainedTokenizerBase, **overrides: Any) -> LlamaConfig:
    """The ``tiny`` preset's config, sized to ``tokenizer``."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**TINY_CONFIG, **overrides},
    )


@contextmanager
def empty_weights() -> Iterator[None]:
    """Within the block, every parameter a module registers moves to the ``meta`` device as soon as it is registered
    (its uninitialised storage is freed at once, and the module's initialisation then runs on ``meta``, at no cost);
    buffers stay real (rotary tables are computed, not stored). The skeleton a rank builds when another rank will
    hand it the weights."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _load(
    kind: str,
    name_or_path: str,
    tokenizer: PreTrainedTokenizerBase | None,
    dtype: str | torch.dtype | None,
    trust_remote_code: bool,
    empty: bool,
) -> nn.Module:
    auto, preset, extra = {
        "causal_lm": (AutoModelForCausalLM, LlamaForCausalLM, {}),
        "reward": (AutoModelForSequenceClassification, LlamaForSequenceClassification, {"num_labels": 1}),
    }[kind]
    torch_dtype = resolve_dtype(dtype)
    check_local_source(name_or_path, "model")
    with empty_weights() if empty else nullcontext(), explained_load_errors("model", name_or_path):
        if name_or_path == TINY:
            # Fixed weights make "tiny" a model like any other: a reference re-created on resume equals the original.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(TINY_SEED)
                model = keep_rotary_fp32(preset(tiny_config(tokenizer or load_tokenizer(TINY), **extra)))
            model = model.to(torch_dtype) if torch_dtype is not None else model  # rotary tables stay fp32
        elif empty:  # the architecture only, in the dtype the weights will come in
            config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **extra)
            stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
            model = auto.from_config(config, dtype=torch_dtype or stored, trust_remote_code=trust_remote_code)
        else:
            verify_checksums(name_or_path)
            model = auto.from_pretrained(name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **extra)
    return keep_rotary_fp32(model)


def load_causal_lm(
    name_or_path: str = TINY,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    empty: bool = False,
) -> nn.Module:
    """A causal LM: ``"tiny"`` builds the embedded preset from its config (random weights, the same on every call,
    like a checkpoint's); anything else is loaded with ``AutoModelForCausalLM.from_pretrained`` (hub id or local
    directory). ``empty``: only the architecture, its parameters on the ``meta`` device (see :func:`empty_weights`),
    for a rank that will receive the weights from rank 0 instead of reading them."""
    return _load("causal_lm", name_or_path, tokenizer, dtype, trust_remote_code, empty)


def load_reward_model(
    name_or_path: str = TINY,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    empty: bool = False,
) -> nn.Module:
    """A transformer with its unembedding replaced by a projection to one scalar (InstructGPT's reward model).

    ``"tiny"`` builds the preset; anything else (a causal LM such as an SFT export, or a reward model) is loaded with
    ``AutoModelForSequenceClassification(num_labels=1)``: the LM head is dropped and a new scalar head is created
    unless the checkpoint has one. ``empty`` as in :func:`load_causal_lm`.
    """
    return _load("reward", name_or_path, tokenizer, dtype, trust_remote_code, empty)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (LoRA layers stay in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], merge: bool) -> dict[str, torch.Tensor]:
    """From the full state dict of a PEFT model's inner transformers model (LoRA layers in place): with ``merge``,
    the plain model's state dict with every adapter folded in, ``W + scaling * B @ A`` (transposed for
    ``fan_in_fan_out`` layers), as ``merge_and_unload`` computes it but without copying the model (``state_dict``
    may hold only some layers: those are merged); else the adapter alone, keyed as PEFT saves it."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import get_peft_model_state_dict

    inner = unwrap_model(model)
    if not merge:
        prefixed = {f"base_model.model.{k}": v for k, v in state_dict.items()}
        return {k: v.contiguous() for k, v in get_peft_model_state_dict(model, state_dict=prefixed).items()}
    merged = dict(state_dict)
    for name, layer in inner.named_modules():
        if not isinstance(layer, LoraLayer) or f"{name}.base_layer.weight" not in merged:
            continue
        base = merged.pop(f"{name}.base_layer.weight")
        for adapter in layer.active_adapters:
            if layer.use_dora.get(adapter):
                raise NotImplementedError("merging DoRA adapters into an export is not supported; use merge_lora=False")
            a = merged.pop(f"{name}.lora_A.{adapter}.weight").float()
            b = merged.pop(f"{name}.lora_B.{adapter}.weight").float()
            delta = (b @ a) * layer.scaling[adapter]
            base = base + (delta.T if layer.fan_in_fan_out else delta).to(base.dtype)
        merged[f"{name}.weight"] = base
        if f"{name}.base_layer.bias" in merged:
            merged[f"{name}.bias"] = merged.pop(f"{name}.base_layer.bias")
    leftover = [k for k in merged if ".lora_" in k]
    if leftover:
        raise ValueError(f"cannot merge LoRA weights {leftover[:3]}: not on a LoRA layer")
    return merged


OFFSET_KEY = "lit_align_reward_offset"


def load_frozen_reward_model(
    name: str, policy_tokenizer: PreTrainedTokenizerBase, policy_name: str | None, dtype: str | None,
    trust_remote_code: bool = False, empty: bool = False,
) -> tuple[nn.Module, float]:  # fmt: skip
    """A reward model for on-policy training, frozen in eval mode, and the offset its ``RewardModule`` export
    subtracts. It scores the policy's token ids, so its vocabulary must be the policy's (checked unless it is the
    ``"tiny"`` preset or the policy's own checkpoint)."""
    if name != "tiny" and name != policy_name:
        if load_tokenizer(name, trust_remote_code).get_vocab() != policy_tokenizer.get_vocab():
            raise ValueError(
                f"reward model {name!r} has another tokenizer than the policy; it scores the policy's token ids, so "
                "they must match (or score text with reward_fn)"
            )
    model = load_reward_model(name, policy_tokenizer, dtype, trust_remote_code, empty=empty)
    return model.requires_grad_(False).eval(), float(getattr(model.config, OFFSET_KEY, 0.0))
