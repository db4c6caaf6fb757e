"""Tables and figures for the analysis notebooks, and the reports' index page.

Every table says where its numbers come from (a `source` caption); every figure has a title, axis
labels and units. Numbers are read from the run's own files: the ledger, funnel.json, metrics.json
and eval/summary.json.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from .ledger import now_iso, read_ledger
from .store import RunPaths, atomic_write_text, read_json, read_jsonl

METHOD_STEPS = {"sft_lora": "05_sft_lora", "prompt_tuning": "05b_prompt_tuning", "dpo": "06_dpo"}
METHOD_LABELS = {
    "base": "base model",
    "sft_lora": "LoRA SFT",
    "prompt_tuning": "prompt tuning",
    "dpo": "DPO (on SFT)",
    "teacher": "teacher (generator)",
}
# The seed project's reported A100 figures, shown beside ours and labelled as the seed's.
SEED_REPORTED = [
    {"step": "05_sft_lora", "minutes": 8.2, "device": "A100 (Colab)", "source": "seed project, reported"},
    {
        "step": "05b_prompt_tuning",
        "minutes": 18.8,
        "device": "A100 (Colab)",
        "source": "seed project, reported",
    },
]
SEED_COMPUTE_UNITS = 2.41


def _caption(frame: Any, text: str) -> Any:
    """A pandas Styler with a caption naming the source of the numbers (rendered above the table)."""
    return frame.style.set_caption(text).format(precision=3, na_rep="–", thousands=",").hide(axis="index")


def ledger_frame(paths: RunPaths) -> Any:
    """One row per step: its latest successful run (seconds, memory, device, compute units)."""
    import pandas as pd

    rows = [r for r in read_ledger(paths.ledger) if r["status"] == "ok"]
    if not rows:
        return pd.DataFrame(
            columns=["step", "seconds", "minutes", "peak_rss_mb", "peak_gpu_mb", "device", "compute_units"]
        )
    frame = pd.DataFrame(rows).sort_values("start").groupby("step", as_index=False).last()
    frame["minutes"] = frame["seconds"] / 60
    columns = [
        "step",
        "seconds",
        "minutes",
        "peak_rss_mb",
        "peak_gpu_mb",
        "device",
        "compute_units",
        "start",
        "run_id",
    ]
    return frame.sort_values("step")[columns].reset_index(drop=True)


def step_costs_table(paths: RunPaths) -> Any:
    import pandas as pd

    frame = ledger_frame(paths)
    total = pd.DataFrame(
        [
            {
                "step": "total",
                "seconds": frame["seconds"].sum(),
                "minutes": frame["minutes"].sum(),
                "peak_rss_mb": frame["peak_rss_mb"].max(),
                "peak_gpu_mb": frame["peak_gpu_mb"].max(),
                "device": "",
                "compute_units": frame["compute_units"].sum(),
            }
        ]
    )
    table = pd.concat([frame.drop(columns=["start", "run_id"]), total], ignore_index=True)
    return _caption(
        table,
        f"Source: {paths.ledger} (latest successful run of each step; peak memory of the step's kernel)",
    )


def profile_totals_table(runs_root: Path) -> Any:
    """Totals of every profile run found under runs/ (one ledger per run directory)."""
    import pandas as pd

    rows = []
    for ledger in sorted(Path(runs_root).glob("*/ledger.jsonl")):
        frame = ledger_frame(RunPaths(ledger.parent))
        if len(frame):
            rows.append(
                {
                    "run directory": ledger.parent.name,
                    "steps": len(frame),
                    "minutes": frame["minutes"].sum(),
                    "compute_units": frame["compute_units"].sum(),
                    "device": frame["device"].iloc[-1],
                }
            )
    return _caption(pd.DataFrame(rows), f"Source: {runs_root}/*/ledger.jsonl")


def seed_comparison_table(paths: RunPaths) -> Any:
    """Our training-step minutes beside the seed's reported A100 figures."""
    import pandas as pd

    ours = ledger_frame(paths)
    rows = []
    for seed in SEED_REPORTED:
        mine = ours[ours["step"] == seed["step"]]
        rows.append(
            {
                "step": seed["step"],
                "this run, minutes": float(mine["minutes"].iloc[0]) if len(mine) else None,
                "this run, device": mine["device"].iloc[0] if len(mine) else "",
                "seed (reported), minutes": seed["minutes"],
                "seed device": seed["device"],
            }
        )
    rows.append(
        {
            "step": "compute units, whole run",
            "this run, minutes": float(ours["compute_units"].sum()),
            "this run, device": "",
            "seed (reported), minutes": SEED_COMPUTE_UNITS,
            "seed device": "A100 (Colab)",
        }
    )
    return _caption(
        pd.DataFrame(rows),
        "Sources: this run's ledger; the seed project's reported figures (labelled 'seed')",
    )


