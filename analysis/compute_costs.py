# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Compute costs and timing
#
# Per pipeline step: wall-clock time, peak memory of the step's kernel, device and compute units
# (hours × the profile's rate), read from the run's ledger, which the orchestrator writes while it
# watches each step from outside. The seed project's reported A100 figures stand beside ours, labelled.

# %%
from pathlib import Path

from IPython.display import display

from synthetic_instruction_tuner import reporting
from synthetic_instruction_tuner.steps import start_step

# %% tags=["parameters"]
profile = "cpu"  # hardware profile: smoke | cpu | t4 | a100 | h100
run_dir = None  # None: runs/<profile>
overrides = []  # extra settings, as run_all.py --set passes them

# %%
ctx = start_step(profile, run_dir, overrides)
hw = ctx.cfg.hardware
print(
    f"profile {ctx.cfg.profile}: {hw.compute_units_per_hour} compute units per hour ({hw.compute_units_source})"
)

# %% [markdown]
# ## Time, memory and compute units per step

# %%
reporting.step_costs_table(ctx.paths)

# %%
fig = reporting.step_time_figure(ctx.paths)

# %% [markdown]
# ## Against the seed's reported figures

# %%
reporting.seed_comparison_table(ctx.paths)

# %% [markdown]
# ## Every profile run on this machine

# %%
display(reporting.profile_totals_table(Path(ctx.paths.root).parent))
