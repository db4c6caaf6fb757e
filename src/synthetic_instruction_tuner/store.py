"""Durable artifacts: append-only JSONL that survives a kill, atomic JSON writes, schema checks.

A step appends each finished record with flush + fsync, so a SIGKILL loses at most the line being
written. On resume, a torn last line (no trailing newline, not valid JSON) is cut off with a warning
and regenerated; any other unreadable line is an error naming the file and line, and nothing is
rewritten, so a human can look at it.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError


@dataclass(frozen=True)
class RunPaths:
    """Where a run's artifacts live (see the artifact table in the README)."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def notebooks(self) -> Path:
        return self.root / "notebooks"

    @property
    def ledger(self) -> Path:
        return self.root / "ledger.jsonl"

    def file(self, name: str) -> Path:
        """Path of a data artifact, e.g. file("instructions.jsonl")."""
        return self.data / name


def run_paths(run_dir: str | Path) -> RunPaths:
    root = Path(run_dir).expanduser()
    for sub in ("data", "adapters", "eval", "notebooks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return RunPaths(root)


def _parse_lines(path: Path, text: str, required: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    required = tuple(required)
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                "fix or delete that line, or rerun the step that writes this file with --force"
            ) from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        missing = [key for key in required if key not in record]
        if missing:
            raise DataError(f"{path}:{lineno}: missing key {missing[0]!r} (required: {', '.join(required)})")
        yield lineno, record


def read_jsonl(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Read every record of a finished artifact; any bad line is a DataError naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; run the step that writes it first")
    return [record for _, record in _parse_lines(path, path.read_text(encoding="utf-8"), required)]


def _split_torn_tail(path: Path, text: str) -> tuple[str, str]:
    """Split off a last line left half-written by a kill: no trailing newline and not valid JSON."""
    if not text or text.endswith("\n"):
        return text, ""
    head, _, tail = text.rpartition("\n")
    try:
        json.loads(tail)
    except json.JSONDecodeError:
        return (head + "\n") if head else "", tail
    return text + "\n", ""


class JsonlAppender:
    """Append-only JSONL writer that resumes: records already on disk are loaded and never repeated."""

    def __init__(self, path: str | Path, key: str = "id", required: Iterable[str] = ()) -> None:
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        self._keys: set[Any] = set()
        if self.path.exists():
            text = self.path.read_text(encoding="utf-8")
            good, torn = _split_torn_tail(self.path, text)
            if torn:
                warnings.warn(
                    f"{self.path}: dropped a torn last line ({len(torn)} bytes, left by an interrupted run); "
                    "it will be regenerated",
                    stacklevel=2,
                )
                with open(self.path, "r+b") as fh:
                    fh.truncate(len(good.encode("utf-8")))
            elif good != text:  # valid last record missing only its newline
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write("\n")
            for lineno, record in _parse_lines(self.path, good, (key, *required)):
                if record[key] in self._keys:
                    raise DataError(f"{self.path}:{lineno}: duplicate {key} {record[key]!r}")
                self.records.append(record)
                self._keys.add(record[key])
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open across appends

    def __contains__(self, key: Any) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self.records)

    def append(self, records: dict[str, Any] | Iterable[dict[str, Any]]) -> int:
        """Write records durably (flush + fsync); records whose key is already present are skipped."""
        if isinstance(records, dict):
            records = [records]
        lines = []
        for record in records:
            if record[self.key] in self._keys:
                continue
            self._keys.add(record[self.key])
            self.records.append(record)
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        if lines:
            self._fh.write("".join(lines))
            self._fh.flush()
            os.fsync(self._fh.fileno())
        return len(lines)

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write through a temporary file and rename, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write a whole derived artifact at once (atomically), e.g. the filtered SFT set."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; run the step that writes it first")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def count_jsonl(path: str | Path) -> int:
    """Number of complete lines; 0 for a missing file (used to decide whether a step is done)."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for line in fh if line.endswith(b"\n") and line.strip())


def check_resumable(appender: JsonlAppender, expected: dict[str, Any]) -> None:
    """Refuse to resume a file whose records were generated with other settings.

    Mixing records from two configurations would silently corrupt the data set; the user decides
    whether to regenerate (`--force`) or to put the old settings back.
    """
    expected = json.loads(json.dumps(expected))  # compare in JSON terms (tuples become lists)
    for lineno, record in enumerate(appender.records, start=1):
        for key, value in expected.items():
            if record.get(key) != value:
                raise DataError(
                    f"{appender.path}:{lineno}: {key} {record.get(key)!r} differs from this run's {value!r}; "
                    "rerun the step with --force to regenerate it, or restore the earlier settings"
                )
