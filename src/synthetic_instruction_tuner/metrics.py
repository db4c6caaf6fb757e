"""Per-sample metric definitions shared by step 07's result tables and the paired comparisons.

lm-eval logs one value per prompt and metric: 0/1 (prompt-level accuracy, multiple-choice `acc`), a
float (`truthfulqa_mc2`'s probability mass on true answers), a list (instruction-level accuracy,
pooled over a prompt's instructions) or a (log-likelihood, size) pair (`PAIR_METRICS`). `aggregate`
is lm-eval's aggregation of such values; `evaluation` and `comparison` both import it from here, so
neither imports the other for it.
"""

from __future__ import annotations

import math
import random
from typing import Any

PAIR_METRICS = ("bits_per_byte", "byte_perplexity", "word_perplexity")  # (log-likelihood, size) per sample


def aggregate(metric: str, values: list[Any]) -> float:
    """lm-eval's aggregation of one metric's per-sample values (per-sample lists are pooled)."""
    if not values:
        return float("nan")
    if metric in PAIR_METRICS:
        bits_per_byte = -sum(v[0] for v in values) / sum(v[1] for v in values) / math.log(2)
        return 2**bits_per_byte if metric == "byte_perplexity" else bits_per_byte
    if isinstance(values[0], list):
        flat = [float(x) for v in values for x in v]
        return sum(flat) / len(flat) if flat else float("nan")
    return sum(float(v) for v in values) / len(values)


def bootstrap_ci(
    metric: str, values: list[Any], iters: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap over prompts: each resample draws whole prompts with replacement."""
    rng = random.Random(seed)
    n = len(values)
    stats = sorted(aggregate(metric, [values[rng.randrange(n)] for _ in range(n)]) for _ in range(iters))
    return stats[int((1 - level) / 2 * (iters - 1))], stats[int((1 + level) / 2 * (iters - 1))]
