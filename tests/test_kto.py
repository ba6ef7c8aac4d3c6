"""KTO: the loss against TRL 1.16's ``KTOTrainer`` and by hand, unpaired data (rows, labels, unpaired HH pairs, KL
completions, the collator), the module (step-0 identities, what trains, every reference mode), the shipped config,
and a learnable case."""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import REPO

from lit_align import KTOModule, LoRA, UnpairedDataModule
from lit_align.data import DataError, UnpairedCollator
from lit_align.data.sources import read_records
from lit_align.data.unpaired import attach_kl_completions
from lit_align.forward import response_logps
from lit_align.losses import kto_loss, kto_reference_point

HH = "bundled:hh_rlhf_harmless_base_test_head300.jsonl.gz"


# ----- the loss -------------------------------------------------------------------------------------------------------
def test_kto_loss_by_hand():
    """beta 0.5, lambda_D 1, lambda_U 2. KL completions: log pi - log pi_ref = 0.5 and 0.5, so z_0 = 0.5. Desirable
    completion: r = -1 - (-2) = 1, loss 1 - sigmoid(0.5 (1 - 0.5)) = 1 - sigmoid(0.25) = 0.4378235. Undesirable: r =
    -3 - (-2) = -1, loss 2 (1 - sigmoid(0.5 (0.5 + 1))) = 2 (1 - sigmoid(0.75)) = 0.6416426. Mean over the two
    completions: 0.5397331; rewards beta r: 0.5 and -0.5. A negative KL estimate is clamped to 0."""
    z0 = kto_reference_point(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.5]))
    assert z0.item() == pytest.approx(0.5)
    loss, chosen, rejected = kto_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0]),
                                      torch.tensor([True, False]), z0, beta=0.5, desirable_weight=1.0,
                                      undesirable_weight=2.0)  # fmt: skip
    assert loss.item() == pytest.approx(0.5397331, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.5]) and rejected.tolist() == pytest.approx([-0.5])
    assert kto_reference_point(torch.tensor([-3.0]), torch.tensor([-1.0])).item() == 0.0
    # at the reference (r = 0, z_0 = 0) every completion costs lambda / 2
    loss, _, _ = kto_loss(torch.zeros(3), torch.zeros(3), torch.tensor([True, False, False]), 0.0, 0.1, 1.0, 2.0)
    assert loss.item() == pytest.approx((0.5 + 1.0 + 1.0) / 3)
    with pytest.raises(TypeError, match="booleans"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1, 0]), 0.0)


def _trl_kto(beta, dw, uw, policy, ref, policy_kl, ref_kl, labels):
    """TRL 1.16's ``KTOTrainer._compute_loss`` itself (loss_type ``kto``, with the KL term, precomputed reference
    log-probs) on a stand-in model whose per-token log-probs sum to the given sequence log-probs: the main forward
    (``input_ids`` of zeros) and the KL forward (``KL_input_ids`` of ones) are told apart by their ids."""
    from trl import KTOTrainer

    n, length = len(policy), 4

    class Model:
        training = True

        def __call__(self, **kwargs):
            values = policy_kl if int(kwargs["input_ids"][0, 0]) == 1 else policy
            per_token = torch.zeros(n, length - 1, dtype=values.dtype)
            per_token[:, 1] = values
            zeros = torch.zeros_like(per_token)
            return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)

    trainer = SimpleNamespace(
        model=Model(),
        accelerator=SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x),
        calculate_KL=True,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=dw,
        undesirable_weight=uw,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(trainer, model, batch)
    ones = torch.ones(n, length, dtype=torch.long)
    inputs = {
        "input_ids": torch.zeros(n, length, dtype=torch.long),
        "attention_mask": ones,
        "completion_mask": ones,
        "KL_input_ids": ones.clone(),
        "KL_attention_mask": ones,
        "KL_completion_mask": ones,
        "label": labels,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    loss = KTOTrainer._compute_loss(trainer, trainer.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("labels", ["mixed", "desirable only", "undesirable only"])
@pytest.mark.parametrize("beta, dw, uw", [(0.1, 1.0, 1.0), (0.5, 1.0, 1.33), (2.0, 0.7, 1.5)])
def test_kto_loss_matches_trl(labels, beta, dw, uw):
    """On random fp64 log-probs (with KL estimates both above and below 0, so the clamp is exercised), the loss,
    the reference point and the mean implicit rewards equal TRL's within 1e-6."""
    pytest.importorskip("trl", minversion="1.16")
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        n = 9
        policy, ref = -torch.rand(n, generator=g, dtype=torch.float64) * 50, -torch.rand(n, generator=g).double() * 50
        policy_kl = -torch.rand(n, generator=g, dtype=torch.float64) * 50
        ref_kl = policy_kl + torch.randn(n, generator=g, dtype=torch.float64) * 5 + (2.0 if seed % 2 else -2.0)
        label = {"mixed": torch.rand(n, generator=g) < 0.5, "desirable only": torch.ones(n, dtype=torch.bool),
                 "undesirable only": torch.zeros(n, dtype=torch.bool)}[labels]  # fmt: skip
        if labels == "mixed":
            label[:2] = torch.tensor([True, False])
        expected, metrics = _trl_kto(beta, dw, uw, policy, ref, policy_kl, ref_kl, label)
        z0 = kto_reference_point(policy_kl.double(), ref_kl.double())
        # kto_loss computes in fp32 (as every loss here); compare the fp32 result with TRL's fp64 one
        loss, chosen, rejected = kto_loss(policy, ref, label, z0, beta, dw, uw)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
        assert z0.item() == pytest.approx(metrics["kl"], abs=1e-5)
        if label.any():
            assert chosen.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-5)
        if not label.all():
            assert rejected.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-5)


