import time

import pytest
import torch

from synthetic_instruction_tuner.config import SamplingConfig
from synthetic_instruction_tuner.errors import GenerationError
from synthetic_instruction_tuner.generation import GenerationEngine, Request, _TopKSampler, stop_token_ids

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=6)
SAMPLED = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=8)


def _requests(tokenizer, n, sampling, lengths=(3, 9, 17)):
    texts = ["hello there " * (lengths[i % len(lengths)] // 2 + 1) for i in range(n)]
    return [
        Request(f"r{i}", tokenizer(t)["input_ids"][: lengths[i % len(lengths)]], sampling)
        for i, t in enumerate(texts)
    ]


def _generate(engine, requests):
    done = {}
    engine.run(requests, lambda batch: done.update({r.id: c for r, c in batch}))
    return done


def test_batched_left_padded_matches_one_at_a_time(chat_lm):
    model, tokenizer = chat_lm
    requests = _requests(tokenizer, 6, GREEDY)
    batched = _generate(GenerationEngine(model, tokenizer, batch_size=6, show_progress=False), requests)
    single = _generate(GenerationEngine(model, tokenizer, batch_size=1, show_progress=False), requests)
    assert {k: v.token_ids for k, v in batched.items()} == {k: v.token_ids for k, v in single.items()}
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in batched.values())


def test_sampling_is_seeded(chat_lm):
    model, tokenizer = chat_lm
    requests = _requests(tokenizer, 8, SAMPLED)

    def tokens(seed):
        engine = GenerationEngine(model, tokenizer, batch_size=4, seed=seed, show_progress=False)
        return {k: v.token_ids for k, v in _generate(engine, requests).items()}

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)


def test_top_k_sampler_draws_only_among_candidates():
    scores = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]] * 200)
    sampler = _TopKSampler(
        SamplingConfig(temperature=1.0, top_k=2, top_p=1.0), torch.Generator().manual_seed(0)
    )
    picked = sampler(None, scores).argmax(dim=-1)
    assert set(picked.tolist()) == {1, 2}
    nucleus = _TopKSampler(
        SamplingConfig(temperature=1.0, top_k=5, top_p=0.5), torch.Generator().manual_seed(0)
    )
    assert set(nucleus(None, scores).argmax(dim=-1).tolist()) == {1}  # token 1 alone holds > 50% of the mass


def test_stops_on_stop_tokens_and_reports_finish_reason(chat_lm):
    model, tokenizer = chat_lm
    request = _requests(tokenizer, 1, GREEDY)[0]
    free = _generate(GenerationEngine(model, tokenizer, show_progress=False, stop_ids=[0]), [request])["r0"]
    stop_at = free.token_ids[2]
    engine = GenerationEngine(model, tokenizer, show_progress=False, stop_ids=[stop_at])
    stopped = _generate(engine, [request])["r0"]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop_at)]


def test_stop_ids_cover_chat_template_role_tokens():
    from conftest import template_tokenizer

    tokenizer = template_tokenizer("llama3")
    names = set(tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer)))
    assert {"<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"} <= names


def _stall_above(model, rows, seconds):
    """Make every forward pass of a batch larger than `rows` take `seconds` longer (a stalling batch)."""

    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > rows:
            time.sleep(seconds)

    return model.register_forward_pre_hook(hook, with_kwargs=True)


def test_watchdog_abandons_slow_batches_and_retries_at_half_size(chat_lm):
    model, tokenizer = chat_lm
    requests = _requests(tokenizer, 8, GREEDY)
    # margins wide enough for a loaded machine: a healthy 6-token batch of 2 takes well under 4 s
    handle = _stall_above(model, rows=2, seconds=6.0)
    try:
        engine = GenerationEngine(model, tokenizer, batch_size=8, batch_timeout_s=4.0, show_progress=False)
        done = _generate(engine, requests)
    finally:
        handle.remove()
    assert sorted(done) == sorted(r.id for r in requests)
    assert engine.stats.timeouts == 2 and engine.stats.batch_size == 2  # 8 -> 4 -> 2


