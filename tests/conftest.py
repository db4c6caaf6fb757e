"""Shared fixtures: the smoke profile's tiny models and tokenizers carrying real chat templates."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
TEMPLATES = FIXTURES / "chat_templates"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smoke_cfg():
    from synthetic_instruction_tuner.config import load_config

    return load_config("smoke")


@pytest.fixture(scope="session")
def chat_lm():
    """(model, tokenizer) of the smoke generator: a tiny random Llama with SmolLM2's real tokenizer."""
    from synthetic_instruction_tuner.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model("tiny:chat-lm").path
    return load_causal_lm(path), load_tokenizer(path)


def template_tokenizer(name: str):
    """SmolLM2's BPE tokenizer dressed as another family: that family's special tokens, BOS
    behaviour and its verbatim chat template (tests/fixtures/chat_templates)."""
    from tokenizers.processors import TemplateProcessing

    from synthetic_instruction_tuner.models import _smollm2_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(_smollm2_tokenizer())
    if name == "smollm2":
        return tokenizer
    spec = json.loads((TEMPLATES / "tokens.json").read_text())[name]
    extra = [t for t in spec["special_tokens"] if t not in (spec["bos_token"], spec["eos_token"])]
    special = {"additional_special_tokens": extra, "eos_token": spec["eos_token"]}
    if spec["bos_token"]:
        special["bos_token"] = spec["bos_token"]
    tokenizer.add_special_tokens(special)
    if spec["bos_token"]:
        # Llama-3, Gemma and Mistral tokenizers prepend BOS on their own
        bos = spec["bos_token"]
        tokenizer._tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A $B",
            special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))],
        )
    else:
        tokenizer.bos_token = None
    tokenizer.chat_template = (TEMPLATES / f"{name}.jinja").read_text()
    return tokenizer


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 600):
    """Run `python run_all.py ...` as a user would; returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(REPO / "run_all.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The whole smoke pipeline, run once through run_all.py as a user would: (run dir, reports dir).
    What it printed is kept beside them, in console.txt."""
    root = tmp_path_factory.mktemp("smoke")
    run, reports = root / "run", root / "reports"
    result = run_cli(
        ["--profile", "smoke", "--run-dir", str(run), "--reports-dir", str(reports)], timeout=1800
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (root / "console.txt").write_text(result.stdout + result.stderr)
    return run, reports


def kill_when(
    args: list[str],
    path: Path,
    min_lines: int = 0,
    timeout: float = 300,
    ready: Callable[[], bool] | None = None,
) -> None:
    """Start run_all.py and SIGKILL its whole process group (orchestrator and kernel) once `path` has
    `min_lines` lines, or, for a directory, once it exists; or once `ready()` holds, where given."""
    import signal
    import subprocess
    import time

    def lines_or_dir() -> bool:
        if path.is_dir():
            return True
        return path.is_file() and min_lines > 0 and path.read_text().count("\n") >= min_lines

    ready = ready or lines_or_dir

    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run_all.py"), *args],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.1)
        assert ready(), f"{path} never appeared before the process ended"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def lora_sft_trainer(cfg, run_dir: Path, output_dir: Path):
    """TRL's SFTTrainer as step 05 builds it (LoRA on the target, the run's SFT splits), untrained."""
    from trl import SFTTrainer

    from synthetic_instruction_tuner.models import resolve_model
    from synthetic_instruction_tuner.store import run_paths
    from synthetic_instruction_tuner.training import (
        chat_tokenizer,
        load_target,
        lora_config,
        sft_config,
        sft_splits,
    )

    train, evaluation = sft_splits(run_paths(run_dir), cfg)
    return SFTTrainer(
        model=load_target(cfg, "cpu"),
        args=sft_config(cfg, output_dir, "cpu"),
        train_dataset=train.remove_columns("id"),
        eval_dataset=evaluation.remove_columns("id"),
        processing_class=chat_tokenizer(resolve_model(cfg.models.target).path),
        peft_config=lora_config(cfg),
    )
