# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Step 07 — Evaluation with lm-evaluation-harness
#
# **Purpose.** Score the base model, the LoRA SFT adapter, the prompt-tuning adapter and the DPO
# adapter on the same tasks, with the teacher (the generator model, in its own chat template) as a
# reference row. Every profile runs lm-eval's own `ifeval`, `mmlu` (5-shot), `truthfulqa_mc2` and
# `hellaswag` task definitions: with Hub access on the Hub's data, offline on the repository's copies
# (`benchmark_data/SOURCE.md`), beside this repository's own tasks:
# IFBench's test prompts, the held-out constraint prompts (lm-eval's IFEval metrics) and the
# log-likelihood of the held-out responses. Every metric gets a 95% percentile-bootstrap interval over prompts; the
# differences SFT − base, DPO − SFT, prompt tuning − base and each student − teacher are measured on the
# same prompts (paired bootstrap interval, exact McNemar p for 0/1 metrics).
#
# **Inputs.** `adapters/*/` (steps 05, 05b, 06), `data/heldout.jsonl` (step 04).
#
# **Outputs.** `eval/<method>.json` (lm-eval results), `eval/samples/<method>/<task>.jsonl` (per-sample
# logs), `eval/summary.json` (all metrics with intervals, `paired` differences, accuracy per
# `constraint_families`, `prompt_echo`), `eval/tasks/` (the local task YAML and data as run).

# %%
import pandas as pd

from synthetic_instruction_tuner.distributed import run
from synthetic_instruction_tuner.reporting import metrics_frame, paired_frames
from synthetic_instruction_tuner.steps import start_step

# %% tags=["parameters"]
profile = "cpu"  # hardware profile: smoke | cpu | t4 | a100 | h100
run_dir = None  # None: runs/<profile>
overrides = []  # extra settings, as run_all.py --set passes them

# %%
ctx = start_step(profile, run_dir, overrides)
print(f"mode: {ctx.cfg.evaluation.mode}; target: {ctx.cfg.models.target} on {ctx.device}")

# %%
summary = run("evaluation:run_evaluation", ctx)

# %% [markdown]
# ## Every metric, with its 95% bootstrap interval

# %%
pd.set_option("display.float_format", "{:.3f}".format)
metrics_frame(summary["metrics"])

# %% [markdown]
# ## Differences on the same prompts: first − second, paired 95% interval, exact McNemar p

# %%
pd.concat(paired_frames(summary))
