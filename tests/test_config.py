from pathlib import Path

import pytest
import yaml

from synthetic_instruction_tuner.config import PROFILES, load_config
from synthetic_instruction_tuner.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_loads(profile):
    cfg = load_config(profile)
    assert cfg.profile == profile
    assert cfg.counts.instructions >= cfg.counts.sft_target > 0
    assert cfg.hardware.compute_units_source


def test_recipe_holds_the_seed_hyperparameters():
    cfg = load_config("a100")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.05)
    assert cfg.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert (cfg.sft.num_train_epochs, cfg.sft.learning_rate, cfg.sft.warmup_ratio) == (3, 2e-4, 0.03)
    assert (cfg.sft.lr_scheduler_type, cfg.sft.max_grad_norm, cfg.sft.optim) == (
        "cosine",
        0.3,
        "paged_adamw_32bit",
    )
    assert (cfg.dpo.num_train_epochs, cfg.dpo.learning_rate, cfg.dpo.warmup_ratio) == (1, 5e-5, 0.1)


def test_gpu_batch_sizes_follow_the_seed():
    t4, a100 = load_config("t4"), load_config("a100")
    assert (t4.sft.per_device_train_batch_size, t4.sft.gradient_accumulation_steps) == (4, 4)
    assert (t4.dpo.per_device_train_batch_size, t4.dpo.gradient_accumulation_steps) == (2, 8)
    assert (a100.sft.per_device_train_batch_size, a100.sft.gradient_accumulation_steps) == (12, 2)
    assert (a100.dpo.per_device_train_batch_size, a100.dpo.gradient_accumulation_steps) == (8, 2)
    assert t4.hardware.load_in_4bit and not a100.hardware.load_in_4bit


def test_precedence_recipe_then_profile_then_command_line():
    recipe_only = load_config("a100").sft.max_steps
    profile = load_config("cpu")
    cpu_steps = yaml.safe_load((REPO / "configs" / "profiles" / "cpu.yaml").read_text())["sft"]["max_steps"]
    assert (
        recipe_only == -1 and profile.sft.max_steps == cpu_steps > 0
    )  # the cpu profile overrides the recipe
    cli = load_config("cpu", ["sft.max_steps=2", "sft.learning_rate=1e-4", "models.generator=tiny:chat-lm"])
    assert cli.sft.max_steps == 2 and cli.sft.learning_rate == 1e-4 and cli.models.generator == "tiny:chat-lm"
    assert cli.lora.r == 8  # untouched keys keep the recipe's value


def _write_configs(tmp_path: Path, profile_text: str) -> Path:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "recipe.yaml").write_text((REPO / "configs" / "recipe.yaml").read_text())
    (tmp_path / "profiles" / "mine.yaml").write_text(
        (REPO / "configs" / "profiles" / "smoke.yaml").read_text() + profile_text
    )
    return tmp_path


