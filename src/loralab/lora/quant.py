"""QLoRA base layers: bitsandbytes NF4 with double quantization.

NF4 (4-bit NormalFloat) with blocksize 64 and double quantization of the
absmax constants (8-bit, second-level blocksize 256) costs 4 + 0.127 bits per
parameter (Dettmers et al., 2023, QLoRA §3). Norms, embeddings and the output
head stay in full precision; LoRA adapters sit on top in the compute dtype.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from loralab.lora.base import is_4bit, is_conv1d, is_linear, replace_module


def _drop_kernels_notice(record: logging.LogRecord) -> bool:
    """bitsandbytes' CPU backend logs, at import, that the optional ``kernels``
    package (a faster bf16 gemm from the Hub) is missing: a warning on every
    QLoRA run that asks nothing of the user (loralab dequantizes to the compute
    dtype on CPU anyway, see ``quantize_linear``). Other messages pass."""
    return "from kernels-community" not in str(record.msg)


# installed before anything imports bitsandbytes (it logs while importing)
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernels_notice)

NF4_BLOCKSIZE = 64  # QLoRA §3: blocksize 64 for the weights
# bitsandbytes' second-level (double quant) blocksize is fixed at 256.


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The float (out, in) weight a bnb Linear4bit computes with."""
    import bitsandbytes.functional as F

    weight = module.weight
    state = weight.quant_state
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        data, state = _convert_weight_packed_for_cpu_inverse(data, state)
    return F.dequantize_4bit(data, state)


def quantize_linear(linear: nn.Module, compute_dtype=torch.float32) -> nn.Module:
    """An NF4 + double-quant ``Linear4bit`` holding ``linear``'s weights."""
    import bitsandbytes as bnb

    weight = linear.weight.data
    if is_conv1d(linear):  # GPT-2 stores (in, out)
        weight = weight.T
    out_features, in_features = weight.shape
    device = weight.device if weight.device.type != "meta" else torch.device("cpu")
    q = bnb.nn.Linear4bit(
        in_features, out_features, bias=linear.bias is not None,
        compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
        device="meta",
    )
    q.weight = bnb.nn.Params4bit(
        weight.contiguous().to(compute_dtype), requires_grad=False, blocksize=NF4_BLOCKSIZE,
        compress_statistics=True, quant_type="nf4", module=q,
    ).to(device)  # moving to a device quantizes
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
    # bitsandbytes' CPU inference path repacks the weights for a bf16 kernel,
    # so eval outputs would differ from training's dequantize-then-matmul in the
    # compute dtype (by ~1e-2 here) and bf16 is slow on CPUs without native bf16.
    # Keep one path: the dequantized weights in the compute dtype.
    q.support_avx512bf16_for_cpu = False
    return q


def quantize_model_4bit(model: nn.Module, compute_dtype=torch.float32,
                        skip: tuple[str, ...] | None = None) -> int:
    """Replace every linear layer except those named in ``skip`` by NF4 layers,
    in place (default: the output heads). Returns how many layers were quantized."""
    from loralab.models import OUTPUT_HEADS

    skip = OUTPUT_HEADS if skip is None else skip
    count = 0
    for name, module in list(model.named_modules()):
        if not is_linear(module) or is_4bit(module):
            continue
        if any(name == s or name.startswith(s + ".") or name.endswith("." + s) for s in skip):
            continue
        replace_module(model, name, quantize_linear(module, compute_dtype))
        count += 1
    model.loralab_quantized = True
    return count


def dequantize_linear(module: nn.Module) -> nn.Linear:
    """A float nn.Linear with a Linear4bit's dequantized weights."""
    weight = dequantize_weight(module)  # (out, in)
    dtype = getattr(module, "compute_dtype", None) or torch.float32
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None,
                       device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if module.bias is not None:
            linear.bias.copy_(module.bias.to(dtype))
    return linear


def dequantize_model(model: nn.Module) -> int:
    """Replace every Linear4bit by its float equivalent, in place."""
    count = 0
    for name, module in list(model.named_modules()):
        if is_4bit(module):
            replace_module(model, name, dequantize_linear(module))
            count += 1
    model.loralab_quantized = False
    return count


def quantized_bytes(module: nn.Module) -> int:
    """Bytes a Linear4bit really holds: packed weights plus quantization constants."""
    weight = module.weight
    total = weight.data.numel() * weight.data.element_size()
    state = weight.quant_state
    tensors = [state.absmax, state.code]
    if state.nested and state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code]
    if getattr(state, "offset", None) is not None:
        tensors.append(state.offset)
    return total + sum(t.numel() * t.element_size() for t in tensors if t is not None)
