"""Paired comparisons between methods on the same prompts, and accuracy per constraint family.

Every method answers the same prompts of a task (lm-eval's `doc_id`, checked against its `doc_hash`),
so a difference between two methods is measured prompt by prompt. That removes the spread between easy
and hard prompts, which unpaired intervals carry twice; with a few hundred prompts it is what lets a
difference of a few points be told from noise. Per task and metric, for each pair in `COMPARISONS`:

* the difference of the two aggregated values (first minus second, lm-eval's own aggregation);
* a paired percentile-bootstrap 95% interval: each resample draws prompt indices with replacement and
  uses the same indices for both methods;
* for metrics that are 0/1 per prompt (prompt-level strict/loose accuracy, multiple-choice `acc`), the
  exact McNemar test: a two-sided binomial test of the discordant prompts (right for one method, wrong
  for the other) against 1/2. It does not apply to per-prompt lists (instruction-level accuracy, pooled
  over instructions) or continuous values (bits per byte); those get the difference and its interval.

Per method and IFEval-style task, instruction-level accuracy is also split by constraint family: the
part of an instruction id before ':' (`keywords`, `length_constraints`, `detectable_format`...).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .metrics import PAIR_METRICS, aggregate
from .store import RunPaths, read_jsonl

# (first, second): the difference reported is first - second. The teacher is the generator model.
COMPARISONS = (
    ("sft_lora", "base"),
    ("dpo", "sft_lora"),
    ("dpo", "base"),
    ("prompt_tuning", "base"),
    ("sft_lora", "teacher"),
    ("prompt_tuning", "teacher"),
    ("dpo", "teacher"),
)
FAMILY_METRICS = ("inst_level_strict_acc", "inst_level_loose_acc")
NOT_BINARY = {
    "list": "does not apply: the per-prompt value is a list of instruction results, pooled over instructions",
    "continuous": "does not apply: the per-prompt value is not 0/1",
}
_CHUNK = 256  # bootstrap resamples drawn at once: bounds memory on tasks with thousands of prompts


def comparison_key(first: str, second: str) -> str:
    return f"{first} - {second}"


def mcnemar_exact(first_only: int, second_only: int) -> float:
    """Exact McNemar p-value (two-sided) from the discordant pairs of a 2x2 table.

    Under the null hypothesis each discordant prompt favours either method with probability 1/2, so
    the p-value is scipy's exact two-sided binomial test of `first_only` out of the discordant total.
    """
    from scipy.stats import binomtest

    discordant = first_only + second_only
    if discordant == 0:
        return 1.0
    return float(binomtest(first_only, discordant, 0.5).pvalue)


def value_kind(metric: str, values: Sequence[Any]) -> str:
    """'binary' (0/1 per prompt), 'list' (a list per prompt) or 'continuous'."""
    if metric in PAIR_METRICS:
        return "continuous"
    if values and isinstance(values[0], list):
        return "list"
    if all(isinstance(v, bool) or v in (0, 1) for v in values):
        return "binary"
    return "continuous"


def _ratio_parts(metric: str, values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt (numerator, denominator) whose pooled ratio sum/sum is what `aggregate` transforms:
    the value itself over 1, a list's sum over its length, a log-likelihood over its size."""
    if metric in PAIR_METRICS:
        parts = [(float(v[0]), float(v[1])) for v in values]
    elif values and isinstance(values[0], list):
        parts = [(float(sum(float(x) for x in v)), float(len(v))) for v in values]
    else:
        parts = [(float(v), 1.0) for v in values]
    array = np.asarray(parts, dtype=float).reshape(-1, 2)
    return array[:, 0], array[:, 1]


def _from_ratio(metric: str, ratio: float) -> float:
    """The metric for a pooled ratio: `aggregate` of one pseudo-sample carrying it (one definition)."""
    if np.isnan(ratio):
        return float("nan")
    return aggregate(metric, [[ratio, 1.0]] if metric in PAIR_METRICS else [ratio])


def _resampled_ratios(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], iters: int, seed: int
) -> list[np.ndarray]:
    """Pooled ratios of `iters` bootstrap resamples; every resample draws one set of prompt indices
    shared by all the (numerator, denominator) arrays given, which is what makes a bootstrap paired."""
    n = len(parts[0][0])
    if n == 0:
        return [np.full(iters, np.nan) for _ in parts]
    rng = np.random.default_rng(seed)
    chunks: list[list[np.ndarray]] = [[] for _ in parts]
    for start in range(0, iters, _CHUNK):
        index = rng.integers(0, n, size=(min(_CHUNK, iters - start), n))
        for chunk, (num, den) in zip(chunks, parts, strict=True):
            sums = den[index].sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                chunk.append(np.where(sums > 0, num[index].sum(axis=1) / sums, np.nan))
    return [np.concatenate(chunk) for chunk in chunks]