# ----- data -----------------------------------------------------------------------------------------------------------
def test_collator_exact_tensors():
    """Two examples, KL completions attached (each takes the other's completion), one row per sequence: exactly
    ``prompt + completion`` then ``prompt + KL completion`` per example, in order, right-padded with 0."""
    examples = [
        {"prompt_ids": [1, 2], "completion_ids": [[3, 4]], "labels": [True], "pairs": []},
        {"prompt_ids": [5], "completion_ids": [[6]], "labels": [False], "pairs": []},
    ]
    attach_kl_completions(examples, max_length=10)
    assert [e["response_ids"] for e in examples] == [[[3, 4], [6]], [[6], [3, 4]]]
    batch = UnpairedCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 6, 0], [5, 6, 0, 0], [5, 3, 4, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert batch["completion"].tolist() == [0, 2] and batch["kl"].tolist() == [1, 3]
    assert batch["label"].tolist() == [True, False] and batch["real"].tolist() == [True, True]
    assert batch["target_id"].tolist() == [3, 4, 6, 6, 3, 4]
    assert batch["response_lengths"].tolist() == [2, 1, 1, 2]
    packed = UnpairedCollator(pad_token_id=0, share_prompt=True)(examples)
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4, 6], [5, 6, 3, 4, 0]]
    assert packed["segment_ids"].tolist() == [[0, 0, 1, 1, 2], [0, 1, 2, 2, -1]]


def test_unpaired_hh_pairs_labels_and_mismatched_kl_completions():
    """HH pairs unpaired: each kept row gives a chosen (true) and a rejected (false) completion of its prompt and
    a held-out pair; every KL completion is another example's completion, after this example's prompt, from an
    example whose prompt differs (an HH pair's two halves never pair with each other)."""
    data = UnpairedDataModule(train_data=HH, val_fraction=0.1, max_length=128, max_prompt_length=96)
    data.setup()
    stats, examples = data.stats["train"], data.train_dataset
    assert stats["desirable"] == stats["undesirable"] == len(examples) > 200
    completions = {tuple(c) for e in examples for c in e["completion_ids"]}
    for example in examples:
        assert example["labels"] == [True, False] and example["pairs"] == [(0, 1)]
        kl = example["response_ids"][2:]
        assert len(kl) == 2 and all(tuple(c) in completions or len(c) + len(example["prompt_ids"]) == 128 for c in kl)
        assert kl[0] not in example["completion_ids"]
    val = data.val_dataset
    assert sum(len(e["pairs"]) for e in val) <= len(val) and any(e["pairs"] for e in val)
    # the KL source is the previous example with another prompt (cyclically)
    assert examples[1]["response_ids"][2][:10] == examples[0]["completion_ids"][0][:10]
    with pytest.raises(DataError, match="field 'label'.*unpair: true"):
        UnpairedDataModule(train_data=HH, unpair=False).setup()


