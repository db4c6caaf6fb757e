"""The orchestrator as a user drives it: subprocesses, kills, bad input, secrets."""

import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import REPO, kill_when, run_cli

from synthetic_instruction_tuner.steps import PIPELINE
from synthetic_instruction_tuner.store import read_jsonl

FAKE_TOKEN = "hf_" + "FakeTokenForTests0123456789abcdefXYZ"


def _all_text(root: Path) -> str:
    return "".join(p.read_text(errors="ignore") for p in root.rglob("*") if p.is_file())


def test_step_01_writes_sanitised_distinct_instructions_and_a_ledger_row(tmp_path):
    run = tmp_path / "run"
    result = run_cli(
        ["--profile", "smoke", "--run-dir", str(run), "--steps", "01"], env={"HF_TOKEN": FAKE_TOKEN}
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_jsonl(run / "data" / "instructions.jsonl")
    assert len(records) == 24 and len({r["id"] for r in records}) == 24
    assert len({r["instruction"] for r in records}) == 24 and all(r["instruction"].strip() for r in records)
    assert {"id", "instruction", "generator", "sampling", "seed"} <= set(records[0])
    (row,) = read_jsonl(run / "ledger.jsonl")
    assert row["step"] == "01_generate_instructions" and row["status"] == "ok"
    assert row["seconds"] > 0 and row["peak_rss_mb"] > 50 and row["device"].startswith("cpu")
    assert (run / "notebooks" / "01_generate_instructions.ipynb").exists()
    # the console: a line as the step starts (what, why) and one as it ends; the cells' log goes to a file
    lines = result.stdout.splitlines()
    assert lines[1] == (
        "run_all: 01_generate_instructions: running (pipeline/01_generate_instructions.py; outputs missing)"
        " — Magpie instructions"
    )
    assert re.fullmatch(r"run_all: 01_generate_instructions: ok in [\d.]+ s( \([\d.]+ min\))?", lines[2])
    assert len(lines) == 4 and lines[3].startswith("run_all: finished in ")
    log = (run / "logs" / "01_generate_instructions.log").read_text()
    assert "Executing Cell 1" in log and "generator: tiny:chat-lm" in log
    # the token came from the environment and appears in no output, executed notebook included
    assert FAKE_TOKEN not in _all_text(run)
    # a second run skips the complete step
    again = run_cli(["--profile", "smoke", "--run-dir", str(run), "--steps", "01"])
    assert "01_generate_instructions: complete, skipped" in again.stdout
    listing = run_cli(["--profile", "smoke", "--run-dir", str(run), "--list"])
    assert "01_generate_instructions" in listing.stdout and "complete" in listing.stdout


def test_sigkill_during_step_01_then_rerun_keeps_everything_once(tmp_path):
    run = tmp_path / "run"
    out = run / "data" / "instructions.jsonl"
    args = [
        "--profile",
        "smoke",
        "--run-dir",
        str(run),
        "--steps",
        "01",
        "--set",
        "counts.instructions=600",
        "--set",
        "engine.batch_size=4",
    ]
    kill_when(args, out, min_lines=40, timeout=240)
    before = out.read_text()
    kept_before = [json.loads(line) for line in before.splitlines() if line.endswith("}")]
    assert 40 <= len(kept_before) < 600
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-2000:]
    after = read_jsonl(out)
    assert len(after) == 600
    assert len({r["id"] for r in after}) == 600
    assert after[: len(kept_before)] == kept_before  # nothing from before the kill was lost or rewritten


def test_unknown_profile_key_is_one_line_and_nothing_is_overwritten(tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "instructions.jsonl").write_text('{"id": "x"}\n')
    profile = tmp_path / "mine.yaml"
    profile.write_text((REPO / "configs/profiles/smoke.yaml").read_text() + "\nengine:\n  batch_sise: 4\n")
    result = run_cli(["--profile", str(profile), "--run-dir", str(run)])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "mine.yaml: unknown key 'engine.batch_sise'" in lines[0]
    assert (run / "data" / "instructions.jsonl").read_text() == '{"id": "x"}\n'


