"""Activation memory of one training step: the layer programs run on a tape.

Without gradient checkpointing every layer's saved tensors live until its
backward. With it (transformers wraps each decoder/encoder layer), only each
layer's input is kept, plus the saved tensors of the one layer being
recomputed in the backward (Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost"; Korthikanti et al. 2022 §4.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from loralab.estimate.layers import LAYERS, Arch, embeddings, head
from loralab.estimate.tape import FP32, Regime, Tape


@dataclass
class Activations:
    per_token_layers: list[float]  # bytes each layer saves per token
    per_token_outside: float  # embeddings + final norm + head, per token
    per_token_mask: float  # the attention mask shared by all layers
    logits_per_token: float  # live logits, fp32 log-probs and their gradient
    layer_input_per_token: float  # what a checkpointed layer keeps
    per_position: float = 0.0  # RoPE cos/sin, shared by the batch and all layers

    def total(self, batch: int, seq: int, grad_checkpointing: bool) -> dict:
        tokens = batch * seq
        if grad_checkpointing:
            layers = (len(self.per_token_layers) * self.layer_input_per_token
                      + max(self.per_token_layers, default=0.0))
        else:
            layers = sum(self.per_token_layers)
        outside = self.per_token_outside + self.per_token_mask
        return {"activations": tokens * (layers + outside) + seq * self.per_position,
                "logits": tokens * self.logits_per_token}


def count_activations(arch: Arch, regime: Regime, task: str, num_labels: int) -> Activations:
    """Bytes per token saved for backward, layer by layer, for ``regime``."""
    tape = Tape(regime)
    x = embeddings(tape, arch)
    outside = tape.bytes()
    per_layer = []
    layer = LAYERS[arch.family]
    for i in range(arch.layers):
        before = tape.bytes()
        x = layer(tape, arch, x, f"{arch.layer_prefix}.{i}.")
        per_layer.append(tape.bytes() - before)
    before = tape.bytes()
    out = head(tape, arch, x, task, num_labels, regime.seq)
    outside += tape.bytes() - before
    if task == "classify" and out.rg:
        # cross-entropy on (B, labels): fp32 log-probabilities and int64 labels
        outside += (num_labels * FP32 + 8) / regime.seq
    logits = 0.0
    if task == "sft" and out.rg:
        # the loss upcasts to fp32 and keeps the log-probabilities for backward;
        # when the backward starts, the gradients w.r.t. the log-probabilities
        # and w.r.t. the logits exist next to them (3 x fp32 per vocab entry);
        # the int64 labels are kept by the loss
        logits = arch.vocab * 3 * FP32 + 8
    mask = 0.0
    if regime.padded and regime.attn_impl == "sdpa" and regime.device == "cuda":
        mask = regime.seq * 1.0  # one bool (B, 1, T, T) mask shared by all layers
    rope = 0.0
    if arch.family == "llama" and sum(per_layer):
        rope = 2 * arch.head_dim * regime.act_bytes  # cos and sin, (1, T, d) each
    return Activations(per_layer, outside, mask, logits, arch.hidden * regime.act_bytes, rope)
