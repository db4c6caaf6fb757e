"""Steps 05, 05b, 06: LoRA SFT, prompt tuning and DPO on the base model, through TRL and PEFT.

The targets are base models with no chat template, so `chat_tokenizer` gives them one whose assistant
turns sit inside `{% generation %}` markers (TRL's `assistant_only_loss` masks everything else) and
end with the tokenizer's EOS *inside* the marked span, so the model is trained to emit it; EOS is what
lm-eval and `generate` stop on. The turn headers use the vocabulary's own turn tokens, but an answer
ends in EOS, not in the family's end-of-turn token: a base model was never trained to emit
`<end_of_turn>` or `<|eot_id|>`, and LoRA cannot move that token's frozen, tied embedding row, whereas
pretraining taught it where a text ends (after a complete reference answer Gemma-3-270M base ranks
`<end_of_turn>` 75,277th-262,017th of 262,144 tokens, `<eos>` 3rd-946th, median 8th; 12 answers).

Every method writes `adapters/<method>/` (adapter + tokenizer) and `metrics.json` (curves, final eval
loss, runtime, samples/s, parameter counts, peak memory, device); checkpoints under
`adapters/<method>/checkpoints/` let a killed run resume with `resume_from_checkpoint`.
"""

from __future__ import annotations

import functools
import json
import random
import resource
import time
from pathlib import Path
from typing import Any

from .config import Config
from .console import text_progress
from .distributed import is_main_process, per_process_batch, world_size
from .errors import PipelineError
from .models import (
    device_map,
    load_adapter,
    load_causal_lm,
    load_tokenizer,
    parameter_counts,
    quantization_config,
    resolve_model,
    torch_dtype,
)
from .store import RunPaths, read_jsonl, write_json
from .watchdog import trainer_callback

METHODS = ("sft_lora", "prompt_tuning", "dpo")

# Chat formats for base models, chosen by which turn tokens the vocabulary already has. Each closes
# the assistant turn with EOS inside {% generation %}, so the token that ends an answer carries loss.
_GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<start_of_turn>model\\n' }}{% generation %}{{ (message['content'] | trim) + eos_token }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}{{ '<start_of_turn>user\\n' + (message['content'] | trim) + "
    "'<end_of_turn>\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}"
    "{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ (message['content'] | trim) + eos_token }}"
    "{% endgeneration %}{% else %}{{ (message['content'] | trim) + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ (message['content'] | trim) + eos_token }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}{{ (message['content'] | trim) + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_PLAIN = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '### Assistant:\\n' }}{% generation %}{{ (message['content'] | trim) + eos_token }}{% endgeneration %}"
    "{{ '\\n\\n' }}{% else %}{{ '### User:\\n' + (message['content'] | trim) + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)
CHAT_FORMATS: tuple[tuple[str, tuple[str, ...], str, str], ...] = (
    # name, tokens the vocabulary must have, template, EOS for a tokenizer that has none
    ("gemma", ("<start_of_turn>", "<end_of_turn>"), _GEMMA, "<end_of_turn>"),
    ("llama3", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), _LLAMA3, "<|eot_id|>"),
    ("chatml", ("<|im_start|>", "<|im_end|>"), _CHATML, "<|im_end|>"),
)


def with_chat_format(tokenizer: Any) -> Any:
    """Give a base tokenizer a loss-marked chat template whose assistant turns end with its EOS.

    The format follows the turn tokens the vocabulary already has (Gemma, Llama-3, ChatML), so no
    embedding is added; a tokenizer with none of them gets a plain-text format. A tokenizer without
    an EOS gets the family's end-of-turn token as one.
    """
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template and "{% generation %}" in template:
        return tokenizer
    vocab = tokenizer.get_vocab()
    for _name, needed, fmt, fallback_eos in CHAT_FORMATS:
        if all(token in vocab for token in needed):
            tokenizer.chat_template = fmt
            tokenizer.eos_token = tokenizer.eos_token or fallback_eos
            break
    else:
        tokenizer.chat_template = _PLAIN
    if tokenizer.eos_token is None:
        raise PipelineError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token to end a turn with")
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        # a pad distinct from EOS, so padding is never mistaken for the end of a turn
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def chat_tokenizer(path: str | Path) -> Any:
    """The target's tokenizer, with the chat format of `with_chat_format`."""
    return with_chat_format(load_tokenizer(path, padding_side="right"))