def test_corrupt_jsonl_line_stops_the_step_naming_file_and_line(tmp_path):
    run = tmp_path / "run"
    data = run / "data"
    data.mkdir(parents=True)
    text = '{"id": "ins-1", "instruction": "Tell me a joke.", "sample": 0}\n{"id": "ins-2", "instruction": oops\n'
    text += '{"id": "ins-3", "instruction": "Name a fruit.", "sample": 2}\n'
    (data / "instructions.jsonl").write_text(text)
    result = run_cli(["--profile", "smoke", "--run-dir", str(run), "--steps", "01"])
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert "step 01_generate_instructions failed in cell" in line
    assert "DataError" in line and "instructions.jsonl:2: invalid JSON" in line
    assert (data / "instructions.jsonl").read_text() == text
    # the step's full log is named on stderr and stdout, and holds the traceback
    log = run / "logs" / "01_generate_instructions.log"
    assert line.endswith(f"full log: {log})")
    assert "run_all: 01_generate_instructions: failed after " in result.stdout
    assert result.stdout.rstrip().endswith(f"; full log: {log}")
    assert "Traceback" in log.read_text() and "invalid JSON" in log.read_text()


def test_gated_hub_model_without_token_is_one_clear_line(tmp_path):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    class GatedHub(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header(
                "X-Error-Message", "Access to model meta-llama/Llama-3.1-8B-Instruct is restricted."
            )
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "Access to model is restricted."}')

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    Thread(target=server.serve_forever, daemon=True).start()
    env = {
        "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}",
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": "",
        "SIT_CACHE": str(tmp_path / "cache"),
    }
    try:
        result = run_cli(
            [
                "--profile",
                "smoke",
                "--run-dir",
                str(tmp_path / "run"),
                "--steps",
                "01",
                "--set",
                "models.generator=meta-llama/Llama-3.1-8B-Instruct",
            ],
            env=env,
        )
    finally:
        server.shutdown()
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "ModelError: meta-llama/Llama-3.1-8B-Instruct is a gated model and no token found" in line
    assert "set HF_TOKEN" in line


def test_missing_model_package_names_the_package(monkeypatch):
    from synthetic_instruction_tuner import models
    from synthetic_instruction_tuner.errors import ModelError

    monkeypatch.setitem(
        models.GGUF_MODELS, "absent", models.GgufModel("absent-gguf-pkg", "absent_gguf_pkg", "x.gguf")
    )
    monkeypatch.setenv("SIT_CACHE", "/nonexistent-cache-for-test")
    with pytest.raises(ModelError, match=r"'absent-gguf-pkg' is not installed: run `make install`"):
        models.resolve_model("gguf:absent")


def test_a_step_runs_directly_with_the_papermill_cli(tmp_path):
    notebook = tmp_path / "01.ipynb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "jupytext",
            "--to",
            "ipynb",
            "-o",
            str(notebook),
            str(REPO / "pipeline/01_generate_instructions.py"),
        ],
        check=True,
        capture_output=True,
    )
    run = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "papermill",
            str(notebook),
            str(tmp_path / "out.ipynb"),
            "-p",
            "profile",
            "smoke",
            "-p",
            "run_dir",
            str(run),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(read_jsonl(run / "data" / "instructions.jsonl")) == 24


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts (a <br> reads as a space)."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_a_full_run_prints_a_line_per_step_and_logs_the_rest(smoke_run):
    run, _ = smoke_run
    console = (run.parent / "console.txt").read_text()
    lines = console.splitlines()
    for step in PIPELINE:
        assert sum(line.startswith(f"run_all: {step.name}: running (") for line in lines) == 1, step.name
        assert (
            sum(
                bool(re.fullmatch(rf"run_all: {step.name}: ok in [\d.]+ s( \([\d.]+ min\))?", line))
                for line in lines
            )
            == 1
        )
        log = (run / "logs" / f"{step.name}.log").read_text()
        assert "Executing Cell 1" in log and "Ending Cell" in log
    for page in ("compute_costs", "method_comparison"):
        assert f"run_all: analysis_{page}: running (analysis/{page}.py; reports)" in console
        assert (run / "logs" / f"analysis_{page}.log").exists()
    assert "Executing Cell" not in console and "<IPython.core.display" not in console
    # progress lines come every 30 s off a terminal, so their number follows the machine's speed
    steady = [line for line in lines if not re.search(r"\(\d+%\) \[", line)]
    assert all(line.startswith("run_all: ") for line in lines) and len(steady) <= 2 * len(PIPELINE) + 8
    assert lines[-1].startswith("run_all: finished in ") and "8 of 8 steps run" in lines[-1]


