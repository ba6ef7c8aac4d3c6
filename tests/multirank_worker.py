"""Trains each method a few steps on one process, or on two CPU processes (gloo) under DDP or FSDP2, with the same
global batch, and records what the multi-rank tests compare: every step's loss (reduced over the ranks), the final
full weights, which trainable parameters changed, whether the ranks ended with equal weights, and an export.

``python -m torch.distributed.run --nproc_per_node 2 multirank_worker.py OUT STRATEGY METHOD [METHOD ...]`` with
STRATEGY ``ddp`` or ``fsdp2``; ``python multirank_worker.py OUT single METHOD ...`` for the one-process reference.
Writes ``OUT/<method>-<strategy>.pt`` (rank 0) and ``OUT/<method>-<strategy>-export/``."""

from __future__ import annotations

import hashlib
import os
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy

from lit_align import (
    DistillModule,
    DPOModule,
    GRPOModule,
    InstructionDataModule,
    KTOModule,
    LoRA,
    OnlineDPOModule,
    PPOModule,
    PreferenceDataModule,
    PromptDataModule,
    RewardModule,
    SFTModule,
    UnpairedDataModule,
)
from lit_align.data.sources import read_records
from lit_align.parallel import full_tensor
from lit_align.rewards import CharacterFractionReward
from lit_align.rollout import HFGenerator
from lit_align.strategies import FSDP2Strategy

GLOBAL_BATCH = 4
STEPS = 3
TIMEOUT = timedelta(seconds=90)  # a collective that waits longer fails: a hang is a failure


def build(method: str, per_rank: int, out: Path, strategy_name: str):
    """The module and its data: 24 training rows, and 5 held-out ones (an odd count: two ranks get 3 each, one of
    them padding)."""
    hh_all = [r.row for r in read_records("bundled:hh_rlhf_harmless_base_test_head300.jsonl.gz")[:29]]
    hh, hh_val = hh_all[:24], hh_all[24:]
    if method in ("sft", "sft_fp16"):
        module = SFTModule(lr=1e-2)
        rows = [r.row for r in read_records("bundled:self_instruct_seed_tasks.jsonl")[:29]]
        data = InstructionDataModule(module.tokenizer, rows[:24], val_data=rows[24:], max_length=192,
                                     batch_size=per_rank)  # fmt: skip
    elif method == "reward":
        module = RewardModule(lr=1e-2, normalize=True)  # the offset is computed on every rank at the end
        data = PreferenceDataModule(module.tokenizer, hh, val_data=hh_val, max_length=96, batch_size=per_rank)
    elif method.startswith("dpo"):
        # dpo_split_cache: every rank its own cache directory, as nodes that share no disk (rank 1's first rank of
        # no node, so it never writes: a second run finds the cache on rank 0 only)
        split = str(out / f"cache-{strategy_name}-rank{os.environ.get('RANK', '0')}")
        options = {
            "dpo": {},
            "dpo_precomputed": {"reference": "precomputed", "ref_cache_dir": str(out / f"cache-{strategy_name}")},
            "dpo_split_cache": {"reference": "precomputed", "ref_cache_dir": split},
            "dpo_lora": {"lora": LoRA(r=4, alpha=8, dropout=0.0)},
        }[method]
        module = DPOModule(lr=1e-2, **options)
        data = PreferenceDataModule(module.tokenizer, hh, val_data=hh_val, max_length=96, share_prompt=True,
                                    batch_size=per_rank)  # fmt: skip
    elif method == "kto":
        module = KTOModule(lr=1e-2, undesirable_weight=1.5)
        data = UnpairedDataModule(module.tokenizer, hh, val_data=hh_val, max_length=96, share_prompt=True,
                                  batch_size=per_rank)  # fmt: skip
    elif method == "ppo":
        module = PPOModule(lr=1e-2, reward_fn=CharacterFractionReward(" "), max_new_tokens=6, num_iterations=1,
                           mini_batch_size=per_rank, value_model="policy_head")  # fmt: skip
        data = PromptDataModule(module.tokenizer, hh, val_data=hh_val, max_prompt_length=32, batch_size=per_rank)
    elif method.startswith("grpo_uneven"):  # rank 0 stops after one token, rank 1 samples eight
        module = GRPOModule(lr=1e-2, reward_fn=CharacterFractionReward(" "), group_size=2, max_new_tokens=8,
                            generator=UnevenGenerator())  # fmt: skip
        data = PromptDataModule(module.tokenizer, hh, val_data=hh_val, max_prompt_length=32, batch_size=per_rank)
    elif method == "grpo":
        module = GRPOModule(lr=1e-2, reward_fn=CharacterFractionReward(" "), group_size=2, max_new_tokens=6)
        data = PromptDataModule(module.tokenizer, hh, val_data=hh_val, max_prompt_length=32, batch_size=per_rank)
    elif method == "online_dpo":  # most pairs tie and are skipped: the ranks count different numbers of pairs
        module = OnlineDPOModule(lr=1e-2, reward_fn=SpaceShareAtLeast(0.1), max_new_tokens=6)
        data = PromptDataModule(module.tokenizer, hh, val_data=hh_val, max_prompt_length=32, batch_size=per_rank)
    elif method == "distill":  # the teacher: the tiny preset from another seed, a frozen role sharded like the others
        module = DistillModule(lr=1e-2, teacher="tiny", teacher_seed=1, max_new_tokens=6, lmbda=1.0)
        data = PromptDataModule(module.tokenizer, hh, val_data=hh_val, max_prompt_length=32, batch_size=per_rank)
    else:
        raise ValueError(method)
    return module, data


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_weights(module) -> dict[str, torch.Tensor]:
    """Every trainable model's whole weights (gathered from shards: every rank takes part and gets them)."""
    return {f"{name}.{key}": full_tensor(value).detach().cpu().clone()
            for name in ("model", *module.trainable_modules)
            for key, value in getattr(module, name).state_dict().items()}  # fmt: skip


