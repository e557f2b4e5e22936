"""Memory, measured per run: the process peak plus an exact tensor account.

On CPU the peak is the kernel's high-water mark of resident memory (VmHWM),
reset at the start of a run through /proc/self/clear_refs where the kernel
allows it, else ``ru_maxrss`` (peak since process start). On CUDA it is
``max_memory_allocated``/``max_memory_reserved``. The tensor account counts
every byte of weights (by dtype; bitsandbytes 4-bit weights as their packed
bytes plus their quantization constants), gradients and optimizer state.
"""

from __future__ import annotations

import resource
import sys

import torch


def reset_peak(device: str) -> bool:
    """Start a fresh peak measurement; True when the reset took effect."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # 5: reset the peak RSS (Linux >= 4.0, proc(5))
        return True
    except OSError:
        return False


def _status_bytes(key: str) -> int | None:
    """A kB field of /proc/self/status (``VmHWM``, ``VmRSS``) in bytes, None
    where /proc is absent."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss() -> int | None:
    """This process's resident memory now (VmRSS)."""
    return _status_bytes("VmRSS")


CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def mapped_checkpoint_rss() -> int | None:
    """Resident pages of memory-mapped checkpoint files (/proc/self/smaps): on
    CPU the loaders map the weight files, and QLoRA quantizes from that map,
    whose pages stay resident while the model lives."""
    total, current = 0, False
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's header line
                    path = line.split()[-1] if len(line.split()) >= 6 else ""
                    current = path.endswith(CHECKPOINT_SUFFIXES)
                elif current and head == "Rss:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        return None
    return total


def peak_process_memory(device: str) -> dict:
    if device == "cuda":
        return {"device": "cuda", "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    hwm = _status_bytes("VmHWM")
    if hwm is None:
        scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return {"device": "cpu", "peak_rss_bytes": hwm}


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of an FSDP2 DTensor."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def _quant_state_tensors(qs) -> list[torch.Tensor]:
    """absmax, code and offset of a bnb QuantState, nested state included."""
    out = []
    for attr in ("absmax", "code", "offset"):
        t = getattr(qs, attr, None)
        if isinstance(t, torch.Tensor):
            out.append(t)
    nested = getattr(qs, "state2", None)
    if nested is not None:
        out.extend(_quant_state_tensors(nested))
    return out


def weight_account(model: torch.nn.Module) -> dict:
    """Bytes of parameters and buffers by dtype, each storage counted once."""
    seen: set[int] = set()
    by_dtype: dict[str, int] = {}
    quant_params = 0

    def add(key: str, t: torch.Tensor) -> None:
        t = _local(t)  # per process: a sharded weight counts its shard
        ptr = t.data_ptr()
        if t.numel() == 0 or ptr in seen:
            return
        seen.add(ptr)
        by_dtype[key] = by_dtype.get(key, 0) + _nbytes(t)

    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            kind = getattr(qs, "quant_type", "4bit")
            quant_params += int(torch.Size(qs.shape).numel())
            add(kind, p.data)  # two 4-bit values packed per byte
            for t in _quant_state_tensors(qs):
                add(f"{kind}_quant_state", t)
        else:
            add(str(p.dtype).replace("torch.", ""), p.data)
    for b in model.buffers():
        add(str(b.dtype).replace("torch.", ""), b)
    out = {"weights_bytes": sum(by_dtype.values()), "weights_by_dtype": by_dtype}
    if quant_params:
        qbytes = sum(v for k, v in by_dtype.items() if k.startswith(("nf4", "fp4", "4bit")))
        out["quantized_params"] = quant_params
        out["quantized_bits_per_param"] = round(8 * qbytes / quant_params, 4)
    return out


def gradient_bytes(model: torch.nn.Module) -> int:
    return sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += _nbytes(v)
    return total


def tensor_account(model, grad_bytes: int, optim_bytes: int) -> dict:
    acc = weight_account(model)
    acc["gradients_bytes"] = int(grad_bytes)
    acc["optimizer_bytes"] = int(optim_bytes)
    acc["total_bytes"] = acc["weights_bytes"] + acc["gradients_bytes"] + acc["optimizer_bytes"]
    return acc
