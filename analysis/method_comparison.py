# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Method comparison: base vs LoRA SFT vs prompt tuning vs DPO, and their teacher
#
# The same synthetic data and base model, adapted three ways, scored on the same lm-eval tasks. The
# teacher (the generator model that wrote the data) answers the same prompts in its own chat template,
# as a reference row. Every metric carries a 95% percentile-bootstrap interval over prompts; the
# differences between methods are measured on the same prompts, with paired intervals and McNemar's test.

# %%
from IPython.display import display

from synthetic_instruction_tuner import reporting
from synthetic_instruction_tuner.steps import start_step

# %% tags=["parameters"]
profile = "cpu"  # hardware profile: smoke | cpu | t4 | a100 | h100
run_dir = None  # None: runs/<profile>
overrides = []  # extra settings, as run_all.py --set passes them

# %%
ctx = start_step(profile, run_dir, overrides)
print(
    f"generator {ctx.cfg.models.generator} -> target {ctx.cfg.models.target}; evaluation mode: {ctx.cfg.evaluation.mode}"
)

# %% [markdown]
# ## The seed's four benchmarks
#
# lm-eval's own `ifeval`, `mmlu` (5-shot), `truthfulqa_mc2` and `hellaswag`; offline profiles read the
# repository's copies of their data (`benchmark_data/SOURCE.md`), with lm-eval's prompts, few-shot
# examples and metrics unchanged.

# %%
reporting.seed_benchmark_table(ctx.paths)

# %% [markdown]
# ## The alignment tax: what tuning costs on knowledge benchmarks

# %%
reporting.alignment_tax_table(ctx.paths)

# %% [markdown]
# ## An outside anchor: the model cards
#
# The base model's and the teacher's figures on the seed's benchmarks beside those their model cards
# publish, with the settings that differ (quantised weights, generation length, shots, formulation).

# %%
reporting.anchor_table(ctx.paths, ctx.cfg)

# %% [markdown]
# ## Answers that open by repeating the prompt

# %%
reporting.prompt_echo_frame(ctx.paths)

# %% [markdown]
# ## Scores

# %%
display(*reporting.comparison_tables(ctx.paths))

# %%
fig = reporting.metric_bars_figure(ctx.paths)

# %% [markdown]
# ## Differences on the same prompts
#
# Each comparison is first − second, prompt by prompt: SFT − base, DPO − SFT, DPO − base, prompt tuning − base,
# and each student − its teacher. An interval that excludes 0, or a McNemar p below 0.05, is a difference
# these prompts can tell.

# %%
display(*reporting.paired_tables(ctx.paths))

# %% [markdown]
# ## Accuracy per constraint family

# %%
display(*reporting.family_tables(ctx.paths))

# %% [markdown]
# ## Do the tuned models stop on their own?
#
# The chat format trains every method to end its answer with EOS; a base model rarely does.

# %%
reporting.endings_table(ctx.paths)

# %% [markdown]
# ## Cost of each method

# %%
reporting.cost_table(ctx.paths)

# %%
fig = reporting.curves_figure(ctx.paths)

# %% [markdown]
# ## The data behind them

# %%
funnel, removed = reporting.funnel_table(ctx.paths)
display(funnel, removed)

# %%
fig = reporting.funnel_figure(ctx.paths)

# %%
pass_rates, sft_sources = reporting.constraint_data_tables(ctx.paths)
display(pass_rates, sft_sources)

# %% [markdown]
# ## Contamination check
#
# No benchmark prompt reaches the training data: every training row as trained is checked for word
# n-gram overlap with the prompts of IFEval, MMLU, TruthfulQA, IFBench and the held-out set. Matches
# only through the constraint sentences the pipeline appends (IFEval's own instruction wording, from
# lm-eval's registry) are template overlap, shared by design; task-text matches would be contamination.

# %%
display(*reporting.contamination_tables(ctx.paths))

# %% [markdown]
# ## Held-out prompts, answered by each method

# %%
reporting.side_by_side(ctx.paths)
