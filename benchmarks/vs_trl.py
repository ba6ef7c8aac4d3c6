"""lit_align against TRL on identical work: tokens/s and peak memory, as ratios measured in one run.

    pip install -e ".[bench]"
    python benchmarks/vs_trl.py                       # every case, 3 alternating repeats
    python benchmarks/vs_trl.py --cases dpo --repeats 5

Both sides load the same tiny Llama directory (built from a config and saved once), the same tokenizer and the
same Anthropic HH rows (the bundled sample, split into prompt/chosen/rejected once, and kept only where
prompt + response fits ``--max-length`` on both sides, so neither truncates), with the same batch size, precision
(fp32) and thread count. Every measurement runs in a fresh process; lit_align and TRL alternate (A B, B A, ...);
warm-up steps are discarded. The on-policy cases take the prompts in file order on both sides (TRL's
``shuffle_dataset=False``), so each step samples and trains on the same prompts; the offline cases keep each side's
own order (lit_align's length grouping is one of its levers).

Tokens/s counts the work as TRL's batches hold it: the real (non-pad) tokens of prompt+chosen plus
prompt+rejected, however either side computes them. Peak memory is the peak resident set size from the start of
training (warm-up steps included, so the optimizer's state is in it) minus the resident size when training starts
(models and data already loaded); it depends on the longest batches a side met, so each run also reports the padded
shape of every step's first pass (``batch_shapes``, warm-up first).

MFU, for the cases in ``COUNTED`` and ``RECORDED``, is the FLOPs each side actually performed
(``benchmarks/flops.py``: every forward pass's real padded shape, recorded by the worker from its batches (lit_align's
prompt-shared rows and log-probs only at scored positions, TRL's concatenated chosen/rejected rows and its head at
every position) or, for the on-policy cases, by hooks on the models as they run (``PassRecorder``: generation's
prefill and decoding steps with their cached keys, the reference and policy passes); backward 2x for trained passes)
over the timed seconds and the machine's matmul rate; it cannot exceed 100% except by noise. For KTO it stays the
old estimate (FLOPs per useful token x N x useful tokens/s), labelled "est.".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flops import LlamaShape, Pass, step_flops  # noqa: E402  (benchmarks/flops.py, pure arithmetic)

CASES = {
    "sft": "SFT",
    "reward": "reward model",
    "dpo": "DPO, live reference",
    "dpo_precomputed": "DPO, precomputed reference",
    "kto": "KTO, live reference",
    "dpo_vocab32k": "DPO, live ref., vocab 32k",
    "dpo_vocab128k": "DPO, live ref., vocab 128k",
    "grpo": "GRPO step (sampling included)",
    "rloo": "RLOO step (sampling included)",
}
# model-FLOPs per token as TRL's batches count them, in units of N (matmul parameters): 6N trained, 2N scored
# GRPO: 2N to sample (prefill and decode), 2N for the reference, 6N to train, per prompt+completion token;
# RLOO: 2N more for the sampling policy's log-probs (its KL penalty is taken from the rewards)
FLOPS_PER_TOKEN = {"sft": 6, "reward": 6, "dpo": 8, "dpo_precomputed": 6, "dpo_vocab32k": 8, "dpo_vocab128k": 8,
                   "grpo": 10, "rloo": 12, "kto": 12}  # fmt: skip
# KTO: per completion token 6N trained and 2N for the reference, and 2N + 2N for the KL completions of the batch
ON_POLICY = ("grpo", "rloo")
# cases whose workers record every forward pass's real shape from their batches, so their MFU counts the FLOPs
# actually performed; KTO (its KL completions) keeps the estimate above, labelled as one
COUNTED = ("sft", "reward", "dpo", "dpo_precomputed", "dpo_vocab32k", "dpo_vocab128k")
# the on-policy cases: their workers record every forward pass as it runs (PassRecorder), sampling included
RECORDED = ON_POLICY
VOCAB_CASES = {"dpo_vocab32k": 32_768, "dpo_vocab128k": 131_072}
BUNDLED_HH = "bundled:hh_rlhf_harmless_base_test_head300.jsonl.gz"


# ----- measurement helpers (run inside the worker process) ------------------------------------------------------------
class PeakRSS:
    """Samples this process's resident set size every few milliseconds."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.base = self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.002)

    def start(self) -> None:
        self.base = self.peak = self.now()
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak - self.base