def step_time_figure(paths: RunPaths) -> Any:
    import matplotlib.pyplot as plt

    frame = ledger_frame(paths)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(frame["step"], frame["minutes"], color="#4C72B0")
    ax.invert_yaxis()
    ax.set_xlabel("wall-clock time (minutes)")
    ax.set_ylabel("pipeline step")
    ax.set_title(f"Time per step ({frame['device'].iloc[-1] if len(frame) else 'no runs yet'})")
    fig.tight_layout()
    return fig


def funnel_frame(paths: RunPaths) -> Any:
    """Counts from the first Magpie sample to the last kept SFT row (step 03's funnel.json)."""
    import pandas as pd

    funnel = read_json(paths.file("funnel.json"))
    gen = funnel["generation"]
    rows = [
        {"stage": "Magpie samples", "remaining": gen["magpie_samples"]},
        {"stage": "instructions (sanitised, distinct)", "remaining": gen["instructions"]},
        {"stage": "responses", "remaining": gen["responses"]},
    ]
    rows += [{"stage": f"after {s['stage']}", "remaining": s["remaining"]} for s in funnel["stages"]]
    return pd.DataFrame(rows)


def funnel_table(paths: RunPaths) -> Any:
    import pandas as pd

    funnel = read_json(paths.file("funnel.json"))
    removed = pd.DataFrame([{"reason": k, "removed": v} for k, v in funnel["removed"].items()])
    trimmed = funnel.get("trimmed", 0)
    kept_note = (
        f"; {trimmed} responses were kept trimmed to their last complete sentence (filtering.trim_truncated)"
        if trimmed
        else ""
    )
    return (
        _caption(funnel_frame(paths), f"Source: {paths.file('funnel.json')}"),
        _caption(
            removed,
            "Records removed per reason (each record counts once, for the first rule that fired)" + kept_note,
        ),
    )


def constraint_data_tables(paths: RunPaths) -> tuple[Any, Any]:
    """Step 04's constraint funnel: how often the teacher met each constraint family across the sweep
    (strict), and where the SFT rows come from."""
    import pandas as pd

    source = paths.file("preferences_summary.json")
    summary = read_json(source)
    rates = pd.DataFrame(
        [{"constraint": k, **v} for k, v in summary.get("constraint_pass_rates", {}).items()],
        columns=["constraint", "samples", "passed", "rate"],
    ).sort_values("rate")
    mix = summary.get("sft_train", {})
    sources = pd.DataFrame(
        [
            {
                "source": "rejection sampling (a sample passing every check)",
                "rows": mix.get("rejection_sampling", 0),
            },
            {
                "source": "back-translation (constraints the answer meets, formats edited in)",
                "rows": mix.get("back_translation", 0),
            },
            {"source": "  of which with formats edited in", "rows": mix.get("format_edited", 0)},
            {"source": "plain (no constraints)", "rows": mix.get("plain", 0)},
        ]
    )
    passing = summary.get("prompts_with_a_passing_sample", 0)
    return (
        _caption(
            rates,
            f"Teacher samples meeting each constraint family, {len(summary.get('temperatures', []))} temperatures "
            f"({passing} of {summary.get('prompts_with_constraints', 0)} constraint prompts had a sample passing "
            f"every check). Source: {source}",
        ),
        _caption(sources, f"SFT training rows by source ({mix.get('rows', 0)} in all). Source: {source}"),
    )


def benchmark_removals_table(paths: RunPaths) -> Any:
    """Step 03's removals for benchmark overlap: each instruction and the prompt it shares n-grams with."""
    import pandas as pd

    source = paths.file("filtered_out.jsonl")
    removed = [r for r in read_jsonl(source) if r["reason"] == "benchmark_overlap"]
    text = {r["id"]: r["instruction"] for r in read_jsonl(paths.file("responses.jsonl"))}
    frame = pd.DataFrame(
        [{"id": r["id"], "instruction": text.get(r["id"], ""), **r} for r in removed],
        columns=["id", "instruction", "benchmark", "doc_id", "shared_ngrams", "ngrams"],
    )
    return _caption(
        frame,
        f"Instructions removed for sharing a word n-gram with a benchmark prompt ({len(frame)}). "
        f"Source: {source}",
    )


