"""Offline punkt_tab installation and the IFEval constraint helpers.

Constraint verdicts are compared with lm-eval's own IFEval scoring functions and with values
worked out by hand, so a change on either side (ours or lm-eval's) shows up here.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import nltk
import pytest
from nltk.tokenize.punkt import PunktTokenizer

from synthetic_instruction_tuner.constraints import (
    EXTRA_CONFLICTS,
    SUPPORTED_IDS,
    Constraint,
    add_constraints,
    check,
    conflicts,
    describe,
    sample_constraints,
    to_ifeval_record,
)
from synthetic_instruction_tuner.errors import PipelineError
from synthetic_instruction_tuner.nltk_resources import (
    PUNKT_FILES,
    PUNKT_RESOURCE,
    default_data_dir,
    ensure_punkt_tab,
)

TWO_SENTENCES = "Dr. Smith went to Washington. He arrived at 5 p.m. on Monday."


@pytest.fixture(scope="module", autouse=True)
def private_punkt(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Install punkt_tab in a throwaway directory so the tests never write to the user's cache.

    Module-scoped because lm-eval's IFEval modules, once imported, stay imported; the search path
    and $NLTK_DATA are restored afterwards.
    """
    saved_path, saved_env = list(nltk.data.path), os.environ.get("NLTK_DATA")
    yield ensure_punkt_tab(tmp_path_factory.mktemp("nltk_data"))
    nltk.data.path[:] = saved_path
    if saved_env is None:
        os.environ.pop("NLTK_DATA", None)
    else:
        os.environ["NLTK_DATA"] = saved_env


