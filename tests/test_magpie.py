import pytest
from conftest import template_tokenizer

from synthetic_instruction_tuner.errors import GenerationError
from synthetic_instruction_tuner.magpie import (
    instruction_id,
    pre_query_ids,
    pre_query_text,
    sanitize_instruction,
)

EXPECTED = {
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
    "qwen2_5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n",
    "smollm2": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\n",
    "gemma": "<bos><start_of_turn>user\n",
    "mistral": "<s>[INST]",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pre_query_template_from_the_chat_template(name):
    tokenizer = template_tokenizer(name)
    assert pre_query_text(tokenizer) == EXPECTED[name]
    ids = pre_query_ids(tokenizer)
    assert tokenizer.decode(ids) == EXPECTED[name]
    if tokenizer.bos_token_id is not None and name != "smollm2":
        assert ids[0] == tokenizer.bos_token_id
        assert ids.count(tokenizer.bos_token_id) == 1  # the template's BOS, not doubled by the tokenizer


def test_base_model_without_template_is_refused():
    tokenizer = template_tokenizer("smollm2")
    tokenizer.chat_template = None
    with pytest.raises(GenerationError, match="no chat template"):
        pre_query_text(tokenizer)


@pytest.mark.parametrize(
    ("text", "finish", "reason"),
    [
        ("How do I bake sourdough bread at home?", "stop", None),
        ("   ", "stop", "empty"),
        ("Write a long essay about the history of", "length", "truncated"),
        ("Give me three tips for learning Spanish.\nassistant: Sure, here", "stop", "role_leakage"),
        ("<|im_start|>Explain recursion to me please", "stop", "role_leakage"),
        ("Here is a list of things I need help with:", "stop", "fragment"),
        ("Hello", "stop", "too_short"),
        (" ".join(["word"] * 250) + "?", "stop", "too_long"),
    ],
)
def test_sanitize_reasons(text, finish, reason):
    assert sanitize_instruction(text, finish, min_words=3, max_words=200)[1] == reason


def test_truncated_kept_when_allowed_and_ids_collide_on_exact_duplicates():
    assert (
        sanitize_instruction("Write a poem about the sea", "length", 3, 200, drop_truncated=False)[1] is None
    )
    assert instruction_id("How are you?") == instruction_id("how are you")
    assert instruction_id("How are you?") != instruction_id("Who are you?")