def contamination_tables(paths: RunPaths, top: int = 10) -> tuple[Any, Any, Any]:
    """The check of the training rows as trained (data/contamination.json): counts per benchmark,
    every task-text match and every removal before training, and the constraint wording behind
    template matches (the `top` most frequent first n-grams)."""
    import pandas as pd

    source = paths.file("contamination.json")
    report = read_json(source)
    counts = pd.DataFrame([{"benchmark": name, **c} for name, c in report["counts"].items()])
    checked = ", ".join(f"{n} rows of {name}" for name, n in report["checked"].items())
    task = [{"caught": "in training data", **m} for m in report["matches"] if m["kind"] == "task"]
    caught = [{"caught": "removed before training", **r} for r in report["removed_before_training"]]
    matches = pd.DataFrame(
        [{**m, "doc_ids": ", ".join(m.get("doc_ids", [m.get("doc_id", "")]))} for m in task + caught],
        columns=["caught", "file", "id", "benchmark", "doc_ids", "shared_ngrams", "ngrams"],
    )
    template = [m for m in report["matches"] if m["kind"] == "template"]
    wording = (
        pd.DataFrame(
            [{"benchmark": m["benchmark"], "first shared n-gram": m["ngrams"][0]} for m in template],
            columns=["benchmark", "first shared n-gram"],
        )
        .value_counts()
        .rename("rows")
        .reset_index()
        .head(top)
    )
    return (
        _caption(
            counts,
            f"Training rows ({checked}) sharing a word {report['ngram']}-gram with a benchmark prompt: "
            "through their task text, or only through the constraint wording the pipeline appends "
            f"(lm-eval's IFEval registry, which IFEval's prompts use too). Source: {source}",
        ),
        _caption(
            matches,
            f"Task-text overlaps: {report['task_overlap']} rows share wording with a benchmark prompt in "
            "the training data, the rows marked 'removed before training' were removed by step 03; "
            "overlaps with the run's held-out prompts (same generator, stock openings) are listed, not removed",
        ),
        _caption(
            wording, f"Template overlap: the constraint wording shared, by rows ({len(template)} in all)"
        ),
    )


def funnel_figure(paths: RunPaths) -> Any:
    import matplotlib.pyplot as plt

    frame = funnel_frame(paths)
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.barh(frame["stage"], frame["remaining"], color="#55A868")
    ax.invert_yaxis()
    ax.set_xlabel("records (count)")
    ax.set_ylabel("stage")
    ax.set_title("Data funnel: from Magpie samples to the SFT set")
    fig.tight_layout()
    return fig


def training_metrics(paths: RunPaths) -> dict[str, dict[str, Any]]:
    out = {}
    for method in METHOD_STEPS:
        path = paths.adapters / method / "metrics.json"
        if path.exists():
            out[method] = json.loads(path.read_text())
    return out


def training_summary(metrics: dict) -> dict:
    """The headline figures of one method's metrics.json, for a one-column table."""
    keys = (
        "method",
        "base_eval_loss",
        "final_eval_loss",
        "train_loss",
        "eval_reward_accuracy",
        "eval_reward_margin",
        "global_step",
        "train_runtime_s",
        "train_samples_per_second",
        "trainable_params",
        "total_params",
        "peak_rss_mb",
        "peak_gpu_mb",
        "device",
        "resumed_from_checkpoint",
    )
    return {k: metrics[k] for k in keys if k in metrics}


def cost_frame(paths: RunPaths) -> Any:
    """Per method: trainable parameters, training time, compute units, eval loss."""
    import pandas as pd

    ledger = ledger_frame(paths).set_index("step")
    trained = training_metrics(paths)
    base_loss = trained.get("sft_lora", {}).get("base_eval_loss")
    rows = [
        {
            "method": METHOD_LABELS["base"],
            "trainable params": 0,
            "training minutes": 0.0,
            "compute units": 0.0,
            "eval loss (SFT eval split)": base_loss,
            "DPO reward accuracy (held-out pairs)": None,
        }
    ]
    for method, step in METHOD_STEPS.items():
        m = trained.get(method, {})
        rows.append(
            {
                "method": METHOD_LABELS[method],
                "trainable params": m.get("trainable_params"),
                "training minutes": float(ledger.loc[step, "minutes"]) if step in ledger.index else None,
                "compute units": float(ledger.loc[step, "compute_units"]) if step in ledger.index else None,
                "eval loss (SFT eval split)": m.get("final_eval_loss") if method != "dpo" else None,
                "DPO reward accuracy (held-out pairs)": m.get("eval_reward_accuracy"),
            }
        )
    return pd.DataFrame(rows)


def cost_table(paths: RunPaths) -> Any:
    return _caption(
        cost_frame(paths),
        "Sources: adapters/*/metrics.json and the ledger (DPO's loss is a preference loss, not comparable)",
    )


