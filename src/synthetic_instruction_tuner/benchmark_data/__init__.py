"""Offline copies of the seed's four benchmarks, in the schema of the Hub datasets lm-eval reads.

lm-eval's own tasks (`ifeval`, `mmlu`, `truthfulqa_mc2`, `hellaswag`) read these files in place of
the Hub (see `offline_tasks`), so every field their `process_docs`, `doc_to_text` and `doc_to_choice`
use must be as on the Hub: `google/IFEval` (key, prompt, instruction_id_list, kwargs), `cais/mmlu`
(question, subject, choices, answer as 0-3), `truthful_qa` `multiple_choice` (question, mc1_targets
and mc2_targets as {choices, labels}), `Rowan/hellaswag` (label as a string).

Each converter turns the authors' upstream files into gzip-compressed JSONL written byte for byte
the same on every machine (no timestamp in the gzip header); `python -m
synthetic_instruction_tuner.benchmark_data.rebuild` runs them and records `provenance.json`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError

DATA_DIR = Path(__file__).parent
PROVENANCE = DATA_DIR / "provenance.json"
HELLASWAG_SHARD_ROWS = 2500  # keeps each shipped file under 2 MiB

# Where each benchmark comes from; `rebuild` adds the sha256 of what it read and wrote.
SOURCES: dict[str, dict[str, Any]] = {
    "ifeval": {
        "upstream": "google-research/google-research",
        "commit": "19638399cc9e03623c5b9087a1d6fa8813974ce9",
        "path": "instruction_following_eval/data/input_data.jsonl",
        "license": "Apache-2.0",
        "hub_dataset": "google/IFEval (split train)",
        "rule": "all 541 prompts, rows unchanged",
    },
    "mmlu": {
        "upstream": "hendrycks/test",
        "commit": "785eba57b455b9f9be12a0d3c1106d67274fea0e",
        "path": "data/dev/*_dev.csv, data/test/*_test.csv",
        "license": "MIT",
        "hub_dataset": "cais/mmlu (57 subject configs, splits test and dev)",
        "rule": "every row of the 57 subjects' test and dev splits; answer letter A-D as 0-3",
    },
    "truthfulqa_mc": {
        "upstream": "sylinrl/TruthfulQA",
        "commit": "013686a06be7a7bde5bf8223943e106c7250123c",
        "path": "data/mc_task.json",
        "license": "Apache-2.0",
        "hub_dataset": "truthful_qa (config multiple_choice, split validation)",
        "rule": "all 817 questions; each {answer: label} map as {choices, labels} in file order",
    },
    "hellaswag": {
        "upstream": "rowanz/hellaswag",
        "commit": "a29ff8e9a04bba4bd6588223785ce105328adc57",
        "path": "data/hellaswag_val.jsonl",
        "license": "MIT",
        "hub_dataset": "Rowan/hellaswag (split validation)",
        "rule": f"every validation row, label as a string, in shards of {HELLASWAG_SHARD_ROWS} rows",
    },
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl_gz(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Gzip JSONL with a fixed header (mtime 0, no file name), so a rebuild is byte-identical."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(buffer.getvalue())
    return path


def read_jsonl_gz(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def convert_ifeval(upstream: Path, out: Path) -> list[Path]:
    """input_data.jsonl -> ifeval/train.jsonl.gz (google/IFEval's one split is `train`)."""
    rows = [json.loads(line) for line in upstream.read_text(encoding="utf-8").splitlines() if line.strip()]
    keys = ("key", "prompt", "instruction_id_list", "kwargs")
    return [write_jsonl_gz(out / "ifeval" / "train.jsonl.gz", ({k: r[k] for k in keys} for r in rows))]


def convert_mmlu(upstream: Path, out: Path) -> list[Path]:
    """hendrycks/test's data/{dev,test}/<subject>_<split>.csv (no header: question, A-D, letter) ->
    mmlu/<split>/<subject>.jsonl.gz."""
    written = []
    for split in ("test", "dev"):
        files = sorted((upstream / split).glob(f"*_{split}.csv"))
        if len(files) != 57:
            raise DataError(f"{upstream / split}: expected MMLU's 57 subject files, found {len(files)}")
        for csv_path in files:
            subject = csv_path.name.removesuffix(f"_{split}.csv")
            with csv_path.open(newline="", encoding="utf-8") as fh:
                rows = [
                    {"question": r[0], "subject": subject, "choices": r[1:5], "answer": "ABCD".index(r[5])}
                    for r in csv.reader(fh)
                ]
            written.append(write_jsonl_gz(out / "mmlu" / split / f"{subject}.jsonl.gz", rows))
    return written


def convert_truthfulqa(upstream: Path, out: Path) -> list[Path]:
    """mc_task.json -> truthfulqa_mc/validation.jsonl.gz with the Hub's {choices, labels} targets."""
    rows = [
        {
            "question": item["question"],
            **{
                key: {"choices": list(item[key]), "labels": list(item[key].values())}
                for key in ("mc1_targets", "mc2_targets")
            },
        }
        for item in json.loads(upstream.read_text(encoding="utf-8"))
    ]
    return [write_jsonl_gz(out / "truthfulqa_mc" / "validation.jsonl.gz", rows)]


HELLASWAG_KEYS = (
    "ind",
    "activity_label",
    "ctx_a",
    "ctx_b",
    "ctx",
    "endings",
    "source_id",
    "split",
    "split_type",
)


def _hellaswag_rows(upstream: Path) -> list[dict[str, Any]]:
    """The validation rows of the authors' `hellaswag_val.jsonl`, or of a `datasets` copy of the Hub's
    rows (a `save_to_disk` folder), which the Hub's loading script parsed from that same file."""
    if upstream.is_dir():
        from datasets import load_from_disk

        return load_from_disk(str(upstream)).to_list()
    return [json.loads(line) for line in upstream.read_text(encoding="utf-8").splitlines() if line.strip()]


def convert_hellaswag(upstream: Path, out: Path) -> list[Path]:
    """hellaswag_val.jsonl (or the Hub's rows) -> hellaswag/validation-NN.jsonl.gz, the Hub's fields
    and string labels."""
    rows = [
        {**{k: r[k] for k in HELLASWAG_KEYS}, "label": str(r["label"])} for r in _hellaswag_rows(upstream)
    ]
    return [
        write_jsonl_gz(out / "hellaswag" / f"validation-{i // HELLASWAG_SHARD_ROWS:02d}.jsonl.gz", chunk)
        for i in range(0, len(rows), HELLASWAG_SHARD_ROWS)
        for chunk in [rows[i : i + HELLASWAG_SHARD_ROWS]]
    ]


def authors_layout(rows: Iterable[dict[str, Any]]) -> bytes:
    """Rows written back in the layout of the authors' `hellaswag_val.jsonl` (their key order, integer
    labels, ASCII escapes): compared with the length the Hub's loading script recorded for that file."""
    order = (
        "ind",
        "activity_label",
        "ctx_a",
        "ctx_b",
        "ctx",
        "split",
        "split_type",
        "label",
        "endings",
        "source_id",
    )
    return "".join(
        json.dumps({k: int(r[k]) if k == "label" else r[k] for k in order}) + "\n" for r in rows
    ).encode()


CONVERTERS = {
    "ifeval": convert_ifeval,
    "mmlu": convert_mmlu,
    "truthfulqa_mc": convert_truthfulqa,
    "hellaswag": convert_hellaswag,
}


def provenance() -> dict[str, Any]:
    return json.loads(PROVENANCE.read_text())


def shipped(benchmark: str) -> list[Path]:
    """The shipped files of one benchmark (provenance.json's list); empty where the row is open."""
    entry = provenance().get(benchmark, {})
    return [DATA_DIR / name for name in entry.get("files", {})]
