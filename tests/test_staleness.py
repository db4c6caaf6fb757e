"""Runs that know when they are stale: fingerprints of settings and upstream files, and `--list` reasons.

The unit tests build a run directory by hand (files with the right names and row counts) and record
fingerprints the way the orchestrator does; the smoke tests drive run_all.py as a user would.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from synthetic_instruction_tuner.config import load_config
from synthetic_instruction_tuner.fingerprints import read_state, settings_of, write_state
from synthetic_instruction_tuner.steps import PIPELINE, pipeline_status, step_status
from synthetic_instruction_tuner.store import read_jsonl, run_paths

STEP = {s.name: s for s in PIPELINE}


def _fake_outputs(root: Path, step_name: str, rows: int = 24) -> None:
    for output in STEP[step_name].outputs:
        path = root / output
        path.parent.mkdir(parents=True, exist_ok=True)
        if output.endswith(".jsonl"):
            path.write_text("".join(json.dumps({"id": f"{step_name}-{i}"}) + "\n" for i in range(rows)))
        else:
            path.write_text(json.dumps({"step": step_name}))


def _complete_run(root: Path, overrides: tuple[str, ...] = ()) -> None:
    """Every step's outputs, each step recorded complete after its upstream, as run_all.py does."""
    cfg = load_config("smoke", overrides)
    paths = run_paths(root)
    for step in PIPELINE:
        status = step_status(step, cfg, paths)
        write_state(root, step.name, status.fingerprint, "running")
        _fake_outputs(root, step.name)
        write_state(root, step.name, status.fingerprint, "complete")


def _statuses(root: Path, overrides: tuple[str, ...] = ()) -> dict[str, tuple[bool, str, bool]]:
    cfg = load_config("smoke", overrides)
    return {
        step.name: (s.complete, s.reason, s.restart)
        for step, s in zip(PIPELINE, pipeline_status(cfg, run_paths(root), PIPELINE), strict=True)
    }


def test_a_complete_run_is_complete_and_records_what_it_read(tmp_path):
    _complete_run(tmp_path)
    assert all(complete for complete, _, _ in _statuses(tmp_path).values())
    state = read_state(tmp_path, "05_sft_lora")
    assert state["status"] == "complete"
    assert state["settings"]["sft.learning_rate"] == 2e-4 and state["settings"]["lora.r"] == 8
    assert set(state["inputs"]) == {"data/sft_train.jsonl", "data/heldout.jsonl"}
    assert len(state["inputs"]["data/sft_train.jsonl"]["sha256"]) == 64


@pytest.mark.parametrize(
    "override",
    [
        "hardware.torch_threads=1",
        "hardware.device=cpu",
        "hardware.dense_lm_head=true",
        "engine.batch_size=2",
        "engine.batch_timeout_s=5",
        "engine.show_progress=true",
        "sft.save_steps=1",
        "sft.gradient_checkpointing=true",
        "evaluation.batch_size=1",
        "magpie.max_attempts_factor=20",
        "hardware.compute_units_per_hour=1.5",
    ],
)
def test_settings_that_change_only_how_a_step_runs_make_nothing_stale(tmp_path, override):
    _complete_run(tmp_path)
    assert all(complete for complete, _, _ in _statuses(tmp_path, (override,)).values())


def test_a_setting_added_since_the_run_makes_nothing_stale_while_it_is_null(tmp_path):
    _complete_run(tmp_path)
    state = read_state(tmp_path, "06_dpo")
    for key in ("dpo.loss_weights", "dpo.beta"):  # as recorded before these settings existed
        del state["settings"][key]
    write_state(tmp_path, "06_dpo", {k: state[k] for k in ("settings", "inputs")}, "complete")
    statuses = _statuses(tmp_path)
    assert statuses["06_dpo"] == (False, "settings changed: dpo.beta (unset) → 0.1", True)
    state["settings"]["dpo.beta"] = 0.1
    write_state(tmp_path, "06_dpo", {k: state[k] for k in ("settings", "inputs")}, "complete")
    assert all(complete for complete, _, _ in _statuses(tmp_path).values())


