"""One base exception for every expected failure of the library, and the CLI's exit codes.

Why one base: callers (the CLI, the station, the line) print an :class:`InspectorError` as one
sentence and never a traceback; anything else is a bug. Each stage defines its own subclasses
(``ImageError`` in :mod:`inspector.io`, ``MissingWeightsError`` in :mod:`inspector.backbones.base`,
...) next to the code that raises them; the ones every layer needs live here.
"""

from __future__ import annotations

#: Exit codes of the ``inspector`` command: runtime failure, usage error, missing weights, interrupted.
EXIT_FAILURE, EXIT_USAGE, EXIT_WEIGHTS, EXIT_INTERRUPTED = 1, 2, 3, 130


class InspectorError(Exception):
    """An expected failure with a message meant for a person (no traceback)."""


class CommandError(InspectorError, RuntimeError):
    """A clear, expected failure of a command: printed without a traceback, exit code ``code``."""

    def __init__(self, message: str, code: int = EXIT_FAILURE):
        super().__init__(message)
        self.code = code


__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE", "EXIT_WEIGHTS", "CommandError", "InspectorError"]