def load_target(cfg: Config, device: str, gradient_checkpointing: bool | None = None) -> Any:
    """The base model to adapt, in the profile's precision (4-bit nf4 for QLoRA where set)."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(cfg.models.target).path
    kwargs: dict[str, Any] = {"dtype": torch_dtype(cfg.hardware.dtype)}
    if cfg.hardware.load_in_4bit:
        kwargs.update(
            quantization_config=quantization_config(cfg.hardware.dtype), device_map=device_map(device)
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if cfg.hardware.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        checkpointing = (
            cfg.sft.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        )
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    else:
        model.to(device)
    return model


def keep_trainable_fp32_under_fp16(trainer: Any) -> int:
    """Put a quantized model's trainable weights back in fp32 when training with fp16 mixed precision.

    TRL casts them to bf16 for QLoRA (sft_trainer.py / dpo_trainer.py, "When using QLoRA"), but fp16
    mixed precision (the T4, which has no bf16) unscales gradients with a GradScaler that expects fp32
    master weights, as peft's `prepare_model_for_kbit_training` leaves them. Returns how many tensors
    were cast. The cast is checked on CPU (tests/test_training.py); the GradScaler itself needs CUDA.
    """
    import torch

    if not (trainer.args.fp16 and getattr(trainer.model, "is_loaded_in_4bit", False)):
        return 0
    cast = [p for p in trainer.model.parameters() if p.requires_grad and p.dtype != torch.float32]
    for param in cast:
        param.data = param.data.float()
    return len(cast)


def heldout_ids(paths: RunPaths) -> set[str]:
    return {r["id"] for r in read_jsonl(paths.file("heldout.jsonl"), required=("id",))}


def _split(
    rows: list[dict[str, Any]], fraction: float, seed: int, what: str, key: str = "id"
) -> tuple[list, list]:
    """Train / eval rows, split by ``key`` so that rows sharing it (variants of one answer) stay on
    one side."""
    groups = list(dict.fromkeys(r[key] for r in rows))
    if len(groups) < 2:
        raise PipelineError(
            f"only {len(groups)} {what}: not enough to train and evaluate; raise the profile's counts"
        )
    n_eval = max(1, round(len(groups) * fraction))
    order = list(range(len(groups)))
    random.Random(f"{seed}:{what}").shuffle(order)
    eval_groups = {groups[i] for i in order[:n_eval]}
    return [r for r in rows if r[key] not in eval_groups], [r for r in rows if r[key] in eval_groups]


def sft_splits(paths: RunPaths, cfg: Config) -> tuple[Any, Any]:
    """Step 04's SFT mix (plain, back-translated and rejection-sampled rows; never a held-out
    prompt), split into train / eval (`sft.eval_fraction`)."""
    from datasets import Dataset

    excluded = heldout_ids(paths)
    rows = [
        {"messages": r["messages"], "id": r["id"], "record_id": r.get("record_id", r["id"])}
        for r in read_jsonl(paths.file("sft_train.jsonl"), ("id", "messages"))
        if r.get("record_id", r["id"]) not in excluded
    ]
    train, evaluation = _split(rows, cfg.sft.eval_fraction, cfg.seed, "sft rows", key="record_id")
    return Dataset.from_list(train), Dataset.from_list(evaluation)


def preference_splits(paths: RunPaths, cfg: Config) -> tuple[Any, Any]:
    from datasets import Dataset

    keys = ("id", "prompt", "chosen", "rejected")
    rows = [{k: r[k] for k in keys} for r in read_jsonl(paths.file("preferences.jsonl"), required=keys)]
    train, evaluation = _split(rows, cfg.dpo.eval_fraction, cfg.seed, "preference pairs")
    return Dataset.from_list(train), Dataset.from_list(evaluation)


def _precision(cfg: Config, device: str) -> dict[str, Any]:
    if device == "cpu":
        # accelerate runs the forward under torch.autocast("cpu", bfloat16); weights stay fp32
        return {"use_cpu": True, "bf16": cfg.hardware.cpu_autocast == "bfloat16", "fp16": False}
    return {"bf16": cfg.hardware.dtype == "bfloat16", "fp16": cfg.hardware.dtype == "float16"}


def _common_args(output_dir: Path, cfg: Config, device: str, section: Any) -> dict[str, Any]:
    # the recipe's batch is the global one: several processes split it (DDP, FSDP, DeepSpeed)
    per_device, accumulation = per_process_batch(
        section.per_device_train_batch_size, section.gradient_accumulation_steps, world_size()
    )
    return {
        "output_dir": str(output_dir / "checkpoints"),
        "num_train_epochs": section.num_train_epochs,
        "max_steps": section.max_steps,
        "learning_rate": section.learning_rate,
        "warmup_steps": section.warmup_ratio,  # a float below 1 is a ratio of the total steps
        "lr_scheduler_type": section.lr_scheduler_type,
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        "seed": cfg.seed,
        "data_seed": cfg.seed,
        "report_to": "none",
        "save_strategy": "steps",
        "save_total_limit": 2,
        "eval_strategy": "steps",
        "disable_tqdm": False,
        **_precision(cfg, device),
    }


def sft_config(cfg: Config, output_dir: Path, device: str, prompt_tuning: bool = False) -> Any:
    from trl import SFTConfig

    s = cfg.sft
    section = cfg.prompt_tuning if prompt_tuning else s
    args = _common_args(output_dir, cfg, device, section)
    return SFTConfig(
        **args,
        max_grad_norm=s.max_grad_norm,
        weight_decay=s.weight_decay,
        optim=s.optim,
        per_device_eval_batch_size=s.per_device_eval_batch_size,
        gradient_checkpointing=s.gradient_checkpointing,
        max_length=s.max_length,
        assistant_only_loss=True,
        # PEFT prepends the soft prompt to each row; a packed row would get one prompt for many examples
        padding_free=s.padding_free and not prompt_tuning,
        train_sampling_strategy="group_by_length" if s.group_by_length else "random",
        logging_steps=s.logging_steps,
        save_steps=s.save_steps,
        eval_steps=s.eval_steps or s.save_steps,
        prediction_loss_only=True,  # evaluation needs the loss, not (tokens x vocabulary) logits kept in memory
    )


ENTROPY_STRIDE = 8  # the dense LM head's logged entropy: the mean over every 8th labelled position


@functools.cache
def _label_log_prob() -> Any:
    """log_softmax(logits)[target] whose backward works in the logits' own buffer.

    Through autograd, log_softmax's output, the zero-filled gradient of `gather` and log_softmax's
    gradient are three (positions x 262k) fp32 tensors per step, each a fresh allocation that costs
    more in page faults than in arithmetic on a CPU. Here the forward keeps only the logits and their
    log-sum-exp, and the backward turns the logits into the gradient in place:
    d log p(t) / d z = onehot(t) - softmax(z). The logits must not be used after the backward.
    """
    import torch

    class LabelLogProb(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, logits: Any, targets: Any) -> Any:
            lse = logits.logsumexp(-1)
            ctx.save_for_backward(logits, lse, targets)
            return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse

        @staticmethod
        def backward(ctx: Any, grad: Any) -> tuple[Any, None]:
            logits, lse, targets = ctx.saved_tensors
            grad_logits = logits.sub_(lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
            return grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad.unsqueeze(-1)), None

    return LabelLogProb


def use_dense_lm_head(trainer: Any) -> None:
    """Swap TRL's fused LM head for a dense one that scores only the labelled positions.

    TRL's trainers ask the model for per-token log-probabilities with `fused_lm_head=True`, computed
    in vocabulary chunks so that the (tokens x vocabulary) logits never exist at once: right on a
    GPU. On a CPU that path scores every position, labelled or not, with chunked element-wise
    kernels that cost more than the model's matmuls (70% of an SFT step on Gemma-3-270M and its
    262k-token vocabulary; `bench sft`). With memory to spare, one projection of the labelled
    positions followed by their log-softmax at the labels (`_label_log_prob`) is 1.7x faster and
    gives the same numbers (tested). The
    fields TRL reads for its metrics (entropy, mean logit, top-1 match) are computed without gradient,
    the entropy on a sample of positions (ENTROPY_STRIDE).
    """
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    trl_forward = model.forward
    backbone = getattr(model, model.base_model_prefix)

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(
        *args: Any,
        fused_lm_head: bool = False,
        labels: Any = None,
        shift_labels: Any = None,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        if not fused_lm_head:
            return trl_forward(
                *args,
                labels=labels,
                shift_labels=shift_labels,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        kwargs["use_cache"] = False
        hidden = backbone(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        mask = labels != -100
        logits = model.get_output_embeddings()(hidden[mask]).float()
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        targets = labels[mask]
        with torch.no_grad():  # before the log-probabilities, whose backward reuses the logits' memory
            # TRL logs the mean entropy of the labelled positions; over a 262k vocabulary its exp and
            # product cost 12% of a CPU step, so every position gets the mean of every 8th position's
            sampled = logits[::ENTROPY_STRIDE].log_softmax(-1)
            entropy = -(sampled.exp().mul_(sampled)).sum(-1).mean()
            extra = {
                "entropy": entropy.expand(targets.shape).contiguous(),
                "mean_logits": logits.mean(-1),
                "is_top1": logits.argmax(-1) == targets,
            }
            extra = {k: v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in extra.items()}
        picked = _label_log_prob().apply(logits, targets)
        log_probs = hidden.new_zeros(mask.shape, dtype=picked.dtype).masked_scatter(mask, picked)
        tokens = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / tokens, log_probs=log_probs, label_mask=mask, **extra
        )

    model.forward = forward


def skip_adapter_input_casts(trainer: Any, cfg: Config, device: str) -> int:
    """Leave the inputs of LoRA's matmuls in bf16 when training on a CPU under bf16 autocast.

    PEFT casts each adapted layer's input to the adapter's dtype (fp32) and autocast casts it straight
    back to bf16 for the matmul: without LoRA dropout, two copies per layer and step, and their
    backward, that change no number (the same losses, tested) and cost 5% of a Gemma-3-270M SFT step
    on 2 cores. This sets PEFT's own switch for them (`cast_input_dtype_enabled`, which
    `peft.helpers.disable_input_dtype_casting` sets too). Returns how many layers were switched.
    """
    if device != "cpu" or cfg.hardware.cpu_autocast != "bfloat16" or cfg.lora.dropout:
        return 0  # LoRA's dropout would scale a bf16 input instead of an fp32 one
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in trainer.model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def lora_config(cfg: Config) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )


def prompt_tuning_config(cfg: Config, tokenizer_path: Path) -> Any:
    from peft import PromptTuningConfig, PromptTuningInit

    pt = cfg.prompt_tuning
    kwargs: dict[str, Any] = {"task_type": "CAUSAL_LM", "num_virtual_tokens": pt.num_virtual_tokens}
    if pt.init == "text":
        kwargs.update(
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=pt.init_text,
            tokenizer_name_or_path=str(tokenizer_path),
        )
    else:
        kwargs["prompt_tuning_init"] = PromptTuningInit.RANDOM
    return PromptTuningConfig(**kwargs)


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete checkpoint. The trainer writes trainer_state.json last and not atomically,
    so a checkpoint killed while being saved lacks it, or has it torn: it is passed over."""
    folder = output_dir / "checkpoints"
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else ():
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if path.name.removeprefix("checkpoint-").isdigit():
            found.append((int(path.name.removeprefix("checkpoint-")), str(path)))
    return max(found)[1] if found else None


