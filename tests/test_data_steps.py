"""Steps 02-04 on the smoke profile: responses, filtering, preference pairs."""

import json

import pytest
from conftest import kill_when, run_cli

from synthetic_instruction_tuner import constraints as ic
from synthetic_instruction_tuner import format_edits as fe
from synthetic_instruction_tuner.config import load_config
from synthetic_instruction_tuner.contamination import split_prompt
from synthetic_instruction_tuner.preferences import (
    SFT_SOURCES,
    SKIP_REASONS,
    combined_score,
    rejection_sample,
    select_constraint_pair,
    select_pair,
    sft_train_rows,
    split_heldout,
)
from synthetic_instruction_tuner.store import read_jsonl, run_paths
from synthetic_instruction_tuner.training import sft_splits


def test_responses_cover_every_instruction(smoke_run):
    run, _ = smoke_run
    instructions = read_jsonl(run / "data/instructions.jsonl")
    responses = read_jsonl(run / "data/responses.jsonl")
    assert [r["id"] for r in responses] and {r["id"] for r in responses} == {r["id"] for r in instructions}
    assert all(r["finish_reason"] in ("stop", "length") for r in responses)
    assert {"instruction", "response", "num_tokens", "generator", "sampling", "seed"} <= set(responses[0])


def test_funnel_is_consistent_with_the_files(smoke_run):
    run, _ = smoke_run
    funnel = json.loads((run / "data/funnel.json").read_text())
    sft = read_jsonl(run / "data/sft.jsonl")
    removed = read_jsonl(run / "data/filtered_out.jsonl", required=("id", "reason"))
    assert funnel["kept"] == len(sft) == 16  # the smoke profile's sft_target
    assert funnel["input"] == len(read_jsonl(run / "data/responses.jsonl")) == len(sft) + len(removed)
    assert sum(funnel["removed"].values()) == len(removed)
    assert funnel["generation"]["instructions"] == len(read_jsonl(run / "data/instructions.jsonl"))
    assert sft[0]["messages"][0]["role"] == "user" and sft[0]["messages"][1]["role"] == "assistant"


def test_preferences_are_trl_conversational_with_their_scores(smoke_run):
    run, _ = smoke_run
    pairs = read_jsonl(run / "data/preferences.jsonl")
    summary = json.loads((run / "data/preferences_summary.json").read_text())
    assert len(pairs) == summary["pairs"] > 0
    assert summary["pairs"] + sum(summary["skipped"].values()) == summary["preference_prompts"]
    assert sum(summary["pair_sources"].values()) == len(pairs)
    assert {p["source"] for p in pairs} <= {"sweep", "back_translation"}
    for pair in pairs:
        assert pair["prompt"][0]["role"] == "user" and pair["chosen"][0]["role"] == "assistant"
        assert pair["rejected"][0]["role"] == "assistant"
        assert pair["score_chosen"] > pair["score_rejected"] and pair["margin"] > 0
        assert pair["scorer"] == "both"
        assert pair["temperature_chosen"] in summary["temperatures"]


def test_heldout_prompts_are_never_trained_on(smoke_run):
    run, _ = smoke_run
    paths = run_paths(run)
    cfg = load_config("smoke")
    heldout = {r["id"] for r in read_jsonl(run / "data/heldout.jsonl")}
    assert len(heldout) == cfg.counts.heldout_prompts
    train, evaluation = sft_splits(paths, cfg)
    assert heldout.isdisjoint(train["id"]) and heldout.isdisjoint(evaluation["id"])
    assert heldout.isdisjoint(p["id"] for p in read_jsonl(run / "data/preferences.jsonl"))
    heldout_rows = read_jsonl(run / "data/heldout.jsonl")
    assert all({"key", "prompt", "instruction_id_list", "kwargs", "response"} <= set(r) for r in heldout_rows)
    assert all(r["instruction_id_list"] for r in heldout_rows)  # every held-out prompt carries constraints


