"""Which adapters are served, and how many requests are using each.

A request takes a reference on its adapter before it is queued and gives it
back when the worker is done with it (:class:`Lease`, the one place that
pairs the two). Unloading first marks the adapter as
draining (new requests get 404), then waits until no reference is left, so a
request that was already accepted always finishes on the adapter it asked for.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import ClassVar, Self

from loralab.serve.adapters import AdapterInfo


class ApiError(Exception):
    """An HTTP error with a JSON body: ``{"error": {"message", "type", "code"}}``."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
        409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
        503: "service_unavailable"}

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "code": self.status}}


@dataclass
class Entry:
    name: str
    info: AdapterInfo | None  # None: the base model itself
    state: str = "loading"  # loading -> ready -> draining
    refs: int = 0
    created: int = 0

    @property
    def adapter(self) -> str | None:
        """The adapter name to route to (None: the base)."""
        return None if self.info is None else self.name

    @property
    def task(self) -> str:
        """"generate" | "classify" | "encode" (an encoder base: no generation)."""
        return self.base_task if self.info is None else self.info.task

    base_task: str = "generate"


class Registry:
    def __init__(self, base_name: str, base_task: str = "generate"):
        self.lock = threading.Lock()
        self.base = Entry(base_name, None, state="ready", created=int(time.time()),
                          base_task=base_task)
        self.entries: dict[str, Entry] = {}

    def acquire(self, name: str) -> Entry:
        """Take a reference on a ready adapter (or the base). 404 if unknown."""
        with self.lock:
            if name == self.base.name:
                self.base.refs += 1
                return self.base
            entry = self.entries.get(name)
            if entry is None or entry.state != "ready":
                raise ApiError(404, f"The model '{name}' does not exist. Known models: "
                               f"{', '.join(self.names())}.")
            entry.refs += 1
            return entry

    def release(self, entry: Entry) -> None:
        with self.lock:
            entry.refs -= 1

    def lease(self, name: str, task: str | None = None) -> Lease:
        """``with registry.lease(name) as lease:`` a reference for one request."""
        return Lease(self, name, task)

    def names(self) -> list[str]:
        return [self.base.name] + [n for n, e in self.entries.items() if e.state == "ready"]

    def ready(self) -> list[Entry]:
        with self.lock:
            return [e for e in self.entries.values() if e.state == "ready"]

    def reserve(self, name: str) -> Entry:
        """Claim a name for an adapter about to load. 409 if it is taken."""
        with self.lock:
            if name == self.base.name or name in self.entries:
                raise ApiError(409, f"A model named '{name}' is already served. "
                               f"Unload it first (DELETE /v1/adapters/{name}) or pick another name.")
            entry = Entry(name, None, created=int(time.time()))
            self.entries[name] = entry
            return entry

    def activate(self, entry: Entry, info: AdapterInfo) -> None:
        with self.lock:
            entry.info, entry.state = info, "ready"

    def discard(self, name: str) -> None:
        with self.lock:
            self.entries.pop(name, None)

    def begin_drain(self, name: str) -> Entry:
        """Stop new requests reaching ``name``; 404 if it is not a ready adapter."""
        with self.lock:
            entry = self.entries.get(name)
            if name == self.base.name:
                raise ApiError(400, f"'{name}' is the base model; it cannot be unloaded.")
            if entry is None or entry.state != "ready":
                raise ApiError(404, f"No adapter named '{name}' is loaded.")
            entry.state = "draining"
            return entry

    def in_use(self, entry: Entry) -> bool:
        with self.lock:
            return entry.refs > 0


class Lease:
    """One request's reference on a model, as a context manager.

    ``__enter__`` acquires it (404 if unknown; 400 if ``task`` is given and the
    model does another). Leaving the block gives it back, unless it was handed
    to the worker (:meth:`hand_off`): then the worker's job gives it back when
    it is done, so an accepted request keeps its adapter loaded to the end.
    :meth:`release` may run from either side; only the first call counts.
    """

    def __init__(self, registry: Registry, name: str, task: str | None = None):
        self.registry, self.name, self.task = registry, name, task
        self.entry: Entry | None = None
        self.handed_off = False
        self._released = False

    def __enter__(self) -> Self:
        self.entry = self.registry.acquire(self.name)
        if self.task is not None and self.entry.task != self.task:
            self.release()
            raise ApiError(400, wrong_task(self.name, self.entry.task, self.task))
        return self

    def __exit__(self, *exc) -> None:
        if not self.handed_off:
            self.release()

    def hand_off(self) -> None:
        """The worker now holds this reference; it calls :meth:`release` when done."""
        self.handed_off = True

    def release(self) -> None:
        with self.registry.lock:
            if self._released:
                return
            self._released = True
            self.entry.refs -= 1


def wrong_task(name: str, task: str, wanted: str) -> str:
    """Why model ``name`` (doing ``task``) cannot serve a ``wanted`` request."""
    if wanted == "classify":
        return (f"The model '{name}' is not a classification adapter. "
                "Use POST /v1/completions or /v1/chat/completions.")
    if task == "classify":
        return f"The model '{name}' is a classification adapter; use POST /v1/classify."
    return f"The model '{name}' is an encoder and cannot generate text."