def _peak_memory_mb(device: str) -> dict[str, float]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    gpu = 0.0
    if device == "cuda":
        import torch

        gpu = torch.cuda.max_memory_allocated() / 2**20
    return {"peak_rss_mb": round(rss, 1), "peak_gpu_mb": round(gpu, 1)}


def _curves(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    train = [{"step": h["step"], "loss": h["loss"]} for h in log_history if "loss" in h]
    evaluation = [
        {
            "step": h["step"],
            **{k[5:]: v for k, v in h.items() if k.startswith("eval_") and isinstance(v, float)},
        }
        for h in log_history
        if "eval_loss" in h
    ]
    return {"train": train, "eval": evaluation}


def _final_eval(trainer: Any) -> dict[str, float]:
    """The evaluation of the trained model: the one logged at the last step when there is one
    (max_steps a multiple of eval_steps), else a new one. Evaluating twice costs ~15 s on the cpu
    profile and gives the same numbers."""
    for entry in reversed(trainer.state.log_history):
        if entry.get("step") != trainer.state.global_step:
            break
        if "eval_loss" in entry:
            return {k: v for k, v in entry.items() if k.startswith("eval_")}
    return trainer.evaluate()


def _save(trainer: Any, output_dir: Path, tokenizer: Any) -> None:
    if is_main_process():
        trainer.model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)


