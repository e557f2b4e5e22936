"""Activation memory of one training step: the layer programs run on a tape.

Without gradient checkpointing every layer's saved tensors live until its
backward. With it (transformers wraps each decoder/encoder layer), only each
layer's input is kept, plus the saved tensors of the one layer being
recomputed in the backward (Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost"; Korthikanti et al. 2022 §4.2).

A pass holds ``tokens`` tokens (the micro-batch token budget, ``rows x seq``
by default): every per-token term scales with it, the attention scores with
the sequence length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loralab.estimate.layers import LAYERS, Arch, embeddings, head
from loralab.estimate.tape import FP32, Regime, Tape

CAUSAL_TASKS = ("sft", "lm")


@dataclass
class LossTerm:
    """The causal-LM loss's own memory, per pass.

    Plain path (``lm_loss.plain_loss_sum``): fp32 log-probabilities of the
    (B, T, V) logits and, when the backward starts, their gradient and the
    logits' gradient next to them (3 x fp32 per vocab entry), plus the int64
    labels. Chunked path (``lm_loss.chunked_loss_sum``): the gradient of the
    gathered hidden rows of the N labelled positions (the rows and the targets
    are saved tensors, on the tape), and one chunk of at most
    ``CHUNK_ELEMENTS`` logits at a time: where the chunks' gradients are taken
    in the forward (``lm_loss.grads_in_forward``: a head whose trainable
    weights are small), its fp32 logits and the log-softmax turned in place
    into their gradient; else, in the backward's recompute, the log-softmax,
    their gradient and the logits' gradient, and each chunk's checkpoint keeps
    the CPU RNG state (``preserve_rng_state``, ~5 KB, host memory: counted on
    CPU). The soft-cap's tanh output adds one copy where there is one. The head's weight gradients held from the forward (at most
    ``GRADS_IN_FORWARD_ELEMENTS``) are left out, as the gradients are."""

    per_token: float = 0.0  # plain path: bytes per token
    per_row: float = 0.0  # chunked: bytes per labelled position
    chunk_rows: int = 0  # chunked: rows of one chunk
    per_chunk_row: float = 0.0  # chunked: bytes per row of the live chunk
    per_chunk: int = 0  # chunked: the RNG state each checkpointed chunk stashes

    def bytes(self, tokens: int, seq: int) -> float:
        if not self.chunk_rows:
            return tokens * self.per_token
        labelled = tokens * (seq - 1) / seq  # position t predicts token t + 1
        chunks = math.ceil(labelled / self.chunk_rows)
        return (labelled * self.per_row + min(labelled, self.chunk_rows) * self.per_chunk_row
                + chunks * self.per_chunk)


@dataclass
class Activations:
    per_token_layers: list[float]  # bytes each layer saves per token
    per_token_outside: float  # embeddings + final norm + head, per token
    per_token_mask: float  # the attention mask shared by all layers
    loss: LossTerm  # live logits, fp32 log-probs and their gradient
    layer_input_per_token: float  # what a checkpointed layer keeps
    per_position: float = 0.0  # RoPE cos/sin, shared by the batch and all layers
    fixed_layers: tuple = ()  # bytes each layer saves whatever the tokens (W + BA)

    def total(self, tokens: int, seq: int, grad_checkpointing: bool) -> dict:
        fixed = self.fixed_layers or (0.0,)
        if grad_checkpointing:
            layers = (len(self.per_token_layers) * self.layer_input_per_token
                      + max(self.per_token_layers, default=0.0))
            fixed = max(fixed)
        else:
            layers = sum(self.per_token_layers)
            fixed = sum(fixed)
        outside = self.per_token_outside + self.per_token_mask
        return {"activations": tokens * (layers + outside) + seq * self.per_position + fixed,
                "logits": self.loss.bytes(tokens, seq)}


def loss_term(arch: Arch, regime: Regime, rg: bool) -> LossTerm:
    """What the causal-LM loss keeps, as ``loralab train`` computes it."""
    if not rg:
        return LossTerm()
    if not arch.chunked:
        return LossTerm(per_token=arch.vocab * 3 * FP32 + 8)
    import torch

    from loralab.train import lm_loss

    head = arch.names["head"]
    held = (arch.vocab * arch.hidden if regime.trainable(head)
            else regime.rank * (arch.hidden + arch.vocab) if regime.lora(head) else 0)
    in_forward = held <= lm_loss.GRADS_IN_FORWARD_ELEMENTS  # no checkpoints, no RNG states
    copies = (2 if in_forward else 3) + (1 if arch.final_softcap else 0)
    return LossTerm(per_row=arch.hidden * regime.act_bytes,
                    chunk_rows=max(1, lm_loss.CHUNK_ELEMENTS // arch.vocab),
                    per_chunk_row=copies * FP32 * arch.vocab,
                    # the stashed CPU RNG state lives in host memory: CPU runs only
                    per_chunk=torch.get_rng_state().numel()
                    if regime.device == "cpu" and not in_forward else 0)


def count_activations(arch: Arch, regime: Regime, task: str, num_labels: int) -> Activations:
    """Bytes per token saved for backward, layer by layer, for ``regime``."""
    tape = Tape(regime)
    x = embeddings(tape, arch)
    outside = tape.bytes()
    per_layer, fixed = [], []
    layer = LAYERS[arch.family]
    for i in range(arch.layers):
        before, tape.fixed = tape.bytes(), 0.0
        x = layer(tape, arch, x, f"{arch.layer_prefix}.{i}.")
        per_layer.append(tape.bytes() - before)
        fixed.append(tape.fixed)
    before = tape.bytes()
    out = head(tape, arch, x, task, num_labels, regime.seq)
    outside += tape.bytes() - before
    if task == "classify" and out.rg:
        # cross-entropy on (B, labels): fp32 log-probabilities and int64 labels
        outside += (num_labels * FP32 + 8) / regime.seq
    loss = loss_term(arch, regime, out.rg) if task in CAUSAL_TASKS else LossTerm()
    mask = 0.0
    if regime.padded and regime.attn_impl == "sdpa" and regime.device == "cuda":
        mask = regime.seq * 1.0  # one bool (B, 1, T, T) mask shared by all layers
    rope = 0.0
    if arch.family in ("llama", "gemma", "olmo2", "phi3", "modernbert") and sum(per_layer):
        rope = 2 * arch.head_dim * regime.act_bytes  # cos and sin, (1, T, d) each
    return Activations(per_layer, outside, mask, loss, arch.hidden * regime.act_bytes, rope,
                       tuple(fixed) if any(fixed) else ())