def _percentile_interval(stats: np.ndarray, level: float) -> tuple[float, float]:
    """The same percentile convention as `metrics.bootstrap_ci`; undefined resamples are left out."""
    ordered = np.sort(stats[~np.isnan(stats)])
    if not len(ordered):
        return float("nan"), float("nan")
    k = len(ordered)
    return float(ordered[int((1 - level) / 2 * (k - 1))]), float(ordered[int((1 + level) / 2 * (k - 1))])


def interval(metric: str, values: Sequence[Any], iters: int, seed: int, level: float = 0.95) -> dict:
    """One method's metric with its percentile-bootstrap interval over prompts."""
    (ratios,) = _resampled_ratios([_ratio_parts(metric, values)], iters, seed)
    stats = np.array([_from_ratio(metric, r) for r in ratios])
    low, high = _percentile_interval(stats, level)
    return {"value": aggregate(metric, list(values)), "ci_low": low, "ci_high": high, "n": len(values)}


def paired_difference(
    metric: str,
    first: Sequence[Any],
    second: Sequence[Any],
    iters: int,
    seed: int,
    level: float = 0.95,
) -> dict[str, Any]:
    """first - second on the same prompts (aligned lists): difference, paired bootstrap interval, and
    for 0/1 metrics the 2x2 table and its exact McNemar p-value."""
    if len(first) != len(second):
        raise ValueError(f"paired values must align prompt by prompt: {len(first)} vs {len(second)}")
    ratios_a, ratios_b = _resampled_ratios(
        [_ratio_parts(metric, first), _ratio_parts(metric, second)], iters, seed
    )
    diffs = np.array(
        [_from_ratio(metric, a) - _from_ratio(metric, b) for a, b in zip(ratios_a, ratios_b, strict=True)]
    )
    low, high = _percentile_interval(diffs, level)
    out: dict[str, Any] = {
        "difference": aggregate(metric, list(first)) - aggregate(metric, list(second)),
        "ci_low": low,
        "ci_high": high,
        "n": len(first),
    }
    kinds = {value_kind(metric, first), value_kind(metric, second)}
    if kinds == {"binary"}:
        pairs = [(bool(a), bool(b)) for a, b in zip(first, second, strict=True)]
        table = {
            "both": sum(a and b for a, b in pairs),
            "first_only": sum(a and not b for a, b in pairs),
            "second_only": sum(b and not a for a, b in pairs),
            "neither": sum(not a and not b for a, b in pairs),
        }
        out.update(table, mcnemar_p=mcnemar_exact(table["first_only"], table["second_only"]))
    else:
        out.update(mcnemar_p=None, mcnemar=NOT_BINARY["list" if "list" in kinds else "continuous"])
    return out


def _joined(log_first: Path, log_second: Path) -> tuple[list[dict], list[dict]]:
    """The two methods' sample rows for one task, aligned by doc_id; both must score the same prompts."""
    first = {r["doc_id"]: r for r in read_jsonl(log_first, required=("doc_id", "metrics"))}
    second = {r["doc_id"]: r for r in read_jsonl(log_second, required=("doc_id", "metrics"))}
    differ = sorted(
        set(first) ^ set(second)
        | {i for i in set(first) & set(second) if first[i].get("doc_hash") != second[i].get("doc_hash")}
    )
    if differ:
        raise DataError(
            f"{log_first} and {log_second} score different prompts (doc_id {differ[0]}): "
            "delete the stale eval/<method>.json and run step 07 again"
        )
    ids = sorted(first)
    return [first[i] for i in ids], [second[i] for i in ids]


def paired_table(paths: RunPaths, iters: int, seed: int) -> dict[str, Any]:
    """{"first - second": {"first", "second", "tasks": {task: {metric: paired_difference}}}} for every
    comparison whose two methods have sample logs."""
    samples = paths.eval / "samples"
    out: dict[str, Any] = {}
    for first, second in COMPARISONS:
        tasks: dict[str, Any] = {}
        for log in sorted((samples / first).glob("*.jsonl")):
            other = samples / second / log.name
            if not other.exists():
                continue
            rows_a, rows_b = _joined(log, other)
            tasks[log.stem] = {
                metric: paired_difference(
                    metric, [r[metric] for r in rows_a], [r[metric] for r in rows_b], iters, seed
                )
                for metric in (rows_a[0]["metrics"] if rows_a else [])
            }
        if tasks:
            out[comparison_key(first, second)] = {"first": first, "second": second, "tasks": tasks}
    return out


