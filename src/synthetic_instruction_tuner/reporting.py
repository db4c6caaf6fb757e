"""Tables and figures for the analysis notebooks, and the reports' index page."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .ledger import now_iso
from .store import RunPaths


def write_index(reports_dir: Path, paths: RunPaths, profile: str, pages: list[str]) -> Path:
    """index.html linking the rendered reports, saying which run, profile and date they describe."""
    items = "\n".join(f'<li><a href="{html.escape(p)}">{html.escape(Path(p).stem)}</a></li>' for p in pages)
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Synthetic Instruction Tuner reports</title>"
        "</head><body>"
        f"<h1>Synthetic Instruction Tuner — {html.escape(profile)} profile</h1>"
        f"<p>Run directory: <code>{html.escape(str(paths.root))}</code><br>Rendered: {now_iso()}</p>"
        f"<ul>{items}</ul></body></html>"
    )
    target = reports_dir / "index.html"
    target.write_text(body, encoding="utf-8")
    return target


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
