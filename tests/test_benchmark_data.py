"""The shipped benchmark copies: their hashes, sizes and the Hub schema lm-eval's tasks read."""

import json

import pytest

from synthetic_instruction_tuner.benchmark_data import (
    DATA_DIR,
    HELLASWAG_KEYS,
    authors_layout,
    convert_hellaswag,
    convert_mmlu,
    convert_truthfulqa,
    provenance,
    read_jsonl_gz,
    sha256,
    shipped,
)
from synthetic_instruction_tuner.benchmark_data.rebuild import main as rebuild_main


def test_shipped_files_match_their_recorded_sha256_and_stay_small():
    record = provenance()
    assert {name for name, entry in record.items() if entry["status"] == "shipped"} == {
        "ifeval",
        "mmlu",
        "truthfulqa_mc",
        "hellaswag",
    }
    for entry in record.values():
        for name, digest in entry["files"].items():
            path = DATA_DIR / name
            assert sha256(path) == digest, name
            assert path.stat().st_size < 2 * 1024**2, name
        assert entry["license"] and entry["commit"] and entry["upstream"]


def test_ifeval_copy_has_541_prompts_in_google_ifeval_schema():
    (path,) = shipped("ifeval")
    rows = read_jsonl_gz(path)
    assert len(rows) == 541 and len({r["key"] for r in rows}) == 541
    assert set(rows[0]) == {"key", "prompt", "instruction_id_list", "kwargs"}
    assert all(len(r["instruction_id_list"]) == len(r["kwargs"]) for r in rows)


def test_mmlu_copy_has_57_subjects_with_five_dev_questions_each():
    files = shipped("mmlu")
    test = [p for p in files if p.parent.name == "test"]
    dev = [p for p in files if p.parent.name == "dev"]
    assert len(test) == len(dev) == 57
    assert sum(len(read_jsonl_gz(p)) for p in dev) == 285
    assert sum(len(read_jsonl_gz(p)) for p in test) == 14079
    row = read_jsonl_gz(DATA_DIR / "mmlu" / "test" / "anatomy.jsonl.gz")[0]
    assert set(row) == {"question", "subject", "choices", "answer"}
    assert row["subject"] == "anatomy" and len(row["choices"]) == 4 and row["answer"] in range(4)


def test_truthfulqa_copy_has_817_questions_with_hub_targets():
    (path,) = shipped("truthfulqa_mc")
    rows = read_jsonl_gz(path)
    assert len(rows) == 817
    first = rows[0]["mc2_targets"]
    assert len(first["choices"]) == len(first["labels"]) and set(first["labels"]) == {0, 1}
    assert all(r["mc1_targets"]["labels"][0] == 1 and sum(r["mc1_targets"]["labels"]) == 1 for r in rows)


def test_hellaswag_copy_holds_the_authors_validation_rows_in_the_hub_schema():
    rows = [row for path in shipped("hellaswag") for row in read_jsonl_gz(path)]
    assert len(rows) == 10042 == provenance()["hellaswag"]["rows"]
    assert list(rows[0]) == [*HELLASWAG_KEYS, "label"]  # the Hub's field order
    assert (
        rows[0]["ind"] == 24
        and rows[0]["label"] == "3"
        and rows[0]["ctx"] == "A man is sitting on a roof. he"
    )
    assert all(len(r["endings"]) == 4 and r["label"] in "0123" and r["split"] == "val" for r in rows)
    assert all(r["ctx"] == f"{r['ctx_a']} {r['ctx_b']}" for r in rows if r["ctx_b"])
    # the length of the authors' hellaswag_val.jsonl, as the Hub's loading script recorded it
    assert len(authors_layout(rows)) == 12_246_618


def test_converters_write_hub_schemas_byte_for_byte_the_same(tmp_path):
    upstream = tmp_path / "up"
    for split in ("dev", "test"):
        (upstream / split).mkdir(parents=True)
        for i in range(57):
            (upstream / split / f"s{i:02d}_{split}.csv").write_text('"Q, with comma",a,b,c,d,C\n')
    first = convert_mmlu(upstream, tmp_path / "a")
    second = convert_mmlu(upstream, tmp_path / "b")
    assert [sha256(p) for p in first] == [sha256(p) for p in second]
    assert read_jsonl_gz(first[0]) == [
        {"question": "Q, with comma", "subject": "s00", "choices": ["a", "b", "c", "d"], "answer": 2}
    ]
    mc = tmp_path / "mc_task.json"
    mc.write_text(json.dumps([{"question": "q", "mc1_targets": {"x": 1, "y": 0}, "mc2_targets": {"x": 1}}]))
    (path,) = convert_truthfulqa(mc, tmp_path / "c")
    assert read_jsonl_gz(path)[0]["mc1_targets"] == {"choices": ["x", "y"], "labels": [1, 0]}
    val = tmp_path / "hellaswag_val.jsonl"
    row = dict(ind=1, activity_label="a", ctx_a="c", ctx_b="d", ctx="c d", endings=["e"] * 4)
    val.write_text(
        json.dumps({**row, "source_id": "s", "split": "val", "split_type": "indomain", "label": 2})
    )
    (path,) = convert_hellaswag(val, tmp_path / "d")
    assert read_jsonl_gz(path)[0]["label"] == "2"
    # the Hub's rows as `datasets` saves them convert to the same file
    from datasets import Dataset

    Dataset.from_list([{**json.loads(val.read_text()), "label": "2"}]).save_to_disk(str(tmp_path / "hub"))
    (again,) = convert_hellaswag(tmp_path / "hub", tmp_path / "e")
    assert sha256(again) == sha256(path)


def test_rebuild_names_a_missing_upstream_file(tmp_path, capsys):
    assert rebuild_main(["--ifeval", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]) == 1
    assert "--ifeval" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rebuild_main([])
