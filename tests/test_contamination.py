"""Benchmark contamination: the n-gram index of the shipped benchmarks, step 03's guard and the
check of the rows as trained against them and the held-out prompts (data/contamination.json)."""

from __future__ import annotations

import json

import pytest

from synthetic_instruction_tuner import constraints as ic
from synthetic_instruction_tuner import reporting
from synthetic_instruction_tuner.benchmark_data import read_jsonl_gz, shipped
from synthetic_instruction_tuner.config import FilteringConfig, load_config
from synthetic_instruction_tuner.contamination import (
    Doc,
    NgramIndex,
    benchmark_index,
    check_training_data,
    ngrams,
    split_prompt,
    words,
)
from synthetic_instruction_tuner.filtering import filter_records, run_filter_step
from synthetic_instruction_tuner.steps import PIPELINE, current_fingerprint
from synthetic_instruction_tuner.store import read_json, read_jsonl, run_paths, write_jsonl

NO_LANG = FilteringConfig(language=None)
CLEAN = "Give me three practical tips for keeping a small vegetable garden healthy through a dry summer."
RESPONSE = (
    "Water early in the morning, mulch the beds to keep moisture in, and group plants by how much they "
    "need. Shade the tender seedlings in the afternoon heat."
)
LOWERCASE = ic.Constraint("change_case:english_lowercase", {})


def ifeval_prompt(key: int) -> str:
    return next(r["prompt"] for r in read_jsonl_gz(*shipped("ifeval")) if r["key"] == key)


@pytest.fixture(scope="module")
def benchmarks() -> NgramIndex:
    """The real index: every shipped benchmark and IFBench's test prompts (about 3 s)."""
    return benchmark_index(8)


def test_words_are_lowercased_without_punctuation():
    assert words("Don't STOP: P.S. it's 42!") == ["don", "t", "stop", "p", "s", "it", "s", "42"]
    assert ngrams("one two three", 2) == ["one two", "two three"] and ngrams("one two", 3) == []
    with pytest.raises(ValueError, match="at least 1"):
        NgramIndex([], 0)


def test_the_index_holds_every_benchmark_prompt_shipped(benchmarks):
    # IFEval's 541, MMLU's 14,079 test and 285 dev questions, TruthfulQA's 817, HellaSwag's 10,042
    # validation contexts, IFBench's 294
    assert benchmarks.counts() == {
        "ifeval": 541,
        "mmlu": 14_364,
        "truthfulqa_mc": 817,
        "hellaswag": 10_042,
        "ifbench": 294,
    }
    assert benchmarks.n == 8 and len(benchmarks.grams) == 950_323  # distinct 8-grams
    assert benchmarks.matches(CLEAN) == []
    question = "What is the smallest country in the world that is at least one square mile in area?"
    [found] = benchmarks.matches(f"Quick quiz for my class: {question}")
    assert (found.benchmark, found.doc_id, found.kind) == ("truthfulqa_mc", "0", "task")
    assert len(found.ngrams) == 10 and "smallest country in the world that is at" in found.ngrams  # 17 words
    [found] = benchmarks.matches("Continue this: A man is sitting on a roof. He starts pulling up shingles.")
    assert (found.benchmark, found.doc_id, found.ngrams) == (
        "hellaswag",
        "24",
        ["a man is sitting on a roof he"],
    )


def test_a_planted_benchmark_prompt_is_removed_with_its_reason_and_document(benchmarks):
    mmlu = "If you know both the actual brightness of an object and its apparent brightness"
    records = [
        {"id": "clean", "instruction": CLEAN, "response": RESPONSE},
        {"id": "ifeval", "instruction": f"Please help. {ifeval_prompt(1939)}", "response": RESPONSE},
        {"id": "mmlu", "instruction": f"{mmlu}, what can I estimate?", "response": RESPONSE},
    ]
    result = filter_records(records, NO_LANG, target=10, benchmarks=benchmarks)
    assert [r["id"] for r in result.kept] == ["clean"]
    assert result.funnel["removed"]["benchmark_overlap"] == 2
    assert result.funnel["stages"][0] == {"stage": "benchmarks", "remaining": 1}
    removed = {r["id"]: r for r in result.removed}
    assert removed["ifeval"]["reason"] == "benchmark_overlap"
    assert (removed["ifeval"]["benchmark"], removed["ifeval"]["doc_id"]) == ("ifeval", "1939")
    assert removed["ifeval"]["ngrams"][0] == "i m a new puppy owner and i"  # the first 3 are listed
    assert removed["ifeval"]["shared_ngrams"] == len(ngrams(ifeval_prompt(1939), 8))  # all of them
    assert (removed["mmlu"]["benchmark"], removed["mmlu"]["doc_id"]) == ("mmlu", "astronomy/test/1")
    assert result.funnel["examples"]["benchmark_overlap"][0]["doc_id"] == "1939"


