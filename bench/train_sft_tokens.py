"""sft LoRA throughput: loralab train vs TRL's SFTTrainer + peft, same settings.

smollm2-135m, the first records of ../shared/datasets/alpaca, LoRA r=8 alpha=16
on q,k,v,o projections, batch 4, max length 512, loss on response tokens only,
a fixed number of optimizer steps. Tokens/s counts real (unpadded) tokens fed
to the model. Each side runs in its own subprocess.

    .venv/bin/python bench/train_sft_tokens.py --steps 10

The loralab side also reports its CPU FLOP utilisation: the transformer
body's useful FLOPs per second (per real token, 4 x the linear weights: the
forward and the input-gradient matmuls, the frozen weights needing no weight
gradient; plus the adapters' 6 x r x (in + out) and the attention scores and
values, 3 x their forward) over the fp32 matmul peak measured in the same
process (square 1,024 products at the run's thread count). The LM head and
loss are left out of the useful count (they run only at response positions).

``--profile`` shows where the rest goes: loralab's step under torch.profiler
(after one warm-up step), its operators' self time by kind, the FLOP rate of
the body's and the LM head's matmuls against the same peak, and the wall time
between operators (Python, autograd, the loop). The profiler's cost per call
inflates the small operators, so the shares, not the totals, are the figures.

    .venv/bin/python bench/train_sft_tokens.py --profile --steps 4

``--memory-ab`` measures loralab's own peak memory with its three memory levers
added one at a time, from none (the plain full-logits LM loss, the gated MLP
as plain ops, no huge pages) to all: the chunked, labels-only LM loss
(train/lm_loss.py), the fused gated-MLP product (train/gated_mlp.py) and
torch's huge-page allocation (allocator.py); with ``--fill`` every row is 512
tokens long (eight Alpaca answers per record). Each run is its own process,
one after another.

    .venv/bin/python bench/train_sft_tokens.py --memory-ab --fill --steps 3 --records 24
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from _common import DATASETS, dataset, load_average, machine, run_job

NO_HUGE_PAGES = {"THP_MEM_ALLOC_ENABLE": "0"}  # torch's default allocation

ALPACA = DATASETS / "alpaca" / "alpaca_data_first2000.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def records(n: int, fill: bool = False) -> list[dict]:
    rows = json.loads(ALPACA.read_text(encoding="utf-8"))
    if not fill:
        return rows[:n]
    # eight answers per record: every row reaches --max-length 512
    return [{"instruction": rows[4 * i]["instruction"], "input": "",
             "output": "\n\n".join(r["output"] for r in rows[4 * i:4 * i + 8])}
            for i in range(n)]


def sft_options(tmp: Path, batch: int, n: int, fill: bool = False) -> dict:
    """The benchmark's ``loralab train`` settings, the first ``n`` records written
    under ``tmp``."""
    data = tmp / "train.json"
    data.write_text(json.dumps(records(n, fill)))
    return {"model": "smollm2-135m", "data": str(data), "task": "sft", "method": "lora",
            "rank": 8, "alpha": 16, "targets": ",".join(TARGETS), "batch_size": batch,
            "max_length": 512, "lr": 2e-4, "eval_split": 0.0, "test_split": 0.0}


def loralab_job(steps: int, batch: int, n: int, plain_loss: bool = False,
                plain_mlp: bool = False, fill: bool = False) -> dict:
    from loralab.config import build_config
    from loralab.train import run_training

    if plain_loss:  # the reference: logits over every position, as before
        from loralab.train import lm_loss

        lm_loss.chunkable = lambda model: False
    if plain_mlp:  # act(gate) * up as plain ops: autograd keeps act(gate) too
        from loralab.train import methods

        methods.use_fused_gated_mlp = lambda model: 0

    tmp = Path(tempfile.mkdtemp(prefix="sft-"))
    cfg = build_config(None, None, {**sft_options(tmp, batch, n, fill), "max_steps": steps,
                                    "save_checkpoints": False, "quiet": True,
                                    "output": str(tmp / "run")})
    run_dir = run_training(cfg)
    m = json.loads((run_dir / "metrics.json").read_text())
    flops = body_flops_per_token(m["train_tokens"] / max(1, m["steps"] * batch))
    peak = matmul_peak()
    useful = flops * m["tokens_per_second"]
    return {"tokens_per_second": m["tokens_per_second"], "train_tokens": m["train_tokens"],
            "train_seconds": m["train_seconds"], "steps": m["steps"],
            "peak_rss_bytes": m["peak_memory"]["peak_rss_bytes"],
            "body_flops_per_token": flops, "useful_gflops": useful / 1e9,
            "matmul_peak_gflops": peak / 1e9, "flop_utilisation": useful / peak,
            "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"}


MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
SFT_KINDS = {  # operator name fragments -> kind, after the matmuls
    "attention": ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax"),
    "loss": ("log_softmax", "cross_entropy", "nll_loss", "logsumexp"),
    "optimizer": ("adam", "foreach"),
    "dropout masks": ("random_", "bernoulli"),
    "copies and casts": ("copy_", "clone", "aten::cat", "_to_copy"),
}


def sft_kind(name: str, shapes: list, vocab: int) -> str:
    if name in MATMULS:
        return "matmul: LM head" if any(vocab in s for s in shapes if s) else "matmul: body"
    for kind, keys in SFT_KINDS.items():
        if any(k in name for k in keys):
            return kind
    return "other (norms, activations, adds, embedding, ...)"


def matmul_flops(name: str, shapes: list) -> int:
    """2 x the multiply-adds of one mm / addmm / bmm / baddbmm call, from its input shapes."""
    a, b = (shapes[0], shapes[1]) if name in ("aten::mm", "aten::bmm") else (shapes[1], shapes[2])
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def profile_job(steps: int, batch: int, n: int, top: int = 25) -> dict:
    """Where loralab's sft LoRA step goes: its operators' self time under
    torch.profiler, by kind, the matmuls' FLOP rates against the square-matmul
    peak, and the wall time between operators (Python, autograd, the loop)."""
    from train_profile import profile_train_steps
    from transformers import AutoConfig

    from loralab.models import resolve_model

    vocab = AutoConfig.from_pretrained(resolve_model("smollm2-135m")).vocab_size
    options = sft_options(Path(tempfile.mkdtemp(prefix="sft-")), batch, n)
    prof, seconds = profile_train_steps(options, steps, shapes=True)
    us: dict[str, float] = {}
    flops: dict[str, float] = {}
    events = sorted(prof.key_averages(group_by_input_shape=True),
                    key=lambda e: -e.self_cpu_time_total)
    for ev in events:
        kind = sft_kind(ev.key, ev.input_shapes, vocab)
        us[kind] = us.get(kind, 0.0) + ev.self_cpu_time_total
        if ev.key in MATMULS:
            flops[kind] = flops.get(kind, 0.0) + ev.count * matmul_flops(ev.key, ev.input_shapes)
    ops_ms = sum(us.values()) / 1000 / steps
    wall_ms = 1000 * seconds / steps
    return {"steps_profiled": steps, "wall_ms_per_step": round(wall_ms, 1),
            "operators_ms_per_step": round(ops_ms, 1),
            "between_operators_ms_per_step": round(wall_ms - ops_ms, 1),
            "ms_per_step": {k: round(v / 1000 / steps, 1)
                            for k, v in sorted(us.items(), key=lambda kv: -kv[1])},
            "matmul_gflops": {k: round(f / (us[k] / 1e6) / 1e9, 1) for k, f in flops.items()},
            "matmul_peak_gflops": round(matmul_peak() / 1e9, 1),
            "top": [{"op": e.key, "shapes": [s for s in e.input_shapes if s][:3],
                     "calls_per_step": round(e.count / steps, 1),
                     "ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 1)}
                    for e in events[:top]]}


def body_flops_per_token(mean_len: float, rank: int = 8) -> float:
    """Useful training FLOPs per real token of smollm2-135m's blocks under LoRA."""
    from transformers import AutoConfig

    from loralab.models import resolve_model

    c = AutoConfig.from_pretrained(resolve_model("smollm2-135m"))
    d, f, L = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    kv = d // c.num_attention_heads * c.num_key_value_heads
    linear = d * d * 2 + d * kv * 2 + 3 * d * f  # q, o; k, v; gate, up, down
    adapters = 2 * (d + d) + 2 * (d + kv)  # r x (in + out) for q, o and k, v
    attention = 2 * 2 * mean_len * d  # scores and values, per token
    return L * (4 * linear + 6 * rank * adapters + 3 * attention)


