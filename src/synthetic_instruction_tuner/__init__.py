"""Synthetic Instruction Tuner: Magpie data from an instruct model, used to tune a base model three ways."""

import logging

__version__ = "0.1.0"

# On AVX512-BF16 CPUs bitsandbytes' CPU backend tries, at import, to fetch an optional kernel from the
# Hub and logs a warning when it cannot (always, offline); its built-in kernel is used instead, so the
# line is noise in every step notebook and report.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage()
)
