"""lm-eval's own benchmark tasks read offline: only the data source differs from the Hub tasks."""

import json

import pytest

from synthetic_instruction_tuner import benchmark_data
from synthetic_instruction_tuner.config import load_config
from synthetic_instruction_tuner.errors import PipelineError
from synthetic_instruction_tuner.evaluation import pooled_samples
from synthetic_instruction_tuner.offline_tasks import DATA_KEYS, mmlu_subjects, write_offline_tasks

SHIPPED = ["ifeval", "mmlu", "truthfulqa_mc2", "hellaswag"]
SIZES = [
    "evaluation.ifeval_docs=300",
    "evaluation.mmlu_docs_per_subject=1",
    "evaluation.truthfulqa_docs=50",
    "evaluation.hellaswag_docs=40",
]


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """(hub TaskManager, offline TaskManager, documents per task) over the shipped benchmarks."""
    from lm_eval.tasks import TaskManager

    import synthetic_instruction_tuner.eval_tasks  # noqa: F401 - punkt_tab before lm-eval's IFEval

    folder = tmp_path_factory.mktemp("tasks")
    documents = write_offline_tasks(load_config("smoke", SIZES), folder, SHIPPED)
    return TaskManager(), TaskManager(include_path=str(folder)), documents


def _differing_keys(hub, offline, name):
    a, b = hub.task_index[name].cfg, offline.task_index[name].cfg
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def test_offline_tasks_differ_from_the_hub_tasks_only_in_their_data_source(offline):
    hub, off, _ = offline
    names = ["ifeval", "truthfulqa_mc2", "hellaswag", *(f"mmlu_{s}" for s in mmlu_subjects())]
    assert len(names) == 60
    for name in names:
        assert "lm_eval/tasks" in str(hub.task_index[name].yaml_path)
        assert "lm_eval/tasks" not in str(off.task_index[name].yaml_path), name
        assert set(_differing_keys(hub, off, name)) <= set(DATA_KEYS), name
        assert off.task_index[name].cfg["dataset_path"] == "json"
    assert hub.task_index["ifeval"].cfg["dataset_path"] == "google/IFEval"
    # the groups are lm-eval's own files, unchanged
    for group in ("mmlu", "mmlu_stem", "mmlu_humanities", "mmlu_other", "mmlu_social_sciences"):
        assert off.task_index[group].yaml_path == hub.task_index[group].yaml_path


def test_offline_mmlu_group_runs_lm_evals_five_shot_prompt_on_shipped_rows(offline):
    _, off, documents = offline
    tasks = off.load(["mmlu"])["tasks"]
    assert len(tasks) == 57 and documents["mmlu"] == 57
    anatomy = tasks["mmlu_anatomy"]
    (doc,) = list(anatomy.eval_docs)
    assert anatomy.config.fewshot_split == "dev" and len(anatomy.fewshot_docs()) == 5
    assert anatomy.doc_to_text(doc).endswith("\nAnswer:") and anatomy.doc_to_choice(doc) == list("ABCD")


def test_benchmark_samples_are_seeded_and_sized_by_the_settings(offline, tmp_path):
    _, off, documents = offline
    assert documents["ifeval"] == 300 and documents["truthfulqa_mc2"] == 50 and documents["hellaswag"] == 40
    ifeval = off.load(["ifeval"])["tasks"]["ifeval"]
    keys = [d["key"] for d in ifeval.eval_docs]
    shipped = {r["key"] for r in benchmark_data.read_jsonl_gz(benchmark_data.shipped("ifeval")[0])}
    assert len(set(keys)) == 300 and set(keys) <= shipped
    again = write_offline_tasks(load_config("smoke", SIZES), tmp_path / "a", ["ifeval"])
    other = write_offline_tasks(load_config("smoke", [*SIZES, "seed=7"]), tmp_path / "b", ["ifeval"])
    assert again == other == {"ifeval": 300}
    read = [(tmp_path / x / "data" / "ifeval" / "train.jsonl").read_text() for x in ("a", "b")]
    assert [json.loads(line)["key"] for line in read[0].splitlines()] == keys
    assert read[0] != read[1]
    full = write_offline_tasks(load_config("smoke"), tmp_path / "c", ["ifeval", "truthfulqa_mc2"])
    assert full == {"ifeval": 541, "truthfulqa_mc2": 817}


def test_offline_hellaswag_runs_lm_evals_task_on_a_seeded_sample_of_the_shipped_rows(offline):
    _, off, _ = offline
    task = off.load(["hellaswag"])["tasks"]["hellaswag"]
    docs = list(task.eval_docs)
    rows = [r for p in benchmark_data.shipped("hellaswag") for r in benchmark_data.read_jsonl_gz(p)]
    assert len(docs) == 40 and len(rows) == 10042
    assert {(d["ind"], d["ctx"]) for d in docs} <= {(r["ind"], r["ctx"]) for r in rows}
    doc = docs[0]
    assert task.doc_to_text(doc).startswith(doc["activity_label"] + ":")
    assert len(task.doc_to_choice(doc)) == 4 and task.doc_to_target(doc) == int(doc["label"])


def test_a_benchmark_without_shipped_data_is_refused_with_the_rebuild_command(tmp_path, monkeypatch):
    real = benchmark_data.shipped
    monkeypatch.setattr(benchmark_data, "shipped", lambda b: [] if b == "hellaswag" else real(b))
    with pytest.raises(
        PipelineError, match=r"local_tasks: hellaswag has no offline copy.*rebuild --hellaswag FILE"
    ):
        write_offline_tasks(load_config("smoke"), tmp_path, ["hellaswag"])


def test_hellaswag_rebuilt_from_the_authors_file_runs_lm_evals_task(offline, tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    row = {
        "ind": 24,
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "ctx": "A man is sitting on a roof. he",
        "endings": ["is using wrap.", "is ripping level tiles off.", "is holding a rubik's cube.", "starts."],
        "source_id": "activitynet~v_-JhWjGDPHMY",
        "split": "val",
        "split_type": "indomain",
        "label": 3,
    }
    upstream = tmp_path / "hellaswag_val.jsonl"
    upstream.write_text(json.dumps(row) + "\n")
    files = benchmark_data.convert_hellaswag(upstream, tmp_path / "data")
    real = benchmark_data.shipped
    monkeypatch.setattr(benchmark_data, "shipped", lambda b: files if b == "hellaswag" else real(b))
    monkeypatch.setattr(benchmark_data, "DATA_DIR", tmp_path / "data")
    write_offline_tasks(load_config("smoke"), tmp_path / "tasks", ["hellaswag"])
    hub = offline[0]
    off = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    assert set(_differing_keys(hub, off, "hellaswag")) <= set(DATA_KEYS)
    task = off.load(["hellaswag"])["tasks"]["hellaswag"]
    (doc,) = list(task.eval_docs)
    assert task.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. He"
    assert task.doc_to_target(doc) == 3 and len(task.doc_to_choice(doc)) == 4


def test_group_samples_are_pooled_into_one_log_per_requested_task():
    samples = {"mmlu_b": [{"doc_id": 0, "acc": 1.0}], "mmlu_a": [{"doc_id": 0, "acc": 0.0}]}
    pooled = pooled_samples("mmlu", samples)
    assert list(pooled) == ["mmlu"]
    assert [r["doc_id"] for r in pooled["mmlu"]] == ["mmlu_a:0", "mmlu_b:0"]
    assert pooled_samples("ifeval", {"ifeval": [{"doc_id": 3}]}) == {"ifeval": [{"doc_id": 3}]}
