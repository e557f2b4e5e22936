"""``loralab serve`` over real HTTP on a free loopback port: every endpoint and
every error, answers equal to offline generation, mixed adapters in one batch,
load/unload while requests are accepted, classification, and the command.

The server runs in-process (uvicorn in a thread) on a tiny Llama with the
offline MiniLM tokenizer; adapters come from loralab's engine with random B.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import cli, wait_for
from train_support import build_adapters, tiny_llama_dir

from loralab.errors import LoralabError
from loralab.generation import SamplingParams, complete, load_for_generation
from loralab.serve.app import create_app
from loralab.serve.engine import CallJob, GenJob
from loralab.serve.server import (
    BackgroundServer,
    LoraServer,
    ServeConfig,
    bind_socket,
    parse_adapter_specs,
)

pytestmark = pytest.mark.usefixtures("single_thread")

KEY = "test-key"
LABELS = ("billing", "bug", "other")
PROMPTS = ["hello world", "the quick brown fox", "refund my order please",
           "why does the app crash"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_llama_dir(root)
    runs = root / "runs"
    adapters = build_adapters(model_dir, runs, ["a1", "a2", "a3", "late"])
    adapters.update(build_adapters(model_dir, runs, ["clf"], task="classify", labels=LABELS))
    config = ServeConfig(model=str(model_dir), adapters={"a1": str(adapters["a1"]),
                         "a2": str(adapters["a2"]), "a3": str(adapters["a3"])},
                         api_key=KEY, adapter_root=str(runs), max_batch=8, threads=1)
    server = LoraServer(config)
    with BackgroundServer(create_app(server)) as bg:
        client = httpx.Client(base_url=bg.url, headers={"Authorization": f"Bearer {KEY}"},
                              timeout=60)
        yield {"root": root, "model": model_dir, "adapters": adapters, "server": server,
               "url": bg.url, "client": client}
        client.close()


@pytest.fixture(scope="module")
def offline(setup):
    """Offline generation, exactly as ``loralab generate`` runs it, cached per adapter."""
    models = {}

    def answer(adapter, prompt, chat=False, **sampling):
        if adapter not in models:
            path = None if adapter == "base" else setup["adapters"][adapter]
            models[adapter] = load_for_generation(str(setup["model"]), path)
        params = SamplingParams(**{"max_tokens": 12, **sampling})
        return complete(*models[adapter], prompt, params, chat=chat).text

    return answer


def completion(client, model, prompt, **kw):
    body = {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, **kw}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_health_and_models(setup):
    c = setup["client"]
    health = httpx.get(setup["url"] + "/health").json()  # no key needed for health
    assert health["status"] == "ok" and health["model"] == "tiny-llama"
    cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert {"tiny-llama", "a1", "a2", "a3"} <= set(cards)
    assert cards["a1"]["parent"] == "tiny-llama" and cards["tiny-llama"]["parent"] is None
    assert cards["a1"]["root"] == str(setup["adapters"]["a1"])


def test_completions_equal_offline_for_each_adapter_and_base(setup, offline):
    c = setup["client"]
    answers = {}
    for name in ("a1", "a2", "a3", "tiny-llama"):
        out = completion(c, name, PROMPTS[1])
        text = out["choices"][0]["text"]
        assert text == offline("base" if name == "tiny-llama" else name, PROMPTS[1])
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["usage"]["completion_tokens"] == 12 and out["model"] == name
        answers[name] = text
    assert len(set(answers.values())) == 4  # every adapter answers differently


def test_server_equals_generate_command(setup, capsys):
    out = completion(setup["client"], "a2", PROMPTS[2])["choices"][0]["text"]
    assert cli("generate", "--model", setup["model"], "--adapter", setup["adapters"]["a2"],
               "--prompt", PROMPTS[2], "--max-tokens", 12) == 0
    assert capsys.readouterr().out == out + "\n"


def test_chat_sampling_seed_and_stop(setup, offline):
    c = setup["client"]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    r = c.post("/v1/chat/completions", json={"model": "a1", "messages": messages,
                                             "max_tokens": 12, "temperature": 0}).json()
    assert r["object"] == "chat.completion"
    assert r["choices"][0]["message"] == {"role": "assistant",
                                          "content": offline("a1", PROMPTS[0], chat=True)}
    sampled = completion(c, "a3", PROMPTS[0], temperature=1.3, top_p=0.8, seed=11)
    ref = offline("a3", PROMPTS[0], temperature=1.3, top_p=0.8, seed=11)
    assert sampled["choices"][0]["text"] == ref != offline("a3", PROMPTS[0])
    full = offline("a2", PROMPTS[3])
    stop = full.split()[2][:2]
    cut = completion(c, "a2", PROMPTS[3], stop=[stop, "zzzz"])["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def sse_events(client, path, body):
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def test_streaming_matches_non_streaming(setup, offline):
    c = setup["client"]
    body = {"model": "a1", "prompt": PROMPTS[3], "max_tokens": 12, "temperature": 0,
            "stream": True}
    events = sse_events(c, "/v1/completions", body)
    assert len(events) > 2 and all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == offline("a1", PROMPTS[3])
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    chat = {"model": "a2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8,
            "temperature": 0, "stream": True}
    events = sse_events(c, "/v1/chat/completions", chat)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == offline("a2", "hi", chat=True, max_tokens=8)


def test_concurrent_mixed_adapters_equal_offline(setup, offline):
    c = setup["client"]
    jobs = [(name, p) for p in PROMPTS for name in ("a1", "a2", "a3", "tiny-llama")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda j: completion(c, *j)["choices"][0]["text"], jobs))
    for (name, prompt), text in zip(jobs, outs):
        assert text == offline("base" if name == "tiny-llama" else name, prompt), (name, prompt)


def _hold_worker(server):
    """Occupy the worker thread until the returned event is set."""
    gate, running = threading.Event(), threading.Event()
    server.worker.submit(CallJob(lambda: (running.set(), gate.wait(30)), lambda r, e: None))
    assert running.wait(10)
    return gate


def test_rows_for_different_adapters_share_one_batch(setup, offline):
    """Requests queued together run as one batch with per-row adapters."""
    from loralab.generation import GenerationRequest, encode_prompt

    server = setup["server"]
    tok = server.served.tokenizer
    names = ["a1", "a2", None, "a3", "a1", "a2"]
    rows = [GenerationRequest(encode_prompt(tok, PROMPTS[i % 4]), SamplingParams(max_tokens=12),
                              adapter=n) for i, n in enumerate(names)]
    done = threading.Event()
    gate = _hold_worker(server)
    before = server.worker.batches
    for row in rows[:-1]:
        server.worker.submit(GenJob([row], lambda err: None))
    server.worker.submit(GenJob([rows[-1]], lambda err: done.set()))
    gate.set()
    assert done.wait(30)
    assert server.worker.batches == before + 1  # all six rows in one batch
    for i, (name, row) in enumerate(zip(names, rows)):
        assert row.text == offline(name or "base", PROMPTS[i % 4])


def test_load_and_unload_without_restart(setup, offline):
    c = setup["client"]
    path = str(setup["adapters"]["late"])
    r = c.post("/v1/adapters", json={"name": "late", "path": path})
    assert r.status_code == 200 and r.json()["id"] == "late"
    assert completion(c, "late", PROMPTS[0])["choices"][0]["text"] == offline("late", PROMPTS[0])
    assert c.post("/v1/adapters", json={"name": "late", "path": path}).status_code == 409
    assert c.delete("/v1/adapters/late").status_code == 200
    assert c.post("/v1/completions", json={"model": "late", "prompt": "x"}).status_code == 404
    assert "late" not in {m["id"] for m in c.get("/v1/models").json()["data"]}
    # relative to --adapter-root, and loaded again under the same name
    r = c.post("/v1/adapters", json={"name": "late", "path": "late/adapter"})
    assert r.status_code == 200
    assert c.delete("/v1/adapters/late").status_code == 200


def test_unload_waits_for_accepted_requests(setup, offline):
    c, server = setup["client"], setup["server"]
    c.post("/v1/adapters", json={"name": "late", "path": str(setup["adapters"]["late"])})
    gate = _hold_worker(server)  # the request is accepted and queued, not yet run
    with ThreadPoolExecutor(2) as pool:
        pending = pool.submit(completion, c, "late", PROMPTS[2])
        wait_for(lambda: server.worker.pending() > 0, 10, "the request to be queued")
        entry = server.registry.entries["late"]
        unload = pool.submit(c.delete, "/v1/adapters/late")
        wait_for(lambda: entry.state == "draining", 10, "the unload to begin")
        assert server.registry.in_use(entry)  # the accepted request still holds it ...
        assert not unload.done()  # ... so the unload waits for it
        r = c.post("/v1/completions", json={"model": "late", "prompt": "x"})
        assert r.status_code == 404  # draining: no new requests
        gate.set()
        text = pending.result(timeout=30)["choices"][0]["text"]
        assert unload.result(timeout=30).status_code == 200
    assert text == offline("late", PROMPTS[2])  # ran on its adapter to the end


def test_classify_equals_offline(setup):
    from loralab.lora import load_adapter
    from loralab.models import load_model

    c = setup["client"]
    r = c.post("/v1/adapters", json={"name": "clf", "path": str(setup["adapters"]["clf"].parent)})
    assert r.status_code == 200 and r.json()["labels"] == list(LABELS)
    texts = ["my invoice is wrong", "the app crashes on start"]
    data = c.post("/v1/classify", json={"model": "clf", "input": texts}).json()["data"]
    model, tok = load_model(str(setup["model"]), "classify", id2label=dict(enumerate(LABELS)))
    load_adapter(model, setup["adapters"]["clf"])
    for text, row in zip(texts, data):
        with torch.no_grad():
            probs = torch.softmax(model(**tok(text, return_tensors="pt")).logits, -1)[0]
        assert list(row["probabilities"]) == list(LABELS)
        assert torch.allclose(torch.tensor(list(row["probabilities"].values())), probs,
                              atol=1e-5)
        assert row["label"] == LABELS[int(probs.argmax())] == LABELS[row["label_id"]]
    single = c.post("/v1/classify", json={"model": "clf", "input": texts[0]}).json()["data"]
    assert single[0]["probabilities"] == data[0]["probabilities"]
    # generation still uses its own adapters after a classifier joined the backbone
    assert completion(c, "a1", PROMPTS[0])["choices"][0]["text"] == completion(
        c, "a1", PROMPTS[0])["choices"][0]["text"]


ERRORS = [
    ("post", "/v1/completions", {"content": b"{not json", "headers":
                                 {"content-type": "application/json"}}, 400),
    ("post", "/v1/completions", {"content": b"hello", "headers":
                                 {"content-type": "text/plain"}}, 400),
    ("post", "/v1/completions", {"json": {"model": "a1"}}, 422),
    ("post", "/v1/chat/completions", {"json": {"model": "a1", "messages": []}}, 422),
    ("post", "/v1/chat/completions", {"json": {"model": "a1", "messages": [{"role": "x",
                                                                              "content": "a"}]}},
     422),
    ("post", "/v1/completions", {"json": {"model": "a1", "prompt": "x", "max_tokens": 0}}, 422),
    ("post", "/v1/completions", {"json": {"model": "a1", "prompt": "x", "temperature": "hot"}},
     422),
    ("post", "/v1/completions", {"json": [1, 2]}, 422),
    ("post", "/v1/completions", {"json": {"model": "nope", "prompt": "x"}}, 404),
    ("post", "/v1/completions", {"json": {"model": "a1", "prompt": "word " * 100}}, 400),
    ("post", "/v1/completions", {"json": {"model": "a1", "prompt": "hi", "max_tokens": 500}},
     422),  # over the context alone: the field is wrong whatever the prompt
    ("post", "/v1/chat/completions", {"json": {"model": "a1", "messages": [
        {"role": "user", "content": "word " * 100}]}}, 400),
    ("post", "/v1/classify", {"json": {"model": "a1", "input": "x"}}, 400),
    ("post", "/v1/classify", {"json": {"model": "nope", "input": "x"}}, 404),
    ("post", "/v1/adapters", {"json": {"name": "x", "path": "/etc"}}, 400),
    ("post", "/v1/adapters", {"json": {"name": "x", "path": "../tiny-llama"}}, 400),
    ("post", "/v1/adapters", {"json": {"name": "x", "path": "."}}, 400),  # the root: no adapter
    ("post", "/v1/adapters", {"json": {"name": "bad name!", "path": "a1/adapter"}}, 422),
    ("post", "/v1/adapters", {"json": {"name": "a1", "path": "a1/adapter"}}, 409),
    ("post", "/v1/adapters", {"json": {"name": "x"}}, 422),
    ("delete", "/v1/adapters/nope", {}, 404),
    ("delete", "/v1/adapters/tiny-llama", {}, 400),
    ("get", "/v1/nothing-here", {}, 404),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), ERRORS)
def test_user_errors_are_json_4xx(setup, method, path, kwargs, status):
    r = getattr(setup["client"], method)(path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"]


def test_not_an_adapter_inside_root(setup):
    bogus = setup["root"] / "runs" / "not-adapter"
    bogus.mkdir(exist_ok=True)
    (bogus / "adapter_config.json").write_text("{broken")
    (bogus / "adapter_model.safetensors").write_bytes(b"junk")
    r = setup["client"].post("/v1/adapters", json={"name": "bogus", "path": str(bogus)})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    (bogus / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    r = setup["client"].post("/v1/adapters", json={"name": "bogus", "path": str(bogus)})
    assert r.status_code == 400


def test_api_key_and_server_keeps_serving(setup, offline):
    url = setup["url"]
    body = {"model": "a1", "prompt": "hi"}
    assert httpx.post(url + "/v1/completions", json=body).status_code == 401
    r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    for method, path, kwargs, _ in ERRORS:  # a burst of bad requests ...
        getattr(setup["client"], method)(path, **kwargs)
    text = completion(setup["client"], "a1", PROMPTS[0])["choices"][0]["text"]  # ... then good
    assert text == offline("a1", PROMPTS[0])
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_adapter_specs_and_config_errors(setup):
    assert parse_adapter_specs(["a=x", "b=/y"]) == {"a": "x", "b": "/y"}
    for bad in (["nodir"], ["=x"], ["a=x", "a=y"], ["bad name=x"]):
        with pytest.raises(LoralabError):
            parse_adapter_specs(bad)
    with pytest.raises(LoralabError):
        ServeConfig(model="m", max_batch=0)
    assert cli("serve", "--model", setup["model"], "--adapter", "oops") == 2
    with pytest.raises(LoralabError, match="not a classification|no adapter_config"):
        LoraServer(ServeConfig(model=str(setup["model"]), adapters={"x": str(setup["model"])}))


def _free_port() -> int:
    with bind_socket("127.0.0.1", 0) as sock:
        return sock.getsockname()[1]


@pytest.mark.slow
def test_serve_command_subprocess(setup, offline):
    port = _free_port()
    cmd = [sys.executable, "-m", "loralab", "serve", "--model", str(setup["model"]),
           "--adapter", f"a1={setup['adapters']['a1']}", "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 120, "the server to start")
        r = httpx.post(url + "/v1/completions", timeout=30, json={
            "model": "a1", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0})
        assert r.json()["choices"][0]["text"] == offline("a1", PROMPTS[1])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_encoder_base_serves_classifiers(tmp_path):
    """A BERT base (the offline MiniLM) serves classification adapters; it cannot generate."""
    from tiny_models import randomize_adapters

    from loralab.lora import LoRAConfig, inject_lora, load_adapter, save_adapter
    from loralab.models import load_model

    try:
        model, tok = load_model("minilm", "classify", id2label=dict(enumerate(LABELS)))
    except LoralabError as err:
        pytest.skip(str(err))
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="attention", task="classify"))
    randomize_adapters(model, "default", seed=5, std=0.2)
    save_adapter(model, tmp_path / "run" / "adapter", base_model_name_or_path="minilm")
    (tmp_path / "run" / "labels.json").write_text(json.dumps({"labels": list(LABELS)}))
    server = LoraServer(ServeConfig(model="minilm", adapters={"clf": str(tmp_path / "run")},
                                    adapter_root=str(tmp_path), threads=1))
    text = "I was charged twice for my subscription"
    offline_model, _ = load_model("minilm", "classify", id2label=dict(enumerate(LABELS)))
    load_adapter(offline_model, tmp_path / "run" / "adapter")
    with torch.no_grad():
        probs = torch.softmax(offline_model(**tok(text, return_tensors="pt")).logits, -1)[0]
    with BackgroundServer(create_app(server)) as bg:
        row = httpx.post(bg.url + "/v1/classify", json={"model": "clf", "input": text},
                         timeout=30).json()["data"][0]
        assert torch.allclose(torch.tensor(list(row["probabilities"].values())), probs,
                              atol=1e-5)
        r = httpx.post(bg.url + "/v1/completions", json={"model": "minilm", "prompt": "hi"})
        assert r.status_code == 400 and "encoder" in r.json()["error"]["message"]
        r = httpx.post(bg.url + "/v1/completions", json={"model": "clf", "prompt": "hi"})
        assert r.status_code == 400 and "/v1/classify" in r.json()["error"]["message"]
