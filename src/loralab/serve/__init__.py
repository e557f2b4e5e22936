"""The multi-adapter HTTP server: one base model in memory, many adapters,
chosen per request and loaded or unloaded without a restart.

    from loralab.serve.server import LoraServer, ServeConfig, run
    run(ServeConfig(model="smollm2-135m", adapters={"support": "runs/support"}))

Modules: ``adapters`` (what an adapter dir holds), ``engine`` (the model and
its worker thread), ``registry`` (names and references), ``schemas`` (request
bodies), ``app`` (the FastAPI routes), ``server`` (start-up and uvicorn).
"""
