"""Step 03: turn generated (instruction, response) records into a clean SFT set.

Records are dicts with at least ``id``, ``instruction`` and ``response`` (strings) and usually
``finish_reason``; every other key is passed through untouched. Four stages run in order, and each
removed record gets exactly one reason, the first that fires:

1. **Benchmarks** (``benchmark_overlap``): the instruction shares a word n-gram of
   ``contamination_ngram`` words with a prompt of a benchmark the pipeline evaluates on
   (`contamination`); the removal names the benchmark, the document and the shared n-grams. First,
   so that every generated instruction that overlaps a benchmark is counted as such.

2. **Rules** (`rule_filter_reason`), checked in this order, cheapest and most certain first so that
   langdetect only sees records that are otherwise fine:

   ========================  =====================================================================
   instruction_too_short     fewer than ``min_instruction_words`` whitespace-separated words
   instruction_too_long      more than ``max_instruction_words`` words
   instruction_fragment      ends with ``:`` ``,`` or ``;`` (a list intro or clause with nothing
                             after it), or its last character is a letter and its last word is an
                             article, conjunction, possessive or list introducer (`DANGLING_WORDS`:
                             "the", "and", "of", "such as", ...). Text ending in "?", "." or "!" is
                             never a fragment.
   response_too_short        fewer than ``min_response_words`` words
   response_too_long         more than ``max_response_words`` words
   truncated                 ``finish_reason == "length"`` (only when ``drop_truncated``); with
                             ``trim_truncated``, only a cut response with no complete sentence
                             (`trim_to_sentence`): the others are trimmed first and judged as
                             trimmed (``finish_reason`` becomes ``"trimmed"``)
   role_leakage              a chat-template token (``<|...|>``, ``<start_of_turn>``, ``[INST]``,
                             ``<<SYS>>``) anywhere in instruction or response, or a line that
                             starts with ``User:`` / ``Assistant:`` / ``Human:`` or is just
                             ``### Instruction`` / ``### Response``
   refusal                   one of `REFUSAL_PATTERNS` (case-insensitive) within the first
                             `REFUSAL_WINDOW_CHARS` characters of the response
   non_english               langdetect (seeded) finds a language other than ``language`` in the
                             instruction or the response. Code spans are removed first; text with
                             no letter fails; prose under 8 words is too short to judge and passes
                             (`language_mismatch`). Skipped when ``language`` is None.
   repetitive                `repeated_ngram_ratio` of the response above
                             ``max_repeated_ngram_ratio``
   ========================  =====================================================================

3. **Near-duplicates** (``near_duplicate``): instructions are normalised (lowercase, punctuation
   removed, whitespace collapsed), shingled into word n-grams of ``dedup_shingle`` words and hashed
   with MinHash (``dedup_num_perm`` permutations). MinHashLSH proposes candidate pairs, a pair is an
   edge when its estimated Jaccard is at least ``dedup_threshold``, and clusters are the connected
   components (union-find), so a chain A~B~C is one cluster even when A and C differ more. Each
   cluster keeps the member with the highest `quality_score` (ties: smallest id); the others record
   the kept id as ``duplicate_of``.

4. **Target** (``over_target``): if more than ``target`` records remain, the ``target`` with the
   highest `quality_score` are kept (ties: smallest id).

Quality score (higher is better), computed on the response only, because the rules already vetted the
instruction and a response is what SFT teaches::

    score = length_fit - repeated_ngram_ratio - 0.5 * has_markdown_junk

* ``length_fit`` is 1 inside `SWEET_SPOT_WORDS` (40-300 words): long enough to carry an explanation,
  short enough to fit comfortably in the SFT context with its instruction. Below it, it rises
  linearly (words / 40); above it, it decays as 300 / words, so rambling answers lose gently.
* ``repeated_ngram_ratio`` (0 to ``max_repeated_ngram_ratio`` after the rules) prefers answers that
  do not loop.
* ``has_markdown_junk`` is 1 when the response has an unclosed code fence, an odd number of ``**``
  markers, or an empty heading or bullet line: formatting the model started and did not finish.

Trimming (``trim_truncated``) keeps the generator's work where a token limit cut an answer that was
fine up to its last sentence: the cut record is copied with its response ending at the last
sentence end, and the funnel counts these as ``trimmed``. With ``trim_words`` (on its own or with
``trim_truncated``), an answer longer than that many words is trimmed the same way, to the last
sentence end within the limit.

`filter_records` returns the kept records in input order plus a JSON-serialisable funnel: counts per
stage, a count for every reason (zeros included, in `REASONS` order), a few examples per reason and the
settings used, with ``input == kept + sum(removed)``.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from datasketch import MinHash, MinHashLSH
from langdetect import DetectorFactory, detect
from langdetect.lang_detect_exception import LangDetectException

from .config import Config, FilteringConfig
from .contamination import Match, NgramIndex, benchmark_index
from .errors import DataError
from .store import RunPaths, count_jsonl, read_jsonl, write_json, write_jsonl

RULE_REASONS: tuple[str, ...] = (
    "instruction_too_short",
    "instruction_too_long",
    "instruction_fragment",
    "response_too_short",
    "response_too_long",
    "truncated",
    "role_leakage",
    "refusal",
    "non_english",
    "repetitive",
)
REASONS: tuple[str, ...] = ("benchmark_overlap", *RULE_REASONS, "near_duplicate", "over_target")

# Words after which an English request does not end: articles, conjunctions, possessive determiners and
# list introducers. Most prepositions are left out on purpose: imperatives strand them legitimately
# ("tell me where this word comes from"). "of" stays because a cut "a list of" is the commonest fragment;
# a question ending in "of?" is safe since only text whose last character is a letter is looked at.
DANGLING_WORDS = frozenset(
    {"a", "an", "the", "and", "or", "but", "nor", "because", "of", "than", "as", "such", "including"}
    | {"my", "your", "our", "their", "its"}
)
_FRAGMENT_END_CHARS = (":", ",", ";")

_ROLE_LEAKAGE = re.compile(
    r"<\|[A-Za-z_]+\|>"  # ChatML, Llama 3, Phi, GPT: <|im_start|>, <|eot_id|>, <|user|>, <|endoftext|>
    r"|<(?:start|end)_of_turn>"  # Gemma
    r"|\[/?INST\]|<</?SYS>>"  # Llama 2 / Mistral
    r"|^[ \t]*(?:User|Assistant|Human)[ \t]*:"  # a transcript turn, case-sensitive to spare "user:" in code
    # Alpaca headers only as a whole line, so a recipe's "### Instructions" heading is not leakage.
    r"|^[ \t]*###[ \t]*(?i:instruction|response)[ \t]*:?[ \t]*$",
    re.MULTILINE,
)

REFUSAL_WINDOW_CHARS = 200  # refusals open the answer; later "I can't" is usually part of an answer
REFUSAL_PATTERNS: tuple[str, ...] = (
    # "I'm sorry, but I can't", "I'm afraid I cannot", "I apologize, but I am unable" (same sentence)
    r"\b(?:sorry|afraid|apologi[sz]e)\b[^.!?\n]{0,40}?\bI(?: cannot| can not| can't| am unable|'m unable"
    r"| am not able|'m not able| won't| will not)\b",
    r"\bas an ai(?: language model| model| assistant|,)",
    r"\bas a (?:large )?language model\b",
    r"\bI(?: cannot| can not| can't| am unable to|'m unable to| am not able to|'m not able to"
    r"| won't be able to) (?:assist|help|provide|fulfil|fulfill|comply|complete|create|generate|answer"
    r"|engage|support)\b",
    r"\bI must (?:respectfully )?decline\b",
)
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in REFUSAL_PATTERNS), re.IGNORECASE)

SWEET_SPOT_WORDS = (40, 300)
MARKDOWN_JUNK_PENALTY = 0.5
_EMPTY_MARKDOWN_LINE = re.compile(r"^[ \t]*(?:#{1,6}|[-*+]|\d+[.)])[ \t]*$", re.MULTILINE)
_FENCE_LINE = re.compile(r"^[ \t]*```", re.MULTILINE)

# Code is not natural language: langdetect reads `def f(x): return x` as Welsh.
_FENCED_CODE = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_PUNCT = re.compile(r"[^\w\s]")
_LETTER = re.compile(r"[^\W\d_]")

# A sentence ends at . ! or ? (closing quotes/brackets included) followed by whitespace or the end,
# after a letter or closing character, not a digit: "1." and "2." are list markers, not ends.
_SENTENCE_END = re.compile(r"(?<=[^\d\s])[.!?][\"'\u201d\u2019)\]*]*(?=\s|$)")

EXAMPLE_CHARS = 300
DEFAULT_MIN_LANGDETECT_WORDS = 8  # below this langdetect is unreliable ("Write a haiku." -> Estonian)
_MINHASH_SEED = 1  # fixed so the permutations, hence the clusters, are reproducible


@dataclass
class FilterResult:
    """Outcome of `filter_records`."""

    kept: list[dict[str, Any]]  # surviving records, input order, the caller's dicts unchanged
    funnel: dict[str, Any]  # JSON-serialisable summary (see the module docstring)
    # {"id", "reason"[, "duplicate_of" | "benchmark", "doc_id", "shared_ngrams", "ngrams"]}
    removed: list[dict[str, Any]] = field(default_factory=list)


# --- text helpers -------------------------------------------------------------------------------------


def word_count(text: str) -> int:
    """Number of whitespace-separated words."""
    return len(text.split())


def normalize_text(text: str) -> str:
    """Lowercase, replace punctuation with spaces and collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def repeated_ngram_ratio(text: str, n: int) -> float:
    """1 - unique/total word n-grams of the normalised text; 0.0 when it has fewer than `n` words."""
    if n < 1:
        raise ValueError(f"n-gram size must be at least 1, got {n}")
    words = normalize_text(text).split()
    if len(words) < n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def is_fragment(instruction: str) -> bool:
    """True when the instruction visibly stops mid-sentence (see the module docstring)."""
    text = instruction.rstrip()
    if text.endswith(_FRAGMENT_END_CHARS):
        return True
    if not text or not text[-1].isalpha():
        return False
    return text.split()[-1].lower() in DANGLING_WORDS


