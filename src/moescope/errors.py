"""One exception family, so the CLI can print a sentence instead of a traceback."""

from __future__ import annotations


class MoescopeError(Exception):
    """Base error. Its message names the file, field or option at fault."""


class TraceError(MoescopeError):
    """A trace on disk is missing, malformed or inconsistent with its manifest."""


class ConfigError(MoescopeError):
    """A model, config or option cannot be used as given."""


class DataError(MoescopeError):
    """Input data (texts, logs) is empty, malformed or lacks a field."""
