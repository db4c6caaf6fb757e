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
from typing import Any, ClassVar

from .config import Config
from .distributed import clear_shards, generate, output, shard_dir
from .errors import ChatTemplateError, GenerationError
from .generation import Completion, GenerationEngine, Request, encode_rendered
from .store import JsonlAppender, RunPaths, check_resumable

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


# run_all shows a failed step's error in 300 characters: the advice is short and long details are cut.
_NEEDS_ONLY_MESSAGES = "set models.generator to a model whose chat template needs only the messages"
_MARKS_USER_TURN = "set models.generator to an instruct model whose chat template marks the user turn"


def pre_query_text(tokenizer: Any, generator: str | None = None) -> str:
    """The template's text up to where a user message's content starts.

    Refused with a `ChatTemplateError` naming `generator` (default: the tokenizer's path) when the
    template needs inputs Magpie cannot give (tools, documents, custom variables), or when what it
    writes before the content holds no user-turn marker: nothing at all, only the BOS, or only what
    it writes for an empty conversation. Sampling from such a prefix gives text, not user queries.
    """
    name = generator or getattr(tokenizer, "name_or_path", None) or "the generator"
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"{name} has no chat template: Magpie needs an instruct model (set models.generator to one)"
        )
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": SENTINEL}], tokenize=False, add_generation_prompt=False
        )
    except Exception as exc:  # a chat template is a program shipped with the model: any failure is its own
        raise ChatTemplateError(_render_failure(name, tokenizer, exc)) from exc
    if SENTINEL not in rendered:
        raise ChatTemplateError(
            f"{name}: its chat template drops a lone user message, so there is no pre-query to derive; "
            + _MARKS_USER_TURN
        )
    # A trailing space (Mistral's "[INST] ") would be tokenized as a lone space piece, which the model
    # never saw before a word; newlines are part of the header and stay.
    text = rendered.split(SENTINEL, 1)[0].rstrip(" ")
    _check_user_marker(name, tokenizer, text)
    return text


def pre_query_ids(tokenizer: Any, generator: str | None = None) -> list[int]:
    """Token ids of the pre-query template, with exactly one BOS."""
    return encode_rendered(tokenizer, pre_query_text(tokenizer, generator))


def _check_user_marker(name: str, tokenizer: Any, text: str) -> None:
    """Refuse a pre-query with nothing in it that marks a user turn."""
    bos = tokenizer.bos_token or ""
    if not text.strip():
        what = f"nothing ({text!r})" if text else "nothing"
    elif bos and not text.replace(bos, "").strip():
        what = f"only its BOS token {bos!r}"
    else:
        # What the template writes for an empty conversation (a BOS, an always-present system turn)
        # is not a user-turn marker either; only what the user message adds is.
        empty = _render_empty(tokenizer)
        shared = next(
            (i for i, (a, b) in enumerate(zip(text, empty, strict=False)) if a != b),
            min(len(text), len(empty)),
        )
        added = text[shared:]
        if (added.replace(bos, "") if bos else added).strip():
            return
        what = f"only what it also writes for no messages ({_short(repr(text), 60)})"
    raise ChatTemplateError(
        f"{name}: its chat template puts {what} before a user message, no user-turn marker for Magpie "
        f"to sample after; {_MARKS_USER_TURN}"
    )