def test_unpaired_rows_text_and_chat_and_bad_labels(tmp_path):
    """``{"prompt", "completion", "label"}`` rows, in text and as chat messages; a label that is not a boolean is a
    DataError naming the file, the row and the field (or a counted skip)."""
    rows = [
        {"prompt": "Human: Hi\n\nAssistant:", "completion": " Hello there!", "label": True},
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": "Go away.", "label": False},
        {"prompt": "Human: Name a colour.\n\nAssistant:", "completion": " Blue.", "label": True},
    ]
    data = UnpairedDataModule(train_data=rows, val_fraction=0.0, max_length=64)
    data.setup()
    assert [e["labels"] for e in data.train_dataset] == [[True], [False], [True]]
    chat = data.train_dataset[1]
    rendered = data.tokenizer.apply_chat_template(rows[1]["prompt"], tokenize=False, add_generation_prompt=True)
    assert chat["prompt_ids"] == data.tokenizer(rendered, add_special_tokens=False).input_ids
    assert all(e["response_ids"][1] != e["completion_ids"][0] for e in data.train_dataset)

    path = tmp_path / "unpaired.jsonl"
    bad = [rows[0], {**rows[2], "label": "yes"}, {**rows[2], "label": 1}, {"prompt": "p", "completion": "c"}]
    path.write_text("\n".join(json.dumps(r) for r in bad) + "\n")
    with pytest.raises(DataError, match=rf"{path.name}, row 2, field 'label': must be a boolean .*'yes'"):
        UnpairedDataModule(train_data=str(path), val_fraction=0.0).setup()
    skipping = UnpairedDataModule(train_data=str(path), val_fraction=0.0, bad_rows="skip")
    skipping.setup()
    assert skipping.stats["train"]["skipped_bad_row"] == 3 and len(skipping.train_dataset) == 1


# ----- the module -----------------------------------------------------------------------------------------------------
def make_data(module, rows=12, batch_size=3, **kwargs):
    records = [r.row for r in read_records(HH)[:rows]]
    kwargs = {"share_prompt": True, "max_length": 128, "max_prompt_length": 96, "val_fraction": 0.0, **kwargs}
    return UnpairedDataModule(module.tokenizer, records, batch_size=batch_size, **kwargs)


def make_trainer(tmp_path, callbacks=(), **kwargs):
    defaults = dict(default_root_dir=tmp_path, max_steps=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    num_sanity_val_steps=0)  # fmt: skip
    return L.Trainer(callbacks=list(callbacks), **{**defaults, **kwargs})


