"""Peak memory per rank of FSDP2 against DDP, two ranks, on a model whose weights, gradients and Adam states
dominate (a ~170M-parameter Llama with random weights, loaded from a local directory as a hub model would be).

    python benchmarks/fsdp_memory.py            # two CPU processes per strategy, alternating, --repeats times

Each run is a fresh ``torchrun`` launch of two processes training SFT for a few steps with short sequences
(activations are small next to the model's states). A rank's memory is its peak resident set size minus what the
process held before the model was created (Python, torch, Lightning, the tokenizer), so the figure is what
training added. Prints each run and the FSDP2 / DDP ratio (target: <= 0.55)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def current_rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def make_model(directory: Path) -> int:
    """A random-weight Llama of :data:`SHAPE` with the embedded tokenizer, saved as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_align.models import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    config = LlamaConfig(**{**SHAPE, "vocab_size": max(SHAPE["vocab_size"], len(tokenizer))},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def worker(strategy_name: str, model_dir: str, out: str) -> None:
    import lightning as L
    import torch
    from lightning.pytorch.strategies import DDPStrategy

    from lit_align import InstructionDataModule, SFTModule
    from lit_align.data.sources import read_records
    from lit_align.strategies import FSDP2Strategy

    torch.set_num_threads(1)
    module = SFTModule(model=model_dir, lr=1e-4)
    rows = [{"prompt": r.row["instruction"], "completion": r.row["instances"][0]["output"]}
            for r in read_records("bundled:self_instruct_seed_tasks.jsonl")[:16]]  # fmt: skip
    data = InstructionDataModule(module.tokenizer, rows, val_fraction=0.0, max_length=64, batch_size=1)
    baseline = current_rss_gb()  # before the model exists (configure_model runs inside fit)
    strategy = DDPStrategy() if strategy_name == "ddp" else FSDP2Strategy()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, data)
    result = {"rank": trainer.global_rank, "strategy": strategy_name, "baseline_gb": baseline,
              "peak_gb": peak_rss_gb(), "added_gb": peak_rss_gb() - baseline}  # fmt: skip
    with open(out, "a") as f:
        f.write(json.dumps(result) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", nargs=3, metavar=("STRATEGY", "MODEL_DIR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    with tempfile.TemporaryDirectory() as tmp:
        n_params = make_model(Path(tmp) / "model")
        states_gb = n_params * 4 * 4 / 2**30  # fp32 weights, gradients, Adam's two moments
        print(f"model: {n_params / 1e6:.0f}M parameters; weights + gradients + Adam states {states_gb:.2f} GB "
              f"(DDP: all on every rank; FSDP2: half per rank at two ranks)")  # fmt: skip
        out = Path(tmp) / "results.jsonl"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for _ in range(args.repeats):
            for strategy in ("ddp", "fsdp2"):  # alternating, fresh processes every time
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, "--worker", strategy, str(Path(tmp) / "model"), str(out)]  # fmt: skip
                subprocess.run(command, env=env, check=True, capture_output=True, timeout=1800)
        runs = [json.loads(line) for line in out.read_text().splitlines()]
    added = {s: [r["added_gb"] for r in runs if r["strategy"] == s] for s in ("ddp", "fsdp2")}
    for strategy, values in added.items():
        print(f"{strategy:6s} added memory per rank (GB): " + ", ".join(f"{v:.2f}" for v in values)
              + f"  [max {max(values):.2f}]")  # fmt: skip
    ratio = max(added["fsdp2"]) / max(added["ddp"])
    print(f"FSDP2 / DDP peak memory per rank: {ratio:.2f}x (target <= 0.55x)")


if __name__ == "__main__":
    main()