def test_the_index_leads_with_every_model_and_task_and_their_intervals(smoke_run):
    run, reports = smoke_run
    summary = json.loads((run / "eval" / "summary.json").read_text())
    page = (reports / "index.html").read_text()
    assert page.index("<h2>Result</h2>") < page.index("<h2>The run</h2>") < page.index("<h2>Reports</h2>")
    methods, paired, facts = _Tables(page).tables
    tasks = set(summary["metrics"]["base"])
    assert methods[0][0] == "model" and {cell.split()[0] for cell in methods[0][1:]} == tasks
    assert [row[0] for row in methods[1:]] == [
        "base model",
        "LoRA SFT",
        "prompt tuning",
        "DPO (on SFT)",
        "teacher (generator)",
    ]
    cells = [cell for row in methods[1:] for cell in row[1:]]
    assert len(cells) == 5 * len(tasks) and all(re.fullmatch(r"[\d.]+ \[[\d.]+, [\d.]+\]", c) for c in cells)
    heldout = methods[0].index("sit_heldout_ifeval prompt_level_strict_acc")
    base = summary["metrics"]["base"]["sit_heldout_ifeval"]["prompt_level_strict_acc"]
    assert methods[1][heldout] == f"{base['value']:.3f} [{base['ci_low']:.3f}, {base['ci_high']:.3f}]"
    assert [row[0] for row in paired[1:3]] == ["LoRA SFT \u2212 base model", "DPO (on SFT) \u2212 LoRA SFT"]
    assert len(paired) == 1 + len(summary["paired"]) and "p = " in paired[1][heldout]
    facts = dict(row for row in facts)
    ledger = {r["step"]: r["seconds"] for r in read_jsonl(run / "ledger.jsonl") if r["status"] == "ok"}
    assert (
        facts["total time"].startswith(f"{sum(ledger.values()):,.1f} s (")
        and "over 8 steps" in facts["total time"]
    )
    assert facts["where it ran"].startswith("cpu: ") and facts["profile"] == "smoke"


def test_the_index_reads_any_task_and_says_when_there_is_no_evaluation(smoke_run, tmp_path):
    from synthetic_instruction_tuner.reporting import headline_metric, write_index
    from synthetic_instruction_tuner.store import run_paths

    assert headline_metric(["acc,none", "acc_norm,none"]) == "acc_norm,none"
    assert headline_metric(["inst_level_loose_acc", "prompt_level_strict_acc", "prompt_level_loose_acc"]) == (
        "prompt_level_strict_acc"
    )
    assert headline_metric(["byte_perplexity", "bits_per_byte"]) == "bits_per_byte"
    run = tmp_path / "run"
    shutil.copytree(smoke_run[0] / "eval", run / "eval")
    shutil.copy2(smoke_run[0] / "ledger.jsonl", run)
    summary = json.loads((run / "eval" / "summary.json").read_text())
    for i, method in enumerate(summary["metrics"]):  # a multiple-choice benchmark, as lm-eval reports it
        scores = {"acc": 0.25 + i / 100, "acc_norm": 0.30 + i / 100}
        summary["metrics"][method]["hellaswag"] = {
            m: {"value": v, "ci_low": v - 0.01, "ci_high": v + 0.01, "n": 100} for m, v in scores.items()
        }
    summary["tasks"].append("hellaswag")
    (run / "eval" / "summary.json").write_text(json.dumps(summary))
    page = write_index(tmp_path / "reports", run_paths(run), "smoke", ["compute_costs.html"], {}).read_text()
    methods = _Tables(page).tables[0]
    column = methods[0].index("hellaswag acc_norm")
    assert [row[column] for row in methods[1:]] == [
        f"{0.30 + i / 100:.3f} [{0.29 + i / 100:.3f}, {0.31 + i / 100:.3f}]" for i in range(5)
    ]
    shutil.rmtree(run / "eval")
    page = write_index(tmp_path / "reports", run_paths(run), "smoke", ["compute_costs.html"], {}).read_text()
    assert "No evaluation yet:" in page and str(run / "eval" / "summary.json") in page
    assert 'href="compute_costs.html"' in page and len(_Tables(page).tables) == 1
