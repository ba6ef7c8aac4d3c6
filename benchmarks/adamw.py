"""The optimizer step alone at a model's size: torch's AdamW as a per-parameter loop (its default on a CPU), the
multi-tensor ``foreach`` form, and the ``fused`` kernel (Hugging Face's and so TRL's default since torch 2.8), on the
parameters of a random SmolLM2-135M-shaped Llama (fp32, gradients filled in), in one process, alternating.

    python benchmarks/adamw.py                  # 135M shape, 2 threads
    python benchmarks/adamw.py --shape small
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import matrix  # noqa: E402

VARIANTS = {"for-loop (lit_align's default before)": {"foreach": False}, "foreach": {"foreach": True},
            "fused": {"fused": True}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m", help=f"among {', '.join(matrix.SHAPES)}")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    s = matrix.SHAPES[args.shape]
    config = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                         num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                         vocab_size=s["vocab"] or matrix.TINY_VOCAB, tie_word_embeddings=s["tied"])  # fmt: skip
    model = LlamaForCausalLM(config)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    optimizers = {name: torch.optim.AdamW(params, lr=1e-6, betas=(0.9, 0.95), weight_decay=0.0, **kw)
                  for name, kw in VARIANTS.items()}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for optimizer in optimizers.values():  # warm-up: the moments allocated
        optimizer.step()
    for _ in range(args.repeats):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                optimizer.step()
            times[name].append((time.perf_counter() - start) / args.steps)
    print(f"AdamW step on {n / 1e6:.1f}M fp32 parameters ({args.shape}), {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; seconds per step, median [min-max] of {args.repeats} x {args.steps} "
          "steps")  # fmt: skip
    base = statistics.median(times[next(iter(VARIANTS))])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"  {name:40s} {med:.3f} s [{min(values):.3f}-{max(values):.3f}]  {base / med:.2f}x")


if __name__ == "__main__":
    main()
