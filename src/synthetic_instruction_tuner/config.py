"""Typed configuration: the recipe (method) merged with a hardware profile and command-line overrides.

Precedence is recipe < profile < command line. Every layer is checked against the dataclasses below
before merging, so an unknown key or a wrong type is reported with the file (or `--set`) it came from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
PROFILES = ("smoke", "cpu", "t4", "a100", "h100")


@dataclass
class ModelsConfig:
    generator: str  # instruct model that writes instructions and responses
    target: str  # base model that is fine-tuned
    reward_model: str | None = None  # sequence-classification scorer for preference pairs


@dataclass
class HardwareConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # precision of the weights trained on (and of the reward model); auto, for CPU training: bfloat16
    # where the CPU computes it natively, else float32. A bf16 base spares autocast its cast of every
    # frozen weight at every step; LoRA's own weights stay fp32 (peft), so the update is unchanged
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    # generation and evaluation precision; auto: bfloat16 where the CPU computes it natively
    # (AVX512-BF16 or AMX: ~1.4x float32), else float32 (emulated bf16 is several times slower)
    generation_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    load_in_4bit: bool = False  # bitsandbytes nf4 for the generator and QLoRA for the target
    # training on a CPU: bf16 autocast ("bfloat16") or none ("none") over the weights in `dtype`
    # (LoRA's fp32 weights included); auto: bf16 autocast where the CPU computes bf16 natively
    cpu_autocast: Literal["auto", "none", "bfloat16"] = "none"
    torch_threads: int | None = None  # None: torch's default (all cores)
    dense_lm_head: bool = (
        False  # score labelled positions with one LM-head matmul instead of TRL's chunked kernel
    )
    device_memory_gb: float | None = (
        None  # one accelerator's memory in GiB, checked by --preflight (None: not checked)
    )
    compute_units_per_hour: float = 0.0  # billing rate of the machine (Colab compute units / hour)
    compute_units_source: str = ""  # where that rate comes from


@dataclass
class CountsConfig:
    instructions: int  # sanitised, distinct instructions written by step 01
    sft_target: int  # rows kept by step 03 (the seed: 1,500 generated -> 1,000 kept)
    preference_prompts: int  # prompts given to the temperature sweep in step 04
    heldout_prompts: int  # prompts set aside for evaluation, never trained on
    eval_ifbench: int = 0  # IFBench prompts evaluated offline (0 = all 294)


@dataclass
class EngineConfig:
    batch_size: int = 16  # prompts per generate() call; halved on timeout or OOM
    batch_timeout_s: float = 600.0  # a batch slower than this is abandoned and retried at half size
    top_k_sampling: bool = True  # sample among top-k candidates instead of multinomial over the vocabulary
    static_cache_max_new_tokens: int = 128  # preallocated KV cache for generations up to this long (0: never)
    show_progress: bool = True
    backend: Literal["transformers", "vllm"] = "transformers"  # vllm: its offline LLM.generate (GPU only)


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    max_new_tokens: int = 256


@dataclass
class MagpieConfig:
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=1.0))
    min_words: int = 3  # shorter outputs are not instructions
    max_words: int = 200  # longer outputs are run-on text, not a user query
    drop_truncated: bool = True  # an instruction cut at max_new_tokens is usually run-on text
    max_attempts_factor: float = 4.0  # give up after this many raw samples per wanted instruction


@dataclass
class ResponsesConfig:
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.9))
    system_prompt: str | None = None  # system turn used while generating (None: the template's default)


@dataclass
class FilteringConfig:
    min_instruction_words: int = 3
    max_instruction_words: int = 200
    min_response_words: int = 5
    max_response_words: int = 800
    drop_truncated: bool = True  # responses cut at max_new_tokens
    # a cut response is trimmed back to its last complete sentence and kept, instead of dropped
    trim_truncated: bool = False
    # a longer response is trimmed to the last sentence end within this many words (None: no limit),
    # so that training answers fit the evaluation's token budget
    trim_words: int | None = None
    language: str | None = "en"  # langdetect code the text must be in; None disables the check
    min_langdetect_words: int = 8  # shorter text is not judged: langdetect calls "Write a haiku." Estonian
    max_repeated_ngram_ratio: float = 0.3  # share of repeated word n-grams above which text is degenerate
    repetition_ngram: int = 3
    dedup_threshold: float = 0.7  # MinHash Jaccard similarity at which two instructions are duplicates
    dedup_num_perm: int = 128
    dedup_shingle: int = 3  # word shingle size for MinHash
    # instructions sharing a word n-gram this long with a benchmark prompt are removed (contamination.py:
    # 13-grams, GPT-3's, are longer than many one-line prompts; GPT-2 and PaLM used 8)
    contamination_ngram: int = 8


@dataclass
class PreferencesConfig:
    temperatures: list[float] = field(default_factory=lambda: [0.6, 0.8, 1.0, 1.2])
    samples_per_temperature: int = 1
    max_new_tokens: int = 256
    top_p: float = 1.0
    top_k: int = 50
    scorer: Literal["reward_model", "constraints", "both"] = "reward_model"
    reward_weight: float = 0.5  # weight of the (sigmoid of the) reward score when scorer is "both"
    constraint_share: float = 0.5  # share of prompts that get verifiable constraints
    min_constraints: int = 1
    max_constraints: int = 3
    constraint_ids: list[str] | None = None  # IFEval instruction ids to draw from (None: all supported)
    min_margin: float = 0.1  # pairs whose chosen-rejected score gap is below this are skipped
    reward_batch_size: int = 16
    # a constraint prompt whose samples all pass or all fail gets a pair by back-translation: two of
    # its samples and constraints the one meets and the other does not, in place of its own
    backtranslate_pairs: bool = True
    # ...and its chosen sample may have formats edited in (a title, a postscript, bullets...:
    # format_edits), which its rejected sample then lacks
    format_edits: bool = True


@dataclass
class SftDataConfig:
    """How step 04 turns SFT rows into constraint-carrying ones (data/sft_train.jsonl)."""

    # a constraint prompt of the sweep with a sample that passes every check trains on that sample
    rejection_sampling: bool = True
    # share of the other rows given 1-3 constraints their response already meets (back-translation)
    backtranslation_share: float = 0.5
    min_constraints: int = 1
    max_constraints: int = 3
    # back-translated rows may also get formats edited into their response (format_edits): the
    # generator's answers rarely carry a title, postscript, sections or highlights of their own
    format_edits: bool = True
    # rows per training answer: each beyond the first is another back-translation of it (other
    # constraints, other edits), so a small set shows each format more often than repeating rows would
    variants: int = 1
    # families SFT rows may carry (None: every supported one). Apart from the sweep's
    # preferences.constraint_ids, which keep to what the generator meets some of the time: an edit
    # or a derivation meets any family, so SFT can show all of IFEval's checkable ones
    constraint_ids: list[str] | None = None
    # share of back-translated rows whose answer first repeats the request, asked for in IFEval's
    # wording (combination:repeat_prompt: 41 of its 541 prompts)
    repeat_share: float = 0.0
    # share of back-translated rows' constraints worded in one of constraints.WORDINGS rather than
    # the registry's sentence: benchmark prompts word the same instruction many ways
    paraphrase_share: float = 0.0
    # share of repeat rows whose repeat-the-request sentence is worded in one of constraints.WORDINGS
    # (at least paraphrase_share; the row's other constraints keep that): IFEval words this
    # instruction in several ways, and a student taught one sentence answers that sentence only
    repeat_wording_share: float = 0.0


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class SftConfig:
    num_train_epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = 0.3
    weight_decay: float = 0.0
    optim: str = "adamw_torch"  # paged_adamw_32bit on GPU profiles (bitsandbytes)
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4
    per_device_eval_batch_size: int = 8
    gradient_checkpointing: bool = False
    max_length: int | None = 1024  # None: no truncation (required by padding_free)
    eval_fraction: float = 0.1  # share of the SFT set held out for eval loss
    logging_steps: int = 5
    save_steps: int = 50
    eval_steps: int | None = None  # None: evaluate at every checkpoint
    padding_free: bool = (
        False  # pack each batch into one row (no padding tokens), positions restart per example
    )
    group_by_length: bool = False  # batch examples of similar length together, so less padding is computed


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    init: Literal["text", "random"] = "text"
    init_text: str = "You are a helpful assistant. Answer the user's request accurately and concisely."
    learning_rate: float = 3e-2  # prompt tuning needs a far higher rate than LoRA (Lester et al., 2021)
    num_train_epochs: float = 3.0
    max_steps: int = -1
    warmup_ratio: float = 0.03
    lr_scheduler_type: str = "cosine"
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 4


@dataclass
class DpoConfig:
    beta: float = 0.1
    # TRL's loss terms and weights: ["sigmoid", "sft"] with [1.0, a] is RPO (DPO plus a times the NLL
    # of the chosen answer), which TRL 1.x expresses this way in place of the old rpo_alpha
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    learning_rate: float = 5e-5
    warmup_ratio: float = 0.1
    lr_scheduler_type: str = "cosine"
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 8
    max_length: int = 1024
    gradient_checkpointing: bool = False  # chosen + rejected double the rows per step: set apart from SFT's
    eval_fraction: float = 0.1  # share of pairs held out to measure reward accuracy
    logging_steps: int = 5
    save_steps: int = 50


@dataclass
class EvaluationConfig:
    mode: Literal["hub", "local"] = "hub"  # hub: lm-eval's Hub tasks; local: tasks defined in this repo
    # lm-eval's model type: hf (every method), or vllm (GPU, vllm installed): base, LoRA adapters and
    # teacher through lm-eval's own `vllm` model; prompt tuning, which vLLM cannot serve, stays on hf
    backend: Literal["hf", "vllm"] = "hf"
    hub_tasks: list[str] = field(default_factory=lambda: ["ifeval", "mmlu", "truthfulqa_mc2", "hellaswag"])
    mmlu_fewshot: int = 5
    local_tasks: list[str] = field(
        default_factory=lambda: ["sit_ifbench", "sit_heldout_ifeval", "sit_heldout_ppl"]
    )
    limit: int | None = None  # examples per task (None = all)
    batch_size: int = 8
    max_gen_toks: int = 512
    bootstrap_iters: int = 1000
    # lm-eval's own benchmarks run offline (local mode, offline_tasks.py): a seeded sample of this
    # many documents, MMLU's per subject; 0 = every document shipped (benchmark_data/SOURCE.md)
    ifeval_docs: int = 0
    mmlu_docs_per_subject: int = 0
    truthfulqa_docs: int = 0
    hellaswag_docs: int = 0
    # new tokens for lm-eval's generation benchmarks (ifeval), as lm-eval's gen_kwargs; None: the task's own
    benchmark_max_gen_toks: int | None = None
    # rows per forward for MMLU, TruthfulQA and HellaSwag, whose log-likelihoods hold a whole
    # (rows x tokens x vocabulary) tensor; None: batch_size
    loglikelihood_batch_size: int | None = None


@dataclass
class WatchdogConfig:
    stall_s: float = 600.0  # a step whose heartbeat is quiet this long is killed and restarted
    startup_s: float = (
        1800.0  # allowance before the first heartbeat and after a loading one (models, first batch)
    )
    max_restarts: int = 2  # restarts of a stalled step before the run stops


@dataclass
class DistributedConfig:
    num_processes: int = 1  # > 1: the heavy call of steps 01-07 runs under `accelerate launch`
    accelerate_config: str | None = None  # an accelerate config file (FSDP, DeepSpeed, several machines)
    vllm_tensor_parallel_size: int = 1  # engine.backend vllm: GPUs one vLLM engine spans


@dataclass
class Config:
    profile: str
    seed: int
    models: ModelsConfig
    hardware: HardwareConfig
    counts: CountsConfig
    engine: EngineConfig
    magpie: MagpieConfig
    responses: ResponsesConfig
    filtering: FilteringConfig
    preferences: PreferencesConfig
    lora: LoraConfig
    sft: SftConfig
    prompt_tuning: PromptTuningConfig
    dpo: DpoConfig
    evaluation: EvaluationConfig
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    sft_data: SftDataConfig = field(default_factory=SftDataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return `value` coerced to `tp` (int -> float only) or raise a ConfigError naming source and key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{source}: key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{source}: key '{key}' must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: key '{key}' expects a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_check_value(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: key '{key}' expects a mapping, got {value!r}")
        return _check_partial(value, tp, source, prefix=f"{key}.")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(
            f"{source}: key '{key}' expects {tp.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _check_partial(data: dict[str, Any], cls: type, source: str, prefix: str = "") -> dict[str, Any]:
    """Validate a (possibly partial) mapping against a dataclass; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    checked: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (known keys here: {', '.join(known)})")
        checked[key] = _check_value(value, hints[key], f"{prefix}{key}", source)
    return checked


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _build(cls: type, data: dict[str, Any], prefix: str, sources: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in data:
            value = data[f.name]
            if dataclasses.is_dataclass(tp):
                value = _build(tp, value, f"{prefix}{f.name}.", sources)
            kwargs[f.name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(tp):
                kwargs[f.name] = _build(tp, {}, f"{prefix}{f.name}.", sources)
            else:
                raise ConfigError(f"missing required key '{prefix}{f.name}' (set it in {sources})")
    return cls(**kwargs)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `section.key=value` (value read as YAML) into a key path and a value."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set sft.learning_rate=1e-4")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _nest(path: list[str], value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for part in reversed(path[:-1]):
        out = {part: out}
    return out


def load_config(
    profile: str = "cpu",
    overrides: list[str] | tuple[str, ...] = (),
    config_dir: Path | str | None = None,
) -> Config:
    """Load configs/recipe.yaml, merge configs/profiles/<profile>.yaml (or a profile file's path) and
    `KEY=VALUE` overrides."""
    config_dir = Path(config_dir) if config_dir else CONFIG_DIR
    recipe_path = config_dir / "recipe.yaml"
    profile_path = config_dir / "profiles" / f"{profile}.yaml"
    if profile.endswith((".yaml", ".yml")):  # a profile file of the user's own
        profile_path = Path(profile).expanduser()
        if not profile_path.exists():
            raise ConfigError(f"profile file {profile_path} does not exist")
        profile = profile_path.stem
    elif not profile_path.exists():
        available = sorted(p.stem for p in (config_dir / "profiles").glob("*.yaml"))
        raise ConfigError(
            f"unknown profile {profile!r}: no {profile_path} (available: {', '.join(available)})"
        )
    layers = [
        (_read_yaml(recipe_path), str(recipe_path)),
        (_read_yaml(profile_path), str(profile_path)),
    ]
    for text in overrides:
        path, value = parse_override(text)
        layers.append((_nest(path, value), f"--set {text}"))
    merged: dict[str, Any] = {}
    for data, source in layers:
        merged = _deep_merge(merged, _check_partial(data, Config, source))
    merged["profile"] = profile
    config = _build(Config, merged, "", f"{recipe_path} or {profile_path}")
    _check_consistency(config, str(profile_path))
    if config.hardware.generation_dtype == "auto":
        config.hardware.generation_dtype = native_cpu_dtype()
    if config.hardware.dtype == "auto":
        config.hardware.dtype = native_cpu_dtype()
    if config.hardware.cpu_autocast == "auto":
        config.hardware.cpu_autocast = "bfloat16" if native_cpu_dtype() == "bfloat16" else "none"
    return config


def native_cpu_dtype() -> str:
    """bfloat16 on CPUs with native bf16 arithmetic (AVX512-BF16, AMX), else float32."""
    import torch

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bfloat16" if native else "float32"


def _check_ids(ids: list[str] | None, key: str, max_constraints: int, source: str) -> None:
    if ids is None:
        return
    from .constraints import SUPPORTED_IDS

    unknown = [i for i in ids if i not in SUPPORTED_IDS]
    if unknown:
        raise ConfigError(f"{source}: {key} has unsupported id {unknown[0]!r}")
    if len(ids) < max_constraints:
        raise ConfigError(f"{source}: {key} has fewer ids than max_constraints")


def _check_consistency(cfg: Config, source: str) -> None:
    p = cfg.preferences
    if p.scorer in ("reward_model", "both") and not cfg.models.reward_model:
        raise ConfigError(f"{source}: preferences.scorer is {p.scorer!r} but models.reward_model is not set")
    if not 0 <= p.constraint_share <= 1:
        raise ConfigError(f"{source}: preferences.constraint_share must be within [0, 1]")
    if p.min_constraints > p.max_constraints:
        raise ConfigError(f"{source}: preferences.min_constraints exceeds preferences.max_constraints")
    _check_ids(p.constraint_ids, "preferences.constraint_ids", p.max_constraints, source)
    if cfg.filtering.contamination_ngram < 1:
        raise ConfigError(f"{source}: filtering.contamination_ngram must be at least 1")
    d = cfg.sft_data
    for share in ("backtranslation_share", "repeat_share", "paraphrase_share", "repeat_wording_share"):
        if not 0 <= getattr(d, share) <= 1:
            raise ConfigError(f"{source}: sft_data.{share} must be within [0, 1]")
    if d.variants < 1:
        raise ConfigError(f"{source}: sft_data.variants must be at least 1")
    _check_ids(d.constraint_ids, "sft_data.constraint_ids", d.max_constraints, source)
    if not 1 <= d.min_constraints <= d.max_constraints:
        raise ConfigError(f"{source}: sft_data needs 1 <= min_constraints <= max_constraints")
    if len(cfg.dpo.loss_weights or cfg.dpo.loss_type) != len(cfg.dpo.loss_type):
        raise ConfigError(f"{source}: dpo.loss_weights needs one weight per dpo.loss_type entry")
    if cfg.counts.sft_target > cfg.counts.instructions:
        raise ConfigError(f"{source}: counts.sft_target exceeds counts.instructions")
    if cfg.hardware.dtype == "auto" and cfg.hardware.device != "cpu":
        raise ConfigError(f"{source}: hardware.dtype auto is for CPU training: set hardware.device: cpu")
    if cfg.engine.batch_size < 1:
        raise ConfigError(f"{source}: engine.batch_size must be at least 1")
    if cfg.distributed.num_processes < 1:
        raise ConfigError(f"{source}: distributed.num_processes must be at least 1")
    _check_documents_per_process(cfg, source)
    w = cfg.watchdog
    if w.stall_s <= 0 or w.startup_s <= 0:
        raise ConfigError(f"{source}: watchdog.stall_s and watchdog.startup_s must be positive seconds")
    if w.max_restarts < 0:
        raise ConfigError(f"{source}: watchdog.max_restarts must be 0 or more")


def _check_documents_per_process(cfg: Config, source: str) -> None:
    """lm-eval's data-parallel mode gives each process a share of every task's documents and fails in
    a process whose share is empty, so each (sub)task needs at least one document per process."""
    n, e = cfg.distributed.num_processes, cfg.evaluation
    sizes = {"evaluation.limit": e.limit}
    if e.mode == "local" and "mmlu" in e.local_tasks:
        sizes["evaluation.mmlu_docs_per_subject"] = e.mmlu_docs_per_subject
    for key, size in sizes.items():
        if size and 0 < size < n:
            raise ConfigError(
                f"{source}: {key} is {size} but distributed.num_processes is {n}: lm-eval's data-parallel "
                f"mode needs at least one document per process in every task; set {key}={n} or more"
            )
