"""Validate the comparison lab on SST-2 with minilm: LoRA (r >= 8) should land
within about a point of full fine-tuning's accuracy with under 1 % of the
trainable parameters, and head-only clearly below both (the shape of the LoRA
paper's GLUE results, Hu et al. 2021, Table 2).

    python bench/validate_sst2.py [--rows 3000] [--out runs/validate-sst2]

Training rows are sampled with a seed from ../shared/datasets/sst2/train.tsv;
eval rows from dev.tsv; the test split is the given test.tsv (GLUE dev set).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from _common import dataset
from validate_common import run_compare, summary


def read_sst2(path: Path) -> list[tuple[str, str]]:
    """`sentence<TAB>label` with stray spaces; quotes are literal (no CSV quoting)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        text, _, label = line.rpartition("\t")
        if text.strip() and label.strip() in ("0", "1"):
            rows.append((text.strip(), label.strip()))
    return rows


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows),
                    encoding="utf-8")
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000, help="training rows sampled")
    ap.add_argument("--eval-rows", type=int, default=500)
    ap.add_argument("--epochs", default="1")
    ap.add_argument("--methods", default="full,head,lora,qlora")
    ap.add_argument("--ranks", default="8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/validate-sst2")
    ap.add_argument("--lora-ranks", default="8,16")
    ap.add_argument("--lora-lr", default=None,
                    help="also run LoRA at this learning rate (a second comparison in "
                         "OUT-lrX; full and head keep their defaults) and report both")
    ap.add_argument("--full-lr", default=None,
                    help="also run full fine-tuning at this learning rate (in OUT-full-lrX)")
    ap.add_argument("extra", nargs="*", help="more `loralab train` options, e.g. lr=5e-4")
    args = ap.parse_args()
    sst2 = dataset("sst2")
    rng = random.Random(args.seed)
    data = Path(args.out + "-data")
    train = write_tsv(data / "train.tsv", rng.sample(read_sst2(sst2 / "train.tsv"), args.rows))
    dev = write_tsv(data / "eval.tsv", rng.sample(read_sst2(sst2 / "dev.tsv"), args.eval_rows))
    test = write_tsv(data / "test.tsv", read_sst2(sst2 / "test.tsv"))
    common = ["--model", "minilm", "--data", str(train), "--eval-data", str(dev),
              "--test-data", str(test), "--epochs", args.epochs, "--max-length", "128",
              *args.extra]
    wall = run_compare([*common, "--methods", args.methods, "--ranks", args.ranks,
                        "--output", args.out])
    outs = [Path(args.out)]
    if args.lora_lr:
        outs.append(Path(f"{args.out}-lr{args.lora_lr}"))
        wall += run_compare([*common, "--methods", "lora", "--ranks", args.lora_ranks,
                             "--lr", args.lora_lr, "--output", str(outs[-1])])
    if args.full_lr:
        outs.append(Path(f"{args.out}-full-lr{args.full_lr}"))
        wall += run_compare([*common, "--methods", "full", "--lr", args.full_lr,
                             "--output", str(outs[-1])])
    print(summary(outs, wall))


if __name__ == "__main__":
    main()
