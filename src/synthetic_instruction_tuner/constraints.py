"""IFEval-style verifiable constraints, built and checked with lm-eval's own IFEval code.

Instruction wording comes from each checker's ``build_description`` and verdicts from its
``check_following``, so a constraint appended to a synthetic prompt here is scored exactly as
lm-eval's ``ifeval`` task would score it, and :func:`to_ifeval_record` rows can be fed to that
task unchanged.
"""

from __future__ import annotations

import copy
import functools
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from .nltk_resources import ensure_punkt_tab


@dataclass(frozen=True)
class Constraint:
    """One IFEval instruction: its registry id and the ``build_description`` kwargs.

    ``kwargs`` is the JSON-serialisable dict google/IFEval stores per instruction; it is left
    out of the hash because dicts are unhashable (equality still compares it).
    """

    instruction_id: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)


# Ids that read naturally after any user request and are checkable from the response alone.
# Left out: combination:repeat_prompt (needs the prompt), combination:two_responses (asks for two
# answers and conflicts with almost every other id), detectable_format:constrained_response (only
# fits yes/no questions) and language:response_language (the generator writes English anyway,
# and langdetect on short text is noisy).
SUPPORTED_IDS: tuple[str, ...] = (
    "change_case:capital_word_frequency",
    "change_case:english_capital",
    "change_case:english_lowercase",
    "detectable_content:number_placeholders",
    "detectable_content:postscript",
    "detectable_format:json_format",
    "detectable_format:multiple_sections",
    "detectable_format:number_bullet_lists",
    "detectable_format:number_highlighted_sections",
    "detectable_format:title",
    "keywords:existence",
    "keywords:forbidden_words",
    "keywords:frequency",
    "keywords:letter_frequency",
    "length_constraints:nth_paragraph_first_word",
    "length_constraints:number_paragraphs",
    "length_constraints:number_sentences",
    "length_constraints:number_words",
    "punctuation:no_comma",
    "startend:end_checker",
    "startend:quotation",
)

# Pairs the registry lets through that cannot both be met as worded.
EXTRA_CONFLICTS: tuple[tuple[str, str], ...] = (
    # The section marker is "Section"/"SECTION" and the checker matches it case-sensitively.
    ("change_case:english_lowercase", "detectable_format:multiple_sections"),
    ("change_case:english_capital", "detectable_format:multiple_sections"),
    # "P.S." and the exact end phrases contain letters of the forbidden case; the case-insensitive
    # checkers would accept a rewrite, but the instructions contradict each other.
    ("change_case:english_lowercase", "detectable_content:postscript"),
    ("change_case:english_lowercase", "startend:end_checker"),
    ("change_case:english_capital", "startend:end_checker"),
)

_RELATIONS = ("less than", "at least")
# Keywords avoid q, j, x and z so a "letter ... less than" constraint never fights a keyword.
_KEYWORDS = (
    "benefit", "challenge", "detail", "important", "practical", "process",
    "reason", "result", "simple", "solution", "strategy", "summary",
)  # fmt: skip
_FORBIDDEN_WORDS = (
    "actually", "also", "basically", "definitely", "just", "really",
    "simply", "thing", "things", "very",
)  # fmt: skip
# An opening paragraph cannot sensibly start with a connective, later ones can.
_OPENING_WORDS = ("first", "imagine", "overall")
_LATER_WORDS = ("additionally", "finally", "however", "meanwhile", "therefore")
# Questions only: IFEval's wording puts a "." straight after the phrase, so "...more details.." would
# read as a typo. The first two are IFEval's own options.
_END_PHRASES = (
    "Is there anything else I can help with?",
    "Any other questions?",
    "Would you like to know more?",
)
_COMMON_LETTERS = "aeinorst"
_RARE_LETTERS = "jqxz"
_MAX_ATTEMPTS = 1000


def _num_words(rng: random.Random) -> dict[str, Any]:
    relation = rng.choice(_RELATIONS)
    low, high = (50, 200) if relation == "less than" else (30, 150)
    return {"num_words": rng.randrange(low, high + 1, 10), "relation": relation}


def _num_sentences(rng: random.Random) -> dict[str, Any]:
    relation = rng.choice(_RELATIONS)
    low, high = (6, 12) if relation == "less than" else (3, 8)
    return {"num_sentences": rng.randint(low, high), "relation": relation}


def _letter_frequency(rng: random.Random) -> dict[str, Any]:
    # "At least" on a common letter or "less than" on a rare one: both are achievable in prose.
    if rng.choice(_RELATIONS) == "at least":
        letter, frequency, relation = rng.choice(_COMMON_LETTERS), rng.randint(5, 15), "at least"
    else:
        letter, frequency, relation = rng.choice(_RARE_LETTERS), rng.randint(2, 5), "less than"
    return {"letter": letter, "let_frequency": frequency, "let_relation": relation}


def _capital_word_frequency(rng: random.Random) -> dict[str, Any]:
    relation = rng.choice(_RELATIONS)
    low, high = (2, 5) if relation == "at least" else (3, 6)
    return {"capital_frequency": rng.randint(low, high), "capital_relation": relation}


def _nth_paragraph_first_word(rng: random.Random) -> dict[str, Any]:
    num_paragraphs = rng.randint(2, 4)
    nth = rng.randint(1, num_paragraphs)
    first_word = rng.choice(_OPENING_WORDS if nth == 1 else _LATER_WORDS)
    return {"num_paragraphs": num_paragraphs, "nth_paragraph": nth, "first_word": first_word}


# Kwargs are already in the form each checker normalises to (sorted keyword lists, lower-case
# letters, stripped phrases), so get_instruction_args() round-trips them unchanged.
_KWARG_SAMPLERS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "change_case:capital_word_frequency": _capital_word_frequency,
    "change_case:english_capital": lambda rng: {},
    "change_case:english_lowercase": lambda rng: {},
    "detectable_content:number_placeholders": lambda rng: {"num_placeholders": rng.randint(1, 3)},
    "detectable_content:postscript": lambda rng: {"postscript_marker": rng.choice(("P.S.", "P.P.S"))},
    "detectable_format:json_format": lambda rng: {},
    "detectable_format:multiple_sections": lambda rng: {
        "section_spliter": rng.choice(("Section", "SECTION")),
        "num_sections": rng.randint(2, 5),
    },
    "detectable_format:number_bullet_lists": lambda rng: {"num_bullets": rng.randint(2, 5)},
    "detectable_format:number_highlighted_sections": lambda rng: {"num_highlights": rng.randint(1, 4)},
    "detectable_format:title": lambda rng: {},
    "keywords:existence": lambda rng: {"keywords": sorted(rng.sample(_KEYWORDS, 2))},
    "keywords:forbidden_words": lambda rng: {"forbidden_words": sorted(rng.sample(_FORBIDDEN_WORDS, 2))},
    "keywords:frequency": lambda rng: {
        "keyword": rng.choice(_KEYWORDS),
        "frequency": rng.randint(2, 4),
        "relation": "at least",  # "less than" a word the model had no reason to use is a free pass
    },
    "keywords:letter_frequency": _letter_frequency,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "length_constraints:number_paragraphs": lambda rng: {"num_paragraphs": rng.randint(2, 5)},
    "length_constraints:number_sentences": _num_sentences,
    "length_constraints:number_words": _num_words,
    "punctuation:no_comma": lambda rng: {},
    "startend:end_checker": lambda rng: {"end_phrase": rng.choice(_END_PHRASES)},
    "startend:quotation": lambda rng: {},
}


@functools.cache
def _registry() -> ModuleType:
    """lm-eval's IFEval registry, imported only once punkt_tab is installed.

    Its ``instructions_util`` tries ``nltk.download("punkt_tab")`` at import time and its
    sentence counter needs the model, so the model has to exist first.
    """
    ensure_punkt_tab()
    import langdetect

    # The lower/upper-case checkers call langdetect, which is random unless seeded; a fixed seed
    # makes every verdict (and therefore rewards and preference pairs) reproducible. It is
    # process-global, so lm-eval's own checkers in this process agree with ours.
    if langdetect.DetectorFactory.seed is None:
        langdetect.DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import instructions_registry

    return instructions_registry


