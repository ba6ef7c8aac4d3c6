"""PPO's peak memory at the SmolLM2-135M shape, against what its weights, gradients and optimizer states need.

    python benchmarks/ppo_memory.py                      # one PPO run in a fresh process, fp32, CPU, 2 threads
    python benchmarks/ppo_memory.py --env MALLOC_ARENA_MAX=2 --json out.json

The model is a random-weight Llama of the SmolLM2-135M shape (hidden 576, intermediate 1536, 30 layers, 9 heads,
3 key/value heads, vocabulary 49,152, tied embeddings) with the embedded tokenizer, saved as a Hugging Face directory,
with a ``LlamaForSequenceClassification`` (one label) directory of the same backbone as the reward model. One PPO run
(``value_model: reward``: four roles, two of them trained with AdamW) of ``--batches`` rollout batches of
``--batch-size`` HH prompts, ``--max-new-tokens`` sampled tokens, mini-batches of ``--mini-batch-size``, one PPO
iteration, runs in a fresh process pinned to ``--threads`` threads.

A thread samples the process's resident set size (``/proc/self/statm``) every 2 ms, and the run is cut into phases
(loading and setup, sampling, scoring: log-probs, reference, values and reward, the policy update, the value update);
the report gives each phase's peak and the resident size at its end (anonymous and file-backed), glibc's own account
(``mallinfo2``: bytes in use, in mmapped chunks, and freed but kept in the heaps), and the bytes the run needs: each
role's weights, the trained roles' gradients and the optimizer states as they are after a step (tied weights counted
once). The ratio is the peak over those, both for the whole process and for what the run added to the process as
it stood before any model existed (Python, torch, Lightning, the tokenizer and data)."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, tie_word_embeddings=True)  # fmt: skip
VOCAB = 49_152
GB = 2**30


# ----- measurement (inside the worker) --------------------------------------------------------------------------------
def status_kb(*fields: str) -> dict[str, int]:
    """Fields of ``/proc/self/status`` in bytes (RssAnon, RssFile, ...)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0]) * 1024
    return out


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip


def malloc_stats() -> dict[str, int]:
    """glibc's account: ``in_use`` (heap chunks in use plus mmapped chunks), ``mmapped``, ``free_kept`` (freed into
    the heaps and not yet returned to the system); empty when the C library has no ``mallinfo2``."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return {}
    info = libc.mallinfo2()
    return {"in_use": info.uordblks + info.hblkhd, "mmapped": info.hblkhd, "free_kept": info.fordblks}


class PhaseRSS:
    """The resident set size sampled every 2 ms; the run is a sequence of phases (set by the run), each with its
    peak and, at its end, the resident size (anonymous and file-backed) and glibc's account."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.phase, self.peak = "start", 0
        self.timeline: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        self.peak = max(self.peak, self.now())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.002)

    def start(self) -> None:
        self._thread.start()

    def enter(self, phase: str) -> None:
        """End the current phase (its peak, its resident size now, glibc's account) and start ``phase``."""
        self._sample()
        end = {"rss": self.now(), **status_kb("RssAnon", "RssFile"), **malloc_stats()}
        self.timeline.append({"phase": self.phase, "peak": self.peak, **{f"end_{k}": v for k, v in end.items()}})
        self.phase, self.peak = phase, self.now()

    def stop(self) -> None:
        self.enter("end")
        self._stop.set()
        self._thread.join()


