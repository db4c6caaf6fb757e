"""Scoring functions for the repository's lm-eval tasks (referenced by `!function utils.*`)."""

from synthetic_instruction_tuner.eval_tasks import (  # noqa: F401 - re-exported for lm-eval's YAML loader
    agg_inst_level_acc,
    process_ifbench,
    process_ifeval,
    process_ppl,
)
