"""Where a GRPO step's time goes: lit_align's step time with each of its two GRPO levers on and off (packing each
prompt and its group into one row for the log-prob passes, and prefilling each prompt once for its group), on the
tiny model and the bundled HH prompts, in the settings of ``vs_trl.py --cases grpo``. Alternating repeats in one
process; warm-up steps discarded.

    python benchmarks/grpo_levers.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from lit_align import GRPOModule, PromptDataModule
from lit_align.rewards import CharacterFractionReward
from lit_align.rollout import HFGenerator

SETTINGS = [(True, True), (True, False), (False, True), (False, False)]


def seconds_per_step(share_prompt: bool, share_prompt_cache: bool, args: argparse.Namespace) -> float:
    torch.manual_seed(0)
    module = GRPOModule(
        model="tiny", reward_fn=CharacterFractionReward(), group_size=args.group_size, kl_coef=0.04, lr=1e-6,
        max_new_tokens=args.completion_length, share_prompt=share_prompt,
        generator=HFGenerator({"min_new_tokens": args.completion_length}, share_prompt_cache=share_prompt_cache),
    )  # fmt: skip
    data = PromptDataModule(module.tokenizer, batch_size=args.prompts, max_prompt_length=512, seed=1)
    times: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *_):
            self.start = time.perf_counter()

        def on_train_batch_end(self, *_):
            times.append(time.perf_counter() - self.start)

    L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=args.warmup + args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[Timer()],
    ).fit(module, data)  # fmt: skip
    return statistics.mean(times[args.warmup :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict[tuple[bool, bool], list[float]] = {setting: [] for setting in SETTINGS}
    for _ in range(args.repeats):
        for setting in SETTINGS:
            results[setting].append(seconds_per_step(*setting, args))
    for (share_prompt, share_cache), values in results.items():
        print(
            f"share_prompt={share_prompt!s:5} share_prompt_cache={share_cache!s:5} "
            f"{statistics.median(values):.3f} s/step [{min(values):.3f}-{max(values):.3f}]"
        )


if __name__ == "__main__":
    main()
