"""What a new user hits in the first hour (issue 15): ``lit-align test`` on every shipped config, ``--version``, the
README's own-subclass command from the directory holding the package, ``--ckpt_path last``, the logger extra, the
warning when most of the data is dropped, one-line errors for a bad model source or config typo, a readable
``--model.help``, one optimizer and one learning rate, and the ``recipe``/``generate`` dispatch."""

from __future__ import annotations

import logging
import math
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from conftest import REPO

from lit_align import __version__
from lit_align.cli import AllowedFromDirectory, main, newest_checkpoint, run, short_parser_error
from lit_align.data import PreferenceDataModule
from lit_align.models import ModelLoadError, ModelPathNotFoundError, load_tokenizer, looks_like_path

# one config per module class (rloo.yaml is GRPOModule as grpo.yaml, orpo.yaml DPOModule as dpo.yaml; vLLM needs vLLM;
# recipe.yaml is the recipe command's, not a method's)
NOT_A_METHOD = ("grpo_vllm", "rloo", "orpo", "recipe")
CONFIGS = [c for c in sorted((REPO / "configs").glob("*.yaml")) if c.stem not in NOT_A_METHOD]
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


def test_console_script_answers_version_without_importing_torch():
    """The console script's entry (``lit_align.console:main``) prints the version before importing torch or
    Lightning (the several seconds a new user waited for ``lit-align --version``)."""
    code = ("import sys; sys.argv = ['lit-align', '--version']; from lit_align.console import main; "
            "code = main(); print(code, 'torch' in sys.modules, 'lightning' in sys.modules)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.split("\n")[:2] == [f"lit-align {__version__}", "0 False False"], result.stderr


@pytest.mark.parametrize(
    ("env", "expected"), [({}, "2000"), ({"GOMP_SPINCOUNT": "7"}, "7"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "None")]
)
def test_console_script_shortens_openmp_spinning_unless_the_user_set_it(env, expected):
    """The console script sets GOMP_SPINCOUNT=2000 before torch loads (benchmarks/contention.py: about twice as fast
    when other work shares the cores), and leaves a user's own OpenMP wait settings alone."""
    code = ("import os, sys; sys.argv = ['lit-align', '--version']; from lit_align.console import main; main(); "
            "print(os.environ.get('GOMP_SPINCOUNT'))")  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    environment = {**base, **env}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=environment)
    assert result.stdout.split("\n")[1] == expected, result.stderr


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


# ----- errors a user sees on one line (lit-align's console entry, in-process) ------------------------------------
SFT = str(REPO / "configs" / "sft.yaml")


class _Lines(logging.Handler):
    """The lines Lightning's own logger prints (its handler writes to the stderr of import time, past capsys)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _main_exit(args: list[str], capsys) -> tuple[int, list[str], list[str]]:
    """``lit-align <args>`` through :func:`lit_align.cli.main`: its exit status, its stderr lines, and what
    Lightning's logger printed before."""
    logged, logger = _Lines(), logging.getLogger("lightning.pytorch")
    logger.addHandler(logged)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
    finally:
        logger.removeHandler(logged)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines(), logged.lines


def _offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_model_source_errors_say_what_is_wrong_on_the_first_line(tmp_path, monkeypatch, capsys):
    """``--model.model`` as a typo'd local path (beside the real export), a directory holding no model, and a hub id
    with ``HF_HUB_OFFLINE=1``: after the line naming what is being loaded, the first stderr line is
    ``lit-align fit: error: ...`` naming the source and the fix, then one hint line, exit status 2: no traceback,
    no parser dump. From Python, ``run`` raises the :class:`ModelLoadError` itself."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sft" / "export").mkdir(parents=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no model here")
    _offline(monkeypatch)
    cases = {
        "runs/sft/exprt": r"'runs/sft/exprt' does not exist .*; did you mean 'runs/sft/export'\?",
        "notes": r"'notes' holds no model or tokenizer \(no config.json",
        "nobody/no-such-model": r"cannot reach the Hugging Face hub for 'nobody/no-such-model' \(HF_HUB_OFFLINE is "
        r"set.*pass a local directory, or unset HF_HUB_OFFLINE",
    }
    for source, expected in cases.items():
        code, err, logged = _main_exit(["fit", "-c", SFT, "--model.model", source, *QUIET], capsys)
        assert code == 2 and len(err) == 2, err
        assert re.match(f"lit-align fit: error: {expected}", err[0]), err[0]
        assert "LIT_ALIGN_DEBUG=1" in err[1]
        assert any(line.startswith("lit_align fit: loading lit_align.SFTModule") and repr(source) in line
                   and "bundled:self_instruct_seed_tasks.jsonl" in line for line in logged), logged  # fmt: skip
    with pytest.raises(ModelPathNotFoundError, match="does not exist"):
        run(["fit", "-c", SFT, "--model.model", "runs/sft/exprt"])
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_tokenizer("nobody/no-such-model")


def test_a_path_is_told_from_a_hub_id(tmp_path, monkeypatch):
    """What counts as a local path (and so gets "does not exist" rather than the hub's "Repo id must be in the form
    'repo_name'"): ./ ../ / ~, more than one slash, an existing parent directory, or an existing path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./x", "../x", "/x", "~/x", "a/b/c", "runs/typo", "runs"):
        assert looks_like_path(name), name
    for name in ("tiny", "gpt2", "meta-llama/Llama-3.2-1B", "HuggingFaceTB/SmolLM2-135M"):
        assert not looks_like_path(name), name