def _metrics(
    method: str,
    trainer: Any,
    train_output: Any,
    final_eval: dict[str, float],
    started: float,
    resumed_from: str | None,
    device: str,
    cfg: Config,
    extra: dict[str, Any],
) -> dict[str, Any]:
    from .ledger import device_description

    runtime = time.time() - started
    counts = parameter_counts(trainer.model)
    return {
        "method": method,
        "base_model": cfg.models.target,
        "final_eval_loss": final_eval.get("eval_loss"),
        "final_eval": final_eval,
        "train_loss": train_output.training_loss,
        "curves": _curves(trainer.state.log_history),
        "global_step": trainer.state.global_step,
        "runtime_s": round(runtime, 1),
        "train_runtime_s": round(train_output.metrics.get("train_runtime", runtime), 1),
        "train_samples_per_second": train_output.metrics.get("train_samples_per_second"),
        "trainable_params": counts["trainable"],
        "total_params": counts["total"],
        "trainable_share": counts["trainable"] / counts["total"],
        "resumed_from_checkpoint": Path(resumed_from).name if resumed_from else None,
        "device": device_description(device),
        **_peak_memory_mb(device),
        **extra,
    }


def _equip(trainer: Any, cfg: Config, device: str) -> None:
    """Fit an SFT or DPO trainer to this run: precision fixes, LM head, heartbeat, progress lines."""
    keep_trainable_fp32_under_fp16(trainer)
    skip_adapter_input_casts(trainer, cfg, device)
    if cfg.hardware.dense_lm_head:
        use_dense_lm_head(trainer)
    trainer.add_callback(trainer_callback())  # the watchdog's heartbeat
    text_progress(trainer)


