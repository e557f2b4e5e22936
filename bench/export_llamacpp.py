"""The exported GGUF in llama.cpp itself (llama-cpp-python), against loralab.

For each --quant: `loralab export` the adapter (merge, write, read back with
transformers), then load the file in llama.cpp and compare with the merged
model in transformers:
- tokenization: llama.cpp's ids for the check prompts and the general text
  against the HF tokenizer's (the GGUF's vocab, merges and pre-tokenizer);
- greedy generation, N new tokens from each check prompt: tokens equal,
  and the length of the common prefix;
- perplexity on the same general-text blocks (HF's token ids fed to both).

    .venv/bin/python bench/export_llamacpp.py --adapter RUN/adapter \\
        --quants f16,q8_0,q4_0 --out /tmp/export-bench

llama-cpp-python is not a loralab dependency (it builds llama.cpp from
source): `CMAKE_BUILD_PARALLEL_LEVEL=1 .venv/bin/pip install llama-cpp-python`.
Figures: BENCHMARKS.md, "Export (GGUF)".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _common import load_average, machine

GEN_TOKENS = 32


def _llama(path: Path, n_ctx: int, threads: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, n_threads=threads,
                 verbose=False, seed=0)


def tokenization(llm, tok, texts: list[str]) -> dict:
    same = 0
    for text in texts:
        ours = tok(text, add_special_tokens=False)["input_ids"]
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        same += int(ours == theirs)
    return {"texts": len(texts), "equal": same}


def _llama_greedy(llm, ids: list[int], n: int, eos: set[int]) -> list[int]:
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if nxt in eos:
            break
        out.append(nxt)
        llm.eval([nxt])
    return out


@torch.inference_mode()
def _hf_greedy(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                         dtype=torch.long), max_new_tokens=n, do_sample=False,
                         eos_token_id=sorted(eos), pad_token_id=min(eos))
    new = out[0, len(ids):].tolist()
    return new[:-1] if new and new[-1] in eos else new  # as the llama.cpp loop: EOS not kept


def greedy(llm, model, tok, prompts: list[str]) -> dict:
    from loralab.generation import eos_token_ids

    eos = eos_token_ids(model, tok)
    rows = []
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        a, b = _hf_greedy(model, ids, GEN_TOKENS, eos), _llama_greedy(llm, ids, GEN_TOKENS, eos)
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        rows.append({"prompt": prompt, "equal": a == b, "common_prefix": prefix,
                     "hf": tok.decode(a), "llama_cpp": tok.decode(b)})
    return {"prompts": len(rows), "equal": sum(r["equal"] for r in rows),
            "mean_common_prefix": sum(r["common_prefix"] for r in rows) / len(rows),
            "rows": rows}


def llama_perplexity(llm, blocks: list[list[int]]) -> float:
    nll, n = 0.0, 0
    for ids in blocks:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)  # (T-1, V)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        nll += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        n += len(ids) - 1
    return math.exp(nll / n)


def one_quant(args, quant: str, model, tok, prompts, blocks, texts) -> dict:
    from loralab.export import export_gguf
    from loralab.export.verify import PPL_BLOCK

    out = Path(args.out) / f"smollm2-lora-{quant}.gguf"
    t0 = time.perf_counter()
    report = export_gguf(out, quant, adapter_dir=args.adapter, overwrite=True, echo=print)
    export_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm = _llama(out, n_ctx=max(PPL_BLOCK, 256) + GEN_TOKENS + 64, threads=args.threads)
    load_s = time.perf_counter() - t0
    row = {"quant": quant, "bytes": report["bytes"], "export_s": export_s,
           "llama_load_s": load_s, "transformers_readback": {
               k: report["verify"][k] for k in ("max_abs_logit_diff", "top1_agreement",
                                                "greedy_prompts_equal", "ppl_merged",
                                                "ppl_gguf", "ppl_change_pct")},
           "tokenization": tokenization(llm, tok, texts),
           "greedy": greedy(llm, model, tok, prompts)}
    row["ppl_llama_cpp"] = llama_perplexity(llm, blocks)
    row["ppl_merged"] = report["verify"]["ppl_merged"]
    row["ppl_llama_cpp_change_pct"] = 100 * (row["ppl_llama_cpp"] / row["ppl_merged"] - 1)
    print(json.dumps(row, indent=1))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--quants", default="f16,q8_0,q4_0")
    ap.add_argument("--out", default="/tmp/loralab-export-bench")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed (see this script's docstring).")
    from loralab.data.dataset import resolve_data_path
    from loralab.data.tables import read_text_file
    from loralab.export.run import load_merged
    from loralab.export.verify import general_blocks
    from loralab.merge import CHECK_TEXTS

    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    model, tok, _ = load_merged(adapter_dir=args.adapter)
    chat = tok.apply_chat_template([{"role": "user", "content": "Give me three tips for "
                                     "staying focused."}], tokenize=False,
                                   add_generation_prompt=True)
    prompts = [*CHECK_TEXTS, chat]
    blocks = general_blocks(tok)
    general = read_text_file(resolve_data_path("general_text"))
    texts = [*prompts, *[p for p in general.split("\n\n") if p.strip()][:20],
             "Prices rose 12345 % in 2024; call +1-555-0100.\n\tTabs, émigré, 日本語."]
    rows = [one_quant(args, q, model, tok, prompts, blocks, texts)
            for q in args.quants.split(",")]
    result = {"machine": machine(), "load_average": load_average(),
              "date": time.strftime("%Y-%m-%d"), "llama_cpp_python": llama_cpp.__version__,
              "adapter": args.adapter, "gen_tokens": GEN_TOKENS,
              "ppl_tokens": sum(len(b) for b in blocks), "rows": rows}
    (Path(args.out) / "export_llamacpp.json").write_text(json.dumps(result, indent=2))
    print(f"\n{result['machine']}, load {result['load_average']}, {result['date']}")
    print("| quant | size MB | tokens equal | greedy equal (llama.cpp vs HF) | "
          "ppl HF merged | ppl transformers read-back | ppl llama.cpp |")
    for r in rows:
        t = r["transformers_readback"]
        print(f"| {r['quant']} | {r['bytes'] / 1e6:.1f} | {r['tokenization']['equal']}/"
              f"{r['tokenization']['texts']} | {r['greedy']['equal']}/{r['greedy']['prompts']}"
              f" (mean common prefix {r['greedy']['mean_common_prefix']:.1f} of {GEN_TOKENS}) | "
              f"{r['ppl_merged']:.3f} | {t['ppl_gguf']:.3f} ({t['ppl_change_pct']:+.2f}%) | "
              f"{r['ppl_llama_cpp']:.3f} ({r['ppl_llama_cpp_change_pct']:+.2f}%) |")


if __name__ == "__main__":
    main()
