"""Steps 05, 05b, 06 on the smoke profile: chat format, adapters, metrics, resume, stopping."""

import json
import shutil

import pytest
from conftest import kill_when, lora_sft_trainer, run_cli, template_tokenizer

from synthetic_instruction_tuner.config import load_config
from synthetic_instruction_tuner.generation import GenerationEngine, Request, chat_prompt_ids
from synthetic_instruction_tuner.store import run_paths, write_jsonl
from synthetic_instruction_tuner.training import load_for_generation, with_chat_format

MESSAGES = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
]


@pytest.mark.parametrize(
    ("family", "end_of_turn"),
    [("gemma", "<eos>"), ("llama3", "<|eot_id|>"), ("qwen2_5", "<|im_end|>")],
)
def test_base_tokenizer_gets_a_loss_marked_chat_format(family, end_of_turn):
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    tokenizer = template_tokenizer(family)
    tokenizer.chat_template = None  # a base model's tokenizer
    tokenizer = with_chat_format(tokenizer)
    assert tokenizer.eos_token == end_of_turn
    out = tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    trained = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert (
        tokenizer.decode(trained) == "Hello! How can I help?" + end_of_turn
    )  # the answer and its end, nothing else
    assert is_chat_template_stop_token_trained(tokenizer)
    prompt = tokenizer.apply_chat_template(MESSAGES[:1], tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(MESSAGES, tokenize=False).startswith(prompt)


def test_each_method_writes_adapter_and_metrics(smoke_run):
    run, _ = smoke_run
    for method, trainable in (("sft_lora", 16384), ("prompt_tuning", 4 * 64), ("dpo", 16384)):
        folder = run / "adapters" / method
        assert (folder / "adapter_config.json").exists() and (folder / "adapter_model.safetensors").exists()
        assert (folder / "chat_template.jinja").exists() or "chat_template" in (
            folder / "tokenizer_config.json"
        ).read_text()
        metrics = json.loads((folder / "metrics.json").read_text())
        # LoRA r=8 on q/k/v/o/gate/up/down of a 2-layer, 64-wide model; prompt tuning: 4 virtual tokens x 64
        assert metrics["trainable_params"] == trainable
        assert metrics["total_params"] > metrics["trainable_params"]
        assert metrics["curves"]["train"] and metrics["curves"]["eval"]
        for key in ("final_eval_loss", "runtime_s", "train_samples_per_second", "peak_rss_mb", "device"):
            assert metrics[key] is not None, key
    sft = json.loads((run / "adapters/sft_lora/metrics.json").read_text())
    assert sft["base_eval_loss"] > 0 and sft["global_step"] == load_config("smoke").sft.max_steps
    # evaluated every save_steps (2 of 4), and the last of those is the final evaluation, not a rerun
    assert [e["step"] for e in sft["curves"]["eval"]] == [2, 4]
    assert sft["final_eval_loss"] == sft["curves"]["eval"][-1]["loss"]
    dpo = json.loads((run / "adapters/dpo/metrics.json").read_text())
    assert 0.0 <= dpo["eval_reward_accuracy"] <= 1.0 and "eval_reward_margin" in dpo


@pytest.mark.parametrize("method", ["base", "sft_lora", "prompt_tuning", "dpo"])
def test_every_method_loads_back_for_generation(smoke_run, method):
    run, _ = smoke_run
    cfg = load_config("smoke")
    model, tokenizer = load_for_generation(cfg, run_paths(run), method, "cpu")
    engine = GenerationEngine(model, tokenizer, batch_size=2, show_progress=False)
    sampling = cfg.responses.sampling
    requests = [
        Request(f"r{i}", chat_prompt_ids(tokenizer, [{"role": "user", "content": t}]), sampling)
        for i, t in enumerate(["Name a fruit.", "Say hi."])
    ]
    done = list(engine.stream(requests))
    assert sum(len(batch) for batch in done) == 2


def test_kill_during_sft_resumes_from_the_last_checkpoint(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run[0] / "data", run / "data")
    args = [
        "--profile",
        "smoke",
        "--run-dir",
        str(run),
        "--steps",
        "05",
        "--set",
        "sft.max_steps=24",
        "--set",
        "sft.save_steps=4",
        "--set",
        "sft.per_device_train_batch_size=1",
    ]
    # killed once checkpoint 8 is saved (its trainer_state.json is written last): resume passes over
    # a checkpoint killed while being saved
    kill_when(args, run / "adapters/sft_lora/checkpoints/checkpoint-8/trainer_state.json", 1, timeout=600)
    assert not (run / "adapters/sft_lora/metrics.json").exists()
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run / "adapters/sft_lora/metrics.json").read_text())
    resumed = metrics["resumed_from_checkpoint"]
    assert resumed is not None and int(resumed.split("-")[1]) >= 8  # not from scratch
    assert metrics["global_step"] == 24


