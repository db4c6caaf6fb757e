"""Constraint back-translation: constraints read off a response are ones lm-eval's checker passes."""

import random

import pytest

from synthetic_instruction_tuner import backtranslation as bt
from synthetic_instruction_tuner import constraints as ic

RESPONSE = """<<Better sleep>>
Here are three tips:
- Keep a regular schedule every night.
- Avoid screens before bed.
- Keep your bedroom cool and dark.

These habits help your body relax. Is there anything else I can help with?"""


@pytest.mark.parametrize("seed", range(5))
def test_every_derived_constraint_is_met_as_lm_eval_checks_it(seed):
    found = bt.met_constraints(RESPONSE, random.Random(seed))
    by_id = {c.instruction_id: c.kwargs for c in found}
    assert by_id["detectable_format:number_bullet_lists"] == {"num_bullets": 3}
    assert by_id["detectable_format:title"] == {}
    assert by_id["startend:end_checker"] == {"end_phrase": "Is there anything else I can help with?"}
    assert "detectable_content:postscript" not in by_id and "change_case:english_lowercase" not in by_id
    assert all(ic.check(RESPONSE, [c]) == [True] for c in found)


def test_a_response_without_the_feature_gets_no_such_constraint():
    text = "Sleep matters, so keep a schedule. P.S. Avoid coffee late in the day."
    ids = {c.instruction_id for c in bt.met_constraints(text, random.Random(0))}
    assert "detectable_content:postscript" in ids
    assert not ids & {
        "punctuation:no_comma",
        "detectable_format:title",
        "detectable_format:number_bullet_lists",
    }


def test_backtranslated_sets_are_compatible_met_and_limited_to_the_allowed_families():
    allowed = ["length_constraints:number_words", "keywords:existence", "detectable_format:title"]
    for seed in range(10):
        cons = bt.backtranslate(RESPONSE, random.Random(seed), k=2, allowed=allowed)
        assert 1 <= len(cons) <= 2 and all(ic.check(RESPONSE, cons))
        assert {c.instruction_id for c in cons} <= set(allowed)
        table = ic.conflicts()
        assert not any(b.instruction_id in table[a.instruction_id] for a in cons for b in cons if a != b)
    # the prompt reads as IFEval's: instruction, blank line, the checker's own description
    prompt = ic.add_constraints("Give me sleep tips.", cons)
    assert prompt.startswith("Give me sleep tips.\n\n") and ic.describe(cons) in prompt


def test_separating_constraints_pass_the_chosen_and_fail_the_rejected():
    chosen = "Keep a regular schedule and a cool room. P.S. Avoid coffee after noon."
    rejected = "Sleep is important for health, so try to rest well every night and relax before bed."
    for seed in range(10):
        cons = bt.separating_constraints(chosen, rejected, random.Random(seed), k=2)
        assert cons and all(ic.check(chosen, cons)) and not all(ic.check(rejected, cons))
        # a length bound separates them only when nothing else does
        assert cons[0].instruction_id not in (
            "length_constraints:number_words",
            "length_constraints:number_sentences",
        )
    assert (
        bt.separating_constraints(chosen, chosen, random.Random(0), k=2) == []
    )  # nothing separates a text from itself