def _isolate_nltk_search_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test change nltk.data.path and $NLTK_DATA without leaking the change."""
    monkeypatch.setattr(nltk.data, "path", list(nltk.data.path))
    monkeypatch.setenv("NLTK_DATA", os.environ.get("NLTK_DATA", ""))


# --------------------------------------------------------------------------- punkt_tab


def test_punkt_tab_is_written_registered_and_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _isolate_nltk_search_path(monkeypatch)
    data_dir = tmp_path / "nltk_data"

    model_dir = ensure_punkt_tab(data_dir)

    assert model_dir == data_dir.resolve() / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in model_dir.iterdir()) == sorted(PUNKT_FILES)
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["english"]  # no staging left behind
    assert nltk.data.path[0] == str(data_dir.resolve())
    assert os.environ["NLTK_DATA"].split(os.pathsep)[0] == str(data_dir.resolve())
    assert Path(nltk.data.find(PUNKT_RESOURCE).path).resolve() == model_dir

    # A fresh tokenizer, not nltk.sent_tokenize's cached one, so this really loads the new files.
    tokenizer = PunktTokenizer("english")
    assert "dr" in tokenizer._params.abbrev_types
    assert tokenizer.tokenize(TWO_SENTENCES) == [
        "Dr. Smith went to Washington.",
        "He arrived at 5 p.m. on Monday.",
    ]
    assert len(nltk.sent_tokenize(TWO_SENTENCES)) == 2


def test_second_call_leaves_the_model_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_nltk_search_path(monkeypatch)
    model_dir = ensure_punkt_tab(tmp_path)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in model_dir.iterdir()}
    dir_inode = model_dir.stat().st_ino

    assert ensure_punkt_tab(tmp_path) == model_dir

    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in model_dir.iterdir()} == before
    assert model_dir.stat().st_ino == dir_inode
    assert nltk.data.path.count(str(tmp_path.resolve())) == 1
    assert os.environ["NLTK_DATA"].split(os.pathsep).count(str(tmp_path.resolve())) == 1


def test_written_files_are_identical_across_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_nltk_search_path(monkeypatch)
    first = ensure_punkt_tab(tmp_path / "a")
    second = ensure_punkt_tab(tmp_path / "b")
    for name in PUNKT_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes()
    abbreviations = (first / "abbrev_types.txt").read_text(encoding="utf-8").split("\n")
    assert abbreviations == sorted(abbreviations)  # sorted, so independent of the string hash seed


def test_incomplete_model_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_nltk_search_path(monkeypatch)
    broken = tmp_path / PUNKT_RESOURCE
    broken.mkdir(parents=True)
    (broken / "abbrev_types.txt").write_text("dr\n", encoding="utf-8")

    model_dir = ensure_punkt_tab(tmp_path)

    assert sorted(p.name for p in model_dir.iterdir()) == sorted(PUNKT_FILES)
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["english"]
    assert len(PunktTokenizer("english").tokenize(TWO_SENTENCES)) == 2


def test_default_dir_follows_sit_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIT_CACHE", str(tmp_path / "cache"))
    assert default_data_dir() == tmp_path / "cache" / "nltk_data"
    monkeypatch.delenv("SIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "synthetic_instruction_tuner" / "nltk_data"


def test_without_dir_installs_into_default_when_nltk_cannot_find_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _isolate_nltk_search_path(monkeypatch)
    monkeypatch.setattr(nltk.data, "path", [])
    monkeypatch.setenv("SIT_CACHE", str(tmp_path))
    with pytest.raises(LookupError):
        nltk.data.find(PUNKT_RESOURCE)

    model_dir = ensure_punkt_tab()

    assert model_dir == tmp_path.resolve() / "nltk_data" / PUNKT_RESOURCE
    assert Path(nltk.data.find(PUNKT_RESOURCE).path).resolve() == model_dir


def test_without_dir_reuses_a_findable_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _isolate_nltk_search_path(monkeypatch)
    installed = ensure_punkt_tab(tmp_path / "installed")
    monkeypatch.setenv("SIT_CACHE", str(tmp_path / "unused"))

    assert ensure_punkt_tab().resolve() == installed
    assert not (tmp_path / "unused").exists()


@pytest.mark.skipif(os.name != "posix", reason="NLTK checks permission bits only on POSIX")
def test_directory_nltk_will_not_trust_is_reported_and_unregistered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _isolate_nltk_search_path(monkeypatch)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)  # group-writable: NLTK's pathsec refuses to write or read data here
    path_before, env_before = list(nltk.data.path), os.environ["NLTK_DATA"]

    with pytest.raises(PipelineError, match="chmod go-w"):
        ensure_punkt_tab(shared)

    assert nltk.data.path == path_before
    assert os.environ["NLTK_DATA"] == env_before
    assert list((shared / "tokenizers" / "punkt_tab").iterdir()) == []


def test_subprocess_finds_model_and_lm_eval_import_stays_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _isolate_nltk_search_path(monkeypatch)
    model_dir = ensure_punkt_tab(tmp_path)
    code = (
        "import nltk\n"
        "from lm_eval.tasks.ifeval import instructions_util\n"
        f"print(nltk.data.find({PUNKT_RESOURCE!r}).path)\n"
        f"print(instructions_util.count_sentences({TWO_SENTENCES!r}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    found, sentences = done.stdout.splitlines()[-2:]
    assert Path(found).resolve() == model_dir
    assert sentences == "2"
    # lm-eval calls nltk.download("punkt_tab") at import unless the model is already findable.
    assert "Downloaded punkt_tab" not in done.stdout
    assert "Error loading punkt_tab" not in done.stderr


# --------------------------------------------------------------------------- sampling


def _registry() -> ModuleType:
    """lm-eval's IFEval registry, imported inside tests so the punkt fixture has run first."""
    from lm_eval.tasks.ifeval import instructions_registry

    return instructions_registry


def test_supported_ids_are_registered_and_prompt_free() -> None:
    registry = _registry()
    assert len(set(SUPPORTED_IDS)) == len(SUPPORTED_IDS)
    assert set(SUPPORTED_IDS) <= set(registry.INSTRUCTION_DICT)
    assert "combination:repeat_prompt" not in SUPPORTED_IDS
    assert "language:response_language" not in SUPPORTED_IDS


