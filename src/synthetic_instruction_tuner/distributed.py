"""Scaling a step out with accelerate: the heavy call of a step runs in one process or under
`accelerate launch`.

A step cell calls `run("magpie:instructions_step", ctx)`. With `distributed.num_processes: 1` the
package function runs in the kernel. With more, the kernel starts `accelerate launch` (torchrun's
elastic agent underneath; gloo on CPU, NCCL on GPUs; FSDP, DeepSpeed or several machines through
`distributed.accelerate_config`), every process builds the same config and loads its own model, and
the function runs in each of them:

* **generation** (01, 02, 04's sweep) goes through `generate`: every process takes every
  world-th batch of the plan one process would run (the same batches and seeds), appends each
  finished batch durably to its own shard, `data/shards/<output>-<settings>/rank<N>.jsonl`, then all
  processes read the shards back in plan order, and the first process alone appends them to the
  step's usual file. A rerun after a kill reads the shards first and generates only what none holds;
  the usual file is keyed by id, so nothing is written twice;
* **training** (05, 05b, 06): TRL's trainers under DDP (or FSDP/DeepSpeed from the config), with the
  recipe's global batch kept (`per_process_batch`); checkpoints resume as in one process;
* **evaluation** (07): lm-eval's own data-parallel mode (`enable_data_parallel`).

The first process writes every file; the function's return value comes back to the kernel as JSON.
Every process beats the step's heartbeat: one that hangs leaves the others waiting at the next
collective, the heartbeat goes quiet, and the orchestrator's watchdog kills the kernel's process
group; the launcher dies with it and its processes follow (`PR_SET_PDEATHSIG`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import REPO_ROOT, Config
from .errors import ConfigError, GenerationError, PipelineError
from .store import JsonlAppender, read_json, read_jsonl, write_json
from .watchdog import heartbeat_path

PACKAGE = __package__ or "synthetic_instruction_tuner"
# the step functions that load the generator through `engines.load_engine`
GENERATOR_STEPS = ("magpie:instructions_step", "responses:responses_step", "preferences:preferences_step")
EVALUATION_STEP = "evaluation:run_evaluation"


# --- where this process stands ------------------------------------------------------------------------
def world_size() -> int:
    """Processes in this step's group (torchrun's WORLD_SIZE; 1 in the kernel)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """The process that writes the step's files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process of the group (nothing to wait for in one process)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def per_process_batch(per_device: int, accumulation: int, processes: int) -> tuple[int, int]:
    """(per-device batch, accumulation steps) that keep the recipe's global batch over `processes`:
    fewer accumulation steps first, then a smaller per-device batch; unchanged where neither divides."""
    if processes > 1 and accumulation % processes == 0:
        return per_device, accumulation // processes
    if processes > 1 and per_device % processes == 0:
        return per_device // processes, accumulation
    return per_device, accumulation


# --- the kernel side: launching -----------------------------------------------------------------------
def resolve_accelerate_config(value: str) -> Path:
    """An accelerate config path as given, or relative to the repository (configs/accelerate/...)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    return path.resolve() if path.exists() else REPO_ROOT / path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(cfg: Config, function: str, args: Sequence[str]) -> list[str]:
    """`accelerate launch` of this module's rank entry point for `function`."""
    d = cfg.distributed
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(d.num_processes)]
    if d.accelerate_config:
        path = resolve_accelerate_config(d.accelerate_config)
        if not path.is_file():
            raise ConfigError(
                f"distributed.accelerate_config: {path} does not exist; name a file such as "
                "configs/accelerate/ddp.yaml, or unset it for one machine"
            )
        cmd += ["--config_file", str(path)]
    else:  # one machine: torchrun's launcher, gloo on CPU, NCCL on GPUs; a free port per step
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--main_process_port", str(_free_port())]
    return [*cmd, "-m", f"{PACKAGE}.distributed", function, *args]


