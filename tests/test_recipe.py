"""``lit-align recipe``: the stages chained through their exports, held-out metrics before and after each, the
evaluation of every policy on the same held-out prompts, the report, and the skipping of finished stages. Runs the
real method configs in ``configs/`` on the tiny model at a smaller size (few batches, short samples)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lit_align.evaluate import completion_logps, win_rate
from lit_align.recipe import Recipe, RecipeError, main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

SMALL = {"trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "limit_test_batches": 1,
                     "enable_checkpointing": False}}  # fmt: skip


def small_recipe(tmp_path: Path, stages: tuple[str, ...] = ("sft", "reward", "ppo", "dpo", "grpo")) -> Path:
    """configs/recipe.yaml's stages at a test size, written beside the repo's configs (paths absolute)."""
    full = yaml.safe_load((CONFIGS / "recipe.yaml").read_text())
    spec = {"root": str(tmp_path / "runs"), "model": "tiny", "stages": {}, "evaluation": full["evaluation"]}
    for name in stages:
        entry = dict(full["stages"][name])
        entry["config"] = str(CONFIGS / entry["config"])
        overrides = yaml.safe_load(yaml.safe_dump(entry.get("overrides") or {}))
        for key, value in SMALL.items():
            overrides.setdefault(key, {}).update(value)
        if name in ("ppo", "grpo"):
            overrides.setdefault("model", {}).setdefault("init_args", {}).update(max_new_tokens=8)
        if name == "grpo":
            overrides["model"]["init_args"].update(group_size=2)
        entry["overrides"] = overrides
        spec["stages"][name] = entry
    spec["evaluation"].update(num_prompts=4, max_new_tokens=8)
    if not {"sft", "reward"} <= set(stages):
        del spec["evaluation"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.slow
def test_recipe_runs_every_stage_writes_the_report_and_skips_finished_stages(tmp_path, capsys):
    """configs/recipe.yaml's stages (SFT -> reward -> PPO and GRPO with that reward model, DPO) at a small size:
    every export loads, each stage recorded its held-out metrics before and after (also printed), the evaluation
    covers every policy, report.md and its PNGs exist and load, and a second run redoes nothing; ``--rerun sft``
    redoes SFT (to the same weights: the stages reading them stay done); a changed SFT stage re-runs and makes the
    stages reading its export out of date; ``--stages dpo`` then runs DPO alone."""
    import matplotlib.image
    from transformers import AutoModelForCausalLM

    from lit_align import RewardScorer

    path = small_recipe(tmp_path)
    assert main(["-c", str(path)]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "runs"
    policies = ("sft", "ppo", "dpo", "grpo")
    for name in policies:
        AutoModelForCausalLM.from_pretrained(root / name / "export")
    RewardScorer.from_pretrained(root / "reward" / "export")
    records = {n: json.loads((root / n / "stage.json").read_text()) for n in ("sft", "reward", *policies[1:])}
    assert records["sft"]["before"]["test/loss"] > records["sft"]["after"]["test/loss"]  # SFT lowers held-out loss
    assert records["ppo"]["before"]["test/kl"] == 0.0  # the policy starts as its reference
    assert records["dpo"]["before"]["test/loss"] == pytest.approx(0.6931, abs=1e-3)  # ln 2 at step 0
    # the PPO stage read the reward stage's export, the DPO stage started from SFT's
    assert str(root / "reward" / "export") in (root / "ppo" / "recipe.yaml").read_text()
    assert str(root / "sft" / "export") in (root / "dpo" / "recipe.yaml").read_text()
    assert str(root / "reward" / "export") in (root / "grpo" / "recipe.yaml").read_text()
    sft_loss = records["sft"]["before"]["test/loss"], records["sft"]["after"]["test/loss"]
    assert f"test/loss {sft_loss[0]:.4g} -> {sft_loss[1]:.4g}" in out  # the before -> after line in the terminal
    for name in records:
        assert f"] {name}: finished in" in out
    evaluation = json.loads((root / "evaluation.json").read_text())
    assert list(evaluation["policies"]) == ["start", *policies]
    sft = evaluation["policies"]["sft"]
    assert sft["kl"] == pytest.approx(0.0, abs=1e-5) and sft["win_rate"] == 0.5  # the baseline against itself
    assert all(len(p["samples"]) == 4 and "accuracy" in p for p in evaluation["policies"].values())
    report = (root / "report" / "report.md").read_text()
    for name in (*records, "evaluation"):
        png = root / "report" / f"{name}.png"
        assert matplotlib.image.imread(png).shape[0] > 100
        assert f"({name}.png)" in report
    assert "test/loss" in report and "win_rate" in report
    assert "held-out evaluation" in out  # the final summary table

    mtime = (root / "sft" / "export" / "model.safetensors").stat().st_mtime_ns
    assert main(["-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 5 and "evaluation: unchanged" in out
    assert (root / "sft" / "export" / "model.safetensors").stat().st_mtime_ns == mtime

    assert main(["-c", str(path), "--rerun", "sft", "--stages", "sft", "--no_eval"]) == 0
    assert "] sft: finished in" in capsys.readouterr().out
    recipe = Recipe(path)  # seeded: the same SFT weights again, so what reads them is still up to date
    assert all(recipe.finished(n) for n in recipe.stages)

    spec = yaml.safe_load(path.read_text())  # a changed SFT stage: re-run, and what reads its export is out of date
    spec["stages"]["sft"]["overrides"]["trainer"]["limit_train_batches"] = 3
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    assert main(["-c", str(path), "--stages", "sft", "--no_eval"]) == 0
    assert "] sft: finished in" in capsys.readouterr().out
    assert (root / "sft" / "export" / "model.safetensors").stat().st_mtime_ns != mtime
    recipe = Recipe(path)
    assert [n for n in recipe.stages if not recipe.finished(n)] == ["reward", "ppo", "dpo", "grpo"]
    assert main(["-c", str(path), "--stages", "dpo", "--no_eval"]) == 0  # dpo alone: its upstream is done
    assert "] dpo: finished in" in capsys.readouterr().out


def test_failed_stage_names_itself_and_its_logs(tmp_path, capsys):
    """A stage that fails stops the recipe with its name, the error and where its traceback and logs are."""
    path = small_recipe(tmp_path, ("sft",))
    spec = yaml.safe_load(path.read_text())
    spec["stages"]["sft"]["overrides"]["data"] = {"init_args": {"train_data": str(tmp_path / "missing.jsonl")}}
    path.write_text(yaml.safe_dump(spec))
    assert main(["-c", str(path), "--no_eval"]) == 1
    captured = capsys.readouterr()
    assert "[1/1] sft FAILED" in captured.out and "stage 'sft' failed" in captured.err
    assert (tmp_path / "runs" / "sft" / "error.log").is_file()
    assert not (tmp_path / "runs" / "sft" / "stage.json").exists()


SFT = {"config": str(CONFIGS / "sft.yaml")}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stagez": {}}, "unknown key stagez"),
        ({"stages": {"ppo": {"config": str(CONFIGS / "ppo.yaml"), "init": "sft"}}}, "'sft' is not an earlier stage"),
        ({"stages": {"sft": {"config": "no_such.yaml"}}}, "stages.sft.config"),
        ({"stages": {"sft": {**SFT, "overide": {}}}}, "unknown key stages.sft.overide"),
        ({"stages": {"sft": SFT}, "evaluation": {"reward_model": "rm"}}, "evaluation.reward_model"),
        ({"stages": {"report": SFT}}, "stage name 'report'"),
        (
            {"stages": {"sft": {**SFT, "overrides": {"model": {"init_args": {"export_dir": "x"}}}}}},
            "sets model.init_args.export_dir, which the recipe sets",
        ),
    ],
)
def test_recipe_file_errors_name_the_file_and_key(tmp_path, change, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": {"sft": SFT}, **change}))
    with pytest.raises(RecipeError, match=message) as error:
        Recipe(bad)
    assert str(bad) in str(error.value)


def test_shipped_recipe_parses_and_wires_exports():
    """configs/recipe.yaml: every stage's config exists, and the overrides chain each stage to its upstream export."""
    recipe = Recipe(CONFIGS / "recipe.yaml", root="/tmp/r")
    assert list(recipe.stages) == ["sft", "reward", "ppo", "dpo", "grpo"]
    ppo = recipe.stage_overrides(recipe.stages["ppo"])["model"]["init_args"]
    assert ppo["model"] == "/tmp/r/sft/export" and ppo["reward_model"] == "/tmp/r/reward/export"
    assert ppo["export_dir"] == "/tmp/r/ppo/export"