def _render_empty(tokenizer: Any) -> str:
    """The template rendered with no messages, or "" when it cannot render that (most index messages[0])."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[[]],
            chat_template=tokenizer.get_chat_template(),
            add_generation_prompt=False,
            **tokenizer.special_tokens_map,
        )
        return rendered[0]
    except Exception:  # optional evidence: without it only the empty and BOS-only checks apply
        return ""


_UNDEFINED = re.compile(r"^'(\w+)' is undefined$")


def _render_failure(name: str, tokenizer: Any, exc: Exception) -> str:
    """One line: the generator, what its template needs, and the template's own error."""
    detail = _short(f"{type(exc).__name__}: {exc}", 90)
    lineno, needs = _failing_line_inputs(tokenizer, exc)
    if lineno is not None:
        detail += f", template line {lineno}"
    match = _UNDEFINED.match(str(exc).strip())
    if match:
        needs = [match.group(1)]
    if needs:
        what = f"needs {' or '.join(repr(n) for n in needs)}, which Magpie does not pass"
    else:
        what = "fails on the lone user message Magpie renders"
    return f"{name}: its chat template {what} ({detail}); {_NEEDS_ONLY_MESSAGES}"


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failing_line_inputs(tokenizer: Any, exc: Exception) -> tuple[int | None, list[str]]:
    """The template line that failed, and the template inputs on it that were missing or None.

    jinja2 puts a frame named "<template>" into the traceback at the failing line, with the template's
    variables as its locals; transformers passes `tools` and `documents` as None when not given.
    """
    import jinja2

    tb, frame = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            frame = tb
        tb = tb.tb_next
    if frame is None:
        return None, []
    try:
        template = tokenizer.get_chat_template()
        lines = template.splitlines()
        line = lines[frame.tb_lineno - 1] if 0 < frame.tb_lineno <= len(lines) else ""
        line = re.sub(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"", "''", line)  # not string literals
        inputs, variables = _free_variables(template), frame.tb_frame.f_locals
        names = dict.fromkeys(re.findall(r"(?<![\w.])[A-Za-z_]\w*", line))  # not attributes
        needs = [
            n
            for n in names
            if n in inputs and (variables.get(n) is None or isinstance(variables[n], jinja2.Undefined))
        ]
    except Exception:  # only a better message was at stake
        needs = []
    return frame.tb_lineno, needs


def _free_variables(template: str) -> set[str]:
    """Names the template reads without defining them, i.e. its inputs."""
    import jinja2
    from jinja2 import meta
    from jinja2.ext import Extension, loopcontrols

    class Generation(Extension):  # transformers' {% generation %} block, parsed as a plain body
        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    try:
        env = jinja2.Environment(extensions=[loopcontrols, Generation])
        return meta.find_undeclared_variables(env.parse(template))
    except jinja2.TemplateError:
        return set()


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
    `rejected_path` with their reason, for the report. A chat template that cannot give a pre-query
    is refused before either file is opened.
    """
    prompt = pre_query_ids(engine.tokenizer, cfg.models.generator)
    settings = {"generator": cfg.models.generator, "sampling": asdict(cfg.magpie.sampling)}
    shards = shard_dir(out_path, settings)
    with (
        output(out_path, required=("instruction", "sample")) as accepted,
        output(rejected_path, required=("sample", "reason")) as rejected,
    ):
        check_resumable(accepted, settings)
        summary = _generate(engine, cfg, prompt, accepted, rejected, shards)
    clear_shards(shards)
    return summary


def instructions_step(cfg: Config, paths: RunPaths, device: str) -> dict[str, Any]:
    """Step 01 in one process of the step (see `distributed.run`): load the generator, sample."""
    from .engines import load_engine

    return generate_instructions(
        load_engine(cfg, device),
        cfg,
        paths.file("instructions.jsonl"),
        paths.file("instructions_rejected.jsonl"),
    )


def _generate(
    engine: GenerationEngine,
    cfg: Config,
    prompt: list[int],
    accepted: JsonlAppender,
    rejected: JsonlAppender,
    shards: Path,
) -> dict[str, Any]:
    wanted = cfg.counts.instructions
    m = cfg.magpie
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
        for finished in generate(engine, requests, shards, desc="instructions"):
            handle(finished)
            if len(accepted) >= wanted:
                break
    return {
        "accepted": len(accepted),
        "samples": next_index,
        "rejected": reasons,
        "tokens_per_second": round(engine.stats.tokens_per_second, 1),
    }
