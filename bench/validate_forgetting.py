"""Validate forgetting measurement: smollm2-135m instruction-tuned on Alpaca
by full fine-tuning, LoRA and QLoRA; perplexity on WikiText-2 (general text the
model was not tuned on) before and after. Biderman et al. (2024), "LoRA Learns
Less and Forgets Less": full fine-tuning's rise should be the largest.

    python bench/validate_forgetting.py [--records 300] [--out runs/validate-forgetting]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from _common import dataset
from validate_common import run_compare, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200, help="Alpaca records sampled")
    ap.add_argument("--epochs", default="1")
    ap.add_argument("--max-length", default="256")
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/validate-forgetting")
    ap.add_argument("extra", nargs="*", help="more `loralab train` options")
    args = ap.parse_args()
    records = json.loads(dataset("alpaca", "alpaca_data_first2000.json").read_text())
    sample = random.Random(args.seed).sample(records, args.records)
    data = Path(args.out + "-data") / "alpaca.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample),
                    encoding="utf-8")
    general = dataset("wikitext2", "wiki.test.raw")
    wall = run_compare(["--model", "smollm2-135m", "--data", str(data), "--methods",
                        args.methods, "--general-text", str(general), "--epochs", args.epochs,
                        "--max-length", args.max_length, "--generations", "4",
                        "--max-new-tokens", "48", "--output", args.out, *args.extra])
    print(summary([Path(args.out)], wall))


if __name__ == "__main__":
    main()