def test_the_contamination_check_covers_every_row_as_trained(smoke_run):
    run, _ = smoke_run
    report = json.loads((run / "data/contamination.json").read_text())
    cfg = load_config("smoke")
    assert report["ngram"] == cfg.filtering.contamination_ngram
    assert report["checked"] == {
        "sft_train.jsonl": len(read_jsonl(run / "data/sft_train.jsonl")),
        "preferences.jsonl": len(read_jsonl(run / "data/preferences.jsonl")),
    }
    assert report["counts"]["heldout"]["documents"] == cfg.counts.heldout_prompts
    assert report["counts"]["ifeval"]["documents"] == 541
    # every benchmark task-text overlap was removed before training; what is left is the constraint wording
    benchmark_kinds = {m["kind"] for m in report["matches"] if m["benchmark"] != "heldout"}
    assert report["task_overlap"] == 0 and benchmark_kinds <= {"template"}
    funnel = json.loads((run / "data/funnel.json").read_text())
    assert funnel["stages"][0]["stage"] == "benchmarks" and "benchmark_overlap" in funnel["removed"]


def test_heldout_split_is_seeded():
    rows = [{"id": str(i)} for i in range(20)]
    a, rest = split_heldout(rows, 5, seed=1)
    assert split_heldout(rows, 5, seed=1)[0] == a != split_heldout(rows, 5, seed=2)[0]
    assert len(a) == 5 and len(rest) == 15 and {r["id"] for r in a}.isdisjoint(r["id"] for r in rest)


def _samples(*scores, finish="stop"):
    return [
        {"id": f"s{i}", "response": f"answer {i}", "score": s, "finish_reason": finish, "temperature": t}
        for i, (s, t) in enumerate(zip(scores, (0.6, 0.9, 1.2, 1.5), strict=False))
    ]


def test_pair_selection_ties_margins_and_order():
    pair, reason = select_pair(_samples(0.2, 0.9, 0.5), min_margin=0.3)
    assert reason is None and pair["chosen"]["score"] == 0.9 and pair["rejected"]["score"] == 0.2
    assert pair["margin"] == pytest.approx(0.7)
    assert select_pair(_samples(0.5, 0.5, 0.5), min_margin=0.0) == (None, "tie")
    assert select_pair(_samples(0.5, 0.6), min_margin=0.3) == (None, "small_margin")
    assert select_pair(_samples(0.5), min_margin=0.0) == (None, "too_few_samples")
    assert select_pair(_samples(None, 0.5), min_margin=0.0) == (None, "unscored")
    assert set(SKIP_REASONS) == {
        "tie",
        "small_margin",
        "unscored",
        "too_few_samples",
        "none_pass",
        "all_pass",
    }
    # equal best scores: the one that ended on its own, at the lower temperature, is chosen
    tied = _samples(1.0, 1.0, 0.0)
    tied[0]["finish_reason"] = "length"
    assert select_pair(tied, 0.0)[0]["chosen"]["id"] == "s1"


def _constraint_samples(*rows):
    """(fraction, words, temperature, finish) per sample; the score is the fraction."""
    return [
        {
            "id": f"s{i}",
            "response": " ".join(["word"] * words),
            "score": fraction,
            "constraint_fraction": fraction,
            "temperature": t,
            "finish_reason": finish,
        }
        for i, (fraction, words, t, finish) in enumerate(rows)
    ]


def test_constraint_pairs_pass_against_fail_at_similar_length():
    samples = _constraint_samples(
        (1.0, 40, 0.5, "stop"), (0.5, 90, 0.8, "stop"), (0.0, 42, 1.1, "length"), (1.0, 10, 1.4, "stop")
    )
    pair, reason = select_constraint_pair(samples, min_margin=0.25)
    assert reason is None
    # not the largest gap (s3 vs s2 differ by 1.0 too) but the closest lengths: 40 vs 42 words
    assert (pair["chosen"]["id"], pair["rejected"]["id"]) == ("s0", "s2") and pair["margin"] == 1.0
    assert select_constraint_pair(_constraint_samples((0.5, 5, 0.5, "stop"), (0.0, 5, 1.0, "stop")), 0.0) == (
        None,
        "none_pass",
    )
    assert select_constraint_pair(_constraint_samples((1.0, 5, 0.5, "stop"), (1.0, 9, 1.0, "stop")), 0.0) == (
        None,
        "all_pass",
    )
    # a chosen answer that was cut at the token limit only when nothing else passes
    cut = _constraint_samples((1.0, 40, 0.5, "length"), (1.0, 10, 0.8, "stop"), (0.0, 40, 1.1, "stop"))
    assert select_constraint_pair(cut, 0.0)[0]["chosen"]["id"] == "s1"


