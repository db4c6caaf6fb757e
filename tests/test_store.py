import json

import pytest

from synthetic_instruction_tuner.errors import DataError
from synthetic_instruction_tuner.store import JsonlAppender, read_jsonl, write_json


def test_append_and_resume_skip_existing_ids(tmp_path):
    path = tmp_path / "x.jsonl"
    with JsonlAppender(path) as out:
        assert out.append([{"id": "a"}, {"id": "b"}]) == 2
    with JsonlAppender(path) as out:
        assert len(out) == 2 and "a" in out
        assert out.append([{"id": "b"}, {"id": "c"}]) == 1
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_torn_last_line_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "te')
    with pytest.warns(UserWarning, match="torn last line"), JsonlAppender(path) as out:
        assert [r["id"] for r in out.records] == ["a", "b"]
        out.append({"id": "c"})
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'


def test_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}')
    with JsonlAppender(path) as out:
        out.append({"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_corrupt_line_names_file_and_line_and_changes_nothing(tmp_path):
    path = tmp_path / "x.jsonl"
    text = '{"id": "a"}\n{"id": oops}\n{"id": "c"}\n'
    path.write_text(text)
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
        JsonlAppender(path)
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
        read_jsonl(path)
    assert path.read_text() == text


def test_missing_key_and_duplicate_id(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a", "text": "t"}\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: missing key 'text'"):
        read_jsonl(path, required=("id", "text"))
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: duplicate id 'a'"):
        JsonlAppender(path)


def test_atomic_json_write_replaces_whole_file(tmp_path):
    path = tmp_path / "f.json"
    write_json(path, {"a": 1})
    write_json(path, {"b": 2})
    assert json.loads(path.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_resuming_with_other_settings_is_refused(tmp_path):
    from synthetic_instruction_tuner.store import check_resumable

    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a", "sampling": {"temperature": 0.7}}\n')
    with JsonlAppender(path) as out:
        check_resumable(out, {"sampling": {"temperature": 0.7}})
        with pytest.raises(DataError, match=r"x\.jsonl:1: sampling .* differs from this run's .*--force"):
            check_resumable(out, {"sampling": {"temperature": 1.0}})
