# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Step 02 — Responses
#
# **Purpose.** The same instruct model answers each instruction through its own chat template, at
# the seed's moderate response temperature (`responses.sampling`).
#
# **Inputs.** `data/instructions.jsonl` (step 01).
#
# **Outputs.** `data/responses.jsonl` — `id` (the instruction's), `instruction`, `response`,
# `finish_reason` (`stop`: ended on an end-of-turn token; `length`: cut at `max_new_tokens`),
# `num_tokens`, `generator`, `sampling`, `seed`. Appended per batch; a rerun answers only what is missing.

# %%
import pandas as pd

from synthetic_instruction_tuner.distributed import run
from synthetic_instruction_tuner.steps import start_step
from synthetic_instruction_tuner.store import read_jsonl

# %% tags=["parameters"]
profile = "cpu"  # hardware profile: smoke | cpu | t4 | a100 | h100
run_dir = None  # None: runs/<profile>
overrides = []  # extra settings, as run_all.py --set passes them

# %%
ctx = start_step(profile, run_dir, overrides)
print(f"generator: {ctx.cfg.models.generator} on {ctx.device}; sampling: {ctx.cfg.responses.sampling}")

# %%
summary = run("responses:responses_step", ctx)
summary

# %% [markdown]
# ## A sample of instruction–response pairs

# %%
pd.set_option("display.max_colwidth", 300)
pd.DataFrame(read_jsonl(ctx.paths.file("responses.jsonl")))[
    ["instruction", "response", "finish_reason"]
].head(5)
