"""Reliability, shown as figures (``pytest -m reliability``): bad input, exact resume after a real kill, numerical
guards, and safe loading. Each check feeds the summary line printed at the end of the session."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_align import DPOModule, InstructionDataModule, PreferenceDataModule, SFTModule
from lit_align.data import DataError

pytestmark = pytest.mark.reliability

GOOD_INSTRUCTION = {"prompt": "Say hi.", "completion": "Hi."}
GOOD_PREFERENCE = {"prompt": "Say hi.", "chosen": "Hi there.", "rejected": "Go away."}
MILLION = "a" * 1_000_000

# (name, row, the field the error must name); rows are written to a JSONL file after one good row.
BAD_INSTRUCTION_ROWS = [
    ("missing field", {"instruction": "Do it."}, None),
    ("None", {"prompt": None, "completion": "x"}, "prompt"),
    ("non-string", {"prompt": 5, "completion": "x"}, "prompt"),
    ("unknown chat role", {"messages": [{"role": "wizard", "content": "x"}, {"role": "assistant", "content": "y"}]},
     "messages[0].role"),
    ("non-alternating turns", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                            {"role": "assistant", "content": "c"}]}, "messages[1].role"),
    ("lone surrogate", {"prompt": "bad \ud800 text", "completion": "x"}, "prompt"),
    ("NUL character", {"prompt": "a\x00b", "completion": "x"}, "prompt"),
    ("one-million-character example", {"prompt": MILLION, "completion": "x"}, "prompt"),
    ("not an object", ["prompt", "completion"], None),
]  # fmt: skip
BAD_PREFERENCE_ROWS = [
    ("missing field", {"prompt": "p", "chosen": "a"}, "rejected"),
    ("None", {"prompt": "p", "chosen": None, "rejected": "b"}, "chosen"),
    ("non-string", {"prompt": "p", "chosen": 5, "rejected": "b"}, "chosen"),
    ("unknown chat role", {"prompt": [{"role": "wizard", "content": "p"}], "chosen": "a", "rejected": "b"},
     "prompt[0].role"),
    ("lone surrogate", {"prompt": "p", "chosen": "a\udfff", "rejected": "b"}, "chosen"),
    ("NUL character", {"prompt": "p\x00", "chosen": "a", "rejected": "b"}, "prompt"),
    ("one-million-character example", {"prompt": "p", "chosen": MILLION, "rejected": "b"}, "chosen"),
    ("ranking not a permutation", {"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}, "ranking"),
]  # fmt: skip


def _write(path: Path, good: dict, bad, raw_line: str | None = None) -> Path:
    lines = [json.dumps(good), raw_line if raw_line is not None else json.dumps(bad)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    return path


def _check_bad_row(make, path: Path, field: str | None, reliability) -> None:
    reliability["bad_inputs"] += 1
    with pytest.raises(DataError) as error:
        make(path, "error").setup()
    message = str(error.value)
    assert f"{path}, row 2" in message
    assert field is None or f"field {field!r}" in message
    reliability["named_errors"] += 1
    skipping = make(path, "skip")
    skipping.setup()
    assert skipping.stats["train"]["skipped_bad_row"] == 1 and skipping.stats["train"]["examples"] == 1
    reliability["counted_skips"] += 1


@pytest.mark.parametrize("name, row, field", BAD_INSTRUCTION_ROWS, ids=[c[0] for c in BAD_INSTRUCTION_ROWS])
def test_bad_instruction_rows(tmp_path, tiny_tokenizer, reliability, name, row, field):
    def make(path, bad_rows):
        return InstructionDataModule(tiny_tokenizer, str(path), val_fraction=0.0, bad_rows=bad_rows)

    _check_bad_row(make, _write(tmp_path / "data.jsonl", GOOD_INSTRUCTION, row), field, reliability)


@pytest.mark.parametrize("name, row, field", BAD_PREFERENCE_ROWS, ids=[c[0] for c in BAD_PREFERENCE_ROWS])
def test_bad_preference_rows(tmp_path, tiny_tokenizer, reliability, name, row, field):
    def make(path, bad_rows):
        return PreferenceDataModule(tiny_tokenizer, str(path), val_fraction=0.0, bad_rows=bad_rows)

    _check_bad_row(make, _write(tmp_path / "data.jsonl", GOOD_PREFERENCE, row), field, reliability)


def test_invalid_json_line(tmp_path, tiny_tokenizer, reliability):
    def make(path, bad_rows):
        return InstructionDataModule(tiny_tokenizer, str(path), val_fraction=0.0, bad_rows=bad_rows)

    _check_bad_row(make, _write(tmp_path / "data.jsonl", GOOD_INSTRUCTION, None, '{"prompt": "x", '), None, reliability)


def test_no_bad_row_reaches_the_loss(tmp_path, tiny_tokenizer, reliability):
    """A file mixing good rows with every kind of bad one trains with finite losses on the good rows only."""
    rows = [GOOD_PREFERENCE] * 4 + [row for _, row, _ in BAD_PREFERENCE_ROWS]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8", errors="surrogatepass")
    module = DPOModule(lr=1e-2)
    data = PreferenceDataModule(module.tokenizer, str(path), val_fraction=0.0, bad_rows="skip", batch_size=2)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              callbacks=[Record()]).fit(module, data)  # fmt: skip
    assert data.stats["train"]["skipped_bad_row"] == len(BAD_PREFERENCE_ROWS)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    reliability["faults"] += 1
    reliability["survived"] += 1


# ----- exact resume after a real kill ---------------------------------------------------------------------------------
WORKER = Path(__file__).with_name("resume_worker.py")


def _train(tmp_path: Path, name: str, method: str, kill_at: int = -1, resume: Path | None = None) -> int:
    """Run the worker (on two ranks, through torchrun, for a ``method@strategy``); its return code."""
    ranks = 2 if "@" in method else 1
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*(launcher if ranks > 1 else [sys.executable]), str(WORKER), str(tmp_path / f"{name}.jsonl"),
               str(tmp_path / f"ckpt-{name}"), str(kill_at), method, *([str(resume)] if resume else [])]  # fmt: skip
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    try:
        return process.wait(timeout=300)
    except subprocess.TimeoutExpired:  # a hang is a failure: kill every rank
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"{method} hung")


def _records(path: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if "step" in r], next(r for r in rows if "final_weights" in r)


def _rank_files(path: Path, method: str) -> list[Path]:
    return [path, path.with_name(f"{path.name}.rank1")] if "@" in method else [path]


RESUMED_METHODS = ("sft", "kto", "online_dpo", "distill", "ppo", "grpo", "sft+val", "grpo+val", "sft@fsdp2",
                   "dpo@fsdp2", "grpo@fsdp2", "sft@ddp")  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    runs = {}
    for method in RESUMED_METHODS:
        assert _train(tmp, method, method) == 0
        runs[method] = [_records(path) for path in _rank_files(tmp / f"{method}.jsonl", method)]
    return runs


# Plain mid-epoch kills of SFT, DPO and GRPO are the "+val" and "@" cases' kills without the validation or the second
# rank, so they are not run again on their own (CI time): each of those asserts the same records and weights.
@pytest.mark.slow
@pytest.mark.parametrize(
    "method, kill_at",
    [("sft", 6), ("kto", 3), ("online_dpo", 4), ("distill", 4), ("ppo", 6), ("ppo", 12), ("grpo", 11),
     ("sft+val", 3), ("grpo+val", 4), ("sft@fsdp2", 3),
     ("dpo@fsdp2", 3), ("grpo@fsdp2", 3), ("sft@ddp", 3)],
    ids=[
        "sft at the epoch boundary",
        "kto mid-epoch",
        "online dpo mid-epoch (sampled pairs)",
        "distillation mid-epoch (sampled, lmbda draws)",
        "ppo mid-epoch",
        "ppo at the epoch boundary",
        "grpo at the epoch boundary",
        "sft mid-epoch after a validation (dropout)",
        "grpo mid-epoch after a validation (sampled)",
        "sft on 2 ranks under FSDP2 (distributed checkpoints)",
        "dpo on 2 ranks under FSDP2",
        "grpo on 2 ranks under FSDP2",
        "sft on 2 ranks under DDP (one checkpoint file)",
    ],
)  # fmt: skip
def test_killed_run_resumes_exactly(tmp_path, uninterrupted, reliability, method, kill_at):
    """SIGKILL before step ``kill_at + 1``; resume from the last checkpoint. Every step's batch fingerprint, loss and
    learning rate, and the final weights, equal the uninterrupted run's bit for bit (the SFT run has residual
    dropout and PPO samples its responses, so the RNG streams must come back too; PPO's adaptive KL coefficient is
    compared at every step; GRPO samples groups). PPO counts two optimizer steps per rollout batch, GRPO two per
    batch of four prompts and one for the epoch's last batch of two (11 steps an epoch). The ``+val`` runs validate
    after every training batch, after its checkpoint: the killed run validated, the resumed one does not, and
    neither the dropout masks nor GRPO's samples may notice. The ``@`` runs train on two ranks (torchrun), every
    rank killed at the same step: each rank's record, and the gathered final weights, must match."""
    code = _train(tmp_path, "run", method, kill_at=kill_at)
    assert code == -9 if "@" not in method else code != 0  # killed, not a clean stop (torchrun reports failure)
    files = _rank_files(tmp_path / "run.jsonl", method)
    for path in files:
        assert json.loads(path.read_text().splitlines()[-1])["step"] == kill_at
    assert _train(tmp_path, "run", method, resume=tmp_path / "ckpt-run" / f"step={kill_at}.ckpt") == 0
    reliability["resumes"] += 1
    for path, (expected, expected_final) in zip(files, uninterrupted[method], strict=True):
        resumed, final = _records(path)
        seen = Counter(r["batch"] + str(r["epoch"]) for r in resumed)
        wanted = Counter(r["batch"] + str(r["epoch"]) for r in expected)
        reliability["batches_lost"] += sum((wanted - seen).values())
        reliability["batches_duplicated"] += sum((seen - wanted).values())
        assert resumed == expected
        assert final == expected_final
    reliability["faults"] += 1
    reliability["survived"] += 1


