"""What `run_all.py` prints while it runs, and each step's full log.

The console gets one line per step as it starts (what it does, why it runs) and one when it ends,
plus the progress bars of the step's long loops. Everything else a step produces (papermill's
per-cell log, the cells' stdout and stderr, warnings) goes to `<run dir>/logs/<step>.log`, appended
and flushed record by record, which a failure names.

The bars are tqdm's text bars, which a kernel writes to its stderr stream (a carriage return, then the
bar); papermill hands each stream message to `ProgressSink`. On a terminal the latest bar is redrawn in
place on one status line. Where stdout is not a terminal (CI, `tee`, a file), a bar gets a plain line
only once it has run for `PLAIN_EVERY_S` and then every `PLAIN_EVERY_S`, never carriage returns.
Inside the kernel, `text_progress` gives trainers that text bar where transformers would draw HTML.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .ledger import now_iso
from .store import RunPaths

PLAIN_EVERY_S = 30.0  # a plain progress line per long loop, at most this often, where stdout is no terminal
LOG_EVERY_S = 10.0  # how often a running bar's state is written to the step's log

# tqdm's default format, with and without a known total:
# "desc:  45%|████▌     | 45/100 [00:10<00:12,  4.50it/s, postfix]" and "desc: 45it [00:10,  4.50it/s]"
_WITH_TOTAL = re.compile(
    r"^(?:(?P<desc>.*?): *)?(?P<pct>\d{1,3})%\|[^|]*\| *(?P<n>[\d.]+[kMGT]?)/(?P<total>[\d.]+[kMGT]?)"
    r" \[(?P<info>[^\]]*)\]$"
)
_NO_TOTAL = re.compile(
    r"^(?:(?P<desc>.*?): *)?(?P<n>[\d.]+[kMGT]?)(?P<unit>[^\s\[]*) \[(?P<info>\d+:\d\d[^\]]*)\]$"
)
_SCALE = {"k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm moves the cursor between nested bars


@dataclass(frozen=True)
class Bar:
    """One drawn state of a tqdm bar."""

    desc: str
    n: float
    total: float | None
    counts: str  # "45/100", or "45it" without a total
    info: str  # "00:10<00:12,  4.50it/s, postfix"

    @property
    def finished(self) -> bool:
        return self.total is not None and self.n >= self.total

    def line(self, width: int = 0) -> str:
        """The state in a line: a `width`-character bar when > 0, else plain text (no block glyphs)."""
        lead = f"{self.desc}: " if self.desc else ""
        if not self.total:
            return f"{lead}{self.counts} [{self.info}]"
        fraction = min(1.0, self.n / self.total)
        if width <= 0:
            return f"{lead}{self.counts} ({fraction:.0%}) [{self.info}]"
        filled = round(fraction * width)
        return f"{lead}{fraction:4.0%} |{'#' * filled}{'.' * (width - filled)}| {self.counts} [{self.info}]"


def _number(text: str) -> float:
    return float(text[:-1]) * _SCALE[text[-1]] if text[-1] in _SCALE else float(text)


def parse_bar(segment: str) -> Bar | None:
    """The bar drawn in one carriage-return segment of tqdm's output, or None if it is not a bar."""
    text = segment.strip()
    match = _WITH_TOTAL.match(text)
    if match:
        total = _number(match["total"])
        counts = f"{match['n']}/{match['total']}"
        return Bar(match["desc"] or "", _number(match["n"]), total, counts, " ".join(match["info"].split()))
    match = _NO_TOTAL.match(text)
    if match:
        counts = f"{match['n']}{match['unit']}"
        return Bar(match["desc"] or "", _number(match["n"]), None, counts, " ".join(match["info"].split()))
    return None


def bars_in(text: str) -> tuple[list[Bar], str]:
    """The bars drawn in a chunk of stream output (the last state per line), and the rest of the text
    with tqdm's redraws collapsed to what a terminal would show."""
    bars, rest = [], []
    for line in _CURSOR.sub("", text).split("\n"):
        shown = next((s for s in reversed(line.split("\r")) if s.strip()), "")
        bar = parse_bar(shown)
        if bar is not None:
            bars.append(bar)
        elif shown.strip():
            rest.append(shown.rstrip())
    return bars, "\n".join(rest)


@dataclass
class _Seen:
    since: float  # when this bar was first drawn, or last written
    total: float | None
    written: bool = False
    finished: bool = False  # tqdm redraws a closed bar: its final state is written once