class Steps(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.kl: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.kl.append(float(trainer.callback_metrics["train/kl_step"]))


@pytest.mark.parametrize("reference", ["copy", "precomputed", "adapter"])
def test_step0_identities_then_policy_trains_and_reference_does_not(tmp_path, reference):
    """At step 0 the policy is the reference: every implicit reward and the reference point are 0, so each
    completion costs lambda / 2 (here (1 / 2 + 2 / 2) / 2 = 0.75 with as many desirable as undesirable). Then the
    policy moves and the reference (a copy, the cache, or the adapter-free base) does not."""
    lora = LoRA(r=4, alpha=8, dropout=0.0) if reference == "adapter" else None
    module = KTOModule(lr=1e-2, reference=reference, lora=lora, undesirable_weight=2.0,
                       ref_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    steps = Steps()
    make_trainer(tmp_path, [steps]).fit(module, make_data(module))
    assert steps.losses[0] == pytest.approx(0.75, abs=1e-6) and steps.kl[0] == 0.0
    assert steps.losses[1] != pytest.approx(0.75, abs=1e-4)
    data = make_data(module)
    data.setup()
    batch = data.collator(data.train_dataset[:3])
    with torch.no_grad():
        policy = response_logps(module.model, batch)
        if reference == "copy":
            assert module.ref_model is not None and not any(p.requires_grad for p in module.ref_model.parameters())
            fresh = KTOModule(lr=1e-2)
            fresh.configure_model()
            assert torch.allclose(response_logps(module.ref_model, batch), response_logps(fresh.model, batch))
        elif reference == "precomputed":
            assert module.ref_model is None and list((tmp_path / "cache").glob("*.pt"))
        live_ref = module.reference_logps(batch) if reference != "precomputed" else None
    assert live_ref is None or not torch.allclose(policy, live_ref)


def test_precomputed_reference_log_probs_equal_the_live_ones(tmp_path):
    """The cached reference log-probs of every completion and KL completion equal the live copy's."""
    module = KTOModule(lr=1e-2, reference="precomputed", ref_cache_dir=str(tmp_path / "cache"))
    data = make_data(module)
    make_trainer(tmp_path, max_steps=1).fit(module, data)
    batch = data.collator(data.train_dataset[:4])
    copy = KTOModule(lr=1e-2)
    copy.configure_model()
    with torch.no_grad():
        assert torch.allclose(batch["ref_logps"], response_logps(copy.model, batch), atol=1e-5)


def test_validation_reports_pair_accuracy_and_the_metrics(tmp_path):
    """Held-out unpaired HH pairs give ``val/rewards/accuracies`` (0 at step 0: every reward is 0, no chosen is
    above its rejected), and every metric TRL logs is there."""
    module = KTOModule(lr=1e-2)
    data = make_data(module, rows=16, val_fraction=0.25)
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=None)
    metrics = trainer.validate(module, data, verbose=False)[0]
    assert metrics["val/rewards/accuracies"] == 0.0 and metrics["val/kl"] == 0.0
    assert set(metrics) == {"val/loss", "val/kl", "val/rewards/chosen", "val/rewards/rejected", "val/logps/chosen",
                            "val/logps/rejected", "val/rewards/accuracies"}  # fmt: skip
    trainer.fit(module, data)
    logged = set(trainer.callback_metrics)
    assert {"train/loss", "train/kl_step", "train/rewards/chosen_step", "train/rewards/rejected_step",
            "train/logps/chosen_step", "train/logps/rejected_step", "train/rewards/chosen_epoch"} <= logged  # fmt: skip


@pytest.mark.parametrize("kwargs, match", [
    ({"beta": 0.0}, "beta"), ({"desirable_weight": -1.0}, "desirable_weight"), ({"reference": "none"}, "reference"),
    ({"reference": "adapter"}, "LoRA"), ({"ref_model": "tiny", "reference": "adapter"}, "ref_model"),
])  # fmt: skip
def test_inconsistent_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KTOModule(**kwargs)


def test_kto_config_trains_and_exports(tmp_path):
    """``lit-align fit -c configs/kto.yaml`` (the tiny preset, bundled HH pairs unpaired) for two steps."""
    from lit_align.cli import run

    cli = run(["fit", "-c", str(REPO / "configs" / "kto.yaml"), f"--trainer.default_root_dir={tmp_path}",
               f"--model.export_dir={tmp_path / 'export'}", "--trainer.max_steps", "2", "--trainer.limit_val_batches",
               "1", "--trainer.enable_progress_bar", "false", "--data.init_args.max_length", "128",
               "--data.init_args.max_prompt_length", "96", "--data.init_args.batch_size", "4"])  # fmt: skip
    assert cli.trainer.global_step == 2 and isinstance(cli.datamodule, UnpairedDataModule)
    assert cli.datamodule.stats["train"]["desirable"] > 200
    assert (tmp_path / "export" / "model.safetensors").exists()


# ----- a learnable case -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kto_on_unpaired_hh_raises_held_out_pair_accuracy(tmp_path):
    """KTO on bundled HH pairs turned into unpaired completions raises the held-out implicit-reward accuracy on the
    held-out pairs (chosen's ``beta (log pi - log pi_ref)`` above rejected's) from 0 at step 0 (every reward 0, no
    chosen strictly above its rejected) to above chance in one epoch: measured 0.576 on 59 held-out pairs."""
    start = time.time()
    L.seed_everything(0)
    module = KTOModule(lr=1e-2, beta=0.1)
    data = UnpairedDataModule(module.tokenizer, HH, val_fraction=0.2, max_length=64, max_prompt_length=48,
                              share_prompt=True, batch_size=4, group_by_length=True)  # fmt: skip
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=1, limit_val_batches=None)
    before = trainer.validate(module, data, verbose=False)[0]["val/rewards/accuracies"]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]["val/rewards/accuracies"]
    print(f"KTO held-out pair accuracy {before:.3f} -> {after:.3f} in {time.time() - start:.1f} s")
    assert before == 0.0 and after > 0.55 and not math.isnan(after)
