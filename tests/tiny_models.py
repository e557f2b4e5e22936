"""Tiny models built from configs (hidden 32-64, 2 layers): no downloads."""

from __future__ import annotations

import copy

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


def dequantized_twin(qmodel, float_model):
    """A float copy of ``float_model`` whose 4-bit layers carry qmodel's dequantized weights:
    the reference a QLoRA model must equal."""
    from loralab.lora.quant import dequantize_weight, is_4bit

    ref = copy.deepcopy(float_model)
    for name, module in qmodel.named_modules():
        if is_4bit(module):
            with torch.no_grad():
                ref.get_submodule(name).weight.copy_(dequantize_weight(module))
    return ref


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


# -- the architecture matrix: one tiny random model per popular architecture --
# model_type -> (config class, config kwargs, "encoder" | "decoder"). Hidden 32,
# one layer: the matrix checks that every command runs, not what a model learns.
# Encoders get minilm's WordPiece tokenizer (30,522 ids), decoders smollm2's
# GPT-2-style BPE (49,152 ids, embeddings tied): real tokenizers, small weights.
_DEC = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
        "max_position_embeddings": 128, "tie_word_embeddings": True}
_ENC = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "max_position_embeddings": 128,
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
ARCHS = {
    "bert": ("BertConfig", _ENC, "encoder"),
    "roberta": ("RobertaConfig", _ENC, "encoder"),
    "xlm-roberta": ("XLMRobertaConfig", _ENC, "encoder"),
    "distilbert": ("DistilBertConfig", {"dim": 32, "hidden_dim": 64, "n_layers": 1,
                                        "n_heads": 2, "max_position_embeddings": 128,
                                        "dropout": 0.0, "attention_dropout": 0.0}, "encoder"),
    "deberta-v2": ("DebertaV2Config", _ENC, "encoder"),
    "electra": ("ElectraConfig", {**_ENC, "embedding_size": 32}, "encoder"),
    "modernbert": ("ModernBertConfig", {"hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 1, "num_attention_heads": 2,
                                        "max_position_embeddings": 128,
                                        "global_attn_every_n_layers": 1}, "encoder"),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 128,
                            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
             "decoder"),
    "llama": ("LlamaConfig", _DEC, "decoder"),
    "mistral": ("MistralConfig", _DEC, "decoder"),
    "qwen2": ("Qwen2Config", _DEC, "decoder"),
    "qwen3": ("Qwen3Config", _DEC, "decoder"),
    "gemma2": ("Gemma2Config", _DEC, "decoder"),
    "gemma3_text": ("Gemma3TextConfig", _DEC, "decoder"),
    "phi3": ("Phi3Config", _DEC, "decoder"),
    "olmo2": ("Olmo2Config", _DEC, "decoder"),
    "qwen3_moe": ("Qwen3MoeConfig", {**_DEC, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 16}, "decoder"),
}


def arch_config(arch: str, tokenizer):
    """The tiny config of ``arch``, its vocabulary and special ids from ``tokenizer``."""
    import transformers

    cls_name, kwargs, _ = ARCHS[arch]
    ids = {"pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id or tokenizer.cls_token_id,
           "eos_token_id": tokenizer.eos_token_id or tokenizer.sep_token_id}
    if arch == "modernbert":
        ids.update(cls_token_id=tokenizer.cls_token_id, sep_token_id=tokenizer.sep_token_id)
    return getattr(transformers, cls_name)(vocab_size=len(tokenizer), **ids, **kwargs)


def save_arch(root, arch: str, seed: int = 0):
    """Save a tiny random ``arch`` model + real tokenizer to ``root/arch`` (once).

    Encoders are saved as the bare backbone (the commands add the head they
    need), decoders as ``*ForCausalLM``. A decoder's tokenizer is saved without
    a pad token, as Llama's and many others ship: loralab must fall back to EOS.
    """
    from pathlib import Path

    from transformers import AutoModel, AutoModelForCausalLM

    from loralab.models import load_tokenizer

    out = Path(root) / arch
    if (out / "config.json").exists():
        return out
    kind = ARCHS[arch][2]
    tok = load_tokenizer("minilm" if kind == "encoder" else "smollm2-135m")
    cfg = arch_config(arch, tok)
    torch.manual_seed(seed)
    model = (AutoModelForCausalLM if kind == "decoder" else AutoModel).from_config(cfg)
    if kind == "decoder":
        model.config.pad_token_id = None
        tok.pad_token = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
