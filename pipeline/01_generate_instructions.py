# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Step 01 — Magpie instructions
#
# **Purpose.** An aligned instruct model, given only its chat template's user header (the
# *pre-query template*), completes the user turn itself: it writes a plausible user request
# (Magpie, Xu et al. 2024). Sampling that many times gives an instruction set with no seed prompts.
#
# **Inputs.** The generator model (`models.generator` in the profile).
#
# **Outputs.** `data/instructions.jsonl` — one record per sanitised, distinct instruction
# (`id`, `instruction`, `generator`, `sampling`, `seed`); `data/instructions_rejected.jsonl` —
# every rejected sample with its reason. Both are appended as batches finish, so a killed run resumes.

# %%
import pandas as pd

from synthetic_instruction_tuner import magpie
from synthetic_instruction_tuner.distributed import run
from synthetic_instruction_tuner.generation import load_generator_tokenizer
from synthetic_instruction_tuner.steps import start_step
from synthetic_instruction_tuner.store import read_jsonl

# %% tags=["parameters"]
profile = "cpu"  # hardware profile: smoke | cpu | t4 | a100 | h100
run_dir = None  # None: runs/<profile>
overrides = []  # extra settings, as run_all.py --set passes them

# %%
ctx = start_step(profile, run_dir, overrides)
print(
    f"generator: {ctx.cfg.models.generator} on {ctx.device}; wanted: {ctx.cfg.counts.instructions} instructions"
)

# %% [markdown]
# ## The pre-query template
# Derived from the tokenizer's own chat template: everything before a user message's content.

# %%
print(repr(magpie.pre_query_text(load_generator_tokenizer(ctx.cfg), ctx.cfg.models.generator)))

# %% [markdown]
# ## Sampling
# Batched, seeded, watchdog-guarded; resumes from what is already on disk. With
# `distributed.num_processes` > 1, under `accelerate launch`: each process samples its share of the batches.

# %%
summary = run("magpie:instructions_step", ctx)
summary

# %% [markdown]
# ## A sample of the instructions

# %%
instructions = read_jsonl(ctx.paths.file("instructions.jsonl"))
pd.set_option("display.max_colwidth", 200)
pd.DataFrame(instructions)[["id", "instruction", "num_tokens"]].head(10)
