"""Held-out pairwise accuracy of the tiny reward model on Anthropic HH, before and after training.

    python benchmarks/reward_accuracy.py [--data ../shared/data/hh_rlhf_harmless_base_test.jsonl.gz] [--epochs 2]

Prints the untrained and trained accuracy on the same held-out pairs (InstructGPT step 2 on real comparisons).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch

from lit_align import PreferenceDataModule, RewardModule

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_rlhf_harmless_base_test.jsonl.gz"


def held_out_accuracy(data: str, epochs: int = 2, max_length: int = 256, seed: int = 0, lr: float = 1e-3) -> dict:
    L.seed_everything(seed)
    module = RewardModule(lr=lr)
    dm = PreferenceDataModule(module.tokenizer, train_data=data, val_fraction=0.2, max_length=max_length, batch_size=16)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=1.0,
    )
    before = trainer.validate(module, dm, verbose=False)[0]["val/accuracy"]
    start = time.perf_counter()
    trainer.fit(module, dm)
    after = trainer.validate(module, dm, verbose=False)[0]["val/accuracy"]
    return {
        "untrained": before,
        "trained": after,
        "val_pairs": dm.stats["val"]["pairs"],
        "train_pairs": dm.stats["train"]["pairs"],
        "fit_seconds": time.perf_counter() - start,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = held_out_accuracy(args.data, args.epochs, args.max_length)
    print(
        f"HH held-out pairwise accuracy: untrained {result['untrained']:.3f} -> trained {result['trained']:.3f} "
        f"({result['val_pairs']} held-out pairs, {result['train_pairs']} training pairs, "
        f"fit {result['fit_seconds']:.0f}s)"
    )
