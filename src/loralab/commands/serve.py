"""``loralab serve``: one base model, many adapters, chosen per request."""

from __future__ import annotations

import click


@click.command("serve")
@click.option("--model", required=True, help="Base model: alias, local dir or hub id.")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="Adapter to serve under NAME (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind (loopback unless told otherwise).")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="LORALAB_API_KEY",
              help="Require 'Authorization: Bearer KEY' on /v1 routes.")
@click.option("--adapter-root", type=click.Path(file_okay=False), default=None,
              help="Adapters loaded at runtime must lie inside this dir [default: cwd].")
@click.option("--max-batch", type=int, default=None,
              help="Rows decoded together across adapters (1 = one request at a time).")
@click.option("--threads", type=int, default=None,
              help="torch threads [default: all cores but one, kept for HTTP].")
def cmd(model, adapters, host, port, api_key, adapter_root, max_batch, threads):
    """Serve MODEL and its adapters over an OpenAI-compatible HTTP API."""
    from rich.console import Console

    from loralab.serve.server import DEFAULT_MAX_BATCH, ServeConfig, parse_adapter_specs, run

    config = ServeConfig(model=model, adapters=parse_adapter_specs(adapters), host=host,
                         port=port, api_key=api_key, adapter_root=adapter_root,
                         max_batch=max_batch or DEFAULT_MAX_BATCH, threads=threads)
    names = ", ".join(config.adapters) or "none"
    console = Console(stderr=True)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        console.print(f"[yellow]warning:[/] listening on {host} without --api-key: anyone who "
                      "can reach this port can generate, load and unload adapters.")
    console.print(f"[bold]loralab serve[/] {model} (adapters: {names}) on "
                               f"http://{host}:{port}  docs: http://{host}:{port}/docs")
    run(config)