def test_win_rate_counts_ties_half():
    """Outcomes 1, 0.5, 0, 1: mean 0.625, standard error std([1, .5, 0, 1]) / 2 = 0.4787 / 2."""
    rate, se = win_rate(torch.tensor([1.0, 0.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 3.0, 1.0]))
    assert rate == pytest.approx(0.625) and se == pytest.approx(0.478714 / 2, abs=1e-5)
    with pytest.raises(ValueError):
        win_rate(torch.tensor([1.0]), torch.tensor([1.0, 2.0]))


def test_completion_logps_equal_the_sum_of_next_token_log_probs():
    """Checked against a plain forward of each sequence alone (no padding), summed by hand."""
    from lit_align.models import load_causal_lm

    model = load_causal_lm("tiny").eval()
    prompts, completions = [[1, 5, 9], [1, 7]], [[4, 4, 2], [3]]
    got = completion_logps(model, prompts, completions, batch_size=2)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([p + c])
        logps = torch.log_softmax(model(ids).logits[0].float(), -1)
        expected = sum(logps[len(p) - 1 + t, tok] for t, tok in enumerate(c))
        assert got[i].item() == pytest.approx(expected.item(), abs=1e-4)


def test_evaluation_samples_keep_the_stop_token_the_policy_chose():
    """``generate_ids(keep_stop=True)``: the KL is over the sequence the policy sampled, its EOS included; cut there
    (not at max_new_tokens), the completions equal the ones without it plus that token."""
    from lit_align.generate import generate_ids, stop_token_ids
    from lit_align.models import load_causal_lm, load_tokenizer

    model, tokenizer = load_causal_lm("tiny").eval(), load_tokenizer("tiny")
    bias = torch.zeros(model.config.vocab_size)
    bias[tokenizer.eos_token_id] = 6.0  # EOS likely, so that some samples stop early and some do not
    model.lm_head.bias = torch.nn.Parameter(bias)
    prompts = [[tokenizer.bos_token_id, 40 + i] for i in range(8)]
    kept = generate_ids(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0, keep_stop=True)
    cut = generate_ids(model, tokenizer, prompts, max_new_tokens=6, temperature=1.0)
    stops = stop_token_ids(tokenizer)
    stopped = [k[0][-1] in stops for k in kept if k[0]]
    assert any(stopped) and not all(stopped), kept
    for k, c in zip(kept, cut):
        assert k[0] == (c[0] + [k[0][-1]] if k[0] and k[0][-1] in stops else c[0])