# ----- numerical guards -----------------------------------------------------------------------------------------------
class PoisonedSFT(SFTModule):
    """Returns a NaN loss at the given global steps."""

    def __init__(self, *args, poison_steps=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.poison_steps = set(poison_steps)

    def compute_loss(self, batch):
        loss, correct, n = super().compute_loss(batch)
        if self.trainer.global_step in self.poison_steps:
            loss = loss * float("nan")
        return loss, correct, n


def _sft_data(module, rows=24):
    from lit_align.data.sources import read_records

    records = [r.row for r in read_records("bundled:self_instruct_seed_tasks.jsonl")[:rows]]
    return InstructionDataModule(module.tokenizer, records, val_fraction=0.0, max_length=96, batch_size=4)


def _trainer(**kwargs):
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, **kwargs)  # fmt: skip


def test_nonfinite_step_is_skipped_without_touching_weights_or_optimizer(reliability):
    module = PoisonedSFT(lr=1e-2, poison_steps={1})
    data = _sft_data(module)
    snapshots = []

    class Snap(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state = trainer.optimizers[0].state
            steps = sorted({int(s["step"]) for s in state.values()}) if state else []
            snapshots.append(({k: v.clone() for k, v in pl_module.model.state_dict().items()}, steps))

    with pytest.warns(UserWarning, match=r"non-finite loss at step 1 \(epoch 0, batch 1, fingerprint [0-9a-f]+\)"):
        _trainer(max_steps=3, callbacks=[Snap()]).fit(module, data)
    (w0, s0), (w1, s1), (w2, s2) = snapshots
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # the poisoned step changed nothing
    assert s0 == s1 == [1] and s2 == [2]  # AdamW's step count did not advance either
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)  # the next step trains normally
    assert module.nonfinite_steps == 1
    reliability["faults"] += 1
    reliability["survived"] += 1