def family_of(instruction_id: str) -> str:
    return instruction_id.split(":", 1)[0]


def family_accuracy(rows: Sequence[dict], iters: int, seed: int) -> dict[str, Any]:
    """{family: {prompts, instructions, inst_level_strict_acc: {value, ci_low, ci_high, n}, ...}}
    from one task's sample rows; the interval resamples the prompts that carry the family."""
    per_family: dict[str, dict[str, list[list[Any]]]] = {}
    for row in rows:
        ids = row["doc"]["instruction_id_list"]
        for metric in FAMILY_METRICS:
            if len(row[metric]) != len(ids):
                raise DataError(
                    f"doc_id {row['doc_id']}: {metric} has {len(row[metric])} results for {len(ids)} instructions"
                )
        for family in sorted({family_of(i) for i in ids}):
            keep = [k for k, i in enumerate(ids) if family_of(i) == family]
            slot = per_family.setdefault(family, {m: [] for m in FAMILY_METRICS})
            for metric in FAMILY_METRICS:
                slot[metric].append([row[metric][k] for k in keep])
    out = {}
    for family, by_metric in sorted(per_family.items()):
        values = by_metric[FAMILY_METRICS[0]]
        out[family] = {
            "prompts": len(values),
            "instructions": sum(len(v) for v in values),
            **{m: interval(m, by_metric[m], iters, seed) for m in FAMILY_METRICS},
        }
    return out


def family_table(paths: RunPaths, methods: Sequence[str], iters: int, seed: int) -> dict[str, Any]:
    """{method: {task: family_accuracy}} for every task whose samples carry IFEval instruction lists."""
    out: dict[str, Any] = {}
    for method in methods:
        for log in sorted((paths.eval / "samples" / method).glob("*.jsonl")):
            rows = read_jsonl(log, required=("doc_id", "doc"))
            if not rows or "instruction_id_list" not in rows[0]["doc"]:
                continue
            if not set(FAMILY_METRICS) <= set(rows[0].get("metrics", [])):
                continue
            out.setdefault(method, {})[log.stem] = family_accuracy(rows, iters, seed)
    return out


ECHO_WORDS = 8  # an answer "repeats the prompt" when its first words are the prompt's first words
REPEAT_INSTRUCTION = "combination:repeat_prompt"  # IFEval asks for the echo on these prompts


def _words(text: str, n: int) -> list[str]:
    return [w.strip(".,;:!?\"'()[]*#").casefold() for w in text.split()[:n]]


def begins_with_prompt(prompt: str, answer: str) -> bool:
    """Whether `answer` opens with the prompt's first ECHO_WORDS words (case and edge punctuation aside).

    A base model that continues a chat by restating the request scores on IFEval instructions the
    prompt itself satisfies (a keyword, a phrase); this counts how often that happens."""
    head = _words(prompt, ECHO_WORDS)
    return bool(head) and _words(answer, len(head)) == head


def _answer(row: dict[str, Any]) -> str | None:
    """The generated text of a sample row (lm-eval's filtered response), or None for scored tasks."""
    response = (row.get("filtered_resps") or [None])[0]
    return response if isinstance(response, str) else None


def prompt_echo_table(paths: RunPaths, methods: Sequence[str]) -> dict[str, Any]:
    """{method: {task: {answers, echo, echo_share, echo_asked}}} over every generation task whose
    documents carry a `prompt`; `echo_asked` counts the echoes IFEval's repeat_prompt asked for."""
    out: dict[str, Any] = {}
    for method in methods:
        for log in sorted((paths.eval / "samples" / method).glob("*.jsonl")):
            rows = read_jsonl(log, required=("doc_id", "doc"))
            pairs = [(r["doc"], _answer(r)) for r in rows if "prompt" in r["doc"] and _answer(r) is not None]
            if not pairs:
                continue
            echoed = [doc for doc, answer in pairs if begins_with_prompt(doc["prompt"], answer)]
            out.setdefault(method, {})[log.stem] = {
                "answers": len(pairs),
                "echo": len(echoed),
                "echo_share": len(echoed) / len(pairs),
                "echo_asked": sum(REPEAT_INSTRUCTION in d.get("instruction_id_list", []) for d in echoed),
            }
    return out
