"""Atomic outputs: write to a temporary sibling, then rename into place, so a
crash or Ctrl-C never leaves a half-written adapter, model or report.

Temporary names carry the owner's host and PID (``.adapter.tmp-HOST-PID-xxxx``),
so the next run, merge or compare that finds one whose owner is dead removes it
(:func:`remove_stale_temps`): a SIGKILL mid-save leaves no lasting garbage.
Checks before anything heavy loads: :func:`check_writable`, :func:`check_free_space`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from loralab.errors import OS_ERRORS, LoralabError

# host names may hold '-' and '.': keep the tag one field
HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)"
                   r"(?:-[A-Za-z0-9_]*)?$")


def _owner_tag() -> str:
    return f"{HOST}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = True):
    """Yield a fresh temporary directory next to ``target``; on success it
    replaces ``target``. On any error the temporary directory is removed and
    ``target`` is left exactly as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_owner_tag()}-",
                                dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(target)
        old = target.with_name(f".{target.name}.old-{_owner_tag()}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_owner_tag()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ---- leftovers of killed processes ------------------------------------------

def owned_temp_path(path: str | os.PathLike) -> Path:
    """A sibling name for writing ``path`` before renaming it into place, that
    :func:`remove_stale_temps` recognises once its owner is dead."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{_owner_tag()}")


def stale_temp(path: Path) -> bool:
    """True if ``path`` is a temporary of this module whose owner (on this host)
    is dead."""
    m = _TEMP.match(path.name)
    return bool(m) and m["host"] == HOST and not _pid_alive(int(m["pid"]))


def remove_stale_temps(directory: str | os.PathLike, depth: int = 1) -> int:
    """Remove the temporaries dead processes left in ``directory`` and (to
    ``depth`` levels) its subdirectories; returns how many. A stale
    ``.NAME.old-*`` is the previous ``NAME`` moved aside by :func:`atomic_dir`
    just before the new one was renamed in: it is put back if ``NAME`` is gone."""
    directory = Path(directory)
    try:
        entries = list(directory.iterdir())
    except OSError:
        return 0
    removed = 0
    for entry in entries:
        if stale_temp(entry):
            target = directory / _TEMP.match(entry.name)["name"]
            if entry.name.startswith(f".{target.name}.old-") and not target.exists():
                os.replace(entry, target)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            removed += 1
        elif depth > 0 and entry.is_dir() and not entry.is_symlink():
            removed += remove_stale_temps(entry, depth - 1)
    return removed


# ---- preflight ---------------------------------------------------------------

def existing_parent(path: str | os.PathLike) -> Path:
    """``path`` itself or its nearest ancestor that exists."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, what: str = "--output") -> None:
    """Refuse an output location that cannot be written, by writing to it (root
    passes every permission check, a read-only mount fails only on write)."""
    base = existing_parent(path)
    if not base.is_dir():
        raise LoralabError(f"{what} {path}: {base} is a file, not a directory.",
                           hint="Fix: choose another location.")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".probe.tmp-{_owner_tag()}-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        what_went_wrong, fix = OS_ERRORS.get(err.errno, (err.strerror or str(err),
                                                         "Fix: choose another location."))
        raise LoralabError(f"cannot write {what} {path} ({what_went_wrong} at {base}).",
                           hint=fix) from None


def check_free_space(path: str | os.PathLike, need: int, what: str) -> None:
    """Refuse to start when the disk holding ``path`` has less than ``need``
    bytes free for ``what`` (a sentence naming the artifacts)."""
    base = existing_parent(path)
    try:
        free = shutil.disk_usage(base).free
    except OSError:
        return
    if free < need:
        raise LoralabError(
            f"not enough free disk at {base}: {what} need about {_gb(need)}, "
            f"{_gb(free)} free.",
            hint="Fix: free disk space or choose an --output on a larger disk.")


def _gb(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
