"""Constraint back-translation: write into a prompt constraints that its response already meets.

After CRAB (Qi et al., 2024, "Constraint Back-translation Improves Complex Instruction Following"):
instead of asking a weak generator to meet a constraint and keeping the few samples that do, read
constraints off a response that exists (its word count, a keyword it uses, its bullets, its
postscript...) and append them to its prompt. The example is correct by construction, and each
constraint is still confirmed by lm-eval's own checker (`constraints.check`) before it is used, so a
derivation that disagrees with IFEval's counting is dropped rather than trained on.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from . import constraints as ic

# Frequent function words make poor "include the keyword" constraints.
_STOP = frozenset(
    (
        "about", "above", "after", "again", "against", "because", "before", "being", "below",
        "between", "could", "doing", "during", "every", "other", "should", "their", "there",
        "these", "those", "through", "under", "until", "where", "which", "while", "would",
    )
)  # fmt: skip


def _util() -> Any:
    ic._registry()  # punkt_tab first: instructions_util downloads it at import otherwise
    from lm_eval.tasks.ifeval import instructions_util

    return instructions_util


def _words(response: str, rng: random.Random) -> dict[str, Any] | None:
    count = _util().count_words(response)
    if count >= 20 and rng.random() < 0.4:  # IFEval's bounds are round numbers
        return {"num_words": max(10, (count // 10 - rng.randint(0, 1)) * 10), "relation": "at least"}
    return {"num_words": (count // 10 + 1 + rng.randint(0, 2)) * 10, "relation": "less than"}


def _sentences(response: str, rng: random.Random) -> dict[str, Any] | None:
    count = _util().count_sentences(response)
    if count >= 2 and rng.random() < 0.4:
        return {"num_sentences": count - rng.randint(0, 1), "relation": "at least"}
    return {"num_sentences": count + rng.randint(1, 3), "relation": "less than"}


def _content_words(response: str) -> Counter[str]:
    return Counter(w for w in re.findall(r"\b[a-z]{5,}\b", response.lower()) if w not in _STOP)


def _existence(response: str, rng: random.Random) -> dict[str, Any] | None:
    words = sorted(_content_words(response))
    if not words:
        return None
    return {"keywords": sorted(rng.sample(words, min(len(words), rng.randint(1, 2))))}


def _frequency(response: str, rng: random.Random) -> dict[str, Any] | None:
    repeated = sorted(w for w, n in _content_words(response).items() if n >= 2)
    if not repeated:
        return None
    word = rng.choice(repeated)
    return {"keyword": word, "frequency": min(_content_words(response)[word], 4), "relation": "at least"}


def _forbidden(response: str, rng: random.Random) -> dict[str, Any] | None:
    absent = [w for w in ic._FORBIDDEN_WORDS if not re.search(rf"\b{w}\b", response, flags=re.IGNORECASE)]
    return {"forbidden_words": sorted(rng.sample(absent, 2))} if len(absent) >= 2 else None


def _letters(response: str, rng: random.Random) -> dict[str, Any] | None:
    letter = rng.choice(ic._COMMON_LETTERS)
    count = response.lower().count(letter)
    bound = min(count, rng.randint(5, 15))  # the sampler's range: "at least 33 e's" reads oddly
    return {"letter": letter, "let_frequency": bound, "let_relation": "at least"} if count >= 5 else None


def _capitals(response: str, rng: random.Random) -> dict[str, Any] | None:
    count = sum(1 for w in _util().nltk.word_tokenize(response) if w.isupper())
    return {"capital_frequency": count + rng.randint(1, 3), "capital_relation": "less than"}


def _bullets(response: str, rng: random.Random) -> dict[str, Any] | None:
    count = len(re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)) + len(
        re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    )
    return {"num_bullets": count} if count >= 1 else None


def _highlights(response: str, rng: random.Random) -> dict[str, Any] | None:
    count = sum(1 for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip())
    return {"num_highlights": min(count, 4)} if count >= 1 else None


def _placeholders(response: str, rng: random.Random) -> dict[str, Any] | None:
    count = len(re.findall(r"\[.*?\]", response))
    return {"num_placeholders": min(count, 3)} if count >= 1 else None


def _postscript(response: str, rng: random.Random) -> dict[str, Any] | None:
    for marker in ("P.P.S", "P.S."):
        if marker.lower() in response.lower():
            return {"postscript_marker": marker}
    return None


def _sections(response: str, rng: random.Random) -> dict[str, Any] | None:
    for splitter in ("SECTION", "Section"):
        count = len(re.findall(rf"\s?{splitter}\s?\d+\s?", response))
        if count >= 2:
            return {"section_spliter": splitter, "num_sections": count}
    return None


def _end_phrase(response: str, rng: random.Random) -> dict[str, Any] | None:
    # a short closing question ("Is there anything else...?") is the end phrase it already has
    last = re.split(r"(?<=[.!?])\s+", response.strip())[-1]
    return {"end_phrase": last} if last.endswith("?") and 2 <= len(last.split()) <= 10 else None


def _when(test: Callable[[str], bool]) -> Callable[[str, random.Random], dict[str, Any] | None]:
    return lambda response, rng: {} if test(response) else None


# How each family is read off a response: kwargs the response should meet, or None when it has
# nothing to offer for that family. Every result is confirmed by lm-eval's checker before use.
DERIVERS: dict[str, Callable[[str, random.Random], dict[str, Any] | None]] = {
    "length_constraints:number_words": _words,
    "length_constraints:number_sentences": _sentences,
    "keywords:existence": _existence,
    "keywords:frequency": _frequency,
    "keywords:forbidden_words": _forbidden,
    "keywords:letter_frequency": _letters,
    "change_case:capital_word_frequency": _capitals,
    "change_case:english_lowercase": _when(lambda r: r == r.lower()),
    "change_case:english_capital": _when(lambda r: r == r.upper()),
    "punctuation:no_comma": _when(lambda r: "," not in r),
    "startend:quotation": _when(lambda r: len(r.strip()) > 2 and r.strip()[0] == r.strip()[-1] == '"'),
    "startend:end_checker": _end_phrase,
    "detectable_format:title": _when(lambda r: re.search(r"<<[^\n]+>>", r) is not None),
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections,
    "detectable_content:number_placeholders": _placeholders,
    "detectable_content:postscript": _postscript,
}


def met_constraints(
    response: str, rng: random.Random, allowed: Sequence[str] | None = None
) -> list[ic.Constraint]:
    """One constraint per family in ``allowed`` (default: every derivable one) that ``response``
    meets under lm-eval's strict check, in a seeded random order."""
    families = [f for f in (allowed or DERIVERS) if f in DERIVERS]
    rng.shuffle(families)
    found = []
    for family in families:
        kwargs = DERIVERS[family](response, rng)
        if kwargs is None:
            continue
        constraint = ic.Constraint(family, kwargs)
        if all(ic.check(response, [constraint])):
            found.append(constraint)
    return found


