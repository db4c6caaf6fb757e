# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Step 05 — LoRA SFT
#
# **Purpose.** Supervised fine-tuning of the base model with LoRA (the recipe's r=8, α=16, dropout 0.05 on all
# seven projections) through TRL's `SFTTrainer`, loss on assistant tokens only, on the filtered SFT set
# minus the held-out prompts. A held-out slice of the SFT set gives eval loss; the untrained base's loss
# on the same slice is measured first, for comparison.
#
# **Inputs.** `data/sft_train.jsonl` (step 04's SFT mix: plain, back-translated and rejection-sampled
# rows, none of them held out), `data/heldout.jsonl` (step 04).
#
# **Outputs.** `adapters/sft_lora/` (adapter + tokenizer with its chat template) and
# `adapters/sft_lora/metrics.json`; checkpoints in `adapters/sft_lora/checkpoints/` resume a killed run.

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
metrics = run("training:train_sft_lora", ctx)

# %% [markdown]
# ## Result

# %%
pd.Series(training_summary(metrics), name="sft_lora").to_frame()

# %% [markdown]
# ## Loss curves

# %%
pd.DataFrame(metrics["curves"]["train"]).merge(
    pd.DataFrame(metrics["curves"]["eval"]), on="step", how="outer"
).set_index("step")
