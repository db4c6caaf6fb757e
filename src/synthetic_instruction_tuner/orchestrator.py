"""`run_all.py`: execute the pipeline's percent-format steps with papermill, then render the reports.

Each step file is read with jupytext, executed in a fresh kernel with the profile's parameters
injected after its `parameters` cell, and saved executed under `<run dir>/notebooks/`. A step whose
outputs are complete and up to date is skipped; the first failure stops the run with one line naming
the step, the cell, the error and the step's full log. Every executed step appends a row to
`<run dir>/ledger.jsonl`.

The console shows one line per step as it starts and ends, and the progress bars of its long loops
(`console.py`); papermill's per-cell log and the cells' output go to `<run dir>/logs/<step>.log`.

Each step runs under the watchdog (`watchdog.py`): a step whose heartbeat goes quiet is killed with
its kernel's process group, recorded as "stalled" in the ledger, and restarted.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .config import PROFILES, REPO_ROOT, Config, WatchdogConfig, load_config
from .console import Console, StepLog, duration, log_path, notebook_title, setup_logging
from .errors import PipelineError
from .fingerprints import clear_state, write_state
from .kernels import forget_kernels, kernel_manager_class, kernels_die_with_run, kill_kernels
from .ledger import (
    ResourceMonitor,
    append_row,
    device_description,
    launch_record,
    new_run_id,
    step_row,
)
from .steps import PIPELINE, Step, default_run_dir, existing_steps, pipeline_status, step_status
from .store import JsonlAppender, RunPaths, atomic_write_text, run_paths
from .watchdog import HEARTBEAT_ENV, STEP_ENV, HeartbeatWatch, Stall

ANALYSIS = ("analysis/compute_costs.py", "analysis/method_comparison.py")


class StepFailed(PipelineError):
    pass


class ReportFailed(PipelineError):
    pass


class StepStalled(PipelineError):
    """A step made no progress after every restart the watchdog allows."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_all.py",
        description="Run the Synthetic Instruction Tuner pipeline with papermill for one hardware profile.",
    )
    p.add_argument("--profile", default="cpu", help=f"hardware profile ({', '.join(PROFILES)}; default: cpu)")
    p.add_argument(
        "--run-dir", help="where artifacts go (default: runs/<profile>); e.g. a Google Drive folder"
    )
    p.add_argument(
        "--reports-dir", help="where HTML reports go (default: reports/<profile>, or <run-dir>/reports)"
    )
    p.add_argument("--steps", help="comma-separated step names or prefixes, e.g. 01,02 or 05b_prompt_tuning")
    p.add_argument(
        "--list", action="store_true", help="list the steps, whether each is complete and why not, then exit"
    )
    p.add_argument(
        "--preflight",
        action="store_true",
        help="check on any machine, without downloads, that the profile's run will fit and work; then exit",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="delete the selected steps' outputs and what a resume would reuse (for 07: every method's "
        "results, samples and scored answers), then rerun them from scratch",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe/profile setting, e.g. --set sft.learning_rate=1e-4 (repeatable)",
    )
    p.add_argument("--no-reports", action="store_true", help="skip the analysis notebooks and HTML reports")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also print papermill's per-cell log and the cells' output (always in <run dir>/logs/)",
    )
    p.add_argument(
        "--cell-timeout",
        type=float,
        default=None,
        help="fail a step whose single cell runs longer than this many seconds",
    )
    return p


