"""The user-facing error type, its exit codes, and the one line for any other
exception that reaches the command line.

Every problem a user can fix raises :class:`LoralabError`; the CLI prints its
one-line message (no traceback unless ``--debug``) and exits with ``exit_code``.
Exceptions from the environment or third-party code that a user can still fix
(a full disk, a read-only directory, a truncated safetensors file, a broken
tokenizer, a number out of range) are turned into one line with a fix by
:func:`describe`; anything else is a bug and says how to see its traceback.
"""

from __future__ import annotations

import errno
import re
import traceback

USAGE = 2  # bad input: a file, an option, a model the user named
BUG = 1  # an unexpected exception
INTERRUPTED = 130  # Ctrl-C


class LoralabError(Exception):
    """A problem the user can fix. ``str(err)`` names the problem and the fix."""

    exit_code = USAGE

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(f"{message} {hint}".strip() if hint else message)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where a handler turned it into an exception so
    that children are stopped and temporaries removed on the way out."""

    def __init__(self, signum: int):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"terminated by signal {signum}")


def require(condition: bool, message: str, hint: str | None = None) -> None:
    """Raise :class:`LoralabError` unless ``condition`` holds."""
    if not condition:
        raise LoralabError(message, hint=hint)


# errno -> (what happened, the fix)
OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device",
                   "Fix: free disk space or choose another --output."),
    errno.EDQUOT: ("disk quota exceeded",
                   "Fix: free space within your quota or choose another --output."),
    errno.EROFS: ("read-only file system", "Fix: choose an --output on a writable disk."),
    errno.EACCES: ("permission denied",
                   "Fix: choose a location you can write to, or fix its permissions."),
    errno.EPERM: ("operation not permitted", "Fix: choose a location you can write to."),
    errno.ENOENT: ("no such file or directory", "Fix: check the path."),
    errno.ENOTDIR: ("a path component is a file, not a directory", "Fix: check the path."),
    errno.EISDIR: ("is a directory, expected a file", "Fix: check the path."),
    errno.EMFILE: ("too many open files", "Fix: raise the limit (`ulimit -n 4096`)."),
}


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _from_tokenizer(err: BaseException) -> bool:
    """True if the exception was raised while loading or running a tokenizer."""
    frames = traceback.extract_tb(err.__traceback__)
    return any("tokenization_" in f.filename or "/tokenizers/" in f.filename for f in frames)


def os_errno(err: BaseException) -> int | None:
    """The errno of a failed read or write: an OSError's, or the one safetensors'
    Rust writer puts in its message ("I/O error: No space left on device (os
    error 28)"): a full disk while saving is not a corrupt file."""
    if isinstance(err, OSError):
        return err.errno
    if type(err).__name__ == "SafetensorError":
        m = re.search(r"os error (\d+)", str(err))
        return int(m.group(1)) if m else None
    return None


def describe(err: BaseException) -> tuple[str, int]:
    """The one line (without ``error: ``) and the exit code for ``err``."""
    if isinstance(err, LoralabError):
        return str(err), err.exit_code
    name = type(err).__name__
    code = os_errno(err)
    if code in OS_ERRORS:
        what, fix = OS_ERRORS[code]
        filename = getattr(err, "filename", None)
        where = f": {filename}" if filename else ""
        return f"{what}{where}. {fix}", USAGE
    if name == "SafetensorError" or type(err).__module__.startswith("safetensors"):
        return (f"a .safetensors file is corrupt, truncated or not safetensors "
                f"({_one_line(err)}). Fix: save or download the model/adapter again."), USAGE
    if isinstance(err, MemoryError) or name == "OutOfMemoryError":
        return ("out of memory. Fix: lower --batch-size, add --gradient-checkpointing or use "
                "--method qlora; `loralab estimate` tells what fits."), USAGE
    if _from_tokenizer(err):
        return (f"the tokenizer could not be loaded or run ({name}: {_one_line(err)}). Fix: "
                "check the tokenizer files (tokenizer.json, tokenizer_config.json) of the "
                "model dir, or copy them from the base model."), USAGE
    if isinstance(err, (OverflowError, ValueError)):
        return (f"bad value ({name}: {_one_line(err)}). Fix: check the numbers and files "
                "given; see `loralab COMMAND --help` for the valid ranges."), USAGE
    if isinstance(err, OSError):
        return f"{_one_line(err)}. Fix: check the path and the disk.", USAGE
    return (f"{name}: {_one_line(err)} (a bug in loralab or a library: rerun with --debug "
            "for the traceback)"), BUG
