# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Step 06 — DPO on the SFT adapter
#
# **Purpose.** Direct Preference Optimization (Rafailov et al., 2023) continues training the SFT LoRA
# adapter on the preference pairs; the reference policy is the SFT adapter as it was before DPO (a
# frozen copy). TRL logs implicit rewards, margins and reward accuracy; a held-out slice of the pairs
# measures whether the policy prefers the chosen answers it never trained on.
#
# **Inputs.** `data/preferences.jsonl` (step 04), `adapters/sft_lora/` (step 05).
#
# **Outputs.** `adapters/dpo/` (adapter + tokenizer with its chat template) and
# `adapters/dpo/metrics.json`; checkpoints in `adapters/dpo/checkpoints/` resume a killed run.

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
metrics = run("training:train_dpo", ctx)

# %% [markdown]
# ## Result

# %%
pd.Series(training_summary(metrics), name="dpo").to_frame()

# %% [markdown]
# ## Loss curves

# %%
pd.DataFrame(metrics["curves"]["train"]).merge(
    pd.DataFrame(metrics["curves"]["eval"]), on="step", how="outer"
).set_index("step")
