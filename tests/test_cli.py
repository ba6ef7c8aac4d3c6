"""The real LightningCLI: every shipped config parses, the SFT config trains, overrides and subclasses work."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from lit_align.cli import run
from lit_align.modules.base import AlignModule

# the method configs (recipe.yaml is the recipe command's: tests/test_recipe.py parses it and runs its stages)
CONFIGS = sorted(c for c in (REPO / "configs").glob("*.yaml") if c.name != "recipe.yaml")
QUICK = ["--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]


def _fit(config: str, tmp_path: Path, *overrides: str):
    """``lit-align fit -c configs/<config>`` writing under ``tmp_path`` and exporting to ``tmp_path / "export"``."""
    return run(
        ["fit", "-c", str(REPO / "configs" / config), f"--trainer.default_root_dir={tmp_path}",
         f"--model.export_dir={tmp_path / 'export'}", *overrides]
    )  # fmt: skip


def test_there_are_configs():
    assert any(c.name == "sft.yaml" for c in CONFIGS)


def needs_its_engine(config: Path) -> None:
    """A config that samples with vLLM needs vLLM installed (CI installs it; a plain install does not)."""
    if "vllm" in config.stem:
        pytest.importorskip("vllm")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_and_instantiates(config, tmp_path):
    needs_its_engine(config)
    cli = run(["-c", str(config), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.model, AlignModule)
    assert cli.datamodule.tokenizer is cli.model.tokenizer  # linked: set once, on the model


STRATEGIES = sorted((REPO / "configs" / "strategies").glob("*.yaml"))


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda p: p.stem)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_strategy_config_combines_with_every_method_config(config, strategy, tmp_path, capsys):
    """``-c configs/<method>.yaml -c configs/strategies/<strategy>.yaml``: the CPU ones instantiate here (on a CPU
    they run with ``--trainer.accelerator cpu``); the DeepSpeed ones need a GPU and are checked as parsed YAML."""
    needs_its_engine(config)
    args = ["-c", str(config), "-c", str(strategy), f"--trainer.default_root_dir={tmp_path}"]
    if "deepspeed" in strategy.stem:
        with pytest.raises(SystemExit) as exit_info:
            run(["fit", *args, "--print_config"])
        assert exit_info.value.code == 0
        assert yaml.safe_load(capsys.readouterr().out)["trainer"]["strategy"].startswith("deepspeed_stage_")
        return
    cli = run([*args, "--trainer.accelerator", "cpu"], run=False)
    assert type(cli.trainer.strategy).__name__ in ("DDPStrategy", "FSDP2Strategy")
    assert isinstance(cli.model, AlignModule)


def test_print_config_is_complete_yaml(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "-c", str(REPO / "configs" / "sft.yaml"), "--model.lr", "1e-4", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "lit_align.SFTModule"
    assert config["model"]["init_args"]["lr"] == 1e-4
    assert config["model"]["init_args"]["optimizer"]["init_args"]["betas"] == [0.9, 0.95]
    assert config["data"]["init_args"]["max_length"] == 512
    assert "tokenizer" not in config["data"]["init_args"]  # follows the model
    assert {"trainer", "model", "data", "seed_everything"} <= set(config)


def test_sft_config_trains_checkpoints_and_exports(tmp_path):
    cli = _fit(
        "sft.yaml",
        tmp_path,
        "--model.lr",
        "1e-3",
        *QUICK,
    )
    assert cli.trainer.global_step == 3
    assert cli.model.hparams.lr == 1e-3
    assert list(tmp_path.rglob("*.ckpt")) and (tmp_path / "export" / "model.safetensors").exists()


def test_user_subclass_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("LIT_ALIGN_ALLOWED_IMPORTS", "custom_module")  # the user's own code, allowed explicitly
    cli = run(
        [
            "fit",
            "-c",
            str(REPO / "configs" / "sft.yaml"),
            "--model",
            "custom_module.MySFT",
            "--model.note",
            "hello",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.export_dir=null",
            *QUICK,
        ]
    )
    assert type(cli.model).__name__ == "MySFT" and cli.model.note == "hello" and cli.model.steps_seen == 3


@pytest.mark.skipif(shutil.which("lit-align") is None, reason="the package is not installed (pip install -e .)")
def test_console_script_runs_the_readme_command(tmp_path):
    """``lit-align fit -c configs/sft.yaml`` in a fresh process, as the README has it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [
            "lit-align",
            "fit",
            "-c",
            "configs/sft.yaml",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.export_dir={tmp_path / 'export'}",
            *QUICK,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lit_align train data: rows=" in result.stdout + result.stderr
    assert (tmp_path / "export" / "config.json").exists()


@pytest.mark.parametrize("reference", ["auto", "precomputed"])
def test_dpo_config_trains_on_hh_and_exports(tmp_path, reference):
    cli = _fit(
        "dpo.yaml",
        tmp_path,
        f"--model.reference={reference}",
        f"--model.ref_cache_dir={tmp_path / 'cache'}",
        *QUICK,
    )
    assert cli.trainer.global_step == 3
    assert cli.datamodule.stats["train"]["pairs"] > 200  # the bundled Anthropic HH sample
    logged = cli.trainer.callback_metrics
    assert {
        "train/loss",
        "train/rewards/accuracies_step",
        "train/rewards/margins_step",
        "train/logps/chosen_step",
    } <= set(logged)
    assert (cli.model.ref_model is None) == (reference == "precomputed")
    assert (tmp_path / "export" / "model.safetensors").exists()


def test_ppo_config_runs_and_exports_the_policy(tmp_path):
    cli = _fit(
        "ppo.yaml",
        tmp_path,
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--model.max_new_tokens=8",
        "--model.num_iterations=1",
        "--trainer.enable_progress_bar=false",
    )
    logged = cli.trainer.callback_metrics
    assert {"train/reward_mean", "train/kl", "train/kl_coef", "train/ptx_loss", "val/reward_mean"} <= set(logged)
    assert cli.datamodule.stats["pretrain"]["examples"] > 100  # PPO-ptx text
    assert (tmp_path / "export" / "model.safetensors").exists()


def test_grpo_config_runs_on_gsm8k_and_exports_the_policy(tmp_path):
    cli = _fit(
        "grpo.yaml",
        tmp_path,
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--model.max_new_tokens=8",
        "--model.group_size=4",
        "--trainer.enable_progress_bar=false",
    )
    logged = cli.trainer.callback_metrics
    assert {"train/reward_mean", "train/kl", "train/entropy", "train/zero_std_fraction", "val/reward_mean"} <= set(
        logged
    )
    assert cli.trainer.global_step == 2
    assert type(cli.model.rollout_stage.reward_fns[0]).__name__ == "NumericAnswerReward"
    assert (tmp_path / "export" / "model.safetensors").exists()


def test_orpo_config_trains_reference_free_and_exports(tmp_path):
    """``configs/orpo.yaml``: DPOModule with ``loss_type: orpo``, no reference model, three steps on the bundled HH
    pairs; the implicit rewards are ``beta`` times the average log-probs (negative)."""
    cli = _fit("orpo.yaml", tmp_path, *QUICK)
    assert cli.trainer.global_step == 3 and cli.model.ref_model is None and cli.model.reference == "none"
    logged = cli.trainer.callback_metrics
    assert logged["train/rewards/chosen_step"] < 0 and "train/rewards/accuracies_step" in logged
    assert (tmp_path / "export" / "model.safetensors").exists()


def test_rloo_config_runs_with_the_kl_in_the_reward_and_exports(tmp_path):
    """``configs/rloo.yaml``: GRPOModule with leave-one-out advantages, the KL taken from the rewards and
    whole-completion ratios, two prompt batches on the bundled GSM8K questions."""
    cli = _fit("rloo.yaml", tmp_path, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
               "--model.max_new_tokens=8", "--trainer.enable_progress_bar=false")  # fmt: skip
    module = cli.model
    assert (module.advantage_estimator, module.kl_in_reward, module.importance_sampling_level) == (
        "rloo", True, "sequence_sum")  # fmt: skip
    assert cli.trainer.global_step == 2
    assert {"train/reward_mean", "train/kl", "train/policy_loss", "val/reward_mean"} <= set(
        cli.trainer.callback_metrics
    )
    assert (tmp_path / "export" / "model.safetensors").exists()


def test_online_dpo_config_runs_on_gsm8k_and_exports_the_policy(tmp_path):
    cli = _fit(
        "online_dpo.yaml",
        tmp_path,
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--model.max_new_tokens=8",
        "--trainer.enable_progress_bar=false",
    )
    logged = cli.trainer.callback_metrics
    assert {"train/loss", "train/reward_mean", "train/kl", "train/tie_fraction", "train/rewards/margins",
            "val/reward_mean"} <= set(logged)  # fmt: skip
    assert cli.trainer.global_step == 2
    assert [type(fn).__name__ for fn in cli.model.rollout_stage.reward_fns] == ["NumericAnswerReward", "LengthReward"]
    assert (tmp_path / "export" / "model.safetensors").exists()
