"""The pipeline's steps: which notebook, what it reads and writes, and when it is complete.

A step is complete when its outputs exist, pass their content check, and are newer than its inputs
(make's rule), so rerunning after an upstream change redoes exactly what is stale.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import REPO_ROOT, Config, load_config
from .store import RunPaths, count_jsonl, run_paths


@dataclass(frozen=True)
class Step:
    name: str
    notebook: str  # percent-format .py file, relative to the repository root
    inputs: tuple[str, ...]  # artifacts, relative to the run directory
    outputs: tuple[str, ...]
    check: Callable[[Config, RunPaths], bool] | None = None  # content check beyond existence
    scratch: tuple[str, ...] = ()  # resumable state (checkpoints, partial results) that --force also clears

    @property
    def path(self) -> Path:
        return REPO_ROOT / self.notebook


def _instructions_done(cfg: Config, paths: RunPaths) -> bool:
    return count_jsonl(paths.file("instructions.jsonl")) >= cfg.counts.instructions


def _responses_done(cfg: Config, paths: RunPaths) -> bool:
    return count_jsonl(paths.file("responses.jsonl")) >= count_jsonl(paths.file("instructions.jsonl"))


PIPELINE: tuple[Step, ...] = (
    Step(
        "01_generate_instructions",
        "pipeline/01_generate_instructions.py",
        (),
        ("data/instructions.jsonl", "data/instructions_rejected.jsonl"),
        _instructions_done,
    ),
    Step(
        "02_generate_responses",
        "pipeline/02_generate_responses.py",
        ("data/instructions.jsonl",),
        ("data/responses.jsonl",),
        _responses_done,
    ),
    Step(
        "03_filter",
        "pipeline/03_filter.py",
        ("data/responses.jsonl",),
        ("data/sft.jsonl", "data/funnel.json"),
    ),
    Step(
        "04_build_preferences",
        "pipeline/04_build_preferences.py",
        ("data/sft.jsonl",),
        (
            "data/heldout.jsonl",
            "data/preference_samples.jsonl",
            "data/preference_scores.jsonl",
            "data/preferences.jsonl",
            "data/preferences_summary.json",
        ),
    ),
    Step(
        "05_sft_lora",
        "pipeline/05_sft_lora.py",
        ("data/sft.jsonl", "data/heldout.jsonl"),
        ("adapters/sft_lora/metrics.json",),
        scratch=("adapters/sft_lora",),
    ),
    Step(
        "05b_prompt_tuning",
        "pipeline/05b_prompt_tuning.py",
        ("data/sft.jsonl", "data/heldout.jsonl"),
        ("adapters/prompt_tuning/metrics.json",),
        scratch=("adapters/prompt_tuning",),
    ),
    Step(
        "06_dpo",
        "pipeline/06_dpo.py",
        ("data/preferences.jsonl", "adapters/sft_lora/metrics.json"),
        ("adapters/dpo/metrics.json",),
        scratch=("adapters/dpo",),
    ),
    Step(
        "07_evaluate",
        "pipeline/07_evaluate.py",
        (
            "data/heldout.jsonl",
            "adapters/sft_lora/metrics.json",
            "adapters/prompt_tuning/metrics.json",
            "adapters/dpo/metrics.json",
        ),
        ("eval/summary.json",),
        scratch=("eval",),
    ),
)


def existing_steps() -> tuple[Step, ...]:
    """Steps whose notebook is present in this checkout."""
    return tuple(step for step in PIPELINE if step.path.exists())


def is_complete(step: Step, cfg: Config, paths: RunPaths) -> bool:
    outputs = [paths.root / o for o in step.outputs]
    if not all(p.exists() for p in outputs):
        return False
    if step.check is not None and not step.check(cfg, paths):
        return False
    inputs = [paths.root / i for i in step.inputs if (paths.root / i).exists()]
    return not inputs or min(p.stat().st_mtime for p in outputs) >= max(p.stat().st_mtime for p in inputs)


@dataclass
class StepContext:
    """What every step cell needs: the typed config, the run's paths and the device."""

    cfg: Config
    paths: RunPaths
    device: str


def default_run_dir(profile: str) -> Path:
    return REPO_ROOT / "runs" / profile


def start_step(
    profile: str, run_dir: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> StepContext:
    """Build the config, create the run directory, seed every RNG and pick the device."""
    # tqdm.auto asks for ipywidgets in a kernel; its plain-text bars are what we want in notebooks and logs
    warnings.filterwarnings("ignore", message="IProgress not found")
    from transformers import set_seed

    from .models import resolve_device
    from .watchdog import beat

    beat("starting: config, models", kind="step", loading=True)
    cfg = load_config(profile, overrides)
    paths = run_paths(run_dir or default_run_dir(profile))
    if cfg.hardware.torch_threads:
        import torch

        torch.set_num_threads(cfg.hardware.torch_threads)
    random.seed(cfg.seed)
    set_seed(cfg.seed)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return StepContext(cfg=cfg, paths=paths, device=resolve_device(cfg.hardware.device))
