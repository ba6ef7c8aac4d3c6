"""A training run that records every step, checkpoints after every step, and can kill itself (SIGKILL) before a
given step: the subject of the exact-resume tests. ``python resume_worker.py OUT CKPT_DIR KILL_AT METHOD
[RESUME_CKPT]``; a METHOD ending in ``+val`` validates after every training batch (after its checkpoint); one ending
in ``@ddp`` or ``@fsdp2`` runs on the ranks torchrun started (every rank kills itself at the same step, and rank
``r > 0`` records to ``OUT.rank<r>``)."""

from __future__ import annotations

import json
import os
import signal
import sys
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy

from lit_align import (
    DistillModule,
    DPOModule,
    GRPOModule,
    InstructionDataModule,
    KTOModule,
    OnlineDPOModule,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    SFTModule,
    UnpairedDataModule,
)
from lit_align.data.sources import read_records
from lit_align.modules.base import batch_fingerprint
from lit_align.parallel import full_tensor
from lit_align.rewards import CharacterFractionReward
from lit_align.strategies import FSDP2Strategy

TIMEOUT = timedelta(seconds=90)  # a collective that waits longer fails: a hang is a failure


class Record(L.Callback):
    def __init__(self, path: str, kill_at: int) -> None:
        self.path, self.kill_at = path, kill_at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a crash, not a clean stop: nothing after this runs
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]

    @staticmethod
    def logged(metrics):
        return metrics["train/reward_mean_step"] if "train/reward_mean_step" in metrics else metrics["train/loss_step"]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        row = {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "batch_idx": batch_idx,
            "batch": batch_fingerprint(batch),
            # PPO, GRPO and online DPO (manual optimisation) return no loss: the rollout's mean reward (and PPO's KL
            # coefficient) stand in; distillation logs its loss
            "loss": float(outputs["loss"] if outputs else self.logged(trainer.callback_metrics)).hex(),
            "kl_coef": float(getattr(getattr(module, "kl_controller", None), "value", 0.0)).hex(),
            "lr": float(self.lr).hex(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    out, ckpt_dir, kill_at, method = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    resume = sys.argv[5] if len(sys.argv) > 5 else None
    method, _, strategy = method.partition("@")
    method, validate = method.removesuffix("+val"), method.endswith("+val")
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    out = out if rank == 0 else f"{out}.rank{rank}"
    per_rank = 4 // world
    val_fraction = 0.1 if validate else 0.0
    torch.set_num_threads(1)
    L.seed_everything(0)
    if method == "sft":
        module = SFTModule(lr=3e-3, residual_dropout=0.1)  # dropout: the RNG stream must resume too
        rows = [r.row for r in read_records("bundled:self_instruct_seed_tasks.jsonl")[:40]]
        data = InstructionDataModule(module.tokenizer, rows, val_fraction=val_fraction, max_length=96,
                                     batch_size=per_rank)  # fmt: skip
    elif method == "ppo":
        module = PPOModule(
            lr=3e-3, reward_fn=CharacterFractionReward(" "), max_new_tokens=8, mini_batch_size=4, num_iterations=1,
            adaptive_kl=True, kl_target=0.5, kl_horizon=50,
        )  # fmt: skip
        data = PromptDataModule(module.tokenizer, max_prompt_length=32, batch_size=per_rank)
        data.setup()
        data.train_dataset = data.train_dataset[:22]
    elif method == "grpo":  # two optimizer steps per batch of 4 prompts (one for the last, of 2)
        module = GRPOModule(
            lr=3e-3, reward_fn=CharacterFractionReward(" "), group_size=4, max_new_tokens=8, mini_batch_size=2,
            kl_coef=0.04,
        )  # fmt: skip
        data = PromptDataModule(module.tokenizer, max_prompt_length=32, batch_size=per_rank, val_fraction=val_fraction)
        data.setup()
        data.train_dataset = data.train_dataset[:22]
    elif method == "online_dpo":  # one optimizer step per batch of 4 prompts (6 an epoch)
        module = OnlineDPOModule(lr=3e-3, reward_fn=CharacterFractionReward(" "), max_new_tokens=8)
        data = PromptDataModule(module.tokenizer, max_prompt_length=32, batch_size=per_rank, val_fraction=val_fraction)
        data.setup()
        data.train_dataset = data.train_dataset[:22]
    elif method == "distill":  # the student samples, a tiny teacher from another seed scores (6 steps an epoch)
        module = DistillModule(lr=3e-3, teacher="tiny", teacher_seed=1, max_new_tokens=8)
        data = PromptDataModule(module.tokenizer, max_prompt_length=32, batch_size=per_rank, val_fraction=val_fraction)
        data.setup()
        data.train_dataset = data.train_dataset[:22]
    elif method == "kto":
        module = KTOModule(lr=3e-3)
        rows = [r.row for r in read_records("bundled:hh_rlhf_harmless_base_test_head300.jsonl.gz")[:22]]
        data = UnpairedDataModule(
            module.tokenizer, rows, val_fraction=0.0, max_length=128, share_prompt=True, batch_size=per_rank
        )
    else:
        module = DPOModule(lr=3e-3)
        rows = [r.row for r in read_records("bundled:hh_rlhf_harmless_base_test_head300.jsonl.gz")[:22]]
        data = PreferenceDataModule(
            module.tokenizer, rows, val_fraction=0.0, max_length=128, share_prompt=True, batch_size=per_rank
        )
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1
    )
    strategies = {"": "auto", "ddp": DDPStrategy(timeout=TIMEOUT), "fsdp2": FSDP2Strategy(timeout=TIMEOUT)}
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategies[strategy],
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1 if validate else 0,
        val_check_interval=1 if validate else None,
        num_sanity_val_steps=0,
        callbacks=[Record(out, kill_at), checkpoints],
    )
    trainer.fit(module, data, ckpt_path=resume)
    flat = torch.cat([full_tensor(v).flatten().float() for v in module.state_dict().values()])  # gathered
    with open(out, "a") as f:
        digest = batch_fingerprint({"input_ids": flat})
        f.write(json.dumps({"final_weights": digest, "nonfinite_steps": module.nonfinite_steps}) + "\n")


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # leave together: a rank exiting first can abort the others' teardown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
