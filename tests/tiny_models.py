"""Tiny models built from configs (hidden 32-64, 2 layers): no downloads."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128


def padded_batch(vocab: int, pad_id: int | None = None) -> dict:
    """Three rows of 9 token ids, two of them padded (3 and 6 real tokens):
    exercises the attention mask. ``pad_id`` fills the padded positions."""
    ids = torch.randint(4, vocab, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    if pad_id is not None:
        ids[mask == 0] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


def tiny_bert(num_labels=3, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen3(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=64)
    return Qwen3ForCausalLM(cfg).eval()


BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama, "qwen3": tiny_qwen3}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def randomize_adapters(model, adapter="default", seed=1, std=0.1):
    """Give B (and head copies) nonzero values so an adapter changes outputs."""
    from loralab.lora import LoRALinear, ModulesToSave

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear) and adapter in m.lora_B:
                w = m.lora_B[adapter].weight
                w.copy_(torch.randn(w.shape, generator=gen) * std)
            if isinstance(m, ModulesToSave) and adapter in m.modules_to_save:
                for p in m.modules_to_save[adapter].parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * std)
