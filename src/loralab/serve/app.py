"""The HTTP API: OpenAI-compatible completions and chat, models, classify,
adapter load/unload and health, over a :class:`LoraServer`.

Every error is JSON ``{"error": {"message", "type", "code"}}`` with a 4xx
status for anything the client can fix; a client mistake never reaches 500
and never stops the server. Work that grows with the request (tokenizing,
the prompt-length check, reading an adapter dir) runs off the event loop, and
a body over ``--max-request-bytes`` is refused before it is read, so one
client's 5 MB prompt cannot hold up ``/health`` or anyone else's request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loralab.errors import LoralabError
from loralab.generation import (
    GenerationRequest,
    SamplingParams,
    check_context,
    encode_chat,
    encode_prompt,
)
from loralab.serve.engine import GenJob
from loralab.serve.registry import ApiError, Entry, Lease
from loralab.serve.schemas import (
    CHAT_MAX_TOKENS,
    AdapterLoad,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
)
from loralab.serve.server import LoraServer, settle

log = logging.getLogger("loralab.serve")
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(ApiError(status, message).body(), status_code=status)


def _where(loc) -> str:
    """A field's path for the message: ``messages.0.content``; pydantic's union
    tags (``str``, ``list[str]``, ``function-after[...]``) left out."""
    parts = [str(x) for x in loc if x != "body" and not _union_tag(x)]
    return ".".join(parts) or "body"


def _union_tag(part) -> bool:
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool",
                                                               "list", "none", "dict"))


def _validation_message(errors) -> str:
    """Field and rule of each problem (at most 5); the values sent are never
    quoted back (they may be long, or secret)."""
    parts = []
    for err in errors:
        part = f"{_where(err.get('loc', ()))}: {err.get('msg', 'invalid')}"
        if part not in parts:
            parts.append(part)
    return "Invalid request. " + "; ".join(parts[:5])


def _unparsed_body(err: dict) -> bool:
    """A body not sent as JSON (raw bytes) where an object was expected. A JSON
    string or array is parsed JSON of the wrong type: a 422, as documented."""
    return tuple(err.get("loc", ())) == ("body",) and isinstance(err.get("input"), bytes)


def install_error_handlers(app: FastAPI, secret: str | None = None) -> None:
    def reply(status: int, message: str) -> JSONResponse:
        if secret:  # a client that put the key in a field gets it back redacted
            message = message.replace(secret, "<redacted>")
        return _error(status, message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" or _unparsed_body(e) for e in errors):
            return reply(400, "Malformed JSON in the request body. Send a valid JSON object.")
        return reply(422, _validation_message(errors))

    @app.exception_handler(ApiError)
    async def _api(request, exc: ApiError):
        return reply(exc.status, exc.message)

    @app.exception_handler(LoralabError)
    async def _user(request, exc: LoralabError):
        return reply(400, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return reply(exc.status_code, str(exc.detail))


class Guard:
    """Outermost ASGI layer: checks ``Authorization: Bearer <key>`` on /v1 routes
    (when a key is set), refuses a body over ``max_body`` bytes (413) before
    reading it when ``Content-Length`` says so and as soon as a streamed body
    passes it, and turns an unexpected exception into a JSON 500 instead of a
    dropped connection, so the server keeps serving."""

    def __init__(self, app, api_key: str | None = None, max_body: int | None = None):
        self.app = app
        self.key = api_key.encode() if api_key is not None else None
        self.max_body = max_body

    def _authorized(self, scope) -> bool:
        if self.key is None or not scope["path"].startswith("/v1"):
            return True
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)

    def _refusal(self, scope) -> JSONResponse | None:
        """401 or 413 before the app (and before the body is read), else None."""
        if not self._authorized(scope):
            return _error(401, "Missing or wrong API key. Send 'Authorization: Bearer <key>'.")
        if self.max_body is None:
            return None
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is None:
            return None
        if not declared.strip().isdigit():
            return _error(400, "The Content-Length header is not a number.")
        return self._too_large() if int(declared) > self.max_body else None

    def _too_large(self) -> JSONResponse:
        return _error(413, BodyTooLarge(self.max_body).detail)

    def _counted(self, receive):
        """``receive`` that stops a streamed body once it passes ``max_body``."""
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request" and self.max_body is not None:
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        return limited

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, self._counted(receive), tracked)
        except BodyTooLarge:
            if not started:
                await self._too_large()(scope, receive, send)
        except Exception:  # a bug must not take the server down
            log.exception("internal error on %s", scope["path"])
            if not started:
                await _error(500, "Internal server error.")(scope, receive, send)


class BodyTooLarge(HTTPException):
    """A streamed request body passed ``--max-request-bytes``. An HTTPException,
    so FastAPI's body parsing passes it on (any other error there becomes a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"The request body is over the server's limit of {limit} "
                         "bytes. Send a shorter prompt or restart with a larger "
                         "--max-request-bytes.")


def model_card(server: LoraServer, entry: Entry) -> dict:
    card = {"id": entry.name, "object": "model", "created": entry.created, "owned_by": "loralab",
            "task": entry.task}
    if entry.info is None:
        card.update(root=server.config.model, parent=None)
    else:
        card.update(root=str(entry.info.dir), parent=server.registry.base.name)
        if entry.info.labels is not None:
            card["labels"] = list(entry.info.labels)
    return card


def create_app(server: LoraServer) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(server.close)

    app = FastAPI(title="loralab serve", lifespan=lifespan)
    app.state.server = server
    install_error_handlers(app, server.config.api_key)
    app.add_middleware(Guard, api_key=server.config.api_key,
                       max_body=server.config.max_request_bytes)
    add_generation_routes(app, server)
    add_admin_routes(app, server)
    return app


# -- generation ---------------------------------------------------------------

def _sampling(body, max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature,
                          top_p=body.top_p, stop=tuple(body.stop or ()), seed=body.seed)


def _check_max_tokens(server: LoraServer, body) -> None:
    """``max_tokens`` against the context length: a 422 naming the field, before any work."""
    if body.max_tokens is not None and body.max_tokens >= server.served.context:
        raise ApiError(422, f"Invalid request. max_tokens: must be below the model's context "
                       f"length ({server.served.context} tokens, prompt included), "
                       f"got {body.max_tokens}.")


PROBE_CHARS_PER_TOKEN = 16  # a prefix this many chars per allowed token: ~4x English's
PROBE_SLACK = 8  # tokens a cut may add or lose at its edge (a run of spaces, a special)