@functools.cache
def conflicts() -> dict[str, frozenset[str]]:
    """Symmetric conflict map: the registry's ``INSTRUCTION_CONFLICTS`` plus :data:`EXTRA_CONFLICTS`.

    The registry's map is one-directional as shipped (lm-eval never applies its ``conflict_make``),
    e.g. english_lowercase lists english_capital but not the reverse.
    """
    registry = _registry()
    table = {key: set(value) for key, value in registry.INSTRUCTION_CONFLICTS.items()}
    for a, b in EXTRA_CONFLICTS:
        table[a].add(b)
    registry.conflict_make(table)
    return {key: frozenset(value) for key, value in table.items()}


def first_compatible(ids: Iterable[str], k: int) -> list[str]:
    """The first ``k`` of ``ids`` (in order) that conflict with none picked before them."""
    table = conflicts()
    picked: list[str] = []
    for instruction_id in ids:
        if len(picked) == k:
            break
        if not any(other in table[instruction_id] for other in picked):
            picked.append(instruction_id)
    return picked


def sample_constraints(rng: random.Random, k: int, allowed: Sequence[str] | None = None) -> list[Constraint]:
    """Draw ``k`` distinct, mutually compatible constraints with concrete kwargs, from ``allowed``
    (default: every supported id).

    Everything comes from ``rng`` (never the global ``random`` that IFEval's checkers fall back
    on), so a seed reproduces the exact constraint set.
    """
    pool = tuple(allowed) if allowed else SUPPORTED_IDS
    unknown = [i for i in pool if i not in SUPPORTED_IDS]
    if unknown:
        raise ValueError(f"unsupported constraint id {unknown[0]!r} (supported: {', '.join(SUPPORTED_IDS)})")
    if not 0 <= k <= len(pool):
        raise ValueError(f"k must be between 0 and {len(pool)}, got {k}")
    for _ in range(_MAX_ATTEMPTS):
        order = list(pool)
        rng.shuffle(order)
        chosen = first_compatible(order, k)
        if len(chosen) == k:
            return [Constraint(i, _KWARG_SAMPLERS[i](rng)) for i in chosen]
    raise ValueError(f"could not find {k} mutually compatible constraints in {_MAX_ATTEMPTS} attempts")


def _build(constraint: Constraint) -> tuple[Any, str]:
    """A fresh lm-eval checker, configured as lm-eval's IFEval scorer does it, and its description."""
    registry = _registry()
    cls = registry.INSTRUCTION_DICT.get(constraint.instruction_id)
    if cls is None:
        raise ValueError(f"unknown IFEval instruction id {constraint.instruction_id!r}")
    checker = cls(constraint.instruction_id)
    # lm-eval drops falsy kwargs before build_description; doing the same keeps verdicts identical.
    kwargs = {key: value for key, value in constraint.kwargs.items() if value}
    missing = [key for key in checker.get_instruction_args_keys() if key not in kwargs]
    if missing:
        # build_description would silently fill these from the global random module.
        raise ValueError(f"{constraint.instruction_id} needs kwargs {missing}, got {constraint.kwargs}")
    return checker, checker.build_description(**kwargs)


def _words(items: Sequence[str]) -> str:
    quoted = [f'"{w}"' for w in items]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} and {quoted[-1]}"


def _rel(relation: str) -> str:
    return "fewer than" if relation == "less than" else relation


