"""Benchmarks that print ratios measured side by side in one run (not tests).

python -m synthetic_instruction_tuner.bench generation --profile cpu
    one prompt at a time with plain `generate` (the seed's fallback) vs the batched engine,
    same model, precision, sampling settings, stop tokens and number of outputs.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .config import load_config
from .errors import PipelineError


def _real_tokens(row: list[int], prompt_len: int, stop: set[int]) -> int:
    """Generated tokens up to and including the first stop token (padding after it is not work)."""
    new = row[prompt_len:]
    for i, token in enumerate(new):
        if token in stop:
            return i + 1
    return len(new)


def bench_generation(profile: str, overrides: list[str], num_outputs: int | None) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from .generation import Request, load_engine
    from .magpie import pre_query_ids
    from .models import resolve_device

    cfg = load_config(profile, overrides)
    device = resolve_device(cfg.hardware.device)
    engine = load_engine(cfg, device)
    engine.show_progress = False
    n = num_outputs or 2 * cfg.engine.batch_size
    sampling = cfg.magpie.sampling
    prompt = pre_query_ids(engine.tokenizer)
    stop = set(engine.stop_ids)
    print(
        f"model {cfg.models.generator} ({cfg.hardware.generation_dtype}, {device}), workload: step 01 Magpie, "
        f"{n} outputs, max_new_tokens={sampling.max_new_tokens}, T={sampling.temperature}, top_k={sampling.top_k}",
        flush=True,
    )

    # The seed's fallback: one prompt per generate() call, transformers' own sampler and cache.
    torch.manual_seed(cfg.seed)
    ids = torch.tensor([prompt], device=engine.model.device)
    tokens, started = 0, time.perf_counter()
    for _ in tqdm(range(n), desc="one at a time", unit="seq"):
        with torch.inference_mode():
            out = engine.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=engine.stop_ids,
                pad_token_id=engine.pad_id,
            )
        tokens += _real_tokens(out[0].tolist(), len(prompt), stop)
    single_s = time.perf_counter() - started
    single = {
        "outputs": n,
        "tokens": tokens,
        "seconds": round(single_s, 1),
        "tokens_per_s": tokens / single_s,
    }

    requests = [Request(f"b{i:05d}", prompt, sampling) for i in range(n)]
    stats = engine.run(requests, lambda batch: None, desc="batched")
    batched = {
        "outputs": stats.completions,
        "tokens": stats.new_tokens,
        "seconds": round(stats.seconds, 1),
        "tokens_per_s": stats.tokens_per_second,
        "batch_size": stats.batch_size,
    }
    ratio = batched["tokens_per_s"] / single["tokens_per_s"]
    print(
        f"one prompt at a time: {single['tokens_per_s']:8.1f} tokens/s  ({tokens} tokens in {single_s:.1f} s)"
    )
    print(
        f"batched engine (bs {stats.batch_size}): {batched['tokens_per_s']:8.1f} tokens/s  "
        f"({stats.new_tokens} tokens in {stats.seconds:.1f} s)"
    )
    print(f"speed-up: {ratio:.1f}x")
    return {"single": single, "batched": batched, "ratio": ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synthetic_instruction_tuner.bench")
    sub = parser.add_subparsers(dest="what", required=True)
    gen = sub.add_parser("generation", help="batched engine vs one prompt at a time")
    gen.add_argument("--profile", default="cpu")
    gen.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    gen.add_argument("--num-outputs", type=int, default=None, help="default: two engine batches")
    args = parser.parse_args(argv)
    try:
        if args.what == "generation":
            bench_generation(args.profile, args.overrides, args.num_outputs)
    except PipelineError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
