import json
import re
import shutil

import pytest
from conftest import run_cli, template_tokenizer

from synthetic_instruction_tuner.errors import ChatTemplateError
from synthetic_instruction_tuner.generation import chat_prompt_ids
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
    with pytest.raises(ChatTemplateError, match="no chat template"):
        pre_query_text(tokenizer)


# Chat templates Magpie cannot use, each modelled on a kind found in the wild.
UNUSABLE = {
    # tool-use templates (Hermes-2-Pro's "tool_use" variant) list the tools before any message
    "tools": (
        "{{- bos_token }}\n"
        "{{- '<|im_start|>system\\nYou may call these functions:\\n<tools>' }}\n"
        "{%- for tool in tools %}\n"
        "{{- tool | tojson }}\n"
        "{%- endfor %}\n"
        "{{- '</tools><|im_end|>\\n' }}\n"
        "{%- for message in messages %}\n"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
        "{%- endfor %}\n"
    ),
    # older function-calling templates take a `functions` variable
    "functions": (
        "{{ bos_token }}{{ '<|im_start|>system\\nFunctions: ' + functions | tojson + '<|im_end|>\\n' }}"
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
        "{{ '<|im_end|>\\n' }}{% endfor %}"
    ),
    # Llama-3.1's date header without its `is defined` default
    "date_string": (
        "{{- bos_token }}\n"
        "{{- '<|im_start|>system\\nToday Date: ' + date_string + '<|im_end|>\\n' }}\n"
        "{%- for message in messages %}\n"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
        "{%- endfor %}\n"
    ),
    # the user's text as is, only the assistant's turn marked (templates carried over from base models)
    "empty": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] }}"
        "{% else %}{{ '\\n\\nAssistant: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    # the same with a BOS in front
    "bos_only": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{{ message['content'] }}{% else %}{{ '\\n\\nAssistant: ' + message['content'] + eos_token }}"
        "{% endif %}{% endfor %}"
    ),
    # a fixed system prompt, then the user's text unmarked
    "system_only": (
        "{{ bos_token + 'You are a helpful assistant.\\n\\n' }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ message['content'] }}{% else %}"
        "{{ '\\nAssistant: ' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
    ),
}


@pytest.mark.parametrize(
    ("kind", "needs", "error"),
    [
        ("tools", "'tools'", "TypeError: 'NoneType' object is not iterable, template line 3"),
        ("functions", "'functions'", "TypeError: Object of type Undefined is not JSON serializable"),
        ("date_string", "'date_string'", "UndefinedError: 'date_string' is undefined, template line 2"),
    ],
)
def test_template_needing_extra_inputs_is_refused_naming_what_it_needs(kind, needs, error):
    tokenizer = template_tokenizer("gemma")
    tokenizer.chat_template = UNUSABLE[kind]
    with pytest.raises(ChatTemplateError) as refused:
        pre_query_ids(tokenizer, "org/tool-model")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"org/tool-model: its chat template needs {needs}, which Magpie does not pass ({error}"
    )
    assert message.endswith("); set models.generator to a model whose chat template needs only the messages")


def test_template_failing_on_its_own_terms_is_refused_with_its_reason():
    tokenizer = template_tokenizer("gemma")
    tokenizer.chat_template = "{{ raise_exception('Only tool calls are supported') }}"
    with pytest.raises(ChatTemplateError) as refused:
        pre_query_text(tokenizer, "org/tool-model")
    assert str(refused.value).startswith(
        "org/tool-model: its chat template fails on the lone user message Magpie renders "
        "(TemplateError: Only tool calls are supported, template line 1); "
    )


@pytest.mark.parametrize(
    ("kind", "family", "what"),
    [
        ("empty", "gemma", "puts nothing before a user message"),
        ("bos_only", "gemma", "puts only its BOS token '<bos>' before a user message"),
        ("bos_only", "mistral", "puts only its BOS token '<s>' before a user message"),
        ("system_only", "gemma", "puts only what it also writes for no messages"),
    ],
)
def test_pre_query_without_a_user_marker_is_refused(kind, family, what):
    tokenizer = template_tokenizer(family)
    tokenizer.chat_template = UNUSABLE[kind]
    with pytest.raises(ChatTemplateError) as refused:
        pre_query_text(tokenizer, "org/plain-model")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"org/plain-model: its chat template {what}")
    assert message.endswith(
        ", no user-turn marker for Magpie to sample after; "
        "set models.generator to an instruct model whose chat template marks the user turn"
    )


