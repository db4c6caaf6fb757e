# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Step 04 — Preference pairs
#
# **Purpose.** For each prompt, sample several responses across a temperature sweep, score them
# (reward model, verifiable IFEval constraints, or both — `preferences.scorer`) and pair the best with
# the worst; for a prompt with constraints, a response that passes every check against one that
# fails at least one, as close in length as the samples allow. Ties and margins under
# `preferences.min_margin` are skipped and counted. A held-out prompt split is set aside first and
# never trained on.
#
# The same sweep builds the SFT set (`sft_data`): a constraint prompt with a sample that passes every
# check trains on that sample (rejection sampling: the teacher's best of N, not its typical answer);
# a share of the other rows get constraints written into their prompt that their response meets,
# read off it or, for formats it lacks (a title, a postscript, bullets, sections, highlights...),
# edited into it (constraint back-translation with format edits, each checked by lm-eval's checker);
# the rest stay plain. `sft_data.variants` back-translates each answer more than once.
#
# **Inputs.** `data/sft.jsonl` (step 03).
#
# **Outputs.** `data/heldout.jsonl` (IFEval schema plus the reference response),
# `data/preferences.jsonl` (TRL conversational `prompt`/`chosen`/`rejected` plus scores, temperatures
# and scorer), `data/sft_train.jsonl` (chat `messages` with their `source`, `constraints` and the `edited` ones),
# `data/preferences_summary.json` (with pass rates per constraint family); the sweep's samples and scores are appended to
# `data/preference_samples.jsonl` and `data/preference_scores.jsonl` so a killed run resumes.
# `data/contamination.json`: the contamination check of the training rows as trained.

# %%
import pandas as pd
from IPython.display import display

from synthetic_instruction_tuner import reporting
from synthetic_instruction_tuner.contamination import check_training_data
from synthetic_instruction_tuner.distributed import run
from synthetic_instruction_tuner.steps import start_step
from synthetic_instruction_tuner.store import read_jsonl

# %% tags=["parameters"]
profile = "cpu"  # hardware profile: smoke | cpu | t4 | a100 | h100
run_dir = None  # None: runs/<profile>
overrides = []  # extra settings, as run_all.py --set passes them

# %%
ctx = start_step(profile, run_dir, overrides)
print(f"scorer: {ctx.cfg.preferences.scorer}; temperatures: {ctx.cfg.preferences.temperatures}")

# %%
summary = run("preferences:preferences_step", ctx)
summary

# %% [markdown]
# ## Pass rates per constraint family, and the SFT mix

# %%
display(pd.DataFrame(summary["constraint_pass_rates"]).T.sort_values("rate"))
pd.Series(summary["sft_train"])

# %% [markdown]
# ## A few pairs

# %%
pairs = read_jsonl(ctx.paths.file("preferences.jsonl"))
pd.set_option("display.max_colwidth", 250)
pd.DataFrame(
    [
        {
            "prompt": p["prompt"][0]["content"],
            "chosen": p["chosen"][0]["content"],
            "rejected": p["rejected"][0]["content"],
            "scores": f"{p['score_chosen']:.2f} vs {p['score_rejected']:.2f}",
            "temperatures": f"{p['temperature_chosen']} vs {p['temperature_rejected']}",
        }
        for p in pairs[:5]
    ]
)

# %% [markdown]
# ## Contamination check
#
# Every training row as steps 05-06 read it (the SFT set and the preference prompts, constraints
# included) against the prompts of every benchmark the pipeline evaluates on and the held-out prompts:
# word n-grams of `filtering.contamination_ngram` words. Overlap with a benchmark through the task
# text is contamination (step 03 removed such instructions). The held-out prompts come from the same
# generator and share its stock openings: their overlaps are reported, not removed (the split is kept
# apart by id and near-duplicate removal). Overlap only through the constraint sentences this pipeline
# appends is IFEval's own instruction wording (lm-eval's registry), shared by design.

# %%
contamination = check_training_data(ctx.paths, ctx.cfg.filtering.contamination_ngram)
print(
    f"{contamination['task_overlap']} training rows share a word {contamination['ngram']}-gram of task text "
    f"with a benchmark prompt; {len(contamination['removed_before_training'])} removed before training "
    f"(checked in {contamination['seconds']} s)"
)

# %%
display(*reporting.contamination_tables(ctx.paths))
