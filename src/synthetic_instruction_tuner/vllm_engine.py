"""`engine.backend: vllm`: the engine's sample contract through vLLM's offline `LLM.generate`.

The same requests (ids, token-id prompts such as Magpie's pre-query template), the same batch plan
and per-batch seeds, the same stop tokens (every end and role token of the chat template, as
`stop_token_ids`), and the same `Completion`s, so the steps' durable appends, resume and sharding
(`distributed.generate`) work unchanged. vLLM schedules each batch itself (continuous batching, paged
attention); `engine.batch_size` only sets how often a batch is appended to disk and a heartbeat
written. vLLM spreads one engine over several GPUs itself (`distributed.vllm_tensor_parallel_size`),
so generation with this backend runs in one process.

vLLM needs CUDA: `distributed.check_vllm` stops a step before anything loads, with one line, where vllm
is not installed or no GPU is visible. With `distributed.num_processes` above 1 (for training), the
steps on vLLM still run in one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

from .config import Config, SamplingConfig
from .distributed import check_vllm
from .generation import (
    Completion,
    EngineStats,
    Request,
    StreamingEngine,
    batch_seed,
    plan_batches,
    stop_token_ids,
)
from .watchdog import beat


def sampling_params(sampling: SamplingConfig, seed: int, stop_ids: Sequence[int]) -> Any:
    """vLLM's SamplingParams for one request: the engine's sampling, seed and stop tokens."""
    from vllm import SamplingParams

    return SamplingParams(
        n=1,
        temperature=max(sampling.temperature, 0.0),  # 0: greedy, as in the engine
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else -1,  # -1: the whole vocabulary
        max_tokens=sampling.max_new_tokens,
        seed=seed,
        stop_token_ids=list(stop_ids),
        skip_special_tokens=True,
    )


def to_completion(output: Any, stop_ids: Sequence[int], seed: int) -> Completion:
    """A vLLM CompletionOutput as the engine's Completion (the stop token itself is not kept)."""
    tokens = list(output.token_ids)
    stopped = output.finish_reason == "stop"
    if stopped and tokens and tokens[-1] in set(stop_ids):
        tokens = tokens[:-1]
    return Completion(
        text=output.text, token_ids=tokens, finish_reason="stop" if stopped else "length", seed=seed
    )


class VllmEngine(StreamingEngine):
    """The `GenerationEngine` interface (stream, run, tokenizer, batch sizes, stats) on a vLLM `LLM`."""

    def __init__(
        self, llm: Any, tokenizer: Any, batch_size: int, seed: int, stop_ids: Sequence[int] | None = None
    ) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.batch_size = self.planned_batch_size = batch_size
        self.seed = seed
        self.stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
        self.stats = EngineStats(batch_size=batch_size)

    def stream(
        self, requests: Sequence[Request], desc: str = "generating", shard: tuple[int, int] = (0, 1)
    ) -> Iterator[list[tuple[Request, Completion]]]:
        """Finished batches in plan order (every world-th batch with `shard`), as the engine's."""
        from vllm.inputs import TokensPrompt

        rank, world = shard
        batches = [
            b for i, b in enumerate(plan_batches(requests, self.planned_batch_size)) if i % world == rank
        ]
        total = sum(len(b) for b in batches)
        started, done = time.monotonic(), 0
        for batch in batches:
            seed = batch_seed(self.seed, batch[0].id, len(batch))
            beat(f"{desc}: a batch of {len(batch)} ({done} of {total} done)", kind="generate", force=True)
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in batch],
                [sampling_params(r.sampling, seed + i, self.stop_ids) for i, r in enumerate(batch)],
                use_tqdm=False,
            )
            completions = [to_completion(o.outputs[0], self.stop_ids, seed) for o in outputs]
            done += len(batch)
            self.stats.batches += 1
            self.stats.completions += len(batch)
            self.stats.new_tokens += sum(len(o.outputs[0].token_ids) for o in outputs)
            self.stats.seconds = time.monotonic() - started
            beat(f"{desc}: {done} of {total} done", kind="generate", force=True)
            yield list(zip(batch, completions, strict=True))


def load_vllm_engine(cfg: Config, device: str) -> VllmEngine:
    """The profile's generator in vLLM, in its generation precision (one LLM per process)."""
    check_vllm(device)
    from vllm import LLM

    from .models import load_tokenizer, resolve_model

    beat("loading the generator in vLLM", kind="generate", loading=True)
    path = str(resolve_model(cfg.models.generator).path)
    dtype = cfg.hardware.generation_dtype
    llm = LLM(
        model=path,
        dtype=dtype if dtype in ("float16", "bfloat16", "float32") else "auto",
        seed=cfg.seed,
        tensor_parallel_size=cfg.distributed.vllm_tensor_parallel_size,
        quantization="bitsandbytes" if cfg.hardware.load_in_4bit else None,
    )
    return VllmEngine(llm, load_tokenizer(path), cfg.engine.batch_size, cfg.seed)
