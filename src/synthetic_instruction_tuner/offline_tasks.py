"""lm-eval's own benchmark tasks with their data read from the repository's copies.

For each of `ifeval`, `mmlu` (its 57 subject tasks), `truthfulqa_mc2` and `hellaswag`, one YAML file
that ``include``s lm-eval's own task file and overrides only where the data comes from:
``dataset_path: json``, ``dataset_name: null`` and ``dataset_kwargs.data_files``. Prompt format,
few-shot split and sampler, filters, metrics and the `!function` hooks are lm-eval's (an included
file's functions resolve next to that file), and the task names stay lm-eval's: a task in an
``include_path`` replaces the built-in one of the same name. The ``mmlu`` group and its four category
groups are lm-eval's own; their members, found by tag, are the offline subject tasks.

A benchmark can be run on a seeded sample of its documents (`evaluation.ifeval_docs`, ...; MMLU
per subject); the sample is written next to the YAML, so the rendered folder reproduces a number
with ``lm_eval --include_path``.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import benchmark_data
from .config import Config
from .errors import PipelineError
from .store import write_jsonl


@dataclass(frozen=True)
class Benchmark:
    data: str  # folder under benchmark_data/
    split: str  # the split the task scores, named as on the Hub
    lm_eval_yaml: str  # lm-eval's task file, relative to lm_eval/tasks/
    docs_setting: str  # EvaluationConfig field: how many documents (0 = all)
    # splits lm-eval opens when it builds the task although a zero-shot run never reads them
    # (HellaSwag's few-shot sampler wants `train`, whose 40k rows are not shipped): the scored file
    opened_only: tuple[str, ...] = ()


BENCHMARKS = {
    "ifeval": Benchmark("ifeval", "train", "ifeval/ifeval.yaml", "ifeval_docs"),
    "truthfulqa_mc2": Benchmark(
        "truthfulqa_mc", "validation", "truthfulqa/truthfulqa_mc2.yaml", "truthfulqa_docs"
    ),
    "hellaswag": Benchmark(
        "hellaswag", "validation", "hellaswag/hellaswag.yaml", "hellaswag_docs", opened_only=("train",)
    ),
    "mmlu": Benchmark("mmlu", "test", "mmlu/default/mmlu_{subject}.yaml", "mmlu_docs_per_subject"),
}
DATA_KEYS = ("dataset_path", "dataset_name", "dataset_kwargs")  # all an offline task changes


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def mmlu_subjects() -> list[str]:
    return sorted(
        p.name.removesuffix(".jsonl.gz") for p in (benchmark_data.DATA_DIR / "mmlu" / "test").glob("*")
    )


def _sample(rows: list[dict], n: int, seed: str) -> list[dict]:
    """A seeded sample of `n` rows in their original order (all rows when n is 0 or too large)."""
    if not 0 < n < len(rows):
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def _read(benchmark: str, prefix: str) -> list[dict[str, Any]]:
    """Rows of the shipped files of `benchmark` whose path under benchmark_data/ starts with `prefix`."""
    files = benchmark_data.shipped(benchmark)
    if not files:
        flag = "truthfulqa" if benchmark == "truthfulqa_mc" else benchmark
        raise PipelineError(
            f"evaluation.local_tasks: {benchmark} has no offline copy in the repository "
            f"(benchmark_data/SOURCE.md); rebuild it with python -m "
            f"synthetic_instruction_tuner.benchmark_data.rebuild --{flag} FILE, or drop the task"
        )
    chosen = sorted(p for p in files if str(p.relative_to(benchmark_data.DATA_DIR)).startswith(prefix))
    return [row for path in chosen for row in benchmark_data.read_jsonl_gz(path)]


def _task_yaml(lm_eval_yaml: Path, data_files: dict[str, str]) -> str:
    override = {
        "include": str(lm_eval_yaml),
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files},
    }
    header = "# lm-eval's own task; only the data source is changed (offline_tasks.py)\n"
    return header + yaml.safe_dump(override, sort_keys=False)


def _write_task(out_dir: Path, name: str, lm_eval_yaml: Path, splits: dict[str, tuple[Path, list]]) -> None:
    for path, rows in splits.values():
        write_jsonl(path, rows)
    files = {split: str(path.resolve()) for split, (path, _) in splits.items()}
    (out_dir / f"{name}.yaml").write_text(_task_yaml(lm_eval_yaml, files))


def write_offline_tasks(cfg: Config, tasks_dir: Path, names: list[str]) -> dict[str, int]:
    """Write the offline YAML (tasks_dir/benchmarks/) and data (tasks_dir/data/) of each benchmark
    in `names`; return the number of documents each will score."""
    data_dir, out_dir = tasks_dir / "data", tasks_dir / "benchmarks"
    shutil.rmtree(out_dir, ignore_errors=True)  # a task dropped from the settings leaves no stale file
    out_dir.mkdir(parents=True)
    documents: dict[str, int] = {}
    for name in names:
        bench = BENCHMARKS[name]
        n = getattr(cfg.evaluation, bench.docs_setting)
        if name != "mmlu":
            rows = _sample(_read(bench.data, bench.data), n, f"{cfg.seed}:{name}")
            split = {
                split_name: (data_dir / bench.data / f"{bench.split}.jsonl", rows)
                for split_name in (bench.split, *bench.opened_only)
            }
            _write_task(out_dir, name, lm_eval_tasks_dir() / bench.lm_eval_yaml, split)
            documents[name] = len(rows)
            continue
        documents[name] = 0
        for subject in mmlu_subjects():
            test = _sample(_read("mmlu", f"mmlu/test/{subject}."), n, f"{cfg.seed}:mmlu:{subject}")
            splits = {
                "test": (data_dir / "mmlu" / "test" / f"{subject}.jsonl", test),
                "dev": (
                    data_dir / "mmlu" / "dev" / f"{subject}.jsonl",
                    _read("mmlu", f"mmlu/dev/{subject}."),
                ),
            }
            source = lm_eval_tasks_dir() / bench.lm_eval_yaml.format(subject=subject)
            _write_task(out_dir, f"mmlu_{subject}", source, splits)
            documents[name] += len(test)
    return documents
