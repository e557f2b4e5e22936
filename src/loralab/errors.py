"""The user-facing error type and its exit codes.

Every problem a user can fix raises :class:`LoralabError`; the CLI prints its
one-line message (no traceback unless ``--debug``) and exits with ``exit_code``.
"""

from __future__ import annotations

USAGE = 2  # bad input: a file, an option, a model the user named
INTERRUPTED = 130  # Ctrl-C


class LoralabError(Exception):
    """A problem the user can fix. ``str(err)`` names the problem and the fix."""

    exit_code = USAGE

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} {hint}".strip() if hint else message)


def require(condition: bool, message: str, hint: str | None = None) -> None:
    """Raise :class:`LoralabError` unless ``condition`` holds."""
    if not condition:
        raise LoralabError(message, hint=hint)
