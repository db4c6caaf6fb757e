"""The run ledger: one row per step run with its time, peak memory, device and compute units.

Timing comes from the orchestrator, not from timers in cells: it watches the step's kernel process
tree from outside (RSS through psutil) while papermill executes it. GPU memory comes from inside the
kernel (`peak_gpu_mb`: `torch.cuda.max_memory_allocated`, carried by the step's heartbeat), since
per-process GPU accounting (nvidia-smi's process list) is empty inside containers such as Colab's;
`peak_gpu_device_mb` is the device's used memory (pynvml or nvidia-smi), CUDA context and cache included.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from .store import JsonlAppender, read_jsonl

LEDGER_KEYS = ("row", "run_id", "step", "profile", "status", "start", "end", "seconds", "device")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def device_description(device: str) -> str:
    """e.g. 'cuda: NVIDIA A100-SXM4-40GB' or 'cpu: x86_64, 2 cores'."""
    if device == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                return f"cuda: {torch.cuda.get_device_name(0)}"
        except ImportError:
            pass
    return f"cpu: {platform.machine()}, {os.cpu_count()} cores"


def _gpu_device_memory_mb() -> float:
    """Memory in use on every GPU of the machine (all processes), or 0.0 where there is none."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return (
                sum(
                    pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
                    for i in range(pynvml.nvmlDeviceGetCount())
                )
                / 2**20
            )
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # not installed, or no driver: nvidia-smi, then nothing
        pass
    if not shutil.which("nvidia-smi"):
        return 0.0
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0.0
    return sum(float(line) for line in out.split() if line.replace(".", "", 1).isdigit())


class ResourceMonitor:
    """Samples the peak memory of this process's children (the papermill kernel and its workers) and
    of the GPUs while they run."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_rss_mb = 0.0
        self.peak_gpu_device_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        rss = 0
        children = me.children(recursive=True)
        for child in children:
            try:
                rss += child.memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)
        if children:
            self.peak_gpu_device_mb = max(self.peak_gpu_device_mb, _gpu_device_memory_mb())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> ResourceMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def append_row(path: str | Path, row: dict[str, Any]) -> dict[str, Any]:
    row = {"row": uuid.uuid4().hex[:12], **row}
    with JsonlAppender(path, key="row") as ledger:
        ledger.append(row)
    return row


def step_row(
    run_id: str,
    step: str,
    profile: str,
    status: str,
    started: float,
    ended: float,
    monitor: ResourceMonitor,
    device: str,
    units_per_hour: float,
    peak_gpu_mb: float = 0.0,
    launch: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`peak_gpu_mb`: the kernel's own peak (its heartbeat's), 0 on a CPU. `launch`: how the step's
    heavy call ran (`launch_record`); a step without one ran in its kernel, in one process."""
    seconds = ended - started
    launch = launch or {}
    return {
        "run_id": run_id,
        "step": step,
        "profile": profile,
        "status": status,
        "start": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "end": datetime.fromtimestamp(ended, UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(monitor.peak_rss_mb, 1),
        "peak_gpu_mb": round(peak_gpu_mb, 1),
        "peak_gpu_device_mb": round(monitor.peak_gpu_device_mb, 1),
        "device": device,
        "processes": launch.get("processes", 1),
        "launcher": launch.get("launcher", "kernel"),
        **({"launch_command": launch["command"]} if "command" in launch else {}),
        "compute_units_per_hour": units_per_hour,
        "compute_units": round(seconds / 3600 * units_per_hour, 4),
    }


def launch_record(heartbeat: Path, since: float) -> dict[str, Any] | None:
    """What `distributed.run` recorded beside the step's heartbeat during the attempt that began at
    `since` (processes, launcher, command), or None."""
    path = heartbeat.with_name(heartbeat.stem + ".launch.json")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("time", 0) >= since else None


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    return read_jsonl(path, required=LEDGER_KEYS) if path.exists() else []


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
