"""The pipeline's steps: which notebook, what it reads (settings and files) and writes, and when it
is complete.

A step is complete when its outputs exist, pass their content check, and were produced from the
settings it reads now and from the upstream files on disk now: the fingerprint recorded in
`<run dir>/state/<step>.json` (see `fingerprints`) must equal the current one. `step_status` says why
a step is pending, and whether what is on disk may be resumed or must be cleared first.
"""

from __future__ import annotations

import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fingerprints as fps
from .config import REPO_ROOT, Config, load_config
from .store import RunPaths, count_jsonl, run_paths


@dataclass(frozen=True)
class Step:
    name: str
    notebook: str  # percent-format .py file, relative to the repository root
    inputs: tuple[str, ...]  # artifacts, relative to the run directory
    outputs: tuple[str, ...]
    check: Callable[[Config, RunPaths], str | None] | None = None  # content check: why incomplete, or None
    scratch: tuple[str, ...] = ()  # resumable state (checkpoints, partial results) cleared with the outputs
    settings: tuple[str, ...] = ()  # config keys or sections that change what the step writes
    resumes_appended_inputs: bool = False  # rows appended upstream (none changed): resume, do not restart
    fingerprints_partials: bool = False  # partial results carry their own fingerprints: keep them
    # settings that only select from what the step appends (records that carry their own settings
    # and ids): changing only these reruns the step on its records instead of clearing them
    selection_settings: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return REPO_ROOT / self.notebook


def _instructions_done(cfg: Config, paths: RunPaths) -> str | None:
    have, want = count_jsonl(paths.file("instructions.jsonl")), cfg.counts.instructions
    return None if have >= want else f"{have}/{want} instructions"


def _responses_done(cfg: Config, paths: RunPaths) -> str | None:
    have, want = count_jsonl(paths.file("responses.jsonl")), count_jsonl(paths.file("instructions.jsonl"))
    return None if have >= want else f"{have}/{want} responses"


# Settings each step reads. Generation depends on the generator and its precision, training on the
# target and its precision; `fingerprints.NOT_OUTPUT_KEYS` lists keys of these sections left out.
_GENERATOR = ("seed", "models.generator", "hardware.generation_dtype", "hardware.load_in_4bit")
_TARGET = ("seed", "models.target", "hardware.dtype", "hardware.cpu_autocast", "hardware.load_in_4bit")
PIPELINE: tuple[Step, ...] = (
    Step(
        "01_generate_instructions",
        "pipeline/01_generate_instructions.py",
        (),
        ("data/instructions.jsonl", "data/instructions_rejected.jsonl"),
        _instructions_done,
        # counts.instructions is a target the content check compares with: raising it resumes
        settings=(*_GENERATOR, "magpie"),
    ),
    Step(
        "02_generate_responses",
        "pipeline/02_generate_responses.py",
        ("data/instructions.jsonl",),
        ("data/responses.jsonl",),
        _responses_done,
        settings=(*_GENERATOR, "responses"),
        resumes_appended_inputs=True,  # responses are keyed by instruction id
    ),
    Step(
        "03_filter",
        "pipeline/03_filter.py",
        ("data/responses.jsonl", "data/instructions.jsonl", "data/instructions_rejected.jsonl"),
        ("data/sft.jsonl", "data/funnel.json"),
        settings=("filtering", "counts.sft_target"),
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
            "data/sft_train.jsonl",
            "data/preferences_summary.json",
            "data/contamination.json",
        ),
        settings=(
            *_GENERATOR,
            "models.reward_model",
            "hardware.dtype",  # the reward model's precision
            "responses.system_prompt",
            "preferences",
            "counts.heldout_prompts",
            "counts.preference_prompts",
            "sft_data",
            "filtering.contamination_ngram",  # held-out overlap, and the check of the rows as trained
        ),
        # the sweep's samples and scores carry their generator, sampling and scorer settings and ids
        # with the prompt's hash: what only builds pairs and SFT rows from them keeps them
        selection_settings=(
            "sft_data",
            "preferences.min_margin",
            "preferences.backtranslate_pairs",
            "preferences.format_edits",
            "preferences.reward_weight",
            "filtering.contamination_ngram",
        ),
    ),
    Step(
        "05_sft_lora",
        "pipeline/05_sft_lora.py",
        ("data/sft_train.jsonl", "data/heldout.jsonl"),
        ("adapters/sft_lora/metrics.json",),
        scratch=("adapters/sft_lora",),
        settings=(*_TARGET, "lora", "sft"),
    ),
    Step(
        "05b_prompt_tuning",
        "pipeline/05b_prompt_tuning.py",
        ("data/sft_train.jsonl", "data/heldout.jsonl"),
        ("adapters/prompt_tuning/metrics.json",),
        scratch=("adapters/prompt_tuning",),
        # its own rate, epochs, steps, warmup, scheduler and batch sizes; the rest of SFT's trainer
        # settings and its eval split are shared (training.sft_config, sft_splits)
        settings=(
            *_TARGET,
            "prompt_tuning",
            "sft.max_grad_norm",
            "sft.weight_decay",
            "sft.optim",
            "sft.max_length",
            "sft.group_by_length",
            "sft.eval_fraction",
        ),
    ),
    Step(
        "06_dpo",
        "pipeline/06_dpo.py",
        ("data/preferences.jsonl", "adapters/sft_lora/metrics.json"),
        ("adapters/dpo/metrics.json",),
        scratch=("adapters/dpo",),
        # the LoRA shape comes from the SFT adapter it continues; clipping and optimizer from sft
        settings=(*_TARGET, "dpo", "sft.max_grad_norm", "sft.optim"),
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
        settings=(
            "seed",
            "models.target",
            "models.generator",  # the teacher's reference row
            "hardware.generation_dtype",
            "hardware.dtype",  # compute precision of a 4-bit base
            "hardware.load_in_4bit",
            "evaluation",
            "counts.eval_ifbench",
        ),
        fingerprints_partials=True,  # eval/results/<method>/<task>.json: a new adapter redoes only its method
    ),
)


