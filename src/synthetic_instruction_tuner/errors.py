"""Errors meant for people: one line saying what was wrong, where, and what to do."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class: the message is a complete, single-line explanation for the user."""


class ConfigError(PipelineError):
    """A recipe, profile or command-line setting is unknown, missing or of the wrong type."""


class DataError(PipelineError):
    """An artifact file is corrupt or lacks a field; the message names the file and line."""


class ModelError(PipelineError):
    """A model reference cannot be resolved (missing package, gated repo, no network...)."""


class GenerationError(PipelineError):
    """Generation could not make progress even at batch size 1."""


class ChatTemplateError(PipelineError):
    """The generator's chat template cannot give Magpie a pre-query: it fails on a lone user message,
    or puts no user-turn marker before the message's content."""
