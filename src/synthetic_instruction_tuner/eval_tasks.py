"""Scoring for the repository's local lm-eval tasks (`lm_eval_tasks/*.yaml`).

* `process_ifeval`: lm-eval's own IFEval scoring, for the run's held-out constraint prompts;
* `process_ifbench`: IFBench's checkers (from if-verifiable) in IFEval's four-metric layout;
* `process_ppl`: (log-likelihood, bytes) pairs for lm-eval's `bits_per_byte` / `byte_perplexity`.

lm-eval's IFEval module downloads NLTK's punkt_tab at import; `ensure_punkt_tab` provides it first,
so scoring works offline.
"""

from __future__ import annotations

from typing import Any

from .nltk_resources import ensure_punkt_tab

ensure_punkt_tab()

from lm_eval.tasks.ifeval import utils as _ifeval  # noqa: E402 - needs punkt_tab in place first

process_ifeval = _ifeval.process_results
agg_inst_level_acc = _ifeval.agg_inst_level_acc


def process_ifbench(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    """IFBench's strict and loose checks of one response, prompt- and instruction-level."""
    from if_verifiable.api import evaluate_output_for_sample
    from if_verifiable.types import IFBenchSample

    sample = IFBenchSample(
        key=doc["key"],
        prompt=doc["prompt"],
        instruction_id_list=doc["instruction_id_list"],
        kwargs=doc["kwargs"],
    )
    checked, _ = evaluate_output_for_sample("ifbench", sample, results[0])
    # an empty response is checked against nothing by if-verifiable; count it as failing every instruction
    strict = [r.strict_pass for r in checked] or [False] * len(doc["instruction_id_list"])
    loose = [r.loose_pass for r in checked] or [False] * len(doc["instruction_id_list"])
    return {
        "prompt_level_strict_acc": all(strict),
        "inst_level_strict_acc": strict,
        "prompt_level_loose_acc": all(loose),
        "inst_level_loose_acc": loose,
    }


def process_ppl(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, Any]:
    loglikelihood, _ = results[0]
    size = len(doc["response"].encode("utf-8"))
    return {"bits_per_byte": (loglikelihood, size), "byte_perplexity": (loglikelihood, size)}