def _train_sft_like(method: str, cfg: Config, paths: RunPaths, device: str) -> dict[str, Any]:
    from trl import SFTTrainer

    started = time.time()
    output_dir = paths.adapters / method
    target_path = resolve_model(cfg.models.target).path
    tokenizer = chat_tokenizer(target_path)
    train, evaluation = sft_splits(paths, cfg)
    is_pt = method == "prompt_tuning"
    peft_config = prompt_tuning_config(cfg, target_path) if is_pt else lora_config(cfg)
    trainer = SFTTrainer(
        model=load_target(cfg, device),
        args=sft_config(cfg, output_dir, device, prompt_tuning=is_pt),
        train_dataset=train.remove_columns("id"),
        eval_dataset=evaluation.remove_columns("id"),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    _equip(trainer, cfg, device)
    resume = last_checkpoint(output_dir)
    base_file = output_dir / "base_eval.json"
    # every process decides before the first evaluation's collective, so none skips it
    base_eval = json.loads(base_file.read_text()) if base_file.exists() else None
    if base_eval is None:
        # before any update the LoRA adapter is the identity, so this is the untrained base's loss
        base_eval = trainer.evaluate() if not is_pt else {}
        if is_main_process():
            write_json(base_file, base_eval)
    train_output = trainer.train(resume_from_checkpoint=resume)
    final_eval = _final_eval(trainer)
    _save(trainer, output_dir, tokenizer)
    extra = {
        "train_rows": len(train),
        "eval_rows": len(evaluation),
        "base_eval_loss": base_eval.get("eval_loss"),
        "learning_rate": trainer.args.learning_rate,
        "effective_batch_size": trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size,
        "processes": trainer.args.world_size,
    }
    metrics = _metrics(method, trainer, train_output, final_eval, started, resume, device, cfg, extra)
    if is_main_process():
        write_json(output_dir / "metrics.json", metrics)  # last: marks the step complete
    return metrics


def train_sft_lora(cfg: Config, paths: RunPaths, device: str) -> dict[str, Any]:
    """Step 05: LoRA (the recipe's r, alpha, dropout, all projections) with loss on assistant tokens."""
    return _train_sft_like("sft_lora", cfg, paths, device)


def train_prompt_tuning(cfg: Config, paths: RunPaths, device: str) -> dict[str, Any]:
    """Step 05b: a soft prompt of `num_virtual_tokens`, same data and eval split as step 05."""
    return _train_sft_like("prompt_tuning", cfg, paths, device)


def dpo_config(cfg: Config, output_dir: Path, device: str) -> Any:
    from trl import DPOConfig

    d = cfg.dpo
    # A reward accuracy needs the reference and the policy on every held-out pair, so DPO is evaluated
    # once, after training (before training every implicit reward is 0).
    args = {**_common_args(output_dir, cfg, device, d), "eval_strategy": "no"}
    return DPOConfig(
        **args,
        beta=d.beta,
        loss_type=d.loss_type,
        loss_weights=d.loss_weights,
        max_length=d.max_length,
        max_grad_norm=cfg.sft.max_grad_norm,
        optim=cfg.sft.optim,
        per_device_eval_batch_size=d.per_device_train_batch_size,
        gradient_checkpointing=d.gradient_checkpointing,
        logging_steps=d.logging_steps,
        save_steps=d.save_steps,
    )


def train_dpo(cfg: Config, paths: RunPaths, device: str) -> dict[str, Any]:
    """Step 06: DPO on top of the SFT adapter; the SFT policy (a frozen copy of the adapter) is the reference."""
    from trl import DPOTrainer

    started = time.time()
    output_dir = paths.adapters / "dpo"
    sft_dir = paths.adapters / "sft_lora"
    if not (sft_dir / "adapter_config.json").exists():
        raise PipelineError(f"{sft_dir}: no SFT adapter; run step 05_sft_lora first")
    tokenizer = load_tokenizer(sft_dir, padding_side="right")
    train, evaluation = preference_splits(paths, cfg)
    base = load_target(cfg, device, gradient_checkpointing=cfg.dpo.gradient_checkpointing)
    model = load_adapter(base, sft_dir, trainable=True)
    trainer = DPOTrainer(
        model=model,
        args=dpo_config(cfg, output_dir, device),
        train_dataset=train.remove_columns("id"),
        eval_dataset=evaluation.remove_columns("id"),
        processing_class=tokenizer,
    )
    _equip(trainer, cfg, device)
    resume = last_checkpoint(output_dir)
    train_output = trainer.train(resume_from_checkpoint=resume)
    final_eval = trainer.evaluate()
    if is_main_process():
        model.save_pretrained(output_dir, selected_adapters=["default"])
        tokenizer.save_pretrained(output_dir)
    extra = {
        "train_pairs": len(train),
        "eval_pairs": len(evaluation),
        "beta": cfg.dpo.beta,
        "eval_reward_accuracy": final_eval.get("eval_rewards/accuracies"),
        "eval_reward_margin": final_eval.get("eval_rewards/margins"),
        "learning_rate": trainer.args.learning_rate,
        "effective_batch_size": trainer.args.per_device_train_batch_size
        * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size,
        "processes": trainer.args.world_size,
    }
    metrics = _metrics("dpo", trainer, train_output, final_eval, started, resume, device, cfg, extra)
    if is_main_process():
        write_json(output_dir / "metrics.json", metrics)
    return metrics


def load_for_generation(cfg: Config, paths: RunPaths, method: str, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) ready for `generate`, in the profile's inference precision: the base model,
    or the base plus a trained adapter.

    The base model gets the same chat format as the adapters so that every method sees identical prompts.
    """
    target = resolve_model(cfg.models.target).path
    base = load_causal_lm(target, cfg.hardware.generation_dtype, device, cfg.hardware.load_in_4bit)
    if method == "base":
        tokenizer = chat_tokenizer(target)
        model = base
    else:
        adapter = paths.adapters / method
        if not (adapter / "adapter_config.json").exists():
            raise PipelineError(f"{adapter}: no adapter; run the step that trains {method} first")
        tokenizer = load_tokenizer(adapter)
        model = load_adapter(base, adapter)
        if getattr(model.active_peft_config, "peft_type", None) == "LORA" and not cfg.hardware.load_in_4bit:
            # folded into the base weights: the same function without 7 extra matmuls per layer
            model = model.merge_and_unload()
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer
