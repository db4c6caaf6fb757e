"""`evaluation.backend: vllm`: step 07 through lm-eval's own `vllm` model type (GPU profiles).

lm-eval's `VLLM` loads the model itself from a path, so each method is described by arguments rather
than handed a loaded model as with `hf`: the target with its chat tokenizer (base), the target with a
LoRA adapter (`lora_local_path`: SFT, and DPO, which trains the SFT adapter further), the generator
with its own template (teacher). vLLM cannot serve a prompt-tuning adapter (a learned soft prompt),
so that method stays on lm-eval's `hf` model; the results record which model type produced them.
The tasks, prompts, metrics and result files are the same as with `hf`.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
from pathlib import Path
from typing import Any

from .config import Config
from .store import RunPaths
from .watchdog import beat

# methods vLLM serves: the base model, its LoRA adapters and the teacher
VLLM_METHODS = ("base", "sft_lora", "dpo", "teacher")


def base_tokenizer_dir(cfg: Config, paths: RunPaths) -> Path:
    """The target's tokenizer with the students' chat format, saved for vLLM (which loads by path):
    the base model is prompted exactly as the adapters are."""
    from .models import resolve_model
    from .training import chat_tokenizer

    folder = paths.eval / "base_tokenizer"
    chat_tokenizer(resolve_model(cfg.models.target).path).save_pretrained(folder)
    return folder


def lm_eval_vllm_args(
    cfg: Config, paths: RunPaths, method: str, pretrained: str, tokenizer: str | None
) -> dict[str, Any]:
    """lm-eval's `vllm` model arguments for one method (`run_all.py --preflight` and the tests check
    the names against lm-eval's own signature). `pretrained`: the checkpoint folder (the target, or
    the generator for the teacher); `tokenizer`: a folder with the chat template the method is
    prompted with, None for the teacher, whose own is in its checkpoint."""
    dtype = cfg.hardware.generation_dtype
    args: dict[str, Any] = {
        "pretrained": pretrained,
        "tokenizer": tokenizer,
        "dtype": dtype if dtype in ("float16", "bfloat16", "float32") else "auto",
        "batch_size": "auto",  # vLLM schedules the whole task itself (continuous batching)
        "max_gen_toks": cfg.evaluation.max_gen_toks,
        "seed": cfg.seed,
        "tensor_parallel_size": cfg.distributed.vllm_tensor_parallel_size,
    }
    if cfg.hardware.load_in_4bit:
        args["quantization"] = "bitsandbytes"
    if method in ("sft_lora", "dpo"):
        args["lora_local_path"] = str(paths.adapters / method)
        args["max_lora_rank"] = cfg.lora.r
    return args


@functools.cache
def vllm_init_parameters() -> frozenset[str]:
    """The parameter names of lm-eval's `VLLM.__init__`, read from its source: the module imports
    vllm at its top, so it cannot be inspected where vllm is not installed."""
    spec = importlib.util.find_spec("lm_eval.models.vllm_causallms")
    assert spec is not None and spec.origin is not None, "lm-eval ships vllm_causallms.py"
    tree = ast.parse(Path(spec.origin).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "VLLM":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    arguments = item.args.args + item.args.kwonlyargs
                    return frozenset(a.arg for a in arguments if a.arg != "self")
    raise AssertionError("lm-eval's vllm_causallms.py has no VLLM.__init__")


def vllm_args_problem(args: dict[str, Any]) -> str | None:
    """Why lm-eval's `vllm` model would not take these arguments by name; None if it does (the rest
    of its **kwargs go to vLLM's `LLM`)."""
    unknown = sorted(set(args) - vllm_init_parameters())
    return f"lm-eval's VLLM takes no argument {unknown[0]!r}" if unknown else None


def make_vllm_lm(cfg: Config, paths: RunPaths, method: str) -> Any:
    """lm-eval's `vllm` model for one method, counting how its generations end like the `hf` one."""
    from lm_eval.models.vllm_causallms import VLLM

    from .models import resolve_model

    class CountingVLLM(VLLM):
        """lm-eval's VLLM; it counts generations that ended on a stop (EOS or the task's own stop
        sequence; vLLM's finish_reason "stop") against those cut at the token limit, and beats the
        watchdog's heartbeat around each call into the engine."""

        endings: dict[str, int]

        def _model_generate(self, requests: Any, generate: bool = False, sampling_params: Any = None) -> Any:
            doing = "generating for" if generate else "scoring"
            beat(
                f"evaluating {method} in vLLM: {doing} {len(requests)} requests", kind="evaluate", force=True
            )
            outputs = super()._model_generate(requests, generate, sampling_params)
            if generate:
                counts = {
                    "ended_with_eos": sum(o.outputs[0].finish_reason == "stop" for o in outputs),
                    "generations": len(outputs),
                    "new_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                }
                self.endings = {k: getattr(self, "endings", {}).get(k, 0) + v for k, v in counts.items()}
            beat(f"evaluating {method} in vLLM: {len(requests)} requests done", kind="evaluate", force=True)
            return outputs

    if method == "base":
        tokenizer: str | None = str(base_tokenizer_dir(cfg, paths))
    elif method == "teacher":
        tokenizer = None
    else:
        tokenizer = str(paths.adapters / method)  # the adapter's saved chat tokenizer
    model = cfg.models.generator if method == "teacher" else cfg.models.target
    beat(f"evaluating {method}: loading it in vLLM", kind="evaluate", loading=True)
    return CountingVLLM(**lm_eval_vllm_args(cfg, paths, method, str(resolve_model(model).path), tokenizer))


def release(lm: Any) -> None:
    """Free the GPU memory a vLLM engine holds before the next method loads its own."""
    import gc

    import torch

    engine = getattr(getattr(getattr(lm, "model", None), "llm_engine", None), "engine_core", None)
    if engine is not None and hasattr(engine, "shutdown"):
        engine.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
