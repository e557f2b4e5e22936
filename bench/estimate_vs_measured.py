"""`loralab estimate` vs what `loralab train` measures, on CPU.

For each model x method, one `loralab train --max-steps N` subprocess runs on
texts long enough that every row is truncated to --max-length (so every batch
is exactly batch x max_length tokens, no padding, as the estimate assumes);
its metrics.json gives the peak RSS of the process and the exact tensor
account (weights by dtype, gradients, optimizer state). The estimate for the
same settings comes from the library, before anything is loaded.

The CPU "framework overhead" (interpreter, torch, transformers, tokenizer,
kernel code pages, thread pools, the metrics libraries loaded for eval) is
measured by training a tiny twin of each model (same architecture and
tokenizer, hidden size 32, one layer) with the same command: its peak RSS,
less its own few MB of tensors, is the process cost the estimate adds.

Each real run is repeated with a fixed malloc mmap threshold, under which RSS
follows live memory rather than what glibc keeps of freed blocks.

    .venv/bin/python bench/estimate_vs_measured.py
    .venv/bin/python bench/estimate_vs_measured.py --models minilm --methods lora --steps 2
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, loralab_cmd, machine, run_job

TEXT = ROOT / "src" / "loralab" / "data" / "builtin" / "general_text.txt"

# A model with (almost) no parameters: the real config shrunk, the real tokenizer.
TINY = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "intermediate_size": 64, "num_hidden_layers": 1}


def tiny_model_dir(model: str, folder: Path) -> Path:
    """Same architecture and tokenizer as ``model``, a few MB of weights: training
    it measures what the process costs besides the model's tensors."""
    import torch
    import transformers

    from loralab.models import load_tokenizer, resolve_model

    cfg = transformers.AutoConfig.from_pretrained(resolve_model(model))
    for key, value in TINY.items():
        if hasattr(cfg, key) or key in ("head_dim",):
            setattr(cfg, key, value)
    if getattr(cfg, "layer_types", None):  # per-layer attention kinds: one per layer kept
        cfg.layer_types = cfg.layer_types[:cfg.num_hidden_layers]
    arch = (cfg.architectures or ["AutoModel"])[0]
    cls = getattr(transformers, arch, transformers.AutoModel)
    torch.manual_seed(0)
    net = cls(cfg) if arch != "AutoModel" else cls.from_config(cfg)
    out = folder / f"tiny-{Path(model).name}"
    net.save_pretrained(out)
    load_tokenizer(model).save_pretrained(out)
    return out