def matmul_peak(n: int = 1024, seconds: float = 1.0) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t0)


def trl_job(steps: int, batch: int, n: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from loralab.data.prompts import instruction_messages
    from loralab.models import resolve_model

    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = [{"prompt": instruction_messages(r["instruction"], r.get("input", "")),
             "completion": [{"role": "assistant", "content": r["output"]}]}
            for r in records(n)]

    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-"), max_steps=steps,
                     per_device_train_batch_size=batch, learning_rate=2e-4, max_length=512,
                     completion_only_loss=True, save_strategy="no", report_to=[],
                     logging_steps=max(1, steps), use_cpu=True, disable_tqdm=True,
                     include_num_input_tokens_seen="non_padding")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok,
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=TARGETS, task_type="CAUSAL_LM"))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    tokens = int(trainer.state.num_input_tokens_seen)  # attention-mask sum: real tokens
    return {"tokens_per_second": tokens / seconds, "train_tokens": tokens,
            "train_seconds": seconds, "steps": trainer.state.global_step}


# --memory-ab: each lever added in turn (job flags, and whether huge pages are on)
LEVERS = [("none", ["--plain-loss", "--plain-mlp"], False),
          ("chunked loss", ["--plain-mlp"], False),
          ("+ fused gated MLP", [], False),
          ("+ huge pages", [], True),
          ("huge pages, MLP unfused", ["--plain-mlp"], True)]  # the MLP's share with them