def test_prompts_whose_samples_all_fail_get_a_backtranslated_pair():
    import random

    from synthetic_instruction_tuner.preferences import backtranslated_pair

    samples = _constraint_samples((0.0, 1, 0.5, "stop"), (0.0, 1, 1.1, "stop"))
    samples[0]["response"] = "Tea is calming. P.S. Try chamomile before bed."
    samples[1]["response"] = "Drink some tea in the evening because it helps you relax."
    pair = backtranslated_pair("How do I relax?", samples, random.Random(0), 2, None)
    cons = pair["constraints"]
    assert pair["prompt"] == ic.add_constraints("How do I relax?", cons)
    assert all(ic.check(pair["chosen"]["response"], cons)) and not all(
        ic.check(pair["rejected"]["response"], cons)
    )
    assert pair["margin"] == 1.0 - sum(ic.check(pair["rejected"]["response"], cons)) / len(cons) > 0
    same = _constraint_samples((0.0, 3, 0.5, "stop"), (0.0, 3, 1.1, "stop"))
    assert (
        backtranslated_pair("Say hi.", same, random.Random(0), 2, None) is None
    )  # identical: nothing separates them


def test_backtranslated_pairs_can_edit_a_format_into_the_chosen_answer():
    import random

    from synthetic_instruction_tuner.preferences import backtranslated_pair

    same = _constraint_samples((0.0, 3, 0.5, "stop"), (0.0, 3, 1.1, "stop"))
    formats = ["detectable_format:title", "detectable_content:postscript"]
    pair = backtranslated_pair("Say hi.", same, random.Random(0), 1, formats, edits=True)
    cons = pair["constraints"]  # identical samples: only an edit can separate them
    assert len(cons) == 1 and cons[0].instruction_id in formats
    assert pair["chosen"]["response"] != same[0]["response"] and all(
        ic.check(pair["chosen"]["response"], cons)
    )
    assert pair["rejected"]["response"] == same[1]["response"] and not any(
        ic.check(same[1]["response"], cons)
    )


def test_rejection_sampling_keeps_the_coolest_passing_answer_that_ended():
    samples = _constraint_samples(
        (1.0, 30, 0.5, "length"), (0.5, 20, 0.5, "stop"), (1.0, 25, 1.1, "stop"), (1.0, 12, 0.8, "stop")
    )
    assert rejection_sample(samples)["id"] == "s3"
    assert rejection_sample(_constraint_samples((0.5, 5, 0.5, "stop"), (1.0, 5, 0.8, "length"))) is None


def test_sft_mix_is_written_with_its_sources(smoke_run):
    run, _ = smoke_run
    summary = json.loads((run / "data/preferences_summary.json").read_text())
    rows = read_jsonl(run / "data/sft_train.jsonl", required=("id", "messages", "source", "constraints"))
    heldout = {r["id"] for r in read_jsonl(run / "data/heldout.jsonl")}
    sft = {r["id"]: r for r in read_jsonl(run / "data/sft.jsonl")}
    assert len(rows) == summary["sft_train"]["rows"] == len(sft) - len(heldout)
    assert sum(summary["sft_train"][s] for s in SFT_SOURCES) == len(rows) and heldout.isdisjoint(
        r["id"] for r in rows
    )
    for row in rows:
        user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        record = sft[row["record_id"]]
        assert row["source"] in SFT_SOURCES and user.startswith(record["instruction"].rstrip())
        assert bool(row["constraints"]) == (row["source"] != "plain")
        cons = [ic.Constraint(c["instruction_id"], c["kwargs"]) for c in row["constraints"]]
        assert all(ic.check(answer, cons))  # every row meets what its prompt asks, strictly
        if row["source"] == "back_translation":
            assert user != record["instruction"]
            assert (answer == record["response"]) == (not row["edited"])
            assert set(row["edited"]) <= {c.instruction_id for c in cons}
    assert any(r["source"] == "back_translation" for r in rows)  # the smoke share is 0.5 of 12 rows
    assert summary["sft_train"]["format_edited"] == sum(bool(r["edited"]) for r in rows)
    rates = summary["constraint_pass_rates"]
    assert rates and all(
        0 <= v["passed"] <= v["samples"] and v["rate"] == round(v["passed"] / v["samples"], 3)
        for v in rates.values()
    )


