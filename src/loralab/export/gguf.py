"""Write a merged causal LM as one GGUF file with the ``gguf`` package.

Tensor names come from gguf's own ``get_tensor_name_map``; quantization from
``gguf.quants.quantize``, and for the K-quants gguf cannot write (Q4_K, Q5_K,
Q6_K) from ``loralab.export.kquants``, llama.cpp's reference quantizer. Which
tensor gets which type follows llama.cpp: 1-D tensors (norms, biases) stay F32
(``convert_hf_to_gguf.py`` ``prepare_tensors``); the rest as
``llama-quantize`` mixes them without an importance matrix
(``llama_tensor_get_type``): the output matrix (the embedding when the two are
tied) at Q6_K, at Q8_0 where its rows do not divide into 256-value blocks;
for Q4_K_M / Q5_K_M, attn_v and ffn_down of the first and last eighth of the
layers and every third between at Q6_K; for Q4_K_S, attn_v of the first four
layers and ffn_down of the first eighth at Q5_K; a K-quant matrix whose rows
do not divide into 256 falls back as llama.cpp's does (Q4_K to Q5_0, Q5_K to
Q5_1, Q6_K to Q8_0), and any matrix whose rows do not divide into its type's
blocks to F16.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loralab.errors import LoralabError
from loralab.export import kquants
from loralab.export.arch import arch_for, extra_tensors, write_hparams
from loralab.export.vocab import write_vocab

# --quant name -> (GGMLQuantizationType of the matrices, LlamaFileType), by name
QUANTS = {
    "f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q6_k": ("Q6_K", "MOSTLY_Q6_K"),
    "q5_k_m": ("Q5_K", "MOSTLY_Q5_K_M"), "q4_k_m": ("Q4_K", "MOSTLY_Q4_K_M"),
    "q4_k_s": ("Q4_K", "MOSTLY_Q4_K_S"), "q5_k_s": ("Q5_K", "MOSTLY_Q5_K_S"), "q3_k_m": ("Q3_K", "MOSTLY_Q3_K_M"),
    "q2_k": ("Q2_K", "MOSTLY_Q2_K"),
}
LOSSLESS = ("f32", "f16", "bf16")  # checked as logits equal to float rounding
# llama.cpp's type for a K-quant matrix whose rows do not divide into 256
_K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def quantize(data: np.ndarray, qtype) -> np.ndarray:
    """``data`` as ``qtype``'s bytes: gguf's quantizer, or loralab's K-quants."""
    import gguf

    if qtype.name in kquants.BLOCKS:
        return kquants.quantize(data, qtype.name)
    return gguf.quants.quantize(data, qtype)


def _can_quantize(qtype) -> bool:
    import gguf

    if qtype.name in kquants.BLOCKS:
        return True
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    try:
        gguf.quants.quantize(np.zeros((1, max(block, 256)), dtype=np.float32), qtype)
        return True
    except NotImplementedError:
        return False


def supported_quants() -> list[str]:
    """The --quant names that can be written: gguf's quantizers (probed, so a
    newer package that learns Q3_K or Q2_K widens the list by itself) and
    loralab's K-quants."""
    import gguf

    return [q for q, (t, _) in QUANTS.items() if _can_quantize(gguf.GGMLQuantizationType[t])]


def check_quant(quant: str) -> str:
    from importlib.metadata import version

    quant = quant.lower()
    ok = supported_quants()
    if quant in ok:
        return quant
    why = (f"the installed gguf package ({version('gguf')}) cannot quantize {QUANTS[quant][0]}"
           if quant in QUANTS else "unknown type")
    raise LoralabError(f"--quant {quant}: {why}.",
                       hint=f"Fix: use one of {', '.join(ok)}; for other types, export f16 "
                       "and run llama.cpp's `llama-quantize FILE.gguf OUT.gguf TYPE`.")


