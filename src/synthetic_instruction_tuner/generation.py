"""Batched sampling engine on transformers' `generate`.

What it adds to a plain `generate` loop, and why:

* **Batches of prompts with left padding**, grouped by sampling settings and sorted by length so
  little compute is spent on padding.
* **Top-k sampling inside a logits processor.** `generate(do_sample=True)` draws with
  `torch.multinomial` over the whole vocabulary, which on a CPU costs more per step than a small
  model's forward pass at large batch sizes (30 ms per step for 32 rows x 49k tokens, measured). The
  engine applies temperature, top-k and top-p itself and samples among the top-k candidates — the
  same distribution as transformers' top-k/top-p warpers — then hands `generate` a one-hot score.
* **A watchdog.** Each batch has a deadline, checked after every decoding step. A batch that misses
  it is abandoned and its prompts are retried at half the batch size; a CUDA out-of-memory error
  halves the batch too. At batch size 1 a further timeout is an error rather than a silent hang.
  A forward pass that never returns is beyond any in-process check: the engine beats a heartbeat
  after every forward pass and batch, and the orchestrator's watchdog (`watchdog.py`) restarts the step.
* **Stops on every end or role token** of the chat template, so a completion never runs into a
  fabricated next turn, and records whether it ended on such a token or at the length limit.
* **Deterministic seeds per batch**, so rerunning a profile from scratch reproduces its data.

Durable writing and resume are the caller's (see `store.JsonlAppender`): the engine yields each
finished batch as soon as it is done.
"""

from __future__ import annotations

import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import SamplingConfig
from .errors import GenerationError
from .watchdog import beat, watch_forward


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop": ended on an end/role token; "length": cut at max_new_tokens
    seed: int


@dataclass
class EngineStats:
    completions: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    batches: int = 0
    timeouts: int = 0
    ooms: int = 0
    batch_size: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def stop_token_ids(tokenizer: Any, model: Any = None) -> list[int]:
    """End-of-sequence ids plus every special token that the chat template emits (role and turn markers)."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
    # A model never legitimately emits BOS mid-text; for ChatML tokenizers it is also the role marker.
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else ""
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if added.special and added.content in template:
            ids.add(int(token_id))
    return sorted(ids)


def batch_seed(seed: int, first_id: str, size: int) -> int:
    return zlib.crc32(f"{seed}:{first_id}:{size}".encode()) & 0x7FFFFFFF


class _TopKSampler:
    """Temperature, top-k and top-p, then one draw among the k candidates; returns one-hot scores."""

    def __init__(self, sampling: SamplingConfig, generator: Any) -> None:
        self.temperature = sampling.temperature
        self.top_k = sampling.top_k
        self.top_p = sampling.top_p
        self.generator = generator

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        k = min(self.top_k, scores.shape[-1]) if self.top_k > 0 else scores.shape[-1]
        values, indices = (scores.float() / self.temperature).topk(k, dim=-1)
        probs = values.softmax(dim=-1)
        if self.top_p < 1.0:
            # keep the smallest prefix of the (sorted) candidates whose mass reaches top_p
            keep = probs.cumsum(dim=-1) - probs < self.top_p
            probs = torch.where(keep, probs, torch.zeros_like(probs))
        choice = torch.multinomial(probs, 1, generator=self.generator)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, indices.gather(1, choice), 0.0)


class _Deadline:
    """Stopping criterion that ends the whole batch once its time budget is spent."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.expired = False

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        if time.monotonic() > self.deadline:
            self.expired = True
        return torch.full((input_ids.shape[0],), self.expired, dtype=torch.bool, device=input_ids.device)