def _garden_records(n: int) -> list[dict[str, str]]:
    """`n` sft.jsonl rows: a request and a four-sentence answer, numbered apart."""
    return [
        {
            "id": f"r{i}",
            "instruction": f"Give me advice number {i} about keeping a garden healthy.",
            "response": "Water the beds early in the morning. Pull weeds before they seed. Mulch keeps "
            f"the soil moist for {i + 2} days longer. Rotate crops every year.",
        }
        for i in range(n)
    ]


def test_variants_back_translate_each_answer_again_and_stay_on_one_side_of_the_split():
    from synthetic_instruction_tuner.training import _split

    cfg = load_config("smoke", ["sft_data.variants=3", "sft_data.backtranslation_share=1.0"])
    records = _garden_records(6)
    rows = sft_train_rows(records, {}, {}, cfg)
    assert [r["id"] for r in rows[:3]] == ["r0", "r0~2", "r0~3"] and len(rows) == 18
    assert {r["record_id"] for r in rows} == {f"r{i}" for i in range(6)}
    assert all(r["source"] == "back_translation" for r in rows)
    prompts = {r["messages"][0]["content"] for r in rows}
    assert len(prompts) > 6  # variants carry constraints of their own
    for row in rows:
        cons = [ic.Constraint(c["instruction_id"], c["kwargs"]) for c in row["constraints"]]
        assert all(ic.check(row["messages"][1]["content"], cons))
    train, evaluation = _split(rows, 0.2, 0, "sft rows", key="record_id")
    assert {r["record_id"] for r in train}.isdisjoint({r["record_id"] for r in evaluation})
    assert len(evaluation) == 3 and len(train) == 15
    # one variant per answer is the row set step 04 wrote before variants existed
    single = sft_train_rows(records, {}, {}, load_config("smoke", ["sft_data.backtranslation_share=1.0"]))
    assert single == [r for r in rows if "~" not in r["id"]]


def test_rows_worded_otherwise_record_their_wording_and_stay_checkable():
    records = _garden_records(12)
    sets = ["sft_data.backtranslation_share=1.0", "sft_data.repeat_share=0.5", "sft_data.variants=2"]
    plain = sft_train_rows(records, {}, {}, load_config("smoke", sets))
    rows = sft_train_rows(records, {}, {}, load_config("smoke", [*sets, "sft_data.paraphrase_share=0.7"]))

    def drawn(row: dict) -> list:  # the repeat carries the worded request, and may now fit
        return [c for c in row["constraints"] if c["instruction_id"] != fe.REPEAT_ID]

    assert [drawn(r) for r in rows] == [drawn(r) for r in plain], "the same draws"
    assert not any("constraint_text" in r for r in plain)
    worded = [r for r in rows if "constraint_text" in r]
    assert len(worded) >= len(rows) // 2
    for row in worded:
        prompt, answer = (m["content"] for m in row["messages"])
        cons = [ic.Constraint(c["instruction_id"], c["kwargs"]) for c in row["constraints"]]
        assert row["constraint_text"] != ic.describe(cons)
        task, wording = split_prompt(prompt, cons, row["constraint_text"])
        assert task == records[int(row["record_id"][1:])]["instruction"] and wording
        assert all(ic.check(answer, cons))
        if "combination:repeat_prompt" in row["edited"]:
            assert answer.startswith(row["constraints"][-1]["kwargs"]["prompt_to_repeat"] + "\n\n")