def _record_launch(record: dict[str, Any]) -> None:
    """What ran where, next to the step's heartbeat, for the ledger row (`ledger.launch_record`)."""
    beat_file = heartbeat_path()
    if beat_file is not None:
        write_json(beat_file.with_name(beat_file.stem + ".launch.json"), {"time": time.time(), **record})


def _call(function: str) -> Any:
    module, _, name = function.partition(":")
    return getattr(importlib.import_module(f"{PACKAGE}.{module}"), name)


_ERROR_LINE = re.compile(r"^\s*(\w+\.)*\w*(Error|Exception|Interrupt)\b.*")


def vllm_setting(cfg: Config, function: str) -> str | None:
    """The setting that puts this step's heavy call on vLLM (engine.backend for generation,
    evaluation.backend for step 07), or None."""
    if function in GENERATOR_STEPS and cfg.engine.backend == "vllm":
        return "engine.backend"
    if function == EVALUATION_STEP and cfg.evaluation.backend == "vllm":
        return "evaluation.backend"
    return None


def check_vllm(device: str, key: str = "engine.backend") -> None:
    """One line, before anything loads, where the setting `key` asks for vLLM and it cannot run here."""
    fallback = "transformers" if key == "engine.backend" else "hf"
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            f"{key} is vllm but vllm is not installed: pip install vllm on a CUDA machine, "
            f"or --set {key}={fallback}"
        )
    if device != "cuda":
        raise ConfigError(
            f"{key} is vllm but the device is {device}: vLLM needs a CUDA GPU; "
            f"use a GPU profile, or --set {key}={fallback}"
        )


def run(function: str, ctx: Any) -> Any:
    """Run the package function `module:name(cfg, paths, device)` for this step: in the kernel with
    one process, under `accelerate launch` with `distributed.num_processes` of them."""
    cfg: Config = ctx.cfg
    n = cfg.distributed.num_processes
    vllm_key = vllm_setting(cfg, function)
    if vllm_key:
        check_vllm(ctx.device, vllm_key)  # before anything loads
        n = 1  # vLLM spreads one engine over the GPUs itself (vllm_tensor_parallel_size)
    if n == 1:
        _record_launch({"processes": 1, "launcher": "kernel", "function": function})
        return _call(function)(cfg, ctx.paths, ctx.device)
    result = ctx.paths.root / "launch" / f"{function.replace(':', '.')}.json"
    result.unlink(missing_ok=True)
    args = ["--profile", ctx.profile, "--run-dir", str(ctx.paths.root), "--result", str(result)]
    for override in ctx.overrides:
        args += ["--set", override]
    cmd = launch_command(cfg, function, args)
    where = f"{n} processes ({'gloo on CPU' if ctx.device == 'cpu' else ctx.device})"
    print(f"accelerate launch: {function} on {where}", flush=True)
    _record_launch(
        {"processes": n, "launcher": "accelerate launch", "function": function, "command": " ".join(cmd)}
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n))),
    }
    status, tail = _echo(cmd, env)
    if status != 0 or not result.exists():
        errors = [line for line in tail if _ERROR_LINE.match(line)]
        cause = errors[-1].strip() if errors else (tail[-1] if tail else "no output")
        raise PipelineError(
            f"{function} under accelerate launch ({n} processes) exited with status {status}: "
            f"{cause} (the processes' log is in the step's notebook)"
        )
    value = read_json(result)
    result.unlink()
    return value


def _echo(cmd: list[str], env: dict[str, str]) -> tuple[int, deque[str]]:
    """Run the launcher, printing its output into the notebook (the processes' log is the step's
    record); its exit status and last lines."""
    tail: deque[str] = deque(maxlen=200)
    with subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_die_with_parent,  # a kernel killed outright takes the launcher with it
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line.rstrip())
    return proc.returncode, tail


