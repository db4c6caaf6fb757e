"""Step 02: one response per instruction from the generator, through its own chat template."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from .config import Config
from .distributed import clear_shards, generate, output, shard_dir
from .generation import Completion, GenerationEngine, Request, chat_prompt_ids
from .store import RunPaths, check_resumable, read_jsonl


def user_turn(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def generation_messages(text: str, system_prompt: str | None) -> list[dict[str, str]]:
    """The conversation the generator answers; the system turn steers generation only and is not
    part of the training data."""
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + user_turn(text)


def generate_responses(
    engine: GenerationEngine, cfg: Config, instructions_path: str | Path, out_path: str | Path
) -> dict[str, Any]:
    """Answer every instruction not yet answered in `out_path`; appends as batches finish."""
    instructions = read_jsonl(instructions_path, required=("id", "instruction"))
    sampling = cfg.responses.sampling
    settings = {
        "generator": cfg.models.generator,
        "sampling": asdict(sampling),
        "system_prompt": cfg.responses.system_prompt,
    }
    shards = shard_dir(out_path, settings)
    with output(out_path, required=("instruction", "response")) as out:
        check_resumable(out, settings)
        todo = [r for r in instructions if r["id"] not in out]
        requests = [
            Request(
                r["id"],
                chat_prompt_ids(
                    engine.tokenizer, generation_messages(r["instruction"], cfg.responses.system_prompt)
                ),
                sampling,
                r,
            )
            for r in todo
        ]

        def append(batch: list[tuple[Request, Completion]]) -> None:
            out.append(
                {
                    "id": request.id,
                    "instruction": request.meta["instruction"],
                    "response": completion.text.strip(),
                    "finish_reason": completion.finish_reason,
                    "num_tokens": len(completion.token_ids),
                    **settings,
                    "seed": completion.seed,
                }
                for request, completion in batch
            )

        for batch in generate(engine, requests, shards, desc="responses"):
            append(batch)
        finished = [r["finish_reason"] for r in out.records]
    clear_shards(shards)
    return {
        "instructions": len(instructions),
        "responses": len(finished),
        "generated_now": len(requests),
        "ended_on_end_token": finished.count("stop"),
        "cut_at_length_limit": finished.count("length"),
        "tokens_per_second": round(engine.stats.tokens_per_second, 1),
    }


def responses_step(cfg: Config, paths: RunPaths, device: str) -> dict[str, Any]:
    """Step 02 in one process of the step (see `distributed.run`): load the generator, answer."""
    from .engines import load_engine

    return generate_responses(
        load_engine(cfg, device), cfg, paths.file("instructions.jsonl"), paths.file("responses.jsonl")
    )