def test_too_many_nonfinite_steps_stop_training_naming_step_and_batch(reliability):
    module = PoisonedSFT(lr=1e-2, poison_steps={0, 1, 2, 3}, max_nonfinite_steps=2)
    expected = r"non-finite loss at step 2 \(epoch 0, batch 2, .*3 steps skipped"
    with pytest.warns(UserWarning), pytest.raises(FloatingPointError, match=expected):
        _trainer(max_steps=6).fit(module, _sft_data(module))
    assert module.nonfinite_steps == 3
    reliability["faults"] += 1
    reliability["survived"] += 1  # stopped with a message instead of training on NaN


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_losses_are_fp32_under_autocast(precision):
    """The DPO loss under CPU autocast in bf16 and in fp16 (autocast directly, no Lightning precision plugin)."""
    module = DPOModule()
    data = PreferenceDataModule(module.tokenizer, val_fraction=0.0, max_length=128, share_prompt=True, batch_size=4)
    data.setup()
    module.configure_model()
    batch = data.collator(data.train_dataset[:4])
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    with torch.autocast("cpu", dtype=dtype):
        loss, values = module.compute_loss(batch)
    assert loss.dtype == torch.float32 and values["logps/chosen"].dtype == torch.float32
    assert math.isfinite(float(loss.detach()))