def refuse_if_surely_too_long(server: LoraServer, text: str) -> None:
    """Refuse ``text`` from a prefix when that prefix alone is over the context.

    Tokenizing a 4 MB prompt takes seconds of CPU; a prompt that long is refused
    anyway, so its first ``(context + 1) * 16`` characters are tokenized first.
    The prefix ends at a whitespace, where every pre-tokenizer in use splits
    (WordPiece, byte-level BPE, Metaspace), so its tokens are the first tokens
    of the whole text: more than the context there means more in the whole.
    Otherwise (a short text, or no whitespace to cut at) nothing is decided
    here and the whole text is tokenized and checked exactly.
    """
    limit = server.served.context
    chars = (limit + 1) * PROBE_CHARS_PER_TOKEN
    if len(text) <= chars:
        return
    cut = max(text.rfind(ws, chars // 2, chars) for ws in " \n\t")
    if cut < 0:
        return
    count = len(server.served.tokenizer(text[:cut], add_special_tokens=False)["input_ids"])
    if count > limit + PROBE_SLACK:
        raise LoralabError(f"The model's context length is {limit} tokens, but the prompt has "
                           f"more than {count - PROBE_SLACK} tokens in its first {cut} "
                           f"characters (of {len(text)}).", hint="Shorten the prompt.")


def _completion_rows(server: LoraServer, body: CompletionRequest, entry: Entry):
    """Tokenized, length-checked rows (runs on a worker thread: it grows with the prompt)."""
    tok = server.served.tokenizer
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    max_tokens = body.max_tokens or COMPLETION_MAX_TOKENS
    rows = []
    for prompt in prompts:
        refuse_if_surely_too_long(server, prompt)
        ids = encode_prompt(tok, prompt)
        check_context(server.served.model, len(ids), max_tokens)
        rows.append(GenerationRequest(ids, _sampling(body, max_tokens), entry.adapter))
    return rows


def _chat_rows(server: LoraServer, body: ChatRequest, entry: Entry):
    """As :func:`_completion_rows`, for a conversation."""
    for message in body.messages:  # user and system text appear whole in the conversation
        if message.role != "assistant":  # (templates may cut past answers: Qwen3's thinking)
            refuse_if_surely_too_long(server, message.content)
    ids = encode_chat(server.served.tokenizer, [m.model_dump() for m in body.messages])
    room = server.served.context - len(ids)
    max_tokens = body.max_tokens or max(1, min(CHAT_MAX_TOKENS, room))
    check_context(server.served.model, len(ids), max_tokens)
    return [GenerationRequest(ids, _sampling(body, max_tokens), entry.adapter)]


def _usage(rows: list[GenerationRequest]) -> dict:
    prompt = sum(len(r.prompt_ids) for r in rows)
    completion = sum(len(r.token_ids) for r in rows)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _completion_choice(i: int, text: str, finish: str | None) -> dict:
    return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}


def _chat_choice(i: int, text: str, finish: str | None, delta: bool) -> dict:
    if delta:
        return {"index": i, "delta": {"content": text} if text else {}, "finish_reason": finish}
    return {"index": i, "message": {"role": "assistant", "content": text},
            "finish_reason": finish}


async def _generate(server: LoraServer, body, lease: Lease, rows, chat: bool):
    kind = "chat.completion" if chat else "text_completion"
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time()), "model": body.model}
    if body.stream:
        return StreamingResponse(_start_stream(server, lease, rows, head, chat),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def done(error):
        lease.release()
        loop.call_soon_threadsafe(settle, future, None, error)

    server.submit(GenJob(rows, done), lease)
    await future
    choices = [_chat_choice(i, r.text, r.finish_reason, False) if chat
               else _completion_choice(i, r.text, r.finish_reason) for i, r in enumerate(rows)]
    return {**head, "choices": choices, "usage": _usage(rows)}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _start_stream(server: LoraServer, lease: Lease, rows, head: dict, chat: bool):
    """Queue the rows now (so their reference is released even if the client
    never reads) and return the SSE body: one chunk per text delta, a closing
    chunk per row, then ``[DONE]``."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    for i, row in enumerate(rows):
        row.on_text = (lambda delta, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, delta)))

    def done(error):
        lease.release()
        loop.call_soon_threadsafe(queue.put_nowait, (None, error))

    server.submit(GenJob(rows, done), lease)
    return _sse_body(queue, rows, head, chat)


async def _sse_body(queue: asyncio.Queue, rows, head: dict, chat: bool):
    obj = head["object"] + (".chunk" if chat else "")

    def chunk(choice) -> str:
        return _sse({**head, "object": obj, "choices": [choice]})

    try:
        if chat:
            for i in range(len(rows)):
                yield chunk({"index": i, "delta": {"role": "assistant"}, "finish_reason": None})
        while True:
            i, payload = await queue.get()
            if i is None:
                break
            yield chunk(_chat_choice(i, payload, None, True) if chat
                        else _completion_choice(i, payload, None))
        if payload is not None:
            log.error("generation failed: %r", payload)
            yield _sse(ApiError(500, f"Generation failed: {type(payload).__name__}.").body())
        else:
            for i, row in enumerate(rows):
                yield chunk(_chat_choice(i, "", row.finish_reason, True) if chat
                            else _completion_choice(i, "", row.finish_reason))
        yield "data: [DONE]\n\n"
    finally:
        for row in rows:  # a client that went away stops its rows
            row.cancelled = True


def add_generation_routes(app: FastAPI, server: LoraServer) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        _check_max_tokens(server, body)
        with server.registry.lease(body.model, task="generate") as lease:
            rows = await asyncio.to_thread(_completion_rows, server, body, lease.entry)
            return await _generate(server, body, lease, rows, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        _check_max_tokens(server, body)
        with server.registry.lease(body.model, task="generate") as lease:
            rows = await asyncio.to_thread(_chat_rows, server, body, lease.entry)
            return await _generate(server, body, lease, rows, chat=True)


# -- classification, models, adapters, health ---------------------------------

def _classify_inputs(server: LoraServer, body: ClassifyRequest) -> list[list[int]]:
    texts = [body.input] if isinstance(body.input, str) else body.input
    for text in texts:
        refuse_if_surely_too_long(server, text)
    ids = [list(server.served.tokenizer(t)["input_ids"]) for t in texts]
    for row in ids:
        if not row:
            raise ApiError(400, "An input is empty after tokenization. Give some text.")
        if len(row) > server.served.context:
            raise ApiError(400, f"An input has {len(row)} tokens; the model's context length "
                           f"is {server.served.context}. Shorten it.")
    return ids


def add_admin_routes(app: FastAPI, server: LoraServer) -> None:
    reg = server.registry

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest):
        with reg.lease(body.model, task="classify") as lease:
            ids = await asyncio.to_thread(_classify_inputs, server, body)
            name = lease.entry.name
            probs = await server.call(lambda: server.served.classify(name, ids), lease)
        labels = lease.entry.info.labels
        data = []
        for i, p in enumerate(probs):
            best = max(range(len(p)), key=p.__getitem__)
            data.append({"index": i, "label": labels[best], "label_id": best,
                         "probabilities": dict(zip(labels, p))})
        return {"object": "list", "model": body.model, "data": data}

    @app.get("/v1/models")
    async def models():
        entries = [reg.base] + reg.ready()
        return {"object": "list", "data": [model_card(server, e) for e in entries]}

    @app.post("/v1/adapters")
    async def load(body: AdapterLoad):
        entry = await server.load(body.name, body.path)
        return model_card(server, entry)

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str):
        await server.unload(name)
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": reg.base.name, "adapters": len(reg.ready()),
                "queued": server.worker.pending(), "batches": server.worker.batches,
                "uptime_s": round(time.time() - server.started, 1)}
