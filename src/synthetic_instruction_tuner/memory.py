"""Peak accelerator memory of each step, estimated from a model's architecture without its weights.

A model's shape comes from its config: this project's model cache, the Hugging Face cache, or (for
the GPU profiles' Hub models) the architecture configs shipped in `model_configs/`. The model is
built on PyTorch's meta device, so parameter counts, the layers bitsandbytes quantizes and the LoRA
parameters PEFT adds are counted by the libraries themselves, exactly and without memory.

What an estimate counts (bytes; reported in GiB):

* **weights**: parameters x bytes of their dtype. 4-bit nf4 (bitsandbytes, double quantization)
  stores `NF4_BYTES_PER_PARAM` per parameter of the linear layers it converts; transformers keeps the
  embeddings, norms and the LM head in 16 bit, and PEFT's `prepare_model_for_kbit_training` (QLoRA)
  then casts those to fp32.
* **KV cache** of generation: 2 (K, V) x layers x KV heads x head size x bytes per token, for
  batch x (prompt + new tokens).
* **adapter + optimizer**: trainable parameters in fp32 (4 B), their gradients (4 B) and AdamW's two
  moments (8 B; 2 B for 8-bit optimizers); DPO adds TRL's frozen "ref" copy of the adapter.
* **activations** kept for the backward pass, per token and decoder layer (`activation_bytes`):
  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", sec. 4.1)
  count 34·h + 5·a·s bytes for a 16-bit GPT layer. Redone for these models: a gated MLP
  (gate, up, SiLU and product: 4 tensors of the intermediate size I), RMSNorm saving its fp32 input,
  PyTorch's SDPA attention (no s x s matrix is kept, so no s² term), no dropout in the base model,
  and LoRA dropout copying each adapted layer's input (plus a 1-byte mask): in 16 bit with LoRA on
  all seven projections, 38·h + 11·I bytes. With gradient checkpointing, each layer keeps only its
  input (h values per token) and one layer's full activations exist at a time during the backward.
* **LM head**: TRL's fused head scores tiles of 4,096 tokens x 32,768 vocabulary entries, so the
  (tokens x vocabulary) logits never exist; the cpu profile's dense head (`hardware.dense_lm_head`)
  does make them: logits, log-softmax and probabilities, fp32. lm-eval's log-likelihood requests do
  too: the model's logits and their log-softmax for batch x context tokens, 2 x the model's bytes.
* **CUDA context** (`CUDA_CONTEXT_GIB`), outside PyTorch's allocator.

The margin rule: a step fails when its estimate exceeds `MARGIN` (90%) of the device's memory, which
leaves room for the allocator's fragmentation and the estimate's own error.
"""

from __future__ import annotations

import functools
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelError

GIB = 2**30
MARGIN = 0.9
CUDA_CONTEXT_GIB = 0.5
# 4-bit codes, plus per block of 64 an 8-bit absmax, plus per 256 blocks an fp32 absmax (double quantization)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# Token counts the config does not fix. A chat template's headers and default system turn:
TEMPLATE_TOKENS = 64
# Up to three IFEval-style constraint sentences appended to a preference prompt:
CONSTRAINT_TOKENS = 128
# lm-eval's longest Hub request: MMLU's 5-shot prompts reach 14,626 characters (evalscope's MMLU
# statistics), about 3,500 Llama-3 tokens at ~4.2 characters per token; rounded up.
HUB_EVAL_TOKENS = 3584
REWARD_MAX_TOKENS = 2048  # preferences.RewardScorer truncates pairs here
FUSED_HEAD_TILE = 4096 * 32768  # TRL 1.16's fused LM head: tokens x vocabulary entries per tile

SHIPPED_CONFIGS = "model_configs"


def dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need to know about one model."""

    ref: str
    source: str  # where the config came from
    model_type: str
    causal: bool
    params: int  # unique parameters (tied embeddings counted once)
    quantized_params: int  # parameters in the linear layers bitsandbytes converts to 4 bit
    largest_linear: int  # parameters of the largest converted layer (de-quantized one at a time)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    config: Any = field(repr=False, compare=False)

    def describe(self) -> str:
        count = f"{self.params / 1e9:.2f}B" if self.params >= 1e9 else f"{self.params / 1e6:.1f}M"
        return f"{self.model_type}, {count} params, config from {self.source}"


def _shipped_config_dir(ref: str) -> Path | None:
    folder = importlib.resources.files(__package__) / SHIPPED_CONFIGS / ref.replace("/", "--")
    path = Path(str(folder))
    return path if (path / "config.json").exists() else None


def load_model_config(ref: str) -> tuple[Any, str]:
    """(transformers config, where it came from) for a model reference, without any download.

    Hub ids: this project's model cache, else the Hugging Face cache, else the configs shipped in
    `model_configs/`. Local checkpoints, `tiny:` and `gguf:` models resolve offline, as the run does.
    """
    from transformers import AutoConfig

    from . import models

    local = Path(ref).expanduser()
    if local.is_dir() and (local / "config.json").exists():
        return AutoConfig.from_pretrained(local), "the local checkpoint"
    kind = ref.partition(":")[0]
    if kind in ("tiny", "gguf"):
        return AutoConfig.from_pretrained(models.resolve_model(ref).path), "the model cache (built offline)"
    if "/" not in ref or ":" in ref:
        models.resolve_model(ref)  # raises the run's own error for a malformed reference
    cached = models.cache_dir() / "models" / models._slug(ref)
    if (cached / models._COMPLETE).exists():
        return AutoConfig.from_pretrained(cached), "the model cache"
    try:
        return AutoConfig.from_pretrained(ref, local_files_only=True), "the Hugging Face cache"
    except OSError:
        pass
    shipped = _shipped_config_dir(ref)
    if shipped is None:
        raise ModelError(
            f"{ref}: no config offline (not in the model cache, the Hugging Face cache or "
            f"{SHIPPED_CONFIGS}/); download it once, or add its config.json there"
        )
    return AutoConfig.from_pretrained(shipped), f"{SHIPPED_CONFIGS}/ (shipped)"


def skeleton(config: Any, causal: bool) -> Any:
    """The model built on the meta device: every module and parameter shape, no memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    with torch.device("meta"):
        return auto.from_config(config)


@functools.lru_cache(maxsize=16)
def model_shape(ref: str, causal: bool = True) -> ModelShape:
    """Shape of `ref` from its config and its meta-device skeleton."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert

    config, source = load_model_config(ref)
    model = skeleton(config, causal)
    params = sum(p.numel() for p in model.parameters())
    # the modules transformers' bitsandbytes integration leaves in 16 bit (LM head, tied, last module)
    keep = set(get_keys_to_not_convert(model))
    linear = [
        m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name not in keep
    ]
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        ref=ref,
        source=source,
        model_type=config.model_type,
        causal=causal,
        params=params,
        quantized_params=sum(linear),
        largest_linear=max(linear, default=0),
        hidden=text.hidden_size,
        intermediate=text.intermediate_size,
        layers=text.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=text.vocab_size,
        config=config,
    )


_TRAINABLE: dict[tuple[str, bool, str], int] = {}


def peft_trainable_params(shape: ModelShape, peft_config: Any) -> int:
    """Trainable parameters PEFT adds to `shape` for `peft_config`, counted by PEFT on a meta skeleton
    (which also checks that the target modules exist in this architecture)."""
    key = (shape.ref, shape.causal, repr(peft_config))
    if key not in _TRAINABLE:
        _TRAINABLE[key] = _count_trainable(shape, peft_config)
    return _TRAINABLE[key]


def _count_trainable(shape: ModelShape, peft_config: Any) -> int:
    import copy

    from peft import get_peft_model

    peft_config = copy.deepcopy(peft_config)
    if getattr(peft_config, "tokenizer_name_or_path", None):
        # a text-initialised soft prompt has the same size as a random one; no tokenizer is read
        from peft import PromptTuningInit

        peft_config.prompt_tuning_init = PromptTuningInit.RANDOM
    model = get_peft_model(skeleton(shape.config, shape.causal), peft_config)
    trainable, _total = model.get_nb_trainable_parameters()
    return int(trainable)


@dataclass
class Estimate:
    """Peak memory of one step as named parts, in bytes."""

    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def describe(self) -> str:
        shown = ", ".join(f"{name} {value / GIB:.1f}" for name, value in self.parts.items() if value)
        return f"{self.total_gib:.1f} ({shown})"


def weight_bytes(shape: ModelShape, dtype: str, four_bit: bool, kept_fp32: bool = False) -> float:
    """Parameters in `dtype`, or in 4-bit nf4 with the unconverted ones in 16 bit (fp32 after QLoRA's
    `prepare_model_for_kbit_training`)."""
    if not four_bit:
        return shape.params * dtype_bytes(dtype)
    kept = shape.params - shape.quantized_params
    return shape.quantized_params * NF4_BYTES_PER_PARAM + kept * (4 if kept_fp32 else dtype_bytes(dtype))


def kv_bytes_per_token(shape: ModelShape, dtype: str) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes(dtype)


def generation(
    shape: ModelShape, dtype: str, four_bit: bool, batch: int, prompt_tokens: int, new_tokens: int
) -> Estimate:
    """Batched sampling: weights, the KV cache of the whole batch, and the prefill's largest transients
    (one layer's activations, the last position's fp32 logits, a de-quantized 4-bit layer)."""
    b = dtype_bytes(dtype)
    prefill = batch * prompt_tokens * (4 * shape.hidden + 3 * shape.intermediate) * b
    logits = 2 * batch * shape.vocab * 4
    dequant = shape.largest_linear * b if four_bit else 0
    return Estimate(
        {
            "weights": weight_bytes(shape, dtype, four_bit),
            "KV cache": batch * (prompt_tokens + new_tokens) * kv_bytes_per_token(shape, dtype),
            "work": prefill + logits + dequant,
        }
    )


def reward_scoring(shape: ModelShape, dtype: str, batch: int, tokens: int) -> Estimate:
    """A sequence classifier's inference: weights plus one layer's activations. DeBERTa's disentangled
    attention materialises its content and position score matrices (3) and their softmax."""
    b = dtype_bytes(dtype)
    layer = batch * tokens * (6 * shape.hidden + 2 * shape.intermediate) * b
    scores = 4 * batch * shape.heads * tokens * tokens * b
    return Estimate({"weights": weight_bytes(shape, dtype, False), "work": layer + scores})


def activation_bytes(shape: ModelShape, residual_bytes: int, compute_bytes: int, lora: bool) -> float:
    """Activations one decoder layer keeps per token for the backward pass (see the module docstring)."""
    h, i = shape.hidden, shape.intermediate
    norms = 2 * 4 * h  # two RMSNorms, each saving its input upcast to fp32
    attention = h * residual_bytes + 4 * h * compute_bytes  # input; q, k, v (GQA repeated), output
    mlp = h * residual_bytes + 4 * i * compute_bytes  # input; gate, up, SiLU, product
    total = norms + attention + mlp
    if lora:  # dropout's copy of each adapted layer's input, and its 1-byte mask
        total += 6 * h * (residual_bytes + 1) + i * (compute_bytes + 1)
    return total


def optimizer_bytes_per_param(optim: str) -> int:
    """AdamW keeps two moments per trainable parameter: fp32, or 8-bit in bitsandbytes' 8-bit variants."""
    name = str(getattr(optim, "value", optim))
    return 2 if "8bit" in name else 8