# ----- option combinations checked when the module is built ---------------------------------------------------------
BAD_OPTIONS = [
    ("exo_pair without label smoothing", "DPOModule", {"loss_type": "exo_pair"}, "label_smoothing"),
    ("label smoothing a loss ignores", "DPOModule", {"loss_type": "hinge", "label_smoothing": 0.1}, "label_smoothing"),
    ("robust at label smoothing 0.5", "DPOModule", {"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
    ("beta 0", "DPOModule", {"beta": 0.0}, "beta"),
    ("a reference model that is never used", "DPOModule", {"loss_type": "simpo", "ref_model": "tiny"}, "ref_model"),
    ("learning rate 0", "SFTModule", {"lr": 0.0}, "lr"),
    ("unknown dtype", "SFTModule", {"dtype": "fp8"}, "dtype"),
    ("temperature 0", "PPOModule", {"temperature": 0.0}, "temperature"),
    ("top_p above 1", "PPOModule", {"top_p": 1.5}, "top_p"),
    ("GAE lambda above 1", "PPOModule", {"lam": 1.5}, "lam"),
    ("adaptive KL without a target", "PPOModule", {"adaptive_kl": True, "kl_target": 0.0}, "kl_target"),
    ("GRPO clip 0", "GRPOModule", {"clip_eps": 0.0}, "clip_eps"),
    ("GRPO negative KL coefficient", "GRPOModule", {"kl_coef": -0.1}, "kl_coef"),
]  # fmt: skip


@pytest.mark.parametrize("name, module, options, option", BAD_OPTIONS, ids=[c[0] for c in BAD_OPTIONS])
def test_bad_option_combinations_fail_when_the_module_is_built(reliability, name, module, options, option):
    """Not at the first training step (DPO with exo_pair and no label smoothing used to get that far)."""
    import lit_align
    from lit_align.rewards import LengthReward

    extra = {"reward_fn": LengthReward()} if module in ("GRPOModule", "PPOModule") else {}
    reliability["bad_inputs"] += 1
    with pytest.raises(ValueError, match=option):
        getattr(lit_align, module)(**{**extra, **options})
    reliability["named_errors"] += 1