def make_data(folder: Path, rows: int, words: int) -> dict:
    """A classify CSV and an sft JSONL whose texts all exceed max_length tokens."""
    tokens = TEXT.read_text(encoding="utf-8").split()
    chunks = [" ".join(tokens[(i * 97) % (len(tokens) - words):][:words]) for i in range(rows)]
    cls = folder / "long.csv"
    with open(cls, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i, text in enumerate(chunks):
            w.writerow([text, "even" if i % 2 == 0 else "odd"])
    sft = folder / "long.jsonl"
    with open(sft, "w", encoding="utf-8") as fh:
        for text in chunks:
            fh.write(json.dumps({"instruction": "Continue the text.", "input": "",
                                 "output": text}) + "\n")
    return {"classify": cls, "sft": sft}


def measure_overhead(model: str, method: str, task: str, data: Path, args,
                     folder: Path) -> int:
    """Peak RSS of the same `loralab train` run on the tiny twin of ``model``,
    less the twin's own estimated tensors and activations."""
    tiny = tiny_model_dir(model, folder)
    metrics = train(str(tiny), method, data, args, folder / f"{tiny.name}-{method}")
    est = estimate_for(str(tiny), method, task, 2, args, overhead=False)
    return metrics["peak_memory"]["peak_rss_bytes"] - est.bytes["total"]


# glibc's dynamic mmap threshold keeps freed mid-size blocks in the heap, so RSS
# can stay above live memory; a fixed threshold hands every freed block of 64 KiB
# or more back to the kernel, so RSS follows live memory (mallopt(3)).
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def train(model: str, method: str, data: Path, args, out: Path, env: dict | None = None) -> dict:
    cmd = loralab_cmd("train", "--model", model, "--data", data, "--method", method,
                      "--max-steps", args.steps, "--batch-size", args.batch_size,
                      "--max-length", args.max_length, "--rank", args.rank,
                      "--targets", args.targets, "--quiet", "--overwrite", "--output", out,
                      f"eval_batch_size={args.batch_size}", "save_checkpoints=false",
                      "eval_split=0.05", "test_split=0.05")
    job = run_job(cmd, env=env).check()
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["_wall"] = job.seconds
    return metrics


def estimate_for(model: str, method: str, task: str, num_labels: int, args,
                 overhead: bool = True):
    from loralab.estimate import EstimateConfig, Estimator, load_spec

    spec = load_spec(model, task=task, num_labels=num_labels)
    cfg = EstimateConfig(method=method, precision="fp32", optimizer="adamw",
                         batch_size=args.batch_size, seq_len=args.max_length,
                         rank=args.rank, targets=args.targets, device="cpu", padded=False,
                         overhead=overhead)
    return Estimator(spec, cfg).at()


def compare(model: str, method: str, metrics: dict, est) -> dict:
    m = metrics["peak_memory"]
    t = m["tensors"]
    b = est.bytes
    est_tensors = b["weights"] + b["gradients"] + b["optimizer"]  # fp32: no master copy
    return {
        "model": model, "method": method,
        "tensors_measured": t["total_bytes"], "tensors_estimated": est_tensors,
        "tensors_error": est_tensors / t["total_bytes"] - 1,
        "weights_measured": t["weights_bytes"], "weights_estimated": b["weights"],
        "grads_measured": t["gradients_bytes"], "grads_estimated": b["gradients"],
        "optim_measured": t["optimizer_bytes"], "optim_estimated": b["optimizer"],
        "rss_measured": m["peak_rss_bytes"], "rss_estimated": b["total"],
        "rss_error": b["total"] / m["peak_rss_bytes"] - 1,
        "mapped_checkpoint_estimated": b["mapped_checkpoint"],
        "activations_estimated": b["activations"] + b["logits"],
        "load_estimated": b.get("load", 0), "wall_s": round(metrics["_wall"], 1),
    }


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def markdown(rows: list[dict], args, command: str) -> str:
    lines = [
        (f"Machine: {args.machine}; date {args.date}. CPU, fp32, "
         f"AdamW, batch {args.batch_size} x {args.max_length} tokens (every row truncated, "
         f"no padding), LoRA r={args.rank} on {args.targets}, {args.steps} optimizer steps."),
        "",
        ("| model | method | tensors measured (MB) | estimated (MB) | error "
         "| peak RSS measured (MB) | estimated (MB) | error "
         "| peak RSS, fixed malloc threshold (MB) | error "
         "| overhead: tiny twin / used (MB) |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fixed = r.get("rss_fixed_malloc")
        lines.append(
            f"| {r['model']} | {r['method']} | {mb(r['tensors_measured'])} | "
            f"{mb(r['tensors_estimated'])} | {100 * r['tensors_error']:+.2f} % | "
            f"{mb(r['rss_measured'])} | {mb(r['rss_estimated'])} | "
            f"{100 * r['rss_error']:+.1f} % | "
            + (f"{mb(fixed)} | {100 * (r['rss_estimated'] / fixed - 1):+.1f} % | "
               if fixed else "- | - | ")
            + f"{mb(r['overhead_measured'])} / {mb(r['overhead_estimated'])} |")
    lines += ["", f"Command: `{command}`"]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,smollm2-135m")
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="attention")
    ap.add_argument("--rows", type=int, default=80)
    ap.add_argument("--machine", default=machine(), help="as read from this machine")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    ap.add_argument("--no-fixed-malloc", dest="fixed_malloc", action="store_false",
                    help="Skip the second run with a fixed malloc mmap threshold.")
    ap.add_argument("--json", dest="json_out", default=None, help="Also write rows here.")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = make_data(folder, args.rows, words=3 * args.max_length)
        for model in args.models.split(","):
            task = "classify" if model == "minilm" else "sft"
            for method in args.methods.split(","):
                overhead = measure_overhead(model, method, task, data[task], args, folder)
                name = Path(model).name  # a model dir or a name
                metrics = train(model, method, data[task], args, folder / f"{name}-{method}")
                est = estimate_for(model, method, task, 2, args)
                rows.append(compare(model, method, metrics, est))
                rows[-1]["overhead_measured"] = overhead
                rows[-1]["overhead_estimated"] = est.bytes["overhead"]
                if args.fixed_malloc:
                    fixed = train(model, method, data[task], args,
                                  folder / f"{name}-{method}-fixed", env=FIXED_MALLOC)
                    rows[-1]["rss_fixed_malloc"] = fixed["peak_memory"]["peak_rss_bytes"]
                print(json.dumps(rows[-1]), flush=True)
    command = "python bench/estimate_vs_measured.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    print(markdown(rows, args, command.strip()))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