def existing_steps() -> tuple[Step, ...]:
    """Steps whose notebook is present in this checkout."""
    return tuple(step for step in PIPELINE if step.path.exists())


@dataclass(frozen=True)
class StepStatus:
    complete: bool
    reason: str  # why the step is pending; "" when complete
    restart: bool  # what is on disk came from other settings or inputs: clear it before running
    fingerprint: dict[str, Any]  # the current one, recorded when the step runs


def producer(path: str) -> Step | None:
    """The step that writes an artifact."""
    return next((s for s in PIPELINE if path in s.outputs), None)


def current_fingerprint(step: Step, cfg: Config, paths: RunPaths) -> dict[str, Any]:
    return fps.fingerprint(cfg, paths.root, step.settings, step.inputs)


def _upstream(names: list[str]) -> str:
    steps = list(dict.fromkeys((producer(n).name if producer(n) else n) for n in names))
    return ", ".join(steps)


def _present(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def step_status(step: Step, cfg: Config, paths: RunPaths) -> StepStatus:
    """Whether a step is complete and, if not, why, and whether a rerun may resume from what is on disk."""
    fp = current_fingerprint(step, cfg, paths)
    state = fps.read_state(paths.root, step.name)
    on_disk = [p for p in (*step.outputs, *step.scratch) if _present(paths.root / p)]
    missing = [o for o in step.outputs if not (paths.root / o).exists()]
    if state is None:
        if on_disk:
            # From a run before fingerprints, or written by hand: settings unknown. Rerun, but never
            # delete it: generation resumes only records made with this generator and sampling (or
            # stops naming the key and line), training resumes from its checkpoint, 03/04 rewrite theirs.
            return StepStatus(False, "no fingerprint recorded", False, fp)
        return StepStatus(False, "outputs missing", False, fp)
    settings = fps.changed_settings(state["settings"], fp["settings"])
    if settings:
        more = f" and {len(settings) - 3} more" if len(settings) > 3 else ""
        reason = f"settings changed: {', '.join(settings[:3])}{more}"
        keys = fps.changed_keys(state["settings"], fp["settings"])
        if all(fps.under(key, step.selection_settings) for key in keys):
            return StepStatus(False, f"{reason}; keeps its appended records", False, fp)
        # partial results that carry their own fingerprints are each kept or redone by the step
        return StepStatus(False, reason, not step.fingerprints_partials, fp)
    inputs = fps.changed_inputs(state["inputs"], fp["inputs"])
    if inputs:
        appended = all(fps.only_appended(paths.root, n, state["inputs"].get(n)) for n in inputs)
        if step.resumes_appended_inputs and appended:
            return StepStatus(
                False, f"upstream {_upstream(inputs)} added rows ({', '.join(inputs)})", False, fp
            )
        restart = not step.fingerprints_partials
        return StepStatus(False, f"upstream {_upstream(inputs)} changed ({', '.join(inputs)})", restart, fp)
    if state.get("status") != "complete":
        detail = step.check(cfg, paths) if step.check is not None else None
        return StepStatus(False, "interrupted" + (f": {detail}" if detail else ""), False, fp)
    if missing:
        return StepStatus(False, f"outputs missing: {', '.join(missing)}", False, fp)
    detail = step.check(cfg, paths) if step.check is not None else None
    if detail:
        return StepStatus(False, f"incomplete: {detail}", False, fp)
    return StepStatus(True, "", False, fp)


def is_complete(step: Step, cfg: Config, paths: RunPaths) -> bool:
    return step_status(step, cfg, paths).complete


def pipeline_status(cfg: Config, paths: RunPaths, steps: tuple[Step, ...] | None = None) -> list[StepStatus]:
    """Every step's status, in order; a complete step whose upstream step is pending is pending too
    (its inputs will change when that step reruns)."""
    steps = existing_steps() if steps is None else steps
    pending: set[str] = set()
    out = []
    for step in steps:
        status = step_status(step, cfg, paths)
        if status.complete:
            waiting = [p.name for p in map(producer, step.inputs) if p is not None and p.name in pending]
            if waiting:
                status = StepStatus(
                    False,
                    f"upstream {', '.join(dict.fromkeys(waiting))} {'is' if len(set(waiting)) == 1 else 'are'} pending",
                    False,
                    status.fingerprint,
                )
        if not status.complete:
            pending.add(step.name)
        out.append(status)
    return out


@dataclass
class StepContext:
    """What every step cell needs: the typed config, the run's paths and the device."""

    cfg: Config
    paths: RunPaths
    device: str
    profile: str = "cpu"  # as the step was given them: what its launched processes are given
    overrides: tuple[str, ...] = ()


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
    device = resolve_device(cfg.hardware.device)
    return StepContext(cfg=cfg, paths=paths, device=device, profile=profile, overrides=tuple(overrides))
