"""The run ledger: one row per step run with its time, peak memory, device and compute units.

Timing comes from the orchestrator, not from timers in cells: it watches the step's kernel process
tree from outside (RSS through psutil, GPU memory through nvidia-smi) while papermill executes it.
"""

from __future__ import annotations

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


def _gpu_memory_mb(pids: set[int]) -> float:
    if not shutil.which("nvidia-smi"):
        return 0.0
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return 0.0
    total = 0.0
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) in pids:
            total += float(parts[1])
    return total


class ResourceMonitor:
    """Samples the peak memory of this process's children (the papermill kernel and its workers)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_rss_mb = 0.0
        self.peak_gpu_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        rss = 0
        pids = set()
        for child in me.children(recursive=True):
            try:
                rss += child.memory_info().rss
                pids.add(child.pid)
            except psutil.Error:
                continue
        self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)
        if pids:
            self.peak_gpu_mb = max(self.peak_gpu_mb, _gpu_memory_mb(pids))

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
) -> dict[str, Any]:
    seconds = ended - started
    return {
        "run_id": run_id,
        "step": step,
        "profile": profile,
        "status": status,
        "start": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
        "end": datetime.fromtimestamp(ended, UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(monitor.peak_rss_mb, 1),
        "peak_gpu_mb": round(monitor.peak_gpu_mb, 1),
        "device": device,
        "compute_units_per_hour": units_per_hour,
        "compute_units": round(seconds / 3600 * units_per_hour, 4),
    }


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    return read_jsonl(path, required=LEDGER_KEYS) if path.exists() else []


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
