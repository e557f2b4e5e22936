"""Resumable checkpoints: trainable weights, optimizer, schedule, RNG, progress.

Each checkpoint is written with ``atomic_dir``, so a SIGKILL at any moment
leaves the previous checkpoint whole. Only trainable tensors are stored
(a LoRA checkpoint is the adapter, not the base model).
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loralab.io import atomic_dir

STATE = "trainer_state.json"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, for an immediate save: CPU tensors as they are
    (no copy of the weights), others copied to the CPU."""
    return {n: p.detach().to("cpu").contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


class NonFiniteWeights(ValueError):
    """A tensor about to be saved holds inf or nan (``name``: the first one)."""

    def __init__(self, name: str):
        self.name = name
        super().__init__(f"{name} holds inf/nan")


def require_finite(state: dict[str, torch.Tensor]) -> None:
    """Refuse to save non-finite weights: a checkpoint is a state worth resuming.
    Checked on the CPU copies the save makes anyway (no extra device sync)."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteWeights(name)


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint holds unknown parameters: {missing[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_weights(target: Path, model: torch.nn.Module) -> None:
    state = trainable_state(model)
    require_finite(state)
    with atomic_dir(target) as tmp:
        save_file(state, str(tmp / "trainable.safetensors"))


def load_weights(source: Path, model: torch.nn.Module) -> None:
    load_trainable_state(model, load_file(str(source / "trainable.safetensors")))


@contextlib.contextmanager
def _without_crc32():
    """torch.save without its per-record CRC-32, which torch.load does not
    check, and it took longer than the write (BENCHMARKS.md, "CPU training
    changes: what each saved"). A checkpoint is whole or absent (atomic_dir)."""
    from torch import serialization

    get = getattr(serialization, "get_crc32_options", None)
    if get is None:  # older torch: always computes it
        yield
        return
    before = get()
    serialization.set_crc32_options(False)
    try:
        yield
    finally:
        serialization.set_crc32_options(before)


def save_checkpoint(target: Path, model, optimizer, scheduler, progress: dict) -> None:
    state = trainable_state(model)
    require_finite(state)
    with atomic_dir(target) as tmp:
        save_file(state, str(tmp / "trainable.safetensors"))
        with _without_crc32():
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rng_state()}, tmp / "optimizer.pt")
        (tmp / STATE).write_text(json.dumps(progress, indent=1))


def saved_step(source: Path) -> int | None:
    """The optimizer step a checkpoint was taken at (None: unreadable)."""
    try:
        return int(json.loads((source / STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_checkpoint(source: Path, model, optimizer, scheduler) -> dict:
    load_weights(source, model)
    blob = torch.load(source / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
    return json.loads((source / STATE).read_text())