def training(
    shape: ModelShape,
    *,
    weights: float,
    trainable: int,
    frozen_adapter: int,
    optim: str,
    tokens: int,
    checkpointing: bool,
    residual_bytes: int,
    compute_bytes: int,
    lora: bool,
    dense_lm_head: bool,
) -> Estimate:
    """One optimizer step of adapter training on `tokens` tokens (batch x padded length)."""
    per_layer = activation_bytes(shape, residual_bytes, compute_bytes, lora)
    if checkpointing:
        activations = shape.layers * tokens * shape.hidden * residual_bytes + tokens * per_layer
    else:
        activations = shape.layers * tokens * per_layer
    if dense_lm_head:  # logits, log-softmax and probabilities of every scored position, fp32
        head = 3 * tokens * shape.vocab * 4
    else:  # one fp32 tile, and the fp32 gradient of the final hidden states
        head = min(tokens, 4096) * min(shape.vocab, FUSED_HEAD_TILE // 4096) * 4 + tokens * shape.hidden * 4
    return Estimate(
        {
            "weights": weights,
            "adapter + optimizer": trainable * (4 + 4 + optimizer_bytes_per_param(optim))
            + frozen_adapter * 4,
            "activations": activations,
            "LM head": head,
        }
    )


def loglikelihood_eval(
    shape: ModelShape, dtype: str, four_bit: bool, batch: int, context_tokens: int, gen_tokens: int
) -> Estimate:
    """lm-eval: weights, then the larger of a log-likelihood batch's logits and log-softmax
    (batch x context x vocabulary, twice, in the model's precision) and a generation batch's KV cache."""
    b = dtype_bytes(dtype)
    logits = 2 * batch * context_tokens * shape.vocab * b
    kv = batch * (context_tokens + gen_tokens) * kv_bytes_per_token(shape, dtype)
    work = {"logits": logits} if logits >= kv else {"KV cache": kv}
    return Estimate({"weights": weight_bytes(shape, dtype, four_bit), **work})