# Other wordings of each family's instruction, written for this project (the registry's own wording
# is always the third choice): a student taught one sentence per family meets that sentence and
# little else. Each keeps the checker's meaning exactly; none shares an 8-word run with a benchmark
# prompt (tests/test_constraints.py), so they teach the instruction, not a benchmark's text.
WORDINGS: dict[str, tuple[Callable[..., str], ...]] = {
    "change_case:capital_word_frequency": (
        lambda capital_frequency, capital_relation: (
            f"Write {_rel(capital_relation)} {capital_frequency} words entirely in capital letters."
        ),
        lambda capital_frequency, capital_relation: (
            f"The number of ALL-CAPS words in your reply must be {_rel(capital_relation)} {capital_frequency}."
        ),
    ),
    "change_case:english_capital": (
        lambda: "Respond in English, with every single letter in upper case.",
        lambda: "Use capital letters only: the whole English reply in uppercase.",
    ),
    "change_case:english_lowercase": (
        lambda: "Reply in English using lowercase letters only; not one capital anywhere.",
        lambda: "Keep every letter of your English answer in lower case.",
    ),
    "detectable_content:number_placeholders": (
        lambda num_placeholders: (
            f"Leave at least {num_placeholders} blanks for me to fill in, each written in square brackets like [name]."
        ),
        lambda num_placeholders: (
            f"Use {num_placeholders} or more square-bracket placeholders, for example [city]."
        ),
    ),
    "detectable_content:postscript": (
        lambda postscript_marker: f"Add a note at the very end that begins with {postscript_marker}",
        lambda postscript_marker: f"Close with a postscript introduced by {postscript_marker}",
    ),
    "detectable_format:json_format": (
        lambda: "Give your whole reply as valid JSON.",
        lambda: "Format all of the output as one JSON object; markdown code fences are fine.",
    ),
    "detectable_format:multiple_sections": (
        lambda section_spliter, num_sections: (
            f"Split the answer into {num_sections} parts, headed {section_spliter} 1, {section_spliter} 2 and so on."
        ),
        lambda section_spliter, num_sections: (
            f"Organise your reply in {num_sections} sections labelled {section_spliter} 1 to {section_spliter} {num_sections}."
        ),
    ),
    "detectable_format:number_bullet_lists": (
        lambda num_bullets: (
            f"Present the answer as exactly {num_bullets} markdown bullet points, each line starting with *."
        ),
        lambda num_bullets: f"Give me {num_bullets} bullet points, no more and no fewer, using * for each.",
    ),
    "detectable_format:number_highlighted_sections": (
        lambda num_highlights: (
            f"Emphasise at least {num_highlights} parts with markdown italics, like *this part*."
        ),
        lambda num_highlights: (
            f"Mark {num_highlights} or more phrases as highlighted by wrapping each in single asterisks."
        ),
    ),
    "detectable_format:title": (
        lambda: "Give your answer a title inside double angle brackets, like <<my title>>.",
        lambda: "Open with a title wrapped in << and >>.",
    ),
    "keywords:existence": (
        lambda keywords: f"Make sure the words {_words(keywords)} appear in your answer.",
        lambda keywords: f"Your reply has to use the words {_words(keywords)}.",
    ),
    "keywords:forbidden_words": (
        lambda forbidden_words: f"Avoid the words {_words(forbidden_words)} entirely.",
        lambda forbidden_words: f"Never use these words: {_words(forbidden_words)}.",
    ),
    "keywords:frequency": (
        lambda keyword, frequency, relation: f'Use the word "{keyword}" {_rel(relation)} {frequency} times.',
        lambda keyword, frequency, relation: (
            f'The word "{keyword}" must occur {_rel(relation)} {frequency} times in your answer.'
        ),
    ),
    "keywords:letter_frequency": (
        lambda letter, let_frequency, let_relation: (
            f'The letter "{letter}" should show up {_rel(let_relation)} {let_frequency} times in your reply.'
        ),
        lambda letter, let_frequency, let_relation: (
            f'Use the letter "{letter}" {_rel(let_relation)} {let_frequency} times.'
        ),
    ),
    "length_constraints:number_paragraphs": (
        lambda num_paragraphs: f"Write {num_paragraphs} paragraphs with a line of *** between each two.",
        lambda num_paragraphs: f"Use exactly {num_paragraphs} paragraphs, divided from each other by ***.",
    ),
    "length_constraints:number_sentences": (
        lambda num_sentences, relation: f"Keep it to {_rel(relation)} {num_sentences} sentences.",
        lambda num_sentences, relation: f"Write {_rel(relation)} {num_sentences} sentences.",
    ),
    "length_constraints:number_words": (
        lambda num_words, relation: f"Use {_rel(relation)} {num_words} words.",
        lambda num_words, relation: f"Your answer should be {_rel(relation)} {num_words} words long.",
    ),
    "punctuation:no_comma": (
        lambda: "Do not use any commas.",
        lambda: "Write without a single comma.",
    ),
    "startend:end_checker": (
        lambda end_phrase: f"End your answer with the exact words {end_phrase} and nothing after them.",
        lambda end_phrase: f"Your last words must be: {end_phrase}",
    ),
    "startend:quotation": (
        lambda: "Put your whole answer inside double quotes.",
        lambda: "Enclose the entire reply in double quotation marks.",
    ),
    "combination:repeat_prompt": (
        lambda prompt_to_repeat: (
            "Before answering, copy my request above exactly as written, then give your answer."
        ),
        lambda prompt_to_repeat: (
            "Start by restating the request word for word, with nothing before it; then answer it."
        ),
        lambda prompt_to_repeat: (
            "Begin your reply with my message above, copied in full, and only then respond."
        ),
        lambda prompt_to_repeat: (
            "Echo my request verbatim as the first thing you write; the answer comes after it."
        ),
        lambda prompt_to_repeat: (
            "Quote the request back to me unchanged before anything else (not this sentence), then reply."
        ),
        lambda prompt_to_repeat: (
            "Open with an exact copy of what I asked, no words ahead of it, followed by your answer."
        ),
    ),
}


