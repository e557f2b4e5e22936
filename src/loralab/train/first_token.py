"""The last encoder layer, computed only where a classification head reads it.

The sequence-classification heads of BERT-family encoders (BERT, RoBERTa,
XLM-R, CamemBERT, ELECTRA) read one position of the last layer's output: the
first token, ``[CLS]``/``<s>``. Every other position of that layer is computed
and thrown away. Here the last layer runs its query, attention, output and
feed-forward for the first position only; its keys and values still see every
position. The logits are the same arithmetic (equal to float rounding, tested)
and so are the gradients that reach the weights; dropout in that layer draws
its masks for the one position it keeps, so a seeded run draws different masks
than the full layer would.

It skips most of the last layer's linear work, which a CPU step pays in full
(BENCHMARKS.md, "CPU training changes: what each saved"). It is installed on
loralab's own model instance (training and ``loralab eval``), which is only
asked for logits; other models, heads that read other positions (decoder
classifiers read the last token), cross-attention, feed-forward chunking and
attention kernels other than eager/SDPA are left alone.
"""

from __future__ import annotations

import sys
import types
from functools import partial

import torch

from loralab.train.attention import NAME as LORALAB_SDPA

HEADS = frozenset({
    "BertForSequenceClassification", "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification", "CamembertForSequenceClassification",
    "ElectraForSequenceClassification",
})
ATTENTION = frozenset({"eager", "sdpa", LORALAB_SDPA})


def _last_layer(model) -> torch.nn.Module | None:
    """The encoder's last layer if it can run for the first token only."""
    if type(model).__name__ not in HEADS:
        return None
    config = model.config
    if (config.is_decoder or getattr(config, "add_cross_attention", False)
            or getattr(config, "chunk_size_feed_forward", 0)
            or getattr(config, "position_embedding_type", "absolute") != "absolute"):
        return None
    encoder = getattr(getattr(model, model.base_model_prefix, None), "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not layers:
        return None
    layer = layers[-1]
    attention = getattr(layer, "attention", None)
    parts = (getattr(attention, "self", None), getattr(attention, "output", None),
             getattr(layer, "intermediate", None), getattr(layer, "output", None))
    if any(p is None for p in parts) or "forward" in vars(layer):  # hooked by someone else
        return None
    attn = parts[0]
    if not all(hasattr(attn, n) for n in ("query", "key", "value", "attention_head_size",
                                           "scaling", "dropout")):
        return None
    return layer if _supported(layer) else None


def _supported(layer) -> bool:
    """Attention this layer's first-token forward can call (it can change after install)."""
    return layer.attention.self.config._attn_implementation in ATTENTION


def use_first_token_only(model) -> bool:
    """Run ``model``'s last encoder layer for the first position only; True if it did."""
    layer = _last_layer(model)
    if layer is None:
        return False
    layer.forward = types.MethodType(_layer_forward, layer)
    return True


def _layer_forward(self, hidden_states, *args, **kwargs):
    if not _supported(self):  # e.g. switched to flash attention later: the whole layer
        return type(self).forward(self, hidden_states, *args, **kwargs)
    # the class's own forward checkpoints itself; this one takes over that part
    if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
        return self._gradient_checkpointing_func(partial(_first_token, self, **kwargs),
                                                 hidden_states, *args)
    return _first_token(self, hidden_states, *args, **kwargs)


def _first_token(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                 encoder_attention_mask=None, cache=None, **kwargs):
    """The layer's output at position 0: (B, T, H) in, (B, 1, H) out."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = self.attention.self
    b, t = hidden_states.shape[:2]
    d = attn.attention_head_size
    first = hidden_states[:, :1]  # (B, 1, H)
    query = attn.query(first).view(b, 1, -1, d).transpose(1, 2)  # (B, heads, 1, d)
    key = attn.key(hidden_states).view(b, t, -1, d).transpose(1, 2)  # (B, heads, T, d)
    value = attn.value(hidden_states).view(b, t, -1, d).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
        attention_mask = attention_mask[:, :, :1]  # the first query's row: (B, 1, 1, T)
    eager = sys.modules[type(attn).__module__].eager_attention_forward
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
    context, _ = attend(attn, query, key, value, attention_mask,
                        dropout=attn.dropout.p if attn.training else 0.0,
                        scaling=attn.scaling, **kwargs)
    attended = self.attention.output(context.reshape(b, 1, -1), first)  # (B, 1, H)
    return self.output(self.intermediate(attended), attended)