def curves_figure(paths: RunPaths) -> Any:
    import matplotlib.pyplot as plt

    trained = training_metrics(paths)
    fig, axes = plt.subplots(
        1, max(1, len(trained)), figsize=(4.2 * max(1, len(trained)), 3.2), squeeze=False
    )
    for ax, (method, metrics) in zip(axes[0], trained.items(), strict=False):
        train = metrics["curves"]["train"]
        evaluation = metrics["curves"]["eval"]
        ax.plot([p["step"] for p in train], [p["loss"] for p in train], label="train loss")
        if evaluation:
            ax.plot([p["step"] for p in evaluation], [p["loss"] for p in evaluation], "o-", label="eval loss")
        ax.set_title(METHOD_LABELS[method])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats per token)" if method != "dpo" else "DPO loss (nats)")
        ax.legend()
    fig.suptitle("Training curves")
    fig.tight_layout()
    return fig


def metrics_frame(metrics: dict) -> Any:
    """Long table: method, task, metric, value and its interval (from eval/summary.json)."""
    import pandas as pd

    rows = [
        {"method": method, "task": task, "metric": metric, **values}
        for method, tasks in metrics.items()
        for task, by_metric in tasks.items()
        for metric, values in by_metric.items()
    ]
    return pd.DataFrame(rows)


def comparison_tables(paths: RunPaths) -> list[Any]:
    """One table per task: a row per method, a column per metric, 'value [low, high]'."""
    summary = read_json(paths.eval / "summary.json")
    frame = metrics_frame(summary["metrics"])
    frame["cell"] = frame.apply(lambda r: f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", axis=1)
    tables = []
    for task, part in frame.groupby("task", sort=True):
        wide = part.pivot(index="method", columns="metric", values="cell")
        wide = wide.reindex([m for m in METHOD_LABELS if m in wide.index])
        wide.insert(0, "method", [METHOD_LABELS[m] for m in wide.index])
        caption = (
            f"{task} — {int(part['n'].max())} prompts; value [95% percentile-bootstrap interval over prompts, "
            f"{summary['bootstrap_iters']} resamples]. Source: {paths.eval / 'summary.json'}"
        )
        tables.append(wide.reset_index(drop=True).style.set_caption(caption).hide(axis="index"))
    return tables


def _signed(x: float) -> str:
    """A difference with its sign (a true minus sign); one that rounds to zero has none."""
    text = f"{x:+.3f}"
    return "0.000" if float(text) == 0 else text.replace("-", "\u2212")


def paired_frames(summary: dict) -> dict[str, Any]:
    """{task: frame}: a row per comparison and metric, from summary.json's `paired` block."""
    import pandas as pd

    rows: dict[str, list[dict[str, Any]]] = {}
    for comparison in (summary.get("paired") or {}).values():
        first, second = comparison["first"], comparison["second"]
        label = f"{METHOD_LABELS[first]} \u2212 {METHOD_LABELS[second]}"
        for task, by_metric in comparison["tasks"].items():
            for metric, d in by_metric.items():
                binary = d.get("mcnemar_p") is not None
                rows.setdefault(task, []).append(
                    {
                        "comparison": label,
                        "metric": metric,
                        "difference": _signed(d["difference"]),
                        "95% paired interval": f"[{_signed(d['ci_low'])}, {_signed(d['ci_high'])}]",
                        "only first right / only second right": f"{d['first_only']} / {d['second_only']}"
                        if binary
                        else "",
                        "exact McNemar p": f"{d['mcnemar_p']:.3g}" if binary else "does not apply",
                    }
                )
    return {task: pd.DataFrame(task_rows) for task, task_rows in sorted(rows.items())}


def paired_tables(paths: RunPaths) -> list[Any]:
    """One table per task: each comparison's difference, paired bootstrap interval and McNemar p."""
    summary = read_json(paths.eval / "summary.json")
    tables = []
    for task, frame in paired_frames(summary).items():
        n = max(d["n"] for c in summary["paired"].values() for d in c["tasks"].get(task, {}).values())
        caption = (
            f"{task} — differences first \u2212 second on the same {n} prompts; 95% paired percentile-bootstrap "
            f"interval ({summary['bootstrap_iters']} resamples of prompts, the same prompts for both methods); "
            "exact McNemar p (two-sided binomial test on the prompts only one of the two gets right) for 0/1 "
            "per-prompt metrics. McNemar does not apply to instruction-level accuracy (a list per prompt) "
            "or bits per byte (continuous; lower is better). "
            f"Source: {paths.eval / 'summary.json'} (paired)"
        )
        tables.append(frame.style.set_caption(caption).hide(axis="index"))
    return tables


def family_frames(summary: dict, metric: str = "inst_level_strict_acc") -> dict[str, Any]:
    """{task: frame}: a row per constraint family, a column per method ('value [low, high]')."""
    import pandas as pd

    by_task: dict[str, dict[str, dict[str, Any]]] = {}
    for method, tasks in (summary.get("constraint_families") or {}).items():
        for task, families in tasks.items():
            for family, f in families.items():
                row = by_task.setdefault(task, {}).setdefault(
                    family, {"constraint family": family, "instructions": f["instructions"]}
                )
                m = f[metric]
                row[METHOD_LABELS[method]] = f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]"
    frames = {}
    for task, families in sorted(by_task.items()):
        frame = pd.DataFrame([families[f] for f in sorted(families)])
        methods = [label for label in METHOD_LABELS.values() if label in frame.columns]
        frames[task] = frame[["constraint family", "instructions", *methods]]
    return frames


