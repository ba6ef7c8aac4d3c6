"""SFT, DPO and GRPO for a few steps under each multi-device strategy and mixed precision, on the GPUs of this
machine: loss, peak memory and tokens per second per run. For a GPU machine (a few minutes); ``--smoke`` runs the
CPU-capable subset (DDP and FSDP2 on two CPU processes, the tiny model) to check the script itself.

    python benchmarks/gpu_strategies.py                 # every GPU of the machine
    python benchmarks/gpu_strategies.py --smoke         # two CPU processes

Strategies: ``ddp``, ``fsdp`` (Lightning's FSDPStrategy, FSDP1, each decoder layer wrapped), ``deepspeed_stage_3``
(needs ``pip install deepspeed``) and ``fsdp2`` (lit_align's FSDP2Strategy); precisions ``16-mixed`` (fp16 with loss
scaling, fp32 master weights) and ``bf16-mixed``. A run that fails is reported with its error, not hidden: FSDP1
and DeepSpeed are not exercised in CI."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip  # ~0.4B parameters


def worker(method: str, strategy_name: str, precision: str, model: str, devices: int, out: str) -> None:
    import lightning as L
    import torch

    from lit_align import (
        DPOModule,
        GRPOModule,
        InstructionDataModule,
        PreferenceDataModule,
        PromptDataModule,
        SFTModule,
    )
    from lit_align.rewards import CharacterFractionReward

    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    strategy: object = strategy_name
    if strategy_name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})
    elif strategy_name == "fsdp2":
        from lit_align.strategies import FSDP2Strategy

        strategy = FSDP2Strategy()
    steps, tokens = 4, {"n": 0}
    if method == "sft":
        module = SFTModule(model=model, lr=1e-5)
        data = InstructionDataModule(module.tokenizer, max_length=512, batch_size=4, val_fraction=0.0)
        count = lambda batch: int(batch["attention_mask"].sum())  # noqa: E731
    elif method == "dpo":
        module = DPOModule(model=model, lr=1e-6)
        data = PreferenceDataModule(module.tokenizer, max_length=512, batch_size=4, val_fraction=0.0,
                                    share_prompt=True)  # fmt: skip
        count = lambda batch: int(batch["attention_mask"].sum())  # noqa: E731
    else:
        module = GRPOModule(model=model, lr=1e-6, reward_fn=CharacterFractionReward(), group_size=8,
                            max_new_tokens=64)  # fmt: skip
        data = PromptDataModule(module.tokenizer, max_prompt_length=256, batch_size=4)
        count = lambda batch: int(batch["attention_mask"].sum()) * 8  # noqa: E731  (prompt tokens x group)

    class Meter(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:  # the first step (compilation, allocation) is not timed
                self.start = time.perf_counter()
            if batch_idx >= 1:
                tokens["n"] += count(batch)

    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision,
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[meter := Meter()])  # fmt: skip
    trainer.fit(module, data)
    seconds = time.perf_counter() - meter.start
    loss = trainer.callback_metrics.get("train/loss", trainer.callback_metrics.get("train/policy_loss"))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    if trainer.global_rank == 0:
        row = {"method": method, "strategy": strategy_name, "precision": precision, "loss": float(loss),
               "peak_gb_per_rank": peak, "tokens_per_s": tokens["n"] * trainer.world_size / seconds}  # fmt: skip
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def make_model(directory: Path, smoke: bool) -> str:
    if smoke:
        return "tiny"
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_align.models import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    config = LlamaConfig(**SHAPE, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="two CPU processes, the tiny model, DDP and FSDP2")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, strategy, precision, model, devices, out = args.worker
        return worker(method, strategy, precision, model, int(devices), out)
    import torch

    devices = 2 if args.smoke else max(torch.cuda.device_count(), 1)
    strategies = ["ddp", "fsdp2"] if args.smoke else ["ddp", "fsdp", "deepspeed_stage_3", "fsdp2"]
    precisions = ["32-true"] if args.smoke else ["bf16-mixed", "16-mixed"]
    with tempfile.TemporaryDirectory() as tmp:
        model, out = make_model(Path(tmp) / "model", args.smoke), Path(tmp) / "results.jsonl"
        for method in ("sft", "dpo", "grpo"):
            for strategy in strategies:
                for precision in precisions:
                    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={devices}", __file__, "--worker", method, strategy, precision,
                               model, str(devices), str(out)]  # fmt: skip
                    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
                    if result.returncode != 0:
                        error = (result.stderr.strip().splitlines() or ["?"])[-1][:160]
                        print(f"{method:5s} {strategy:18s} {precision:10s} FAILED: {error}", flush=True)
                        continue
                    row = json.loads(out.read_text().splitlines()[-1])
                    print(f"{method:5s} {strategy:18s} {precision:10s} loss {row['loss']:.4f}  peak "
                          f"{row['peak_gb_per_rank']:.2f} GB/rank  {row['tokens_per_s']:,.0f} tokens/s",
                          flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
