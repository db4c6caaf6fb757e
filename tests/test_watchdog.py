"""The watchdog as a user meets it: a generate() or a training step that never returns, on smoke.

Hangs are injected with the documented `SIT_FAULT` hook (watchdog.py): a C call that holds the GIL
forever, inside the model's forward pass or at the end of a training step, so neither the engine's
per-batch deadline nor any thread of the kernel can notice it.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, run_cli

from synthetic_instruction_tuner.store import read_jsonl
from synthetic_instruction_tuner.watchdog import FAULT_ENV, HEARTBEAT_ENV, STEP_ENV, HeartbeatWatch, fault_due

STALL_S = 10  # a smoke batch or training step takes well under a second, even on a busy machine


def _ledger(run: Path) -> list[dict]:
    return read_jsonl(run / "ledger.jsonl")


def _kernels_of(run: Path) -> list[psutil.Process]:
    """Live processes started for `run` (the orchestrator gives every kernel its heartbeat path)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(HEARTBEAT_ENV, "").startswith(str(run)):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_generate_that_never_returns_in_step_01_is_killed_and_the_step_resumes(tmp_path):
    run = tmp_path / "run"
    started = time.time()
    result = run_cli(
        [
            "--profile",
            "smoke",
            "--run-dir",
            str(run),
            "--steps",
            "01",
            "--set",
            f"watchdog.stall_s={STALL_S}",
        ],
        env={FAULT_ENV: "generate_hang:2@01"},
    )
    elapsed = time.time() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    records = read_jsonl(run / "data" / "instructions.jsonl")
    assert len(records) == 24 and len({r["id"] for r in records}) == 24
    stalled, ok = _ledger(run)
    assert (stalled["status"], ok["status"]) == ("stalled", "ok")
    assert stalled["stalled"] == "instructions: a batch of 8 (8 of 32 done)"
    assert STALL_S <= stalled["quiet_s"] < STALL_S + 3  # killed as soon as the heartbeat was quiet
    assert stalled["restart_with"] == "engine.batch_size=4" and ok["attempt"] == 2
    assert "01_generate_instructions: stalled (no heartbeat for 10 s" in result.stdout
    # stall_s plus the restart: both attempts account for the whole run, which ended on its own
    assert elapsed < stalled["seconds"] + ok["seconds"] + 30


def _copy_steps_01_to_03(source: Path, run: Path) -> None:
    (run / "data").mkdir(parents=True)
    for name in ("instructions", "instructions_rejected", "responses", "sft", "filtered_out"):
        shutil.copy2(source / "data" / f"{name}.jsonl", run / "data")
    shutil.copy2(source / "data" / "funnel.json", run / "data")