def family_tables(paths: RunPaths, metric: str = "inst_level_strict_acc") -> list[Any]:
    """One table per IFEval-style task: accuracy per constraint family and method."""
    summary = read_json(paths.eval / "summary.json")
    tables = []
    for task, frame in family_frames(summary, metric).items():
        caption = (
            f"{task} — {metric} per constraint family (the instruction id before ':'); value [95% "
            "percentile-bootstrap interval over the prompts carrying the family]; loose accuracy is in "
            f"summary.json. Source: {paths.eval / 'summary.json'} (constraint_families)"
        )
        tables.append(frame.style.set_caption(caption).hide(axis="index"))
    return tables


def endings_table(paths: RunPaths) -> Any:
    """Per method: how many of its generated answers ended on EOS rather than at the length limit."""
    import pandas as pd

    summary = read_json(paths.eval / "summary.json")
    rows = []
    for method, e in (summary.get("generation_endings") or {}).items():
        if not e:
            continue
        rows.append(
            {
                "method": METHOD_LABELS[method],
                "answers": e["generations"],
                "ended with EOS": e["ended_with_eos"],
                "share": round(e["ended_with_eos"] / e["generations"], 3),
                "mean answer tokens": round(e["new_tokens"] / e["generations"], 1),
                "limit (max_gen_toks)": e["max_gen_toks"],
            }
        )
    return _caption(
        pd.DataFrame(rows),
        "Generations of every generate_until task, greedy; an answer not ending with EOS ran to the limit "
        "or stopped on a task's stop sequence. "
        f"Source: {paths.eval / 'summary.json'}",
    )


def metric_bars_figure(
    paths: RunPaths, metrics: tuple[str, ...] = ("prompt_level_loose_acc", "inst_level_loose_acc")
) -> Any:
    import matplotlib.pyplot as plt

    summary = read_json(paths.eval / "summary.json")
    frame = metrics_frame(summary["metrics"])
    frame = frame[frame["metric"].isin(metrics)]
    panels = sorted(set(zip(frame["task"], frame["metric"], strict=True)))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.6 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (task, metric) in zip(axes[0], panels, strict=False):
        part = frame[(frame["task"] == task) & (frame["metric"] == metric)].set_index("method")
        part = part.reindex([m for m in METHOD_LABELS if m in part.index])
        errors = [part["value"] - part["ci_low"], part["ci_high"] - part["value"]]
        ax.bar([METHOD_LABELS[m] for m in part.index], part["value"], yerr=errors, capsize=4, color="#C44E52")
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        ax.set_ylabel("accuracy (fraction, 95% CI)")
        ax.set_xlabel("method")
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("Instruction following by method")
    fig.tight_layout()
    return fig


def side_by_side(paths: RunPaths, task: str = "sit_heldout_ifeval", n: int = 3, width: int = 600) -> Any:
    """A few held-out prompts with each method's answer (from lm-eval's per-sample logs)."""
    import pandas as pd

    answers: dict[int, dict[str, str]] = {}
    prompts: dict[int, str] = {}
    for method in METHOD_LABELS:
        log = paths.eval / "samples" / method / f"{task}.jsonl"
        if not log.exists():
            continue
        for row in read_jsonl(log, required=("doc_id", "doc")):
            prompts[row["doc_id"]] = row["doc"].get("prompt", "")
            response = row.get("filtered_resps", row.get("resps", [""]))
            while isinstance(response, list):
                response = response[0] if response else ""
            answers.setdefault(row["doc_id"], {})[METHOD_LABELS[method]] = str(response)[:width]
    rows = [{"prompt": prompts[i][:width], **answers[i]} for i in sorted(answers)[:n]]
    return _caption(
        pd.DataFrame(rows), f"Source: {paths.eval / 'samples'}/<method>/{task}.jsonl (greedy decoding)"
    )


