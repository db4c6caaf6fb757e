"""The profile's generator behind a batched engine, by `engine.backend`: transformers' `generate`
(`generation.py`) or vLLM's offline engine (`vllm_engine.py`). Both keep one sample contract: ids,
durable appends, resume, stop tokens, the pre-query template."""

from __future__ import annotations

from typing import Any


def load_engine(cfg: Any, device: str) -> Any:
    """The generation engine `engine.backend` names, loaded with the profile's generator."""
    if cfg.engine.backend == "vllm":
        from .vllm_engine import load_vllm_engine

        return load_vllm_engine(cfg, device)
    from .generation import load_transformers_engine

    return load_transformers_engine(cfg, device)
