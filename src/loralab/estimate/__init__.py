"""Analytical memory estimate for full / LoRA / QLoRA / head fine-tuning.

    spec = load_spec("llama-2-7b")
    est = estimate(spec, EstimateConfig(method="qlora", batch_size=1, seq_len=512))
    est.bytes["total"], est.to_dict()

Nothing is loaded: parameters are counted on the meta device and activations
from per-layer programs of what autograd saves (see ``tape``).
"""

from loralab.estimate.estimator import Estimator, estimate
from loralab.estimate.formula import (
    METHODS,
    OPTIMIZERS,
    PRECISIONS,
    Estimate,
    EstimateConfig,
    Precision,
)
from loralab.estimate.presets import PRESETS, preset_names
from loralab.estimate.spec import ModelSpec, load_spec
from loralab.estimate.units import format_bytes, parse_size

__all__ = [
    "METHODS", "OPTIMIZERS", "PRECISIONS", "PRESETS", "Estimate", "EstimateConfig",
    "Estimator", "ModelSpec", "Precision", "estimate", "format_bytes", "load_spec",
    "parse_size", "preset_names",
]