def test_bos_written_by_a_template_without_one_is_no_user_marker():
    tokenizer = template_tokenizer("qwen2_5")  # no BOS token: "<s>" is plain text to it
    tokenizer.chat_template = UNUSABLE["bos_only"].replace("{{ bos_token }}", "<s>")
    with pytest.raises(ChatTemplateError, match="only what it also writes for no messages"):
        pre_query_text(tokenizer)


@pytest.mark.parametrize("name", ["gemma", "llama3", "mistral"])
def test_whitespace_before_the_template_bos_gives_exactly_one_bos(name):
    tokenizer = template_tokenizer(name)
    # a newline before `{{ bos_token }}` that jinja's trimming does not remove
    tokenizer.chat_template = re.sub(
        r"\{\{-? bos_token \}\}", "{{ '\\n' }}{{ bos_token }}", tokenizer.chat_template, count=1
    )
    rendered = pre_query_text(tokenizer)
    assert rendered[0] == "\n" and rendered.lstrip().startswith(tokenizer.bos_token)
    bos = tokenizer.bos_token_id
    prompt = pre_query_ids(tokenizer)
    assert prompt[0] == bos and prompt.count(bos) == 1
    assert tokenizer.decode(prompt) == EXPECTED[name]
    # responses (step 02) are encoded the same way
    answer = chat_prompt_ids(tokenizer, [{"role": "user", "content": "Name three rivers."}])
    assert answer[0] == bos and answer.count(bos) == 1


def _generator_with_template(tmp_path, template: str):
    """A copy of the smoke generator whose tokenizer carries `template` (transformers 5 reads
    chat_template.jinja, which takes precedence over tokenizer_config.json)."""
    from synthetic_instruction_tuner.models import resolve_model

    source = resolve_model("tiny:chat-lm").path
    target = tmp_path / "generator"
    target.mkdir()
    for item in source.iterdir():
        if item.name == "model.safetensors":
            (target / item.name).symlink_to(item)
        elif item.name not in ("chat_template.jinja", ".complete"):
            shutil.copy(item, target / item.name)
    (target / "chat_template.jinja").write_text(template)
    config = json.loads((target / "tokenizer_config.json").read_text())
    assert "chat_template" not in config  # the .jinja file is the only template
    return target


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (
            "tools",
            "its chat template needs 'tools', which Magpie does not pass (TypeError: 'NoneType' object "
            "is not iterable, template line 3); set models.generator to a model whose chat template needs "
            "only the messages (executed notebook: ",
        ),
        (
            "empty",
            "its chat template puts nothing before a user message, no user-turn marker for Magpie to "
            "sample after; set models.generator to an instruct model whose chat template marks the user "
            "turn (executed notebook: ",
        ),
        (
            "bos_only",
            "its chat template puts only its BOS token '<|im_start|>' before a user message, no user-turn "
            "marker for Magpie to sample after; set models.generator to an instruct model whose chat "
            "template marks the user turn (executed notebook: ",
        ),
    ],
)
def test_step_01_refuses_an_unusable_template_in_one_line(tmp_path, kind, expected):
    generator = _generator_with_template(tmp_path, UNUSABLE[kind])
    run = tmp_path / "run"
    result = run_cli(
        [
            "--profile",
            "smoke",
            "--run-dir",
            str(run),
            "--steps",
            "01",
            "--set",
            f"models.generator={generator}",
        ],
        timeout=300,
    )
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("run_all: error: step 01_generate_instructions failed in cell")
    assert f"ChatTemplateError: {generator}: {expected}" in line  # whole, not cut at run_all's limit
    assert not (run / "data" / "instructions.jsonl").exists()
    assert not (run / "data" / "instructions_rejected.jsonl").exists()


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