def wording(constraint: Constraint, rng: random.Random | None = None, share: float = 0.0) -> str:
    """The constraint's instruction: IFEval's registry wording, or with probability ``share`` (drawn
    from ``rng``) one of `WORDINGS`."""
    registry = _build(constraint)[1]
    options = WORDINGS.get(constraint.instruction_id, ())
    if rng is None or not options or rng.random() >= share:
        return registry
    kwargs = {key: value for key, value in constraint.kwargs.items() if value}
    return rng.choice(options)(**kwargs)


def describe(constraints: Iterable[Constraint], rng: random.Random | None = None, share: float = 0.0) -> str:
    """The instruction text for appending to a prompt: IFEval's exact wording unless ``share`` > 0."""
    return " ".join(wording(c, rng, share) for c in constraints)


def add_constraints(prompt: str, constraints: Sequence[Constraint], text: str | None = None) -> str:
    """``prompt`` followed by a blank line and the constraint text (``text``, else `describe`'s);
    unchanged if there are no constraints."""
    if not constraints:
        return prompt
    return f"{prompt.rstrip()}\n\n{describe(constraints) if text is None else text}"


def _loose_variants(response: str) -> list[str]:
    """The response rewrites lm-eval's ``test_instruction_following_loose`` tries, in its order.

    Dropping the first/last line forgives a preamble ("Sure, here it is:") or a sign-off, and
    removing asterisks forgives markdown emphasis.
    """
    lines = response.split("\n")
    trimmed = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *trimmed, *(t.replace("*", "") for t in trimmed)]


def check(response: str, constraints: Iterable[Constraint], loose: bool = False) -> list[bool]:
    """Per-constraint verdicts, identical to lm-eval's strict (default) or loose IFEval scoring.

    A blank response follows nothing, as in lm-eval.
    """
    candidates = _loose_variants(response) if loose else [response]
    verdicts: list[bool] = []
    for constraint in constraints:
        checker, _ = _build(constraint)
        verdicts.append(any(text.strip() and checker.check_following(text) for text in candidates))
    return verdicts


def to_ifeval_record(key: int, prompt: str, constraints: Sequence[Constraint]) -> dict[str, Any]:
    """A row in google/IFEval's schema, scorable by lm-eval's ``ifeval`` ``process_results``.

    ``prompt`` should be the full text the model sees (usually :func:`add_constraints`'s output),
    as in IFEval, where the instructions are part of the prompt.
    """
    return {
        "key": key,
        "prompt": prompt,
        "instruction_id_list": [c.instruction_id for c in constraints],
        "kwargs": [copy.deepcopy(c.kwargs) for c in constraints],
    }