# The metric a task is summed up by on the index page, first match wins: IFEval-style tasks' prompt-level
# strict accuracy, HellaSwag's length-normalised accuracy, MMLU's and TruthfulQA's accuracy, bits per byte.
HEADLINE_METRICS = ("prompt_level_strict_acc", "acc_norm", "acc", "exact_match", "mc2", "bits_per_byte")
LOWER_IS_BETTER = ("bits_per_byte", "byte_perplexity", "word_perplexity")
_INDEX_STYLE = (
    "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}caption{caption-side:bottom;text-align:left;"
    "font-size:.85em;color:#555;padding-top:.4em;max-width:60em}th,td{padding:.35em .8em;text-align:left;"
    "vertical-align:top}table.result th,table.result td{border-bottom:1px solid #ddd}"
    "thead th{background:#f3f3f3}.ci,small{color:#666;font-size:.85em}.num{white-space:nowrap}"
)


def headline_metric(metrics: list[str]) -> str:
    """The metric a task is summed up by (`HEADLINE_METRICS`; lm-eval's ',filter' suffix ignored)."""
    by_name = {m.split(",")[0]: m for m in sorted(metrics)}
    return next((by_name[m] for m in HEADLINE_METRICS if m in by_name), sorted(metrics)[0])


def _task_headlines(summary: dict) -> dict[str, str]:
    """{task: headline metric}, the configured tasks first, then any other task in the metrics."""
    found: dict[str, set[str]] = {}
    for tasks in summary["metrics"].values():
        for task, by_metric in tasks.items():
            found.setdefault(task, set()).update(by_metric)
    order = [t for t in summary.get("tasks", []) if t in found] + sorted(
        set(found) - set(summary.get("tasks", []))
    )
    return {task: headline_metric(list(found[task])) for task in order}


def _lower_is_better(metric: str) -> bool:
    return metric.split(",")[0] in LOWER_IS_BETTER


def _label(method: str) -> str:
    return html.escape(METHOD_LABELS.get(method, method))


def _task_header(first: str, headlines: dict[str, str]) -> str:
    cells = "".join(
        f"<th>{html.escape(task)}<br><small>{html.escape(metric)}"
        + (", lower is better" if _lower_is_better(metric) else "")
        + "</small></th>"
        for task, metric in headlines.items()
    )
    return f"<thead><tr><th>{first}</th>{cells}</tr></thead>"


def method_table_html(summary: dict) -> str:
    """Rows: the models; columns: each task's headline metric, value and 95% interval; best in bold."""
    headlines = _task_headlines(summary)
    methods = [m for m in METHOD_LABELS if m in summary["metrics"]]
    methods += sorted(set(summary["metrics"]) - set(methods))
    cells: dict[str, list[str]] = {m: [] for m in methods}
    for task, metric in headlines.items():
        values = {m: summary["metrics"][m].get(task, {}).get(metric) for m in methods}
        present = [v["value"] for v in values.values() if v]
        # a best only where the models differ
        best = (min if _lower_is_better(metric) else max)(present) if len(set(present)) > 1 else None
        for method, v in values.items():
            if not v:
                cells[method].append("<td>–</td>")
                continue
            value = f"{v['value']:.3f}"
            value = f"<b>{value}</b>" if v["value"] == best else value
            cells[method].append(
                f'<td class="num">{value} <span class="ci">[{v["ci_low"]:.3f}, {v["ci_high"]:.3f}]</span></td>'
            )
    rows = "".join(f"<tr><th>{_label(m)}</th>{''.join(cells[m])}</tr>" for m in methods)
    n = max(
        (v["n"] for t in summary["metrics"].values() for by in t.values() for v in by.values()), default=0
    )
    caption = (
        "Each task's headline metric: value [95% percentile-bootstrap interval over prompts, "
        f"{summary.get('bootstrap_iters', '?')} resamples]; up to {n} prompts a task; bold: the best in its "
        "column. Every metric is in method_comparison.html. Source: eval/summary.json (metrics)"
    )
    return (
        f'<table class="result"><caption>{caption}</caption>{_task_header("model", headlines)}'
        f"<tbody>{rows}</tbody></table>"
    )