def check_launch(cfg: Config, device: str) -> tuple[str, str | None]:
    """(how the steps would run, what stops them or None), the accelerate config read with
    accelerate's own loader: for `run_all.py --preflight`, on any machine."""
    d = cfg.distributed
    built = f"{d.num_processes} process(es) per heavy step" + (
        " (accelerate launch)" if d.num_processes > 1 else " (in the kernel)"
    )
    problem = None
    for key, what in (("engine.backend", "generation"), ("evaluation.backend", "evaluation")):
        if (cfg.engine.backend if key == "engine.backend" else cfg.evaluation.backend) != "vllm":
            continue
        built += f"; {what} through vLLM in one process (tensor parallel {d.vllm_tensor_parallel_size})"
        try:
            check_vllm(device, key)
        except PipelineError as exc:
            problem = problem or str(exc)
    if not d.accelerate_config:
        return built, problem
    from accelerate.commands.config.config_args import load_config_from_file

    path = resolve_accelerate_config(d.accelerate_config)
    try:
        launch = load_config_from_file(str(path))
    except Exception as exc:  # accelerate's loader: missing file, bad YAML, unknown keys
        return built, f"distributed.accelerate_config {path}: {type(exc).__name__}: {exc}"
    kind = getattr(launch.distributed_type, "value", str(launch.distributed_type))
    built += f"; {path.name}: {kind} on {launch.num_machines} machine(s)"
    if kind in ("FSDP", "DEEPSPEED") and device != "cuda":
        problem = (
            problem or f"distributed.accelerate_config {path.name}: {kind} needs CUDA GPUs, not {device}"
        )
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        problem = (
            problem
            or f"distributed.accelerate_config {path.name}: DeepSpeed is not installed: pip install deepspeed"
        )
    if launch.num_machines > 1 and not launch.main_process_ip:
        problem = (
            problem or f"distributed.accelerate_config {path.name}: several machines need main_process_ip"
        )
    if d.num_processes < launch.num_machines:
        problem = problem or (
            f"distributed.num_processes={d.num_processes} is fewer than the {launch.num_machines} machines "
            f"of {path.name}: count the processes of every machine"
        )
    return built, problem