@dataclass
class Planned:
    gguf_name: str
    hf_name: str | None  # None for generated tensors (rope_freqs)
    shape: tuple[int, ...]
    qtype: object  # GGMLQuantizationType

    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return rows * (self.shape[-1] // block) * size


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth, every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _mixed_type(gguf_name: str, quant: str, base: str, n_layers: int, tied: bool) -> str:
    """The type llama-quantize gives this matrix at ``quant`` (see the module doc)."""
    if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
        return base if base == "Q8_0" else "Q6_K"
    m = re.match(r"blk\.(\d+)\.", gguf_name)
    if m is None:
        return base
    layer = int(m.group(1))
    if ".attn_v." in gguf_name:
        if quant in ("q4_k_m", "q5_k_m") and _more_bits(layer, n_layers):
            return "Q6_K"
        if quant == "q4_k_s" and layer < 4:
            return "Q5_K"
    elif ".ffn_down" in gguf_name:
        if quant in ("q4_k_m", "q5_k_m") and _more_bits(layer, n_layers):
            return "Q6_K"
        if quant == "q4_k_s" and layer < n_layers // 8:
            return "Q5_K"
    return base


def _tensor_type(gguf_name: str, shape, quant: str, n_layers: int, tied: bool):
    import gguf

    T = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return T.F32
    base = QUANTS[quant][0]
    name = base if quant in LOSSLESS else _mixed_type(gguf_name, quant, base, n_layers, tied)
    if name in _K_FALLBACK and shape[-1] % kquants.QK_K:
        name = _K_FALLBACK[name]
    qtype = T[name]
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return T.F16
    return qtype


def _tied(model) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is None or out.weight is emb.weight or torch.equal(out.weight, emb.weight)


def plan_tensors(model, quant: str) -> list[Planned]:
    import gguf

    config = model.config
    arch = getattr(gguf.MODEL_ARCH, arch_for(config).gguf_arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    skip_head = _tied(model)
    n_layers = config.num_hidden_layers
    plan = []
    for hf_name, t in model.state_dict().items():
        if skip_head and hf_name == "lm_head.weight":
            continue  # tied: llama.cpp reads the head from token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LoralabError(f"no GGUF name for tensor '{hf_name}' ({config.model_type}).",
                               hint="Fix: this model has layers the GGUF architecture lacks.")
        plan.append(Planned(name, hf_name, tuple(t.shape),
                            _tensor_type(name, t.shape, quant, n_layers, skip_head)))
    for name, t in extra_tensors(config).items():
        plan.append(Planned(name, None, tuple(t.shape), gguf.GGMLQuantizationType.F32))
    return plan


def estimate_bytes(plan: list[Planned], vocab_bytes: int, alignment: int = 32) -> int:
    """Data padded to the alignment, each tensor's info record, the
    tokenizer arrays and chat template, 4 KiB for the other keys."""
    data = sum(-(-p.nbytes() // alignment) * alignment for p in plan)
    infos = sum(len(p.gguf_name) + 8 * len(p.shape) + 24 for p in plan)
    return data + infos + vocab_bytes + 4096


def check_disk(path: Path, need: int) -> None:
    free = shutil.disk_usage(path.parent).free
    if free < need * 1.05 + (16 << 20):
        raise LoralabError(
            f"not enough disk for {path.name}: about {need / 1e6:.1f} MB needed, "
            f"{free / 1e6:.1f} MB free in {path.parent}.",
            hint="Fix: free space, pick another --output directory, or a smaller --quant.")


def _tensor_data(p: Planned, t: torch.Tensor, config) -> np.ndarray:
    t = arch_for(config).tensor_fn(p.hf_name, t.detach().float(), config)
    # (out, in) row-major, as llama.cpp reads it
    return quantize(t.contiguous().numpy(), p.qtype)


def build_writer(model, tok, quant: str, name: str):
    """(writer with metadata, tensor plan, estimated bytes); no tensor data yet."""
    import gguf

    config = model.config
    arch = getattr(gguf.MODEL_ARCH, arch_for(config).gguf_arch)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    write_hparams(writer, config, int(gguf.LlamaFileType[QUANTS[quant][1]]))
    vocab = write_vocab(writer, tok, config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    plan = plan_tensors(model, quant)
    return writer, plan, estimate_bytes(plan, vocab["bytes"]), vocab


def write_gguf(writer, plan: list[Planned], model, path: Path) -> None:
    """Quantize every planned tensor and write ``path`` (a temp file the caller renames)."""
    state = model.state_dict()
    extra = extra_tensors(model.config)
    for p in plan:
        if p.hf_name is None:
            writer.add_tensor(p.gguf_name, extra[p.gguf_name].numpy(), raw_dtype=p.qtype)
            continue
        data = _tensor_data(p, state[p.hf_name], model.config)
        writer.add_tensor(p.gguf_name, data, raw_dtype=p.qtype)  # byte shape -> elements
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def type_counts(plan: list[Planned]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in plan:
        counts[p.qtype.name] = counts.get(p.qtype.name, 0) + 1
    return counts