def test_config_typos_in_model_name_the_option_and_its_close_match_first(tmp_path, capsys, monkeypatch):
    """A typo inside ``model:`` on the command line and in a YAML file, and one in ``trainer:``: stderr is the one
    error line (naming the key, the class and the close match) and one hint line, not 50 lines of usage and the
    parser's nested type dump; ``LIT_ALIGN_DEBUG=1`` gives that whole message back."""
    config, typo = tmp_path / "typo.yaml", yaml.safe_load(Path(SFT).read_text())
    typo["model"]["init_args"]["lrr"] = typo["model"]["init_args"].pop("lr")
    config.write_text(yaml.safe_dump(typo))
    expected = r".*fit: error: model \(lit_align.SFTModule\): Option 'lrr' is not accepted \(did you mean 'lr'\?\)"
    once = "--trainer.fast_dev_run=true"  # were a typo not caught, one step and no export, not the whole run
    for args in (["fit", "-c", SFT, "--model.init_args.lrr", "1e-3", once], ["fit", "-c", str(config), once]):
        code, err, _ = _main_exit(args, capsys)
        assert code == 2 and len(err) == 2 and re.fullmatch(expected, err[0]), err
    code, err, _ = _main_exit(["fit", "-c", SFT, "--trainer.max_stepss", "3", once], capsys)
    assert code == 2 and "(did you mean 'trainer.max_steps'?)" in err[0], err
    monkeypatch.setenv("LIT_ALIGN_DEBUG", "1")
    code, err, _ = _main_exit(["fit", "-c", str(config), once], capsys)
    assert code == 2 and any("Does not validate against any of the Union subtypes" in line for line in err)


def test_short_parser_error_keeps_the_problem_and_drops_the_type_dump():
    """jsonargparse's nested message for a bad value inside ``model:``, reduced to where and what."""
    message = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lit_align.modules.base.AlignModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lit_align.SFTModule':
        Parser key "lr":
          Expected a <class 'float'>. Got value: abc
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='lr', val='abc')"""
    assert short_parser_error(message) == "model.lr (lit_align.SFTModule): Expected a <class 'float'>. Got value: abc"
    assert short_parser_error("--ckpt_path last: no checkpoint") == "--ckpt_path last: no checkpoint"


MODULES = ["SFTModule", "RewardModule", "DPOModule", "KTOModule", "PPOModule", "GRPOModule", "OnlineDPOModule",
           "DistillModule"]  # fmt: skip


@pytest.mark.parametrize("module", MODULES)
def test_model_help_is_short_and_documents_every_option(module, capsys):
    """``lit-align fit --model.help lit_align.<Module>``: every constructor option has a description (not only its
    type), ``--model.model`` lists no nn.Module subclasses (it was 518 of DPO's 695 lines), and the whole help is
    under 300 lines."""
    with pytest.raises(SystemExit):
        run(["fit", "--model.help", f"lit_align.{module}"])
    text = capsys.readouterr().out
    entries = re.split(r"\n  (?=--model\.)", text[text.index("Help for --model.help") :])[1:]
    options = {entry.split()[0]: " ".join(entry.split()[1:]) for entry in entries}
    assert len(options) >= 10 and "--model.model" in options
    undocumented = [name for name, text in options.items() if re.match(r"(\S+\s+)?\(type:", text)]
    assert not undocumented, undocumented
    assert "known subclasses" not in options["--model.model"]
    assert len(text.splitlines()) < 300


def test_one_way_to_set_the_optimizer_and_one_learning_rate_in_the_printed_config(capsys):
    """``fit --help`` lists no top-level ``--optimizer``/``--lr_scheduler`` (the modules take theirs as
    ``--model.init_args.optimizer``), which are refused as unknown; ``--print_config`` shows ``model.init_args.lr``
    and no optimizer ``lr``; an optimizer ``lr`` set to another value than ``model.lr`` is an error naming both."""
    with pytest.raises(SystemExit):
        run(["fit", "--help"])
    help_text = capsys.readouterr().out
    assert "--model.help" in help_text and not re.search(r"--(optimizer|lr_scheduler)\b", help_text)
    with pytest.raises(SystemExit) as exit_info:
        run(["fit", "-c", SFT, "--optimizer", "torch.optim.SGD"])
    assert exit_info.value.code == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(["fit", "-c", SFT, "--model.lr", "1e-4", "--print_config"])
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)["model"]["init_args"]
    assert printed.count(" lr:") == 1 and config["lr"] == 1e-4
    assert config["optimizer"]["class_path"] == "torch.optim.AdamW" and "lr" not in config["optimizer"]["init_args"]
    with pytest.raises(ValueError, match=r"optimizer.init_args.lr=0.1: the learning rate is set by --model.init_args"):
        run(["fit", "-c", SFT, "--model.init_args.optimizer.init_args.lr", "0.1"])


def test_recipe_and_generate_go_to_their_own_modules_and_help_names_them(monkeypatch, capsys):
    """``lit-align recipe ...`` and ``lit-align generate ...`` call ``lit_align.recipe.main`` and
    ``lit_align.generate.main`` with the rest of the command line (stand-ins here); ``lit-align --help`` names
    both."""
    for command in ("recipe", "generate"):
        stand_in = types.ModuleType(f"lit_align.{command}")
        stand_in.main = lambda argv, command=command: (command, argv)
        monkeypatch.setitem(sys.modules, f"lit_align.{command}", stand_in)
        assert main([command, "-c", "x.yaml", "--force"]) == (command, ["-c", "x.yaml", "--force"])
    with pytest.raises(SystemExit):
        run(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "lit-align recipe" in help_text and "lit-align generate" in help_text
