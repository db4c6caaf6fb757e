"""Step 04: preference pairs from a temperature sweep, scored by a reward model and/or constraints.

1. A held-out prompt split is set aside first (never trained on); every held-out prompt carries
   1–3 verifiable constraints so it doubles as an IFEval-style evaluation set.
2. Each remaining prompt is sampled at every temperature of the sweep. A share of prompts first get
   IFEval constraints appended (deterministic per prompt id).
3. Each sample is scored:
   * `reward_model`: the reward model's logit 0 on the (question, answer) text pair, read through
     its own tokenizer (OpenAssistant's DeBERTa-v3 reward models are used exactly so);
   * `constraints`: the fraction of the prompt's constraints satisfied (lm-eval's IFEval checkers);
   * `both`: `w * sigmoid(reward) + (1 - w) * fraction`, with w = `preferences.reward_weight`; prompts
     without constraints fall back to sigmoid(reward). The sigmoid puts the unbounded reward on the
     same [0, 1] scale as the fraction, so `w` is a real trade-off weight and one margin fits both.
4. Chosen = best, rejected = worst. Ties and margins under `preferences.min_margin` are skipped and
   counted. Output: TRL's conversational `prompt`/`chosen`/`rejected` plus the scores behind them.

Samples and scores are appended as they are produced, so a killed step resumes without redoing work.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import asdict
from typing import Any

from . import backtranslation as bt
from . import constraints as ic
from . import format_edits as fe
from .config import Config, SamplingConfig
from .distributed import clear_shards, generate, is_main_process, output, shard_dir
from .errors import PipelineError
from .generation import Completion, GenerationEngine, Request, chat_prompt_ids
from .responses import generation_messages, user_turn
from .store import JsonlAppender, RunPaths, check_resumable, read_jsonl, write_json, write_jsonl
from .watchdog import beat

# none_pass / all_pass: a constraint prompt needs a sample that passes every check and one that fails
SKIP_REASONS = ("tie", "small_margin", "unscored", "too_few_samples", "none_pass", "all_pass")
SFT_SOURCES = ("rejection_sampling", "back_translation", "plain")


def _rng(seed: int, *parts: object) -> random.Random:
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def split_heldout(records: list[dict[str, Any]], n: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random split: `n` held-out records and the rest, both in input order."""
    if n >= len(records):
        raise PipelineError(f"counts.heldout_prompts={n} leaves no training prompts out of {len(records)}")
    chosen = set(_rng(seed, "heldout").sample(range(len(records)), n))
    heldout = [r for i, r in enumerate(records) if i in chosen]
    return heldout, [r for i, r in enumerate(records) if i not in chosen]


def constraints_for(prompt_id: str, cfg: Config, always: bool = False) -> list[ic.Constraint]:
    """The constraints a prompt gets (deterministic per prompt id); empty for prompts outside the share."""
    p = cfg.preferences
    rng = _rng(cfg.seed, "constraints", prompt_id)
    if not always and rng.random() >= p.constraint_share:
        return []
    return ic.sample_constraints(rng, rng.randint(p.min_constraints, p.max_constraints), p.constraint_ids)


def _serialise(constraints: list[ic.Constraint]) -> list[dict[str, Any]]:
    return [{"instruction_id": c.instruction_id, "kwargs": c.kwargs} for c in constraints]


