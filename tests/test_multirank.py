"""Several ranks: every method trained on two CPU processes (gloo) under DDP and under FSDP2 equals the one-process
run with the same global batch, and a run killed on every rank resumes exactly. Each launch has a timeout: a hang is
a failure, not a wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

pytestmark = pytest.mark.multirank

HERE = Path(__file__).parent
METHODS = ["sft", "reward", "dpo", "dpo_precomputed", "dpo_lora", "kto", "ppo", "grpo", "online_dpo", "distill"]
STRATEGIES = ["ddp", "fsdp2"]
LAUNCH_TIMEOUT = 400  # seconds for one launch of all methods


def launch(script: str, *args: str, ranks: int, timeout: int = LAUNCH_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``script`` on ``ranks`` CPU processes (torchrun) or one; on a timeout the whole process group is killed
    and the test fails."""
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command = [*(runner if ranks > 1 else [sys.executable]), str(HERE / script), *args]
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{script} {' '.join(args)} on {ranks} rank(s) hung for {timeout} s:\n{output[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, output, "")


UNEVEN = ["grpo_uneven", "grpo_uneven_layerwise"]
FP16 = "sft_fp16"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multirank")
    for strategy, ranks in (("single", 1), *((s, 2) for s in STRATEGIES)):
        methods = [*METHODS, FP16, *(UNEVEN if strategy == "fsdp2" else []), *(["dpo_split_cache"] * 2)]
        result = launch("multirank_worker.py", str(out), strategy, *methods, ranks=ranks)
        assert result.returncode == 0, result.stdout[-4000:]
    return out


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp16_with_loss_scaling_on_two_ranks(runs, strategy):
    """fp16 autocast with a gradient scaler (the explicit plugin: Lightning turns ``16-mixed`` into bf16 on a CPU) on
    two ranks: losses within fp16's rounding of the one-process run's (1e-3), equal weights on both ranks, and under
    FSDP2 the scaler whose overflow check is all-reduced over the ranks (each sees only its shards)."""
    single = torch.load(runs / f"{FP16}-single.pt", weights_only=True)
    run = torch.load(runs / f"{FP16}-{strategy}.pt", weights_only=True)
    assert run["losses"] == pytest.approx(single["losses"], abs=1e-3)
    assert len(set(run["digests"])) == 1
    assert run["scaler"] == ("ShardedGradScaler" if strategy == "fsdp2" else "GradScaler")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_reference_cache_on_one_rank_only_is_computed_by_all_together(runs, strategy):
    """DPO with precomputed reference log-probs where each rank has its own cache directory (nodes sharing no disk)
    and the second run finds the cache on rank 0 only: loading or computing is decided by all ranks together, so
    both compute (the computation is a collective) instead of one waiting forever; the run trains as the first."""
    run = torch.load(runs / f"dpo_split_cache-{strategy}.pt", weights_only=True)  # the second run's record
    precomputed = torch.load(runs / f"dpo_precomputed-{strategy}.pt", weights_only=True)
    assert run["losses"] == pytest.approx(precomputed["losses"], abs=1e-6)
    assert list(runs.glob(f"cache-{strategy}-rank0/*.pt")) and not list(runs.glob(f"cache-{strategy}-rank1/*.pt"))


@pytest.mark.parametrize("method", UNEVEN)
def test_sampling_on_ranks_whose_completions_end_at_different_steps_never_desynchronises(runs, method):
    """Under FSDP2, rank 0's completions end after one token while rank 1's run eight: with the policy gathered once
    for the rollout no collective is issued while decoding, and gathered layer by layer every rank runs every
    decoding step (``synced_gpus``). Either way training goes on (a desynchronised collective would hang until the
    launch's timeout or pair mismatched operations): both ranks issue the same collectives in the same order, and
    the weights stay equal on both ranks."""
    run = torch.load(runs / f"{method}-fsdp2.pt", weights_only=True)
    assert len(run["losses"]) == 3 and len(set(run["digests"])) == 1
    issued = [torch.load(runs / f"{method}-fsdp2-collectives-rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert issued[0] and issued[0] == issued[1]  # the same collectives, in the same order, with the same shapes


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("method", METHODS)
def test_held_out_metrics_on_two_ranks_are_not_skewed_by_padding(runs, method, strategy):
    """Five held-out examples on two ranks: three each, one of them padding that evens out the ranks. Every
    validation metric equals the one-process run's (1e-5): the padding counts in none."""
    single = torch.load(runs / f"{method}-single.pt", weights_only=True)["validation"]
    run = torch.load(runs / f"{method}-{strategy}.pt", weights_only=True)["validation"]
    assert set(run) == set(single) and len(single) >= 2
    for key, value in single.items():
        assert run[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_train_as_one_with_the_same_global_batch(runs, method, strategy):
    """Every step's loss (reduced over the ranks) equals the one-process run's (fp32, 1e-5); every trainable
    parameter changed (the output head and, for PPO, the value head included); both ranks hold equal weights, under
    FSDP2 each rank half of every model (policy, value head, reference, reward model); the export loads with
    ``from_pretrained`` and holds the run's weights (LoRA: merged)."""
    single = torch.load(runs / f"{method}-single.pt", weights_only=True)
    run = torch.load(runs / f"{method}-{strategy}.pt", weights_only=True)
    assert len(run["losses"]) == len(single["losses"]) >= 2
    assert run["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert run["reward_offset"] == pytest.approx(single["reward_offset"], abs=1e-5)  # the reward model's calibration
    assert [k for k in run["trainable"] if not run["changed"][k]] == []
    assert method == "dpo_lora" or any("lm_head" in k or "score" in k for k in run["trainable"])  # LoRA: adapters
    assert len(set(run["digests"])) == 1  # both ranks
    expected = 1.0 if strategy == "ddp" else 0.5  # FSDP2: each rank holds half of every model, frozen ones too
    held = {name: share for name, share in run["held"].items() if name != "value_model"}  # [1, H]: one rank has it
    assert all(share == pytest.approx(expected, abs=0.02) for share in held.values()), run["held"]
    export = runs / f"{method}-{strategy}-export"
    loader = AutoModelForSequenceClassification if method == "reward" else AutoModelForCausalLM
    exported = loader.from_pretrained(export).state_dict()
    weights = run["weights"]
    for key, value in exported.items():
        if method != "dpo_lora":
            assert torch.equal(value, weights[f"model.{key}"]), key
            continue
        prefix = f"model.base_model.model.{key.removesuffix('.weight')}"
        if f"{prefix}.base_layer.weight" in weights:  # merged: W + (alpha / r) B A
            merged = weights[f"{prefix}.base_layer.weight"] + 2.0 * (
                weights[f"{prefix}.lora_B.default.weight"] @ weights[f"{prefix}.lora_A.default.weight"]
            )
            assert torch.allclose(value, merged, atol=1e-6), key
        else:
            assert torch.equal(value, weights[f"model.base_model.model.{key}"]), key


def test_full_and_distributed_checkpoints_resume_load_and_export_alike(tmp_path):
    """Two ranks under FSDP2 save the same state as a distributed checkpoint (a directory of shards, with its
    checksum manifest) and as one full file. Resuming from either on two ranks gives the same next step and weights;
    ``load_from_checkpoint`` reads either on one process into the run's weights, and the export from either loads
    with ``from_pretrained``. A flipped byte in a shard is refused before anything is loaded."""
    from lit_align import SFTModule
    from lit_align.checkpoint import CheckpointError

    assert launch("checkpoint_worker.py", "save", str(tmp_path), ranks=2).returncode == 0
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert (tmp_path / "dist.ckpt" / "lit_align_checksums.sha256").is_file() and (tmp_path / "full.ckpt").is_file()
    resumed = {}
    for tag in ("dist", "full"):
        result = launch("checkpoint_worker.py", "resume", str(tmp_path), str(tmp_path / f"{tag}.ckpt"), tag, ranks=2)
        assert result.returncode == 0, result.stdout[-3000:]
        resumed[tag] = torch.load(tmp_path / f"resumed-{tag}.pt", weights_only=True)
        module = SFTModule.load_from_checkpoint(tmp_path / f"{tag}.ckpt")
        assert all(torch.equal(v, final[k]) for k, v in module.state_dict().items())
        module.export_hf(tmp_path / f"export-{tag}")
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / f"export-{tag}").state_dict()
        assert all(torch.equal(v, final[f"model.{k}"]) for k, v in exported.items())
    assert len(resumed["dist"]["losses"]) == 1 and resumed["dist"]["losses"] == resumed["full"]["losses"]
    assert all(torch.equal(v, resumed["full"]["weights"][k]) for k, v in resumed["dist"]["weights"].items())
    shard = next((tmp_path / "dist.ckpt").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x5A
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{shard.name} is corrupted"):
        SFTModule.load_from_checkpoint(tmp_path / "dist.ckpt")


def test_ddp_spawn_leaves_a_usable_trained_module(tmp_path):
    """With ``ddp_spawn`` the ranks train in child processes and Lightning hands the weights back to the main
    process, where ``configure_model`` never ran: the module there holds the trained policy (the weights rank 0
    exported), not an empty one."""
    assert launch("checkpoint_worker.py", "spawn", str(tmp_path), ranks=1).returncode == 0
    result = torch.load(tmp_path / "spawn.pt", weights_only=True)
    assert result == {"usable": True, "same_as_export": True}


def _readme_cpu_commands() -> list[str]:
    readme = (HERE.parent / "README.md").read_text()
    block = readme.split("## Several GPUs and nodes", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line and not line.startswith("#") and "accelerator cpu" in line]


@pytest.mark.parametrize("command", _readme_cpu_commands())
def test_the_readmes_multi_device_commands_run_as_written(command, tmp_path):
    """The README's commands for several devices, as written (in a scratch directory holding the configs): two CPU
    processes, started by Lightning or by torchrun, train and export."""
    import shutil

    shutil.copytree(HERE.parent / "configs", tmp_path / "configs")
    lit_align = shutil.which("lit-align")
    assert lit_align is not None, "install the package (pip install -e .) to run the CLI"
    argv = command.replace("$(which lit-align)", lit_align).split()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"{command} hung")
    assert process.returncode == 0, output[-3000:]
    method = command.split("configs/", 1)[1].split(".yaml", 1)[0]
    assert (tmp_path / "runs" / method / "export" / "model.safetensors").is_file()
