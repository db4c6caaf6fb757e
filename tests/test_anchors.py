"""The outside anchor: this run's figures set beside the model cards' by the cards' own definitions."""

from synthetic_instruction_tuner.anchors import anchor_rows
from synthetic_instruction_tuner.config import load_config


def _metric(value: float, n: int) -> dict:
    return {"value": value, "ci_low": value - 0.05, "ci_high": value + 0.05, "n": n}


def test_the_teachers_ifeval_is_the_cards_average_of_prompt_and_instruction_level():
    cfg = load_config("cpu", ["evaluation.ifeval_docs=300"])
    summary = {
        "metrics": {
            "teacher": {
                "ifeval": {
                    "prompt_level_strict_acc": _metric(0.2, 300),
                    "inst_level_strict_acc": _metric(0.3, 300),
                },
                "mmlu": {"acc": _metric(0.25, 57)},
            },
            "base": {"mmlu": {"acc": _metric(0.246, 57)}},
        }
    }
    rows = {(r["model"], r["benchmark"]): r for r in anchor_rows(cfg, summary)}
    ifeval = rows[("teacher: SmolLM2-135M-Instruct", "ifeval")]
    assert ifeval["this run (%)"] == "25.0 [20.0, 30.0], n=300"
    assert (ifeval["model card (%)"], ifeval["gap (points)"]) == ("29.9", "\u22124.9")
    assert "Q4_1 GGUF de-quantized" in ifeval["this run differs in"]
    assert "96 new tokens" in ifeval["this run differs in"] and "300 of 541" in ifeval["this run differs in"]
    mmlu = rows[("teacher: SmolLM2-135M-Instruct", "mmlu")]
    assert "5-shot, the answer letter scored (the card: cloze)" in mmlu["this run differs in"]
    # Gemma-3-270M's card gives no MMLU for this size: shown, not invented
    assert rows[("base: Gemma 3 PT 270M", "mmlu")]["model card (%)"] == "–"
    assert rows[("base: Gemma 3 PT 270M", "mmlu")]["gap (points)"] == "–"
    assert rows[("base: Gemma 3 PT 270M", "hellaswag")]["this run (%)"] == "not run"


def test_models_without_published_figures_have_no_rows():
    assert anchor_rows(load_config("smoke", []), {"metrics": {}}) == []