def heldout_records(heldout: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """Held-out prompts in google/IFEval's schema (key, prompt, instruction_id_list, kwargs), plus the
    original instruction and its reference response for loss/perplexity."""
    out = []
    for key, record in enumerate(heldout):
        cons = constraints_for(record["id"], cfg, always=True)
        prompt = ic.add_constraints(record["instruction"], cons)
        out.append(
            {
                "id": record["id"],
                **ic.to_ifeval_record(key, prompt, cons),
                "instruction": record["instruction"],
                "response": record["response"],
            }
        )
    return out


def sweep_requests(prompts: list[dict[str, Any]], cfg: Config, tokenizer: Any) -> list[Request]:
    """One request per prompt, temperature and repeat. The id carries a hash of the prompt text, so a
    rerun after upstream changes reuses exactly the samples whose prompt is unchanged."""
    p = cfg.preferences
    requests = []
    for prompt in prompts:
        ids = chat_prompt_ids(tokenizer, generation_messages(prompt["prompt"], cfg.responses.system_prompt))
        digest = hashlib.sha1(prompt["prompt"].encode()).hexdigest()[:8]
        for temperature in p.temperatures:
            sampling = SamplingConfig(
                temperature=temperature, top_p=p.top_p, top_k=p.top_k, max_new_tokens=p.max_new_tokens
            )
            for k in range(p.samples_per_temperature):
                request_id = f"{prompt['id']}|{digest}|t{temperature:g}|{k}"
                requests.append(Request(request_id, ids, sampling, {"prompt_id": prompt["id"]}))
    return requests


class RewardScorer:
    """A sequence-classification reward model scoring (question, answer) pairs, batched by length."""

    def __init__(self, ref: str, dtype: str, device: str, batch_size: int) -> None:
        from .models import load_reward_model, load_tokenizer, resolve_model

        beat(f"loading the reward model {ref}", kind="score", loading=True)
        path = resolve_model(ref).path
        self.tokenizer = load_tokenizer(path, padding_side="right")
        self.model = load_reward_model(path, dtype, device)
        self.batch_size = batch_size

    def score(self, pairs: list[tuple[str, str]]) -> list[float]:
        import torch

        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        scores: dict[int, float] = {}
        start, size = 0, self.batch_size
        while start < len(order):
            idx = order[start : start + size]
            enc = self.tokenizer(
                [pairs[i][0] for i in idx],
                [pairs[i][1] for i in idx],
                padding=True,
                truncation=True,
                max_length=min(self.tokenizer.model_max_length, 2048),
                return_tensors="pt",
            ).to(self.model.device)
            try:
                with torch.inference_mode():
                    logits = self.model(**enc).logits[:, 0].float().tolist()
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                size //= 2
                torch.cuda.empty_cache()
                continue
            scores.update(zip(idx, logits, strict=True))
            start += len(idx)
            beat(
                f"reward model: {start} of {len(pairs)} pairs scored",
                kind="score",
                batch_setting="preferences.reward_batch_size",
                batch_size=size,
            )
        return [scores[i] for i in range(len(pairs))]


def combined_score(scorer: str, reward: float | None, fraction: float | None, weight: float) -> float | None:
    """The score pairs are chosen by; None when the scorer has nothing to go on."""
    if scorer == "constraints":
        return fraction
    if reward is None:
        return None
    squashed = 1.0 / (1.0 + math.exp(-reward))
    if scorer == "reward_model" or fraction is None:
        return squashed if scorer == "both" else reward
    return weight * squashed + (1.0 - weight) * fraction


def select_pair(samples: list[dict[str, Any]], min_margin: float) -> tuple[dict[str, Any] | None, str | None]:
    """Best vs worst of one prompt's scored samples, or (None, skip reason)."""
    scored = [s for s in samples if s["response"].strip()]
    if len(scored) < 2:
        return None, "too_few_samples"
    if any(s["score"] is None for s in scored):
        return None, "unscored"
    # among equal scores prefer, as chosen, a response that ended on its own at a lower temperature
    key = lambda s: (s["score"], s["finish_reason"] == "stop", -s["temperature"])  # noqa: E731
    chosen, rejected = max(scored, key=key), min(scored, key=key)
    margin = chosen["score"] - rejected["score"]
    if margin <= 0:
        return None, "tie"
    if margin < min_margin:
        return None, "small_margin"
    return {"chosen": chosen, "rejected": rejected, "margin": margin}, None


def _words(sample: dict[str, Any]) -> int:
    return len(sample["response"].split())


def _length_gap(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Relative difference in words, rounded so that near-equal lengths tie."""
    return round(abs(_words(a) - _words(b)) / max(_words(a), _words(b), 1), 2)


def select_constraint_pair(
    samples: list[dict[str, Any]], min_margin: float
) -> tuple[dict[str, Any] | None, str | None]:
    """A pair that teaches the constraints: chosen passes every check, rejected fails at least one.

    Among such pairs: a chosen that ended on its own first, then the two closest in length (so
    length is not what separates them, as DPO otherwise learns), then the larger score gap.
    """
    scored = [s for s in samples if s["response"].strip()]
    if len(scored) < 2:
        return None, "too_few_samples"
    if any(s["score"] is None or s["constraint_fraction"] is None for s in scored):
        return None, "unscored"
    passing = [s for s in scored if s["constraint_fraction"] == 1.0]
    failing = [s for s in scored if s["constraint_fraction"] < 1.0]
    if not passing:
        return None, "none_pass"
    if not failing:
        return None, "all_pass"

    def key(pair: tuple[dict[str, Any], dict[str, Any]]) -> tuple:
        c, r = pair
        return (c["finish_reason"] != "stop", _length_gap(c, r), r["score"] - c["score"], c["temperature"])

    chosen, rejected = min(((c, r) for c in passing for r in failing), key=key)
    margin = chosen["score"] - rejected["score"]
    if margin < min_margin or margin <= 0:
        return None, "small_margin"
    return {"chosen": chosen, "rejected": rejected, "margin": margin}, None


def rejection_sample(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The SFT target for a constraint prompt: a sample that passes every check and ended on its own,
    at the lowest temperature (the teacher's most typical passing answer), shortest first."""
    ok = [
        s
        for s in samples
        if s["response"].strip() and s["constraint_fraction"] == 1.0 and s["finish_reason"] == "stop"
    ]
    return min(ok, key=lambda s: (s["temperature"], _words(s))) if ok else None


def _sweep_prompts(rest: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """The preference prompts (a seeded sample of the training records), constraints appended."""
    chosen_ids = set(
        _rng(cfg.seed, "preference-prompts").sample(
            range(len(rest)), min(cfg.counts.preference_prompts, len(rest))
        )
    )
    prompts = []
    for i, record in enumerate(rest):
        if i not in chosen_ids:
            continue
        cons = constraints_for(record["id"], cfg)
        prompts.append(
            {
                "id": record["id"],
                "prompt": ic.add_constraints(record["instruction"], cons) if cons else record["instruction"],
                "instruction": record["instruction"],
                "constraints": cons,
            }
        )
    return prompts


def _sample(
    engine: GenerationEngine, prompts: list[dict[str, Any]], cfg: Config, paths: RunPaths
) -> list[dict]:
    """Every prompt at every temperature, appended to preference_samples.jsonl as it is generated."""
    p = cfg.preferences
    settings = {
        "generator": cfg.models.generator,
        "system_prompt": cfg.responses.system_prompt,
        "sampling": {"top_p": p.top_p, "top_k": p.top_k, "max_new_tokens": p.max_new_tokens},
    }
    out_path = paths.file("preference_samples.jsonl")
    shards = shard_dir(out_path, settings)
    with output(out_path, required=("prompt_id", "response")) as samples:
        check_resumable(samples, settings)
        sweep = sweep_requests(prompts, cfg, engine.tokenizer)
        requests = [r for r in sweep if r.id not in samples]

        def append(batch: list[tuple[Request, Completion]]) -> None:
            samples.append(
                {
                    "id": request.id,
                    "prompt_id": request.meta["prompt_id"],
                    "temperature": request.sampling.temperature,
                    "response": completion.text.strip(),
                    "finish_reason": completion.finish_reason,
                    "num_tokens": len(completion.token_ids),
                    "seed": completion.seed,
                    **settings,
                }
                for request, completion in batch
            )

        for batch in generate(engine, requests, shards, desc="preference sweep"):
            append(batch)
        wanted = {r.id for r in sweep}
        all_samples = [s for s in samples.records if s["id"] in wanted]
    clear_shards(shards)
    return all_samples


def _score(
    all_samples: list[dict], by_prompt: dict[str, dict], cfg: Config, paths: RunPaths, device: str
) -> dict[str, list[dict[str, Any]]]:
    """Reward and/or per-constraint verdicts for every sample (appended to preference_scores.jsonl),
    grouped by prompt with the combined score pairs are chosen by."""
    p = cfg.preferences
    scorer_settings = {
        "scorer": p.scorer,
        "reward_model": cfg.models.reward_model if p.scorer != "constraints" else None,
    }
    with JsonlAppender(
        paths.file("preference_scores.jsonl"), required=("reward", "constraint_fraction")
    ) as scores:
        check_resumable(scores, scorer_settings)
        todo = [s for s in all_samples if s["id"] not in scores]
        rewards: list[float | None] = [None] * len(todo)
        if p.scorer in ("reward_model", "both") and todo:
            scorer = RewardScorer(
                cfg.models.reward_model or "", cfg.hardware.dtype, device, p.reward_batch_size
            )
            rewards = list(scorer.score([(by_prompt[s["prompt_id"]]["prompt"], s["response"]) for s in todo]))
        rows = []
        for sample, reward in zip(todo, rewards, strict=True):
            cons = by_prompt[sample["prompt_id"]]["constraints"]
            # a blank response follows nothing, as in lm-eval
            verdicts = (
                ic.check(sample["response"], cons) if sample["response"].strip() else [False] * len(cons)
            )
            fraction = sum(verdicts) / len(verdicts) if cons else None
            rows.append(
                {
                    "id": sample["id"],
                    "reward": reward,
                    "constraint_fraction": fraction,
                    "verdicts": verdicts,
                    **scorer_settings,
                }
            )
        scores.append(rows)
        score_of = {r["id"]: r for r in scores.records}

    grouped: dict[str, list[dict[str, Any]]] = {pid: [] for pid in by_prompt}
    for sample in all_samples:
        s = score_of[sample["id"]]
        grouped[sample["prompt_id"]].append(
            {
                **sample,
                "reward": s["reward"],
                "constraint_fraction": s["constraint_fraction"],
                "verdicts": s.get("verdicts", []),
                "score": combined_score(p.scorer, s["reward"], s["constraint_fraction"], p.reward_weight),
            }
        )
    return grouped


def _separating(
    instruction: str,
    chosen: str,
    rejected: str,
    rng: random.Random,
    k: int,
    allowed: list[str] | None,
    edits: bool,
) -> tuple[str, list[ic.Constraint]]:
    """``chosen`` (formats edited in when ``edits``) and constraints it meets that ``rejected`` does
    not all meet, or ``(chosen, [])``."""
    if not edits:
        return chosen, bt.separating_constraints(chosen, rejected, rng, k, allowed)
    text, cons, _ = fe.edit_in(instruction, chosen, rng, k, allowed)
    return (text, cons) if cons and not all(ic.check(rejected, cons)) else (chosen, [])


def backtranslated_pair(
    instruction: str,
    samples: list[dict[str, Any]],
    rng: random.Random,
    k: int,
    allowed: list[str] | None,
    edits: bool = False,
) -> dict[str, Any] | None:
    """For a prompt whose samples all pass or all fail its constraints: two of its samples and
    constraints that the first meets (after format edits, with ``edits``) and the second does not,
    written into the bare instruction (constraint back-translation applied to a pair: chosen passes
    every check, rejected fails one). Pairs are tried as `select_constraint_pair` ranks them: ended
    on its own, then similar length."""
    usable = [s for s in samples if s["response"].strip()]

    def key(pair: tuple[dict[str, Any], dict[str, Any]]) -> tuple:
        c, r = pair
        return (c["finish_reason"] != "stop", _length_gap(c, r), c["temperature"], r["temperature"])

    for chosen, rejected in sorted(((a, b) for a in usable for b in usable if a is not b), key=key):
        text, cons = _separating(
            instruction, chosen["response"], rejected["response"], rng, k, allowed, edits
        )
        if cons:
            fraction = sum(ic.check(rejected["response"], cons)) / len(cons)
            return {
                "prompt": ic.add_constraints(instruction, cons),
                "constraints": cons,
                "chosen": {**chosen, "response": text, "score": 1.0},
                "rejected": {**rejected, "score": fraction},
                "margin": 1.0 - fraction,
            }
    return None


def _pairs(
    grouped: dict[str, list[dict]], by_prompt: dict[str, dict], cfg: Config
) -> tuple[list[dict[str, Any]], Counter]:
    """Chosen/rejected per prompt in TRL's conversational format, and why prompts gave none."""
    p = cfg.preferences
    pairs, skipped = [], Counter({reason: 0 for reason in SKIP_REASONS})
    for pid, group in grouped.items():
        prompt = by_prompt[pid]
        by_constraints = prompt["constraints"] and p.scorer in ("constraints", "both")
        pair, reason = (select_constraint_pair if by_constraints else select_pair)(group, p.min_margin)
        text, cons, source = prompt["prompt"], prompt["constraints"], "sweep"
        if pair is None and reason in ("none_pass", "all_pass") and p.backtranslate_pairs:
            rng = _rng(cfg.seed, "pair-backtranslation", pid)
            k = rng.randint(p.min_constraints, p.max_constraints)
            pair = backtranslated_pair(prompt["instruction"], group, rng, k, p.constraint_ids, p.format_edits)
            if pair is not None:
                text, cons, source = pair["prompt"], pair["constraints"], "back_translation"
        if pair is None:
            skipped[reason or "unscored"] += 1
            continue
        chosen, rejected = pair["chosen"], pair["rejected"]
        pairs.append(
            {
                "id": pid,
                "prompt": user_turn(text),
                "chosen": [{"role": "assistant", "content": chosen["response"]}],
                "rejected": [{"role": "assistant", "content": rejected["response"]}],
                "score_chosen": chosen["score"],
                "score_rejected": rejected["score"],
                "margin": pair["margin"],
                "temperature_chosen": chosen["temperature"],
                "temperature_rejected": rejected["temperature"],
                "scorer": p.scorer,
                "source": source,
                "constraints": _serialise(cons),
                "sample_scores": {s["id"]: s["score"] for s in group},
            }
        )
    return pairs, skipped


def _sft_row(
    row_id: str,
    prompt: str,
    response: str,
    source: str,
    cons: list[ic.Constraint],
    edited: list[str] = (),
    text: str | None = None,
) -> dict:
    row = {
        "id": row_id,
        "record_id": row_id.split("~")[0],  # the sft.jsonl row it comes from
        "messages": [*user_turn(prompt), {"role": "assistant", "content": response}],
        "source": source,
        "constraints": _serialise(cons),
        "edited": list(edited),  # constraint ids whose format was edited into the response
    }
    if text is not None:  # the constraints' wording where it is not the registry's
        row["constraint_text"] = text
    return row


def _backtranslated_row(
    record: dict[str, Any], row_id: str, cfg: Config, always: bool = False
) -> dict | None:
    """``record`` with 1-3 constraints its response meets (formats edited in where
    ``sft_data.format_edits``), for a ``backtranslation_share`` of rows (all with ``always``)."""
    d = cfg.sft_data
    rng = _rng(cfg.seed, "backtranslation", row_id)
    if rng.random() >= d.backtranslation_share and not always:
        return None
    k = rng.randint(d.min_constraints, d.max_constraints)
    allowed, response, edited = d.constraint_ids, record["response"], []
    # its own stream, so the share leaves every other row's draws as they were
    repeat = _rng(cfg.seed, "repeat", row_id).random() < d.repeat_share
    if repeat:  # the request repeated, plus up to k - 1 families IFEval's registry lets beside it
        allowed = fe.beside_repeat(allowed)
        k = k - 1 if allowed else 0  # an empty list would let edit_in draw from every family
    if d.format_edits:
        response, cons, edited = fe.edit_in(record["instruction"], response, rng, k, allowed)
    else:
        cons = bt.backtranslate(response, rng, k, allowed)
    # the wording's own stream, as the repeat's
    words = _rng(cfg.seed, "wording", row_id) if d.paraphrase_share or d.repeat_wording_share else None
    text = ic.describe(cons, words, d.paraphrase_share)
    prompt = ic.add_constraints(record["instruction"], cons, text)
    if repeat and (
        repeated := fe.repeat_request(
            record["instruction"],
            response,
            cons,
            words,
            d.paraphrase_share,
            max(d.paraphrase_share, d.repeat_wording_share),
        )
    ):
        prompt, response, constraint = repeated
        cons, edited = [*cons, constraint], [*edited, fe.REPEAT_ID]
        text = prompt[len(record["instruction"].rstrip()) + 2 :]
    if not cons:
        return None
    text = text if text != ic.describe(cons) else None
    return _sft_row(row_id, prompt, response, "back_translation", cons, edited, text)


def sft_train_rows(
    rest: list[dict[str, Any]], grouped: dict[str, list[dict]], by_prompt: dict[str, dict], cfg: Config
) -> list[dict[str, Any]]:
    """Rows per training record: the constrained prompt with a sample that passes every check
    (rejection sampling); else, for a share of rows, constraints the response already meets or has
    had its format edited to meet (back-translation); else the plain row. With
    ``sft_data.variants`` > 1, each record adds that many minus one back-translated variants
    (ids ``<id>~2``...), each with constraints of its own."""
    d = cfg.sft_data
    rows = []
    for record in rest:
        pid = record["id"]
        prompt = by_prompt.get(pid, {})
        sample = (
            rejection_sample(grouped.get(pid, []))
            if d.rejection_sampling and prompt.get("constraints")
            else None
        )
        if sample is not None:
            row = _sft_row(
                pid, prompt["prompt"], sample["response"], "rejection_sampling", prompt["constraints"]
            )
        else:
            plain = _sft_row(pid, record["instruction"], record["response"], "plain", [])
            row = _backtranslated_row(record, pid, cfg) or plain
        rows.append(row)
        for j in range(2, d.variants + 1):
            variant = _backtranslated_row(record, f"{pid}~{j}", cfg, always=True)
            if variant is not None:
                rows.append(variant)
    return rows


def pass_rates(grouped: dict[str, list[dict]], by_prompt: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per constraint family: samples checked, samples that met it, and the rate (strict)."""
    counts: dict[str, list[int]] = {}
    for pid, group in grouped.items():
        ids = [c.instruction_id for c in by_prompt[pid]["constraints"]]
        for sample in group:
            for family, ok in zip(ids, sample["verdicts"], strict=False):
                tally = counts.setdefault(family, [0, 0])
                tally[0] += 1
                tally[1] += bool(ok)
    return {
        family: {"samples": n, "passed": k, "rate": round(k / n, 3)}
        for family, (n, k) in sorted(counts.items())
    }


def build_preferences(engine: GenerationEngine, cfg: Config, paths: RunPaths, device: str) -> dict[str, Any]:
    """Write heldout.jsonl, the sampled/scored sweep, preferences.jsonl, sft_train.jsonl and
    preferences_summary.json."""
    p = cfg.preferences
    sft = read_jsonl(paths.file("sft.jsonl"), required=("id", "instruction", "response"))
    heldout, rest = split_heldout(sft, cfg.counts.heldout_prompts, cfg.seed)
    if is_main_process():
        write_jsonl(paths.file("heldout.jsonl"), heldout_records(heldout, cfg))

    prompts = _sweep_prompts(rest, cfg)
    by_prompt = {pr["id"]: pr for pr in prompts}
    all_samples = _sample(engine, prompts, cfg, paths)
    if not is_main_process():
        return {}  # the other processes share the sweep; scoring and selection are the first's
    grouped = _score(all_samples, by_prompt, cfg, paths, device)
    pairs, skipped = _pairs(grouped, by_prompt, cfg)
    write_jsonl(paths.file("preferences.jsonl"), pairs)
    sft_rows = sft_train_rows(rest, grouped, by_prompt, cfg)
    write_jsonl(paths.file("sft_train.jsonl"), sft_rows)

    with_constraints = {pid: g for pid, g in grouped.items() if by_prompt[pid]["constraints"]}
    summary = {
        "sft_prompts": len(sft),
        "heldout": len(heldout),
        "preference_prompts": len(prompts),
        "prompts_with_constraints": len(with_constraints),
        "samples": len(all_samples),
        "prompts_with_a_passing_sample": sum(
            1 for g in with_constraints.values() if any(s["constraint_fraction"] == 1.0 for s in g)
        ),
        "constraint_pass_rates": pass_rates(with_constraints, by_prompt),
        "pairs": len(pairs),
        "pair_sources": dict(Counter(x["source"] for x in pairs)),
        "skipped": dict(skipped),
        "sft_train": {
            "rows": len(sft_rows),
            **{src: sum(r["source"] == src for r in sft_rows) for src in SFT_SOURCES},
            "format_edited": sum(bool(r["edited"]) for r in sft_rows),
            "edits": dict(Counter(e for r in sft_rows for e in r["edited"])),
        },
        "scorer": p.scorer,
        "temperatures": p.temperatures,
        "min_margin": p.min_margin,
        "mean_margin": sum(x["margin"] for x in pairs) / len(pairs) if pairs else None,
        "chosen_temperature": dict(Counter(str(x["temperature_chosen"]) for x in pairs)),
        "rejected_temperature": dict(Counter(str(x["temperature_rejected"]) for x in pairs)),
        "sampling": asdict(SamplingConfig(top_p=p.top_p, top_k=p.top_k, max_new_tokens=p.max_new_tokens)),
    }
    write_json(paths.file("preferences_summary.json"), summary)
    return summary


def preferences_step(cfg: Config, paths: RunPaths, device: str) -> dict[str, Any]:
    """Step 04 in one process of the step (see `distributed.run`): load the generator, build."""
    from .engines import load_engine

    return build_preferences(load_engine(cfg, device), cfg, paths, device)