def test_a_constraint_sentence_the_pipeline_appends_is_template_overlap(benchmarks):
    prompt = ic.add_constraints(CLEAN, [LOWERCASE])
    task, template = split_prompt(prompt, [LOWERCASE])
    assert (task, template) == (CLEAN, ic.describe([LOWERCASE]))
    found = benchmarks.matches(task, template)
    assert found and {m.kind for m in found} == {"template"} and {m.benchmark for m in found} == {"ifeval"}
    # the same sentence written by the generator is part of the task text: it counts, and step 03 removes it
    assert {m.kind for m in benchmarks.matches(prompt)} == {"task"}
    # a prompt that does not end with its constraints' wording is task text throughout
    assert split_prompt(CLEAN, [LOWERCASE]) == (CLEAN, "")


def _training_run(tmp_path):
    """A run directory with step 04's files: a plain SFT row carrying an IFEval prompt, a row with an
    appended constraint, a preference prompt overlapping the held-out prompt, and earlier removals."""
    paths = run_paths(tmp_path)
    held = "Write a limerick about a cat who learns to play the violin."
    write_jsonl(
        paths.file("heldout.jsonl"),
        [{"id": "h1", "key": 0, "prompt": held, "instruction_id_list": [], "kwargs": [], "response": "."}],
    )
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    write_jsonl(
        paths.file("sft_train.jsonl"),
        [
            {"id": "leak", "messages": user(ifeval_prompt(2925)), "constraints": []},
            {
                "id": "constrained",
                "messages": user(ic.add_constraints(CLEAN, [LOWERCASE])),
                "constraints": [{"instruction_id": LOWERCASE.instruction_id, "kwargs": {}}],
            },
            {"id": "plain", "messages": user(CLEAN), "constraints": []},
        ],
    )
    write_jsonl(
        paths.file("preferences.jsonl"), [{"id": "p1", "prompt": user(f"Now: {held}"), "constraints": []}]
    )
    write_jsonl(
        paths.file("filtered_out.jsonl"),
        [
            {"id": "x", "reason": "benchmark_overlap", "benchmark": "mmlu", "doc_id": "astronomy/test/1"},
            {"id": "y", "reason": "near_duplicate", "duplicate_of": "x"},
        ],
    )
    return paths


def test_the_report_counts_task_and_template_overlap_per_benchmark(tmp_path):
    paths = _training_run(tmp_path)
    report = check_training_data(paths, 8)
    assert read_json(paths.file("contamination.json")) == json.loads(json.dumps(report))
    assert report["ngram"] == 8 and report["checked"] == {"sft_train.jsonl": 3, "preferences.jsonl": 1}
    assert set(report["counts"]) == {"ifeval", "mmlu", "truthfulqa_mc", "hellaswag", "ifbench", "heldout"}
    assert report["counts"]["ifeval"] == {
        "documents": 541,
        "rows_task_overlap": 1,  # the leaked prompt
        "rows_template_overlap_only": 1,  # the appended lowercase constraint
        "removed_before_training": 0,
    }
    # the held-out prompts' overlaps are reported, not removed, and not counted as benchmark overlap
    assert report["counts"]["heldout"]["rows_task_overlap"] == 1
    assert report["counts"]["heldout"]["removed_before_training"] == 0
    assert report["counts"]["mmlu"]["removed_before_training"] == 1
    assert report["task_overlap"] == 1
    by_row = {(m["id"], m["benchmark"], m["kind"]): m for m in report["matches"]}
    assert set(by_row) >= {
        ("leak", "ifeval", "task"),
        ("constrained", "ifeval", "template"),
        ("p1", "heldout", "task"),
    }
    assert not any(m["id"] == "plain" for m in report["matches"])
    leak = by_row[("leak", "ifeval", "task")]
    assert set(leak) == {"file", "id", "benchmark", "kind", "doc_ids", "shared_ngrams", "ngrams"}
    assert leak["file"] == "sft_train.jsonl" and leak["doc_ids"][0] == "2925" and len(leak["ngrams"]) <= 3
    assert [r["id"] for r in report["removed_before_training"]] == ["x"]

    counts, overlaps, wording = (t.data for t in reporting.contamination_tables(paths))
    assert list(counts["benchmark"]) == ["ifeval", "mmlu", "truthfulqa_mc", "hellaswag", "ifbench", "heldout"]
    assert list(zip(overlaps["caught"], overlaps["id"], overlaps["benchmark"], strict=True)) == [
        ("in training data", "leak", "ifeval"),
        ("in training data", "p1", "heldout"),
        ("removed before training", "x", "mmlu"),
    ]
    assert overlaps["doc_ids"].iloc[2] == "astronomy/test/1"
    assert list(wording.iloc[0]) == ["ifeval", "your entire response should be in english and", 1]