def pick_compatible(candidates: Sequence[ic.Constraint], k: int) -> list[ic.Constraint]:
    """The first ``k`` of ``candidates`` (in order) that conflict with none chosen before them."""
    by_id = {c.instruction_id: c for c in reversed(candidates)}  # the first of each id
    return [by_id[i] for i in ic.first_compatible((c.instruction_id for c in candidates), k)]


def backtranslate(
    response: str, rng: random.Random, k: int, allowed: Sequence[str] | None = None
) -> list[ic.Constraint]:
    """Up to ``k`` mutually compatible constraints that ``response`` already meets (strict), or []."""
    chosen = pick_compatible(met_constraints(response, rng, allowed), k)
    if chosen and not all(ic.check(response, chosen)):  # each passed alone; the set must too
        return []
    return chosen


_LENGTH = ("length_constraints:number_words", "length_constraints:number_sentences")


def separating_constraints(
    chosen: str, rejected: str, rng: random.Random, k: int, allowed: Sequence[str] | None = None
) -> list[ic.Constraint]:
    """Up to ``k`` compatible constraints that ``chosen`` meets, at least one of which ``rejected``
    fails (a length bound only when nothing else separates them), or [] when none does."""
    met = met_constraints(chosen, rng, allowed)
    separating = [c for c in met if not ic.check(rejected, [c])[0]]
    if not separating:
        return []
    first = min(separating, key=lambda c: c.instruction_id in _LENGTH)
    picked = pick_compatible([first, *(c for c in met if c is not first)], k)
    if all(ic.check(chosen, picked)) and not all(ic.check(rejected, picked)):
        return picked
    return []