def test_sampling_is_deterministic_per_seed() -> None:
    for seed in range(40):
        for k in (1, 2, 3, 5):
            assert sample_constraints(random.Random(seed), k) == sample_constraints(random.Random(seed), k)
    samples = [sample_constraints(random.Random(seed), 3) for seed in range(40)]
    assert len({json.dumps(to_ifeval_record(0, "", sample)) for sample in samples}) > 35


def test_sampling_gives_k_distinct_compatible_constraints() -> None:
    raw_conflicts = _registry().INSTRUCTION_CONFLICTS
    extra = {frozenset(pair) for pair in EXTRA_CONFLICTS}
    rng = random.Random(1234)
    for seed in range(400):
        k = rng.randint(1, 6)
        sample = sample_constraints(random.Random(seed), k)
        ids = [c.instruction_id for c in sample]
        assert len(ids) == k
        assert len(set(ids)) == k
        assert set(ids) <= set(SUPPORTED_IDS)
        for a in ids:
            for b in ids:
                if a != b:
                    # The shipped map is one-directional, so both directions are checked.
                    assert b not in raw_conflicts[a], (a, b)
                    assert frozenset((a, b)) not in extra, (a, b)


def test_conflict_map_is_symmetric_and_covers_the_registry() -> None:
    table = conflicts()
    for a, others in _registry().INSTRUCTION_CONFLICTS.items():
        for b in others:
            assert b in table[a] and a in table[b]
    for a, b in EXTRA_CONFLICTS:
        assert b in table[a] and a in table[b]
    assert "change_case:english_lowercase" in table["change_case:english_capital"]  # missing upstream


def test_sample_size_is_validated() -> None:
    assert sample_constraints(random.Random(0), 0) == []
    with pytest.raises(ValueError):
        sample_constraints(random.Random(0), -1)
    with pytest.raises(ValueError):
        sample_constraints(random.Random(0), len(SUPPORTED_IDS) + 1)


def test_every_supported_id_is_sampled_with_kwargs_its_checker_accepts_verbatim() -> None:
    registry = _registry()
    seen: dict[str, Constraint] = {}
    for seed in range(300):
        for constraint in sample_constraints(random.Random(seed), 3):
            seen.setdefault(constraint.instruction_id, constraint)
    assert set(seen) == set(SUPPORTED_IDS)

    for instruction_id, constraint in seen.items():
        assert json.loads(json.dumps(constraint.kwargs)) == constraint.kwargs
        checker = registry.INSTRUCTION_DICT[instruction_id](instruction_id)
        text = checker.build_description(**constraint.kwargs)
        # Equal args mean the checker randomised nothing and normalised nothing away.
        assert (checker.get_instruction_args() or {}) == constraint.kwargs, instruction_id
        assert describe([constraint]) == text
        assert "{" not in text  # every template slot was filled


# --------------------------------------------------------------------------- wording

LOWER_NO_COMMA_SHORT = [
    Constraint("change_case:english_lowercase"),
    Constraint("punctuation:no_comma"),
    Constraint("length_constraints:number_words", {"num_words": 40, "relation": "less than"}),
]


def test_describe_and_add_constraints_use_ifeval_wording() -> None:
    expected = (
        "Your entire response should be in English, and in all lowercase letters. No capital letters "
        "are allowed. In your entire response, refrain from the use of any commas. "
        "Answer with less than 40 words."
    )
    assert describe(LOWER_NO_COMMA_SHORT) == expected
    assert add_constraints("Explain photosynthesis.  \n", LOWER_NO_COMMA_SHORT) == (
        "Explain photosynthesis.\n\n" + expected
    )
    assert add_constraints("Explain photosynthesis.", []) == "Explain photosynthesis."


def test_unknown_id_and_missing_kwargs_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown IFEval instruction id"):
        check("hello", [Constraint("keywords:nonexistent")])
    # Without kwargs lm-eval would pick a random word limit from the global random module.
    with pytest.raises(ValueError, match="num_words"):
        check("hello", [Constraint("length_constraints:number_words", {"relation": "less than"})])


# --------------------------------------------------------------------------- verdicts