def test_repeat_rows_open_with_the_request_and_keep_to_families_allowed_beside_it():
    records = _garden_records(12)
    sets = ["sft_data.backtranslation_share=1.0", "sft_data.repeat_share=1.0"]
    rows = sft_train_rows(records, {}, {}, load_config("smoke", sets))
    repeated = [r for r in rows if "combination:repeat_prompt" in r["edited"]]
    assert len(repeated) >= 8  # a few drew no-comma or a word count the request itself breaks
    beside = set(fe.beside_repeat(None))
    for row in repeated:
        prompt, answer = (m["content"] for m in row["messages"])
        request = row["constraints"][-1]["kwargs"]["prompt_to_repeat"]
        assert prompt.startswith(request) and answer.startswith(request + "\n\n")
        cons = [ic.Constraint(c["instruction_id"], c["kwargs"]) for c in row["constraints"]]
        # the contamination check reads the task text apart from the constraint wording
        task, wording = split_prompt(prompt, cons)
        assert task == records[int(row["record_id"][1:])]["instruction"]
        assert wording.endswith(
            "(1. do not say any words or characters before repeating the request; "
            "2. the request you need to repeat does not include this sentence)"
        )
        ids = [c["instruction_id"] for c in row["constraints"]]
        assert ids[-1] == "combination:repeat_prompt" and set(ids[:-1]) <= beside
        cons = [ic.Constraint(c["instruction_id"], c["kwargs"]) for c in row["constraints"]]
        assert all(ic.check(answer, cons))
    # with no family allowed beside it, a repeat row asks for the repeat alone
    apart = [
        "sft_data.constraint_ids=[startend:quotation,detectable_format:json_format,change_case:english_capital]"
    ]
    rows = sft_train_rows(records, {}, {}, load_config("smoke", [*sets, *apart]))
    alone = [r for r in rows if "combination:repeat_prompt" in r["edited"]]
    assert len(alone) == len(records) and all(len(r["constraints"]) == 1 for r in alone)
    # the sweep's families do not bound SFT's; sft_data.constraint_ids does
    cfg = load_config("smoke", ["sft_data.backtranslation_share=1.0", "sft_data.variants=4"])
    families = {c["instruction_id"] for r in sft_train_rows(records, {}, {}, cfg) for c in r["constraints"]}
    assert len(families) > 12
    narrow = ["sft_data.constraint_ids=[punctuation:no_comma,detectable_format:title,startend:quotation]"]
    cfg = load_config("smoke", [*narrow, "sft_data.backtranslation_share=1.0"])
    families = {c["instruction_id"] for r in sft_train_rows(records, {}, {}, cfg) for c in r["constraints"]}
    assert families == {"punctuation:no_comma", "detectable_format:title", "startend:quotation"}


def test_repeat_rows_word_the_repeat_otherwise_and_keep_the_other_constraints_wording():
    records = _garden_records(12)
    sets = ["sft_data.backtranslation_share=1.0", "sft_data.repeat_share=1.0", "sft_data.variants=2"]
    registry = sft_train_rows(records, {}, {}, load_config("smoke", sets))
    rows = sft_train_rows(records, {}, {}, load_config("smoke", [*sets, "sft_data.repeat_wording_share=1.0"]))
    assert [r["constraints"] for r in rows] == [r["constraints"] for r in registry], "the same draws"
    repeated = [r for r in rows if fe.REPEAT_ID in r["edited"]]
    assert len(repeated) >= 16
    sentences = set()
    for row in repeated:
        prompt, answer = (m["content"] for m in row["messages"])
        cons = [ic.Constraint(c["instruction_id"], c["kwargs"]) for c in row["constraints"]]
        *others, repeat = cons
        asked = ic.WORDINGS[fe.REPEAT_ID]
        sentence = next(s for s in (w(**repeat.kwargs) for w in asked) if row["constraint_text"].endswith(s))
        sentences.add(sentence)
        # the other constraints keep the registry's sentences; the check still reads task and wording apart
        assert row["constraint_text"] == " ".join(p for p in (ic.describe(others), sentence) if p)
        task, _ = split_prompt(prompt, cons, row["constraint_text"])
        assert task == records[int(row["record_id"][1:])]["instruction"]
        assert answer.startswith(repeat.kwargs["prompt_to_repeat"] + "\n\n") and all(ic.check(answer, cons))
    assert len(sentences) >= 4, "the repeat is asked for in several ways"


