"""Synthetic Instruction Tuner: Magpie data from an instruct model, used to tune a base model three ways."""

__version__ = "0.1.0"
