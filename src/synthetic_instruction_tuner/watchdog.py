"""The step watchdog: heartbeats written from inside a step's kernel, watched from the orchestrator.

`generate` that never returns is a deadlock inside the process: a stopping criterion (the engine's
per-batch deadline) is never consulted again, and nothing in the kernel can notice. So the step reports
progress to a file and the orchestrator watches that file from outside:

* **Kernel side.** `beat(message)` writes `<run dir>/heartbeat/<step>.json` (the path comes from the
  `SIT_HEARTBEAT` environment variable the orchestrator gives the kernel; without it `beat` does
  nothing). The generation engine beats after every forward pass and every batch, the trainers after
  every step (`trainer_callback`), the evaluator after every forward pass. A beat marked `loading`
  (model loading, the first batch, a new task) grants the next beat the longer `watchdog.startup_s`.
  Each beat also carries the kernel's peak GPU memory (`torch.cuda.max_memory_allocated`; a step runs
  in a fresh kernel, so the peak is per step), which the orchestrator writes to the ledger.
* **Orchestrator side.** `HeartbeatWatch` polls the file from a thread. No beat for `watchdog.stall_s`
  (or `startup_s` before the first beat and after a loading one) is a stall: it calls `on_stall`, which
  kills the kernel's process group; the orchestrator records the stall and restarts the step.

Testing hook: `SIT_FAULT` injects a hang that never returns, never consults a stopping criterion and
holds the GIL (so no thread of the kernel runs either). A comma-separated list of `KIND:N[@STEP][:always]`:

* `generate_hang:2` blocks inside the first forward pass of the engine's 2nd `generate` call;
* `train_hang:3` blocks at the end of training step 3 (after the checkpoints before it were saved);
* `@04` limits an entry to one step (a step name or its number, as `--steps` takes them);
* an entry fires once per run directory (recorded in `heartbeat/faults_fired`), so the restarted step
  can finish; `:always` makes it fire in every attempt.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

HEARTBEAT_ENV = "SIT_HEARTBEAT"  # path of the heartbeat file, set by the orchestrator for the kernel
STEP_ENV = "SIT_STEP"  # name of the step the kernel runs
FAULT_ENV = "SIT_FAULT"  # testing hook, see the module docstring
MIN_INTERVAL_S = 1.0  # beats closer together than this are not written (loading and forced ones are)

_last = {"written": 0.0, "loading": False, "beats": 0}
_calls: Counter[str] = Counter()
_fired_here: set[str] = set()


def heartbeat_path() -> Path | None:
    value = os.environ.get(HEARTBEAT_ENV)
    return Path(value) if value else None


def gpu_peak_mb() -> float:
    """Peak GPU memory allocated by this process's tensors, or 0.0 where CUDA was never used."""
    torch = sys.modules.get("torch")  # never import torch (or initialise CUDA) just to report
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0.0
    return sum(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / 2**20


def beat(message: str, *, kind: str = "", loading: bool = False, force: bool = False, **fields: Any) -> None:
    """Report progress: what the step is doing now. Cheap enough to call after every forward pass.

    `loading`: what follows may take up to `watchdog.startup_s` (loading a model, a first batch).
    `fields` travel with the beat; `batch_setting`/`batch_size` name the setting that a restart after
    a stall halves (e.g. `engine.batch_size`).
    """
    path = heartbeat_path()
    if path is None:
        return
    now = time.monotonic()
    if not (force or loading or _last["loading"]) and now - _last["written"] < MIN_INTERVAL_S:
        return
    if not _last["beats"]:
        atexit.register(_final_beat)
    _last.update(written=now, loading=loading, beats=_last["beats"] + 1)
    record = {
        "time": time.time(),
        "pid": os.getpid(),
        "message": message,
        "kind": kind,
        "loading": loading,
        "beats": _last["beats"],
        "peak_gpu_mb": round(gpu_peak_mb(), 1),
        **fields,
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)  # the watcher never reads half a beat
    except OSError:
        pass  # a beat that cannot be written must not end a long step; the watchdog reports the silence


def _final_beat() -> None:
    """At kernel exit: one last beat, so the ledger gets the step's final peak GPU memory."""
    beat("step finished", kind="exit", force=True)


@contextmanager
def watch_forward(model: Any, message: str, fault: str | None = None, **fields: Any) -> Iterator[None]:
    """Beat after every forward pass of `model` inside the block (token by token during `generate`);
    with `fault` due (see `SIT_FAULT`), the first forward pass hangs instead."""
    hang_now = fault is not None and fault_due(fault)
    if heartbeat_path() is None and not hang_now:
        yield
        return
    # PEFT's generate runs the base model's forward, not the wrapper's
    module = model.get_base_model() if hasattr(model, "get_base_model") else model
    handles = [module.register_forward_hook(lambda *_: beat(message, **fields))]
    if hang_now:
        handles.append(module.register_forward_pre_hook(lambda *_: hang()))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trainer_callback() -> Any:
    """A transformers TrainerCallback that beats after every (accumulation) step and eval batch."""
    from transformers import TrainerCallback

    class Heartbeat(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # the first step may compile kernels or load a checkpoint's optimizer state
            beat(f"training: starting at step {state.global_step}", kind="train", loading=True)

        def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            beat(f"training: accumulating step {state.global_step + 1} of {state.max_steps}", kind="train")

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            beat(f"training: step {state.global_step} of {state.max_steps} done", kind="train", force=True)
            if fault_due("train_hang", count=state.global_step):
                hang()

        def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            beat(f"training: evaluating at step {state.global_step}", kind="train")

    return Heartbeat()


# --- testing hook -------------------------------------------------------------------------------------
_FAULT = re.compile(r"(?P<kind>\w+):(?P<n>\d+)(?:@(?P<step>[\w.]+))?(?P<always>:always)?")


def _step_matches(token: str, step: str) -> bool:
    return step == token or step.split("_")[0] == token


def fault_due(kind: str, count: int | None = None) -> bool:
    """Whether a `SIT_FAULT` entry of `kind` fires now: at the Nth call (or at `count`, e.g. a training
    step), in the right step, and not fired before in this run directory unless `:always`."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return False
    if count is None:
        _calls[kind] += 1
        count = _calls[kind]
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        match = _FAULT.fullmatch(entry)
        if match is None:
            raise ValueError(f"{FAULT_ENV}: {entry!r} is not KIND:N[@STEP][:always]")
        if match["kind"] != kind or int(match["n"]) != count:
            continue
        if match["step"] and not _step_matches(match["step"], os.environ.get(STEP_ENV, "")):
            continue
        if match["always"] or _first_firing(entry):
            return True
    return False


def _first_firing(entry: str) -> bool:
    """Record that `entry` fired; False if it had already fired in this run directory."""
    path = heartbeat_path()
    if path is None:
        fired = entry in _fired_here
        _fired_here.add(entry)
        return not fired
    record = path.parent / "faults_fired"
    if record.exists() and entry in record.read_text().splitlines():
        return False
    with record.open("a") as f:
        f.write(entry + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def hang() -> NoReturn:
    """Block forever inside a C call that keeps the GIL: as dead as a deadlocked CUDA call."""
    import ctypes

    pause = ctypes.PyDLL(None).pause  # PyDLL: the GIL is not released during the call
    while True:
        pause()


# --- orchestrator side ----------------------------------------------------------------------------------
@dataclass
class Stall:
    message: str  # what the step last reported doing
    quiet_s: float  # seconds without a beat when the stall was called
    limit: str  # the setting that was exceeded, e.g. "watchdog.stall_s"
    limit_s: float
    heartbeat: dict[str, Any] | None  # the last beat


class HeartbeatWatch:
    """Polls a heartbeat file from a thread; calls `on_stall` once if it goes quiet for too long."""

    def __init__(
        self,
        path: Path,
        stall_s: float,
        startup_s: float,
        on_stall: Callable[[], None],
        poll_s: float = 0.5,
    ) -> None:
        self.path = path
        self.stall_s = stall_s
        self.startup_s = startup_s
        self.on_stall = on_stall
        self.poll_s = poll_s
        self.started = time.time()
        self.stall: Stall | None = None
        self.longest_quiet_s = 0.0  # longest silence seen under stall_s: how close the step came to it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="heartbeat-watch")

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def check(self, now: float) -> Stall | None:
        """The stall at wall-clock time `now`, if any."""
        last = self.read()
        if last is None or last.get("time", 0) < self.started:  # nothing from this attempt yet
            since, limit, limit_s = self.started, "watchdog.startup_s", self.startup_s
            message = "no heartbeat since the kernel started"
        else:
            since = last["time"]
            limit, limit_s = (
                ("watchdog.startup_s", self.startup_s)
                if last.get("loading")
                else ("watchdog.stall_s", self.stall_s)
            )
            message = str(last.get("message", ""))
        quiet = now - since
        if limit == "watchdog.stall_s":
            self.longest_quiet_s = max(self.longest_quiet_s, quiet)
        return Stall(message, quiet, limit, limit_s, last) if quiet > limit_s else None

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            stall = self.check(time.time())
            if stall is not None:
                self.stall = stall
                self.on_stall()
                return

    def __enter__(self) -> HeartbeatWatch:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        for leftover in self.path.parent.glob(f".{self.path.name}.*.tmp"):  # from a kernel killed mid-beat
            leftover.unlink(missing_ok=True)
        self.started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