def test_a_training_key_makes_its_step_and_everything_downstream_pending(tmp_path):
    _complete_run(tmp_path)
    statuses = _statuses(tmp_path, ("sft.learning_rate=1e-4",))
    pending = {name for name, (complete, _, _) in statuses.items() if not complete}
    # prompt tuning has its own learning rate: it does not read sft.learning_rate
    assert pending == {"05_sft_lora", "06_dpo", "07_evaluate"}
    assert statuses["05_sft_lora"] == (False, "settings changed: sft.learning_rate 0.0002 → 0.0001", True)
    assert statuses["06_dpo"][1] == "upstream 05_sft_lora is pending"
    assert statuses["07_evaluate"][1] == "upstream 05_sft_lora, 06_dpo are pending"


def test_a_shared_trainer_key_reaches_prompt_tuning_and_dpo(tmp_path):
    _complete_run(tmp_path)
    statuses = _statuses(tmp_path, ("sft.max_grad_norm=1.0",))
    pending = {name for name, (complete, _, _) in statuses.items() if not complete}
    assert pending == {"05_sft_lora", "05b_prompt_tuning", "06_dpo", "07_evaluate"}
    assert statuses["06_dpo"][1] == "settings changed: sft.max_grad_norm 0.3 → 1.0"


def test_a_generation_key_makes_every_step_from_01_pending(tmp_path):
    _complete_run(tmp_path)
    statuses = _statuses(tmp_path, ("magpie.sampling.temperature=0.5",))
    assert not any(complete for complete, _, _ in statuses.values())
    assert (
        statuses["01_generate_instructions"][1] == "settings changed: magpie.sampling.temperature 1.0 → 0.5"
    )
    assert statuses["02_generate_responses"][1] == "upstream 01_generate_instructions is pending"


def test_an_sft_data_key_reruns_step_04_on_its_sweep_and_a_sampling_key_clears_it(tmp_path):
    _complete_run(tmp_path)
    statuses = _statuses(tmp_path, ("sft_data.variants=2",))
    assert statuses["04_build_preferences"] == (
        False,
        "settings changed: sft_data.variants 1 → 2; keeps its appended records",
        False,
    )
    assert {name for name, (complete, _, _) in statuses.items() if not complete} == {
        "04_build_preferences",
        "05_sft_lora",
        "05b_prompt_tuning",
        "06_dpo",
        "07_evaluate",
    }
    # one key that changes what the sweep generates among them clears the step
    both = _statuses(tmp_path, ("sft_data.variants=2", "preferences.top_p=0.9"))["04_build_preferences"]
    assert both[1].startswith("settings changed: preferences.top_p 1.0 → 0.9, sft_data.variants 1 → 2")
    assert both[2] is True


def test_a_changed_upstream_file_propagates_and_names_the_step_that_wrote_it(tmp_path):
    _complete_run(tmp_path)
    cfg, paths = load_config("smoke"), run_paths(tmp_path)
    # step 05 reran: a new adapter
    (tmp_path / "adapters/sft_lora/metrics.json").write_text(json.dumps({"step": "05_sft_lora", "run": 2}))
    dpo = step_status(STEP["06_dpo"], cfg, paths)
    assert (dpo.complete, dpo.restart) == (False, True)
    assert dpo.reason == "upstream 05_sft_lora changed (adapters/sft_lora/metrics.json)"
    # evaluation keeps its per-task results: their own fingerprints decide which methods to redo
    evaluation = step_status(STEP["07_evaluate"], cfg, paths)
    assert (evaluation.complete, evaluation.restart) == (False, False)
    assert step_status(STEP["05b_prompt_tuning"], cfg, paths).complete


def test_appended_instructions_resume_responses_and_changed_ones_restart_them(tmp_path):
    _complete_run(tmp_path)
    cfg, paths = load_config("smoke"), run_paths(tmp_path)
    instructions = tmp_path / "data/instructions.jsonl"
    original = instructions.read_text()
    with open(instructions, "a") as fh:
        fh.write(json.dumps({"id": "new"}) + "\n")
    status = step_status(STEP["02_generate_responses"], cfg, paths)
    assert (status.complete, status.restart) == (False, False)
    assert status.reason == "upstream 01_generate_instructions added rows (data/instructions.jsonl)"
    instructions.write_text(original.replace('"01_generate_instructions-0"', '"other"'))
    status = step_status(STEP["02_generate_responses"], cfg, paths)
    assert (status.complete, status.restart) == (False, True)
    assert status.reason == "upstream 01_generate_instructions changed (data/instructions.jsonl)"


