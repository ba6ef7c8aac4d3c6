"""Checkpoints written on two ranks under FSDP2, in both formats, and resumed from each.

``torchrun --nproc_per_node 2 checkpoint_worker.py save OUT``: SFT three steps, then the same state saved as a
distributed checkpoint (``OUT/dist.ckpt/``, each rank's shard) and as one full file (``OUT/full.ckpt``); rank 0 writes
the final full weights to ``OUT/final.pt``.
``torchrun --nproc_per_node 2 checkpoint_worker.py resume OUT CKPT TAG``: resume from CKPT for one more step; rank 0
writes that step's loss and the final weights to ``OUT/resumed-TAG.pt``.
``python checkpoint_worker.py spawn OUT``: two ranks started by Lightning's ``ddp_spawn``, exporting from rank 0; the
main process then writes its module's weights, and whether they are the exported ones, to ``OUT/spawn.pt``."""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch

from lit_align import InstructionDataModule, SFTModule
from lit_align.data.sources import read_records
from lit_align.parallel import full_tensor
from lit_align.strategies import FSDP2Strategy


class Losses(L.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


def spawn(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    module = SFTModule(lr=1e-2, export_dir=str(out / "spawn-export"))
    rows = [r.row for r in read_records("bundled:self_instruct_seed_tasks.jsonl")[:16]]
    data = InstructionDataModule(module.tokenizer, rows, val_fraction=0.0, max_length=128, batch_size=2)
    L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(module, data)  # fmt: skip
    exported = AutoModelForCausalLM.from_pretrained(out / "spawn-export").state_dict()
    weights = module.model.state_dict() if module.model is not None else {}
    same = bool(weights) and all(torch.equal(v, weights[k]) for k, v in exported.items())
    torch.save({"usable": module.model is not None, "same_as_export": same}, out / "spawn.pt")


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "spawn":
        return spawn(out)
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    module = SFTModule(lr=1e-2, residual_dropout=0.1)
    rows = [r.row for r in read_records("bundled:self_instruct_seed_tasks.jsonl")[:24]]
    data = InstructionDataModule(module.tokenizer, rows, val_fraction=0.0, max_length=192, batch_size=2)
    losses = Losses()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=FSDP2Strategy(timeout=timedelta(seconds=90)),
        max_steps=3 if mode == "save" else 4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[losses],
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=None if mode == "save" else sys.argv[3])
    weights = {k: full_tensor(v).detach().cpu().clone() for k, v in module.state_dict().items()}
    if mode == "save":
        trainer.save_checkpoint(out / "dist.ckpt")
        trainer.strategy._save_distributed_checkpoint = False  # the same state, gathered into one file
        trainer.save_checkpoint(out / "full.ckpt")
        if trainer.global_rank == 0:
            torch.save(weights, out / "final.pt")
    elif trainer.global_rank == 0:
        torch.save({"losses": losses.values, "weights": weights}, out / f"resumed-{sys.argv[4]}.pt")


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # leave together: a rank exiting first can abort the others' teardown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
