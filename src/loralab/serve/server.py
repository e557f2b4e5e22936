"""The serving state (model, adapters, worker) and how it is started.

``LoraServer`` puts the blocks together: a :class:`ServedModel`, the
:class:`Registry` of adapter names and references, and the :class:`Worker`
thread. The composition root is ``loralab.commands.serve``: it checks the
config, binds the port (:func:`bind_socket`), builds the server and its app
(``loralab.serve.app.create_app``) and serves them (:func:`serve_http`); this
module never imports the app. ``BackgroundServer`` serves an app from a thread
on a free loopback port (tests, benchmarks).
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
from loralab.lora.adapters import check_adapter_name
from loralab.serve.adapters import AdapterInfo, inspect_adapter, within_root
from loralab.serve.engine import CallJob, ServedModel, Worker
from loralab.serve.registry import ApiError, Entry, Lease, Registry

# Rows decoded together. Measured on a 2-core CPU (BENCHMARKS.md, "Serving:
# load test"): batching across adapters with per-row routing served 3.5-5.8x
# the requests/s of one request at a time; gains stop past 16 rows.
DEFAULT_MAX_BATCH = 16


DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # 4 MiB: far above any prompt a small context can take
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass
class ServeConfig:
    model: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> dir, loaded at start
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)
    adapter_root: str | None = None  # runtime loads must lie inside (default: cwd)
    max_batch: int = DEFAULT_MAX_BATCH
    threads: int | None = None  # torch threads; None: one core left for HTTP
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    insecure_no_auth: bool = False  # allow a non-loopback bind without an API key
    quantize: bool | None = None  # NF4 base; None: as the start-up adapters were trained

    def __post_init__(self):
        if self.max_batch < 1:
            raise LoralabError(f"--max-batch must be at least 1, got {self.max_batch}.",
                               hint="Fix: pass --max-batch 1 (one request at a time) or more.")
        if not 1 <= self.port <= 65535:
            raise LoralabError(f"--port must be in 1..65535, got {self.port}.",
                               hint="Fix: pass a free TCP port, e.g. --port 8000.")
        if self.max_request_bytes < 1024:
            raise LoralabError(f"--max-request-bytes must be at least 1024, got "
                               f"{self.max_request_bytes}.", hint="Fix: the default is 4 MiB.")
        if self.threads is None:
            self.threads = default_threads()
        if self.threads < 1:
            raise LoralabError(f"--threads must be at least 1, got {self.threads}.",
                               hint="Fix: leave it out (all cores but one) or pass 1 or more.")
        if self.api_key is not None and not self.api_key.strip():
            raise LoralabError("--api-key is empty.",
                               hint="Fix: give a non-empty key or leave it out.")
        if self.api_key is None and not self.insecure_no_auth and not is_loopback(self.host):
            raise LoralabError(
                f"refusing to serve on {self.host} without --api-key: anyone who can reach "
                "the port could generate, load and unload adapters.",
                hint="Fix: pass --api-key KEY (or $LORALAB_API_KEY), bind 127.0.0.1, or "
                "pass --insecure-no-auth if the network is trusted.")


def is_loopback(host: str) -> bool:
    """True if ``host`` names only this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port``, before anything heavy loads (a port in
    use is one line, not a traceback after the model has loaded); uvicorn
    listens on it."""
    import errno

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as err:
        raise LoralabError(f"cannot bind to host '{host}': {err}.",
                           hint="Fix: pass an address of this machine, e.g. --host 127.0.0.1.") from err
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise LoralabError(f"port {port} on {host} is already in use.",
                               hint="Fix: stop the program using it or pass another --port.") from err
        if err.errno == errno.EACCES:
            raise LoralabError(f"no permission to bind port {port} on {host}.",
                               hint="Fix: use a port above 1023.") from err
        raise LoralabError(f"cannot bind {host}:{port}: {err.strerror or err}.",
                           hint="Fix: pass an address of this machine with --host.") from err
    return sock


def serve_http(app, sock: socket.socket) -> None:
    """Serve ``app`` with uvicorn on the bound ``sock`` until interrupted (Ctrl-C)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, log_level="info")).run(sockets=[sock])


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
        # every start-up adapter is read before the model loads: a bad one costs nothing
        infos = {check_adapter_name(name): inspect_adapter(Path(path).expanduser())
                 for name, path in config.adapters.items()}
        quantize = config.quantize
        if quantize is None:  # a QLoRA adapter runs on the NF4 base it was trained on
            quantize = any(info.quantized for info in infos.values())
        torch.set_num_threads(config.threads)
        self.served = ServedModel(config.model, quantize=quantize)
        base_task = "generate" if self.served.causal else "encode"
        self.registry = Registry(self.served.name, base_task)
        self.adapter_root = Path(config.adapter_root or Path.cwd()).expanduser().resolve()
        self.started = time.time()
        for name, info in infos.items():
            self._load_now(name, info)  # before the worker exists: nothing else runs
        self.worker = Worker(self.served, max_batch=config.max_batch)

    def _load_now(self, name: str, info: AdapterInfo) -> None:
        try:
            entry = self.registry.reserve(name)
        except ApiError as err:
            raise LoralabError(err.message, hint="Fix: give each --adapter its own name.") from err
        try:
            self.served.add_adapter(name, info)
        except BaseException:
            self.registry.discard(name)
            raise
        self.registry.activate(entry, info)

    def resolve_path(self, path: str) -> Path:
        """A runtime adapter path, relative to --adapter-root, checked to lie inside it."""
        try:
            candidate = Path(path).expanduser()
            if not candidate.is_absolute():
                candidate = self.adapter_root / candidate
            inside = within_root(candidate, self.adapter_root)
        except (OSError, ValueError, RuntimeError) as err:
            raise ApiError(400, f"Adapter path '{shorten(path)}' cannot be used: "
                           f"{getattr(err, 'strerror', None) or err}.") from err
        if not inside:
            raise ApiError(400, f"Adapter path '{shorten(path)}' is outside the adapter root "
                           f"{self.adapter_root}. Move it there or restart with --adapter-root.")
        return candidate

    async def call(self, fn, lease: Lease | None = None, urgent: bool = False):
        """Run ``fn`` on the worker thread and await its result. ``lease`` (a
        reference already taken) is given back when the worker is done with it;
        ``urgent`` jobs go ahead of queued requests (adapter load/unload)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def done(result, error):
            if lease is not None:
                lease.release()
            loop.call_soon_threadsafe(settle, future, result, error)

        self.submit(CallJob(fn, done, urgent), lease)
        return await future

    def submit(self, job, lease: Lease | None = None) -> None:
        """Queue ``job``; once queued, the job (not the request) gives ``lease`` back."""
        try:
            self.worker.submit(job)
        except LoralabError as err:
            raise ApiError(503, str(err)) from err
        if lease is not None:
            lease.hand_off()

    async def load(self, name: str, path: str) -> Entry:
        check_adapter_name(name)
        target = self.resolve_path(path)
        entry = self.registry.reserve(name)
        try:
            info = await asyncio.to_thread(read_adapter, target)
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


def read_adapter(path: Path) -> AdapterInfo:
    """:func:`inspect_adapter` for a path a client sent: an unreadable path is a 400."""
    try:
        return inspect_adapter(path)
    except OSError as err:
        raise ApiError(400, f"Adapter path '{shorten(str(path))}' cannot be read: "
                       f"{err.strerror or err}.") from err


def shorten(text: str, limit: int = 120) -> str:
    """``text`` as an error message may quote it: at most ``limit`` characters."""
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def settle(future: asyncio.Future, result, error) -> None:
    if future.done():  # the awaiting request was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class BackgroundServer:
    """Serve ``app`` from a thread on a free loopback port; a context manager."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self.sock = bind_socket(host, 0)
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
        out[check_adapter_name(name)] = path
    return out
