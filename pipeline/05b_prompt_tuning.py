# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Step 05b — Prompt tuning
#
# **Purpose.** Prompt tuning (Lester et al., 2021): the base model stays frozen and only a soft prompt of
# `prompt_tuning.num_virtual_tokens` embeddings is trained, initialised from `prompt_tuning.init_text`.
# It needs a learning rate about 100x LoRA's (`prompt_tuning.learning_rate`, 3e-2). Same data, same
# eval split and same assistant-only loss as step 05.
#
# **Inputs.** `data/sft_train.jsonl` (step 04's SFT mix: plain, back-translated and rejection-sampled
# rows, none of them held out), `data/heldout.jsonl` (step 04).
#
# **Outputs.** `adapters/prompt_tuning/` (adapter + tokenizer with its chat template) and
# `adapters/prompt_tuning/metrics.json`; checkpoints in `adapters/prompt_tuning/checkpoints/` resume a killed run.

# %%
import pandas as pd

from synthetic_instruction_tuner.distributed import run
from synthetic_instruction_tuner.reporting import training_summary
from synthetic_instruction_tuner.steps import start_step

# %% tags=["parameters"]
profile = "cpu"  # hardware profile: smoke | cpu | t4 | a100 | h100
run_dir = None  # None: runs/<profile>
overrides = []  # extra settings, as run_all.py --set passes them

# %%
ctx = start_step(profile, run_dir, overrides)
print(f"target: {ctx.cfg.models.target} on {ctx.device} ({ctx.cfg.hardware.dtype})")

# %%
metrics = run("training:train_prompt_tuning", ctx)

# %% [markdown]
# ## Result

# %%
pd.Series(training_summary(metrics), name="prompt_tuning").to_frame()

# %% [markdown]
# ## Loss curves

# %%
pd.DataFrame(metrics["curves"]["train"]).merge(
    pd.DataFrame(metrics["curves"]["eval"]), on="step", how="outer"
).set_index("step")
