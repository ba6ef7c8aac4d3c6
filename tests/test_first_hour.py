"""What a new user hits in the first hour (issue 15): ``lit-align test`` on every shipped config, ``--version``, the
README's own-subclass command from the directory holding the package, ``--ckpt_path last``, the logger extra, and
the warning when most of the data is dropped."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from lit_align import __version__
from lit_align.cli import AllowedFromDirectory, newest_checkpoint, run
from lit_align.data import PreferenceDataModule

# one config per module class (rloo.yaml is GRPOModule as grpo.yaml, orpo.yaml DPOModule as dpo.yaml; vLLM needs vLLM)
CONFIGS = [c for c in sorted((REPO / "configs").glob("*.yaml")) if c.stem not in ("grpo_vllm", "rloo", "orpo")]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def _samples(config: Path) -> bool:
    return "max_new_tokens" in yaml.safe_load(config.read_text())["model"]["init_args"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_test_subcommand_reports_held_out_metrics_for_every_config(config, tmp_path):
    """``lit-align test -c configs/<method>.yaml`` (one held-out batch; short completions for the sampling methods)
    runs the module's ``test_step`` on the DataModule's test loader and logs finite ``test/...`` metrics, no
    ``val/...`` ones."""
    overrides = ["--model.max_new_tokens=4"] if _samples(config) else []
    cli = run(["test", "-c", str(config), f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_test_batches=1",
               *QUIET, *overrides])  # fmt: skip
    logged = cli.trainer.callback_metrics
    assert logged and all(key.startswith("test/") for key in logged), sorted(logged)
    assert all(math.isfinite(float(value)) for value in logged.values()), dict(logged)


def test_test_metrics_equal_validation_metrics_and_reach_the_csv_log(tmp_path):
    """SFT on the same held-out batches: ``validate`` and ``test`` give the same numbers (``test_step`` is the
    validation step), and ``--trainer.logger CSVLogger`` (the default install's logger) writes them to metrics.csv."""
    common = ["-c", str(REPO / "configs" / "sft.yaml"), f"--trainer.default_root_dir={tmp_path}", *QUIET,
              "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]  # fmt: skip
    val = run(["validate", *common, "--trainer.limit_val_batches=2"]).trainer.callback_metrics
    test = run(["test", *common, "--trainer.limit_test_batches=2"]).trainer.callback_metrics
    assert (
        {k.removeprefix("val/") for k in val} == {k.removeprefix("test/") for k in test} == {"loss", "ppl", "token_acc"}
    )
    for name in ("loss", "ppl", "token_acc"):
        torch.testing.assert_close(test[f"test/{name}"], val[f"val/{name}"])
    csv = sorted(tmp_path.rglob("metrics.csv"))
    assert any("test/loss" in path.read_text() for path in csv), csv


def test_tensorboard_extra_is_declared_and_named_in_the_readme():
    """``--trainer.logger TensorBoardLogger`` needs tensorboard, which the default install lacks: pyproject declares
    an extra for it and the README's CLI section names that extra."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("tensorboard") for req in extras["tensorboard"])
    readme = (REPO / "README.md").read_text()
    cli_section = readme[readme.index("## The CLI") : readme.index("## In your own Lightning project")]
    assert "lit-align[tensorboard]" in cli_section and "TensorBoardLogger" in cli_section


def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lit-align {__version__}"


# ----- the README's own-subclass command, from the directory that holds the package -------------------------------
MY_PKG = "from lit_align import SFTModule\n\n\nclass MySFT(SFTModule):\n    pass\n"


def _lit_align_in(directory: Path, *args: str, allowed: str | None) -> subprocess.CompletedProcess:
    """The installed ``lit-align`` console script run in ``directory`` (its ``sys.path`` does not hold the current
    directory, unlike ``python -c``)."""
    script = Path(sys.executable).parent / "lit-align"
    if not script.exists():
        pytest.skip("the package is not installed (pip install -e .): no lit-align console script")
    env = {k: v for k, v in os.environ.items() if k not in ("LIT_ALIGN_ALLOWED_IMPORTS", "PYTHONPATH")}
    if allowed is not None:
        env["LIT_ALIGN_ALLOWED_IMPORTS"] = allowed
    return subprocess.run([str(script), *args], cwd=directory, env=env, capture_output=True, text=True, timeout=300)


def test_readme_subclass_command_finds_the_package_in_the_current_directory(tmp_path):
    """``LIT_ALIGN_ALLOWED_IMPORTS=my_pkg lit-align fit -c configs/sft.yaml --model my_pkg.MySFT`` from the directory
    holding ``my_pkg`` (here with ``--print_config``, which resolves the class): the package is found there."""
    (tmp_path / "my_pkg").mkdir()
    (tmp_path / "my_pkg" / "__init__.py").write_text(MY_PKG)
    args = ["fit", "-c", str(REPO / "configs" / "sft.yaml"), "--model", "my_pkg.MySFT", "--print_config"]
    result = _lit_align_in(tmp_path, *args, allowed="my_pkg")
    assert result.returncode == 0, result.stderr[-3000:]
    assert yaml.safe_load(result.stdout)["model"]["class_path"] == "my_pkg.MySFT"


def test_current_directory_finder_finds_only_allowed_top_level_packages(tmp_path):
    """The finder behind that: in its directory it finds the named packages only, never another module there
    (a ``json.py`` or an unlisted package), and nothing outside it."""
    for name in ("my_pkg", "other_pkg"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "json.py").write_text("")
    finder = AllowedFromDirectory(["my_pkg"], tmp_path)
    assert Path(finder.find_spec("my_pkg").origin).parent == tmp_path / "my_pkg"
    assert finder.find_spec("other_pkg") is None and finder.find_spec("json") is None
    assert finder.find_spec("my_pkg.sub", path=[str(tmp_path / "my_pkg")]) is None  # submodules: the normal finders
    assert AllowedFromDirectory(["not_here"], tmp_path).find_spec("not_here") is None


# ----- --ckpt_path last ------------------------------------------------------------------------------------------
def test_ckpt_path_last_without_a_checkpoint_names_where_it_looked(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "-c", str(REPO / "configs" / "sft.yaml"), f"--trainer.default_root_dir={tmp_path}",
             "--ckpt_path", "last"])  # fmt: skip
    assert exit_info.value.code != 0
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--ckpt_path last: no checkpoint" in error and str(tmp_path.resolve()) in error


def test_ckpt_path_last_resumes_the_newest_checkpoint_of_an_earlier_run(tmp_path):
    """A first run stops at step 2 (version_0); ``--ckpt_path last`` with ``max_steps 3`` resumes its checkpoint
    (one more step, not three from scratch) although the second run logs to version_1."""
    common = ["fit", "-c", str(REPO / "configs" / "sft.yaml"), f"--trainer.default_root_dir={tmp_path}",
              "--model.export_dir=null", "--trainer.limit_val_batches=0", *QUIET]  # fmt: skip
    first = run([*common, "--trainer.max_steps=2"])
    saved = newest_checkpoint(tmp_path)
    assert first.trainer.global_step == 2 and saved is not None and "version_0" in str(saved)
    second = run([*common, "--trainer.max_steps=3", "--ckpt_path", "last"])
    assert Path(second.trainer.ckpt_path) == saved
    assert second.trainer.global_step == 3 and second.trainer.logger.version == 1


def test_newest_checkpoint_looks_across_versions_and_into_no_distributed_checkpoint(tmp_path):
    """The newest ``*.ckpt`` under the root wins, whatever ``version_N`` holds it; a distributed checkpoint (a
    ``*.ckpt`` directory) counts as one, never the files inside it."""
    assert newest_checkpoint(tmp_path) is None
    old = tmp_path / "lightning_logs" / "version_3" / "checkpoints" / "epoch=0-step=9.ckpt"
    new = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "epoch=0-step=2.ckpt"
    for i, path in enumerate((old, new)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        os.utime(path, ns=(10**18 + i, 10**18 + i))
    assert newest_checkpoint(tmp_path) == new
    sharded = tmp_path / "lightning_logs" / "version_2" / "checkpoints" / "last.ckpt"
    sharded.mkdir(parents=True)
    (sharded / "inner.ckpt").write_bytes(b"")
    os.utime(sharded, ns=(2 * 10**18, 2 * 10**18))
    assert newest_checkpoint(tmp_path) == sharded


# ----- most of the data dropped ----------------------------------------------------------------------------------
def test_dropping_most_rows_warns_with_the_split_the_share_and_the_reasons(tiny_tokenizer):
    """DPO's data with ``max_length: 16`` (the prompt alone fills it): a warning names each split, the rows kept of
    the total and the main drop count; with the config's ``max_length: 512`` no such warning."""
    data = PreferenceDataModule(tiny_tokenizer, max_length=16, share_prompt=True)
    with pytest.warns(UserWarning) as record:
        data.setup("fit")
    messages = [str(w.message) for w in record if "rows kept" in str(w.message)]
    assert len(messages) == 2, messages  # the training split and the held-out split
    assert re.match(r"lit_align train data: only \d+ of 270 rows kept .*main reasons: dropped_empty_after", messages[0])
    assert messages[1].startswith("lit_align val data: only ")
    kept, total = len(data.train_dataset), data.stats["train"]["rows"]
    assert kept / total < 0.5
    data = PreferenceDataModule(tiny_tokenizer, max_length=512, max_prompt_length=384, share_prompt=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.setup("fit")
    assert not [w for w in caught if "rows kept" in str(w.message)]
