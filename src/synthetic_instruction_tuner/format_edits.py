"""Format edits: rewrite a response so it meets a format constraint, then write that constraint into
its prompt.

Back-translation (`backtranslation`) can only name constraints a response already meets, and a
135M generator's answers almost never carry a title, a postscript, sections or highlights, which are
half of IFEval's families. Those formats are mechanical, though: the same answer with ``<<Its
Title>>`` on top, its last sentence moved into a ``P.S.``, its sentences as ``*`` bullets or under
``Section 1``/``Section 2`` headers is still the teacher's content, now in the requested shape.
Keywords are edited in too, as an opening line naming words the prompt then asks for: a keyword read
off the answer is one it used anyway, and teaches nothing about using a word because it was asked.
Placeholders are content words made ``[slots]`` in place. The keywords line opens the answer
because a student that repeats itself or runs to the evaluation's token limit never reaches a
closing line: titles and sections, which open an answer, were learned (20/24, 23/24 held-out
instructions met), a closing keywords line and a ``[your name]`` sign-off were not (12/34, 0/31).
This follows the rule-based rewriting of instruction-following data in Conifer and AutoIF's
verified augmentation: every edit is confirmed by lm-eval's own checker (`constraints.check`), and
an edit that the checker rejects, alone or together with the prompt's other constraints, is dropped.

Kwargs stay inside the ranges `constraints` samples held-out prompts from (2-5 bullets or sections,
1-4 highlights, 1-3 placeholders), so training prompts read like evaluation prompts.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from . import backtranslation as bt
from . import constraints as ic

Edit = tuple[str, dict[str, Any]]
Editor = Callable[[str, str, random.Random], Edit | None]

_LIST_LINE = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+(.*\S)\s*$")


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in bt._util().split_into_sentences(text.strip()) if s.strip()]


def _blocks(response: str) -> tuple[list[str], str]:
    """Paragraphs when the response has several, else its sentences (the units a layout regroups),
    and how units of one group are joined."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", response.strip()) if p.strip()]
    return (paragraphs, "\n\n") if len(paragraphs) >= 2 else (_sentences(response), " ")


# Request openers and trailing function words that make poor title words
# ("Can you suggest some ways to" -> "Ways").
_LEAD = frozenset(
    (
        "can", "could", "would", "will", "you", "please", "help", "me", "i", "how", "do", "does",
        "what", "is", "are", "tell", "give", "provide", "suggest", "write", "explain", "describe",
        "need", "want", "to", "a", "an", "the", "some", "my", "us", "we", "should", "create",
        "generate", "list", "make", "lets", "let's", "hey", "hi", "hello", "so", "ok", "okay",
        "here's", "here",
    )
)  # fmt: skip
_TAIL = frozenset(
    (
        "to", "a", "an", "the", "of", "for", "and", "with", "in", "on", "some", "my", "your",
        "that", "this", "is", "are", "be", "or", "at", "by", "from", "as",
    )
)  # fmt: skip


def _title_words(text: str) -> list[str]:
    words = re.findall(r"[A-Za-z][A-Za-z'-]*", _sentences(text)[0] if text.strip() else "")
    while words and words[0].lower() in _LEAD:
        words.pop(0)
    words = words[:5]
    while words and words[-1].lower() in _TAIL:
        words.pop()
    return words


def _title(response: str, instruction: str, rng: random.Random) -> Edit | None:
    """A title from the request's first sentence (or the answer's), without its request words."""
    words = _title_words(instruction)
    if len(words) < 2:
        words = _title_words(response)
    if len(words) < 2:
        return None
    title = " ".join(w if w.isupper() else w.capitalize() for w in words)
    return f"<<{title}>>\n\n{response.strip()}", {}


# How the opening line names the words asked for; neutral enough for any noun, verb or adjective.
_KEYWORD_LEADS = ("Key words:", "Keywords:", "Words to keep in mind:")