def test_a_raised_count_resumes_and_an_interrupted_step_resumes(tmp_path):
    _complete_run(tmp_path)
    status = _statuses(tmp_path, ("counts.instructions=30",))["01_generate_instructions"]
    assert status == (False, "incomplete: 24/30 instructions", False)
    cfg, paths = load_config("smoke"), run_paths(tmp_path)
    fp = step_status(STEP["01_generate_instructions"], cfg, paths).fingerprint
    write_state(tmp_path, "01_generate_instructions", fp, "running")
    _fake_outputs(tmp_path, "01_generate_instructions", rows=12)
    status = step_status(STEP["01_generate_instructions"], cfg, paths)
    assert (status.complete, status.reason, status.restart) == (
        False,
        "interrupted: 12/24 instructions",
        False,
    )


def test_outputs_without_a_fingerprint_are_rerun_but_not_deleted(tmp_path):
    cfg, paths = load_config("smoke"), run_paths(tmp_path)
    assert step_status(STEP["01_generate_instructions"], cfg, paths).reason == "outputs missing"
    _fake_outputs(tmp_path, "01_generate_instructions")
    status = step_status(STEP["01_generate_instructions"], cfg, paths)
    assert (status.complete, status.reason, status.restart) == (False, "no fingerprint recorded", False)


def test_settings_of_takes_whole_sections_minus_keys_that_do_not_change_outputs():
    cfg = load_config("smoke")
    settings = settings_of(cfg, ("sft", "seed"))
    assert settings["seed"] == 42 and settings["sft.learning_rate"] == 2e-4
    assert "sft.save_steps" not in settings and "sft.per_device_eval_batch_size" not in settings
    assert "sft.eval_steps" not in settings
    assert not any(key.startswith(("engine.", "hardware.")) for key in settings)
    assert json.loads(json.dumps(settings)) == settings


# --- on the smoke profile, through run_all.py ---------------------------------------------------------


def _listing(run: Path, *extra: str) -> dict[str, str]:
    """`--list` as {step: "complete" or "pending <reason>"}."""
    result = run_cli(["--profile", "smoke", "--run-dir", str(run), "--list", *extra])
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {}
    for line in result.stdout.splitlines():
        name, state, _notebook, *reason = line.split(maxsplit=3)
        rows[name] = " ".join([state, *reason])
    return rows


def test_a_training_key_changed_after_a_complete_run_reruns_exactly_05_06_and_07(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run[0], run)
    assert set(_listing(run).values()) == {"complete"}
    lr = ("--set", "sft.learning_rate=1e-4")
    listing = _listing(run, *lr)
    assert listing == {
        "01_generate_instructions": "complete",
        "02_generate_responses": "complete",
        "03_filter": "complete",
        "04_build_preferences": "complete",
        "05_sft_lora": "pending settings changed: sft.learning_rate 0.0002 → 0.0001",
        "05b_prompt_tuning": "complete",  # its learning rate is prompt_tuning.learning_rate
        "06_dpo": "pending upstream 05_sft_lora is pending",
        "07_evaluate": "pending upstream 05_sft_lora, 06_dpo are pending",
    }
    ledger_before = len(read_jsonl(run / "ledger.jsonl"))
    result = run_cli(["--profile", "smoke", "--run-dir", str(run), "--reports-dir", str(tmp_path / "r"), *lr])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    skipped = {n for n in listing if f"run_all: {n}: complete, skipped" in result.stdout}
    ran = {n for n in listing if f"run_all: {n}: running" in result.stdout}
    assert ran == {"05_sft_lora", "06_dpo", "07_evaluate"} and skipped == set(listing) - ran
    assert (
        "05_sft_lora: running (pipeline/05_sft_lora.py; settings changed: sft.learning_rate" in result.stdout
    )
    assert "06_dpo: running (pipeline/06_dpo.py; upstream 05_sft_lora changed" in result.stdout
    new_rows = read_jsonl(run / "ledger.jsonl")[ledger_before:]
    assert [r["step"] for r in new_rows] == ["05_sft_lora", "06_dpo", "07_evaluate"]
    # evaluation redid the two methods whose adapters changed, and kept the base and prompt tuning
    log = (run / "logs" / "07_evaluate.log").read_text().split("=== ")[-1]  # this run's attempt
    assert "evaluating sft_lora:" in log and "evaluating dpo:" in log
    assert "evaluating base:" not in log and "evaluating prompt_tuning:" not in log
    assert json.loads((run / "adapters/sft_lora/metrics.json").read_text())["learning_rate"] == 1e-4
    assert set(_listing(run, *lr).values()) == {"complete"}
    assert _listing(run)["05_sft_lora"] == "pending settings changed: sft.learning_rate 0.0001 → 0.0002"