class SpaceShareAtLeast(CharacterFractionReward):
    """1 when at least ``share`` of a completion's characters are spaces, else 0: a coarse score under which many
    pairs tie, so that the ranks train on different numbers of pairs."""

    def __init__(self, share: float) -> None:
        super().__init__(" ")
        self.share = share

    def __call__(self, prompts, completions, references=None):
        return (super().__call__(prompts, completions) >= self.share).float()


class UnevenGenerator(HFGenerator):
    """Rank 0's completions end after one token while rank 1's run on: the ranks decode different numbers of
    steps, which must not leave one waiting in a collective the other never issues."""

    def __call__(self, *args, max_new_tokens, **kwargs):
        return super().__call__(*args, max_new_tokens=1 if dist.get_rank() == 0 else max_new_tokens, **kwargs)


COLLECTIVES = ("all_gather_single", "reduce_scatter_single", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_reduce", "all_gather", "broadcast")  # fmt: skip


def count_collectives() -> list[tuple[str, tuple[int, ...]]]:
    """Record every collective this rank issues (its name and tensor shape), in order: two ranks that issue the
    same sequence never wait on each other or pair mismatched operations."""
    issued: list[tuple[str, tuple[int, ...]]] = []
    for name in (n for n in COLLECTIVES if hasattr(dist, n)):
        original = getattr(dist, name)

        def recorded(*args, _name=name, _original=original, **kwargs):
            tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
            issued.append((_name, tuple(tensor.shape) if tensor is not None else ()))
            return _original(*args, **kwargs)

        setattr(dist, name, recorded)
    return issued


class Record(L.Callback):
    """The starting weights, and every step's loss reduced over the ranks (GRPO: the policy loss; PPO: the value
    loss, its policy loss being 0 at a ratio of 1 with whitened advantages)."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.initial: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, module):
        self.initial = full_weights(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        metric = "train/value_loss_step" if isinstance(module, PPOModule) else "train/policy_loss_step"
        metric = "train/loss_step" if isinstance(module, DistillModule) else metric
        value = outputs["loss"] if outputs else trainer.callback_metrics[metric]
        if isinstance(module, KTOModule):  # the logged global-batch loss (each rank's own loss is its share of it)
            value = trainer.callback_metrics["train/loss"]
        self.losses.append(float(trainer.strategy.reduce(value.detach().float(), reduce_op="mean")))


def main() -> None:
    out, strategy_name, methods = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for method in methods:
        L.seed_everything(0, verbose=False)
        module, data = build(method, GLOBAL_BATCH // world, out, strategy_name)
        strategy = {"single": "auto", "ddp": DDPStrategy(timeout=TIMEOUT), "fsdp2": FSDP2Strategy(timeout=TIMEOUT)}
        if method == "grpo_uneven_layerwise":  # every decoding step all-gathers each layer: ranks step together
            strategy["fsdp2"] = FSDP2Strategy(timeout=TIMEOUT, gather_for_generation=False)
        record = Record()
        precision = {}
        if method == "sft_fp16":  # fp16 autocast on the CPU with loss scaling (Lightning would turn 16-mixed into bf16)
            from lightning.pytorch.plugins.precision import MixedPrecision

            precision = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
        trainer = L.Trainer(
            accelerator="cpu", devices=world, strategy=strategy[strategy_name], max_steps=STEPS, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            check_val_every_n_epoch=1000, num_sanity_val_steps=0, callbacks=[record], **precision,
        )  # fmt: skip
        issued = count_collectives() if method.startswith("grpo_uneven") else []
        trainer.fit(module, data)
        scaler = type(getattr(trainer.precision_plugin, "scaler", None)).__name__
        if issued:
            torch.save(issued, out / f"{method}-{strategy_name}-collectives-rank{trainer.global_rank}.pt")
        (validation,) = trainer.validate(module, data, verbose=False)
        weights = full_weights(module)
        digest = hashlib.blake2b(b"".join(w.numpy().tobytes() for w in weights.values()), digest_size=8).hexdigest()
        digests = [digest] * world
        if world > 1:
            dist.all_gather_object(digests, digest)
        trainable = [f"{n}.{k}" for n in ("model", *module.trainable_modules)
                     for k, p in getattr(module, n).named_parameters() if p.requires_grad]  # fmt: skip
        changed = {k: not torch.equal(record.initial[k], weights[k]) for k in weights}
        # how much of each model this rank holds (FSDP2: a shard; DDP: all of it)
        held = {name: sum(_local(p).numel() for p in model.parameters()) / sum(p.numel() for p in model.parameters())
                for name in ("model", *module.trainable_modules, *module.frozen_modules)
                if isinstance(model := getattr(module, name, None), torch.nn.Module)}  # fmt: skip
        module.export_hf(out / f"{method}-{strategy_name}-export")
        if trainer.global_rank == 0:
            torch.save({"losses": record.losses, "weights": weights, "digests": digests, "trainable": trainable,
                        "changed": changed, "held": held, "validation": validation, "scaler": scaler,
                        "reward_offset": float(getattr(module, "reward_offset", 0.0))},
                       out / f"{method}-{strategy_name}.pt")  # fmt: skip


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():  # leave together: a rank exiting first can abort the others' teardown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
