"""Magpie instruction synthesis (Xu et al., 2024): give an aligned model only the user-turn header.

An instruct model that sees its chat template up to the start of a user message completes the
message itself, i.e. it writes a plausible user query. The header is derived from the tokenizer's
own template by rendering a conversation around a sentinel and cutting at it, so any template works
without a hand-written table; a default system turn the template injects (SmolLM2, Qwen2.5,
Llama-3.1's date header) is kept, because that is the context the model was aligned in.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import Config
from .errors import GenerationError
from .generation import Completion, GenerationEngine, Request, encode_rendered
from .store import JsonlAppender, check_resumable

SENTINEL = "\u2063MAGPIE-SENTINEL\u2063"

# Role and turn markers that must not survive into an instruction (templates' special tokens are
# already cut by the engine; these catch the model spelling a new turn out in plain text).
_LEAK_PATTERNS = [
    re.compile(r"<\|[A-Za-z_]+\|>"),
    re.compile(r"<(?:start|end)_of_turn>"),
    re.compile(r"\[/?INST\]"),
    re.compile(r"^(?:user|assistant|system)\s*(?::|\n)", re.IGNORECASE),
    re.compile(r"\n\s*(?:user|assistant|system|human|ai)\s*:", re.IGNORECASE),
    re.compile(r"#{2,}\s*(?:instruction|response|assistant)", re.IGNORECASE),
]

REJECTION_REASONS = ("empty", "truncated", "role_leakage", "fragment", "too_short", "too_long", "duplicate")


def pre_query_text(tokenizer: Any) -> str:
    """The template's text up to where a user message's content starts."""
    if not getattr(tokenizer, "chat_template", None):
        raise GenerationError(
            f"{getattr(tokenizer, 'name_or_path', 'the generator')} has no chat template: Magpie needs an "
            "instruct model (set models.generator to one)"
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": SENTINEL}], tokenize=False, add_generation_prompt=False
    )
    if SENTINEL not in rendered:
        raise GenerationError(
            "the chat template dropped the user message; cannot derive a pre-query template"
        )
    # A trailing space (Mistral's "[INST] ") would be tokenized as a lone space piece, which the model
    # never saw before a word; newlines are part of the header and stay.
    return rendered.split(SENTINEL, 1)[0].rstrip(" ")


def pre_query_ids(tokenizer: Any) -> list[int]:
    """Token ids of the pre-query template, with exactly one BOS."""
    return encode_rendered(tokenizer, pre_query_text(tokenizer))


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def instruction_id(text: str) -> str:
    """Content-derived id: stable across reruns, and exact duplicates collide by construction."""
    return "ins-" + hashlib.sha1(normalize(text).encode()).hexdigest()[:12]


def sanitize_instruction(
    text: str, finish_reason: str, min_words: int, max_words: int, drop_truncated: bool = True
) -> tuple[str, str | None]:
    """Return (cleaned text, rejection reason or None)."""
    clean = text.strip().strip('"').strip()
    if not clean:
        return clean, "empty"
    if drop_truncated and finish_reason == "length":
        return clean, "truncated"
    if any(p.search(clean) for p in _LEAK_PATTERNS):
        return clean, "role_leakage"
    if clean.endswith(":"):
        return clean, "fragment"
    words = len(clean.split())
    if words < min_words:
        return clean, "too_short"
    if words > max_words:
        return clean, "too_long"
    return clean, None


def generate_instructions(
    engine: GenerationEngine, cfg: Config, out_path: str | Path, rejected_path: str | Path
) -> dict[str, Any]:
    """Sample until `cfg.counts.instructions` distinct, sanitised instructions are in `out_path`.

    Resumable: both files are append-only, sample indices continue after the highest one on disk,
    and an instruction already accepted is never written twice. Rejected samples go to
    `rejected_path` with their reason, for the report.
    """
    with (
        JsonlAppender(out_path, required=("instruction", "sample")) as accepted,
        JsonlAppender(rejected_path, required=("sample", "reason")) as rejected,
    ):
        check_resumable(
            accepted, {"generator": cfg.models.generator, "sampling": asdict(cfg.magpie.sampling)}
        )
        return _generate(engine, cfg, accepted, rejected)


def _generate(
    engine: GenerationEngine, cfg: Config, accepted: JsonlAppender, rejected: JsonlAppender
) -> dict[str, Any]:
    wanted = cfg.counts.instructions
    m = cfg.magpie
    prompt = pre_query_ids(engine.tokenizer)
    max_samples = math.ceil(wanted * m.max_attempts_factor)
    seen = {normalize(r["instruction"]) for r in accepted.records}
    next_index = 1 + max((r["sample"] for r in (*accepted.records, *rejected.records)), default=-1)
    reasons: dict[str, int] = dict.fromkeys(REJECTION_REASONS, 0)
    for record in rejected.records:
        reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1

    def handle(finished: Iterable[tuple[Request, Completion]]) -> None:
        keep, drop = [], []
        for request, completion in finished:
            if len(accepted) + len(keep) >= wanted:
                break  # surplus of the last round: exact count, nothing recorded
            text, reason = sanitize_instruction(
                completion.text, completion.finish_reason, m.min_words, m.max_words, m.drop_truncated
            )
            if reason is None and normalize(text) in seen:
                reason = "duplicate"
            sample = request.meta["sample"]
            if reason:
                reasons[reason] += 1
                drop.append({"id": request.id, "sample": sample, "reason": reason, "text": text})
                continue
            seen.add(normalize(text))
            keep.append(
                {
                    "id": instruction_id(text),
                    "instruction": text,
                    "generator": cfg.models.generator,
                    "sampling": asdict(m.sampling),
                    "seed": completion.seed,
                    "sample": sample,
                    "finish_reason": completion.finish_reason,
                    "num_tokens": len(completion.token_ids),
                }
            )
        accepted.append(keep)
        rejected.append(drop)

    while len(accepted) < wanted:
        if next_index >= max_samples:
            raise GenerationError(
                f"only {len(accepted)} of {wanted} instructions passed sanitising after {next_index} samples "
                f"(rejections: {reasons}); raise magpie.max_attempts_factor or use a stronger generator"
            )
        need = wanted - len(accepted)
        # oversample by the rejection rate seen so far, in whole batches
        rate = len(accepted) / next_index if next_index else 0.8
        size = min(max_samples - next_index, max(engine.batch_size, math.ceil(need / max(rate, 0.2))))
        size = min(max_samples - next_index, math.ceil(size / engine.batch_size) * engine.batch_size)
        requests = [
            Request(f"s{i:06d}", prompt, m.sampling, {"sample": i})
            for i in range(next_index, next_index + size)
        ]
        next_index += size
        for finished in engine.stream(requests, desc="instructions"):
            handle(finished)
            if len(accepted) >= wanted:
                break
    return {
        "accepted": len(accepted),
        "samples": next_index,
        "rejected": reasons,
        "tokens_per_second": round(engine.stats.tokens_per_second, 1),
    }