class ProgressLines:
    """Plain lines from tqdm bars: a bar's state once it has run `every_s` (then every `every_s`), and
    its final state if anything of it was written before, or always with `finals`."""

    def __init__(self, every_s: float, finals: bool = False) -> None:
        self.every_s = every_s
        self.finals = finals
        self._bars: dict[str, _Seen] = {}

    def feed(self, bars: list[Bar], now: float) -> list[str]:
        lines = []
        for bar in bars:
            seen = self._bars.get(bar.desc)
            # a new loop under the same description starts at 0 or has another total
            if seen is None or bar.n == 0 or bar.total != seen.total:
                seen = self._bars[bar.desc] = _Seen(now, bar.total)
            if bar.finished:
                if (seen.written or self.finals) and not seen.finished:
                    lines.append(bar.line())
                seen.finished = True
            elif now - seen.since >= self.every_s:
                lines.append(bar.line())
                seen.since, seen.written = now, True
        return lines


class Console:
    """Lines for people on stdout. On a terminal, one status line under them shows the latest bar."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self._status = False
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            self._clear()
            self.stream.write(text + "\n")
            self.stream.flush()

    def status(self, text: str) -> None:
        """Redraw the status line (a terminal only), cut to the terminal's width."""
        width = max(20, shutil.get_terminal_size().columns - 1)
        with self._lock:
            self.stream.write("\r" + text[:width] + "\x1b[K")
            self.stream.flush()
            self._status = True

    def clear(self) -> None:
        """Remove the status line, e.g. before an error goes to stderr."""
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if self._status:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._status = False

    def progress(self, label: str) -> ProgressSink:
        return ProgressSink(self, label)


class ProgressSink:
    """papermill's `stderr_file` for one step: shows the bars in the kernel's stderr on the console."""

    def __init__(self, console: Console, label: str) -> None:
        self.console = console
        self.label = label
        self.lines = ProgressLines(PLAIN_EVERY_S)

    def write(self, text: str) -> None:
        bars, _ = bars_in(text)
        if not bars:
            return
        if self.console.tty:
            self.console.status(f"  {self.label}: {bars[-1].line(width=20)}")
            return
        for line in self.lines.feed(bars, time.monotonic()):
            self.console.line(f"run_all: {self.label}: {line}")

    def flush(self) -> None:
        pass


def log_path(paths: RunPaths, name: str) -> Path:
    """Where the full log of a step (or a report notebook) goes."""
    return paths.root / "logs" / f"{name}.log"


class _LogHandler(logging.Handler):
    def __init__(self, file: TextIO) -> None:
        super().__init__(logging.DEBUG)
        self.file = file
        self.bars = ProgressLines(LOG_EVERY_S, finals=True)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            bars, rest = bars_in(record.getMessage())
            lines = self.bars.feed(bars, time.monotonic())
            if rest:
                lines.insert(0, rest)
            if lines:
                self.file.write("\n".join(lines) + "\n")
                self.file.flush()
        except Exception:
            self.handleError(record)


class StepLog:
    """While inside: every log record of this process (papermill's per-cell log and the kernel's
    output, which papermill logs) is appended to `path`, flushed per record, fsynced at the end."""

    def __init__(self, path: Path, header: str) -> None:
        self.path = path
        self.header = header
        self._file: TextIO | None = None
        self._handler: _LogHandler | None = None

    def __enter__(self) -> StepLog:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        self._file.write(f"=== {now_iso()} {self.header}\n")
        self._file.flush()
        self._handler = _LogHandler(self._file)
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._file is not None and self._handler is not None
        logging.getLogger().removeHandler(self._handler)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def setup_logging(verbose: bool) -> None:
    """Log records go to the running step's log (`StepLog`); with `verbose` to stdout as well, which
    brings back papermill's per-cell log on the console."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    root.addHandler(logging.StreamHandler(sys.stdout) if verbose else logging.NullHandler())
    if verbose:
        root.handlers[-1].setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("papermill").setLevel(logging.INFO)


def notebook_title(path: Path) -> str:
    """What a step or report notebook does, in a few words: its title without the "Step NN —"."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return ""
    match = re.search(r"^# # (.+)$", text, re.M)
    return re.sub(r"^Step \w+ [—-] ", "", match[1].strip()) if match else ""


def duration(seconds: float) -> str:
    """Seconds as people read them: '12.4 s', '455 s (7.6 min)'."""
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def text_progress(trainer: Any) -> None:
    """Give a trainer tqdm's text bar where transformers chose its notebook one.

    In a kernel transformers draws training progress as HTML display updates, which only a live
    notebook front end shows; the text bar reaches the executed notebook, the step's log and the
    console alike, named "training" so a plain progress line says what it counts.
    """
    from transformers.trainer_callback import ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback

    class TrainingBar(ProgressCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description("training")

    if trainer.pop_callback(NotebookProgressCallback) is not None:
        trainer.add_callback(TrainingBar())
