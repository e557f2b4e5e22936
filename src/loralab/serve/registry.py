"""Which adapters are served, and how many requests are using each.

A request takes a reference on its adapter before it is queued and gives it
back when the worker is done with it. Unloading first marks the adapter as
draining (new requests get 404), then waits until no reference is left, so a
request that was already accepted always finishes on the adapter it asked for.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import ClassVar

from loralab.serve.adapters import AdapterInfo


class ApiError(Exception):
    """An HTTP error with a JSON body: ``{"error": {"message", "type", "code"}}``."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             409: "conflict_error", 422: "invalid_request_error", 503: "service_unavailable"}

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
