"""The GPU profiles' code paths, run on CPU: Hub download patterns, the Hub token's route into kernels,
QLoRA with 4-bit bitsandbytes weights (which run on CPU too) and lm-eval on a 4-bit model."""

import os
import shutil

import pytest
import torch
from conftest import lora_sft_trainer

from synthetic_instruction_tuner.config import load_config
from synthetic_instruction_tuner.errors import ModelError
from synthetic_instruction_tuner.models import export_hub_token, hub_patterns
from synthetic_instruction_tuner.store import run_paths

CONFIG_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        # OpenAssistant/reward-model-deberta-v3-large-v2 style: PyTorch weights only
        (["pytorch_model.bin", "spm.model"], "*.bin"),
        (["model-00001-of-00002.safetensors", "model.safetensors.index.json"], "*.safetensors"),
        # both formats: the safetensors only, never the same weights twice
        (["model.safetensors", "pytorch_model.bin"], "*.safetensors"),
        # Llama repos: safetensors at the top, the original checkpoint in a subfolder
        (["model.safetensors", "original/consolidated.00.pth", "original/tokenizer.model"], "*.safetensors"),
    ],
)
def test_download_patterns_take_the_weight_format_the_repo_has(weights, expected):
    patterns = hub_patterns(CONFIG_FILES + weights)
    assert expected in patterns and "*.json" in patterns
    (other,) = {"*.bin", "*.safetensors"} - {expected}
    assert other not in patterns
    assert not any(p.startswith("original") or p.endswith(".pth") for p in patterns)


def test_a_repo_without_weights_is_one_clear_error():
    with pytest.raises(ModelError, match=r"no safetensors or \.bin weights"):
        hub_patterns([*CONFIG_FILES, "original/consolidated.00.pth"])


def test_the_hub_token_is_looked_up_by_huggingface_hub_and_handed_on_in_the_environment(
    tmp_path, monkeypatch
):
    """`hf auth login`'s token file (or Colab's secrets, which huggingface_hub also reads) reaches the
    kernels through the orchestrator's environment, not through a parameter."""
    from huggingface_hub import constants

    token_file = tmp_path / "token"
    token_file.write_text("hf_" + "TokenFromTheLoginFile0123456789abc")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    assert export_hub_token() is True
    assert os.environ["HF_TOKEN"] == token_file.read_text()
    token_file.unlink()
    monkeypatch.delenv("HF_TOKEN")
    assert export_hub_token() is False and "HF_TOKEN" not in os.environ


def test_qlora_keeps_adapter_weights_in_fp32_under_fp16_and_trains_on_4bit_weights(smoke_run, tmp_path):
    """TRL casts a quantized model's adapter to bf16; the t4 profile's fp16 mixed precision needs them in
    fp32. The cast and a QLoRA training step on bitsandbytes 4-bit weights run here on CPU; the fp16
    GradScaler itself needs CUDA."""
    from synthetic_instruction_tuner.training import keep_trainable_fp32_under_fp16

    cfg = load_config("smoke", ["hardware.load_in_4bit=true", "sft.max_steps=2"])
    trainer = lora_sft_trainer(cfg, smoke_run[0], tmp_path)
    assert trainer.model.is_loaded_in_4bit
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.bfloat16}  # TRL's QLoRA cast
    assert keep_trainable_fp32_under_fp16(trainer) == 0  # fp32 training: nothing to do
    trainer.args.fp16 = True  # as on the T4
    assert keep_trainable_fp32_under_fp16(trainer) == len(trainable)
    assert {p.dtype for p in trainable} == {torch.float32}
    trainer.args.fp16 = False  # fp16 autocast itself needs CUDA
    before = [p.detach().clone() for p in trainable]
    output = trainer.train()
    assert output.global_step == 2 and torch.isfinite(torch.tensor(output.training_loss))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))


def test_lm_eval_runs_on_a_4bit_model_with_its_adapter(smoke_run, tmp_path):
    """lm-eval gets the 4-bit model object (passing a quantization config through its model_args
    raises a TypeError in lm-eval 0.4.13), with the same chat format for base and adapters."""
    from synthetic_instruction_tuner.evaluation import evaluate_method, make_lm

    run = tmp_path / "run"
    shutil.copytree(smoke_run[0] / "data", run / "data")
    shutil.copytree(smoke_run[0] / "adapters", run / "adapters")
    paths = run_paths(run)
    cfg = load_config("smoke", ["hardware.load_in_4bit=true", "evaluation.limit=2"])
    lm = make_lm(cfg, paths, "base", "cpu")
    assert lm.model.is_loaded_in_4bit and "{% generation %}" in lm.tokenizer.chat_template
    result = evaluate_method(cfg, paths, "prompt_tuning", "cpu")
    assert result["chat_template_applied"] and set(result["results"]) >= {"sit_heldout_ifeval"}
    assert result["generation_endings"]["generations"] > 0
