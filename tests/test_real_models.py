"""Real offline models (SmolLM2-135M-Instruct, Gemma-3-270M); slow, run with `make test-slow`."""

import pytest

from synthetic_instruction_tuner.config import SamplingConfig
from synthetic_instruction_tuner.generation import GenerationEngine, Request, stop_token_ids
from synthetic_instruction_tuner.magpie import pre_query_ids, pre_query_text, sanitize_instruction
from synthetic_instruction_tuner.models import load_causal_lm, load_tokenizer, resolve_model

pytestmark = pytest.mark.slow


def test_smollm2_writes_instructions_from_its_pre_query_template():
    path = resolve_model("gguf:smollm2-135m-instruct").path
    tokenizer = load_tokenizer(path)
    assert pre_query_text(tokenizer).endswith("<|im_start|>user\n")
    assert set(tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))) >= {"<|im_end|>", "<|im_start|>"}
    engine = GenerationEngine(
        load_causal_lm(path, "bfloat16"), tokenizer, batch_size=8, seed=0, show_progress=False
    )
    sampling = SamplingConfig(temperature=1.0, top_k=50, max_new_tokens=96)
    requests = [Request(f"s{i}", pre_query_ids(tokenizer), sampling) for i in range(8)]
    texts = [
        sanitize_instruction(c.text, c.finish_reason, 3, 200) for b in engine.stream(requests) for _, c in b
    ]
    accepted = [t for t, reason in texts if reason is None]
    assert len(accepted) >= 5
    assert sum(t.rstrip().endswith(("?", ".")) for t in accepted) >= 3  # requests, not fragments


def test_gemma_base_rebuilds_dense_and_trainable():
    import torch

    path = resolve_model("gguf:gemma-3-270m").path
    model = load_causal_lm(path)
    assert sum(p.numel() for p in model.parameters()) > 260_000_000
    ids = load_tokenizer(path)("The capital of France is", return_tensors="pt")
    loss = model(**ids, labels=ids["input_ids"]).loss
    loss.backward()  # a de-quantized GGUF model is not trainable; the rebuilt one is
    assert torch.isfinite(loss) and model.model.embed_tokens.weight.grad is not None


def test_converting_a_gguf_model_parses_its_file_once(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("SIT_CACHE", str(tmp_path))
    original, opened = gguf.GGUFReader, []

    def counting(path, mode="r"):
        opened.append(str(path))
        return original(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    resolve_model("gguf:smollm2-135m-instruct")
    assert len(opened) == len(set(opened)) >= 1  # tokenizer, config and weights share one parse