def paired_table_html(summary: dict) -> str:
    """Rows: the comparisons (first − second on the same prompts); columns: the tasks' headline metrics."""
    headlines = _task_headlines(summary)
    rows = []
    for comparison in (summary.get("paired") or {}).values():
        label = f"{_label(comparison['first'])} \u2212 {_label(comparison['second'])}"
        cells = []
        for task, metric in headlines.items():
            d = comparison["tasks"].get(task, {}).get(metric)
            if d is None:
                cells.append("<td>–</td>")
                continue
            difference = _signed(d["difference"])
            if d["ci_low"] > 0 or d["ci_high"] < 0:  # the interval excludes no difference
                difference = f"<b>{difference}</b>"
            test = (
                f"{d['first_only']} vs {d['second_only']} prompts, p = {d['mcnemar_p']:.2g}"
                if d.get("mcnemar_p") is not None
                else "McNemar does not apply"
            )
            cells.append(
                f'<td class="num">{difference} <span class="ci">[{_signed(d["ci_low"])}, '
                f"{_signed(d['ci_high'])}]</span><br><small>{test}</small></td>"
            )
        rows.append(f"<tr><th>{label}</th>{''.join(cells)}</tr>")
    caption = (
        "Differences first \u2212 second on the same prompts, with a 95% paired percentile-bootstrap interval "
        "(bold: the interval excludes 0); for 0/1 metrics the prompts only one of the two got right and the "
        "exact McNemar p. Source: eval/summary.json (paired)"
    )
    return (
        f'<table class="result"><caption>{caption}</caption>{_task_header("comparison", headlines)}'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def run_facts(paths: RunPaths, profile: str, models: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows: the run's total time and where it ran, from the ledger; profile and models."""
    ledger = read_ledger(paths.ledger)
    latest: dict[str, dict[str, Any]] = {}
    for row in sorted((r for r in ledger if r["status"] == "ok"), key=lambda r: r["start"]):
        latest[row["step"]] = row
    seconds = sum(r["seconds"] for r in latest.values())
    other = [r for r in ledger if r["status"] != "ok"]
    total = (
        f"{seconds:,.1f} s ({seconds / 60:.1f} min) over {len(latest)} steps, the latest successful run of each"
        if latest
        else "no step has run yet"
    )
    if other:
        total += (
            f"; {len(other)} stalled or failed attempts took {sum(r['seconds'] for r in other):,.1f} s more"
        )
    units = sum(r.get("compute_units", 0.0) for r in latest.values())
    devices = ", ".join(dict.fromkeys(r["device"] for r in latest.values())) or "–"
    return [
        ("total time", total + f" (compute units: {units:.3g}); source: {paths.ledger.name}"),
        ("where it ran", html.escape(devices)),
        ("profile", html.escape(profile)),
        *((name, f"<code>{html.escape(str(value))}</code>") for name, value in models.items()),
        ("run directory", f"<code>{html.escape(str(paths.root))}</code>"),
        ("runs in the ledger", ", ".join(sorted({r["run_id"] for r in ledger})) or "none"),
        ("rendered", now_iso()),
    ]


def write_index(
    reports_dir: Path, paths: RunPaths, profile: str, pages: list[str], models: dict[str, Any]
) -> Path:
    """index.html: the result first (each model's score per task with its interval, the paired
    differences), then the run's total time and where it ran, then links to the rendered reports."""
    summary_path = paths.eval / "summary.json"
    if summary_path.exists():
        summary = read_json(summary_path)
        result = (
            "<p>What each model scores on each task: the base model, the three ways of tuning it on the "
            "synthetic data, and the teacher that wrote that data.</p>"
            + method_table_html(summary)
            + "<h2>Paired differences</h2>"
            + paired_table_html(summary)
        )
    else:
        result = (
            f"<p>No evaluation yet: <code>{html.escape(str(summary_path))}</code> does not exist. Step "
            f"07_evaluate writes it: <code>python run_all.py --profile {html.escape(profile)}</code>.</p>"
        )
    facts = "".join(
        f"<tr><th>{html.escape(label)}</th><td>{text}</td></tr>"
        for label, text in run_facts(paths, profile, models)
    )
    items = "".join(
        f'<li><a href="{html.escape(p)}">{html.escape(Path(p).stem.replace("_", " "))}</a></li>'
        for p in pages
    )
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Synthetic Instruction Tuner reports</title>"
        f"<style>{_INDEX_STYLE}</style></head><body>"
        f"<h1>Synthetic Instruction Tuner — {html.escape(profile)} profile</h1>"
        f"<h2>Result</h2>{result}<h2>The run</h2><table>{facts}</table>"
        f"<h2>Reports</h2><ul>{items}</ul></body></html>"
    )
    target = reports_dir / "index.html"
    atomic_write_text(target, body)  # a kill leaves the old page or the new one, never half of one
    return target


# The seed's four benchmarks, each with its headline metric (lm-eval's own tasks, offline or from the Hub)
SEED_BENCHMARKS = {
    "ifeval": ("IFEval", "prompt_level_strict_acc"),
    "mmlu": ("MMLU (5-shot)", "acc"),
    "truthfulqa_mc2": ("TruthfulQA MC2", "acc"),
    "hellaswag": ("HellaSwag", "acc_norm"),
}
KNOWLEDGE_BENCHMARKS = ("mmlu", "hellaswag", "truthfulqa_mc2")  # what instruction tuning can cost
ADAPTERS = ("sft_lora", "prompt_tuning", "dpo")


def seed_benchmark_table(paths: RunPaths) -> Any:
    """A row per model, a column per seed benchmark: 'value [low, high]', or why it was not run."""
    import pandas as pd

    summary = read_json(paths.eval / "summary.json")
    sizes = {}
    rows = []
    for method, tasks in summary["metrics"].items():
        row = {"method": METHOD_LABELS[method]}
        for task, (label, metric) in SEED_BENCHMARKS.items():
            m = tasks.get(task, {}).get(metric)
            row[label] = f"{m['value']:.3f} [{m['ci_low']:.3f}, {m['ci_high']:.3f}]" if m else "not run"
            if m:
                sizes[label] = m["n"]
        rows.append(row)
    counted = "; ".join(f"{label} {n} documents" for label, n in sizes.items()) or "none run"
    return _caption(
        pd.DataFrame(rows),
        f"The seed's four benchmarks through lm-eval's own tasks ({summary['mode']} data: "
        "benchmark_data/SOURCE.md offline); IFEval prompt-level strict accuracy, MMLU accuracy, TruthfulQA "
        f"MC2, HellaSwag length-normalised accuracy. {counted}; value [95% percentile-bootstrap interval]. "
        f"Source: {paths.eval / 'summary.json'}",
    )


def alignment_tax_table(paths: RunPaths) -> Any:
    """Each adapter minus the base model on the knowledge benchmarks, paired on the same questions."""
    import pandas as pd

    summary = read_json(paths.eval / "summary.json")
    paired = summary.get("paired") or {}
    rows = []
    for adapter in ADAPTERS:
        tasks = paired.get(f"{adapter} - base", {}).get("tasks", {})
        for task in KNOWLEDGE_BENCHMARKS:
            label, metric = SEED_BENCHMARKS[task]
            d = tasks.get(task, {}).get(metric)
            if d is None:
                continue
            binary = d.get("mcnemar_p") is not None
            rows.append(
                {
                    "adapter": METHOD_LABELS[adapter],
                    "benchmark": label,
                    "questions": d["n"],
                    # rounded first: identical answers leave float noise that would print as -0.000
                    "change against base": _signed(round(d["difference"], 9)),
                    "95% paired interval": f"[{_signed(round(d['ci_low'], 9))}, {_signed(round(d['ci_high'], 9))}]",
                    "exact McNemar p": f"{d['mcnemar_p']:.3g}" if binary else "does not apply",
                }
            )
    return _caption(
        pd.DataFrame(rows),
        "Alignment tax: adapter \u2212 base model on the same questions (a negative change is knowledge "
        "lost to instruction tuning); paired percentile-bootstrap interval; McNemar for 0/1 accuracy "
        f"(TruthfulQA MC2 is a probability per question). Source: {paths.eval / 'summary.json'} (paired)",
    )


def anchor_table(paths: RunPaths, cfg: Any) -> Any:
    """The base model's and the teacher's benchmark figures beside their model cards' (`anchors`)."""
    import pandas as pd

    from .anchors import anchor_rows

    rows = anchor_rows(cfg, read_json(paths.eval / "summary.json"))
    if not rows:
        return f"No published figures are recorded for {cfg.models.target} or {cfg.models.generator}."
    return _caption(
        pd.DataFrame(rows),
        "An outside anchor: this run's base model and teacher beside the figures their model cards "
        "publish (percent; this run's value [95% interval], n documents). The gap is explained by the "
        f"settings that differ, or it is a finding. Source: {paths.eval / 'summary.json'}; the cards",
    )


def prompt_echo_frame(paths: RunPaths) -> Any:
    """Per model and generation task: answers that open by repeating the prompt."""
    import pandas as pd

    summary = read_json(paths.eval / "summary.json")
    rows = [
        {
            "method": METHOD_LABELS[method],
            "task": task,
            "answers": e["answers"],
            "open by repeating the prompt": e["echo"],
            "share": round(e["echo_share"], 3),
            "of which asked for (repeat_prompt)": e["echo_asked"],
        }
        for method, tasks in (summary.get("prompt_echo") or {}).items()
        for task, e in tasks.items()
    ]
    return _caption(
        pd.DataFrame(rows),
        "An answer repeats the prompt when its first 8 words are the prompt's (case and edge punctuation "
        "aside); a restated request can satisfy IFEval instructions by itself, which inflates a base "
        f"model's score. Source: {paths.eval / 'summary.json'} (prompt_echo)",
    )