def test_combined_scores():
    assert combined_score("constraints", None, 0.5, 0.5) == 0.5
    assert combined_score("reward_model", 2.0, None, 0.5) == 2.0
    assert combined_score("both", 0.0, 1.0, 0.5) == pytest.approx(0.75)  # 0.5 * sigmoid(0) + 0.5 * 1
    assert combined_score("both", 0.0, None, 0.5) == pytest.approx(0.5)  # no constraints: sigmoid(reward)
    assert combined_score("reward_model", None, None, 0.5) is None


def test_reward_model_scores_question_answer_pairs():
    from synthetic_instruction_tuner.preferences import RewardScorer

    scorer = RewardScorer("tiny:reward-model", "float32", "cpu", batch_size=2)
    pairs = [
        ("What is 2+2?", "4"),
        ("Name a colour.", "Blue, like the sky on a clear day."),
        ("Hi", "Hello!"),
    ]
    scores = scorer.score(pairs)
    assert len(scores) == 3 and len(set(scores)) == 3
    assert scorer.score(list(reversed(pairs))) == pytest.approx(list(reversed(scores)), abs=1e-5)


@pytest.mark.parametrize(
    ("step", "upstream", "output", "count_key"),
    [
        ("02", "instructions.jsonl", "responses.jsonl", "instructions"),
        ("04", "sft.jsonl", "preference_samples.jsonl", None),
    ],
)
def test_kill_during_a_generation_step_then_rerun_loses_and_duplicates_nothing(
    tmp_path, step, upstream, output, count_key
):
    run = tmp_path / "run"
    base = [
        "--profile",
        "smoke",
        "--run-dir",
        str(run),
        "--set",
        "engine.batch_size=2",
        "--set",
        "counts.instructions=120",
        "--set",
        "counts.sft_target=100",
        "--set",
        "counts.preference_prompts=90",
    ]
    earlier = {"02": "01", "04": "01,02,03"}[step]
    assert run_cli([*base, "--steps", earlier]).returncode == 0
    out = run / "data" / output
    kill_when([*base, "--steps", step], out, min_lines=20)
    before = [json.loads(line) for line in out.read_text().splitlines() if line.endswith("}")]
    assert len(before) >= 20
    result = run_cli([*base, "--steps", step])
    assert result.returncode == 0, result.stderr[-2000:]
    after = read_jsonl(out)
    assert after[: len(before)] == before
    assert len({r["id"] for r in after}) == len(after)
    if count_key:
        assert len(after) == 120
    else:
        summary = json.loads((run / "data" / "preferences_summary.json").read_text())
        assert len(after) == summary["preference_prompts"] * len(
            load_config("smoke").preferences.temperatures
        )


def test_corrupt_upstream_line_stops_the_step_and_overwrites_nothing(smoke_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(smoke_run[0] / "data", run / "data")
    responses = run / "data" / "responses.jsonl"
    lines = responses.read_text().splitlines(keepends=True)
    lines[3] = lines[3][:40] + "\n"
    responses.write_text("".join(lines))
    sft_before = (run / "data" / "sft.jsonl").read_text()
    result = run_cli(
        ["--profile", "smoke", "--run-dir", str(run), "--steps", "03"]
    )  # stale: its input changed
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "step 03_filter failed" in line and "responses.jsonl:4: invalid JSON" in line
    assert (run / "data" / "sft.jsonl").read_text() == sft_before
