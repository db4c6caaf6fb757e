"""Tables and figures for the analysis notebooks, and the reports' index page."""

from __future__ import annotations

import html
from pathlib import Path

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
