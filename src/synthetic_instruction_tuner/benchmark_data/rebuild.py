"""Rebuild the shipped benchmark files from the authors' upstream files and record their provenance.

    python -m synthetic_instruction_tuner.benchmark_data.rebuild \\
        --ifeval input_data.jsonl --mmlu hendrycks-test/data --truthfulqa mc_task.json \\
        [--hellaswag hellaswag_val.jsonl | HUB_ROWS_DIR] [--out DIR]

Each option names the upstream file (MMLU: the folder holding dev/ and test/) at the commit listed in
`SOURCES`; HellaSwag's may also be a `datasets` `save_to_disk` folder of the Hub's validation rows.
Only the benchmarks given are rebuilt; the others keep their provenance entry. A benchmark never
rebuilt stays `open`: no files, and lm-eval's task for it cannot run offline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from ..errors import PipelineError
from . import CONVERTERS, DATA_DIR, SOURCES, authors_layout, read_jsonl_gz, sha256


def _upstream_files(path: Path) -> list[Path]:
    """What a converter reads: the file itself, or every file of a folder (MMLU's dev/ and test/ CSVs,
    a `datasets` copy of HellaSwag's Hub rows)."""
    if not path.is_dir():
        return [path]
    csvs = sorted(p for split in ("dev", "test") for p in (path / split).glob("*.csv"))
    return csvs or sorted(p for p in path.rglob("*") if p.is_file())


def rebuild(upstream: dict[str, Path], out: Path = DATA_DIR) -> dict[str, Any]:
    """Convert each given benchmark into `out` and write `out/provenance.json`; return it."""
    record_path = out / "provenance.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    for name in SOURCES:
        record.setdefault(name, {**SOURCES[name], "status": "open", "files": {}})
    for name, path in upstream.items():
        if not path.exists():
            raise PipelineError(f"--{name}: {path} does not exist; pass the upstream file at {SOURCES[name]}")
        shutil.rmtree(out / name, ignore_errors=True)
        written = CONVERTERS[name](path, out)
        record[name] = {
            **SOURCES[name],
            "status": "shipped",
            "upstream_sha256": {
                str(p.relative_to(path)) if path.is_dir() else p.name: sha256(p)
                for p in _upstream_files(path)
            },
            "files": {str(p.relative_to(out)): sha256(p) for p in written},
        }
        if name == "hellaswag" and path.is_dir():
            # the Hub's rows, not the authors' file: record how close to it they are
            rows = [row for p in written for row in read_jsonl_gz(p)]
            record[name]["read"] = "a datasets copy of the Hub's rows (SOURCE.md)"
            record[name]["rows"] = len(rows)
            record[name]["authors_layout_bytes"] = len(authors_layout(rows))
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name in SOURCES:
        flag = "truthfulqa" if name == "truthfulqa_mc" else name
        parser.add_argument(f"--{flag}", dest=name, type=Path, help=f"{SOURCES[name]['path']}")
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) for name in SOURCES if getattr(args, name) is not None}
    if not given:
        parser.error("name at least one upstream file")
    try:
        record = rebuild(given, args.out)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, entry in record.items():
        print(f"{name}: {entry['status']}, {len(entry['files'])} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