def tensor_bytes(tensors: Any) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def worker(model_dir: str, reward_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    import lightning as L
    import torch

    torch.set_num_threads(args.threads)
    from lit_align import PPOModule, PromptDataModule

    rss = PhaseRSS()
    rss.start()

    class Instrumented(PPOModule):
        def configure_model(self) -> None:
            rss.enter("setup")
            super().configure_model()

        def sample(self, prompts):  # noqa: ANN001, ANN201
            rss.enter("sampling")
            experience = super().sample(prompts)
            rss.enter("scoring")
            return experience

        def policy_objective(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
            rss.enter("policy update")
            return super().policy_objective(*a, **k)

        def token_values(self, batch, width, policy_hidden=None):  # noqa: ANN001, ANN201
            if torch.is_grad_enabled():  # the value step (the rollout's values are taken under no_grad)
                rss.enter("value update")
            return super().token_values(batch, width, policy_hidden)

    module = Instrumented(model=model_dir, reward_model=reward_dir, value_model="reward", dtype="float32",
                          max_new_tokens=args.max_new_tokens, mini_batch_size=args.mini_batch_size,
                          num_iterations=1, lr=1e-6)  # fmt: skip
    data = PromptDataModule(module.tokenizer, batch_size=args.batch_size, max_prompt_length=args.max_prompt_length)
    trainer = L.Trainer(accelerator="cpu", precision="32-true", limit_train_batches=args.batches, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    rss.enter("before models")  # the process as it stands: Python, torch, Lightning, tokenizer
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    rss.stop()

    def params(name: str) -> list[torch.Tensor]:
        return list(getattr(module, name).parameters())

    roles = {"policy": "model", "reference": "ref_model", "reward": "reward_model", "value": "value_model"}
    weights = {role: tensor_bytes(params(name)) for role, name in roles.items()}
    trainable = [p for name in ("model", "value_model") for p in params(name) if p.requires_grad]
    frozen_grad = [p for name in ("ref_model", "reward_model") for p in params(name) if p.requires_grad]
    states = [t for opt in trainer.optimizers for s in opt.state.values() for t in s.values()
              if isinstance(t, torch.Tensor) and t.dim() > 0]  # fmt: skip
    needed = {"weights": sum(weights.values()), "gradients": tensor_bytes(trainable),
              "optimizer states": tensor_bytes(states)}  # fmt: skip
    return {
        "seconds": seconds,
        "weights": weights,
        "needed": needed,
        "needed_total": sum(needed.values()),
        "frozen_params_requiring_grad": len(frozen_grad),
        "grads_held_after_fit": tensor_bytes(p.grad for name in roles.values() for p in params(name)),
        "phases": rss.timeline,
        "peak": max(p["peak"] for p in rss.timeline),
        "env": {
            k: os.environ[k]
            for k in ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "OMP_NUM_THREADS")
            if k in os.environ
        },  # fmt: skip
    }


# ----- the parent: models, one fresh process, the report --------------------------------------------------------------
def make_models(directory: Path) -> tuple[Path, Path]:
    """The 135M-shaped policy directory and a reward-model directory of the same backbone (random weights)."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from lit_align.models import load_tokenizer, tiny_config

    tokenizer = load_tokenizer("tiny")
    config = tiny_config(tokenizer, **SHAPE)
    config.vocab_size = VOCAB  # ids above the tokenizer's stay unused: the unembedding's size is what costs
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    policy.save_pretrained(directory / "policy")
    tokenizer.save_pretrained(directory / "policy")
    reward_config = type(config).from_dict({**config.to_dict(), "num_labels": 1})
    reward = LlamaForSequenceClassification(reward_config)
    reward.model.load_state_dict(policy.model.state_dict())
    reward.save_pretrained(directory / "reward")
    tokenizer.save_pretrained(directory / "reward")
    return directory / "policy", directory / "reward"


def report(result: dict[str, Any]) -> None:
    g = lambda b: f"{b / GB:6.2f}"  # noqa: E731
    print("weights per role (GB): " + ", ".join(f"{k} {v / GB:.2f}" for k, v in result["weights"].items()))
    print("needed (GB): " + ", ".join(f"{k} {v / GB:.2f}" for k, v in result["needed"].items())
          + f"; total {result['needed_total'] / GB:.2f}")  # fmt: skip
    print(f"frozen parameters requiring grad: {result['frozen_params_requiring_grad']}; "
          f"gradients still held after fit: {result['grads_held_after_fit'] / GB:.2f} GB")  # fmt: skip
    print(f"{'phase':16s} {'peak':>6s} {'end':>6s} {'anon':>6s} {'file':>6s} {'in use':>6s} {'kept':>6s}  (GB; "
          "in use / kept: glibc's heap+mmap bytes in use / freed but kept)")  # fmt: skip
    for p in result["phases"]:
        print(f"{p['phase']:16s} {g(p['peak'])} {g(p.get('end_rss', 0))} {g(p.get('end_RssAnon', 0))} "
              f"{g(p.get('end_RssFile', 0))} {g(p.get('end_in_use', 0))} {g(p.get('end_free_kept', 0))}")  # fmt: skip
    peak, needed = result["peak"], result["needed_total"]
    before = next(p["end_rss"] for p in result["phases"] if p["phase"] == "before models")
    print(f"peak {peak / GB:.2f} GB; needed {needed / GB:.2f} GB; peak / needed {peak / needed:.2f}x; "
          f"above the process before any model ({before / GB:.2f} GB): {(peak - before) / GB:.2f} GB, "
          f"{(peak - before) / needed:.2f}x; run {result['seconds']:.0f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per rollout batch")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--mini-batch-size", type=int, default=2)
    parser.add_argument("--batches", type=int, default=2, help="rollout batches (limit_train_batches)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the PPO process (e.g. MALLOC_ARENA_MAX=2); repeatable")  # fmt: skip
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "REWARD", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker[0], args.worker[1], args)
        Path(args.worker[2]).write_text(json.dumps(result))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           **dict(item.split("=", 1) for item in args.env)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        policy, reward = make_models(Path(tmp))
        out = Path(tmp) / "result.json"
        forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k in ("threads", "batch_size", "max_new_tokens", "max_prompt_length", "mini_batch_size",
                              "batches")]  # fmt: skip
        command = [sys.executable, __file__, *forwarded, "--worker", str(policy), str(reward), str(out)]
        subprocess.run(command, env=env, check=True, timeout=3600)
        result = json.loads(out.read_text())
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
