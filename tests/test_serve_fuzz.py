"""``loralab serve`` under hostile and careless clients: malformed requests of
every kind (types, ranges, sizes, encodings, auth, paths) each get a 4xx with
the problem named, never a 5xx, and the server answers ``/health`` after
every one; a 5 MB prompt is refused without holding up ``/health``; a public
bind without a key, a bad port or batch size are refused before the model
loads; RoBERTa-style nested heads and QLoRA adapters are served as ``eval``
and the one "base + adapter" loader run them.

The server runs in-process (uvicorn in a thread) on the tiny Llama of
tests/train_support.py (MiniLM tokenizer, context 96).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import cli, wait_for
from train_support import build_adapters, tiny_llama_dir

from loralab.errors import LoralabError
from loralab.serve.app import create_app
from loralab.serve.server import (
    DEFAULT_MAX_REQUEST_BYTES,
    BackgroundServer,
    LoraServer,
    ServeConfig,
    bind_socket,
    is_loopback,
)

pytestmark = pytest.mark.usefixtures("single_thread")

KEY = "s3cret-fuzz-key-0123456789"
LIMIT = 6 << 20  # the fuzz server's --max-request-bytes: a 5 MB prompt gets through to the tokenizer


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model_dir = tiny_llama_dir(root)
    runs = root / "runs"
    adapters = build_adapters(model_dir, runs, ["a1", "late"])
    config = ServeConfig(model=str(model_dir), adapters={"a1": str(adapters["a1"])},
                         api_key=KEY, adapter_root=str(runs), max_batch=4, threads=1,
                         max_request_bytes=LIMIT)
    server = LoraServer(config)
    with BackgroundServer(create_app(server)) as bg:
        client = httpx.Client(base_url=bg.url, headers={"Authorization": f"Bearer {KEY}"},
                              timeout=60)
        yield {"url": bg.url, "client": client, "server": server, "model": model_dir,
               "runs": runs, "adapters": adapters}
        client.close()


def alive(url: str) -> None:
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


def raw(url: str, head: bytes, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw HTTP/1.1 bytes; return the status and the response body read."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


def _length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(head) + 4 + int(line.split(b":")[1])
    return len(data) + 1


def auth_head(path: str, extra: str = "", method: str = "POST") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\n{extra}\r\n").encode()


C = "/v1/completions"
CHAT = "/v1/chat/completions"
OK = {"model": "a1", "prompt": "hi", "max_tokens": 2}


def comp(**fields) -> dict:
    return {"json": {**OK, **fields}}


def chat(messages, **fields) -> dict:
    return {"json": {"model": "a1", "messages": messages, "max_tokens": 2, **fields}}


def raw_json(text: bytes) -> dict:
    return {"content": text, "headers": {"content-type": "application/json"}}


def escaped(obj) -> dict:
    """A body as JSON with \\u escapes, so lone surrogates can be sent."""
    return raw_json(json.dumps(obj).encode())


# (id, method, path, httpx kwargs, expected status, a word the message must hold)
FUZZ = [
    # -- types -------------------------------------------------------------------
    ("stream-yes", "post", C, comp(stream="yes"), 422, "stream"),
    ("stream-int", "post", C, comp(stream=1), 422, "stream"),
    ("max-tokens-str", "post", C, comp(max_tokens="5"), 422, "max_tokens"),
    ("max-tokens-float", "post", C, comp(max_tokens=2.5), 422, "max_tokens"),
    ("max-tokens-bool", "post", C, comp(max_tokens=True), 422, "max_tokens"),
    ("temperature-str", "post", C, comp(temperature="hot"), 422, "temperature"),
    ("temperature-bool", "post", C, comp(temperature=True), 422, "temperature"),
    ("seed-str", "post", C, comp(seed="7"), 422, "seed"),
    ("seed-float", "post", C, comp(seed=1.5), 422, "seed"),
    ("prompt-int", "post", C, comp(prompt=5), 422, "prompt"),
    ("prompt-null", "post", C, comp(prompt=None), 422, "prompt"),
    ("prompt-list-int", "post", C, comp(prompt=["a", 3]), 422, "prompt.1"),
    ("prompt-object", "post", C, comp(prompt={"text": "a"}), 422, "prompt"),
    ("model-int", "post", C, comp(model=5), 422, "model"),
    ("messages-object", "post", CHAT, chat({"role": "user"}), 422, "messages"),
    ("role-unknown", "post", CHAT, chat([{"role": "robot", "content": "a"}]), 422, "role"),
    ("content-list", "post", CHAT, chat([{"role": "user", "content": ["a"]}]), 422, "content"),
    ("stop-int", "post", C, comp(stop=3), 422, "stop"),
    ("classify-input-int", "post", "/v1/classify", {"json": {"model": "a1", "input": 5}}, 422,
     "input"),
    ("body-json-string", "post", C, {"json": "hello"}, 422, "body"),
    ("body-json-array", "post", C, {"json": [1, 2]}, 422, "body"),
    ("body-json-null", "post", C, raw_json(b"null"), 422, "body"),
    ("body-empty", "post", C, raw_json(b""), 422, "body"),
    # -- ranges --------------------------------------------------------------------
    ("seed-2^63", "post", C, comp(seed=2**63), 422, "seed"),
    ("seed-negative", "post", C, comp(seed=-1), 422, "seed"),
    ("seed-2^64", "post", C, comp(seed=2**64 + 5), 422, "seed"),
    ("top-p-zero", "post", C, comp(top_p=0), 422, "top_p"),
    ("top-p-over-1", "post", C, comp(top_p=1.5), 422, "top_p"),
    ("top-p-nan", "post", C, raw_json(b'{"model": "a1", "prompt": "x", "top_p": NaN}'), 422,
     "top_p"),
    ("temperature-inf", "post", C,
     raw_json(b'{"model": "a1", "prompt": "x", "temperature": Infinity}'), 422, "temperature"),
    ("temperature-negative", "post", C, comp(temperature=-0.1), 422, "temperature"),
    ("temperature-over-2", "post", C, comp(temperature=2.5), 422, "temperature"),
    ("max-tokens-zero", "post", C, comp(max_tokens=0), 422, "max_tokens"),
    ("max-tokens-over-context", "post", C, comp(max_tokens=96), 422, "max_tokens"),
    ("max-tokens-huge", "post", C, comp(max_tokens=10**30), 422, "max_tokens"),
    ("max-tokens-1e400", "post", C, raw_json(b'{"model": "a1", "prompt": "x", '
                                               b'"max_tokens": 1e400}'), 422, "max_tokens"),
    ("n-two", "post", C, comp(n=2), 422, "n"),
    ("stop-five", "post", C, comp(stop=["a", "b", "c", "d", "e"]), 422, "stop"),
    ("stop-empty", "post", C, comp(stop=""), 422, "stop"),
    ("prompt-list-empty", "post", C, comp(prompt=[]), 422, "prompt"),
    ("messages-empty", "post", CHAT, chat([]), 422, "messages"),
    ("model-empty", "post", C, comp(model=""), 422, "model"),
    ("prompt-over-context", "post", C, comp(prompt="word " * 200), 400, "context"),
    ("chat-over-context", "post", CHAT, chat([{"role": "user", "content": "word " * 200}]),
     400, "context"),
    # -- sizes ---------------------------------------------------------------------
    ("prompt-list-65", "post", C, comp(prompt=["a"] * 65), 422, "prompt"),
    ("model-300-chars", "post", C, comp(model="m" * 300), 422, "model"),
    ("stop-300-chars", "post", C, comp(stop="s" * 300), 422, "stop"),
    ("messages-2000", "post", CHAT, chat([{"role": "user", "content": "a"}] * 2000), 422,
     "messages"),
    ("json-nested-deep", "post", C, raw_json(b"[" * 100_000 + b"]" * 100_000), 400, "body"),
    ("json-int-5000-digits", "post", C,
     raw_json(b'{"model": "a1", "prompt": "x", "seed": ' + b"9" * 5000 + b"}"), 400, ""),
    # -- encodings -----------------------------------------------------------------
    ("prompt-lone-surrogate", "post", C, escaped({**OK, "prompt": "\ud800"}), 422, "prompt"),
    ("prompt-list-surrogate", "post", C, escaped({**OK, "prompt": ["ok", "a\udfffb"]}), 422,
     "prompt.1"),
    ("chat-surrogate", "post", CHAT, escaped({"model": "a1", "messages": [
        {"role": "user", "content": "\udc80"}]}), 422, "content"),
    ("stop-surrogate", "post", C, escaped({**OK, "stop": "\ud83d"}), 422, "stop"),
    ("model-surrogate", "post", C, escaped({**OK, "model": "a\ud800"}), 422, "model"),
    ("classify-surrogate", "post", "/v1/classify", escaped({"model": "a1", "input": "\ud800"}),
     422, "input"),
    ("body-not-utf8", "post", C, raw_json(b'{"model": "a1", "prompt": "\xff\xfe"}'), 400, ""),
    ("body-malformed", "post", C, raw_json(b'{"model": "a1", "prompt": '), 400, "JSON"),
    ("body-text-plain", "post", C, {"content": b"hello", "headers": {"content-type":
                                                                      "text/plain"}}, 400,
     "JSON"),
    # -- paths and adapter names -----------------------------------------------------
    ("path-nul", "post", "/v1/adapters", {"json": {"name": "x", "path": "a1/\x00adapter"}}, 422,
     "path"),
    ("path-10000-chars", "post", "/v1/adapters", {"json": {"name": "x", "path": "p" * 10_000}},
     422, "path"),
    ("path-long-component", "post", "/v1/adapters", {"json": {"name": "x", "path": "p" * 4000}},
     400, "path"),
    ("path-traversal", "post", "/v1/adapters", {"json": {"name": "x", "path": "../.."}}, 400,
     "outside"),
    ("path-absolute-outside", "post", "/v1/adapters", {"json": {"name": "x", "path": "/etc"}},
     400, "outside"),
    ("path-missing", "post", "/v1/adapters", {"json": {"name": "x", "path": "nothing/here"}},
     400, "does not exist"),
    ("path-list", "post", "/v1/adapters", {"json": {"name": "x", "path": ["a1"]}}, 422, "path"),
    ("name-dot", "post", "/v1/adapters", {"json": {"name": "support.v2", "path": "late"}}, 422,
     "no '.'"),
    ("name-65-chars", "post", "/v1/adapters", {"json": {"name": "n" * 65, "path": "late"}},
     422, "name"),
    ("name-empty", "post", "/v1/adapters", {"json": {"name": "", "path": "late"}}, 422, "name"),
    ("name-slash", "post", "/v1/adapters", {"json": {"name": "../x", "path": "late"}}, 422,
     "name"),
    ("unload-unknown-long", "delete", "/v1/adapters/" + "z" * 300, {}, 404, "No adapter"),
    # -- routes and methods ------------------------------------------------------------
    ("get-completions", "get", C, {}, 405, ""),
    ("put-models", "put", "/v1/models", {}, 405, ""),
    ("unknown-route", "get", "/v1/nothing", {}, 404, ""),
    ("unknown-model", "post", C, comp(model="nope"), 404, "nope"),
    ("classify-a-generator", "post", "/v1/classify", {"json": {"model": "a1", "input": "x"}},
     400, "classification"),
]

AUTH = [  # (id, headers) -> 401
    ("no-header", {}),
    ("wrong-key", {"Authorization": "Bearer wrong"}),
    ("basic-scheme", {"Authorization": f"Basic {KEY}"}),
    ("key-with-suffix", {"Authorization": f"Bearer {KEY}x"}),
    ("key-prefix-only", {"Authorization": f"Bearer {KEY[:-1]}"}),
    ("bearer-no-token", {"Authorization": "Bearer"}),
]


def check_error(r: httpx.Response, status: int, word: str = "") -> None:
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert error["code"] == status and error["message"]
    assert word.lower() in error["message"].lower(), error["message"]
    assert KEY not in r.text


@pytest.mark.parametrize(("case", "method", "path", "kwargs", "status", "word"), FUZZ,
                         ids=[f[0] for f in FUZZ])
def test_malformed_request_is_4xx_and_server_lives(fuzz, case, method, path, kwargs, status,
                                                   word):
    r = getattr(fuzz["client"], method)(path, **kwargs)
    assert 400 <= r.status_code < 500
    check_error(r, status, word)
    alive(fuzz["url"])


@pytest.mark.parametrize(("case", "headers"), AUTH, ids=[a[0] for a in AUTH])
def test_auth_is_401_without_echo(fuzz, case, headers):
    r = httpx.post(fuzz["url"] + C, json=OK, headers=headers, timeout=10)
    check_error(r, 401, "API key")
    alive(fuzz["url"])


def test_secret_sent_in_a_field_is_not_echoed(fuzz):
    r = fuzz["client"].post(C, json={**OK, "model": KEY})
    check_error(r, 404, "<redacted>")
    r = fuzz["client"].post("/v1/adapters", json={"name": "x", "path": KEY})
    assert r.status_code == 400 and KEY not in r.text
    alive(fuzz["url"])


def test_body_over_the_limit_is_413_before_it_is_read(fuzz):
    """Content-Length over the limit: refused without sending a byte of body
    (the server would wait for it forever otherwise)."""
    url = fuzz["url"]
    status, body = raw(url, auth_head(C, f"Content-Length: {LIMIT + 1}\r\n"))
    assert status == 413 and b"--max-request-bytes" in body
    status, _ = raw(url, auth_head(C, "Content-Length: 12abc\r\n"), b"{}")
    assert status == 400  # uvicorn or the guard refuses it: never 5xx
    alive(url)


def test_streamed_body_over_the_limit_is_413(fuzz):
    """No Content-Length (chunked): counted as it arrives, refused at the limit."""
    chunk = b"x" * (1 << 20)
    head = auth_head(C, "Transfer-Encoding: chunked\r\n")
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // len(chunk) + 2))
    status, text = raw(fuzz["url"], head, body + b"0\r\n\r\n")
    assert status == 413 and b"--max-request-bytes" in text
    alive(fuzz["url"])


def test_default_limit_refuses_a_5mb_prompt():
    assert 1 << 20 <= DEFAULT_MAX_REQUEST_BYTES < 5_000_000  # "a few MB"
    with pytest.raises(LoralabError, match="max-request-bytes"):
        ServeConfig(model="m", max_request_bytes=10)


def test_health_answers_while_a_5mb_prompt_is_refused(fuzz):
    """The prompt passes the fuzz server's 6 MiB limit, so it is parsed,
    tokenized whole (seconds, off the event loop) and refused for the context;
    every /health meanwhile answers within 1 s (a correctness bound, not a
    speed figure: on the event loop it waited for the whole tokenization)."""
    url = fuzz["url"]
    # blank at first: the prefix probe finds too few tokens to decide, so the whole
    # 5 MB is tokenized (about a million tokens)
    prompt = (" " * 4000 + "refund my order please " * 220_000)[:5_000_000]
    result = {}

    def big():
        t0 = time.perf_counter()
        result["r"] = fuzz["client"].post(C, json={**OK, "prompt": prompt}, timeout=120)
        result["s"] = time.perf_counter() - t0

    thread = threading.Thread(target=big)
    thread.start()
    wait_for(lambda: fuzz["server"].registry.entries["a1"].refs > 0 or "r" in result, 60,
             "the big prompt to be accepted")  # parsed and validated: tokenizing now
    latencies = []
    while thread.is_alive():
        t0 = time.perf_counter()
        alive(url)
        latencies.append(time.perf_counter() - t0)
        time.sleep(0.05)
    thread.join()
    check_error(result["r"], 400, "context length")
    assert len(latencies) >= 3, "the refusal finished before /health was asked"
    assert max(latencies) < 1.0, latencies
    print(f"\n5 MB prompt refused in {result['s']:.1f} s; /health meanwhile: "
          f"{len(latencies)} calls, max {max(latencies) * 1000:.0f} ms, median "
          f"{sorted(latencies)[len(latencies) // 2] * 1000:.0f} ms")


def test_a_5mb_prompt_with_spaces_is_refused_from_its_prefix(fuzz):
    prompt = ("refund my order please " * 220_000)[:5_000_000]
    r = fuzz["client"].post(C, json={**OK, "prompt": prompt})
    check_error(r, 400, "in its first")
    r = fuzz["client"].post(CHAT, json={"model": "a1", "messages": [
        {"role": "user", "content": prompt}]})
    check_error(r, 400, "in its first")


TEXTS = ["refund my order please " * 40, "a  b   c\n\n d\te " * 60, "x " * 500,
         "invoice-charge, refund! (card) " * 40, "naïve café 東京 " * 80,
         "supercalifragilistic " * 50 + "y" * 3000, "\n".join(["line"] * 600)]


@pytest.mark.parametrize("tokenizer", ["minilm", "smollm2-135m"])
def test_prefix_probe_refuses_only_what_is_too_long(tokenizer):
    """Whenever the probe refuses, the whole text has more tokens than the
    context (WordPiece and byte-level BPE); texts it cannot decide pass through."""
    from types import SimpleNamespace

    from loralab.models import load_tokenizer
    from loralab.serve.app import refuse_if_surely_too_long

    try:
        tok = load_tokenizer(tokenizer)
    except LoralabError as err:
        pytest.skip(str(err))
    refused = 0
    for context in (8, 16, 32, 64, 128):
        server = SimpleNamespace(served=SimpleNamespace(context=context, tokenizer=tok))
        for text in TEXTS:
            try:
                refuse_if_surely_too_long(server, text)
            except LoralabError:
                refused += 1
                assert len(tok(text)["input_ids"]) > context, (context, text[:40])
    assert refused >= 10  # the probe decides most of these


def test_tiny_top_p_and_temperature_still_answer(fuzz):
    """No token's mass below top_p (1e-320 is 0 in float32) and temperatures
    under float32's range: the most likely token is kept, so an answer (equal
    to greedy), not a 500."""
    c = fuzz["client"]
    greedy = c.post(C, json={**OK, "max_tokens": 6, "temperature": 0}).json()
    for fields in ({"top_p": 1e-320}, {"temperature": 1e-300}, {"temperature": 5e-324,
                                                                 "top_p": 5e-324, "seed": 3}):
        r = c.post(C, json={**OK, "max_tokens": 6, **fields})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy["choices"][0]["text"]
    r = c.post(C, json={**OK, "seed": 2**63 - 1, "temperature": 1.0})
    assert r.status_code == 200, r.text


def test_fuzz_burst_then_good_answers(fuzz):
    """Every malformed request again, back to back, then a good one: same answer as before."""
    c = fuzz["client"]
    before = c.post(C, json={**OK, "temperature": 0, "max_tokens": 8}).json()["choices"]
    statuses = [getattr(c, m)(p, **kw).status_code for _, m, p, kw, _, _ in FUZZ]
    assert all(400 <= s < 500 for s in statuses), statuses
    after = c.post(C, json={**OK, "temperature": 0, "max_tokens": 8}).json()["choices"]
    assert after == before
    health = httpx.get(fuzz["url"] + "/health").json()
    assert health["status"] == "ok" and health["queued"] == 0
    assert fuzz["server"].registry.base.refs == 0  # every reference given back
    assert all(e.refs == 0 for e in fuzz["server"].registry.entries.values())


# -- start-up refusals: one line, exit 2, before any model loads ------------------------

def one_error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:")
    return lines[0]


@pytest.mark.parametrize(("args", "word"), [
    (["--host", "0.0.0.0"], "--api-key"),
    (["--host", "::"], "--api-key"),
    (["--port", "99999"], "--port"),
    (["--port", "0"], "--port"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-batch", "-3"], "--max-batch"),
    (["--max-request-bytes", "0"], "--max-request-bytes"),
    (["--adapter", "a.b=x"], "no '.'"),
], ids=["public-no-key", "public-v6-no-key", "port-99999", "port-0", "max-batch-0",
        "max-batch-negative", "max-request-bytes-0", "adapter-name-dot"])
def test_serve_refuses_bad_options(capsys, args, word):
    assert cli("serve", "--model", "no-such-model-anywhere", *args) == 2
    line = one_error_line(capsys)
    assert word in line
    assert "no-such-model" not in line  # refused before the model is even looked up


def test_public_bind_needs_a_key_or_the_explicit_flag():
    with pytest.raises(LoralabError, match="--insecure-no-auth"):
        ServeConfig(model="m", host="0.0.0.0")
    assert ServeConfig(model="m", host="0.0.0.0", api_key="k").host == "0.0.0.0"
    assert ServeConfig(model="m", host="0.0.0.0", insecure_no_auth=True).api_key is None
    assert "k3y" not in repr(ServeConfig(model="m", api_key="k3y"))
    for host in ("127.0.0.1", "127.8.9.10", "::1", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "10.0.0.1", "example.invalid"):
        assert not is_loopback(host), host


def test_port_in_use_is_one_line(capsys):
    taken = bind_socket("127.0.0.1", 0)
    taken.listen()
    port = taken.getsockname()[1]
    try:
        assert cli("serve", "--model", "no-such-model-anywhere", "--port", port) == 2
        assert "already in use" in one_error_line(capsys)
    finally:
        taken.close()


def test_unreachable_model_after_bind_closes_the_port(capsys, tmp_path):
    """Model loading fails after the bind: one line, and the port is free again."""
    probe = bind_socket("127.0.0.1", 0)
    port = probe.getsockname()[1]
    probe.close()
    assert cli("serve", "--model", str(tmp_path / "missing"), "--port", port) == 2
    one_error_line(capsys)
    bind_socket("127.0.0.1", port).close()  # free: would raise "already in use"


def test_adapter_config_written_as_json_stays_valid(fuzz):
    """The fuzz run left no adapter half-loaded: loading one now works."""
    c = fuzz["client"]
    r = c.post("/v1/adapters", json={"name": "late", "path": "late"})
    assert r.status_code == 200, r.text
    assert c.post(C, json={**OK, "model": "late"}).status_code == 200
    assert c.delete("/v1/adapters/late").status_code == 200
    assert json.loads(httpx.get(fuzz["url"] + "/health").text)["adapters"] == 1
