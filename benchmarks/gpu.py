"""SFT and DPO on a random-initialised ~1B Llama-shaped model in bf16 on one GPU: tokens/s, model-FLOPs utilisation
against the GPU's own measured bf16 matmul rate, and peak ``torch.cuda.max_memory_allocated``.

    python benchmarks/gpu.py [--steps 10] [--batch-size 8] [--seq-len 1024]

Synthetic data (random token ids; the prompt is the first half of each sequence) so that nothing is downloaded.
Model FLOPs: 6N per trained token (SFT: every token; DPO: the policy's tokens as TRL's batches count them, plus 2N
per token for the reference forward), N = matmul parameters including the unembedding.
"""

from __future__ import annotations

import argparse
import time

import torch

SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=4096, max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128_256,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bf16_matmul_flops(device: str, size: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def matmul_params(config) -> int:
    head_dim = config.hidden_size // config.num_attention_heads
    attention = config.hidden_size * head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    mlp = 3 * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * (attention + mlp) + config.hidden_size * config.vocab_size


def synthetic_preferences(n: int, seq_len: int, vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    half = seq_len // 2
    return [
        {
            "prompt_ids": torch.randint(3, vocab, (half,), generator=generator).tolist(),
            "response_ids": [torch.randint(3, vocab, (half,), generator=generator).tolist() for _ in range(2)],
            "pairs": [(0, 1)],
        }
        for _ in range(n)
    ]


def run(method: str, args: argparse.Namespace, peak: float) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_align import DPOModule, SFTModule
    from lit_align.data import PreferenceCollator, SFTCollator
    from lit_align.models import load_tokenizer

    device = args.device
    config = LlamaConfig(**(SMOKE if args.smoke else LLAMA_1B))
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tokenizer = load_tokenizer("tiny")
    module = (SFTModule if method == "sft" else DPOModule)(model=model, tokenizer=tokenizer, lr=1e-5)
    module.configure_model()
    module = module.to(device)
    params = [p for p in module.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device == "cuda")
    examples = synthetic_preferences(args.batch_size * (args.steps + 2), args.seq_len, config.vocab_size)
    if method == "sft":
        collate = SFTCollator(0)
        examples = [{"input_ids": e["prompt_ids"] + e["response_ids"][0],
                     "labels": [-100] * len(e["prompt_ids"]) + e["response_ids"][0]} for e in examples]  # fmt: skip
        tokens_per_step = args.batch_size * args.seq_len
        flops_per_token = 6
    else:
        collate = PreferenceCollator(0, share_prompt=True)
        tokens_per_step = args.batch_size * 2 * args.seq_len  # as TRL counts them
        flops_per_token = 8
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.steps + 2):
        batch = collate(examples[step * args.batch_size : (step + 1) * args.batch_size])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        sync(device)
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = module.compute_loss(batch)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = sum(times[2:]) / len(times[2:])
    tokens_per_s = tokens_per_step / seconds
    mfu = flops_per_token * matmul_params(config) * tokens_per_s / peak
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    del module, model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return f"{method:4s} {tokens_per_s:10.0f} tok/s  MFU {mfu:6.1%}  peak {memory:6.1f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU: checks the script runs")
    args = parser.parse_args()
    args.device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA GPU (or --smoke for a CPU check of the script)")
    peak = bf16_matmul_flops(args.device, size=1024 if args.smoke else 8192, repeats=3 if args.smoke else 20)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke)"
    print(f"# {name} | bf16 matmul {peak / 1e12:.2f} TFLOP/s measured | torch {torch.__version__}")
    shape = "smoke" if args.smoke else "~1B (hidden 2048, 16 layers, vocab 128k)"
    print(f"# Llama {shape}, bf16 autocast, batch {args.batch_size}, length {args.seq_len}")
    for method in ("sft", "dpo"):
        print(run(method, args, peak), flush=True)


if __name__ == "__main__":
    main()
