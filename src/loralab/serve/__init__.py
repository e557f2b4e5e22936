"""The multi-adapter HTTP server: one base model in memory, many adapters,
chosen per request and loaded or unloaded without a restart.

    from loralab.serve.app import create_app
    from loralab.serve.server import LoraServer, ServeConfig, bind_socket, serve_http

    config = ServeConfig(model="smollm2-135m", adapters={"support": "runs/support"})
    sock = bind_socket(config.host, config.port)
    serve_http(create_app(LoraServer(config)), sock)

That is what ``loralab serve`` does (``loralab.commands.serve``, the
composition root). Modules: ``adapters`` (what an adapter dir holds),
``engine`` (the model and its worker thread), ``registry`` (names, references
and the per-request :class:`~loralab.serve.registry.Lease`), ``schemas``
(request bodies, validated strictly), ``app`` (the FastAPI routes and the
auth/size guard), ``server`` (the serving state, config, socket and uvicorn).
"""