def side(kind: str, args, flags: tuple = (), huge_pages: bool = True) -> dict:
    """One side's measurement, in its own process."""
    cmd = [sys.executable, __file__, "--job", kind, "--steps", str(args.steps),
           "--batch", str(args.batch), "--records", str(args.records), *flags]
    cmd += ["--fill"] if args.fill else []
    job = run_job(cmd, env=None if huge_pages else NO_HUGE_PAGES)
    return job.last_json() if job.returncode == 0 else {"error": job.error_line()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--job", choices=["loralab", "trl"])
    ap.add_argument("--plain-loss", action="store_true", help="loralab job: full logits")
    ap.add_argument("--plain-mlp", action="store_true", help="loralab job: unfused MLP")
    ap.add_argument("--fill", action="store_true", help="every row 512 tokens long")
    ap.add_argument("--profile", action="store_true",
                    help="where loralab's step goes, under torch.profiler (no TRL run)")
    ap.add_argument("--memory-ab", action="store_true",
                    help="loralab's peak memory with its memory levers added one by one")
    args = ap.parse_args()
    if args.job:
        if args.job == "trl":
            print(json.dumps(trl_job(args.steps, args.batch, args.records)))
        else:
            print(json.dumps(loralab_job(args.steps, args.batch, args.records,
                                         plain_loss=args.plain_loss,
                                         plain_mlp=args.plain_mlp, fill=args.fill)))
        return
    dataset("alpaca", ALPACA.name)
    if args.profile:
        print(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                          "load_average_before": load_average(),
                          **profile_job(args.steps, args.batch, args.records)}, indent=2))
        return
    if args.memory_ab:
        runs = {name: side("loralab", args, flags, thp) for name, flags, thp in LEVERS}
        report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
                  "load_average_after": load_average(), "runs": runs,
                  "command": " ".join([Path(sys.executable).name] + sys.argv)}
        base = runs["none"].get("peak_rss_bytes")
        report["peak_ratios"] = {name: r["peak_rss_bytes"] / base for name, r in runs.items()
                                 if base and "peak_rss_bytes" in r}
        print(json.dumps(report, indent=2))
        return
    ours = side("loralab", args)
    try:
        import trl  # noqa: F401
        theirs = side("trl", args)
    except ImportError:
        theirs = {"error": "trl is not installed (pip install trl)"}
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "load_average_after": load_average(), "loralab": ours, "trl": theirs,
              "command": " ".join([Path(sys.executable).name] + sys.argv)}
    if "tokens_per_second" in theirs:
        report["ratio"] = ours["tokens_per_second"] / theirs["tokens_per_second"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