def test_a_new_evaluation_setting_leaves_step_07s_results_for_it_to_judge(tmp_path):
    _complete_run(tmp_path)
    complete, reason, restart = _statuses(tmp_path, ("evaluation.hellaswag_docs=7",))["07_evaluate"]
    assert not complete and reason.startswith("settings changed: evaluation.hellaswag_docs")
    assert not restart, "each task's result carries its fingerprint: nothing is cleared"
    assert _statuses(tmp_path, ("sft.learning_rate=1e-4",))["05_sft_lora"][2], "05 still starts over"


def test_force_says_it_deletes_and_the_step_rebuilds_the_same_rows(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run[0], run)
    rows = read_jsonl(run / "data/sft.jsonl")
    (run / "data/funnel.json").unlink()  # an output the step must write again, not find
    result = run_cli(
        ["--profile", "smoke", "--run-dir", str(run), "--steps", "03", "--force", "--no-reports"]
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "03_filter: running (pipeline/03_filter.py; --force, cleared its outputs)" in result.stdout
    assert (run / "data/funnel.json").exists()
    assert read_jsonl(run / "data/sft.jsonl") == rows
    assert "delete the selected steps' outputs" in " ".join(run_cli(["--help"]).stdout.split())


def test_an_sft_data_key_rebuilds_the_sft_set_from_the_sweep_on_disk(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run[0], run)
    samples, scores = run / "data/preference_samples.jsonl", run / "data/preference_scores.jsonl"
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in (samples, scores)}
    rows_before = len(read_jsonl(run / "data/sft_train.jsonl"))
    variants = ("--set", "sft_data.variants=2")
    result = run_cli(["--profile", "smoke", "--run-dir", str(run), "--steps", "04", *variants])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (
        "04_build_preferences: running (pipeline/04_build_preferences.py; settings changed: " in result.stdout
    )
    assert "cleared its outputs" not in result.stdout
    # the sweep was read, not generated again: the same files, untouched
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in (samples, scores)} == before
    assert len(read_jsonl(run / "data/sft_train.jsonl")) > rows_before
    listing = _listing(run, *variants)
    assert listing["04_build_preferences"] == "complete"
    assert listing["05_sft_lora"] == "pending upstream 04_build_preferences changed (data/sft_train.jsonl)"


PHASES = [s.name for s in PIPELINE] + ["reports"]


def _phase(line: str) -> int | None:
    """Which phase of a run a line of run_all.py's output announces."""
    for i, name in enumerate(PHASES[:-1]):
        if f"run_all: {name}: running" in line or f"run_all: {name}: complete, skipped" in line:
            return i
    return len(PHASES) - 1 if "analysis_compute_costs" in line else None