def test_watchdog_gives_a_clear_error_when_even_one_prompt_is_too_slow(chat_lm):
    model, tokenizer = chat_lm
    handle = _stall_above(model, rows=0, seconds=0.5)
    try:
        engine = GenerationEngine(model, tokenizer, batch_size=2, batch_timeout_s=0.3, show_progress=False)
        with pytest.raises(GenerationError, match=r"exceeded engine\.batch_timeout_s=0\.3s even alone"):
            _generate(engine, _requests(tokenizer, 2, GREEDY))
    finally:
        handle.remove()


def test_out_of_memory_halves_the_batch(chat_lm):
    model, tokenizer = chat_lm

    def hook(module, args, kwargs):
        if kwargs["input_ids"].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        engine = GenerationEngine(model, tokenizer, batch_size=8, show_progress=False)
        done = _generate(engine, _requests(tokenizer, 8, GREEDY))
    finally:
        handle.remove()
    assert len(done) == 8 and engine.stats.ooms == 2 and engine.stats.batch_size == 2


def _adapter(tmp_path, method):
    """A saved adapter on the tiny base model, loaded back as the pipeline loads adapters for inference.
    The soft prompt is scaled up from its random start so that feeding it twice changes the answer."""
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    from synthetic_instruction_tuner.models import load_adapter, load_causal_lm, resolve_model

    path = resolve_model("tiny:base-lm").path
    if method == "prompt_tuning":
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)
    else:
        config = LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    trained = get_peft_model(load_causal_lm(path), config)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if param.requires_grad:
                param.normal_(0.0, 1.0 if "lora" in name else 8.0)
    trained.save_pretrained(tmp_path / method)
    return load_adapter(load_causal_lm(path), tmp_path / method), path


@pytest.mark.parametrize("method", ["prompt_tuning", "lora"])
def test_adapters_decode_one_token_per_step_as_without_a_cache(tmp_path, method):
    """After the prompt, each decoding step feeds the base model one position: a prompt-tuned model must
    not feed its virtual tokens again (transformers 5.24 with peft 0.21 did), and its cached greedy
    answer must be the one computed without a cache."""
    from synthetic_instruction_tuner.models import load_tokenizer

    model, path = _adapter(tmp_path, method)
    tokenizer = load_tokenizer(path)
    inputs = tokenizer(["Name a fruit.", "Say hello to everyone here."], return_tensors="pt", padding=True)
    widths: list[int] = []

    def record(_module, args, kwargs):
        fed = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        widths.append(fed.shape[1])

    hook = model.get_base_model().model.register_forward_pre_hook(record, with_kwargs=True)
    settings = {
        "max_new_tokens": 8,
        "min_new_tokens": 8,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.inference_mode():
        cached = model.generate(**inputs, **settings)
        hook.remove()
        uncached = model.generate(**inputs, **settings, use_cache=False)
    virtual = 10 if method == "prompt_tuning" else 0
    assert widths == [inputs["input_ids"].shape[1] + virtual] + [1] * 7
    assert cached.tolist() == uncached.tolist()


def test_the_output_layer_gets_contiguous_input_when_weights_are_frozen(tmp_path):
    """A PEFT-wrapped model has frozen weights; torch's CPU matmul then copies the whole output
    layer per row for the strided last-position slice `generate` projects (8-12x slower prefill on
    Gemma-3-270M). The output layer must only ever see contiguous input."""
    from synthetic_instruction_tuner.models import load_tokenizer

    model, path = _adapter(tmp_path, "lora")
    tokenizer = load_tokenizer(path)
    inputs = tokenizer(["Name a fruit.", "Say hello to everyone here."], return_tensors="pt", padding=True)
    seen: list[tuple[tuple[int, ...], bool]] = []
    head = model.get_base_model().get_output_embeddings()

    def standard(x: torch.Tensor) -> bool:  # the strides matmul needs to fold the product
        return x.stride() == torch.empty(x.shape).stride()

    hook = head.register_forward_pre_hook(
        lambda _m, args: seen.append((tuple(args[0].shape), standard(args[0])))
    )
    with torch.inference_mode():
        model.generate(
            **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        # one sequence scored on its last 2 positions, as step 07's scoring asks (logits_to_keep)
        model(input_ids=inputs["input_ids"][:1], logits_to_keep=2)
    hook.remove()
    assert not any(p.requires_grad for p in model.get_base_model().parameters())
    assert seen[0][0][:2] == (2, 1) and seen[-1][0][:2] == (1, 2)
    assert all(ok for _, ok in seen), seen
