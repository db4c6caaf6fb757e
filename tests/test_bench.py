"""The benchmarks' command lines run end to end on the smoke profile and print their ratios.

They measure nothing meaningful on tiny random models; this keeps the commands working."""

import re
import subprocess
import sys

from conftest import REPO


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "synthetic_instruction_tuner.bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_generation_bench_prints_both_modes_and_the_ratio():
    done = _bench("generation", "--profile", "smoke", "--num-outputs", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"one prompt at a time: +[\d.]+ tokens/s", done.stdout)
    assert re.search(r"batched engine \(bs \d+\): +[\d.]+ tokens/s", done.stdout)
    assert re.search(r"speed-up: [\d.]+x", done.stdout)


def test_sft_bench_compares_trl_defaults_ours_and_a_variant(smoke_run):
    run, _ = smoke_run
    done = _bench(
        "sft",
        "--profile",
        "smoke",
        "--run-dir",
        str(run),
        "--steps",
        "2",
        "--variant",
        "sft.padding_free=false",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for label in ("trl", "ours", "ours+sft.padding_free=false"):
        assert re.search(rf"^{re.escape(label)}: +[\d.]+ samples/s .* eval loss [\d.]+", done.stdout, re.M)
    ratios = re.findall(r"/ TRL defaults: speed [\d.]+x, peak memory [\d.]+x, eval loss [\d.]+x", done.stdout)
    assert len(ratios) == 2


def test_sft_bench_names_a_missing_run(tmp_path):
    done = _bench("sft", "--profile", "smoke", "--run-dir", str(tmp_path / "nothing"), "--steps", "1")
    assert done.returncode != 0
    assert done.stderr.strip().count("\n") == 0 and "nothing" in done.stderr


def test_answering_bench_prints_both_models_and_how_many_answers_agree():
    done = _bench("answering", "--profile", "smoke", "--task", "sit_ifbench")
    assert done.returncode == 0, done.stderr[-2000:]
    for label in ("lm-eval hf", "step 07"):
        assert re.search(rf"^{label}: [\d.]+ s, prompt strict [\d.]+$", done.stdout, re.M)
    got = re.search(r"speed [\d.]+x on (\d+) prompts; (\d+) answers identical", done.stdout)
    assert got and int(got[1]) > 0 and int(got[2]) == int(got[1])
