"""Format edits: each edit makes lm-eval's checker pass where it failed, within the sampler's ranges,
and edit_in returns only constraints its edited response meets."""

import random
import re

import pytest

from synthetic_instruction_tuner import constraints as ic
from synthetic_instruction_tuner import format_edits as fe

INSTRUCTION = "Can you suggest some ways to keep basil alive on a windowsill?"
ANSWER = (
    "Basil likes at least six hours of sun, so a south-facing window works best. Water it when the top "
    "inch of soil is dry, and never let the pot stand in water. Pinch off the flower buds as soon as "
    "they appear, because flowering makes the leaves bitter. Harvest from the top so the plant grows "
    "bushy. Mary from Denver keeps hers going for 2 years this way."
)
LIST_ANSWER = "Here are three options:\n1. Oats with fruit\n2. Greek yogurt\n3. Eggs on toast"

# The ranges constraints.sample_constraints draws held-out kwargs from
RANGES = {
    "detectable_format:number_bullet_lists": ("num_bullets", 2, 5),
    "detectable_format:multiple_sections": ("num_sections", 2, 5),
    "detectable_format:number_highlighted_sections": ("num_highlights", 1, 4),
    "detectable_content:number_placeholders": ("num_placeholders", 1, 3),
    "length_constraints:number_paragraphs": ("num_paragraphs", 2, 5),
    "change_case:capital_word_frequency": ("capital_frequency", 2, 5),
}


@pytest.mark.parametrize("family", sorted(fe.EDITORS))
def test_each_edit_meets_its_check_where_the_answer_did_not(family):
    for seed in range(5):
        text, kwargs = fe.EDITORS[family](ANSWER, INSTRUCTION, random.Random(seed))
        constraint = ic.Constraint(family, kwargs)
        assert ic.check(text, [constraint]) == [True], (family, text)
        if family != "change_case:capital_word_frequency":  # "at least 2" capitals: ANSWER has none
            assert ic.check(ANSWER, [constraint]) == [False], family
        if family in RANGES:
            key, low, high = RANGES[family]
            assert low <= kwargs[key] <= high, (family, kwargs)


def test_layouts_keep_the_answer_and_put_things_where_a_reader_expects_them():
    rng = random.Random(1)
    title, _ = fe.EDITORS["detectable_format:title"](ANSWER, INSTRUCTION, rng)
    assert title.startswith("<<Ways To Keep Basil Alive>>\n\n") and title.endswith(ANSWER)
    ps, kwargs = fe.EDITORS["detectable_content:postscript"](ANSWER, INSTRUCTION, rng)
    assert ps.endswith(
        f"{kwargs['postscript_marker']} Mary from Denver keeps hers going for 2 years this way."
    )
    bullets, kwargs = fe.EDITORS["detectable_format:number_bullet_lists"](LIST_ANSWER, INSTRUCTION, rng)
    assert bullets == "Here are three options:\n* Oats with fruit\n* Greek yogurt\n* Eggs on toast"
    assert kwargs == {"num_bullets": 3}
    sections, kwargs = fe.EDITORS["detectable_format:multiple_sections"](ANSWER, INSTRUCTION, rng)
    assert sections.startswith(f"{kwargs['section_spliter']} 1\nBasil likes")
    assert " ".join(sections.split()).count("Basil likes at least six hours of sun") == 1


def test_placeholders_are_the_answers_own_words_made_slots_where_they_stand():
    for seed in range(5):
        text, kwargs = fe.EDITORS["detectable_content:number_placeholders"](ANSWER, "", random.Random(seed))
        slots = re.findall(r"\[([A-Za-z]+)\]", text)
        assert len(slots) == kwargs["num_placeholders"] and 1 <= len(slots) <= 3
        assert text.replace("[", "").replace("]", "") == ANSWER  # nothing added on top or below
        assert not text.startswith("[")


def test_edits_give_up_on_answers_that_offer_nothing():
    one = "Yes."
    for family in ("detectable_format:number_bullet_lists", "detectable_format:multiple_sections"):
        assert fe.EDITORS[family](one, INSTRUCTION, random.Random(0)) is None
    assert fe.EDITORS["detectable_format:title"](one, "Hi", random.Random(0)) is None


def test_edit_in_returns_only_constraints_the_edited_answer_meets():
    families = [
        *RANGES,
        "detectable_format:title",
        "detectable_content:postscript",
        "keywords:existence",
    ]
    edited_ids = set()
    for seed in range(40):
        rng = random.Random(seed)
        text, cons, edited = fe.edit_in(INSTRUCTION, ANSWER, rng, rng.randint(1, 3), families)
        assert 1 <= len(cons) <= 3 and all(ic.check(text, cons))
        assert set(edited) <= {c.instruction_id for c in cons} and (text == ANSWER) == (not edited)
        table = ic.conflicts()
        assert not any(
            a.instruction_id in table[b.instruction_id] for i, a in enumerate(cons) for b in cons[:i]
        )
        edited_ids.update(edited)
    assert {"detectable_format:title", "detectable_content:postscript"} <= edited_ids


def test_edit_in_keeps_what_the_answer_already_meets_when_told_not_to_edit():
    answer = "<<Basil>>\n\nWater it often."
    text, cons, edited = fe.edit_in(
        INSTRUCTION, answer, random.Random(0), 1, ["detectable_format:title"], 0.0
    )
    assert (text, edited) == (answer, []) and [c.instruction_id for c in cons] == ["detectable_format:title"]


def test_keywords_are_words_no_heldout_prompt_asks_for_in_an_opening_line():
    asked = set()
    for seed in range(40):
        text, kwargs = fe.EDITORS["keywords:existence"](ANSWER, INSTRUCTION, random.Random(seed))
        assert 1 <= len(kwargs["keywords"]) <= 2 and text.endswith(ANSWER)
        assert text.startswith(fe._KEYWORD_LEADS)
        asked.update(kwargs["keywords"])
    assert len(asked) > 30  # drawn from IFEval's word list, not a handful of words
    assert not asked & {*ic._KEYWORDS, *ic._FORBIDDEN_WORDS}
    text, cons, edited = fe.edit_in(
        INSTRUCTION,
        ANSWER,
        random.Random(0),
        2,
        ["keywords:existence", "detectable_content:postscript"],
        edit_rate=1.0,
    )
    assert edited == ["keywords:existence", "detectable_content:postscript"]
    assert text.startswith(fe._KEYWORD_LEADS)
    assert text.rsplit("\n", 1)[-1].startswith(("P.S.", "P.P.S"))
    assert all(ic.check(text, cons))


def test_keywords_are_always_edited_in_never_derived_from_words_the_answer_has():
    for seed in range(10):
        _, cons, edited = fe.edit_in(
            INSTRUCTION, ANSWER, random.Random(seed), 1, ["keywords:existence"], edit_rate=0.0
        )
        assert edited == ["keywords:existence"]
        assert not set(cons[0].kwargs["keywords"]) & set(ANSWER.lower().split())
