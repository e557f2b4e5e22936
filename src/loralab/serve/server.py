"""The serving state (model, adapters, worker) and how it is started.

``LoraServer`` puts the blocks together: a :class:`ServedModel`, the
:class:`Registry` of adapter names and references, and the :class:`Worker`
thread. ``run`` serves it with uvicorn; ``BackgroundServer`` runs it in a
thread on a free loopback port (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from loralab.errors import LoralabError
from loralab.serve.adapters import AdapterInfo, check_name, inspect_adapter, within_root
from loralab.serve.engine import CallJob, ServedModel, Worker
from loralab.serve.registry import ApiError, Entry, Registry

# Rows decoded together. Measured on a 2-core CPU (BENCHMARKS.md, "Serving:
# load test"): batching across adapters with per-row routing served 3.5-5.8x
# the requests/s of one request at a time; gains stop past 16 rows.
DEFAULT_MAX_BATCH = 16


@dataclass
class ServeConfig:
    model: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> dir, loaded at start
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    adapter_root: str | None = None  # runtime loads must lie inside (default: cwd)
    max_batch: int = DEFAULT_MAX_BATCH
    threads: int | None = None  # torch threads; None: one core left for HTTP

    def __post_init__(self):
        if self.max_batch < 1:
            raise LoralabError(f"--max-batch must be at least 1, got {self.max_batch}.")
        if self.threads is None:
            self.threads = default_threads()
        if self.threads < 1:
            raise LoralabError(f"--threads must be at least 1, got {self.threads}.")
        if self.api_key is not None and not self.api_key.strip():
            raise LoralabError("--api-key is empty.", hint="Give a non-empty key or leave it out.")


def default_threads() -> int:
    """All cores but one for torch; the event loop (HTTP, tokenizing) keeps one.

    Measured on a busy 2-core machine (BENCHMARKS.md, "Serving: load test"):
    with two torch threads competing with the HTTP thread and other processes
    the load test ran about 15x slower than with one, as OpenMP workers spin
    while waiting for a core.
    """
    return max(1, (os.cpu_count() or 2) - 1)


class LoraServer:
    """One base model and its adapters, served by one worker thread."""

    def __init__(self, config: ServeConfig):
        import torch

        self.config = config
        torch.set_num_threads(config.threads)
        self.served = ServedModel(config.model)
        base_task = "generate" if self.served.causal else "encode"
        self.registry = Registry(self.served.name, base_task)
        self.adapter_root = Path(config.adapter_root or Path.cwd()).expanduser().resolve()
        self.started = time.time()
        for name, path in config.adapters.items():
            self._load_now(name, path)  # before the worker exists: nothing else runs
        self.worker = Worker(self.served, max_batch=config.max_batch)

    def _load_now(self, name: str, path: str) -> None:
        check_name(name)
        try:
            entry = self.registry.reserve(name)
        except ApiError as err:
            raise LoralabError(err.message) from err
        try:
            info = inspect_adapter(Path(path).expanduser())
            self.served.add_adapter(name, info)
        except BaseException:
            self.registry.discard(name)
            raise
        self.registry.activate(entry, info)

    def resolve_path(self, path: str) -> Path:
        """A runtime adapter path, relative to --adapter-root, checked to lie inside it."""
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            candidate = self.adapter_root / candidate
        if not within_root(candidate, self.adapter_root):
            raise ApiError(400, f"Adapter path '{path}' is outside the adapter root "
                           f"{self.adapter_root}. Move it there or restart with --adapter-root.")
        return candidate

    async def call(self, fn, entry: Entry | None = None, urgent: bool = False):
        """Run ``fn`` on the worker thread and await its result. ``entry`` (a
        reference already taken) is released when the worker is done with it;
        ``urgent`` jobs go ahead of queued requests (adapter load/unload)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(result, error):
            if entry is not None:
                self.registry.release(entry)
            loop.call_soon_threadsafe(settle, future, result, error)

        self.submit(CallJob(fn, done, urgent), entry)
        return await future

    def submit(self, job, entry: Entry | None = None) -> None:
        try:
            self.worker.submit(job)
        except LoralabError as err:
            if entry is not None:
                self.registry.release(entry)
            raise ApiError(503, str(err)) from err

    async def load(self, name: str, path: str) -> Entry:
        check_name(name)
        target = self.resolve_path(path)
        entry = self.registry.reserve(name)
        try:
            info: AdapterInfo = await asyncio.to_thread(inspect_adapter, target)
            await self.call(lambda: self.served.add_adapter(name, info), urgent=True)
        except BaseException:
            self.registry.discard(name)
            raise
        self.registry.activate(entry, info)
        return entry

    async def unload(self, name: str) -> None:
        entry = self.registry.begin_drain(name)
        while self.registry.in_use(entry):  # accepted requests finish first
            await asyncio.sleep(0.005)
        try:
            await self.call(lambda: self.served.remove_adapter(name), urgent=True)
        finally:
            self.registry.discard(name)

    def close(self) -> None:
        self.worker.stop()


def settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # the awaiting request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def run(config: ServeConfig) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    from loralab.serve.app import create_app

    server = LoraServer(config)
    app = create_app(server)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


class BackgroundServer:
    """Serve ``app`` from a thread on a free loopback port; a context manager."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="loralab-http", daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def parse_adapter_specs(specs) -> dict[str, str]:
    """``["NAME=DIR", ...]`` -> ``{NAME: DIR}``; bad or repeated names are errors."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise LoralabError(f"--adapter '{spec}' is not NAME=DIR.",
                               hint="Example: --adapter support=runs/support/adapter")
        if name in out:
            raise LoralabError(f"--adapter name '{name}' is given twice.",
                               hint="Give each adapter its own name.")
        out[check_name(name)] = path
    return out