# --- the process side ---------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies. torchrun starts each process in a
    session of its own, out of reach of the watchdog's process-group kill, and a kernel killed by its
    own parent's death (kernels.py) kills no children."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def main(argv: list[str] | None = None) -> int:
    """One process of a launched step: the same config and run directory, its own model."""
    _die_with_parent()
    parser = argparse.ArgumentParser(prog=f"python -m {PACKAGE}.distributed")
    parser.add_argument("function")
    parser.add_argument("--profile", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args(argv)
    from accelerate import PartialState

    from .steps import start_step

    ctx = start_step(args.profile, args.run_dir, args.overrides)
    PartialState(cpu=ctx.device == "cpu")  # gloo on CPU; sets the process group up for TRL and lm-eval
    value = _call(args.function)(ctx.cfg, ctx.paths, ctx.device)
    barrier()
    if is_main_process():
        write_json(args.result, value)
    return 0


# --- durable outputs and sharded generation -----------------------------------------------------------
class _MainProcessView(JsonlAppender):
    """The first process's output file as another process sees it: its records on disk, appends kept
    in memory, so every process follows the same loop without writing the file twice."""

    def __init__(self, path: str | Path, key: str = "id", required: Sequence[str] = ()) -> None:
        self.path = Path(path)
        self.key = key
        self.records = read_jsonl(self.path, (key, *required)) if self.path.exists() else []
        self._keys = {r[key] for r in self.records}

    def append(self, records: Any) -> int:
        records = [records] if isinstance(records, dict) else list(records)
        new = [r for r in records if r[self.key] not in self._keys]
        self.records.extend(new)
        self._keys.update(r[self.key] for r in new)
        return len(new)

    def close(self) -> None:
        pass


@contextmanager
def output(path: str | Path, key: str = "id", required: Sequence[str] = ()) -> Iterator[JsonlAppender]:
    """A step's durable output: the appender itself in the first process (opened, and any torn line
    repaired, before the others read the file), a read-only view of it in the others."""
    appender = JsonlAppender(path, key=key, required=required) if is_main_process() else None
    barrier()
    view = appender if appender is not None else _MainProcessView(path, key, required)
    try:
        yield view
    finally:
        view.close()


def shard_dir(out_path: str | Path, settings: dict[str, Any]) -> Path:
    """Where the processes' shards for `out_path` live; other settings get other shards."""
    out_path = Path(out_path)
    tag = zlib.crc32(json.dumps(settings, sort_keys=True, default=str).encode()) & 0xFFFFFFFF
    return out_path.parent / "shards" / f"{out_path.stem}-{tag:08x}"


def _request_check(request: Any) -> int:
    s = request.sampling
    key = f"{request.prompt_ids}|{s.temperature}|{s.top_p}|{s.top_k}|{s.max_new_tokens}"
    return zlib.crc32(key.encode())


def _read_shards(directory: Path, requests: Sequence[Any]) -> dict[str, Any]:
    """Completions in every process's shard for these requests (complete lines only: a process killed
    mid-write leaves a torn last line, which is generated again)."""
    from .generation import Completion

    wanted = {r.id: _request_check(r) for r in requests}
    done: dict[str, Any] = {}
    for shard in sorted(directory.glob("rank*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n") or not line.strip():
                continue
            r = json.loads(line)
            if wanted.get(r["id"]) == r["check"]:
                done[r["id"]] = Completion(r["text"], r["token_ids"], r["finish_reason"], r["seed"])
    return done


def generate(
    engine: Any, requests: Sequence[Any], shards: Path, desc: str = "generating"
) -> Iterator[list[tuple[Any, Any]]]:
    """Finished batches of (request, completion), in the order one process would produce them.

    One process: the engine's own stream. Several: each generates its share of the batches not yet
    in any shard into its own shard; once all are done, every process yields all of them in plan
    order (the first process appends them to the step's file, the others follow the same loop)."""
    from .generation import plan_batches

    processes = world_size()
    if processes == 1:
        yield from engine.stream(requests, desc=desc)
        return
    barrier()  # the previous round's shards are complete
    done = _read_shards(shards, requests)
    barrier()  # every process has read them before any appends
    pending = [r for r in requests if r.id not in done]
    with JsonlAppender(shards / f"rank{rank()}.jsonl") as mine:
        for batch in engine.stream(pending, desc=desc, shard=(rank(), processes)):
            mine.append(
                {
                    "id": request.id,
                    "check": _request_check(request),
                    "text": c.text,
                    "token_ids": c.token_ids,
                    "finish_reason": c.finish_reason,
                    "seed": c.seed,
                }
                for request, c in batch
            )
    barrier()
    done = _read_shards(shards, requests)
    missing = [r.id for r in requests if r.id not in done]
    if missing:
        raise GenerationError(
            f"{shards}: {len(missing)} requests (first {missing[0]!r}) missing after every process "
            "finished; rerun the step"
        )
    for batch in plan_batches(requests, engine.planned_batch_size):
        yield [(request, done[request.id]) for request in batch]


def clear_shards(shards: Path) -> None:
    """Once the step's file holds everything: remove the shards (first process, after all read them)."""
    if world_size() > 1:
        barrier()
        if is_main_process():
            shutil.rmtree(shards, ignore_errors=True)
            with contextlib.suppress(OSError):  # data/shards/ itself, once no step's shards are left
                shards.parent.rmdir()


def enable_data_parallel(lm: Any) -> Any:
    """lm-eval's data-parallel mode for its `hf` model given an already loaded model: the evaluator
    splits the requests by `lm.rank`/`lm.world_size` and gathers them through `lm.accelerator`, the
    attributes HFLM sets itself when it loads a model under `accelerate launch`."""
    if world_size() > 1:
        from accelerate import Accelerator

        lm.accelerator = Accelerator()
        lm._rank, lm._world_size = rank(), world_size()
    return lm


if __name__ == "__main__":
    sys.exit(main())
