"""What run_all.py prints: tqdm's bars read from a kernel's stderr, the console's lines, the step logs."""

import io
import logging

from tqdm import tqdm

from synthetic_instruction_tuner import console
from synthetic_instruction_tuner.console import Console, ProgressLines, StepLog, bars_in, notebook_title
from synthetic_instruction_tuner.steps import PIPELINE


def _tqdm_chunks(total: int | None, desc: str = "generating", **kw) -> list[str]:
    """What tqdm writes to a kernel's stderr, one write per chunk, as papermill passes it on."""
    chunks: list[str] = []

    class Stream(io.StringIO):
        def write(self, text: str) -> int:
            chunks.append(text)
            return len(text)

    bar = tqdm(total=total, desc=desc, file=Stream(), mininterval=0, ascii=False, **kw)
    for _ in range(total or 5):
        bar.update(1)
    bar.close()
    return [c for c in chunks if c]


def test_tqdm_output_is_read_as_bars_and_other_text_is_kept():
    chunks = _tqdm_chunks(8, unit="seq")
    states = [bar for chunk in chunks for bar in bars_in(chunk)[0]]
    assert [b.n for b in states][-1] == 8 and states[-1].finished and states[-1].desc == "generating"
    assert states[-1].line().startswith("generating: 8/8 (100%) [")
    assert "|" not in states[-1].line() and "\r" not in states[-1].line()
    assert states[0].line(width=10).startswith("generating:   0% |..........| 0/8 [")
    no_total = [b for chunk in _tqdm_chunks(None, desc="requests") for b in bars_in(chunk)[0]]
    assert no_total[-1].line().startswith("requests: 5it [")
    bars, rest = bars_in("\r" + chunks[1].strip("\r") + "\n/tmp/x.py:6: UserWarning: careful\n\x1b[A")
    assert len(bars) == 1 and rest == "/tmp/x.py:6: UserWarning: careful"
    assert bars_in("Loaded 24 instructions [not a bar]\n") == ([], "Loaded 24 instructions [not a bar]")


def test_plain_progress_lines_only_for_long_loops():
    chunks = _tqdm_chunks(6)
    states = [bar for chunk in chunks for bar in bars_in(chunk)[0]]
    short = ProgressLines(every_s=30)
    assert [line for i, b in enumerate(states) for line in short.feed([b], now=i)] == []
    slow = ProgressLines(every_s=30)
    lines = [line for i, b in enumerate(states) for line in slow.feed([b], now=20.0 * i)]
    # a line once the loop has run 30 s, then every 30 s, and its final state once
    assert [line.split(" [")[0] for line in lines] == [
        "generating: 2/6 (33%)",
        "generating: 4/6 (67%)",
        "generating: 6/6 (100%)",
    ]
    # two processes drawing one loop: their states interleave, and the loop still gets its lines
    two = ProgressLines(every_s=30)
    pairs = [[states[i], states[i - 1]] for i in range(1, len(states))]
    assert [line.split(" [")[0] for i, pair in enumerate(pairs) for line in two.feed(pair, now=20.0 * i)][
        :1
    ] == ["generating: 3/6 (50%)"]
    logged = ProgressLines(every_s=30, finals=True)
    first_final = next(b for b in states if b.finished)  # tqdm draws the final state again on close
    assert [line for b in states for line in logged.feed([b], now=0)] == [first_final.line()]


def test_console_draws_bars_in_place_on_a_terminal_and_as_lines_elsewhere(monkeypatch):
    monkeypatch.setattr(console, "PLAIN_EVERY_S", 0.0)
    chunks = _tqdm_chunks(3)
    tty = io.StringIO()
    screen = Console(tty, tty=True)
    sink = screen.progress("01_generate_instructions")
    for chunk in chunks:
        sink.write(chunk)
    screen.line("run_all: 01_generate_instructions: ok in 1.0 s")
    text = tty.getvalue()
    assert "\r  01_generate_instructions: generating: 100% |####################| 3/3 [" in text
    assert text.endswith("\r\x1b[K" + "run_all: 01_generate_instructions: ok in 1.0 s\n")
    piped = io.StringIO()
    plain = Console(piped, tty=False)
    sink = plain.progress("01_generate_instructions")
    for chunk in chunks:
        sink.write(chunk)
    lines = piped.getvalue().splitlines()
    assert lines and all(line.startswith("run_all: 01_generate_instructions: generating: ") for line in lines)
    assert "\r" not in piped.getvalue() and "\x1b" not in piped.getvalue()


def test_step_log_appends_every_record_and_thins_bar_redraws(tmp_path):
    log = tmp_path / "logs" / "01_generate_instructions.log"
    papermill = logging.getLogger("papermill")
    papermill.setLevel(logging.INFO)
    for attempt in (1, 2):
        with StepLog(log, f"01_generate_instructions, attempt {attempt}"):
            papermill.info("Executing Cell 1---------------------------------------")
            for chunk in _tqdm_chunks(50):
                papermill.warning(chunk)
            papermill.warning("/tmp/x.py:6: UserWarning: careful\n")
        papermill.info("outside any step: not logged")
    text = log.read_text()
    assert text.count("attempt 1") == 1 and text.count("attempt 2") == 1
    assert text.count("Executing Cell 1") == 2 and text.count("UserWarning: careful") == 2
    assert text.count("generating: 50/50 (100%)") == 2 and text.count("generating:") == 2
    assert "\r" not in text and "outside any step" not in text


def test_every_step_says_what_it_does_in_a_few_words():
    titles = {step.name: notebook_title(step.path) for step in PIPELINE}
    assert titles["01_generate_instructions"] == "Magpie instructions"
    assert titles["05_sft_lora"] == "LoRA SFT"
    assert all(0 < len(title.split()) <= 8 and not title.startswith("Step") for title in titles.values())


def test_a_kernels_own_log_lines_go_to_the_step_log_not_the_console(tmp_path, capfd):
    from synthetic_instruction_tuner.orchestrator import execute_notebook

    source = tmp_path / "step.py"
    source.write_text(
        "# %%\nfrom ipykernel.kernelapp import IPKernelApp\n\n"
        'IPKernelApp.instance().log.warning("a line of the kernel process")\nprint("cell output")\n'
    )
    log = tmp_path / "logs" / "step.log"
    execute_notebook(source, tmp_path / "step.ipynb", {}, progress=io.StringIO(), log=log)
    assert "a line of the kernel process" in log.read_text()
    assert "a line of the kernel process" not in capfd.readouterr().err