class StepTimer:
    """Wall time of each optimizer step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def begin(self) -> None:
        self._start = time.perf_counter()

    def end(self) -> None:
        self.times.append(time.perf_counter() - self._start)


class PassRecorder:
    """Records, per step, the real shape of every forward pass the models under it run, for the FLOPs a step
    actually performed when its passes cannot be read off a collated batch (sampling; the on-policy cases): each
    call of a causal LM's decoder (generation's prefill, each decoding step with the keys it has cached, every
    scoring pass; trained when gradients are on and its weights take them), each call of its unembedding module
    (generation's logits), each ``lit_align`` ``linear_log_probs`` call (its tiled log-prob head, recomputed in
    backward when trained) and each TRL ``fused_lm_head`` forward (its head at every position but each row's last
    on a CPU, recomputed in backward; see ``trl_passes``)."""

    def __init__(self) -> None:
        self.steps: list[list[Pass]] = []
        self.current: list[Pass] | None = None

    def add(self, p: Pass) -> None:
        if self.current is not None:
            self.current.append(p)

    def begin(self) -> None:
        self.current = []

    def end(self) -> None:
        self.steps.append(self.current or [])
        self.current = None

    @staticmethod
    def trained(module: Any) -> bool:
        import torch

        return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())

    def attach(self, root: Any) -> None:
        """Hooks on every causal LM under ``root`` (a policy, a reference copy, a Lightning module)."""
        for model in [m for m in root.modules() if hasattr(m, "get_decoder") and hasattr(m, "lm_head")]:
            model.get_decoder().register_forward_pre_hook(self._decoder, with_kwargs=True)
            model.get_output_embeddings().register_forward_hook(self._head)
            model.register_forward_pre_hook(self._fused_head, with_kwargs=True)

    def _decoder(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed ``cache`` in transformers 5
        context = int(cache.get_seq_length()) if cache is not None else 0
        self.add(Pass(ids.shape[0], ids.shape[1], None, trained=self.trained(module), context=context))

    def _head(self, module: Any, args: tuple, output: Any) -> None:
        positions = output.shape[:-1].numel()
        self.add(Pass(0, 0, "lm", positions, trained=self.trained(module), body=False))

    def _fused_head(self, module: Any, args: tuple, kwargs: dict) -> None:
        if kwargs.get("fused_lm_head"):
            rows, length = kwargs["input_ids"].shape
            trained = self.trained(module)
            self.add(Pass(0, 0, "lm", rows * max(length - 1, 0), trained=trained, recompute_head=trained, body=False))

    def wrap_log_probs(self) -> None:
        """Counts lit_align's tiled log-prob head (it uses the unembedding's weight, not its module)."""
        import torch

        import lit_align.forward

        function = lit_align.forward.linear_log_probs

        def counted(hidden: Any, weight: Any, *args: Any, **kwargs: Any) -> Any:
            trained = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
            self.add(Pass(0, 0, "lm", hidden.shape[0], trained=trained, recompute_head=trained, body=False))
            return function(hidden, weight, *args, **kwargs)

        lit_align.forward.linear_log_probs = counted


def summarize(
    times: list[float],
    tokens: list[int],
    warmup: int,
    memory: int,
    passes: list[list[Pass]] | None = None,
    shape: LlamaShape | None = None,
) -> dict[str, Any]:
    """Per-run figures over the timed steps. ``passes``: the forward passes each step ran (from its batch's real
    shapes), in step order, for the FLOPs it actually performed (``None`` where the worker does not record them)."""
    import torch

    timed, counted = times[warmup:], tokens[warmup : len(times)]
    out = {
        "tokens_per_s": sum(counted) / sum(timed),
        "peak_rss_mb": memory / 2**20,
        "steps": len(timed),
        "tokens_per_step": sum(counted) / len(timed),
        "seconds_per_step": sum(timed) / len(timed),
        "threads": torch.get_num_threads(),
    }
    if passes is not None and shape is not None:
        if len(passes) < len(times):
            raise RuntimeError(f"recorded the batch shapes of {len(passes)} steps but timed {len(times)}")
        done = [step_flops(shape, step) for step in passes[warmup : len(times)]]
        out.update(flops_per_s=sum(done) / sum(timed), flops_per_step=sum(done) / len(timed))
        out["batch_shapes"] = [[step[0].rows, step[0].length] if step else [] for step in passes[: len(times)]]
    return out


# ----- the two workers ------------------------------------------------------------------------------------------------
def model_dir(case: str, workdir: Path) -> Path:
    return workdir / (f"model-{VOCAB_CASES[case]}" if case in VOCAB_CASES else "model")


def run_lit_align(case: str, workdir: Path, args: argparse.Namespace, callbacks: list[Any] = ()) -> dict[str, Any]:
    """lit_align's run of ``case``: its figures (``summarize``); ``callbacks``: more Lightning callbacks."""
    import lightning as L

    from lit_align import (
        DPOModule,
        GRPOModule,
        InstructionDataModule,
        KTOModule,
        PreferenceDataModule,
        PromptDataModule,
        RewardModule,
        SFTModule,
        UnpairedDataModule,
    )
    from lit_align.rewards import CharacterFractionReward
    from lit_align.rollout import HFGenerator

    timer, tokens, memory, passes, recorder = StepTimer(), [], None, [], PassRecorder()
    path = str(model_dir(case, workdir))
    if case == "sft":
        module = SFTModule(model=path, lr=1e-6)
        data = InstructionDataModule(
            module.tokenizer, str(workdir / "sft.jsonl"), val_fraction=0.0, max_length=args.max_length,
            batch_size=args.batch_size, group_by_length=True,
        )  # fmt: skip
    elif case in ON_POLICY:
        # RLOO as TRL's RLOOTrainer computes it: leave-one-out advantages, the KL (beta 0.05) from the rewards,
        # whole-completion ratios, the mean over completions
        method = dict(kl_coef=0.04, loss_type="dapo") if case == "grpo" else dict(
            kl_coef=0.05, loss_type="grpo", advantage_estimator="rloo", kl_in_reward=True,
            importance_sampling_level="sequence_sum")  # fmt: skip
        module = GRPOModule(
            model=path, lr=1e-6, reward_fn=CharacterFractionReward(), group_size=args.group_size,
            max_new_tokens=args.completion_length, **method,
            generator=HFGenerator({"min_new_tokens": args.completion_length}),  # equal lengths on both sides
        )  # fmt: skip
        data = PromptDataModule(
            module.tokenizer, str(workdir / "prompts.jsonl"), max_prompt_length=args.max_length,
            batch_size=args.grpo_prompts, val_fraction=0.0,
        )  # fmt: skip

        def in_file_order() -> Any:  # as TRL takes them with shuffle_dataset=False: the same prompts every step
            from torch.utils.data import DataLoader

            return DataLoader(data.train_dataset, batch_size=args.grpo_prompts, collate_fn=data.collator)

        data.train_dataloader = in_file_order
    elif case == "kto":  # each HH pair as a desirable and an undesirable completion: TRL's batch of rows in pairs
        module = KTOModule(model=path, lr=1e-6, reference="copy")
        data = UnpairedDataModule(
            module.tokenizer, str(workdir / "pairs.jsonl"), val_fraction=0.0, max_length=args.max_length,
            share_prompt=True, batch_size=args.batch_size // 2, group_by_length=True,
        )  # fmt: skip
    else:
        if case == "reward":
            module = RewardModule(model=path, lr=1e-6)
        else:
            reference = "precomputed" if case == "dpo_precomputed" else "copy"
            cache = str(workdir / f"cache-{os.getpid()}")  # computed afresh, as TRL does
            module = DPOModule(model=path, lr=1e-6, reference=reference, ref_cache_dir=cache)
        data = PreferenceDataModule(
            module.tokenizer, str(workdir / "pairs.jsonl"), val_fraction=0.0, max_length=args.max_length,
            share_prompt=True, batch_size=args.batch_size, group_by_length=True,
        )  # fmt: skip
    collate = data.collator

    def counting_collator(examples):
        if case == "sft":
            tokens.append(sum(len(e["input_ids"]) for e in examples))
        elif case in ON_POLICY:  # every prompt + completion, as TRL's batches hold them
            tokens.append(sum(args.group_size * (len(e["prompt_ids"]) + args.completion_length) for e in examples))
        else:  # as TRL's batches hold them: the prompt once per response
            tokens.append(
                sum(len(e["prompt_ids"]) * len(e["response_ids"]) + sum(map(len, e["response_ids"])) for e in examples)
            )
        batch = collate(examples)
        if case in COUNTED:
            passes.append(lit_align_passes(case, batch))
        return batch

    data.collator = counting_collator

    class Measure(L.Callback):
        def on_train_start(self, trainer, pl_module):
            nonlocal memory
            if case in RECORDED:
                recorder.attach(pl_module)
                recorder.wrap_log_probs()
            memory = PeakRSS()
            memory.start()

        def on_train_batch_start(self, *_):
            recorder.begin()
            timer.begin()

        def on_train_batch_end(self, *_):
            timer.end()
            recorder.end()

    trainer = L.Trainer(
        accelerator="cpu",
        precision="32-true",
        max_steps=args.warmup + args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Measure(), *callbacks],
    )
    trainer.fit(module, data)
    shape = LlamaShape.from_config(json.loads((Path(path) / "config.json").read_text()))
    recorded = passes if case in COUNTED else recorder.steps if case in RECORDED else None
    return summarize(timer.times, tokens, args.warmup, memory.stop(), recorded, shape)