def _run_and_kill(args: list[str], phase: int, delay: float, timeout: float = 600) -> str:
    """Start run_all.py; once it reaches `phase` (or a later one), wait `delay` seconds and SIGKILL it
    and every process it started (kernels run in their own process group). Returns the phase it was
    in when killed, or "exited" if it finished first."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    import psutil

    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_all.py"), *args],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = [-1]

    def read() -> None:
        for line in proc.stdout:
            p = _phase(line)
            if p is not None:
                seen[0] = max(seen[0], p)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while proc.poll() is None and seen[0] < phase and time.time() < deadline:
        time.sleep(0.05)
    end = time.time() + delay
    while proc.poll() is None and time.time() < end:
        time.sleep(0.05)
    if proc.poll() is not None:
        reader.join(5)
        return "exited"
    os.killpg(proc.pid, signal.SIGSTOP)  # frozen: it starts no kernel while its children are collected
    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for victim in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
    os.killpg(proc.pid, signal.SIGKILL)
    psutil.wait_procs(victims, timeout=30)
    proc.wait()
    reader.join(5)
    return PHASES[seen[0]] if seen[0] >= 0 else "start"


def _counts(run: Path) -> dict[str, int]:
    """Rows of every JSONL a run writes (data, eval samples, per-task results), asserting unique ids."""
    counts = {}
    for path in sorted([*run.glob("data/*.jsonl"), *run.glob("eval/samples/*/*.jsonl")]):
        rows = read_jsonl(path)
        key = "doc_id" if "samples" in path.parts else "id"
        ids = [r[key] for r in rows if key in r]
        assert len(ids) == len(set(ids)), f"{path}: duplicate {key}"
        counts[str(path.relative_to(run))] = len(rows)
    counts["eval results"] = len(list(run.glob("eval/results/*/*.json")))
    counts["adapters"] = len(list(run.glob("adapters/*/metrics.json")))
    return counts


@pytest.mark.slow  # about 1.15x a clean smoke run (16.5 min on 2 busy cores); `make test-slow`
def test_sigkill_at_twelve_random_moments_then_a_final_run_matches_a_clean_run(smoke_run, tmp_path):
    from html.parser import HTMLParser

    rng = random.Random(20261125)
    run, reports = tmp_path / "run", tmp_path / "reports"
    args = ["--profile", "smoke", "--run-dir", str(run), "--reports-dir", str(reports)]
    # one kill in every phase (each step, then the reports) and three more anywhere, in run order;
    # each at a random moment after that phase starts
    targets = sorted([*range(len(PHASES)), *rng.choices(range(len(PHASES)), k=3)])
    killed = [_run_and_kill(args, phase, rng.uniform(0.5, 20.0)) for phase in targets]
    print("killed in:", killed)
    assert sum(k != "exited" for k in killed) >= 10
    assert len(set(killed) - {"exited", "start"}) >= 6  # the kills spread over the whole run

    result = run_cli(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    clean, final = _counts(smoke_run[0]), _counts(run)
    assert final == clean
    ledger = read_jsonl(run / "ledger.jsonl")
    assert len({r["row"] for r in ledger}) == len(ledger)
    summary = json.loads((run / "eval/summary.json").read_text())
    clean_summary = json.loads((smoke_run[0] / "eval/summary.json").read_text())
    n = {m: {t: v[next(iter(v))]["n"] for t, v in tasks.items()} for m, tasks in summary["metrics"].items()}
    assert n == {
        m: {t: v[next(iter(v))]["n"] for t, v in tasks.items()}
        for m, tasks in clean_summary["metrics"].items()
    }
    assert set(_listing(run).values()) == {"complete"}
    for page in ("index.html", "compute_costs.html", "method_comparison.html"):
        text = (reports / page).read_text()
        HTMLParser().feed(text)
        assert text.rstrip().endswith("</html>") and "<table" in text, page
    index = (reports / "index.html").read_text()
    assert 'href="compute_costs.html"' in index and 'href="method_comparison.html"' in index


def test_a_report_that_fails_to_render_is_one_line_exit_1_and_no_page_is_written(smoke_run, tmp_path):
    run, reports = tmp_path / "run", tmp_path / "reports"
    shutil.copytree(smoke_run[0], run)
    (run / "eval/summary.json").write_text('{"mode": "local", "metrics": ')  # every step still complete
    result = run_cli(["--profile", "smoke", "--run-dir", str(run), "--reports-dir", str(reports)])
    assert result.returncode == 1
    # the stopped kernel may add "[IPKernelApp] ERROR | KeyboardInterrupt caught in kernel." of its own
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("run_all:")]
    assert "Traceback" not in result.stderr
    assert line.startswith("run_all: error: report method_comparison failed in cell")
    assert "summary.json" in line and "DataError" in line
    assert "complete, skipped" in result.stdout and "running (pipeline/" not in result.stdout
    # compute_costs rendered, but nothing is written unless every page rendered
    assert not reports.exists() or not any(reports.iterdir())