def _postscript(response: str, instruction: str, rng: random.Random) -> Edit | None:
    marker = rng.choice(("P.S.", "P.P.S"))
    sentences = _sentences(response)
    last = sentences[-1] if len(sentences) >= 3 else ""
    body = response.strip()
    movable = len(re.findall(r"[A-Za-z]+", last)) >= 3 and "\n" not in last and body.endswith(last)
    if movable:  # its closing sentence becomes the P.S.
        body, note = body[: -len(last)].rstrip(), last
    else:
        note = "I hope this helps."
    return f"{body}\n\n{marker} {note}", {"postscript_marker": marker}


def _placeholders(response: str, instruction: str, rng: random.Random) -> Edit | None:
    """1-3 of the answer's content words made ``[slots]`` where they first occur, as in a template
    for the reader to fill in. Inline, not a header on top: a memo header (``To: [recipient]``...)
    in 9% of training answers opened 112 of 300 IFEval answers of the student, most of which asked
    for no placeholder at all."""
    words = sorted(bt._content_words(response))
    if not words:
        return None
    text = response.strip()
    picked = rng.sample(words, rng.randint(1, min(3, len(words))))
    for word in picked:
        text = re.sub(rf"\b({word})\b", r"[\1]", text, count=1, flags=re.IGNORECASE)
    return text, {"num_placeholders": len(picked)}


def _bullets(response: str, instruction: str, rng: random.Random) -> Edit | None:
    """An existing numbered or dashed list becomes ``*`` bullets; otherwise every sentence does."""
    lines = response.strip().splitlines()
    items = [m.group(1) for line in lines if (m := _LIST_LINE.match(line))]
    if 2 <= len(items) <= 5:
        out = [f"* {m.group(1)}" if (m := _LIST_LINE.match(line)) else line for line in lines]
        return "\n".join(out), {"num_bullets": len(items)}
    sentences = _sentences(response)
    if not 2 <= len(sentences) <= 5 or any(s.startswith(("*", "-")) for s in sentences):
        return None
    return "\n".join(f"* {' '.join(s.split())}" for s in sentences), {"num_bullets": len(sentences)}


def _highlights(response: str, instruction: str, rng: random.Random) -> Edit | None:
    """Whole sentences become ``*highlighted*``; one that starts a line would read as a bullet."""
    text = response.strip()
    spans = [s for s in _sentences(text) if "*" not in s and "\n" not in s and not text.startswith(s)]
    if not spans:
        return None
    picked = rng.sample(spans, rng.randint(1, min(4, len(spans))))
    for span in picked:
        text = text.replace(span, f"*{span}*", 1)
    return text, {"num_highlights": len(picked)}


