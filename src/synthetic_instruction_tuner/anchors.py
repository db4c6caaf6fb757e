"""An outside anchor for the evaluation: the run's base model and teacher on the seed's benchmarks,
set beside the figures their model cards publish, with every setting that differs named.

A figure close to the card's says the wiring (data, prompt format, metric) is right; a gap is
explained by the settings listed, or it is a finding. The cards' figures are copied here with their
source and setting; they are not recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config import Config


@dataclass(frozen=True)
class CardFigure:
    model: str  # the model as its card names it
    benchmark: str  # lm-eval task whose figure is set beside it
    value: float | None  # None: the card publishes no figure for this model
    metric: str  # what the card reports
    setting: str  # shots, harness, formulation
    source: str


GEMMA_CARD = "https://huggingface.co/google/gemma-3-270m (Gemma 3 model card, section 'Gemma 3 270M')"
SMOLLM2_CARD = "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct (model card, 'Instruction model')"

# keyed by every reference that loads the model: the offline GGUF and the Hub id
CARDS: dict[str, tuple[CardFigure, ...]] = {
    "google/gemma-3-270m": (
        CardFigure("Gemma 3 PT 270M", "hellaswag", 40.9, "accuracy (%)", "10-shot", GEMMA_CARD),
        CardFigure(
            "Gemma 3 PT 270M",
            "mmlu",
            None,
            "not published",
            "the card's MMLU (5-shot) row covers the 4B, 12B and 27B models only",
            GEMMA_CARD,
        ),
    ),
    "HuggingFaceTB/SmolLM2-135M-Instruct": (
        CardFigure(
            "SmolLM2-135M-Instruct",
            "ifeval",
            29.9,
            "IFEval (average of prompt- and instruction-level accuracy, %)",
            "zero-shot, lighteval, chat template",
            SMOLLM2_CARD,
        ),
        CardFigure(
            "SmolLM2-135M-Instruct",
            "mmlu",
            29.3,
            "MMLU (cloze, %)",
            "zero-shot, lighteval: each answer's text scored by length-normalised log-likelihood",
            SMOLLM2_CARD,
        ),
        CardFigure(
            "SmolLM2-135M-Instruct", "hellaswag", 40.9, "accuracy (%)", "zero-shot, lighteval", SMOLLM2_CARD
        ),
    ),
}
ALIASES = {
    "gguf:gemma-3-270m": "google/gemma-3-270m",
    "gguf:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
# weights the offline references load: the card evaluated the original bf16 checkpoints
QUANTIZED = {
    "gguf:gemma-3-270m": "Q4_K_M GGUF de-quantized",
    "gguf:smollm2-135m-instruct": "Q4_1 GGUF de-quantized",
}


def _ours(summary: dict, method: str, task: str) -> tuple[float, float, float, int] | None:
    """(value, low, high, n) in percent, by the card's definition of the task's figure."""
    metrics = summary.get("metrics", {}).get(method, {}).get(task)
    if not metrics:
        return None
    if task == "ifeval":  # the card averages prompt- and instruction-level accuracy
        parts = [metrics.get(k) for k in ("prompt_level_strict_acc", "inst_level_strict_acc")]
        if not all(parts):
            return None
        # the interval: the mean of the two intervals' ends, an approximation of the mean's own
        value, low, high = (50 * sum(p[key] for p in parts) for key in ("value", "ci_low", "ci_high"))
        return value, low, high, parts[0]["n"]
    metric = metrics.get("acc_norm" if task == "hellaswag" else "acc")
    if not metric:
        return None
    return 100 * metric["value"], 100 * metric["ci_low"], 100 * metric["ci_high"], metric["n"]


def _differences(cfg: Config, ref: str, task: str) -> str:
    """The settings of this run that differ from the card's, for one task."""
    e = cfg.evaluation
    notes = [QUANTIZED[ref]] if ref in QUANTIZED else []
    if task == "ifeval":
        notes.append(
            "strict accuracy, the students' generation limit of "
            f"{e.benchmark_max_gen_toks or 1280} new tokens"
        )
        notes.append(f"{e.ifeval_docs or 541} of 541 prompts" if e.mode == "local" else "all 541 prompts")
    if task == "mmlu":
        notes.append(f"lm-eval's mmlu: {e.mmlu_fewshot}-shot, the answer letter scored (the card: cloze)")
        if e.mode == "local":
            notes.append(f"{e.mmlu_docs_per_subject or 'all'} question(s) per subject")
    if task == "hellaswag":
        notes.append("lm-eval's hellaswag: zero-shot, acc_norm")
    return "; ".join(notes)


def anchor_rows(cfg: Config, summary: dict) -> list[dict[str, Any]]:
    """A row per published figure of the run's base model and teacher: ours beside the card's."""
    rows = []
    for method, ref in (("base", cfg.models.target), ("teacher", cfg.models.generator)):
        for card in CARDS.get(ALIASES.get(ref, ref), ()):
            ours = _ours(summary, method, card.benchmark)
            rows.append(
                {
                    "model": f"{method}: {card.model}",
                    "benchmark": card.benchmark,
                    "this run (%)": f"{ours[0]:.1f} [{ours[1]:.1f}, {ours[2]:.1f}], n={ours[3]}"
                    if ours
                    else "not run",
                    "model card (%)": "–" if card.value is None else f"{card.value:.1f}",
                    "card's metric and setting": f"{card.metric}; {card.setting}",
                    "this run differs in": _differences(cfg, ref, card.benchmark),
                    # text, as the other columns: a float column with gaps renders as -7.700
                    "gap (points)": "–"
                    if ours is None or card.value is None
                    else f"{ours[0] - card.value:+.1f}".replace("-", "\u2212"),
                    "source": card.source,
                }
            )
    return rows