def test_hangs_in_step_04_and_in_training_resume_from_jsonl_and_checkpoint(tmp_path, smoke_run):
    clean, _ = smoke_run
    run = tmp_path / "run"
    _copy_steps_01_to_03(clean, run)
    result = run_cli(
        [
            "--profile",
            "smoke",
            "--run-dir",
            str(run),
            "--steps",
            "04,05",
            "--set",
            f"watchdog.stall_s={STALL_S}",
        ],
        env={FAULT_ENV: "generate_hang:2@04,train_hang:3@05"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    rows = [(r["step"], r["status"]) for r in _ledger(run)]
    assert rows == [
        ("04_build_preferences", "stalled"),
        ("04_build_preferences", "ok"),
        ("05_sft_lora", "stalled"),
        ("05_sft_lora", "ok"),
    ]
    sweep_stall, _, train_stall, _ = _ledger(run)
    assert sweep_stall["stalled"].startswith("preference sweep: a batch of")
    assert sweep_stall["restart_with"] == "engine.batch_size=4"
    assert train_stall["stalled"] == "training: step 3 of 4 done" and "restart_with" not in train_stall
    # step 04: every sweep sample once, as many as a clean run has
    samples = read_jsonl(run / "data" / "preference_samples.jsonl")
    assert len({s["id"] for s in samples}) == len(samples)
    assert len(samples) == len(read_jsonl(clean / "data" / "preference_samples.jsonl"))
    assert len(read_jsonl(run / "data" / "preferences.jsonl")) == len(
        read_jsonl(clean / "data" / "preferences.jsonl")
    )
    # step 05: the restart resumed from the checkpoint saved at step 2 and trained to the end
    metrics = json.loads((run / "adapters" / "sft_lora" / "metrics.json").read_text())
    assert metrics["resumed_from_checkpoint"] == "checkpoint-2"
    assert metrics["global_step"] == 4
    assert [p["step"] for p in metrics["curves"]["train"]] == [1, 2, 3, 4]


def test_a_step_that_stalls_after_every_restart_stops_the_run_with_one_line(tmp_path):
    run = tmp_path / "run"
    args = ["--profile", "smoke", "--run-dir", str(run), "--steps", "01"]
    args += ["--set", "watchdog.stall_s=5", "--set", "watchdog.max_restarts=1"]
    result = run_cli(args, env={FAULT_ENV: "generate_hang:2@01:always"})
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("run_all: error: step 01_generate_instructions stalled 2 times")
    assert "no heartbeat for 5 s (watchdog.stall_s) after: instructions: a batch of 4" in line
    assert "lower engine.batch_size (last 4) or raise watchdog.stall_s if the step is only slow" in line
    assert [(r["status"], r.get("restart_with")) for r in _ledger(run)] == [
        ("stalled", "engine.batch_size=4"),
        ("stalled", None),
    ]
    assert not _kernels_of(run)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_run_all_ends_its_hung_kernel(tmp_path, sig):
    """The kernel hangs holding the GIL, so ipykernel's own parent poller cannot save the day."""
    run = tmp_path / "run"
    heartbeat = run / "heartbeat" / "01_generate_instructions.json"
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
        ],
        cwd=REPO,
        env={**os.environ, FAULT_ENV: "generate_hang:1@01:always"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if heartbeat.exists() and "a batch of" in heartbeat.read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None and _kernels_of(run), "the step never reached generation"
        time.sleep(1)  # into the hang
        proc.send_signal(sig)  # run_all.py alone: the kernel is in a process group of its own
        proc.wait(timeout=30)
        deadline = time.time() + 5
        while _kernels_of(run) and time.time() < deadline:
            time.sleep(0.2)
        assert not _kernels_of(run)
        if sig == signal.SIGTERM:
            assert proc.returncode == 128 + signal.SIGTERM
            assert "stopped by SIGTERM; the running step's kernel was killed" in proc.stderr.read()
    finally:
        proc.kill()
        for kernel in _kernels_of(run):
            kernel.kill()


def test_the_watch_allows_startup_time_then_calls_a_stall_on_silence(tmp_path):
    path = tmp_path / "heartbeat.json"
    watch = HeartbeatWatch(path, stall_s=10, startup_s=100, on_stall=lambda: None)
    t0 = watch.started
    assert watch.check(t0 + 99) is None  # no beat yet: model loading
    stall = watch.check(t0 + 101)
    assert (stall.limit, stall.message) == ("watchdog.startup_s", "no heartbeat since the kernel started")
    path.write_text(json.dumps({"time": t0 + 50, "message": "loading the generator", "loading": True}))
    assert watch.check(t0 + 149) is None
    path.write_text(json.dumps({"time": t0 + 150, "message": "a batch of 8", "loading": False}))
    assert watch.check(t0 + 159) is None
    stall = watch.check(t0 + 161)
    assert (stall.limit, stall.message, round(stall.quiet_s)) == ("watchdog.stall_s", "a batch of 8", 11)


def test_a_fault_fires_once_per_run_directory_in_its_step(tmp_path, monkeypatch):
    monkeypatch.setenv(HEARTBEAT_ENV, str(tmp_path / "heartbeat" / "04_build_preferences.json"))
    monkeypatch.setenv(STEP_ENV, "04_build_preferences")
    monkeypatch.setenv(FAULT_ENV, "train_hang:3@04,train_hang:2@01")
    (tmp_path / "heartbeat").mkdir()
    assert [fault_due("train_hang", count=n) for n in (1, 2, 3)] == [False, False, True]
    assert not fault_due("train_hang", count=3)  # a restarted step runs through
    assert (tmp_path / "heartbeat" / "faults_fired").read_text() == "train_hang:3@04\n"
    monkeypatch.setenv(FAULT_ENV, "train_hang:3@04:always")
    assert fault_due("train_hang", count=3) and fault_due("train_hang", count=3)


def test_gpu_memory_in_the_ledger_comes_from_inside_the_kernel(tmp_path):
    """On a CPU machine: no CUDA reads as 0; a kernel whose torch reports CUDA memory (faked here,
    the only way without a GPU) gets that peak into its ledger row through the heartbeat."""
    import torch  # noqa: F401 - the reading path with torch loaded and no CUDA

    from synthetic_instruction_tuner.config import WatchdogConfig
    from synthetic_instruction_tuner.orchestrator import run_step
    from synthetic_instruction_tuner.steps import Step
    from synthetic_instruction_tuner.store import run_paths
    from synthetic_instruction_tuner.watchdog import gpu_peak_mb

    assert gpu_peak_mb() == 0.0
    probe = tmp_path / "probe.py"
    probe.write_text(
        '# %% tags=["parameters"]\nprofile = "smoke"\n\n# %%\nimport torch\n\n'
        "from synthetic_instruction_tuner.watchdog import beat\n\n"
        "torch.cuda.is_available = torch.cuda.is_initialized = lambda: True\n"
        "torch.cuda.device_count = lambda: 1\n"
        "torch.cuda.max_memory_allocated = lambda device=None: 1234 * 2**20\n"
        'beat("probing")\n'
    )
    run = tmp_path / "run"
    context = {"run_id": "probe", "profile": "smoke", "device": "cpu", "units_per_hour": 0.0}
    row = run_step(
        Step("probe", str(probe), (), ()),
        run_paths(run),
        {"profile": "smoke"},
        context,
        watchdog=WatchdogConfig(stall_s=30, startup_s=120, max_restarts=0),
    )
    assert row["status"] == "ok" and row["peak_gpu_mb"] == 1234.0
    assert _ledger(run)[0]["peak_gpu_mb"] == 1234.0
