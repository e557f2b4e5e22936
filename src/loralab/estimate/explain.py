"""Why published memory tables disagree, reproduced with the estimator.

For a "7B" model the tables quote 84, 112 or 168 GB for full fine-tuning and
4-6 GB for QLoRA. Each is bytes-per-parameter times a nominal 7e9, under one
set of assumptions; the rows below compute each set with the estimator on the
exact model (Llama-2-7B has 6.74e9 parameters, not 7e9).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from loralab.estimate.estimator import Estimator
from loralab.estimate.formula import EstimateConfig, Precision
from loralab.estimate.spec import ModelSpec

NOMINAL_PARAMS = 7 * 10**9

# Counting every copy mixed precision can hold at once: fp32 weights and a
# bf16 working copy, fp32 and bf16 gradients, a separate fp32 master copy.
ALL_COPIES = Precision("fp32+bf16 copies", 4 + 2, 4 + 2, 4, 2,
                       "fp32 and bf16 copies of weights and gradients, plus an fp32 master")


@dataclass
class Scenario:
    label: str  # the number it explains
    assumption: str
    cfg: EstimateConfig
    states_only: bool  # the table counts weights + gradients + optimizer only


def scenarios(batch: int = 1, seq: int = 512) -> list[Scenario]:
    base = EstimateConfig(method="full", batch_size=batch, seq_len=seq, device="cuda")
    qlora = replace(base, method="qlora", precision="bf16-mixed", rank=16,
                    targets="all-linear", grad_checkpointing=True)
    shape = f"batch {batch} x {seq}"
    return [
        Scenario("84 GB", "bf16 weights + bf16 gradients + fp32 AdamW m, v = 12 B/param",
                 replace(base, precision="bf16"), True),
        Scenario("112 GB", "fp32 weights + fp32 gradients + fp32 AdamW = 16 B/param",
                 replace(base, precision="fp32"), True),
        Scenario("112 GB", "bf16 weights + gradients, fp32 master + AdamW (ZeRO) = 16 B/param",
                 replace(base, precision="bf16-mixed"), True),
        Scenario("168 GB", "every copy counted: fp32 + bf16 weights, fp32 + bf16 gradients, "
                 "fp32 master, AdamW = 24 B/param", replace(base, precision=ALL_COPIES), True),
        Scenario("~16 GB", f"LoRA r=8 on attention over a bf16 base, {shape}",
                 replace(base, method="lora", precision="bf16-mixed"), False),
        Scenario("4-6 GB", f"QLoRA r=16 on all linear layers, NF4 base, bf16 compute, "
                 f"gradient checkpointing, {shape}", qlora, False),
        Scenario("4-6 GB", "the same with the paper's r=64 (QLoRA §4: every linear layer)",
                 replace(qlora, rank=64), False),
        Scenario("4-6 GB", "the same r=16 without gradient checkpointing",
                 replace(qlora, grad_checkpointing=False), False),
    ]


def explain_rows(spec: ModelSpec, batch: int = 1, seq: int = 512) -> list[dict]:
    """One row per scenario: bytes per parameter, nominal and exact sizes."""
    rows = []
    for sc in scenarios(batch, seq):
        est = Estimator(spec, sc.cfg).at()
        b, total_params = est.bytes, est.params["total"]
        states = b["weights"] + b["master_weights"] + b["gradients"] + b["optimizer"]
        per_param = states / total_params
        rows.append({
            "published": sc.label, "assumption": sc.assumption,
            "bytes_per_param": round(per_param, 3),
            "nominal_7b_bytes": int(per_param * NOMINAL_PARAMS) if sc.states_only else None,
            "states_bytes": int(states), "peak_bytes": int(b["total"]),
            "activations_bytes": int(b["activations"] + b["logits"]),
            "states_only": sc.states_only,
        })
    return rows


def activation_batch_for(spec: ModelSpec, target: int, seq: int = 512) -> int:
    """The batch at which fp32 AdamW (16 B/param) plus activations reaches ``target``:
    the other reading of "168 GB" (states plus activations at some batch)."""
    cfg = EstimateConfig(method="full", precision="fp32", seq_len=seq, batch_size=1,
                         device="cuda")
    return Estimator(spec, cfg).max_batch_size(target)