def select_steps(spec: str | None) -> list[Step]:
    steps = list(existing_steps())
    if not spec:
        return steps
    chosen = []
    for token in (t.strip() for t in spec.split(",") if t.strip()):
        matches = [s for s in PIPELINE if s.name == token] or [
            s for s in PIPELINE if s.name.split("_")[0] == token
        ]
        if not matches:
            matches = [s for s in PIPELINE if s.name.startswith(token)]
        if len(matches) != 1:
            names = ", ".join(s.name for s in PIPELINE)
            raise PipelineError(f"--steps: {token!r} matches {len(matches)} steps (steps: {names})")
        chosen.extend(m for m in matches if m not in chosen)
    missing = [s.notebook for s in chosen if not s.path.exists()]
    if missing:
        raise PipelineError(f"--steps: {missing[0]} does not exist in this checkout")
    return sorted(chosen, key=PIPELINE.index)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def execute_notebook(
    source: Path,
    output: Path,
    parameters: dict[str, Any],
    cell_timeout: float | None = None,
    env: dict[str, str] | None = None,
    progress: Any = None,
    log: Path | None = None,
) -> None:
    """Execute a percent-format file with papermill (papermill cannot read .py itself), in a kernel
    with `env` added to its environment that dies with this process. papermill logs each cell and
    its output (see `console.StepLog`); `progress` also receives the kernel's stderr, where tqdm draws;
    the kernel process's own log lines go to `log`."""
    import jupytext
    import papermill as pm

    notebook = jupytext.read(source)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        with kernels_die_with_run():
            pm.execute_notebook(
                notebook,
                str(output),
                parameters=parameters,
                kernel_name="python3",
                cwd=str(REPO_ROOT),
                log_output=True,
                stderr_file=progress,
                progress_bar=False,
                execution_timeout=cell_timeout,
                kernel_manager_class=kernel_manager_class(env, log),
            )
    finally:
        forget_kernels()


def _failure_message(name: str, exc: Exception, output: Path, log: Path) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        first = next((line for line in str(exc.source).splitlines() if line.strip()), "")
        return (
            f"step {name} failed in cell {exc.exec_count} ({_one_line(first, 80)!s}): {exc.ename}: "
            f"{_one_line(exc.evalue)} (executed notebook: {output}; full log: {log})"
        )
    return f"step {name} failed: {type(exc).__name__}: {_one_line(exc)} (full log: {log})"


