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
from loralab.data.batching import pack_by_tokens, padded_width
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
    short = sorted(range(len(enc)), key=lambda i: enc.lengths[i])[:12]  # a step of short rows
    loss, _ = loop.train_step([short[i:i + 3] for i in range(0, 12, 3)])
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


def test_forecast_weighs_the_rest_of_the_run_by_its_planned_work(monkeypatch):
    """Steps grouped by length differ in cost. With a clock that charges each
    step its padded tokens plus a fixed cost per pass (and a one-off on the
    first), the forecast from the first steps hits the whole run's time, where
    seconds-per-step x steps would miss it."""
    import types

    from loralab.data.batching import PASS_COST_TOKENS
    from loralab.train import loop as loop_mod

    rng = random.Random(3)  # short and long rows: steps of very different cost
    enc = Encoded([[5] * rng.choice([3, 4, 18, 20]) for _ in range(60)], [0, 1, 2] * 20)
    cfg = build_config(options={"batch_size": 2, "grad_accum": 2, "max_length": 20,
                                "epochs": 2, "max_grad_norm": 0, "quiet": True,
                                "task": "classify", "data": "tickets"})
    loop = Loop(tiny_bert(), cfg, enc, None, 0, Accelerator(cpu=True), None, ["a", "b", "c"])
    clock = [0.0]
    monkeypatch.setattr(loop_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    real_step, costs = loop.train_step, []

    def charged_step(micro):
        rows = [i for idx in micro for i in idx]
        passes = pack_by_tokens(rows, enc.lengths, cfg.micro_batch_tokens, max_passes=len(micro))
        costs.append(sum(PASS_COST_TOKENS + len(p) * max(enc.lengths[i] for i in p)
                         for p in passes))
        clock[0] += 1e-3 * costs[-1] + (0.5 if len(costs) == 1 else 0.0)
        return real_step(micro)
    loop.train_step = charged_step
    loop.fit()
    s = loop.state
    assert s.step == loop.total_steps == len(costs) == 30
    assert max(costs) > 1.5 * min(costs)  # the steps really differ
    assert sum(costs[15:]) != sum(costs[:15])  # each epoch draws its own steps
    rate = 1e-3
    assert s.one_off_seconds == pytest.approx(0.5, rel=1e-9)
    assert s.seconds_per_step == pytest.approx(rate * sum(costs[:15]) / 15, rel=1e-9)
    # the current epoch as planned, the next at its mean
    planned = 0.5 + rate * (sum(costs[:15]) + sum(costs[:15]) / 15 * 15)
    assert s.expected_train_seconds == pytest.approx(planned, rel=1e-9)
    assert s.expected_train_seconds == pytest.approx(clock[0], rel=0.05)
    timed = rate * sum(costs[1:4]) / 3  # what the timed steps alone would give per step
    assert abs(0.5 + timed * 30 - clock[0]) > 0.05 * clock[0]