def _grouped(units: list[str], joiner: str, parts: int) -> list[str]:
    """``units`` in ``parts`` consecutive groups of near-equal size."""
    size, extra = divmod(len(units), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        out.append(joiner.join(units[start:end]))
        start = end
    return out


def _sections(response: str, instruction: str, rng: random.Random) -> Edit | None:
    units, joiner = _blocks(response)
    if len(units) < 2:
        return None
    splitter, parts = rng.choice(("Section", "SECTION")), rng.randint(2, min(5, len(units)))
    groups = _grouped(units, joiner, parts)
    body = "\n\n".join(f"{splitter} {i}\n{part}" for i, part in enumerate(groups, 1))
    return body, {"section_spliter": splitter, "num_sections": parts}


def _paragraphs(response: str, instruction: str, rng: random.Random) -> Edit | None:
    units, joiner = _blocks(response)
    if len(units) < 2 or "***" in response:
        return None
    parts = rng.randint(2, min(5, len(units)))
    return "\n\n***\n\n".join(_grouped(units, joiner, parts)), {"num_paragraphs": parts}


def _capitals(response: str, instruction: str, rng: random.Random) -> Edit | None:
    """A few content words in capitals for emphasis: the "at least" side that deriving cannot give."""
    words = sorted(bt._content_words(response))
    if len(words) < 2:
        return None
    picked = rng.sample(words, rng.randint(2, min(5, len(words))))
    text = response.strip()
    for word in picked:
        text = re.sub(rf"\b{word}\b", word.upper(), text, count=1, flags=re.IGNORECASE)
    count = sum(1 for w in bt._util().nltk.word_tokenize(text) if w.isupper())
    return text, {"capital_frequency": min(count, 5), "capital_relation": "at least"}


@functools.cache
def _keyword_pool() -> list[str]:
    """IFEval's own keyword list (what its generator draws from), less the held-out pool and the
    forbidden-word pool, so a training prompt never names a word a held-out prompt asks for."""
    taken = {*ic._KEYWORDS, *ic._FORBIDDEN_WORDS}
    return sorted(
        w
        for w in bt._util().WORD_LIST
        if len(w) >= 5 and w.isalpha() and w not in taken and not set(w) & set("jqxz")
    )


def _keywords(response: str, instruction: str, rng: random.Random) -> Edit | None:
    """One or two words from the pool, whether or not the answer has them, named in an opening line:
    deriving only ever asks for words the answer already has, a held-out prompt for words of its own.
    The line opens the answer, where a student writes it before it can trail off."""
    words = sorted(rng.sample(_keyword_pool(), rng.randint(1, 2)))
    line = f"{rng.choice(_KEYWORD_LEADS)} {' and '.join(words)}."
    return f"{line}\n\n{response.strip()}", {"keywords": words}


def _end_phrase(response: str, instruction: str, rng: random.Random) -> Edit | None:
    phrase = rng.choice(ic._END_PHRASES)
    return f"{response.strip()} {phrase}", {"end_phrase": phrase}


def _no_comma(response: str, instruction: str, rng: random.Random) -> Edit | None:
    """Commas dropped: one before a space reads as a pause without it ("First we plan then we
    go"), one inside a number ("1,000") becomes nothing."""
    return re.sub(r",(?=\s)", "", response.strip()).replace(",", ""), {}


REPEAT_ID = "combination:repeat_prompt"


def beside_repeat(allowed: Sequence[str] | None) -> list[str]:
    """The families of ``allowed`` (default: all supported) that may share a prompt with
    repeat_prompt under IFEval's registry (a title, keywords, no commas)."""
    table = ic.conflicts()
    return [f for f in (allowed or ic.SUPPORTED_IDS) if f not in table[REPEAT_ID]]


def repeat_request(
    instruction: str,
    response: str,
    chosen: Sequence[ic.Constraint],
    rng: random.Random | None = None,
    share: float = 0.0,
    repeat_share: float | None = None,
) -> tuple[str, str, ic.Constraint] | None:
    """The prompt with IFEval's repeat-the-request instruction after the others, and the response
    opened by the request word for word: the instruction and the other constraints' wording, as
    IFEval's 41 such prompts have it. None when the repeated text would break another of the row's
    constraints (a comma, a capital letter, a word count) or IFEval's registry rules the pair out.
    ``share`` words the other constraints, ``repeat_share`` (default: ``share``) the repeat's own
    sentence, both as `constraints.wording` does."""
    table = ic.conflicts()
    if any(c.instruction_id in table[REPEAT_ID] for c in chosen):
        return None
    described = ic.describe(chosen, rng, share)
    request = ic.add_constraints(instruction, chosen, described).strip()
    constraint = ic.Constraint(REPEAT_ID, {"prompt_to_repeat": request})
    text = f"{request}\n\n{response.strip()}"
    if not all(ic.check(text, [*chosen, constraint])):
        return None
    # one description block, as add_constraints writes it, so the contamination check can tell the
    # task text from the constraint wording (``rng`` and ``share`` word it as `constraints.describe`)
    asked = ic.wording(constraint, rng, share if repeat_share is None else repeat_share)
    block = " ".join(part for part in (described, asked) if part)
    return ic.add_constraints(instruction, [*chosen, constraint], block), text, constraint


# How each family is edited into a response: (edited response, kwargs), or None when the response
# gives nothing to edit. Families missing here are only ever derived (backtranslation.DERIVERS).
EDITORS: dict[str, Editor] = {
    "detectable_format:title": _title,
    "detectable_content:postscript": _postscript,
    "detectable_content:number_placeholders": _placeholders,
    "keywords:existence": _keywords,
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:multiple_sections": _sections,
    "length_constraints:number_paragraphs": _paragraphs,
    "change_case:capital_word_frequency": _capitals,
    "startend:end_checker": _end_phrase,
    "punctuation:no_comma": _no_comma,
    "change_case:english_lowercase": lambda r, i, rng: (r.strip().lower(), {}),
    "change_case:english_capital": lambda r, i, rng: (r.strip().upper(), {}),
    "startend:quotation": lambda r, i, rng: (f'"{r.strip()}"', {}),
    "detectable_format:json_format": lambda r, i, rng: (json.dumps({"response": r.strip()}, indent=2), {}),
}

# Edits run inside-out, so a later one wraps what an earlier one made: capitals and highlights first,
# then the layout, then what goes around it (keywords line, title, postscript, closing
# phrase), then the commas and the case, and quotes or JSON last of all.
_ORDER = (
    "change_case:capital_word_frequency",
    "detectable_format:number_highlighted_sections",
    "detectable_format:number_bullet_lists",
    "detectable_format:multiple_sections",
    "length_constraints:number_paragraphs",
    "keywords:existence",
    "detectable_content:number_placeholders",
    "detectable_format:title",
    "detectable_content:postscript",
    "startend:end_checker",
    "punctuation:no_comma",
    "change_case:english_lowercase",
    "change_case:english_capital",
    "startend:quotation",
    "detectable_format:json_format",
)


# A derived keyword is one the answer used anyway, so its prompt teaches nothing about using a word
# because it was asked for; an edited one is a word the answer had to take in.
_ALWAYS_EDIT = frozenset({"keywords:existence"})


def _plan(
    response: str, rng: random.Random, k: int, allowed: Sequence[str] | None, edit_rate: float
) -> tuple[list[str], list[str]]:
    """Up to ``k`` compatible families, split into those to edit in and those to derive."""
    families = [f for f in (allowed or ic.SUPPORTED_IDS) if f in bt.DERIVERS or f in EDITORS]
    rng.shuffle(families)
    edit, derive = [], []
    for family in ic.first_compatible(families, k):
        derivable = family in bt.DERIVERS and bt.met_constraints(response, random.Random(0), [family])
        if family in EDITORS and (not derivable or family in _ALWAYS_EDIT or rng.random() < edit_rate):
            edit.append(family)
        else:
            derive.append(family)
    return edit, derive


def edit_in(
    instruction: str,
    response: str,
    rng: random.Random,
    k: int,
    allowed: Sequence[str] | None = None,
    edit_rate: float = 0.5,
) -> tuple[str, list[ic.Constraint], list[str]]:
    """Up to ``k`` compatible constraints for ``response``, editing formats in where it lacks them.

    Returns the (possibly edited) response, constraints it meets under lm-eval's strict check, and
    the ids that were edited in. A family the response already meets is derived, or with
    probability ``edit_rate`` edited in anyway where an editor exists (keywords always are); the
    rest are derived from the edited text, so a word bound counts the title and postscript too.
    """
    edit, derive = _plan(response, rng, k, allowed, edit_rate)
    text, chosen, edited = response.strip(), [], []
    for family in sorted(edit, key=_ORDER.index):
        result = EDITORS[family](text, instruction, rng)
        if result is None:
            continue
        candidate, kwargs = result
        constraint = ic.Constraint(family, kwargs)
        if all(ic.check(candidate, [*chosen, constraint])):
            text, edited = candidate, [*edited, family]
            chosen.append(constraint)
    for constraint in bt.met_constraints(text, rng, derive) if derive else []:
        if all(ic.check(text, [*chosen, constraint])):
            chosen.append(constraint)
    return text, chosen, edited