def run_step(
    step: Step,
    paths: RunPaths,
    parameters: dict[str, Any],
    context: dict[str, Any],
    cell_timeout: float | None = None,
    watchdog: WatchdogConfig | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Execute one step under the watchdog and append a ledger row per attempt.

    A stall (no heartbeat for `watchdog.stall_s`) kills the kernel's process group and restarts the
    step, which resumes from its JSONL or checkpoint; a restart halves the batch setting the stalled
    work reported. Raises StepStalled after `watchdog.max_restarts` restarts, StepFailed on an error;
    each attempt's full log is appended to `<run dir>/logs/<step>.log`, which both messages name.
    """
    watchdog = watchdog or WatchdogConfig()
    console = console or Console()
    output = paths.notebooks / f"{step.name}.ipynb"
    log = log_path(paths, step.name)
    heartbeat = paths.root / "heartbeat" / f"{step.name}.json"
    env = {HEARTBEAT_ENV: str(heartbeat), STEP_ENV: step.name}
    overrides = list(parameters.get("overrides", []))
    for attempt in range(1, watchdog.max_restarts + 2):
        started = time.time()
        error = None
        watch = HeartbeatWatch(heartbeat, watchdog.stall_s, watchdog.startup_s, on_stall=kill_kernels)
        header = f"{step.name}, attempt {attempt}, run {context['run_id']}"
        with StepLog(log, header), ResourceMonitor() as monitor, watch:
            try:
                execute_notebook(
                    step.path,
                    output,
                    {**parameters, "overrides": overrides},
                    cell_timeout,
                    env,
                    console.progress(step.name),
                    log,
                )
            except Exception as exc:
                error = exc
                # papermill's error carries the cell's traceback: into the step's log
                logging.getLogger(__name__).error("%s: %s", type(exc).__name__, exc)
        stall = watch.stall if error is not None else None
        status = "ok" if error is None else ("stalled" if stall else "failed")
        last = watch.read() or {}
        row = step_row(
            context["run_id"],
            step.name,
            context["profile"],
            status,
            started,
            time.time(),
            monitor,
            context["device"],
            context["units_per_hour"],
            peak_gpu_mb=float(last.get("peak_gpu_mb") or 0.0),
            launch=launch_record(heartbeat, started),
        )
        row.update(attempt=attempt, longest_quiet_s=round(watch.longest_quiet_s, 1))
        if stall is None:
            append_row(paths.ledger, row)
            if error is not None:
                raise StepFailed(_failure_message(step.name, error, output, log)) from error
            return row
        shrink = _smaller_batch(stall)
        row.update(
            stalled=stall.message, quiet_s=round(stall.quiet_s, 1), limit=f"{stall.limit}={stall.limit_s:g}"
        )
        if attempt > watchdog.max_restarts:
            append_row(paths.ledger, row)
            raise StepStalled(_stall_message(step.name, stall, attempt, watchdog) + f" (full log: {log})")
        if shrink:
            overrides.append(shrink)
            row["restart_with"] = shrink
        append_row(paths.ledger, row)
        console.line(
            f"run_all: {step.name}: stalled (no heartbeat for {stall.quiet_s:.0f} s after: {stall.message}); "
            f"killed its kernel, restarting ({attempt} of {watchdog.max_restarts})"
            + (f" with {shrink}" if shrink else "")
        )
    raise AssertionError("unreachable: the last attempt returns or raises")


def _smaller_batch(stall: Stall) -> str | None:
    """`SETTING=half` for the batch setting the stalled work reported (e.g. engine.batch_size)."""
    beat = stall.heartbeat or {}
    setting, size = beat.get("batch_setting"), beat.get("batch_size")
    if not setting or not isinstance(size, int) or size <= 1:
        return None
    return f"{setting}={size // 2}"


def _stall_message(name: str, stall: Stall, attempts: int, watchdog: WatchdogConfig) -> str:
    beat = stall.heartbeat or {}
    advice = f"raise {stall.limit} if the step is only slow"
    if beat.get("batch_setting"):
        advice = f"lower {beat['batch_setting']} (last {beat.get('batch_size')}) or " + advice
    return (
        f"step {name} stalled {attempts} times (watchdog.max_restarts={watchdog.max_restarts}): no heartbeat "
        f"for {stall.limit_s:g} s ({stall.limit}) after: {_one_line(stall.message, 120)}; {advice}"
    )


def clear_step(step: Step, paths: RunPaths) -> None:
    """Delete a step's outputs, its resumable state and its recorded fingerprint."""
    clear_state(paths.root, step.name)
    for output in step.outputs:
        (paths.root / output).unlink(missing_ok=True)
    for folder in step.scratch:
        shutil.rmtree(paths.root / folder, ignore_errors=True)


def render_reports(
    paths: RunPaths,
    reports_dir: Path,
    parameters: dict[str, Any],
    cfg: Config,
    console: Console | None = None,
) -> list[Path]:
    """Execute the analysis notebooks and export them to HTML without code cells, plus an index.

    Every page is rendered before any is written, and each is written atomically (a temporary file
    renamed over the old one), so a kill leaves either the previous pages or the new ones, never a
    half-written page; a page that fails to render raises ReportFailed naming it and its log, writing
    nothing. Each notebook gets a line as it starts and ends, and its log `logs/analysis_<name>.log`.
    """
    import nbformat
    from nbconvert import HTMLExporter

    from .reporting import write_index

    console = console or Console()
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    pages: dict[Path, str] = {}
    for notebook in ANALYSIS:
        source = REPO_ROOT / notebook
        if not source.exists():
            continue
        name = f"analysis_{source.stem}"
        executed, log = paths.notebooks / f"{name}.ipynb", log_path(paths, name)
        console.line(f"run_all: {name}: running ({notebook}; reports) — {notebook_title(source)}")
        started = time.monotonic()
        try:
            with StepLog(log, name):
                execute_notebook(source, executed, parameters, progress=console.progress(name), log=log)
            body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
        except Exception as exc:
            console.line(
                f"run_all: {name}: failed after {duration(time.monotonic() - started)}; full log: {log}"
            )
            raise ReportFailed(
                "report " + _failure_message(source.stem, exc, executed, log).removeprefix("step ")
            ) from exc
        console.line(f"run_all: {name}: ok in {duration(time.monotonic() - started)}")
        pages[reports_dir / f"{source.stem}.html"] = body
    reports_dir.mkdir(parents=True, exist_ok=True)
    for target, body in pages.items():
        atomic_write_text(target, body)
    models = {
        "generator": cfg.models.generator,
        "target": cfg.models.target,
        "pair scorer": cfg.preferences.scorer
        + (f" ({cfg.models.reward_model})" if cfg.models.reward_model else ""),
    }
    written = list(pages)
    written.append(write_index(reports_dir, paths, cfg.profile, [p.name for p in written], models))
    return written


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # People read stdout: a line per step and the bars of long loops; stderr carries only errors.
    setup_logging(args.verbose)
    console = Console(tty=False if args.verbose else None)
    run_started = time.monotonic()
    try:
        profile = args.profile
        if profile.endswith((".yaml", ".yml")):  # the kernels run from the repository root
            profile = str(Path(profile).expanduser().resolve())
        cfg = load_config(profile, args.overrides)
        if args.preflight:
            from . import preflight

            return preflight.run(cfg)
        steps = select_steps(args.steps)
        run_dir = Path(args.run_dir).expanduser().resolve() if args.run_dir else default_run_dir(cfg.profile)
        paths = run_paths(run_dir)
        if args.list:
            for step, status in zip(existing_steps(), pipeline_status(cfg, paths), strict=True):
                state = "complete" if status.complete else "pending"
                print(f"{step.name:28s} {state:9s} {step.notebook:38s} {status.reason}".rstrip())
            return 0
        from .models import export_hub_token, resolve_device

        export_hub_token()  # looked up here, where Colab's secrets answer; kernels inherit the environment
        device = resolve_device(cfg.hardware.device)
        context = {
            "run_id": new_run_id(),
            "profile": cfg.profile,
            "device": device_description(device),
            "units_per_hour": cfg.hardware.compute_units_per_hour,
        }
        # The Hub token is deliberately not a parameter: kernels read it from the environment.
        parameters = {"profile": profile, "run_dir": str(run_dir), "overrides": list(args.overrides)}
        if paths.ledger.exists():  # drops a last row torn by a kill, which the reports could not read
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                JsonlAppender(paths.ledger, key="row").close()
            for warning in caught:
                console.line(f"run_all: {warning.message}")
        console.line(
            f"run_all: profile {cfg.profile} on {context['device']}; run directory {run_dir}; "
            f"each step's full log in {log_path(paths, '<step>')}"
        )
        ran = 0
        for step in steps:
            status = step_status(step, cfg, paths)
            if status.complete and not args.force:
                console.line(f"run_all: {step.name}: complete, skipped (use --force to rerun)")
                continue
            why = "--force" if args.force else status.reason
            if args.force or status.restart:  # from scratch: outputs and what a rerun would resume from
                clear_step(step, paths)
                why += ", cleared its outputs"
            # recorded before the step starts, so a killed step resumes only under the same fingerprint
            write_state(paths.root, step.name, status.fingerprint, "running")
            console.line(
                f"run_all: {step.name}: running ({step.notebook}; {why}) — {notebook_title(step.path)}"
            )
            started = time.monotonic()
            try:
                row = run_step(step, paths, parameters, context, args.cell_timeout, cfg.watchdog, console)
            except PipelineError:
                console.line(
                    f"run_all: {step.name}: failed after {duration(time.monotonic() - started)}; "
                    f"full log: {log_path(paths, step.name)}"
                )
                raise
            write_state(paths.root, step.name, status.fingerprint, "complete")
            console.line(f"run_all: {step.name}: ok in {duration(row['seconds'])}")
            ran += 1
        if not args.no_reports and not args.steps:
            reports_dir = (
                Path(args.reports_dir)
                if args.reports_dir
                else (run_dir / "reports" if args.run_dir else REPO_ROOT / "reports" / cfg.profile)
            )
            written = render_reports(paths, reports_dir, parameters, cfg, console)
            console.line(f"run_all: reports written to {written[-1]}")
        console.line(
            f"run_all: finished in {duration(time.monotonic() - run_started)}: "
            f"{ran} of {len(steps)} steps run, {len(steps) - ran} complete and skipped"
        )
    except PipelineError as exc:
        console.clear()
        print(f"run_all: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