def test_tuned_model_learns_to_stop_at_the_end_of_turn(tmp_path):
    """SFT on answers that all end right away: the tuned model must emit the end-of-turn token itself."""
    run = run_paths(tmp_path / "run")
    rows = [
        {
            "id": f"r{i}",
            "instruction": f"Question number {i}?",
            "response": "Fine.",
            "messages": [
                {"role": "user", "content": f"Question number {i}?"},
                {"role": "assistant", "content": "Fine."},
            ],
        }
        for i in range(24)
    ]
    write_jsonl(run.file("sft_train.jsonl"), rows)
    write_jsonl(run.file("heldout.jsonl"), [{"id": "r0"}])
    overrides = [
        "sft.max_steps=60",
        "sft.learning_rate=0.01",
        "sft.warmup_ratio=0.0",
        "sft.save_steps=1000",
        "sft.per_device_train_batch_size=8",
    ]
    result = run_cli(
        [
            "--profile",
            "smoke",
            "--run-dir",
            str(run.root),
            "--steps",
            "05",
            *[a for o in overrides for a in ("--set", o)],
        ]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    cfg = load_config("smoke", overrides)
    model, tokenizer = load_for_generation(cfg, run, "sft_lora", "cpu")
    # stop on EOS alone: the answer must end with the token the chat format trains, not any role token
    engine = GenerationEngine(
        model, tokenizer, batch_size=4, show_progress=False, stop_ids=[tokenizer.eos_token_id]
    )
    greedy = cfg.responses.sampling.__class__(temperature=0.0, max_new_tokens=12)
    requests = [
        Request(
            f"q{i}",
            chat_prompt_ids(tokenizer, [{"role": "user", "content": f"Question number {i}?"}]),
            greedy,
        )
        for i in range(100, 104)
    ]
    completions = [c for batch in engine.stream(requests) for _, c in batch]
    assert all(c.finish_reason == "stop" for c in completions)
    assert all(c.text.strip() == "Fine." for c in completions)


def test_packed_batches_and_the_dense_lm_head_match_trls_padded_fused_loss(smoke_run, tmp_path):
    """Packing a batch into one row must not let examples attend to each other, and the dense LM head
    must give TRL's fused loss: the same number, four ways."""
    from trl import SFTTrainer

    from synthetic_instruction_tuner.models import resolve_model
    from synthetic_instruction_tuner.training import (
        chat_tokenizer,
        load_target,
        lora_config,
        sft_config,
        sft_splits,
        use_dense_lm_head,
    )

    run = run_paths(smoke_run[0])
    losses = {}
    for packed in (False, True):
        for fused in (False, True):
            cfg = load_config("smoke", [f"sft.padding_free={str(packed).lower()}", "sft.max_length=null"])
            train, _ = sft_splits(run, cfg)
            trainer = SFTTrainer(
                model=load_target(cfg, "cpu"),
                args=sft_config(cfg, tmp_path / f"{packed}{fused}", "cpu"),
                train_dataset=train.remove_columns("id"),
                eval_dataset=train.remove_columns("id"),
                processing_class=chat_tokenizer(resolve_model(cfg.models.target).path),
                peft_config=lora_config(cfg),
            )
            if not fused:
                use_dense_lm_head(trainer)
            losses[packed, fused] = trainer.evaluate()["eval_loss"]
    reference = losses[False, True]  # TRL's default: padded batches, fused LM head
    assert all(value == pytest.approx(reference, rel=1e-4) for value in losses.values()), losses


def test_lora_is_merged_for_generation_with_the_same_logits(smoke_run):
    import torch

    from synthetic_instruction_tuner.models import load_adapter, load_causal_lm, resolve_model

    run, _ = smoke_run
    cfg = load_config("smoke")
    merged, tokenizer = load_for_generation(cfg, run_paths(run), "sft_lora", "cpu")
    assert not hasattr(merged, "peft_config")  # a plain model: no LoRA matmuls left at inference
    base = load_causal_lm(resolve_model(cfg.models.target).path, cfg.hardware.generation_dtype, "cpu")
    adapted = load_adapter(base, run / "adapters/sft_lora").eval()
    ids = torch.tensor([chat_prompt_ids(tokenizer, [{"role": "user", "content": "Name a fruit."}])])
    with torch.inference_mode():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_bf16_base_trains_fp32_lora_weights(smoke_run, tmp_path):
    """`hardware.dtype: bfloat16` on a CPU: the frozen base is held in bf16, the adapter's weights
    stay fp32 (peft upcasts them) and are what the optimizer moves."""
    import torch

    overrides = [
        "hardware.dtype=bfloat16",
        "hardware.cpu_autocast=bfloat16",
        "sft.max_steps=2",
        "sft.warmup_ratio=0",
    ]
    trainer = lora_sft_trainer(load_config("smoke", overrides), smoke_run[0], tmp_path)
    trainable = {n: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    frozen = [p for p in trainer.model.parameters() if not p.requires_grad]
    assert trainable and {p.dtype for p in trainable.values()} == {torch.float32}
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in trainable.items() if "lora_B" in n}
    trainer.train()
    assert any(not torch.equal(before[n], trainable[n].detach()) for n in before)  # lora_B starts at 0


def test_lora_inputs_stay_bf16_under_cpu_autocast_with_the_same_losses(smoke_run, tmp_path):
    """Skipping PEFT's fp32 cast of each adapted layer's input changes no number under bf16 autocast
    without LoRA dropout (the matmul casts it back to bf16), and is left alone otherwise."""
    from synthetic_instruction_tuner.training import skip_adapter_input_casts

    overrides = ["hardware.dtype=bfloat16", "hardware.cpu_autocast=bfloat16", "sft.max_steps=3"]
    overrides += ["sft.warmup_ratio=0", "sft.logging_steps=1", "sft.eval_steps=3", "lora.dropout=0"]
    cfg = load_config("smoke", overrides)
    runs = {}
    for skip in (False, True):
        trainer = lora_sft_trainer(cfg, smoke_run[0], tmp_path / str(skip))
        if skip:
            switched = skip_adapter_input_casts(trainer, cfg, "cpu")
            assert switched == len(cfg.lora.target_modules) * trainer.model.config.num_hidden_layers
        trainer.train()
        runs[skip] = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        runs[skip].append(trainer.evaluate()["eval_loss"])
    assert len(runs[False]) == 4 and runs[True] == runs[False]
    for other in ("hardware.cpu_autocast=none", "lora.dropout=0.05"):
        left = load_config("smoke", [*overrides, other])
        assert (
            skip_adapter_input_casts(lora_sft_trainer(left, smoke_run[0], tmp_path / other), left, "cpu") == 0
        )


def test_dense_lm_head_matches_full_logits_and_logs_the_sampled_entropy(smoke_run, tmp_path):
    import torch

    from synthetic_instruction_tuner.training import ENTROPY_STRIDE, use_dense_lm_head

    cfg = load_config("smoke", ["sft.padding_free=false", "sft.max_length=null"])
    trainer = lora_sft_trainer(cfg, smoke_run[0], tmp_path)
    use_dense_lm_head(trainer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.get_base_model()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        dense = model(**inputs, labels=batch["labels"], fused_lm_head=True)
        logits = model(**inputs).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    log_softmax = logits.log_softmax(-1)[mask]
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    assert mask.sum() > 2 * ENTROPY_STRIDE
    torch.testing.assert_close(dense.log_probs[mask], log_softmax.gather(-1, labels[mask][:, None])[:, 0])
    assert torch.equal(dense.is_top1[mask], log_softmax.argmax(-1) == labels[mask])
    sampled = entropy[::ENTROPY_STRIDE].mean()
    torch.testing.assert_close(dense.entropy[mask], sampled.expand(int(mask.sum())))
    assert not torch.allclose(sampled, entropy.mean(), rtol=1e-6)  # a sample, not every position


def test_label_log_probs_match_autograds_log_softmax_in_value_and_gradient():
    """The dense LM head's log p(label): forward and backward as log_softmax + gather give them."""
    import torch

    from synthetic_instruction_tuner.training import _label_log_prob

    torch.manual_seed(0)
    logits = torch.randn(6, 50, dtype=torch.float64)
    targets = torch.tensor([0, 3, 3, 49, 7, 20])
    weights = torch.randn(6, dtype=torch.float64)  # a loss that weighs positions differently
    expected_in = logits.clone().requires_grad_()
    expected = expected_in.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    (expected * weights).sum().backward()
    ours_in = logits.clone().requires_grad_()
    ours = _label_log_prob().apply(ours_in * 1, targets)  # a non-leaf, as the LM head's output is
    (ours * weights).sum().backward()
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(ours_in.grad, expected_in.grad)
