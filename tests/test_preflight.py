"""`run_all.py --preflight`: every profile checked on this CPU machine, without downloads or a GPU.

The GPU profiles' Hub models are read from the architecture configs shipped in `model_configs/`, so
these tests load no weights. Memory ranges are in GiB; where a range is asserted, the comment says
where its ends come from.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from conftest import run_cli

from synthetic_instruction_tuner import memory, preflight
from synthetic_instruction_tuner.config import load_config
from synthetic_instruction_tuner.memory import GIB

STEPS = (
    "01_generate_instructions",
    "02_generate_responses",
    "03_filter",
    "04_build_preferences",
    "05_sft_lora",
    "05b_prompt_tuning",
    "06_dpo",
    "07_evaluate",
)


def _rows(tmp_path: Path, profile: str, *overrides: str) -> dict[str, preflight.Row]:
    check = preflight.Preflight(load_config(profile, list(overrides)), tmp_path)
    return {row.step: row for row in check.check()}


def _gib(row: preflight.Row, part: str | None = None) -> float:
    assert row.estimate is not None, row
    return (row.estimate.parts[part] if part else row.estimate.total) / GIB


def _failures(rows: dict[str, preflight.Row]) -> dict[str, str]:
    return {step: row.status for step, row in rows.items() if row.failed}


def test_smoke_preflight_prints_one_table_and_passes():
    out = io.StringIO()
    assert preflight.run(load_config("smoke"), out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[-1] == "preflight: ok"
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| step | built | estimate GiB | limit GiB | status |"
    for step in STEPS:
        assert any(line.startswith(f"| {step} |") and line.endswith("| ok |") for line in table), step


def test_shipped_configs_give_the_models_real_parameter_counts():
    # the published sizes of these checkpoints
    assert memory.model_shape("meta-llama/Llama-3.1-8B-Instruct").params == 8_030_261_248
    assert memory.model_shape("meta-llama/Llama-3.2-3B").params == 3_212_749_824
    reward = memory.model_shape("OpenAssistant/reward-model-deberta-v3-large-v2", causal=False)
    assert 430e6 < reward.params < 440e6  # DeBERTa-v3-large (435M) with a one-logit head


def test_a100_and_h100_pass_with_estimates_in_range(tmp_path):
    for profile, limit in (("a100", 36.0), ("h100", 71.6)):  # 90% of 40 and 79.6 GiB
        rows = _rows(tmp_path, profile)
        assert _failures(rows) == {}, profile
        assert rows["device"].status == "info: cuda not available here (expected on the GPU machine)"
        # Llama-3.1-8B in bf16: 8.03e9 x 2 bytes = 14.96 GiB
        assert 14.9 < _gib(rows["01_generate_instructions"], "weights") < 15.0
        for step in STEPS:
            if rows[step].estimate is not None:
                assert _gib(rows[step]) <= limit, (profile, step)
        # DPO on the 3B in bf16 with gradient checkpointing: 6 GiB of weights, a few GiB of activations
        assert 8 < _gib(rows["06_dpo"]) < 25
    # SFT: the a100 checkpoints (6 GiB of weights, a few of activations); the h100 has room not to
    assert 8 < _gib(_rows(tmp_path, "a100")["05_sft_lora"]) < 20
    assert 45 < _gib(rows["05_sft_lora"]) < 60


def test_a100_sft_and_dpo_fit_only_with_gradient_checkpointing(tmp_path):
    rows = _rows(tmp_path, "a100", "sft.gradient_checkpointing=false", "dpo.gradient_checkpointing=false")
    # 12 rows x 704 tokens, ~5.8 MB of activations per token over 28 layers: ~46 GiB, over 36 GiB
    assert 45 < _gib(rows["05_sft_lora"], "activations") < 50
    assert rows["05_sft_lora"].status.startswith("FAIL: needs 5")
    assert rows["05_sft_lora"].status.endswith("over the 36.0 GiB limit")
    assert rows["06_dpo"].failed  # 8 x 2 x 832 tokens
    assert not _rows(tmp_path, "a100", "sft.gradient_checkpointing=false")["06_dpo"].failed  # its own setting


def test_t4_estimates_and_the_4bit_lm_eval_arguments(tmp_path):
    """t4 fits everywhere, and lm-eval gets the 4-bit model as an object: a quantization config in its
    loading arguments would arrive twice (HFLM passes its own quantization_config=), which the check
    still recognises."""
    from synthetic_instruction_tuner.models import quantization_config
    from synthetic_instruction_tuner.preflight import lm_eval_problem

    rows = _rows(tmp_path, "t4")
    # Llama-3.1-8B in nf4: 6.98e9 linear parameters x 0.516 B + 1.05e9 embedding/LM-head parameters x 2 B
    assert 5.0 < _gib(rows["01_generate_instructions"], "weights") < 5.6
    assert "BitsAndBytesConfig(nf4, double quant, float16 compute)" in rows["05_sft_lora"].built
    # QLoRA 3B: 2.8 GiB of weights (fp32 embeddings after prepare_model_for_kbit_training), 4 x 704 tokens
    assert 2.5 < _gib(rows["05_sft_lora"], "weights") < 3.0
    assert 4 < _gib(rows["05_sft_lora"]) < 8
    assert 4 < _gib(rows["06_dpo"]) < 8
    assert _gib(rows["07_evaluate"]) < 13.5  # evaluation.batch_size 4: 4 x 3584 tokens of logits
    assert _failures(rows) == {}
    assert "pretrained=the base model in 4-bit (+ adapter)" in rows["07_evaluate"].built
    loading_args = {
        "pretrained": "meta-llama/Llama-3.2-3B",
        "quantization_config": quantization_config("float16"),
    }
    assert "multiple values for 'quantization_config'" in lm_eval_problem(loading_args)


def test_an_override_that_cannot_fit_names_the_step(tmp_path):
    rows = _rows(tmp_path, "t4", "sft.per_device_train_batch_size=64")
    status = rows["05_sft_lora"].status
    assert status.startswith("FAIL: needs") and status.endswith("over the 13.5 GiB limit")
    assert not rows["05b_prompt_tuning"].failed  # prompt tuning has its own batch size


def test_a_builder_error_is_a_fail_row_not_a_traceback(tmp_path):
    rows = _rows(tmp_path, "a100", "lora.target_modules=[not_a_layer]")
    for step in ("05_sft_lora", "06_dpo"):
        assert rows[step].status.startswith("FAIL: NoMatchingPeftModuleError: Target modules {'not_a_layer'}")
    assert not rows["05b_prompt_tuning"].failed


def test_a_hub_model_without_an_offline_config_is_named(tmp_path):
    rows = _rows(tmp_path, "a100", "models.target=some-org/unknown-model")
    assert rows["model target"].status.startswith(
        "FAIL: ModelError: some-org/unknown-model: no config offline"
    )
    assert rows["05_sft_lora"].failed


def test_a_missing_package_is_reported(tmp_path, monkeypatch):
    """bitsandbytes made to look uninstalled: the t4 profile needs it for 4-bit loading and paged AdamW."""
    import importlib.metadata

    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "bitsandbytes":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    status = _rows(tmp_path, "t4")["packages"].status
    assert status == (
        "FAIL: bitsandbytes is not installed (needed by hardware.load_in_4bit, "
        "sft.optim=paged_adamw_32bit: pip install -e '.[gpu]')"
    )
    assert not _rows(tmp_path, "a100", "sft.optim=adamw_torch")["packages"].failed


def test_lm_eval_arguments_are_checked_against_lm_evals_signatures():
    assert preflight.lm_eval_problem({"pretrained": "m", "dtype": "float16", "batch_size": 4}) is None
    problem = preflight.lm_eval_problem({"pretrained": "m", "quantization_config": object()})
    assert problem is not None and "'quantization_config'" in problem


def test_cli_preflight_prints_the_table_and_exits_nonzero_when_a_step_cannot_fit():
    result = run_cli(
        [
            "--profile",
            "a100",
            "--preflight",
            "--set",
            "sft.gradient_checkpointing=false",
            "--set",
            "dpo.gradient_checkpointing=false",
        ]
    )
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "preflight: 2 problem(s)"
    failed = [line.split(" | ")[0].lstrip("| ") for line in lines if "| FAIL: needs" in line]
    assert failed == ["05_sft_lora", "06_dpo"]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cpu_preflight_passes():
    """Slow on a cold model cache: the GGUF models are converted once, as the run's step 01 would."""
    out = io.StringIO()
    assert preflight.run(load_config("cpu"), out=out) == 0, out.getvalue()