def _chunks(items: list[Request], size: int) -> list[list[Request]]:
    """Split into the fewest batches of at most `size`, balanced in size: 100 at 96 gives 50 + 50, not
    96 + 4, since a batch costs about as much as its longest row however few rows it has."""
    count = -(-len(items) // size)
    even = -(-len(items) // count) if count else size
    return [items[i : i + even] for i in range(0, len(items), even)]


def plan_batches(requests: Sequence[Request], batch_size: int) -> list[list[Request]]:
    """The batches the engine generates, in order: grouped by sampling settings, longest prompts
    first (an out-of-memory error shows up on the first batch, not the last), balanced in size."""
    groups: dict[tuple[Any, ...], list[Request]] = {}
    for request in requests:
        s = request.sampling
        groups.setdefault((s.temperature, s.top_p, s.top_k, s.max_new_tokens), []).append(request)
    batches: list[list[Request]] = []
    for group in groups.values():
        batches.extend(_chunks(sorted(group, key=lambda r: -len(r.prompt_ids)), batch_size))
    return batches


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class StreamingEngine:
    """What the pipeline steps call on any generator: `stream` batches, and `run` over them."""

    stats: EngineStats

    def stream(
        self, requests: Sequence[Request], desc: str = "generating", shard: tuple[int, int] = (0, 1)
    ) -> Iterator[list[tuple[Request, Completion]]]:
        raise NotImplementedError

    def run(
        self,
        requests: Sequence[Request],
        on_batch: Callable[[list[tuple[Request, Completion]]], None],
        desc: str = "generating",
    ) -> EngineStats:
        """Generate every request, calling `on_batch` (e.g. a durable append) after each batch."""
        for finished in self.stream(requests, desc=desc):
            on_batch(finished)
        return self.stats


class GenerationEngine(StreamingEngine):
    """Batched, watchdog-guarded sampling for one model and tokenizer."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int = 16,
        batch_timeout_s: float = 600.0,
        top_k_sampling: bool = True,
        seed: int = 0,
        show_progress: bool = True,
        stop_ids: Sequence[int] | None = None,
        static_cache_max_new_tokens: int = 128,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.planned_batch_size = batch_size  # never lowered: the batch plan processes share
        self.batch_timeout_s = batch_timeout_s
        self.top_k_sampling = top_k_sampling
        self.seed = seed
        self.show_progress = show_progress
        self.static_cache_max_new_tokens = static_cache_max_new_tokens
        peft_config = getattr(model, "active_peft_config", None)
        self._prompt_learning = bool(getattr(peft_config, "is_prompt_learning", False))
        self.stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.stats = EngineStats(batch_size=batch_size)

    def _generate(self, batch: list[Request], seed: int) -> tuple[list[Completion] | None, int]:
        """Run one batch; returns (None, steps) when the deadline expired."""
        import torch

        sampling = batch[0].sampling
        width = max(len(r.prompt_ids) for r in batch)
        input_ids = torch.tensor([[self.pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])
        device = self.model.device
        deadline = _Deadline(self.batch_timeout_s)
        kwargs: dict[str, Any] = {
            "max_new_tokens": sampling.max_new_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.pad_id,
            "stopping_criteria": [deadline],
            # A preallocated cache saves the default cache's per-step concatenation (a fifth of CPU decode
            # time on short generations) but attends over its whole length, which loses on long ones.
            # PEFT's prompt learning prepends virtual tokens the static cache is not sized for.
            "cache_implementation": "static"
            if sampling.max_new_tokens <= self.static_cache_max_new_tokens and not self._prompt_learning
            else None,
        }
        if sampling.temperature <= 0:
            kwargs["do_sample"] = False
        elif self.top_k_sampling:
            generator = torch.Generator(device=device).manual_seed(seed)
            kwargs.update(do_sample=False, logits_processor=[_TopKSampler(sampling, generator)])
        else:
            torch.manual_seed(seed)
            kwargs.update(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k
            )
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs
            )
        if deadline.expired:
            return None, output.shape[1] - width
        stop = set(self.stop_ids)
        completions = []
        for row in output[:, width:].tolist():
            tokens: list[int] = []
            finish = "length"
            for token in row:
                if token in stop:
                    finish = "stop"
                    break
                tokens.append(token)
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            completions.append(Completion(text=text, token_ids=tokens, finish_reason=finish, seed=seed))
        return completions, output.shape[1] - width

    def stream(
        self, requests: Sequence[Request], desc: str = "generating", shard: tuple[int, int] = (0, 1)
    ) -> Iterator[list[tuple[Request, Completion]]]:
        """Yield finished batches of (request, completion) as they complete.

        `shard=(rank, world)`: generate only every world-th batch of the plan, starting at `rank`
        (see `distributed.generate`); the same batches, with the same seeds, as one process would."""
        from tqdm import tqdm

        rank, world = shard
        # every process plans at the batch size the engine started with, so they agree on the split
        batches = plan_batches(requests, self.batch_size if world == 1 else self.planned_batch_size)
        queue = deque(b for i, b in enumerate(batches) if i % world == rank)
        total = sum(len(b) for b in queue)
        bar = tqdm(total=total, desc=desc, unit="seq", disable=not self.show_progress)
        started = time.monotonic()
        done = 0
        try:
            while queue:
                batch = queue.popleft()
                if len(batch) > self.batch_size:  # the batch size was lowered after this batch was queued
                    queue.extendleft(reversed(_chunks(batch, self.batch_size)))
                    continue
                seed = batch_seed(self.seed, batch[0].id, len(batch))
                progress = {
                    "kind": "generate",
                    "batch_setting": "engine.batch_size",
                    "batch_size": self.batch_size,
                }
                doing = f"{desc}: a batch of {len(batch)} ({done} of {total} done)"
                # the first batch may compile kernels and size caches: it gets the startup allowance
                beat(doing, loading=not self.stats.batches, force=True, **progress)
                try:
                    with watch_forward(self.model, doing, fault="generate_hang", **progress):
                        completions, _ = self._generate(batch, seed)
                except Exception as exc:
                    if not _is_oom(exc):
                        raise
                    self.stats.ooms += 1
                    self._empty_cache()
                    completions = None
                    if len(batch) == 1:
                        raise GenerationError(
                            f"out of memory generating one sequence of {len(batch[0].prompt_ids)} prompt tokens; "
                            "lower the max_new_tokens setting or use a smaller generator"
                        ) from None
                else:
                    if completions is None:
                        self.stats.timeouts += 1
                        if len(batch) == 1:
                            raise GenerationError(
                                f"generation of request {batch[0].id!r} exceeded engine.batch_timeout_s="
                                f"{self.batch_timeout_s:g}s even alone; raise that setting if the machine is slow"
                            )
                if completions is None:
                    self.batch_size = self.stats.batch_size = max(1, len(batch) // 2)
                    bar.write(
                        f"{desc}: batch of {len(batch)} abandoned; retrying at batch size {self.batch_size}"
                    )
                    queue.appendleft(batch)
                    continue
                self.stats.batches += 1
                self.stats.completions += len(batch)
                self.stats.new_tokens += sum(
                    len(c.token_ids) + (c.finish_reason == "stop") for c in completions
                )
                self.stats.seconds = time.monotonic() - started
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{self.stats.tokens_per_second:.0f}", bs=self.batch_size)
                done += len(batch)
                beat(f"{desc}: {done} of {total} done", force=True, **progress)
                yield list(zip(batch, completions, strict=True))
        finally:
            bar.close()

    @staticmethod
    def _empty_cache() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def chat_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered with the chat template, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return encode_rendered(tokenizer, text)


def encode_rendered(tokenizer: Any, text: str) -> list[int]:
    """Tokenize already-templated text with exactly one BOS.

    The template usually writes the BOS itself; tokenizers that also add one automatically would
    double it, which measurably degrades Llama-3 and Gemma outputs.
    """
    bos_text = tokenizer.bos_token
    if bos_text and text[:1].isspace() and text.lstrip().startswith(bos_text):
        # A template that writes whitespace before its BOS (a newline at its top outside any trimmed
        # tag) would leave the BOS second, and the tokenizer's own BOS in front would double it.
        # Nothing precedes BOS in pretraining or alignment, so the whitespace goes, not the BOS.
        text = text.lstrip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and _adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    probe = tokenizer("a")["input_ids"]
    return bool(probe) and probe[0] == bos


def load_generator_tokenizer(cfg: Any) -> Any:
    """The generator's tokenizer alone (what a step shows before its processes load the model)."""
    from .models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(cfg.models.generator).path)


def load_transformers_engine(cfg: Any, device: str) -> GenerationEngine:
    """The profile's generator, in its generation precision, behind this module's batched engine."""
    from .models import load_causal_lm, load_tokenizer, resolve_model

    resolved = resolve_model(cfg.models.generator)
    tokenizer = load_tokenizer(resolved.path)
    model = load_causal_lm(resolved.path, cfg.hardware.generation_dtype, device, cfg.hardware.load_in_4bit)
    e = cfg.engine
    return GenerationEngine(
        model,
        tokenizer,
        batch_size=e.batch_size,
        batch_timeout_s=e.batch_timeout_s,
        top_k_sampling=e.top_k_sampling,
        static_cache_max_new_tokens=e.static_cache_max_new_tokens,
        seed=cfg.seed,
        show_progress=e.show_progress,
    )
