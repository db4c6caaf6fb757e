"""`engine.backend: vllm`: one clear line where it cannot run; vLLM's own API where vllm imports; a
real generation where a GPU is present as well."""

import importlib.util

import pytest
from conftest import run_cli

from synthetic_instruction_tuner.config import SamplingConfig, load_config
from synthetic_instruction_tuner.store import read_jsonl

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_vllm_without_vllm_or_a_gpu_stops_the_step_with_one_line(tmp_path):
    run = tmp_path / "run"
    args = ["--profile", "smoke", "--run-dir", str(run), "--steps", "01", "--set", "engine.backend=vllm"]
    result = run_cli(args)
    assert result.returncode != 0
    why = "vllm is not installed" if not HAS_VLLM else "vLLM needs a CUDA GPU"
    (line,) = [x for x in result.stderr.splitlines() if "engine.backend is vllm" in x]
    assert why in line and "--set engine.backend=transformers" in line
    assert not (run / "data" / "instructions.jsonl").exists(), "nothing is generated or opened"
    assert [r["status"] for r in read_jsonl(run / "ledger.jsonl")] == ["failed"]


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_sampling_params_and_outputs_follow_vllms_api():
    from vllm import SamplingParams
    from vllm.outputs import CompletionOutput

    from synthetic_instruction_tuner.vllm_engine import sampling_params, to_completion

    params = sampling_params(
        SamplingConfig(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12), 5, [2, 7]
    )
    assert isinstance(params, SamplingParams)
    assert (params.max_tokens, params.seed, params.stop_token_ids, params.top_p) == (12, 5, [2, 7], 0.9)
    output = CompletionOutput(
        index=0,
        text="hi",
        token_ids=[11, 12, 7],
        cumulative_logprob=None,
        logprobs=None,
        finish_reason="stop",
    )
    done = to_completion(output, [2, 7], 5)
    assert (done.text, done.token_ids, done.finish_reason, done.seed) == ("hi", [11, 12], "stop", 5)


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_vllm_generates_the_engines_sample_contract_on_a_gpu():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA GPU")
    from synthetic_instruction_tuner.engines import load_engine
    from synthetic_instruction_tuner.generation import Request
    from synthetic_instruction_tuner.magpie import pre_query_ids

    cfg = load_config("smoke", ["hardware.device=cuda", "engine.backend=vllm"])
    engine = load_engine(cfg, "cuda")
    prompt = pre_query_ids(engine.tokenizer, cfg.models.generator)
    requests = [Request(f"s{i:06d}", prompt, cfg.magpie.sampling) for i in range(10)]
    batches = list(engine.stream(requests))
    done = [(r.id, c) for batch in batches for r, c in batch]
    assert [i for i, _ in done] == [r.id for r in requests]
    assert all(c.finish_reason in ("stop", "length") for _, c in done)
    assert all(len(c.token_ids) <= cfg.magpie.sampling.max_new_tokens for _, c in done)
    assert not any(set(c.token_ids) & set(engine.stop_ids) for _, c in done)


def test_vllm_evaluation_without_vllm_or_a_gpu_stops_step_07_with_one_line(tmp_path):
    run = tmp_path / "run"
    args = ["--profile", "smoke", "--run-dir", str(run), "--steps", "07", "--set", "evaluation.backend=vllm"]
    args += ["--set", "distributed.num_processes=2"]  # vLLM runs the step in one process regardless
    result = run_cli(args)
    assert result.returncode != 0
    why = "vllm is not installed" if not HAS_VLLM else "vLLM needs a CUDA GPU"
    (line,) = [x for x in result.stderr.splitlines() if "evaluation.backend is vllm" in x]
    assert why in line and "--set evaluation.backend=hf" in line
    assert not (run / "eval" / "summary.json").exists()
    assert [(r["status"], r["processes"]) for r in read_jsonl(run / "ledger.jsonl")] == [("failed", 1)]


def test_lm_eval_vllm_arguments_are_lm_evals_own_and_prompt_tuning_stays_on_hf(tmp_path):
    from synthetic_instruction_tuner.evaluation import METHODS, lm_eval_model_type
    from synthetic_instruction_tuner.store import run_paths
    from synthetic_instruction_tuner.vllm_eval import (
        base_tokenizer_dir,
        lm_eval_vllm_args,
        vllm_args_problem,
        vllm_init_parameters,
    )

    cfg = load_config("smoke", ["evaluation.backend=vllm", "hardware.load_in_4bit=true"])
    paths = run_paths(tmp_path / "run")
    assert {m: lm_eval_model_type(cfg, m) for m in METHODS} == {
        "base": "vllm",
        "sft_lora": "vllm",
        "prompt_tuning": "hf",
        "dpo": "vllm",
        "teacher": "vllm",
    }
    assert lm_eval_model_type(load_config("smoke", []), "base") == "hf"
    # read from lm-eval's source without importing vllm
    assert {
        "pretrained",
        "lora_local_path",
        "max_lora_rank",
        "tensor_parallel_size",
    } <= vllm_init_parameters()
    base = str(base_tokenizer_dir(cfg, paths))
    for method, tokenizer in (("base", base), ("dpo", str(paths.adapters / "dpo")), ("teacher", None)):
        args = lm_eval_vllm_args(cfg, paths, method, "/models/x", tokenizer)
        assert vllm_args_problem(args) is None, (method, args)
        assert args["quantization"] == "bitsandbytes" and args["tokenizer"] == tokenizer
        assert args.get("lora_local_path") == (str(paths.adapters / "dpo") if method == "dpo" else None)
    assert (
        vllm_args_problem({"pretrained": "x", "lora_path": "y"})
        == "lm-eval's VLLM takes no argument 'lora_path'"
    )
    # the base model is prompted in the students' chat format, which the saved tokenizer carries
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(base)
    messages = [{"role": "user", "content": "Name a colour."}]
    assert "Name a colour." in saved.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
def test_lm_evals_vllm_model_read_from_source_is_the_one_that_imports():
    import inspect

    from lm_eval.models.vllm_causallms import VLLM

    from synthetic_instruction_tuner.vllm_eval import vllm_init_parameters

    named = {p for p in inspect.signature(VLLM.__init__).parameters if p not in ("self", "kwargs")}
    assert named == vllm_init_parameters()
    # step 07 wraps this call to count endings: its parameters must still be these
    assert list(inspect.signature(VLLM._model_generate).parameters) == [
        "self",
        "requests",
        "generate",
        "sampling_params",
    ]
