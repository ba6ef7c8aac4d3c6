"""Security, shown as figures in the reliability summary (``pytest -m reliability``): configs that try to run code,
checkpoints that would run code when unpickled, corrupted checkpoints and caches, remote code in model directories."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO

from lit_align import DPOModule, InstructionDataModule, PreferenceDataModule, SFTModule
from lit_align.checkpoint import CheckpointError, SafeCheckpointIO
from lit_align.cli import ImportRefused, run
from lit_align.data.sources import read_records
from lit_align.models import load_causal_lm
from lit_align.rollout import HFGenerator

pytestmark = pytest.mark.reliability


def _sft_data(module, rows=8):
    records = [r.row for r in read_records("bundled:self_instruct_seed_tasks.jsonl")[:rows]]
    return InstructionDataModule(module.tokenizer, records, val_fraction=0.0, max_length=96, batch_size=4)


def _trainer(**kwargs):
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, **kwargs)  # fmt: skip


# ----- configs that try to run code -----------------------------------------------------------------------------------
# Each config fragment tries to run ``touch MARKER`` (or another forbidden callable) while parsing, instantiating or
# training. Every one must be refused with ImportRefused, and the marker file must never appear.
EVIL_CONFIGS = {
    "model reaches os.popen through an allowed module's attribute": """
model:
  class_path: lit_align.security.os.popen
  init_args: {cmd: "touch MARKER"}
""",
    "callback reaches os.popen through an allowed module's attribute": """
trainer:
  callbacks:
    - class_path: lit_align.security.os.popen
      init_args: {cmd: "touch MARKER"}
""",
    "logger is pickle.loads through an allowed module": """
trainer:
  logger:
    class_path: lit_align.checkpoint.pickle.loads
""",
    "callback is a class under an allowed prefix but defined elsewhere (the Trainer)": """
trainer:
  callbacks:
    - class_path: lit_align.cli.L.Trainer
      init_args: {default_root_dir: MARKER}
""",
    "a function given where an optimizer factory goes": """
model:
  init_args:
    optimizer: lit_align.security.os.system
""",
    "an allowed class handed a forbidden callable (LambdaCallback)": """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.LambdaCallback
      init_args: {on_fit_start: lit_align.security.os.system}
""",
    "an allowed scheduler handed a forbidden callable (LambdaLR)": """
model:
  init_args:
    lr_scheduler:
      class_path: torch.optim.lr_scheduler.LambdaLR
      init_args: {lr_lambda: lit_align.security.os.system}
""",
    "builtins.exec": """
trainer:
  callbacks:
    - class_path: builtins.exec
      init_args: {source: "open('MARKER', 'w')"}
""",
    "class spec in a row of train_data": """
data:
  init_args:
    train_data:
      - class_path: lit_align.security.os.popen
        init_args: {cmd: "touch MARKER"}
      - {prompt: "a", completion: "b"}
""",
    "class spec nested deep in a row of train_data": """
data:
  init_args:
    train_data:
      - prompt: "a"
        completion: "b"
        extra: [{nested: {class_path: lit_align.security.os.popen, init_args: {cmd: "touch MARKER"}}}]
""",
    "class spec of an allowed class in a row of train_data": """
data:
  init_args:
    train_data:
      - {class_path: lit_align.rewards.LengthReward}
""",
    "class spec in templates": """
data:
  init_args:
    templates:
      task:
        class_path: lit_align.security.os.popen
        init_args: {cmd: "touch MARKER"}
""",
}
GENERATOR_EVIL = """
model:
  init_args:
    generator:
      class_path: lit_align.rollout.HFGenerator
      init_args:
        generate_kwargs:
          streamer: {class_path: lit_align.security.os.popen, init_args: {cmd: "touch MARKER"}}