def lit_align_passes(case: str, batch: dict[str, Any]) -> list[Pass]:
    """The passes lit_align runs on one collated batch: the policy (trained) over the padded rows as collated
    (prompt-shared rows for the preference cases), its unembedding only at the positions that predict scored
    tokens, through ``linear_log_probs``, which recomputes the logits in backward; the live reference's forward on
    the same rows; a reward model's scalar head only at each response's last token."""
    rows, length = batch["input_ids"].shape
    if case == "sft":  # labelled_nll: the unembedding where labels[:, 1:] is set
        scored = int((batch["labels"][:, 1:] != -100).sum())
        return [Pass(rows, length, "lm", scored, trained=True, recompute_head=True)]
    if case == "reward":
        return [Pass(rows, length, "score", len(batch["response_row"]), trained=True)]
    policy = Pass(rows, length, "lm", len(batch["target_id"]), trained=True, recompute_head=True)
    if case == "dpo_precomputed":  # the reference's log-probs were computed before training
        return [policy]
    return [policy, Pass(rows, length, "lm", len(batch["target_id"]), trained=False)]


def run_trl(case: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    timer, tokens, memory, passes, recorder = StepTimer(), [], None, [], PassRecorder()
    path = model_dir(case, workdir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    common = dict(
        output_dir=str(workdir / f"trl-{os.getpid()}"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        max_length=args.max_length,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=False,  # TRL turns it on by default; lit_align does not: compare like with like
    )

    class Measure(TrainerCallback):
        def on_train_begin(self, *_, **__):
            nonlocal memory
            memory = PeakRSS()
            memory.start()

        def on_step_begin(self, *_, **__):
            recorder.begin()
            timer.begin()

        def on_step_end(self, *_, **__):
            timer.end()
            recorder.end()

    if case == "sft":
        from trl import SFTConfig, SFTTrainer

        rows = [json.loads(line) for line in open(workdir / "sft.jsonl")]
        model = AutoModelForCausalLM.from_pretrained(path)
        trainer_cls, config = SFTTrainer, SFTConfig(**common)
    elif case == "reward":
        from trl import RewardConfig, RewardTrainer

        rows = [json.loads(line) for line in open(workdir / "pairs.jsonl")]
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        trainer_cls, config = RewardTrainer, RewardConfig(**common)
    elif case == "kto":
        from trl import KTOConfig, KTOTrainer

        pairs = [json.loads(line) for line in open(workdir / "pairs.jsonl")]
        rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
                for r in pairs for side in ("chosen", "rejected")]  # fmt: skip
        model = AutoModelForCausalLM.from_pretrained(path)
        trainer_cls, config = KTOTrainer, KTOConfig(**common)
    elif case in ON_POLICY:
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        from lit_align.rewards import CharacterFractionReward

        rows = [json.loads(line) for line in open(workdir / "prompts.jsonl")]
        score = CharacterFractionReward()
        common.pop("max_length")
        common["per_device_train_batch_size"] = args.grpo_prompts * args.group_size  # TRL counts completions
        sampling = dict(num_generations=args.group_size, max_completion_length=args.completion_length,
                        generation_kwargs={"min_new_tokens": args.completion_length},
                        shuffle_dataset=False)  # fmt: skip  # the prompts in file order on both sides
        if case == "grpo":
            trainer_cls, config = GRPOTrainer, GRPOConfig(**common, **sampling, beta=0.04, loss_type="dapo")
        else:
            trainer_cls, config = RLOOTrainer, RLOOConfig(**common, **sampling, beta=0.05)
        trainer = trainer_cls(
            model=AutoModelForCausalLM.from_pretrained(path), args=config, train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer, callbacks=[Measure()],
            reward_funcs=lambda prompts, completions, **_: score(prompts, completions).tolist(),
        )  # fmt: skip
        collate = trainer.data_collator

        def counting_rows(examples):  # every prompt + completion of the generation batch
            tokens.append(sum(len(tokenizer(e["prompt"])["input_ids"]) + args.completion_length for e in examples))
            return collate(examples)

        trainer.data_collator = counting_rows
        for model in (trainer.model, getattr(trainer, "ref_model", None)):
            if model is not None:
                recorder.attach(model)
        trainer.train()
        shape = LlamaShape.from_config(json.loads((path / "config.json").read_text()))
        return summarize(timer.times, tokens, args.warmup, memory.stop(), recorder.steps, shape)
    else:
        from trl import DPOConfig, DPOTrainer

        rows = [json.loads(line) for line in open(workdir / "pairs.jsonl")]
        model = AutoModelForCausalLM.from_pretrained(path)
        config = DPOConfig(**common, precompute_ref_log_probs=case == "dpo_precomputed")
        trainer_cls = DPOTrainer
    trainer = trainer_cls(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=[Measure()],
    )  # fmt: skip
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        mask = batch["attention_mask"] if "attention_mask" in batch else batch["chosen_attention_mask"]
        tokens.append(
            int(mask.sum()) + (int(batch["rejected_attention_mask"].sum()) if "rejected_attention_mask" in batch else 0)
        )
        if case in COUNTED:
            passes.append(trl_passes(case, batch))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    shape = LlamaShape.from_config(json.loads((path / "config.json").read_text()))
    return summarize(timer.times, tokens, args.warmup, memory.stop(), passes if case in COUNTED else None, shape)


def trl_passes(case: str, batch: dict[str, Any]) -> list[Pass]:
    """The passes TRL 1.16 runs on one collated batch (``input_ids`` ``[rows, T]``; chosen and rejected are
    concatenated into ``2 * batch`` rows for the preference trainers). Its fused log-prob head
    (``add_fused_lm_head``) scores every position but each row's last on a CPU (it compacts to labelled positions
    only on Triton devices) and recomputes the logits in backward; a sequence-classification reward model applies
    its scalar head at every position; the live reference runs the same rows forward only."""
    rows, length = batch["input_ids"].shape
    if case == "reward":
        return [Pass(rows, length, "score", None, trained=True)]
    policy = Pass(rows, length, "lm", rows * max(length - 1, 0), trained=True, recompute_head=True)
    if case in ("sft", "dpo_precomputed"):  # TRL's precomputed reference log-probs are computed before training
        return [policy]
    return [policy, Pass(rows, length, "lm", rows * max(length - 1, 0), trained=False)]


# ----- preparing the shared inputs and driving the workers ------------------------------------------------------------
def prepare(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Save the model directory (the tiny preset resized by ``--hidden``, ``--layers``, ``--intermediate``,
    ``--heads``, ``--kv-heads``, ``--vocab``, ``--tied``; the vocabulary cases' larger models only when those cases
    run) and the rows both sides train on."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_align.data.preference import split_shared_prefix
    from lit_align.data.sources import read_records
    from lit_align.models import load_tokenizer, tiny_config

    tokenizer = load_tokenizer("tiny")
    overrides = {"hidden_size": args.hidden, "intermediate_size": args.intermediate or 3 * args.hidden,
                 "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
                 "num_key_value_heads": args.kv_heads, "tie_word_embeddings": args.tied}  # fmt: skip
    config = tiny_config(tokenizer, **overrides)
    if args.vocab:  # ids above the tokenizer's stay unused: the unembedding's size is what costs
        config.vocab_size = args.vocab
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    for case, vocab in VOCAB_CASES.items():  # same model, a larger unembedding (ids above the tokenizer's stay unused)
        if case not in args.cases.split(","):
            continue
        big = LlamaConfig(**{**config.to_dict(), "vocab_size": vocab})
        LlamaForCausalLM(big).save_pretrained(workdir / f"model-{vocab}")
        tokenizer.save_pretrained(workdir / f"model-{vocab}")
    sft_rows = []
    for record in read_records("bundled:self_instruct_seed_tasks.jsonl"):
        for instance in record.row["instances"]:
            prompt = record.row["instruction"] + ("\n" + instance["input"] if instance["input"] else "") + "\n"
            if instance["output"].strip():
                sft_rows.append({"prompt": prompt, "completion": instance["output"]})
    with open(workdir / "sft.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in sft_rows)
    rows, prompt_tokens, all_tokens = [], 0, 0
    for record in read_records(BUNDLED_HH):
        prompt, chosen, rejected = split_shared_prefix(record.row["chosen"], record.row["rejected"], "\n\nAssistant:")
        if not prompt or chosen == rejected or not chosen.strip() or not rejected.strip():
            continue
        n_prompt = len(tokenizer(prompt)["input_ids"])
        n_chosen = len(tokenizer(chosen, add_special_tokens=False)["input_ids"]) + 1
        n_rejected = len(tokenizer(rejected, add_special_tokens=False)["input_ids"]) + 1
        if n_prompt + max(n_chosen, n_rejected) + 2 > args.max_length:
            continue  # neither side truncates
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        prompt_tokens += 2 * n_prompt
        all_tokens += 2 * n_prompt + n_chosen + n_rejected
    with open(workdir / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(workdir / "prompts.jsonl", "w") as f:  # GRPO: the same HH prompts, alone
        f.writelines(json.dumps({"prompt": row["prompt"]}) + "\n" for row in rows)
    return {"rows": len(rows), "prompt_share": prompt_tokens / all_tokens, "sft_rows": len(sft_rows)}


def worker(impl: str, case: str, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--cases",
        case,
        "--workdir",
        str(workdir),
        *("--threads", str(args.threads), "--steps", str(args.steps), "--warmup", str(args.warmup)),
        *("--batch-size", str(args.batch_size), "--max-length", str(args.max_length)),
        *("--hidden", str(args.hidden), "--layers", str(args.layers), "--intermediate", str(args.intermediate)),
        *("--heads", str(args.heads), "--kv-heads", str(args.kv_heads), "--vocab", str(args.vocab)),
        *(("--tied",) if args.tied else ()),
        *("--group-size", str(args.group_size), "--completion-length", str(args.completion_length)),
        *("--grpo-prompts", str(args.grpo_prompts)),
    ]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TQDM_DISABLE": "1",
           "PYTHONWARNINGS": "ignore"}  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:  # killed by a signal (-9: most often the kernel, out of memory) leaves no stderr
        why = f"signal {-out.returncode}" if out.returncode < 0 else f"exit code {out.returncode}"
        raise RuntimeError(f"{impl} {case} failed ({why}):\n{out.stderr[-4000:]}".strip())
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} [{min(values):.1f}-{max(values):.1f}]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps discarded at the start of each run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the Llama model (tiny: 128)")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (tiny: 2)")
    parser.add_argument("--intermediate", type=int, default=0, help="MLP width (0: 3 x hidden, as the tiny preset)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads (tiny: 4)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (tiny: 2)")
    parser.add_argument("--vocab", type=int, default=0, help="vocabulary size (0: the tiny tokenizer's 4,096)")
    parser.add_argument("--tied", action="store_true", help="tie the unembedding to the embedding (tiny: untied)")
    parser.add_argument("--group-size", type=int, default=8, help="GRPO: completions per prompt")
    parser.add_argument("--grpo-prompts", type=int, default=4, help="GRPO: prompts per step")
    parser.add_argument("--completion-length", type=int, default=32, help="GRPO: tokens sampled per completion")
    parser.add_argument("--worker", choices=["lit_align", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser


MFU_HEADER = (
    "useful tok/s = real tokens as TRL's batches hold them (prompt once per response), however either side computes "
    "them; MFU = FLOPs that side actually performed (its real padded batch shapes, attention over the padded "
    "rectangle, unembedding only where computed, backward 2x for trained passes) / time / the measured matmul rate; "
    "for the on-policy cases every pass is recorded as it runs, sampling's prefill and decoding steps included; "
    "'est.' (KTO) = the old estimate, FLOPs-per-token x N x useful tok/s / matmul rate, which charges lit_align "
    "for work it shares or skips and can exceed 100%"
)


def run_case(case: str, workdir: Path, args: argparse.Namespace, peak: float) -> dict[str, Any]:
    """One case, ``--repeats`` alternating pairs of fresh worker processes: every run's figures and their medians,
    ratios and MFU against the matmul rate ``peak`` (FLOP/s)."""
    results: dict[str, list[dict[str, Any]]] = {"lit_align": [], "trl": []}
    run_args, repeats = args, args.repeats
    if case in VOCAB_CASES:  # a memory case, and TRL takes ~40 s a step at 128k: one short run each
        run_args, repeats = argparse.Namespace(**{**vars(args), "steps": 2, "warmup": 1}), 1
    for repeat in range(repeats):
        order = ("lit_align", "trl") if repeat % 2 == 0 else ("trl", "lit_align")
        for impl in order:
            results[impl].append(worker(impl, case, workdir, run_args))
    ours, theirs = ([r["tokens_per_s"] for r in results[impl]] for impl in ("lit_align", "trl"))
    pairs = list(zip(results["lit_align"], results["trl"]))
    out: dict[str, Any] = {
        "case": case,
        "runs": results,
        "tokens_per_s": {"lit_align": ours, "trl": theirs},
        "speed_ratio": [a / b for a, b in zip(ours, theirs)],
        "memory_ratio": [a["peak_rss_mb"] / max(b["peak_rss_mb"], 1e-9) for a, b in pairs],
        "peak_rss_mb": {impl: statistics.median(r["peak_rss_mb"] for r in results[impl]) for impl in results},
        "threads": sorted({r["threads"] for impl in results for r in results[impl]}),
    }
    if case in COUNTED or case in RECORDED:  # FLOPs actually performed, per run
        out["mfu"] = {impl: [r["flops_per_s"] / peak for r in results[impl]] for impl in results}
        out["mfu_kind"] = "performed"
    else:
        n = matmul_params(model_dir(case, workdir), unembedding=case != "reward")
        rates = out["tokens_per_s"]
        out["mfu"] = {impl: [FLOPS_PER_TOKEN[case] * n * x / peak for x in rates[impl]] for impl in results}
        out["mfu_kind"] = "estimate"
    out["seconds_per_step"] = {impl: [r["seconds_per_step"] for r in results[impl]] for impl in results}
    out["step_ratio"] = [a["seconds_per_step"] / b["seconds_per_step"] for a, b in pairs]
    return out


def format_case(result: dict[str, Any], args: argparse.Namespace) -> str:
    case, ratios, mem = result["case"], result["speed_ratio"], result["memory_ratio"]
    med = statistics.median
    mfu = result["mfu"]
    label = "" if result["mfu_kind"] == "performed" else " est."
    line = (
        f"{CASES[case]:28s} {spread(result['tokens_per_s']['lit_align']):>24s} "
        f"{spread(result['tokens_per_s']['trl']):>24s} {med(ratios):6.2f}x [{min(ratios):.2f}-{max(ratios):.2f}] "
        f"{med(mfu['lit_align']):6.1%}/{med(mfu['trl']):5.1%}{label:5s} "
        f"{result['peak_rss_mb']['lit_align']:.0f}/{result['peak_rss_mb']['trl']:.0f} MB {med(mem):.2f}x"
    )
    if case in ON_POLICY:  # the same work on both sides, so step time is the inverse of the speed ratio
        steps, step_ratios = result["seconds_per_step"], result["step_ratio"]
        line += (
            f"\n{'  ' + case.upper() + ' seconds per step':28s} {med(steps['lit_align']):.3f} s vs "
            f"{med(steps['trl']):.3f} s: step time {med(step_ratios):.2f}x TRL's "
            f"[{min(step_ratios):.2f}-{max(step_ratios):.2f}] "
            f"({args.grpo_prompts} prompts x {args.group_size} completions of {args.completion_length} tokens)"
        )
    return line


def main() -> None:
    args = build_parser().parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.worker:
        run = run_lit_align if args.worker == "lit_align" else run_trl
        print(json.dumps(run(args.cases, Path(args.workdir), args)))
        return

    import lightning
    import transformers
    import trl

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        info = prepare(workdir, args)
        peak = matmul_flops(args.threads)
        print(
            f"# lit_align vs TRL {trl.__version__} | torch {torch.__version__}, lightning {lightning.__version__}, "
            f"transformers {transformers.__version__} | {args.threads} threads, fp32, batch {args.batch_size}, "
            f"max_length {args.max_length}, {args.warmup} warm-up + {args.steps} timed steps, {args.repeats} repeats"
        )
        print(
            f"# Llama hidden {args.hidden}, {args.layers} layers; {info['rows']} HH pairs (prompt = "
            f"{info['prompt_share']:.0%} of TRL's DPO tokens), {info['sft_rows']} SFT rows; fp32 matmul "
            f"{peak / 1e9:.1f} GFLOP/s measured"
        )
        print(f"# {MFU_HEADER}")
        print(
            f"{'case':28s} {'lit_align useful tok/s':>24s} {'TRL useful tok/s':>24s} {'speed ratio':>20s} "
            f"{'MFU ours/TRL':>17s} {'peak memory':>24s}"
        )
        for case in args.cases.split(","):
            print(format_case(run_case(case, workdir, args, peak), args), flush=True)


def matmul_flops(threads: int, size: int = 2048, repeats: int = 5) -> float:
    """The machine's own limit: FLOP/s of a large fp32 matmul with ``threads`` threads (best of ``repeats``)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def matmul_params(path: Path, unembedding: bool = True) -> int:
    """N: parameters that take part in matmuls (every linear layer and, for language models, the unembedding; not
    the embedding; a reward model's scalar head is negligible)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    head_dim = c.hidden_size // c.num_attention_heads
    attention = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    return c.num_hidden_layers * (attention + mlp) + (c.hidden_size * c.vocab_size if unembedding else 0)


if __name__ == "__main__":
    main()
