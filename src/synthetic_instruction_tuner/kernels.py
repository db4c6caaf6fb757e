"""The kernels that papermill runs steps in: local IPC sockets, and no life beyond `run_all.py`.

jupyter_client starts each kernel in a session (process group) of its own, which is what lets the
watchdog kill a kernel together with its workers (`kill_kernels`). The same detachment means that
killing `run_all.py` does not reach the kernel: ipykernel's parent poller would notice within a
second, but it is a Python thread, and a kernel hung in a C call that holds the GIL never runs it. So:

* on Linux every kernel asks, before ipykernel starts, to receive SIGKILL when `run_all.py` dies
  (`PR_SET_PDEATHSIG`: the operating system delivers it, whatever state the kernel is in; this covers
  SIGKILL of `run_all.py`). The "parent" is the thread that started the kernel: papermill runs in
  the main thread;
* SIGTERM and SIGINT of `run_all.py` kill the running kernel's whole process group first
  (`kernels_die_with_run`).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_RUNNING: dict[int, int] = {}  # kernel pid -> its process group
_LOCK = threading.Lock()

# Runs ipykernel after asking Linux to kill the kernel when its parent dies.
_BOOT = (
    "import ctypes, os, runpy, signal, sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"  # 1 = PR_SET_PDEATHSIG
    "    if os.environ.get('JPY_PARENT_PID', str(os.getppid())) != str(os.getppid()):\n"
    "        os._exit(1)\n"  # the parent died before prctl took effect
    "runpy.run_module('ipykernel_launcher', run_name='__main__', alter_sys=True)\n"
)


def kernel_manager_class(env: Mapping[str, str] | None = None, log: Path | None = None) -> type:
    """An async kernel manager for papermill: IPC sockets (no TCP ports, and no "running over TCP"
    warning on stderr), `env` added to the kernel's environment, the kernel process's own stderr
    (ipykernel's log lines, e.g. "KeyboardInterrupt caught in kernel" at shutdown) appended to `log`
    rather than the console, and the kernel registered for `kill_kernels` and tied to this process's life."""
    from jupyter_client.manager import AsyncKernelManager

    extra_env = dict(env or {})

    class PipelineKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs: Any) -> None:
            kwargs.setdefault("transport", "ipc")
            kwargs.setdefault("ip", str(Path(tempfile.gettempdir()) / f"sit-kernel-{uuid.uuid4().hex[:8]}"))
            super().__init__(**kwargs)

        def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
            cmd = super().format_kernel_cmd(extra_arguments)
            for i in range(len(cmd) - 1):
                if cmd[i : i + 2] == ["-m", "ipykernel_launcher"]:
                    return [*cmd[:i], "-c", _BOOT, *cmd[i + 2 :]]
            return cmd

        async def _async_launch_kernel(self, kernel_cmd: list[str], **kw: Any) -> None:
            kw["env"] = {**kw.get("env", os.environ), **extra_env}
            if log is not None:
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "ab") as fh:  # the child keeps its own copy of the descriptor
                    await super()._async_launch_kernel(kernel_cmd, **kw, stderr=fh)
            else:
                await super()._async_launch_kernel(kernel_cmd, **kw)
            provisioner: Any = self.provisioner
            with _LOCK:
                _RUNNING[provisioner.pid] = provisioner.pgid or provisioner.pid

    return PipelineKernelManager


def kill_kernels() -> None:
    """SIGKILL every running kernel's process group (the kernel and any workers it started)."""
    with _LOCK:
        groups = list(_RUNNING.items())
    for pid, group in groups:
        try:
            if group != os.getpgrp():
                os.killpg(group, signal.SIGKILL)
            else:  # never our own group
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def forget_kernels() -> None:
    """Called once papermill has shut its kernel down: its process group id may be reused."""
    with _LOCK:
        _RUNNING.clear()


@contextmanager
def kernels_die_with_run() -> Iterator[None]:
    """While inside: SIGTERM or SIGINT kills the running kernels, then ends this process (143 / 130)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        kill_kernels()
        print(
            f"run_all: stopped by {signal.Signals(signum).name}; the running step's kernel was killed "
            "(rerun to resume)",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(128 + signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