OK = (
    "plants make their own food from sunlight. they take in water and carbon dioxide and turn them "
    "into sugar and oxygen. this process is called photosynthesis and it keeps them alive."
)
TIPS = [
    Constraint("startend:end_checker", {"end_phrase": "Is there anything else I can help with?"}),
    Constraint("detectable_content:postscript", {"postscript_marker": "P.S."}),
    Constraint("detectable_format:title"),
    Constraint("detectable_format:number_bullet_lists", {"num_bullets": 3}),
]
TIPS_OK = (
    "<<three tips>>\n\n* drink water\n* sleep well\n* walk daily\n\n"
    "P.S. small habits add up. Is there anything else I can help with?"
)
WORDS = [
    Constraint("keywords:existence", {"keywords": ["benefit", "summary"]}),
    Constraint("keywords:forbidden_words", {"forbidden_words": ["basically", "really"]}),
    Constraint("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"}),
    Constraint("startend:quotation"),
]
SENTENCES = [
    Constraint("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"}),
    Constraint("length_constraints:number_sentences", {"num_sentences": 3, "relation": "less than"}),
]
JSON = [Constraint("detectable_format:json_format")]

# (constraints, response, strict verdicts, loose verdicts), all worked out by hand.
CASES = {
    "all_followed": (LOWER_NO_COMMA_SHORT, OK, [True, True, True], [True, True, True]),
    "capital_letter": (LOWER_NO_COMMA_SHORT, "P" + OK[1:], [False, True, True], [False, True, True]),
    "comma": (
        LOWER_NO_COMMA_SHORT,
        OK.replace("water and", "water,"),
        [True, False, True],
        [True, False, True],
    ),
    "too_many_words": (LOWER_NO_COMMA_SHORT, OK + " " + OK, [True, True, False], [True, True, False]),
    "all_broken": (
        LOWER_NO_COMMA_SHORT,
        "Plants, in short, make food. " + ("P" + OK[1:] + " ") * 2,
        [False, False, False],
        [False, False, False],
    ),
    # Loose scoring drops the first line, so a bold preamble only costs the strict verdict.
    "markdown_preamble": (
        LOWER_NO_COMMA_SHORT,
        "**Answer:**\n" + OK,
        [False, True, True],
        [True, True, True],
    ),
    "empty": (LOWER_NO_COMMA_SHORT, "", [False, False, False], [False, False, False]),
    "blank": (LOWER_NO_COMMA_SHORT, "  \n ", [False, False, False], [False, False, False]),
    "tips_followed": (TIPS, TIPS_OK, [True, True, True, True], [True, True, True, True]),
    "tips_trailing_line": (
        TIPS,
        TIPS_OK + "\nHope this helps!",
        [False, True, True, True],
        [True, True, True, True],
    ),
    "tips_ignored": (TIPS, "Drink water and sleep well.", [False] * 4, [False] * 4),
    "words_followed": (WORDS, '"In summary the main benefit is lower cost."', [True] * 4, [True] * 4),
    "words_broken": (WORDS, "Basically the benefit is lazy zebras.", [False] * 4, [False] * 4),
    # Punkt must know "Dr." and "p.m." are abbreviations: a naive splitter counts 4 sentences.
    "two_sentences": (SENTENCES, TWO_SENTENCES, [False, True], [False, True]),
    "fenced_json": (JSON, '```json\n{"a": 1}\n```', [True], [True]),
    "invalid_json": (JSON, "{a: 1}", [False], [False]),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_check_matches_hand_verdicts_and_lm_eval(case: tuple) -> None:
    from lm_eval.tasks.ifeval.utils import (
        InputExample,
        test_instruction_following_loose,
        test_instruction_following_strict,
    )

    constraints, response, strict, loose = case
    assert check(response, constraints) == strict
    assert check(response, constraints, loose=True) == loose

    record = to_ifeval_record(0, "prompt", constraints)
    example = InputExample(
        key=record["key"],
        instruction_id_list=record["instruction_id_list"],
        prompt=record["prompt"],
        kwargs=record["kwargs"],
    )
    assert test_instruction_following_strict(example, response).follow_instruction_list == strict
    assert test_instruction_following_loose(example, response).follow_instruction_list == loose


def test_ifeval_record_is_scored_by_lm_eval_process_results() -> None:
    from lm_eval.tasks.ifeval.utils import process_results

    prompt = add_constraints("Explain photosynthesis.", LOWER_NO_COMMA_SHORT)
    record = to_ifeval_record(7, prompt, LOWER_NO_COMMA_SHORT)

    assert record == {
        "key": 7,
        "prompt": prompt,
        "instruction_id_list": [
            "change_case:english_lowercase",
            "punctuation:no_comma",
            "length_constraints:number_words",
        ],
        "kwargs": [{}, {}, {"num_words": 40, "relation": "less than"}],
    }
    assert json.loads(json.dumps(record)) == record
    record["kwargs"][2]["num_words"] = 1  # the record is a copy, not a view of the constraint
    assert LOWER_NO_COMMA_SHORT[2].kwargs["num_words"] == 40
    record["kwargs"][2]["num_words"] = 40

    assert process_results(record, [OK]) == {
        "prompt_level_strict_acc": True,
        "inst_level_strict_acc": [True, True, True],
        "prompt_level_loose_acc": True,
        "inst_level_loose_acc": [True, True, True],
    }
    assert process_results(record, ["**Answer:**\n" + OK]) == {
        "prompt_level_strict_acc": False,
        "inst_level_strict_acc": [False, True, True],
        "prompt_level_loose_acc": True,
        "inst_level_loose_acc": [True, True, True],
    }


def _worded(family: str, seed: int) -> list[tuple[Constraint, str]]:
    """Every other wording of one sampled constraint of ``family``."""
    from synthetic_instruction_tuner.constraints import WORDINGS

    if family == "combination:repeat_prompt":
        constraint = Constraint(family, {"prompt_to_repeat": "Write a poem about rain."})
    else:
        (constraint,) = sample_constraints(random.Random(seed), 1, [family])
    kwargs = {k: v for k, v in constraint.kwargs.items() if v}
    return [(constraint, option(**kwargs)) for option in WORDINGS[family]]


def test_other_wordings_share_no_eight_words_with_any_benchmark_prompt():
    from synthetic_instruction_tuner.constraints import WORDINGS
    from synthetic_instruction_tuner.contamination import benchmark_index

    index = benchmark_index(8)
    shared = {}
    for family in WORDINGS:
        for seed in range(5):
            for constraint, text in _worded(family, seed):
                # the registry's own end phrases ("Is there anything else I can help with?") are
                # the constraint's content, not its wording
                for value in constraint.kwargs.values():
                    if isinstance(value, str) and len(value.split()) >= 3:
                        text = text.replace(value, "...")
                shared[text] = [m.doc_id for m in index.matches(text)]
    assert {text: docs for text, docs in shared.items() if docs} == {}
    assert len(shared) > 2 * len(WORDINGS)


def test_other_wordings_keep_the_numbers_and_words_the_checker_uses():
    from synthetic_instruction_tuner.constraints import WORDINGS, wording

    assert set(WORDINGS) <= set(SUPPORTED_IDS) | {"combination:repeat_prompt"}
    for family in WORDINGS:
        for constraint, text in _worded(family, 3):
            for value in constraint.kwargs.values():
                if isinstance(value, int) and not isinstance(value, bool):
                    assert str(value) in text, (family, text)
                elif isinstance(value, list):
                    assert all(word in text for word in value), (family, text)
                elif family != "combination:repeat_prompt" and value not in ("less than", "at least"):
                    assert value in text, (family, text)
    (constraint, _), *_ = _worded("punctuation:no_comma", 0)
    assert wording(constraint) == describe([constraint]), "no rng: the registry's wording"
    drawn = {wording(constraint, random.Random(seed), 1.0) for seed in range(20)}
    assert drawn == {text for _, text in _worded("punctuation:no_comma", 0)}
