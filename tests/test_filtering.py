"""Step 03 filtering: rule reasons, near-duplicate clusters, the target cut and the funnel."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from synthetic_instruction_tuner.config import FilteringConfig
from synthetic_instruction_tuner.errors import DataError
from synthetic_instruction_tuner.filtering import (
    REASONS,
    RULE_REASONS,
    filter_records,
    has_markdown_junk,
    has_role_leakage,
    is_fragment,
    is_refusal,
    language_mismatch,
    minhash,
    near_duplicates,
    quality_score,
    repeated_ngram_ratio,
    rule_filter_reason,
    shingles,
    trim_to_sentence,
)

CFG = FilteringConfig()
NO_LANG = dataclasses.replace(CFG, language=None)  # for tests that are not about language, and faster

INSTRUCTION = "Explain how photosynthesis works in plants, in a way a curious teenager would understand."
RESPONSE = (
    "Photosynthesis is the process plants use to turn light into chemical energy. Chlorophyll in the "
    "leaves absorbs sunlight, which powers reactions that split water and release oxygen into the air. "
    "The captured energy is then used to build sugars from carbon dioxide drawn in through tiny pores "
    "called stomata. Those sugars feed the plant as it grows and, in the end, most of the animals that "
    "eat plants, including us."
)
FRENCH = (
    "La photosynthèse est le processus par lequel les plantes transforment la lumière du soleil en "
    "énergie chimique. La chlorophylle des feuilles absorbe la lumière et libère de l'oxygène."
)
GERMAN = (
    "Die Photosynthese ist der Prozess, bei dem Pflanzen das Licht der Sonne in chemische Energie "
    "umwandeln. Das Chlorophyll in den Blättern nimmt das Licht auf und setzt Sauerstoff frei."
)
# 62 words; sliding windows over it make a chain of near-duplicate instructions.
PASSAGE_TEXT = (
    "Our small team maintains an open source library for parsing calendar files, and last month a "
    "contributor reported that recurring events crossing a daylight saving boundary appear one hour late "
    "in every exported feed. Please propose a careful plan to reproduce the bug, write regression tests, "
    "fix the timezone arithmetic, and document the behaviour for downstream users who rely on stable "
    "timestamps"
)
PASSAGE = PASSAGE_TEXT.split()


def rec(rid: str, instruction: str = INSTRUCTION, response: str = RESPONSE, **extra) -> dict:
    return {"id": rid, "instruction": instruction, "response": response, "finish_reason": "stop", **extra}


def words(n: int) -> str:
    """`n` words of English without repeated trigrams (cycling the passage with a counter)."""
    return " ".join(f"{PASSAGE[i % len(PASSAGE)]}{i // len(PASSAGE) or ''}" for i in range(n))


# --- rules ----------------------------------------------------------------------------------------------


def test_clean_record_passes_every_rule_with_language_check():
    assert rule_filter_reason(rec("ins-clean"), CFG) is None
    assert repeated_ngram_ratio(RESPONSE, CFG.repetition_ngram) == 0.0


TRIGGERS = {
    "instruction_too_short": rec("x", instruction="Explain photosynthesis"),
    "instruction_too_long": rec("x", instruction="Explain photosynthesis again. " * 101),
    "instruction_fragment": rec("x", instruction="Give me a list of healthy breakfast ideas such as:"),
    "response_too_short": rec("x", response="Plants use sunlight."),
    "response_too_long": rec("x", response=words(801)),
    "truncated": rec("x", finish_reason="length"),
    "role_leakage": rec("x", response=RESPONSE + "<|im_end|>\n<|im_start|>user\nThanks!"),
    "refusal": rec("x", response="I'm sorry, but I can't help with that request. " + RESPONSE),
    "non_english": rec("x", response=FRENCH),
    "repetitive": rec("x", response="The answer is yes and always yes. " * 12),
}


def test_every_rule_reason_has_a_trigger():
    assert tuple(TRIGGERS) == RULE_REASONS
    assert ("benchmark_overlap", *RULE_REASONS, "near_duplicate", "over_target") == REASONS


@pytest.mark.parametrize("reason", RULE_REASONS)
def test_each_rule_fires_on_its_record(reason):
    assert rule_filter_reason(TRIGGERS[reason], CFG) == reason


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        # short instruction wins over truncation and refusal further down the list
        (
            rec("a", instruction="Hi", finish_reason="length", response="I cannot help with that, sorry."),
            "instruction_too_short",
        ),
        (rec("b", instruction="Write a poem about the", response="Too short."), "instruction_fragment"),
        (rec("c", response="Sorry.", finish_reason="length"), "response_too_short"),
        (rec("d", finish_reason="length", response=RESPONSE + "\nUser: thanks"), "truncated"),
        (rec("e", response="As an AI language model, I cannot. <end_of_turn> " + RESPONSE), "role_leakage"),
        (rec("f", response="I'm sorry, but I can't. " + "No no no no. " * 20), "refusal"),
        (rec("g", response=(FRENCH + " ") * 4), "non_english"),
    ],
)
def test_first_reason_in_order_wins(record, expected):
    assert rule_filter_reason(record, CFG) == expected


def test_truncated_kept_when_drop_truncated_is_off():
    cfg = dataclasses.replace(CFG, drop_truncated=False)
    assert rule_filter_reason(rec("x", finish_reason="length"), cfg) is None
    assert rule_filter_reason(rec("x", finish_reason=None), CFG) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Steps:\n1. Set the first leg.\n2. Now you can", "Steps:\n1. Set the first leg."),
        ('He said "stop." Then we', 'He said "stop."'),
        ("It costs 3.5 dollars. And 2. is", "It costs 3.5 dollars."),
        ("Done! Really? Yes and", "Done! Really?"),
        ("1. 2. 3. no sentence at all", None),
    ],
)
def test_trim_to_sentence_cuts_after_the_last_sentence_end(text, expected):
    assert trim_to_sentence(text) == expected


def test_trim_truncated_keeps_cut_answers_trimmed_and_counts_them():
    cut = RESPONSE + " And then the plant"
    records = [
        rec("a"),
        rec("b", "Why do leaves look green, and what does chlorophyll do?", cut, finish_reason="length"),
        rec("c", "What is a calendar file?", "1. 2. and then " + words(20), finish_reason="length"),
    ]
    original = json.dumps(records)
    dropped = filter_records(records, NO_LANG, target=10)
    assert [r["id"] for r in dropped.kept] == ["a"] and dropped.funnel["trimmed"] == 0
    kept = filter_records(records, dataclasses.replace(NO_LANG, trim_truncated=True), target=10)
    assert [r["id"] for r in kept.kept] == ["a", "b"]
    assert kept.kept[1]["response"] == RESPONSE and kept.kept[1]["finish_reason"] == "trimmed"
    assert kept.funnel["trimmed"] == 1 and kept.funnel["removed"]["truncated"] == 1
    assert json.dumps(records) == original  # the caller's records are not changed


def test_trim_words_trims_long_answers_to_the_last_sentence_within_the_limit():
    long = "One two three. Four five six. Seven eight nine ten."  # sentence ends at words 3, 6, 10
    assert trim_to_sentence(long, max_words=6) == "One two three. Four five six."
    assert trim_to_sentence(long, max_words=2) is None
    records = [rec("a", response=long), rec("b", "What is a calendar file?", "Short answer here, done.")]
    result = filter_records(records, dataclasses.replace(NO_LANG, min_response_words=3, trim_words=6), 10)
    assert [r["response"] for r in result.kept] == ["One two three. Four five six.", records[1]["response"]]
    assert result.funnel["trimmed"] == 1 and result.kept[0]["finish_reason"] == "trimmed"


def test_word_limits_are_inclusive():
    cfg = dataclasses.replace(
        NO_LANG, min_instruction_words=3, max_instruction_words=5, min_response_words=5, max_response_words=6
    )
    assert rule_filter_reason(rec("x", "Name three planets.", "One two three four five."), cfg) is None
    assert rule_filter_reason(rec("x", "Name three big planets now.", words(6)), cfg) is None
    assert (
        rule_filter_reason(rec("x", "Name three big red planets now.", words(6)), cfg)
        == "instruction_too_long"
    )
    assert rule_filter_reason(rec("x", "Name three planets.", words(7)), cfg) == "response_too_long"


@pytest.mark.parametrize(
    ("instruction", "fragment"),
    [
        ("Here are some ideas for a birthday party:", True),
        ("Write a short poem about the sea,", True),
        ("Write a poem about the", True),
        ("Compare cats and", True),
        ("Give me a list of", True),
        ("Suggest hobbies for retirees such as", True),
        ("Write a poem about the sea.", False),
        ("What is this bowl made of?", False),
        ("Tell me where the word quarantine comes from", False),
        ("Describe your ideal weekend", False),
        ("Explain this error: `TypeError: unhashable type`", False),
    ],
)
def test_fragment_rule(instruction, fragment):
    assert is_fragment(instruction) is fragment


@pytest.mark.parametrize(
    "text",
    [
        "Sure!<|im_end|>",
        "<|im_start|>assistant\nHello",
        "Answer here<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>",
        "<start_of_turn>model\nHi",
        "Hi there<end_of_turn>",
        "[INST] What is AI? [/INST]",
        "<|user|>\nHello",
        "<|assistant|> Hi",
        "Great question.\nUser: and what about dogs?",
        "Assistant: Here is the answer.",
        "### Instruction:\nWrite a poem.",
        "Text\n### Response\nDone",
    ],
)
def test_role_leakage_variants(text):
    assert has_role_leakage(text)
    assert rule_filter_reason(rec("x", response=f"{RESPONSE}\n{text}"), NO_LANG) == "role_leakage"


@pytest.mark.parametrize(
    "text",
    [
        RESPONSE,
        "### Instructions\n1. Preheat the oven.\n2. Mix the flour and the sugar.",
        "## Response codes\nA 404 means the page was not found.",
        "The user: field in the form is optional, and the assistant role is configurable.",
        "In Haskell, `<|>` chooses the first parser that succeeds.",
    ],
)
def test_role_leakage_spares_ordinary_text(text):
    assert not has_role_leakage(text)


@pytest.mark.parametrize(
    "response",
    [
        "I'm sorry, but I can't help with creating that content.",
        "I\u2019m sorry, but I can\u2019t provide that information.",
        "I am afraid I cannot do that for you.",
        "I apologize, but I am unable to share personal data.",
        "Sorry, I won't write that essay for you.",
        "As an AI language model, I do not have personal opinions.",
        "As an AI, I don't have feelings, but here is some general advice.",
        "as a large language model I have no access to the internet.",
        "I cannot assist with requests that involve hacking.",
        "Unfortunately, I'm unable to help with this particular request.",
        "I must respectfully decline to write this story.",
    ],
)
def test_refusal_variants(response):
    assert is_refusal(response)
    assert rule_filter_reason(rec("x", response=f"{response} {RESPONSE}"), NO_LANG) == "refusal"


@pytest.mark.parametrize(
    "response",
    [
        RESPONSE,
        "I'm sorry to hear about your cat. Here are some ways to help her feel better at home.",
        "As an AI researcher, you will want to read the original transformer paper first.",
        words(45) + ". Note that I cannot help you if the server is down.",  # beyond the refusal window
    ],
)
def test_refusal_spares_ordinary_answers(response):
    assert not is_refusal(response)


@pytest.mark.parametrize(
    "record",
    [
        rec("fr", response=FRENCH),
        rec("de", response=GERMAN),
        rec("de-ins", instruction="Erkläre bitte, wie die Photosynthese in den Pflanzen genau funktioniert."),
    ],
)
def test_non_english_instruction_or_response(record):
    assert rule_filter_reason(record, CFG) == "non_english"
    assert rule_filter_reason(record, NO_LANG) is None


def test_language_setting_names_the_wanted_language():
    french = rec(
        "fr",
        instruction="Explique-moi comment fonctionne la photosynthèse chez les plantes vertes.",
        response=FRENCH,
    )
    assert rule_filter_reason(french, dataclasses.replace(CFG, language="fr")) is None
    assert rule_filter_reason(rec("en"), dataclasses.replace(CFG, language="fr")) == "non_english"


def test_language_check_edge_cases():
    assert not language_mismatch(RESPONSE, "en")
    assert language_mismatch("1 2 3 4 5 6 7 8 9 10 11 12", "en")  # no letters at all
    assert not language_mismatch("Write a haiku.", "en")  # too short to judge: langdetect says Estonian
    code = "```python\ndef add(a, b):\n    return a + b\n```\n"
    assert not language_mismatch("Here is a small function that adds two numbers together:\n" + code, "en")
    assert not language_mismatch(code, "en")  # only code: no prose left to judge


@pytest.mark.parametrize(
    ("text", "n", "expected"),
    [
        ("a b c a b c", 3, 0.25),  # abc bca cab abc: 3 unique of 4
        ("spam spam spam spam", 1, 0.75),
        ("spam spam spam spam", 2, 1 - 1 / 3),
        ("Go! go. GO", 1, 1 - 1 / 3),  # normalised: lowercase, punctuation stripped
        ("the cat sat on the mat", 3, 0.0),
        ("one two", 3, 0.0),  # fewer words than n
        ("", 3, 0.0),
    ],
)
def test_repeated_ngram_ratio(text, n, expected):
    assert repeated_ngram_ratio(text, n) == pytest.approx(expected)


def test_repeated_ngram_ratio_rejects_bad_n():
    with pytest.raises(ValueError, match="at least 1"):
        repeated_ngram_ratio("a b c", 0)


def test_bad_records_raise_data_error():
    with pytest.raises(DataError, match="'response'"):
        rule_filter_reason({"id": "x", "instruction": INSTRUCTION}, CFG)
    with pytest.raises(DataError, match="duplicate id 'a'"):
        filter_records([rec("a"), rec("a", instruction="Another one entirely here.")], NO_LANG, target=5)


# --- quality score ---------------------------------------------------------------------------------------


def test_quality_score_prefers_sweet_spot_clean_answers():
    good = quality_score(rec("g", response=words(100)), CFG)
    short = quality_score(rec("s", response=words(10)), CFG)
    long = quality_score(rec("l", response=words(600)), CFG)
    junk = quality_score(rec("j", response=words(100) + "\n```python\nprint(1)"), CFG)
    loopy = quality_score(rec("r", response=words(50) + " and so on and so on and so on"), CFG)
    assert good == 1.0
    assert short == pytest.approx(0.25)
    assert long == pytest.approx(0.5)
    assert junk == pytest.approx(0.5)
    assert 0.8 < loopy < 1.0
    assert has_markdown_junk("**bold without end")
    assert has_markdown_junk("Steps:\n1.\n2. Mix")
    assert not has_markdown_junk("# Title\n- item\n```\ncode\n```\n**bold**")


# --- near-duplicates -------------------------------------------------------------------------------------

STORY = "Write a short story about a lighthouse keeper who discovers a mysterious message in a bottle."
ML = "Explain the difference between supervised and unsupervised machine learning with simple examples."


def dedup_fixture() -> list[dict]:
    return [
        rec("s-01", STORY, words(20)),  # cluster 1: shorter answer, lower score
        rec("s-02", STORY.lower().replace(",", "").replace("keeper", "keeper,"), words(100)),  # best
        rec("s-03", STORY.replace("bottle.", "bottle tonight!"), words(100) + "\n```"),  # junk
        rec("single-1", "Give me three tips for keeping houseplants alive during a cold winter.", words(100)),
        rec("m-02", ML, words(60)),  # cluster 2: equal scores, smaller id wins
        rec("m-01", ML.replace("simple examples", "simple examples for complete beginners"), words(60)),
        rec("single-2", "Plan a relaxed three day itinerary for a first visit to Lisbon.", words(100)),
        rec("single-3", "Write a short story about a dragon who is afraid of the dark.", words(100)),
    ]


def test_dedup_keeps_one_per_cluster_and_leaves_singles_alone():
    records = dedup_fixture()
    dup = near_duplicates(records, NO_LANG)
    ids = [r["id"] for r in records]
    assert {ids[k]: ids[v] for k, v in dup.items()} == {"s-01": "s-02", "s-03": "s-02", "m-02": "m-01"}

    result = filter_records(records, NO_LANG, target=100)
    assert [r["id"] for r in result.kept] == ["s-02", "single-1", "m-01", "single-2", "single-3"]
    assert result.funnel["removed"]["near_duplicate"] == 3
    assert {e["id"]: e["duplicate_of"] for e in result.removed} == {
        "s-01": "s-02",
        "s-03": "s-02",
        "m-02": "m-01",
    }


def test_dedup_is_order_independent():
    records = dedup_fixture()
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    kept = [r["id"] for r in filter_records(records, NO_LANG, target=100).kept]
    kept_shuffled = [r["id"] for r in filter_records(shuffled, NO_LANG, target=100).kept]
    assert sorted(kept) == sorted(kept_shuffled)


def test_chain_of_near_duplicates_is_one_cluster():
    a, b, c = (" ".join(PASSAGE[s : s + 47]) for s in (0, 5, 10))
    ma, mb, mc = (minhash(t, CFG) for t in (a, b, c))
    threshold = CFG.dedup_threshold
    # The premise: A~B and B~C are above the threshold, A~C is not.
    assert ma.jaccard(mb) >= threshold and mb.jaccard(mc) >= threshold
    assert ma.jaccard(mc) < threshold
    records = [rec("c", c), rec("a", a), rec("b", b), rec("z", INSTRUCTION)]
    dup = near_duplicates(records, NO_LANG)
    assert {records[k]["id"]: records[v]["id"] for k, v in dup.items()} == {"b": "a", "c": "a"}


def test_short_instructions_are_shingled_whole():
    assert shingles("Hi there!", 3) == {"hi there"}
    assert shingles("One two three four", 3) == {"one two three", "two three four"}
    records = [rec("b", "Define entropy"), rec("a", "define entropy?"), rec("c", "Define enthalpy")]
    dup = near_duplicates(records, NO_LANG, scores=[0.0, 0.0, 0.0])
    assert dup == {0: 1}


# --- target cut and funnel -------------------------------------------------------------------------------

INSTRUCTIONS = [
    "Describe the life cycle of a monarch butterfly in a few short paragraphs.",
    "Suggest five easy vegetarian dinners that can be cooked in under thirty minutes.",
    "Explain why the sky looks blue during the day and red at sunset.",
    "Write a polite email asking a landlord to repair a leaking kitchen tap.",
    "Summarise the main causes of the French Revolution for a high school student.",
    "Compare renting and buying a home for a young couple in a large city.",
]


def target_fixture() -> list[dict]:
    lengths = [10, 30, 100, 20, 100, 600]  # scores 0.25, 0.75, 1.0, 0.5, 1.0, 0.5
    pairs = zip(INSTRUCTIONS, lengths, strict=True)
    return [rec(f"t-{i}", ins, words(n)) for i, (ins, n) in enumerate(pairs)]


def test_over_target_keeps_best_scores_deterministically():
    records = target_fixture()
    result = filter_records(records, NO_LANG, target=3)
    # t-2 and t-4 tie at 1.0; then t-1 (0.75). t-3 and t-5 tie at 0.5 and both go.
    assert [r["id"] for r in result.kept] == ["t-1", "t-2", "t-4"]
    assert result.funnel["removed"]["over_target"] == 3
    result4 = filter_records(records, NO_LANG, target=4)
    assert [r["id"] for r in result4.kept] == ["t-1", "t-2", "t-3", "t-4"]  # the 0.5 tie goes to t-3
    for seed in range(5):
        shuffled = records[:]
        random.Random(seed).shuffle(shuffled)
        again = filter_records(shuffled, NO_LANG, target=3)
        assert sorted(r["id"] for r in again.kept) == ["t-1", "t-2", "t-4"]
        in_input_order = [r["id"] for r in shuffled if r["id"] in {"t-1", "t-2", "t-4"}]
        assert [r["id"] for r in again.kept] == in_input_order


def test_no_cut_when_under_target_and_records_pass_through_unchanged():
    records = target_fixture()
    records[0]["source"] = {"temperature": 0.7}
    result = filter_records(records, NO_LANG, target=50)
    assert result.kept == records
    assert result.kept[0] is records[0]
    assert result.funnel["removed"]["over_target"] == 0
    assert filter_records(records, NO_LANG, target=0).kept == []
    with pytest.raises(ValueError, match="target"):
        filter_records(records, NO_LANG, target=-1)


def test_funnel_is_consistent_serialisable_and_capped():
    records = [*dedup_fixture(), *target_fixture()]
    for reason, trigger in TRIGGERS.items():
        records += [{**trigger, "id": f"{reason}-{k}"} for k in range(3)]  # three of each
    result = filter_records(records, CFG, target=6, examples_per_reason=2)
    funnel = json.loads(json.dumps(result.funnel))  # JSON round trip

    assert funnel["input"] == len(records)
    assert funnel["input"] == funnel["kept"] + sum(funnel["removed"].values())
    assert funnel["kept"] == len(result.kept) == 6
    assert list(funnel["removed"]) == list(REASONS)
    assert list(funnel["examples"]) == list(REASONS)
    assert [s["stage"] for s in funnel["stages"]] == ["benchmarks", "rules", "dedup", "target"]
    assert funnel["removed"]["benchmark_overlap"] == 0  # no index given: no benchmark check
    assert [s["remaining"] for s in funnel["stages"]] == [
        len(records),
        len(records) - sum(funnel["removed"][r] for r in RULE_REASONS),
        len(records) - sum(funnel["removed"][r] for r in RULE_REASONS) - funnel["removed"]["near_duplicate"],
        6,
    ]
    for reason in RULE_REASONS:
        assert funnel["removed"][reason] >= 3, reason
    assert funnel["removed"]["near_duplicate"] == 3
    assert funnel["removed"]["over_target"] > 0
    for reason, examples in funnel["examples"].items():
        assert len(examples) == min(2, funnel["removed"][reason])
        for example in examples:
            assert len(example["response"]) <= 301 and len(example["instruction"]) <= 301
            assert ("duplicate_of" in example) == (reason == "near_duplicate")
    assert funnel["examples"]["response_too_long"][0]["response"].endswith("…")
    assert funnel["settings"]["dedup_threshold"] == CFG.dedup_threshold
    assert funnel["settings"]["target"] == 6
    assert len(result.removed) == sum(funnel["removed"].values())


def test_empty_input():
    result = filter_records([], CFG, target=10)
    assert result.kept == []
    assert result.funnel["input"] == result.funnel["kept"] == 0
    assert set(result.funnel["removed"].values()) == {0}
