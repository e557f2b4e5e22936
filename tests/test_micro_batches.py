"""Token-budget micro-batches: the same step (loss and every gradient, float64)
as fixed rows per micro-batch, the budget never exceeded, never more passes
than fixed rows, and the bad budgets refused with the fix."""

from __future__ import annotations

import random

import pytest
import torch
from accelerate import Accelerator
from conftest import cli
from tiny_models import VOCAB, tiny_bert, tiny_llama
from train_support import class_rows, save_tiny, write_csv

from loralab.config import build_config
from loralab.data.batching import pack_by_tokens, padded_width, plan_steps
from loralab.data.encode import IGNORE, Encoded
from loralab.lora import LoRAConfig, inject_lora
from loralab.train.loop import Loop

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("seed", range(20))
def test_packing_keeps_every_row_within_budget_and_never_adds_passes(seed):
    rng = random.Random(seed)
    batch, max_len = rng.randint(1, 8), rng.randint(8, 128)
    lengths = [rng.randint(1, max_len) for _ in range(rng.randint(1, 60))]
    rows = list(range(len(lengths)))
    multiple = rng.choice([1, 8])
    budget = batch * padded_width(max_len, multiple)
    fixed = -(-len(rows) // batch)  # fixed rows: ceil(n / batch) passes at least
    packed = pack_by_tokens(rows, lengths, budget, multiple, max_passes=fixed)
    assert sorted(i for mb in packed for i in mb) == rows
    for mb in packed:
        assert len(mb) * padded_width(max(lengths[i] for i in mb), multiple) <= budget
    assert len(packed) <= fixed
    greedy = pack_by_tokens(rows, lengths, budget, multiple, max_passes=0)  # the fallback
    assert len(greedy) <= fixed and sorted(i for mb in greedy for i in mb) == rows


def test_packing_weighs_padding_against_passes():
    from loralab.data.batching import PASS_COST_TOKENS

    lengths = [100, 10, 10, 10, 10]  # one long row: the short ones gain nothing with it
    packed = pack_by_tokens(list(range(5)), lengths, 500)
    assert packed == [[0], [1, 2, 3, 4]]
    cost = sum(PASS_COST_TOKENS + len(mb) * max(lengths[i] for i in mb) for mb in packed)
    assert cost < PASS_COST_TOKENS + 5 * 100  # the greedy fill's one pass


def encoded(task: str, n: int = 24, seed: int = 0) -> Encoded:
    rng = random.Random(seed)
    ids = [[rng.randrange(4, VOCAB) for _ in range(rng.randint(3, 20))] for _ in range(n)]
    if task == "classify":
        return Encoded(ids, [rng.randrange(3) for _ in ids])
    cut = 0 if task == "lm" else 2  # sft: no loss on a two-token prompt
    return Encoded(ids, [[IGNORE] * cut + r[cut:] for r in ids])


def step_gradients(task: str, budget: int) -> tuple[float, dict]:
    model = (tiny_bert() if task == "classify" else tiny_llama()).double()
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear",
                                  task="classify" if task == "classify" else "sft"))
    for m in model.modules():
        if hasattr(m, "lora_B"):
            for lin in m.lora_B.values():
                torch.nn.init.normal_(lin.weight, std=0.1)
    cfg = build_config(options={"batch_size": 3, "grad_accum": 4, "max_length": 20,
                                "micro_batch_tokens": budget, "max_grad_norm": 0,
                                "task": "sft" if task != "classify" else "classify",
                                "data": "instructions" if task != "classify" else "tickets"})
    enc = encoded(task)
    loop = Loop(model, cfg, enc, None, 0, Accelerator(cpu=True), None,
                ["a", "b", "c"] if task == "classify" else None)
    grads = {}

    def snapshot():
        grads.update({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
    loop.optimizer.step = snapshot
    steps = plan_steps(enc.lengths, 3, 4, 0, 0)
    shortest = min(steps, key=lambda s: max(enc.lengths[i] for b in s for i in b))
    loss, _ = loop.train_step(shortest)
    return loss, grads, loop.state.micro_batches


@pytest.mark.parametrize("task", ["classify", "sft", "lm"])
def test_same_step_as_fixed_rows(task):
    fixed_loss, fixed, fixed_passes = step_gradients(task, 0)
    loss, packed, passes = step_gradients(task, 3 * 20)
    assert passes < fixed_passes == 4  # short rows: fewer, larger passes
    assert loss == pytest.approx(fixed_loss, rel=1e-12)
    assert fixed.keys() == packed.keys() and fixed
    for name in fixed:
        assert torch.allclose(packed[name], fixed[name], rtol=1e-9, atol=1e-12), name


def test_budget_below_the_longest_row_is_refused(tmp_path, capsys):
    model = save_tiny(tmp_path, "bert")
    data = write_csv(tmp_path / "d.csv", class_rows(40))
    capsys.readouterr()
    code = cli("train", "--model", model, "--data", data, "--micro-batch-tokens", "3",
               "--output", tmp_path / "run", "--quiet", "--max-steps", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "smaller than the longest training row" in err[0] and "--max-length" in err[0]
    assert not (tmp_path / "run" / "adapter").exists()
    assert cli("train", "--micro-batch-tokens", "-1", "--output", tmp_path / "r2") == 2
    assert "micro_batch_tokens must be >= 0" in capsys.readouterr().err


def test_metrics_report_passes_and_padding(tmp_path):
    import json

    model = save_tiny(tmp_path, "bert")
    data = write_csv(tmp_path / "d.csv", class_rows(60))
    assert cli("train", "--model", model, "--data", data, "--batch-size", "4", "--grad-accum",
               "4", "--max-steps", "2", "--output", tmp_path / "run", "--quiet") == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["micro_batch_tokens"] == 4 * 128
    assert 1 <= m["micro_batches_per_step"] < 4
    assert m["padded_tokens"] >= m["train_tokens"] > 0


def test_expected_time_is_printed_early_and_close_to_the_measured(tmp_path, capsys):
    """The forecast after the first steps is within a factor of 2 of the
    measured training time (a tiny model: a correctness bound, not speed)."""
    import json

    model = save_tiny(tmp_path, "bert")
    data = write_csv(tmp_path / "d.csv", class_rows(120))
    capsys.readouterr()
    assert cli("train", "--model", model, "--data", data, "--batch-size", "4", "--max-steps",
               "24", "--output", tmp_path / "run", "--eval-every", "100") == 0
    err = capsys.readouterr().err
    assert "expected training time:" in err and "for 24 steps" in err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.5 <= m["expected_train_seconds"] / m["train_seconds"] <= 2.0
