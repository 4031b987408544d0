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


# parameters whose command-line option is not their name with dashes
FLAG_NAMES = {"n_shared_experts": "--shared-experts"}


def as_flags(message: str) -> str:
    """A library message in the command line's words: a parameter written `like_this` becomes ``--like-this``.

    Library messages name parameters (what a notebook user passes), in backquotes; every such
    parameter has a command-line option of the same name with dashes (or the one in
    :data:`FLAG_NAMES`), so the CLI shows that.
    """
    import re

    return re.sub(
        r"`([a-z][a-z0-9_]*)`",
        lambda m: FLAG_NAMES.get(m.group(1), "--" + m.group(1).replace("_", "-")),
        message,
    )
