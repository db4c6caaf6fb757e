"""Scaling out with accelerate, as a user meets it: `--set distributed.num_processes=2` on CPU (gloo).

Step 01 under two processes writes the same file as one process (the same batches and seeds, merged
in plan order); a rank that hangs is caught by the watchdog and the step resumes from the shards; a
run killed outright leaves no process behind and its rerun loses and duplicates nothing.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, run_cli

from synthetic_instruction_tuner.config import SamplingConfig, load_config
from synthetic_instruction_tuner.distributed import check_launch, launch_command, per_process_batch
from synthetic_instruction_tuner.errors import ConfigError
from synthetic_instruction_tuner.generation import Request, plan_batches
from synthetic_instruction_tuner.store import read_json, read_jsonl
from synthetic_instruction_tuner.watchdog import FAULT_ENV, HEARTBEAT_ENV

TWO = ["--set", "distributed.num_processes=2"]


def _step01(run: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = run_cli(["--profile", "smoke", "--run-dir", str(run), "--steps", "01", *extra], env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def one_process_01(tmp_path_factory) -> Path:
    """Step 01's instructions from a one-process smoke run."""
    run = tmp_path_factory.mktemp("one") / "run"
    _step01(run)
    return run / "data" / "instructions.jsonl"


def _processes_of(run: Path) -> list[psutil.Process]:
    """Live processes started for `run`: kernels, launchers and ranks all carry its heartbeat path."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(HEARTBEAT_ENV, "").startswith(str(run)):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _assert_complete_without_duplicates(run: Path) -> None:
    records = read_jsonl(run / "data" / "instructions.jsonl")
    assert len(records) == 24
    assert len({r["id"] for r in records}) == len({r["sample"] for r in records}) == 24
    assert not (run / "data" / "shards").exists(), "shards are removed once merged"


def _assert_same_as_one_process(run: Path, one_process: Path) -> None:
    _assert_complete_without_duplicates(run)
    assert (run / "data" / "instructions.jsonl").read_bytes() == one_process.read_bytes()


def test_step_01_on_two_processes_writes_what_one_process_writes(tmp_path, one_process_01):
    run = tmp_path / "run"
    result = _step01(run, *TWO)
    _assert_same_as_one_process(run, one_process_01)
    (row,) = read_jsonl(run / "ledger.jsonl")
    assert (row["processes"], row["launcher"]) == (2, "accelerate launch")
    assert "--num_processes 2" in row["launch_command"]
    notebook = (run / "notebooks" / "01_generate_instructions.ipynb").read_text()
    assert "accelerate launch: magpie:instructions_step on 2 processes (gloo on CPU)" in notebook
    assert "run_all: 01_generate_instructions: ok in" in result.stdout


def test_a_hung_rank_is_killed_by_the_watchdog_and_the_step_resumes_from_the_shards(tmp_path):
    run = tmp_path / "run"
    # one rank blocks, holding its GIL, in its 2nd generate call; the other waits at the next barrier
    _step01(run, *TWO, "--set", "watchdog.stall_s=8", env={FAULT_ENV: "generate_hang:2@01"})
    rows = read_jsonl(run / "ledger.jsonl")
    assert [(r["status"], r["processes"]) for r in rows] == [("stalled", 2), ("ok", 2)]
    # the restart halves the batch (other batches, other seeds) for what the shards did not hold yet
    assert rows[0]["restart_with"] == "engine.batch_size=4"
    _assert_complete_without_duplicates(run)
    assert not _processes_of(run)


def test_a_killed_two_process_step_01_leaves_nothing_running_and_reruns_without_loss(
    tmp_path, one_process_01
):
    run = tmp_path / "run"
    fired = run / "heartbeat" / "faults_fired"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "run_all.py"),
            "--profile",
            "smoke",
            "--run-dir",
            str(run),
            "--steps",
            "01",
            *TWO,
        ],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, FAULT_ENV: "generate_hang:2@01"},  # holds one rank mid-step, the kill lands there
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not fired.exists():
        time.sleep(0.2)
    assert fired.exists(), "the step never reached its 2nd batch"
    time.sleep(2)  # the other rank appends its batch to its shard
    os.killpg(proc.pid, signal.SIGKILL)  # the orchestrator only: kernel, launcher and ranks must follow
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and _processes_of(run):
        time.sleep(0.2)
    assert not _processes_of(run), "processes of the killed run are still alive"
    assert any((run / "data" / "shards").glob("*/rank*.jsonl")), "nothing was generated before the kill"
    _step01(run, *TWO)
    _assert_same_as_one_process(run, one_process_01)


def test_a_missing_accelerate_config_stops_the_step_with_one_line(tmp_path):
    run = tmp_path / "run"
    args = ["--profile", "smoke", "--run-dir", str(run), "--steps", "01", *TWO]
    result = run_cli([*args, "--set", f"distributed.accelerate_config={tmp_path}/nope.yaml"])
    assert result.returncode != 0
    (line,) = [x for x in result.stderr.splitlines() if "nope.yaml" in x]
    assert "01_generate_instructions" in line and "does not exist" in line
    assert not (run / "data" / "instructions.jsonl").exists()


def test_the_plan_splits_into_disjoint_shards_that_cover_every_request():
    sampling = SamplingConfig()
    requests = [Request(f"r{i}", [1] * (i % 5 + 1), sampling) for i in range(37)]
    plan = plan_batches(requests, 8)
    shards = [[r.id for i, b in enumerate(plan) if i % 3 == rank for r in b] for rank in range(3)]
    flat = [i for shard in shards for i in shard]
    assert sorted(flat) == sorted(r.id for r in requests) and len(set(flat)) == len(flat)


def test_the_recipe_global_batch_is_kept_over_processes():
    assert per_process_batch(4, 4, 2) == (4, 2)  # fewer accumulation steps first
    assert per_process_batch(4, 1, 2) == (2, 1)  # then a smaller per-device batch
    assert per_process_batch(3, 1, 2) == (3, 1)  # neither divides: unchanged (the global batch grows)
    assert per_process_batch(4, 4, 1) == (4, 4)


def test_launch_command_names_the_processes_and_the_accelerate_config():
    cfg = load_config(
        "h100", ["distributed.num_processes=8", "distributed.accelerate_config=configs/accelerate/fsdp.yaml"]
    )
    cmd = launch_command(cfg, "training:train_dpo", ["--profile", "h100"])
    assert cmd[cmd.index("--num_processes") + 1] == "8"
    assert cmd[cmd.index("--config_file") + 1] == str(REPO / "configs" / "accelerate" / "fsdp.yaml")
    assert cmd[-4:] == ["synthetic_instruction_tuner.distributed", "training:train_dpo", "--profile", "h100"]


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero3", "two_machines"])
def test_shipped_accelerate_configs_parse_with_accelerate(name):
    cfg = load_config(
        "h100",
        ["distributed.num_processes=16", f"distributed.accelerate_config=configs/accelerate/{name}.yaml"],
    )
    built, problem = check_launch(cfg, "cuda")
    assert f"{name}.yaml" in built
    deepspeed_missing = name == "deepspeed_zero3" and not _installed("deepspeed")
    assert (problem is not None) == deepspeed_missing, problem


def test_preflight_names_a_missing_or_cpu_only_accelerate_config(tmp_path):
    cfg = load_config(
        "smoke", ["distributed.num_processes=2", f"distributed.accelerate_config={tmp_path}/nope.yaml"]
    )
    assert "nope.yaml" in check_launch(cfg, "cpu")[1]
    cfg = load_config(
        "smoke", ["distributed.num_processes=2", "distributed.accelerate_config=configs/accelerate/fsdp.yaml"]
    )
    assert (
        check_launch(cfg, "cpu")[1]
        == "distributed.accelerate_config fsdp.yaml: FSDP needs CUDA GPUs, not cpu"
    )


def test_num_processes_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match=r"distributed\.num_processes must be at least 1"):
        load_config("smoke", ["distributed.num_processes=0"])


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
def test_smoke_end_to_end_on_two_processes_matches_one_process(tmp_path, smoke_run):
    """The issue's acceptance run: every step's output has one process's counts (the data files are
    byte-identical), no id twice, and the ledger names 2 processes for every heavy step."""
    one, _ = smoke_run
    run = tmp_path / "run"
    result = run_cli(["--profile", "smoke", "--run-dir", str(run), *TWO], timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for path in sorted((one / "data").glob("*.json*")):
        assert (run / "data" / path.name).read_bytes() == path.read_bytes(), path.name
        if path.suffix == ".jsonl":
            ids = [r["id"] for r in read_jsonl(path) if "id" in r]
            assert len(ids) == len(set(ids)), path.name
    for method in ("sft_lora", "prompt_tuning", "dpo"):
        ours, theirs = (read_json(r / "adapters" / method / "metrics.json") for r in (run, one))
        assert (ours["global_step"], ours["effective_batch_size"], ours["processes"]) == (
            theirs["global_step"],
            theirs["effective_batch_size"],
            2,
        )
    ours, theirs = (read_json(r / "eval" / "summary.json") for r in (run, one))
    assert ours.keys() == theirs.keys()
    for method in ("base", "teacher"):  # untrained: the same numbers, lm-eval's data-parallel or not
        assert ours["metrics"][method] == theirs["metrics"][method]
    heavy = {r["step"]: r["processes"] for r in read_jsonl(run / "ledger.jsonl")}
    assert heavy == {step: 1 if step == "03_filter" else 2 for step in heavy} and len(heavy) == 8