def test_unknown_key_names_file_and_key(tmp_path):
    cfg_dir = _write_configs(tmp_path, "\nsft:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config("mine", config_dir=cfg_dir)
    message = str(err.value)
    assert "mine.yaml" in message and "'sft.learning_rat'" in message and "\n" not in message


def test_wrong_type_names_file_and_key(tmp_path):
    cfg_dir = _write_configs(tmp_path, "\nengine:\n  batch_size: eight\n")
    with pytest.raises(ConfigError, match=r"mine\.yaml: key 'engine\.batch_size' expects int"):
        load_config("mine", config_dir=cfg_dir)


def test_bad_command_line_override():
    with pytest.raises(ConfigError, match=r"--set sft\.nope=1: unknown key 'sft\.nope'"):
        load_config("smoke", ["sft.nope=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config("smoke", ["sft.learning_rate"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config("smoke", ["preferences.scorer=vibes"])


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(ConfigError, match="available: a100, cpu, h100, smoke, t4"):
        load_config("tpu")


def test_scorer_needs_a_reward_model():
    with pytest.raises(ConfigError, match=r"models\.reward_model is not set"):
        load_config("smoke", ["models.reward_model=null", "preferences.scorer=reward_model"])


def test_sft_data_and_dpo_loss_settings_are_checked():
    with pytest.raises(ConfigError, match=r"sft_data\.backtranslation_share must be within"):
        load_config("smoke", ["sft_data.backtranslation_share=1.5"])
    with pytest.raises(ConfigError, match=r"sft_data\.repeat_share must be within"):
        load_config("smoke", ["sft_data.repeat_share=-0.1"])
    with pytest.raises(ConfigError, match=r"sft_data\.constraint_ids has unsupported id 'startend:nope'"):
        load_config(
            "smoke", ["sft_data.constraint_ids=[startend:nope,punctuation:no_comma,startend:quotation]"]
        )
    with pytest.raises(ConfigError, match=r"one weight per dpo\.loss_type"):
        load_config("smoke", ["dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1.0]"])
    cfg = load_config("smoke", ["dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1.0,0.5]"])
    assert cfg.dpo.loss_weights == [1.0, 0.5] and load_config("cpu").hardware.cpu_autocast in (
        "bfloat16",
        "none",
    )


def test_auto_generation_precision_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    import torch

    from synthetic_instruction_tuner.config import native_cpu_dtype

    cfg = load_config("cpu")
    assert cfg.hardware.generation_dtype == native_cpu_dtype()  # resolved: fingerprints see the real dtype
    assert cfg.hardware.dtype == native_cpu_dtype()  # the weights trained on, likewise
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert load_config("cpu").hardware.generation_dtype == "float32"
    assert load_config("cpu").hardware.dtype == "float32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert load_config("cpu").hardware.generation_dtype == "bfloat16"
    assert load_config("cpu").hardware.dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"hardware\.dtype auto is for CPU training"):
        load_config("t4", ["hardware.dtype=auto"])
    assert load_config("cpu", ["hardware.generation_dtype=bfloat16"]).hardware.generation_dtype == "bfloat16"


def test_dpo_loss_terms_reach_trl_and_cpu_autocast_reaches_the_trainer(tmp_path):
    from synthetic_instruction_tuner.training import dpo_config, sft_config

    cfg = load_config("smoke", ["dpo.loss_type=[sigmoid,sft]", "dpo.loss_weights=[1.0,0.5]"])
    args = dpo_config(cfg, tmp_path, "cpu")
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]
    assert sft_config(load_config("smoke", ["hardware.cpu_autocast=bfloat16"]), tmp_path, "cpu").bf16
    assert not sft_config(load_config("smoke", ["hardware.cpu_autocast=none"]), tmp_path, "cpu").bf16


def test_sft_evaluates_at_its_own_interval_or_at_every_checkpoint(tmp_path):
    from synthetic_instruction_tuner.training import sft_config

    args = sft_config(load_config("smoke", ["sft.save_steps=2", "sft.eval_steps=4"]), tmp_path, "cpu")
    assert (args.save_steps, args.eval_steps) == (2, 4)
    args = sft_config(load_config("smoke", ["sft.save_steps=2"]), tmp_path, "cpu")
    assert (args.save_steps, args.eval_steps) == (2, 2)
    cpu = load_config("cpu").sft
    assert cpu.eval_steps == cpu.max_steps  # the cpu profile evaluates once, at the end


def test_each_process_of_a_launched_evaluation_gets_a_document_of_every_task():
    """lm-eval's data-parallel mode fails in a process whose share of a subtask is empty."""
    with pytest.raises(ConfigError) as err:
        load_config("cpu", ["distributed.num_processes=2"])
    assert str(err.value).endswith(
        "configs/profiles/cpu.yaml: evaluation.mmlu_docs_per_subject is 1 but "
        "distributed.num_processes is 2: lm-eval's data-parallel mode needs at least one document per "
        "process in every task; set evaluation.mmlu_docs_per_subject=2 or more"
    )
    assert load_config("cpu", ["distributed.num_processes=2", "evaluation.mmlu_docs_per_subject=2"])
    assert load_config("smoke", ["distributed.num_processes=2"]).evaluation.mmlu_docs_per_subject == 2
