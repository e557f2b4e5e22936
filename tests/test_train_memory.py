"""The tensor account: weights by dtype (4-bit weights with their constants),
gradients and optimizer state, each byte counted once; the peak RSS reading."""

from __future__ import annotations

import torch
from train_support import make_model

from loralab.train.memory import (
    gradient_bytes,
    optimizer_bytes,
    peak_process_memory,
    reset_peak,
    tensor_account,
    weight_account,
)
from loralab.train.optim import make_optimizer


def test_float_weights_counted_once_with_tied_embeddings():
    model = make_model("gpt2", vocab_size=64)  # lm_head shares the embedding matrix
    acc = weight_account(model)
    unique = {p.data_ptr(): p.numel() * 4 for p in model.parameters()}
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert acc["weights_bytes"] == sum(unique.values()) + buffers
    assert "quantized_params" not in acc


def test_nf4_weights_match_the_engine_count():
    from loralab.lora.base import is_4bit
    from loralab.lora.quant import quantize_model_4bit, quantized_bytes

    model = make_model("bert", vocab_size=64)
    floats_before = sum(p.numel() * 4 for n, p in model.named_parameters()
                        if "classifier" in n or "embeddings" in n or "LayerNorm" in n)
    quantize_model_4bit(model)
    layers = [m for m in model.modules() if is_4bit(m)]
    acc = weight_account(model)
    by = acc["weights_by_dtype"]
    assert by["nf4"] + by["nf4_quant_state"] == sum(quantized_bytes(m) for m in layers)
    assert acc["quantized_params"] == sum(m.in_features * m.out_features for m in layers)
    assert acc["quantized_bits_per_param"] > 4.0  # 4 bits + constants (large for tiny layers)
    assert by["float32"] >= floats_before  # norms, embeddings, head stay float


def test_gradients_and_adam_state_only_for_trainable_params():
    model = make_model("bert", vocab_size=64)
    for name, p in model.named_parameters():
        p.requires_grad_("classifier" in name)
    opt = make_optimizer(model, 1e-3, 0.0)
    ids = torch.randint(5, 60, (2, 6))
    model(input_ids=ids).logits.sum().backward()
    head = sum(p.numel() for n, p in model.named_parameters() if "classifier" in n)
    assert gradient_bytes(model) == 4 * head
    opt.step()
    assert 8 * head <= optimizer_bytes(opt) <= 8 * head + 4 * 2  # exp_avg, exp_avg_sq, step
    acc = tensor_account(model, gradient_bytes(model), optimizer_bytes(opt))
    assert acc["total_bytes"] == (acc["weights_bytes"] + acc["gradients_bytes"]
                                  + acc["optimizer_bytes"])


def test_peak_rss_reads_after_reset():
    reset_peak("cpu")
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
    peak = peak_process_memory("cpu")["peak_rss_bytes"]
    assert peak >= block.numel() * 4
    del block


def test_freed_heap_is_kept_unless_the_user_tuned_malloc(monkeypatch):
    import platform
    import sys

    from loralab.allocator import keep_freed_heap

    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    glibc = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_heap() is glibc
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert keep_freed_heap() is False


def test_huge_pages_only_for_large_micro_batches():
    """torch's THP switch is set for micro-batches whose hidden states hold 1M
    elements or more (where the kernel has transparent huge pages), never over
    the user's value; torch, read at its first allocation, then aligns a 4 MiB
    block to a page."""
    import subprocess
    import sys
    from pathlib import Path

    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    available = (sys.platform == "linux" and mode.exists()
                 and "[never]" not in mode.read_text())

    def run(tokens: int, hidden: int, **env) -> list[str]:
        import os

        code = ("import os, torch; from loralab.allocator import prefer_huge_pages; "
                f"print(prefer_huge_pages({tokens}, {hidden})); "
                "print(os.environ.get('THP_MEM_ALLOC_ENABLE')); "
                "print(torch.empty(1 << 20).data_ptr() % 4096 == 0)")
        clean = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
        out = subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                             capture_output=True, text=True, check=True)
        return out.stdout.split()

    if available:
        assert run(2048, 576) == ["True", "1", "True"]  # smollm2-135m sft, 4 x 512
    else:
        assert run(2048, 576)[:2] == ["False", "None"]
    assert run(512, 384)[:2] == ["False", "None"]  # minilm, 4 x 128
    assert run(2048, 576, THP_MEM_ALLOC_ENABLE="0")[:2] == ["False", "0"]
