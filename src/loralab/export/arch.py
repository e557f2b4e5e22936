"""Per-architecture facts for GGUF: which llama.cpp architecture a Hugging Face
``model_type`` becomes, the hyperparameters llama.cpp reads, and the tensor
transforms its kernels expect.

Each rule follows llama.cpp's own converter (convert_hf_to_gguf.py, classes
``LlamaModel``, ``Qwen2Model``, ``Qwen3Model``, ``Gemma2Model``):

- Llama / Mistral (arch ``llama``): llama.cpp applies RoPE to adjacent pairs,
  HF's ``rotate_half`` to the two halves of each head, so q and k rows are
  permuted per head (``LlamaModel.permute``); transformers' GGUF reader undoes it.
- Qwen2 / Qwen3 use NeoX-style RoPE in llama.cpp (halves, as HF): no
  permutation; Qwen2's q/k/v biases and Qwen3's q/k norms map by name.
- Gemma 2: HF's RMSNorm computes ``x * (1 + w)``, llama.cpp ``x * w``, so every
  norm weight is written as ``w + 1``; the head is always tied to the embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loralab.errors import LoralabError


@dataclass(frozen=True)
class Arch:
    gguf_arch: str  # a gguf.MODEL_ARCH member name
    tensor_fn: Callable  # (hf_name, tensor, config) -> tensor
    params_fn: Callable  # (writer, config) -> None: arch-specific keys


def _rope(config) -> dict:
    """RoPE parameters in either transformers layout (v5 ``rope_parameters``,
    v4 ``rope_theta`` + ``rope_scaling``)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict):
        params = {**scaling, **params}
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rotate-half rows -> interleaved pairs, per head (llama.cpp ``LlamaModel.permute``)."""
    # (n_head * d, in) -> (n_head, 2, d/2, in) -> swap -> (n_head, d/2, 2, in)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _llama_tensor(name: str, w: torch.Tensor, config) -> torch.Tensor:
    if name.endswith(("q_proj.weight", "q_proj.bias")):  # rows and biases alike
        return permute_qk(w, config.num_attention_heads)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_qk(w, config.num_key_value_heads or config.num_attention_heads)
    return w


def _plain_tensor(name: str, w: torch.Tensor, config) -> torch.Tensor:
    return w


def _gemma_tensor(name: str, w: torch.Tensor, config) -> torch.Tensor:
    return w + 1 if name.endswith("norm.weight") else w


def _llama_params(writer, config) -> None:
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))


def _gemma2_params(writer, config) -> None:
    """llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads)
    for its 46-layer (27B) model, whatever ``query_pre_attn_scalar`` says."""
    expected = (config.hidden_size // config.num_attention_heads
                if config.num_hidden_layers == 46 else head_dim(config))
    if config.query_pre_attn_scalar != expected:
        raise LoralabError(
            f"this Gemma 2 config has query_pre_attn_scalar={config.query_pre_attn_scalar}, "
            f"but llama.cpp scales queries by 1/sqrt({expected}).",
            hint="Fix: only Gemma 2 configs with query_pre_attn_scalar = head_dim (2B, 9B) "
            "or the 27B layout export faithfully.")
    if config.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)


ARCHS = {
    "llama": Arch("LLAMA", _llama_tensor, _llama_params),
    "mistral": Arch("LLAMA", _llama_tensor, _llama_params),
    "qwen2": Arch("QWEN2", _plain_tensor, lambda w, c: None),
    "qwen3": Arch("QWEN3", _plain_tensor, lambda w, c: None),
    "gemma2": Arch("GEMMA2", _gemma_tensor, _gemma2_params),
}


def arch_for(config) -> Arch:
    model_type = getattr(config, "model_type", "?")
    if model_type not in ARCHS:
        raise LoralabError(
            f"GGUF export does not support architecture '{model_type}'.",
            hint="Fix: supported are " + ", ".join(ARCHS)
            + " (Llama, SmolLM2 and Mistral are 'llama'/'mistral').")
    return ARCHS[model_type]


def write_hparams(writer, config, file_type: int) -> None:
    """The keys llama.cpp reads (``TextModel.set_gguf_parameters`` + the arch's own)."""
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "head_dim", None):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(file_type)
    _write_rope(writer, config)
    arch_for(config).params_fn(writer, config)


def _write_rope(writer, config) -> None:
    import gguf

    rope = _rope(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind in ("default", "llama3"):  # llama3: factors go in the rope_freqs tensor
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    else:
        raise LoralabError(f"GGUF export does not handle RoPE scaling '{kind}'.",
                           hint="Fix: supported RoPE types are default, linear, llama3, yarn.")


def extra_tensors(config) -> dict[str, torch.Tensor]:
    """Llama 3.x RoPE: llama.cpp reads per-frequency factors from a
    ``rope_freqs`` tensor (``LlamaModel.generate_extra_tensors``)."""
    rope = _rope(config)
    if rope["rope_type"] != "llama3":
        return {}
    dim = head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, old_ctx = rope.get("factor", 8.0), rope.get("original_max_position_embeddings", 8192)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": torch.tensor(factors, dtype=torch.float32)}