def trim_to_sentence(text: str, max_words: int | None = None) -> str | None:
    """`text` up to the end of its last complete sentence (within its first `max_words` words), or
    None when there is none."""
    ends = list(_SENTENCE_END.finditer(text))
    if max_words is not None:
        ends = [m for m in ends if word_count(text[: m.end()]) <= max_words]
    return text[: ends[-1].end()].rstrip() if ends else None


def trim_responses(
    records: Sequence[dict[str, Any]], cut: bool, max_words: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """Copies of the records cut at the token limit (when `cut`) or longer than `max_words`, trimmed
    to their last complete sentence (``finish_reason`` "trimmed"), the others unchanged; and how
    many were trimmed."""
    out, trimmed = [], 0
    for record in records:
        response = record["response"]  # a string: _check_records ran first
        long = max_words is not None and word_count(response) > max_words
        trim = long or (cut and record.get("finish_reason") == "length")
        shorter = trim_to_sentence(response, max_words) if trim else None
        if shorter:
            record = {**record, "response": shorter, "finish_reason": "trimmed"}
            trimmed += 1
        out.append(record)
    return out, trimmed


def has_role_leakage(text: str) -> bool:
    """True when the text contains chat-template tokens or transcript role markers."""
    return _ROLE_LEAKAGE.search(text) is not None


def is_refusal(response: str) -> bool:
    """True when a refusal phrase appears near the start of the response."""
    head = response.lstrip()[:REFUSAL_WINDOW_CHARS].replace("\u2019", "'")  # curly apostrophes
    return _REFUSAL.search(head) is not None


def _prose(text: str) -> str:
    return _INLINE_CODE.sub(" ", _FENCED_CODE.sub(" ", text))


def language_mismatch(text: str, language: str, min_words: int = DEFAULT_MIN_LANGDETECT_WORDS) -> bool:
    """True when `text` is judged not to be in `language` (a langdetect code such as "en").

    Text without any letter counts as a mismatch. Code spans are removed first; if fewer than
    `min_words` words of prose remain, the text is too short to judge and passes.
    """
    if not _LETTER.search(text):
        return True
    prose = _prose(text)
    if word_count(prose) < min_words:
        return False
    DetectorFactory.seed = 0  # langdetect samples randomly; seeding makes the verdict reproducible
    try:
        return detect(prose) != language
    except LangDetectException:
        return True


def has_markdown_junk(text: str) -> bool:
    """True for an unclosed ``` fence, an odd number of ** markers, or an empty heading/bullet line."""
    if len(_FENCE_LINE.findall(text)) % 2:
        return True
    if text.count("**") % 2:
        return True
    return _EMPTY_MARKDOWN_LINE.search(text) is not None


def length_fit(words: int) -> float:
    """1.0 inside `SWEET_SPOT_WORDS`, words/low below it, high/words above it."""
    low, high = SWEET_SPOT_WORDS
    if words < low:
        return words / low
    if words > high:
        return high / words
    return 1.0


def quality_score(record: dict[str, Any], cfg: FilteringConfig) -> float:
    """Higher is better: length_fit - repeated_ngram_ratio - 0.5 * has_markdown_junk (of the response)."""
    response = _field(record, "response")
    score = length_fit(word_count(response)) - repeated_ngram_ratio(response, cfg.repetition_ngram)
    if has_markdown_junk(response):
        score -= MARKDOWN_JUNK_PENALTY
    # Rounded so that equal-looking scores compare equal and ties fall to the id, as documented.
    return round(score, 9)


# --- rules ---------------------------------------------------------------------------------------------


def _field(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(
            f"record {record.get('id', '<no id>')!r}: field {key!r} is missing or not a string ({value!r})"
        )
    return value


def rule_filter_reason(record: dict[str, Any], cfg: FilteringConfig) -> str | None:
    """The first rule reason (in `RULE_REASONS` order) that removes `record`, or None if it passes."""
    instruction = _field(record, "instruction")
    response = _field(record, "response")
    n_instruction = word_count(instruction)
    if n_instruction < cfg.min_instruction_words:
        return "instruction_too_short"
    if n_instruction > cfg.max_instruction_words:
        return "instruction_too_long"
    if is_fragment(instruction):
        return "instruction_fragment"
    n_response = word_count(response)
    if n_response < cfg.min_response_words:
        return "response_too_short"
    if n_response > cfg.max_response_words:
        return "response_too_long"
    if cfg.drop_truncated and record.get("finish_reason") == "length":
        return "truncated"
    if has_role_leakage(instruction) or has_role_leakage(response):
        return "role_leakage"
    if is_refusal(response):
        return "refusal"
    if cfg.language is not None and any(
        language_mismatch(text, cfg.language, cfg.min_langdetect_words) for text in (instruction, response)
    ):
        return "non_english"
    if repeated_ngram_ratio(response, cfg.repetition_ngram) > cfg.max_repeated_ngram_ratio:
        return "repetitive"
    return None


# --- near-duplicates -----------------------------------------------------------------------------------


def shingles(text: str, size: int) -> set[str]:
    """Word n-gram shingles of the normalised text; a text shorter than `size` is one shingle."""
    words = normalize_text(text).split()
    if len(words) <= size:
        return {" ".join(words)}
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def minhash(text: str, cfg: FilteringConfig) -> MinHash:
    """MinHash of the text's shingles with ``cfg.dedup_num_perm`` permutations and a fixed seed."""
    m = MinHash(num_perm=cfg.dedup_num_perm, seed=_MINHASH_SEED)
    m.update_batch([s.encode("utf-8") for s in sorted(shingles(text, cfg.dedup_shingle))])
    return m


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving keeps the trees flat
        i = parent[i]
    return i


def near_duplicates(
    records: Sequence[dict[str, Any]],
    cfg: FilteringConfig,
    scores: Sequence[float] | None = None,
) -> dict[int, int]:
    """Map the position of every near-duplicate instruction to the position of its cluster's keeper.

    Positions not in the map are kept. The keeper has the highest score (`quality_score` unless
    `scores` is given), ties broken by the smallest id.
    """
    if scores is None:
        scores = [quality_score(r, cfg) for r in records]
    hashes = [minhash(_field(r, "instruction"), cfg) for r in records]
    lsh = MinHashLSH(threshold=cfg.dedup_threshold, num_perm=cfg.dedup_num_perm)
    for i, m in enumerate(hashes):
        lsh.insert(i, m)
    parent = list(range(len(records)))
    for i, m in enumerate(hashes):
        for j in lsh.query(m):
            # LSH candidates are only likely matches; the estimated Jaccard decides the edge.
            if j != i and m.jaccard(hashes[j]) >= cfg.dedup_threshold:
                root_i, root_j = _find(parent, i), _find(parent, j)
                if root_i != root_j:
                    parent[max(root_i, root_j)] = min(root_i, root_j)
    clusters: dict[int, list[int]] = {}
    for i in range(len(records)):
        clusters.setdefault(_find(parent, i), []).append(i)
    duplicate_of: dict[int, int] = {}
    for members in clusters.values():
        keeper = min(members, key=lambda k: (-scores[k], str(records[k]["id"])))
        duplicate_of.update({k: keeper for k in members if k != keeper})
    return duplicate_of


# --- the whole step ------------------------------------------------------------------------------------


def _clip(text: str, limit: int = EXAMPLE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


def _check_records(records: Sequence[dict[str, Any]]) -> None:
    seen: set[str] = set()
    for position, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"record #{position}: expected a mapping, got {type(record).__name__}")
        rid = record.get("id")
        if not isinstance(rid, str) or not rid:
            raise DataError(f"record #{position}: field 'id' is missing or not a non-empty string")
        if rid in seen:
            # Ties and duplicate_of are resolved by id, so ids must identify records.
            raise DataError(f"record #{position}: duplicate id {rid!r}")
        seen.add(rid)
        _field(record, "instruction")
        _field(record, "response")


def _overlaps(records: Sequence[dict[str, Any]], benchmarks: NgramIndex | None) -> dict[int, Match]:
    """The position of every record whose instruction shares an n-gram with a benchmark prompt, and
    the document it shares the most with."""
    if benchmarks is None:
        return {}
    found = {i: benchmarks.matches(r["instruction"]) for i, r in enumerate(records)}
    return {i: matches[0] for i, matches in found.items() if matches}


def filter_records(
    records: Sequence[dict[str, Any]],
    cfg: FilteringConfig,
    target: int,
    examples_per_reason: int = 3,
    benchmarks: NgramIndex | None = None,
) -> FilterResult:
    """Apply the benchmark check (when given an index of benchmark prompts), rules, near-duplicate
    removal and the `target` cut; return kept records and the funnel."""
    if target < 0:
        raise ValueError(f"target must be non-negative, got {target}")
    if examples_per_reason < 0:
        raise ValueError(f"examples_per_reason must be non-negative, got {examples_per_reason}")
    _check_records(records)
    records, trimmed = trim_responses(records, cfg.trim_truncated, cfg.trim_words)

    overlap = _overlaps(records, benchmarks)
    reason: dict[int, str] = dict.fromkeys(overlap, "benchmark_overlap")
    after_benchmarks = [i for i in range(len(records)) if i not in reason]
    for i in after_benchmarks:
        rule = rule_filter_reason(records[i], cfg)
        if rule is not None:
            reason[i] = rule
    after_rules = [i for i in range(len(records)) if i not in reason]

    score = {i: quality_score(records[i], cfg) for i in after_rules}
    dup_local = near_duplicates(
        [records[i] for i in after_rules], cfg, scores=[score[i] for i in after_rules]
    )
    duplicate_of = {after_rules[k]: after_rules[v] for k, v in dup_local.items()}
    for i in duplicate_of:
        reason[i] = "near_duplicate"
    after_dedup = [i for i in after_rules if i not in duplicate_of]

    ranked = sorted(after_dedup, key=lambda i: (-score[i], records[i]["id"]))
    for i in ranked[target:]:
        reason[i] = "over_target"
    kept_positions = sorted(ranked[:target])

    removed_counts = dict.fromkeys(REASONS, 0)
    examples: dict[str, list[dict[str, Any]]] = {r: [] for r in REASONS}
    removed: list[dict[str, Any]] = []
    for i in sorted(reason):
        record, why = records[i], reason[i]
        removed_counts[why] += 1
        entry: dict[str, Any] = {"id": record["id"], "reason": why}
        if why == "near_duplicate":
            entry["duplicate_of"] = records[duplicate_of[i]]["id"]
        if why == "benchmark_overlap":
            entry.update({k: v for k, v in overlap[i].as_dict().items() if k != "kind"})
        removed.append(entry)
        if len(examples[why]) < examples_per_reason:
            example = {
                "id": record["id"],
                "instruction": _clip(record["instruction"]),
                "response": _clip(record["response"]),
            }
            example.update({k: v for k, v in entry.items() if k not in ("id", "reason")})
            if i in score:  # dedup and target decisions are explained by the score
                example["score"] = score[i]
            examples[why].append(example)

    funnel = {
        "input": len(records),
        "stages": [
            {"stage": "benchmarks", "remaining": len(after_benchmarks)},
            {"stage": "rules", "remaining": len(after_rules)},
            {"stage": "dedup", "remaining": len(after_dedup)},
            {"stage": "target", "remaining": len(kept_positions)},
        ],
        "removed": removed_counts,
        "trimmed": trimmed,
        "examples": examples,
        "kept": len(kept_positions),
        "settings": {
            **dataclasses.asdict(cfg),
            "target": target,
            "examples_per_reason": examples_per_reason,
            "refusal_window_chars": REFUSAL_WINDOW_CHARS,
            "score_sweet_spot_words": list(SWEET_SPOT_WORDS),
            "score_markdown_junk_penalty": MARKDOWN_JUNK_PENALTY,
        },
    }
    assert funnel["input"] - sum(removed_counts.values()) == funnel["kept"]  # internal bookkeeping
    return FilterResult(kept=[records[i] for i in kept_positions], funnel=funnel, removed=removed)


def run_filter_step(paths: RunPaths, cfg: Config) -> dict[str, Any]:
    """Step 03: responses.jsonl -> sft.jsonl (chat `messages`), funnel.json and filtered_out.jsonl.

    The funnel starts at step 01's raw Magpie samples, so the report shows every count from the
    first sample to the last kept row.
    """
    responses = read_jsonl(paths.file("responses.jsonl"), required=("id", "instruction", "response"))
    benchmarks = benchmark_index(cfg.filtering.contamination_ngram)
    result = filter_records(responses, cfg.filtering, target=cfg.counts.sft_target, benchmarks=benchmarks)
    rejected_path = paths.file("instructions_rejected.jsonl")
    magpie_rejected = read_jsonl(rejected_path, required=("reason",)) if rejected_path.exists() else []
    instructions = count_jsonl(paths.file("instructions.jsonl"))
    funnel = {
        "generation": {
            "magpie_samples": instructions + len(magpie_rejected),
            "magpie_rejected": dict(Counter(r["reason"] for r in magpie_rejected)),
            "instructions": instructions,
            "responses": len(responses),
        },
        **result.funnel,
    }
    sft = [
        {
            "id": r["id"],
            "messages": [
                {"role": "user", "content": r["instruction"]},
                {"role": "assistant", "content": r["response"]},
            ],
            "instruction": r["instruction"],
            "response": r["response"],
        }
        for r in result.kept
    ]
    write_jsonl(paths.file("filtered_out.jsonl"), result.removed)
    write_jsonl(paths.file("sft.jsonl"), sft)
    write_json(paths.file("funnel.json"), funnel)  # last: its presence marks the step complete
    return funnel