def test_a_rows_recorded_wording_is_read_as_its_constraint_text(tmp_path):
    paths = _training_run(tmp_path)
    # wording that ends otherwise than the registry's sentence, recorded on the row
    text = f"{ic.describe([LOWERCASE])} Thank you."
    row = {
        "id": "worded",
        "messages": [{"role": "user", "content": ic.add_constraints(CLEAN, [LOWERCASE], text)}],
        "constraints": [{"instruction_id": LOWERCASE.instruction_id, "kwargs": {}}],
        "constraint_text": text,
    }
    write_jsonl(paths.file("sft_train.jsonl"), [row])
    report = check_training_data(paths, 8)
    assert report["counts"]["ifeval"]["rows_task_overlap"] == 0
    assert report["counts"]["ifeval"]["rows_template_overlap_only"] == 1


def test_step_03_removes_a_leaked_prompt_and_lists_it(tmp_path, smoke_cfg):
    paths = run_paths(tmp_path)
    rows = [
        {"id": "a", "instruction": CLEAN, "response": RESPONSE, "finish_reason": "stop"},
        {"id": "b", "instruction": ifeval_prompt(2925), "response": RESPONSE, "finish_reason": "stop"},
    ]
    write_jsonl(paths.file("responses.jsonl"), rows)
    write_jsonl(
        paths.file("instructions.jsonl"), [{"id": r["id"], "instruction": r["instruction"]} for r in rows]
    )
    funnel = run_filter_step(paths, smoke_cfg)
    assert funnel["removed"]["benchmark_overlap"] == 1 and funnel["kept"] == 1
    assert [r["id"] for r in read_jsonl(paths.file("sft.jsonl"))] == ["a"]
    [out] = read_jsonl(paths.file("filtered_out.jsonl"))
    assert (out["id"], out["reason"], out["benchmark"], out["doc_id"]) == (
        "b",
        "benchmark_overlap",
        "ifeval",
        "2925",
    )
    assert funnel["settings"]["contamination_ngram"] == 8
    shown = reporting.benchmark_removals_table(paths)
    assert list(shown.data["id"]) == ["b"] and shown.data["instruction"].iloc[0] == rows[1]["instruction"]


def test_the_ngram_setting_reruns_the_steps_that_read_it(tmp_path):
    paths = run_paths(tmp_path)
    now, longer = load_config("smoke"), load_config("smoke", ["filtering.contamination_ngram=10"])
    changed = [
        s.name
        for s in PIPELINE
        if current_fingerprint(s, now, paths) != current_fingerprint(s, longer, paths)
    ]
    assert changed == ["03_filter", "04_build_preferences"]


def test_doc_segments_are_not_joined():
    # an n-gram across a question and its choices is not the benchmark's text
    index = NgramIndex([Doc("mmlu", "q", ("one two three", "four five six"))], 3)
    assert index.matches("one two three four five six")[0].ngrams == ["one two three", "four five six"]
    assert NgramIndex([Doc("mmlu", "q", ("one two", "three four"))], 3).matches("one two three four") == []
