"""Paired statistics between methods, checked against cases worked out by hand."""

import math

import pytest

from synthetic_instruction_tuner.comparison import (
    family_accuracy,
    mcnemar_exact,
    paired_difference,
    value_kind,
)
from synthetic_instruction_tuner.errors import DataError
from synthetic_instruction_tuner.metrics import aggregate, bootstrap_ci


def test_exact_mcnemar_matches_a_hand_computed_table():
    # 2x2 table over 20 prompts: both right 5, first only 1, second only 7, neither 7.
    # Exact McNemar = two-sided binomial test of the discordant pairs b=1, c=7 with p=1/2:
    # p = 2 * P(X <= 1 | n=8) = 2 * (C(8,0) + C(8,1)) / 2^8 = 2 * 9 / 256 = 0.0703125.
    first = [True] * 5 + [True] * 1 + [False] * 7 + [False] * 7
    second = [True] * 5 + [False] * 1 + [True] * 7 + [False] * 7
    out = paired_difference("prompt_level_strict_acc", first, second, iters=200, seed=0)
    assert (out["both"], out["first_only"], out["second_only"], out["neither"]) == (5, 1, 7, 7)
    assert out["mcnemar_p"] == pytest.approx(0.0703125, abs=1e-12)
    assert out["difference"] == pytest.approx(6 / 20 - 12 / 20)
    assert out["n"] == 20
    # symmetric, and the other hand-computed corners: b=0, c=6 -> 2 * 1/64; no discordant pair -> 1
    assert mcnemar_exact(7, 1) == pytest.approx(0.0703125)
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0


def test_paired_interval_is_narrower_than_unpaired_when_methods_agree_on_prompts():
    # The second method answers like the first on 190 of 200 prompts and better on 10: the prompts'
    # difficulty cancels in the pairs, so the paired interval is far tighter than either method's own.
    first = [i % 2 == 0 for i in range(200)]
    second = [f or i < 20 for i, f in enumerate(first)]
    out = paired_difference("prompt_level_strict_acc", second, first, iters=1000, seed=0)
    assert out["difference"] == pytest.approx(10 / 200)
    assert out["ci_low"] > 0  # every discordant prompt favours the second: the interval excludes 0
    assert out["ci_low"] <= out["difference"] <= out["ci_high"]
    lo, hi = bootstrap_ci("prompt_level_strict_acc", first, iters=1000, seed=0)
    assert out["ci_high"] - out["ci_low"] < (hi - lo) / 2
    assert out["mcnemar_p"] == pytest.approx(2 / 2**10)  # b=10, c=0


def test_identical_methods_differ_by_exactly_zero():
    values = [[True, False], [True], [False, False, True]]
    out = paired_difference("inst_level_strict_acc", values, values, iters=100, seed=0)
    assert (out["difference"], out["ci_low"], out["ci_high"]) == (0.0, 0.0, 0.0)


def test_mcnemar_does_not_apply_to_lists_or_continuous_values():
    lists = paired_difference(
        "inst_level_loose_acc", [[True, False], [True]], [[False, False], [True]], 50, 0
    )
    assert lists["mcnemar_p"] is None and "list of instruction results" in lists["mcnemar"]
    assert lists["difference"] == pytest.approx(2 / 3 - 1 / 3)  # pooled over instructions
    first, second = [[-2.0, 4], [-6.0, 4]], [[-3.0, 4], [-3.0, 4]]
    bpb = paired_difference("bits_per_byte", first, second, 50, 0)
    assert bpb["mcnemar_p"] is None and "not 0/1" in bpb["mcnemar"]
    assert bpb["difference"] == pytest.approx((8 / 8 - 6 / 8) / math.log(2))
    assert bpb["difference"] == pytest.approx(
        aggregate("bits_per_byte", first) - aggregate("bits_per_byte", second)
    )
    assert value_kind("acc", [1.0, 0.0]) == "binary" and value_kind("acc", [0.4, 1.0]) == "continuous"
    with pytest.raises(ValueError, match="align"):
        paired_difference("acc", [1.0], [1.0, 0.0], 10, 0)


def test_accuracy_per_constraint_family():
    rows = [
        {
            "doc_id": 0,
            "doc": {"instruction_id_list": ["keywords:existence", "length_constraints:number_words"]},
            "inst_level_strict_acc": [True, False],
            "inst_level_loose_acc": [True, True],
        },
        {
            "doc_id": 1,
            "doc": {"instruction_id_list": ["keywords:frequency", "keywords:forbidden_words"]},
            "inst_level_strict_acc": [False, True],
            "inst_level_loose_acc": [False, True],
        },
    ]
    families = family_accuracy(rows, iters=100, seed=0)
    assert list(families) == ["keywords", "length_constraints"]
    keywords = families["keywords"]
    assert (keywords["prompts"], keywords["instructions"]) == (2, 3)
    assert keywords["inst_level_strict_acc"]["value"] == pytest.approx(2 / 3)
    assert keywords["inst_level_loose_acc"]["value"] == pytest.approx(2 / 3)
    length = families["length_constraints"]
    assert (length["prompts"], length["instructions"]) == (1, 1)
    assert length["inst_level_strict_acc"]["value"] == 0.0 and length["inst_level_loose_acc"]["value"] == 1.0
    rows[0]["inst_level_strict_acc"] = [True]
    with pytest.raises(DataError, match="doc_id 0: inst_level_strict_acc has 1 results for 2 instructions"):
        family_accuracy(rows, iters=10, seed=0)


def test_an_answer_that_restates_the_request_is_counted_as_a_prompt_echo(tmp_path):
    from synthetic_instruction_tuner.comparison import begins_with_prompt, prompt_echo_table
    from synthetic_instruction_tuner.store import RunPaths, write_jsonl

    prompt = "Write a short poem about the sea. Include the keywords salt and wave."
    assert begins_with_prompt(prompt, "write a SHORT poem about the sea! Include the keywords... Salt, wave.")
    assert not begins_with_prompt(prompt, "The sea is salt and wave.")
    assert not begins_with_prompt("", "anything")
    paths = RunPaths(tmp_path)

    def row(i, answer, ids=("keywords:existence",)):
        doc = {"prompt": prompt, "instruction_id_list": list(ids)}
        return {"doc_id": i, "doc": doc, "filtered_resps": [answer], "metrics": ["acc"], "acc": 1}

    write_jsonl(
        paths.eval / "samples" / "base" / "ifeval.jsonl",
        [
            row(0, prompt + " Salt. Wave."),
            row(1, "Waves of salt."),
            row(2, prompt, ids=("combination:repeat_prompt",)),
            row(3, "  " + prompt.upper()),
        ],
    )
    scored = {"doc_id": 0, "doc": {"question": "q"}, "filtered_resps": [[-1.0, False]], "metrics": ["acc"]}
    write_jsonl(paths.eval / "samples" / "base" / "mmlu.jsonl", [scored])
    table = prompt_echo_table(paths, ["base", "dpo"])
    assert table == {"base": {"ifeval": {"answers": 4, "echo": 3, "echo_share": 0.75, "echo_asked": 1}}}


def test_differences_that_round_to_zero_print_without_a_sign():
    from synthetic_instruction_tuner.reporting import _signed

    assert [_signed(x) for x in (-0.0004, 0.0, 0.0004, -0.0371, 0.113)] == [
        "0.000",
        "0.000",
        "0.000",
        "\u22120.037",
        "+0.113",
    ]
