"""Integration on the real minilm and SMS spam data (skipped without them)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import cli
from realdata import DATASETS, has_package

from loralab.models import ALIASES

SMS = DATASETS / "sms_spam" / "bench"


@pytest.mark.slow
@pytest.mark.skipif(not SMS.is_dir() or not has_package(ALIASES["minilm"].package),
                    reason="needs ../shared/datasets and the minilm package")
def test_minilm_lora_learns_spam(tmp_path):
    out = tmp_path / "run"
    assert cli("train", "--model", "minilm", "--data", SMS / "train.tsv", "--eval-data",
               SMS / "val.tsv", "--test-data", SMS / "val.tsv", "--method", "lora",
               "--epochs", "1", "--lr", "1e-3", "--output", out, "--quiet") == 0
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