"""


def _refused(tmp_path: Path, base: str, fragment: str) -> None:
    marker = tmp_path / "MARKER"
    config = tmp_path / "evil.yaml"
    config.write_text(fragment.replace("MARKER", str(marker)))
    with pytest.raises(ImportRefused):
        run(["fit", "-c", str(REPO / "configs" / base), "-c", str(config), "--trainer.max_steps=1",
             f"--trainer.default_root_dir={tmp_path}", "--model.init_args.export_dir=null"])  # fmt: skip
    assert not marker.exists()


@pytest.mark.parametrize("fragment", EVIL_CONFIGS.values(), ids=EVIL_CONFIGS.keys())
def test_evil_configs_are_refused_and_run_nothing(tmp_path, reliability, fragment):
    reliability["faults"] += 1
    _refused(tmp_path, "sft.yaml", fragment)
    reliability["survived"] += 1


def test_class_spec_in_generate_kwargs_is_refused(tmp_path, reliability):
    """``generate_kwargs`` is free-form (``dict[str, Any]``): jsonargparse would build a class spec found there."""
    reliability["faults"] += 1
    _refused(tmp_path, "grpo.yaml", GENERATOR_EVIL)
    reliability["survived"] += 1


def test_generate_options_that_load_code_are_refused(tmp_path, reliability):
    """``generate(custom_generate=<repo or directory>, trust_remote_code=True)`` imports and runs the ``generate.py``
    it names: refused when the generator is built, from a config or from Python."""
    reliability["bad_inputs"] += 1
    payload = tmp_path / "custom_generate"
    payload.mkdir()
    marker = tmp_path / "MARKER"
    (payload / "generate.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef generate(*a, **k): pass\n")
    config = tmp_path / "generator.yaml"
    options = f"custom_generate: {tmp_path}\n          trust_remote_code: true\n"
    config.write_text(GENERATOR_EVIL.split("streamer")[0] + options)
    with pytest.raises(ValueError, match="custom_generate"):
        run(["fit", "-c", str(REPO / "configs" / "grpo.yaml"), "-c", str(config), "--trainer.max_steps=1",
             f"--trainer.default_root_dir={tmp_path}", "--model.init_args.export_dir=null"])  # fmt: skip
    with pytest.raises(ValueError, match="custom_generate"):
        HFGenerator(generate_kwargs={"custom_generate": str(tmp_path), "trust_remote_code": True})
    assert not marker.exists()
    reliability["named_errors"] += 1


def test_a_generator_with_plain_generate_kwargs_still_parses(tmp_path):
    """The control for the test above: the same argument holding plain data is accepted."""
    config = tmp_path / "generator.yaml"
    config.write_text(GENERATOR_EVIL.split("streamer")[0] + "min_new_tokens: 2\n")
    cli = run(["-c", str(REPO / "configs" / "grpo.yaml"), "-c", str(config)], run=False)
    assert type(cli.model.rollout_stage.generator).__name__ == "HFGenerator"
    assert cli.model.rollout_stage.generator.generate_kwargs == {"min_new_tokens": 2}


def test_checkpoint_hyperparameters_reaching_a_forbidden_callable_are_refused(tmp_path, reliability):
    marker = tmp_path / "MARKER"
    evil = tmp_path / "hparams.ckpt"
    hparams = {"_class_path": "lit_align.security.os.popen", "cmd": f"touch {marker}"}
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, evil)
    reliability["faults"] += 1
    with pytest.raises(ImportRefused, match="lit_align.security.os.popen"):
        run(["fit", "-c", str(REPO / "configs" / "sft.yaml"), "--ckpt_path", str(evil),
             f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert not marker.exists()
    reliability["survived"] += 1


def test_an_exactly_named_callable_and_user_classes_are_allowed(tmp_path, monkeypatch):
    """The allow-list still lets a user name their own classes (a prefix) and, exactly, a callable."""
    (tmp_path / "user_callbacks.py").write_text(
        "from lightning.pytorch.callbacks import Callback\nclass Mine(Callback):\n    pass\n"
        "def make():\n    return Mine()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "cb.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: user_callbacks.Mine\n")
    cli = run(["-c", str(REPO / "configs" / "sft.yaml"), "-c", str(config)], run=False,
              allowed_imports=["user_callbacks"])  # fmt: skip
    assert any(type(c).__name__ == "Mine" for c in cli.trainer.callbacks)
    import user_callbacks

    from lit_align.security import object_refusal

    assert object_refusal("user_callbacks.make", user_callbacks.make, ["user_callbacks"]) is not None
    assert object_refusal("user_callbacks.make", user_callbacks.make, ["user_callbacks.make"]) is None


# ----- corrupted checkpoints and caches -------------------------------------------------------------------------------
def _flip_tensor_byte(path: Path) -> None:
    """Flip one byte in the middle of the largest record of a ``torch.save`` zip archive (tensor data)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        largest = max(archive.infolist(), key=lambda info: info.file_size)
    # the record's data starts after its local header: name length and extra length are at offsets 26 and 28
    data = bytearray(path.read_bytes())
    start = largest.header_offset
    name_len = int.from_bytes(data[start + 26 : start + 28], "little")
    extra_len = int.from_bytes(data[start + 28 : start + 30], "little")
    data[start + 30 + name_len + extra_len + largest.file_size // 2] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    module = SFTModule(lr=1e-3)
    trainer = _trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, _sft_data(module))
    path = tmp_path / "good.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_a_flipped_byte_in_checkpoint_tensor_data_is_caught_naming_the_file(tmp_path, checkpoint, reliability):
    """torch.load reads such a file without complaint (the weights silently differ); the CRC-32 that torch.save writes
    for every record catches it, in every way lit_align loads a checkpoint."""
    _flip_tensor_byte(checkpoint)
    torch.load(checkpoint, weights_only=True)  # what would have happened: no error at all
    reliability["faults"] += 1
    expected = rf"{checkpoint.name} is corrupted: the checksum \(CRC-32\)"
    with pytest.raises(CheckpointError, match=expected):
        SFTModule.load_from_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match=expected):
        SafeCheckpointIO().load_checkpoint(checkpoint)
    with pytest.raises(CheckpointError, match=expected):
        run(["fit", "-c", str(REPO / "configs" / "sft.yaml"), "--ckpt_path", str(checkpoint),
             f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    reliability["survived"] += 1


def test_random_garbage_is_reported_as_corrupt_not_as_code(tmp_path, reliability):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(os.urandom(4096))
    reliability["faults"] += 1
    for load in (SFTModule.load_from_checkpoint, SafeCheckpointIO().load_checkpoint):
        with pytest.raises(CheckpointError, match="garbage.ckpt is truncated or corrupted") as error:
            load(garbage)
        assert "arbitrary code" not in str(error.value)
    reliability["survived"] += 1


def test_a_flipped_byte_in_the_reference_cache_is_caught_naming_the_file(tmp_path, reliability):
    rows = [r.row for r in read_records("bundled:hh_rlhf_harmless_base_test_head300.jsonl.gz")[:8]]

    def fit() -> DPOModule:
        module = DPOModule(lr=1e-3, reference="precomputed", ref_cache_dir=str(tmp_path / "cache"))
        data = PreferenceDataModule(module.tokenizer, rows, val_fraction=0.0, max_length=96, batch_size=4)
        _trainer(max_steps=1).fit(module, data)
        return module

    fit()
    (cache,) = (tmp_path / "cache").glob("*.pt")
    _flip_tensor_byte(cache)
    reliability["faults"] += 1
    with pytest.raises(RuntimeError, match=rf"reference log-prob cache .*{cache.name} is unreadable \(is corrupted"):
        fit()
    reliability["survived"] += 1


# ----- safe loading ---------------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_is_refused_without_running(tmp_path, reliability):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6", "x": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="evil.ckpt holds objects .* refused"):
        SFTModule.load_from_checkpoint(evil)
    with pytest.raises(CheckpointError, match="evil.ckpt holds objects"):
        run(["fit", "-c", str(REPO / "configs" / "sft.yaml"), "--ckpt_path", str(evil),
             f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert not marker.exists()
    reliability["faults"] += 1
    reliability["survived"] += 1


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, reliability):
    module = SFTModule(lr=1e-3)
    trainer = _trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, _sft_data(module, rows=8))
    good = tmp_path / "good.ckpt"
    trainer.save_checkpoint(good)
    torn = tmp_path / "torn.ckpt"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="torn.ckpt is truncated or corrupted"):
        SFTModule.load_from_checkpoint(torn)
    with pytest.raises(CheckpointError, match="torn.ckpt is truncated or corrupted"):
        run(["fit", "-c", str(REPO / "configs" / "sft.yaml"), "--ckpt_path", str(torn),
             f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    reliability["faults"] += 1
    reliability["survived"] += 1


def test_a_write_killed_midway_never_replaces_a_good_checkpoint(tmp_path, monkeypatch, reliability):
    module = SFTModule(lr=1e-3)
    trainer = _trainer(max_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, _sft_data(module, rows=8))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()

    import fsspec.implementations.local as local

    def crash(self, data):
        raise OSError("disk went away mid-write")

    monkeypatch.setattr(local.LocalFileOpener, "write", crash)
    with pytest.raises(OSError, match="mid-write"):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    SFTModule.load_from_checkpoint(path)
    reliability["faults"] += 1
    reliability["survived"] += 1


@pytest.mark.parametrize("target", ["os.system", "subprocess.Popen", "evil_payload_module.Callback"])
def test_config_class_paths_off_the_allow_list_are_refused_before_import(tmp_path, monkeypatch, reliability, target):
    marker = tmp_path / "PWNED"
    (tmp_path / "evil_payload_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom lightning.pytorch.callbacks import Callback\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "evil.yaml"
    config.write_text(
        f"trainer:\n  callbacks:\n    - class_path: {target}\n      init_args:\n        args: ['touch', '{marker}']\n"
    )
    with pytest.raises(ImportRefused, match=f"refusing to import {target}"):
        run(["fit", "-c", str(REPO / "configs" / "sft.yaml"), "-c", str(config), "--trainer.max_steps=1"])
    assert not marker.exists() and "evil_payload_module" not in sys.modules
    reliability["faults"] += 1
    reliability["survived"] += 1


def test_the_payload_module_does_run_when_allowed(tmp_path, monkeypatch):
    """The allow-list is what stops it: naming the module as allowed imports it (and its side effect happens)."""
    marker = tmp_path / "RAN"
    (tmp_path / "allowed_payload_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom lightning.pytorch.callbacks import Callback\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "cb.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: allowed_payload_module.Callback\n")
    run(["-c", str(REPO / "configs" / "sft.yaml"), "-c", str(config)], run=False,
        allowed_imports=["allowed_payload_module"])  # fmt: skip
    assert marker.exists()


@pytest.mark.parametrize("model_type", ["llama", "evil_model"])
def test_remote_code_is_not_run_unless_trusted(tmp_path, reliability, model_type):
    """A model directory whose config asks for its own modelling code (``auto_map``): without trust_remote_code
    the code never runs; a known architecture loads as the library's own class, an unknown one is an error that
    says trust_remote_code."""
    marker = tmp_path / "PWNED"
    model_dir = tmp_path / "remote"
    load_causal_lm("tiny").save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "evil_code.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_model'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    if model_type == "llama":
        assert type(load_causal_lm(str(model_dir))).__name__ == "LlamaForCausalLM"
    else:
        with pytest.raises(ValueError, match="trust_remote_code"):
            load_causal_lm(str(model_dir))
    assert not marker.exists()
    reliability["faults"] += 1
    reliability["survived"] += 1


def test_exports_are_safetensors_only(tmp_path):
    module = SFTModule()
    module.configure_model()
    module.export_hf(tmp_path / "export")
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)


def test_lightning_plain_values_still_parse_and_checkpoint_class_paths_are_checked(tmp_path, monkeypatch):
    """``logger: false`` and ``profiler: simple`` are plain values, not imports; a checkpoint whose hyper-parameters
    name a class off the allow-list is refused before that class is imported."""
    cli = run(["-c", str(REPO / "configs" / "sft.yaml"), "--trainer.logger=false", "--trainer.profiler=simple"],
              run=False)  # fmt: skip
    assert cli.trainer.logger is None
    marker = tmp_path / "PWNED"
    (tmp_path / "ckpt_payload_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nFoo = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    evil = tmp_path / "hparams.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": "ckpt_payload_module.Foo"}}, evil)
    with pytest.raises(ImportRefused, match="ckpt_payload_module.Foo"):
        run(["fit", "-c", str(REPO / "configs" / "sft.yaml"), "--ckpt_path", str(evil),
             f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert not marker.exists()


# ----- checkpoints whose hyper-parameters or shards try to run code ---------------------------------------------------
def _remote_code_model(tmp_path: Path, marker: Path) -> Path:
    """A model directory whose config asks for its own modelling code (which would create ``marker``)."""
    model_dir = tmp_path / "remote"
    load_causal_lm("tiny").save_pretrained(model_dir)
    SFTModule().tokenizer.save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_code.EvilConfig", "AutoModelForCausalLM": "evil_code.EvilModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "evil_code.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return model_dir


def test_a_checkpoint_cannot_turn_on_remote_code(tmp_path, checkpoint, reliability):
    """Hyper-parameters saying ``trust_remote_code: true`` for a model directory that ships code: neither
    ``load_from_checkpoint`` nor ``--ckpt_path`` takes that switch from the file (only the caller can set it)."""
    marker = tmp_path / "MARKER"
    model_dir = _remote_code_model(tmp_path, marker)
    state = torch.load(checkpoint, weights_only=True)
    state["hyper_parameters"].update(
        model=str(model_dir),
        trust_remote_code=True,
        _class_path="lit_align.SFTModule",
        _instantiator="lightning.pytorch.cli.instantiate_module",
    )  # as the CLI writes
    evil = tmp_path / "remote.ckpt"
    torch.save(state, evil)
    reliability["faults"] += 1
    module = SFTModule.load_from_checkpoint(evil)
    assert module.trust_remote_code is False and not marker.exists()
    cli = run(["validate", "-c", str(REPO / "configs" / "sft.yaml"), "--ckpt_path", str(evil),
               "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    assert cli.model.trust_remote_code is False and cli.model.model_name_or_path == str(model_dir)
    assert not marker.exists()
    reliability["survived"] += 1


def test_checkpoint_hyperparameters_naming_an_unlisted_class_are_refused_by_load_from_checkpoint(
    tmp_path, checkpoint, monkeypatch, reliability
):
    """Lightning rebuilds a CLI-written checkpoint's hyper-parameters through jsonargparse (``_instantiator``):
    ``load_from_checkpoint`` holds them to the same allow-list as a config."""
    marker = tmp_path / "MARKER"
    (tmp_path / "evil_optimizers.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport torch\nclass Opt(torch.optim.SGD):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    state = torch.load(checkpoint, weights_only=True)
    state["hyper_parameters"].update(
        _instantiator="lightning.pytorch.cli.instantiate_module", _class_path="lit_align.SFTModule",
        optimizer={"class_path": "evil_optimizers.Opt", "init_args": {"lr": 0.1}},
    )  # fmt: skip
    evil = tmp_path / "instantiator.ckpt"
    torch.save(state, evil)
    reliability["faults"] += 1
    with pytest.raises(ImportRefused, match="evil_optimizers"):
        SFTModule.load_from_checkpoint(evil)
    assert not marker.exists() and "evil_optimizers" not in sys.modules
    reliability["survived"] += 1


def test_distributed_checkpoints_run_no_code(tmp_path, reliability):
    """torch reads a distributed checkpoint's ``.metadata`` with plain pickle and its non-tensor entries with
    ``weights_only=False``: a crafted ``.metadata`` or entry is refused before anything runs, whoever reads it
    (``load_from_checkpoint``, ``--ckpt_path``)."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "MARKER"
    entry = tmp_path / "entry.ckpt"
    dcp.save({"state_dict": {"x": torch.ones(2)}, "evil": _Payload(marker)}, checkpoint_id=str(entry))
    metadata = tmp_path / "metadata.ckpt"
    metadata.mkdir()
    (metadata / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    cases = ((entry, r"entry \(evil\) holds objects .* refused"), (metadata, "metadata .* is refused"))
    for directory, expected in cases:
        reliability["faults"] += 1
        with pytest.raises(CheckpointError, match=expected):
            SFTModule.load_from_checkpoint(directory)
        with pytest.raises(CheckpointError):
            run(["fit", "-c", str(REPO / "configs" / "sft.yaml"), "--ckpt_path", str(directory),
                 f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
        assert not marker.exists()
        reliability["survived"] += 1


def test_weights_only_false_is_refused_on_the_command_line(tmp_path, reliability):
    reliability["bad_inputs"] += 1
    with pytest.raises(CheckpointError, match="weights_only=True only"):
        run(["fit", "-c", str(REPO / "configs" / "sft.yaml"), "--weights_only", "false",
             f"--trainer.default_root_dir={tmp_path}"])  # fmt: skip
    reliability["named_errors"] += 1
