"""``loralab serve``: one base model, many adapters, chosen per request.

The server's composition root: the config is checked and the port bound
before the model loads (a bad option or a port in use costs a second, not a
model load), then the blocks are put together here: :class:`LoraServer` (model,
adapters, worker), its FastAPI app, and uvicorn on the bound socket.
"""

from __future__ import annotations

import click

QUANTIZE = {"auto": None, "nf4": True, "none": False}


@click.command("serve")
@click.option("--model", required=True, help="Base model: alias, local dir or hub id.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="Adapter to serve under NAME (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; any other than loopback needs --api-key.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="LORALAB_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 routes.")
@click.option("--insecure-no-auth", is_flag=True,
              help="Allow a non-loopback --host without --api-key (a trusted network only).")
@click.option("--adapter-root", type=click.Path(file_okay=False), default=None,
              help="Adapters loaded at runtime must lie inside this dir [default: cwd].")
@click.option("--max-batch", type=int, default=None,
              help="Rows decoded together across adapters (1 = one request at a time) "
              "[default: 16].")
@click.option("--max-request-bytes", type=int, default=None,
              help="Largest request body accepted; larger ones get 413 unread [default: 4 MiB].")
@click.option("--quantize", type=click.Choice(list(QUANTIZE)), default="auto", show_default=True,
              help="Base weights: nf4 (QLoRA adapters), none (float), or auto: as the "
              "--adapter given were trained.")
@click.option("--threads", type=int, default=None,
              help="torch threads [default: all cores but one, kept for HTTP].")
def cmd(model, adapters, host, port, api_key, insecure_no_auth, adapter_root, max_batch,
        max_request_bytes, quantize, threads):
    """Serve MODEL and its adapters over an OpenAI-compatible HTTP API."""
    from rich.console import Console

    from loralab.serve.app import create_app
    from loralab.serve.server import (
        DEFAULT_MAX_BATCH,
        DEFAULT_MAX_REQUEST_BYTES,
        LoraServer,
        ServeConfig,
        bind_socket,
        is_loopback,
        parse_adapter_specs,
        serve_http,
    )

    config = ServeConfig(
        model=model, adapters=parse_adapter_specs(adapters), host=host, port=port,
        api_key=api_key, adapter_root=adapter_root, threads=threads,
        max_batch=DEFAULT_MAX_BATCH if max_batch is None else max_batch,
        max_request_bytes=(DEFAULT_MAX_REQUEST_BYTES if max_request_bytes is None
                           else max_request_bytes),
        insecure_no_auth=insecure_no_auth, quantize=QUANTIZE[quantize])
    sock = bind_socket(host, port)  # a port in use: one line, before the model loads
    console = Console(stderr=True)
    if api_key is None and not is_loopback(host):  # allowed by --insecure-no-auth
        console.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who "
                      "can reach this port can generate, load and unload adapters.")
    try:
        server = LoraServer(config)
    except BaseException:
        sock.close()
        raise
    names = ", ".join(config.adapters) or "none"
    base = "NF4" if server.served.quantized else "float"
    console.print(f"[bold]loralab serve[/] {model} ({base} base; adapters: {names}) on "
                  f"http://{host}:{port}  docs: http://{host}:{port}/docs")
    serve_http(create_app(server), sock)
