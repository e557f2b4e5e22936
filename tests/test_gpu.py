"""CUDA paths, run only where a GPU is (``pytest -m gpu``; skipped elsewhere).

bf16 training steps for full / LoRA / QLoRA through ``loralab train``; fused
AdamW and SDPA on CUDA; no host sync from loralab inside a step but the loss;
QLoRA on CUDA equals LoRA on the dequantized weights; merging; generation and
the serving engine on CUDA; 2-process DDP over NCCL when two GPUs are there;
and the estimator within 10 % of ``max_memory_allocated`` for a 1B-shaped LoRA
step. Tiny models are built from configs with a word-level tokenizer (no
downloads, no installed model packages), so the module runs on a bare GPU box.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from conftest import cli
from tiny_models import BUILDERS, dequantized_twin, logits, randomize_adapters
from train_support import save_tiny, sft_records, write_jsonl

from loralab.lora import LoRAConfig, inject_lora, merge_and_unload

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    return {"model": save_tiny(root, "llama"),
            "sft": write_jsonl(root / "sft.jsonl", sft_records(48)), "root": root}


def _train(tiny, method: str, out: Path, *extra) -> dict:
    lr = {"full": 3e-3, "lora": 1e-2, "qlora": 1e-2}[method]
    code = cli("train", "--model", tiny["model"], "--data", tiny["sft"], "--task", "sft",
               "--method", method, "--output", out, "--epochs", 6, "--batch-size", 8,
               "--lr", lr, "--rank", 4, "--targets", "all-linear", "--quiet", *extra)
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


# ---- training on CUDA ---------------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_bf16_training_step_on_cuda(tiny, tmp_path, method):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    m = _train(tiny, method, tmp_path / method)
    assert m["peak_memory"]["device"] == "cuda"
    assert m["peak_memory"]["peak_allocated_bytes"] > 0
    curve = [loss for _, loss in m["loss_curve"]]
    assert all(math.isfinite(x) for x in curve)
    assert curve[-1] < curve[0]  # bf16 autocast still learns
    assert m["tokens_per_second"] > 0


def _loop(method: str, model=None):
    """A loralab Loop on CUDA over a tiny Llama, as ``run_training`` builds it."""
    from loralab.config import TrainConfig
    from loralab.data.encode import Encoded
    from loralab.train.loop import Loop
    from loralab.train.methods import apply_method
    from loralab.train.run import make_accelerator

    cfg = TrainConfig(model="tiny", data="x", task="sft", method=method, rank=4,
                      targets="all-linear", batch_size=4, max_steps=4, log_every=10**6,
                      quiet=True, save_checkpoints=False, keep_best=False).resolve()
    model = model if model is not None else BUILDERS["llama"]()
    apply_method(model, cfg)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(4, 100, (16, 24), generator=gen).tolist()
    acc = make_accelerator(cfg)
    return Loop(model, cfg, Encoded(rows, [list(r) for r in rows]), None, 0, acc, None)


def test_fused_adamw_and_sdpa_on_cuda():
    loop = _loop("lora")
    assert loop.acc.device.type == "cuda"
    assert loop.optimizer.optimizer.defaults["fused"] is True  # one kernel for all tensors
    assert loop.acc.unwrap_model(loop.model).config._attn_implementation == "sdpa"
    assert loop.acc.mixed_precision == "bf16"


def test_no_host_sync_from_loralab_in_a_step_but_the_loss():
    """``torch.cuda.set_sync_debug_mode`` flags each synchronizing call; the only
    one loralab's own code may make in a step is the loss's ``.item()``."""
    loop = _loop("lora")
    plan = loop._epoch_plan(0)
    loop.model.train()
    loop.train_step(plan[0])  # first step: lazy state, gradient/optimizer byte counts
    torch.cuda.synchronize()
    src = str(ROOT / "src" / "loralab")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(2):  # control: two syncs this file makes, two warnings
                torch.ones(1, device="cuda").item()
            for step in plan[1:3]:
                loop.train_step(step)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    flagged = [w for w in caught if "synchroniz" in str(w.message)]
    control = [w for w in flagged if w.filename == __file__]
    assert len(control) == 2, "sync warnings must name their caller, once per call"
    syncs = [(Path(w.filename).name, w.lineno) for w in flagged if w.filename.startswith(src)]
    ours = [s for s in syncs if s[0] != "loop.py"]
    assert not ours, f"host syncs in loralab outside the loop: {ours}"
    assert len(syncs) <= 2, f"more than one sync per step in loop.py: {syncs}"


# ---- QLoRA and merging on CUDA -----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_on_cuda_equals_lora_on_dequantized_weights(dtype):
    pytest.importorskip("bitsandbytes")
    from loralab.lora.quant import is_4bit, quantize_model_4bit

    float_model = BUILDERS["llama"]().to("cuda", dtype)
    qmodel = copy.deepcopy(float_model)
    assert quantize_model_4bit(qmodel, compute_dtype=dtype) == 14
    assert is_4bit(qmodel.model.layers[0].self_attn.q_proj)
    assert qmodel.model.layers[0].self_attn.q_proj.weight.device.type == "cuda"
    ref = dequantized_twin(qmodel, float_model)
    cfg = LoRAConfig(r=4, alpha=8, targets="all-linear")
    inject_lora(qmodel, cfg)
    inject_lora(ref, cfg)
    randomize_adapters(qmodel)
    ref.load_state_dict({k: v for k, v in qmodel.state_dict().items() if ".lora_" in k},
                        strict=False)
    ids = torch.randint(0, 100, (2, 8), device="cuda")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(logits(qmodel, ids).float(), logits(ref, ids).float(),
                               rtol=tol, atol=tol)
    qmodel.train()
    qmodel(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in qmodel.named_parameters() if ".lora_A." in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_qlora_loaded_on_cpu_runs_on_cuda(tiny):
    """``load_for_method`` quantizes where it loads (CPU); accelerate then moves
    the NF4 weights to the GPU: the forward there must match the CPU one."""
    pytest.importorskip("bitsandbytes")
    from loralab.config import TrainConfig
    from loralab.train.methods import load_for_method

    cfg = TrainConfig(model=str(tiny["model"]), data="x", task="sft", method="qlora",
                      rank=4, targets="all-linear", compute_dtype="float32").resolve()
    model, _ = load_for_method(cfg, "cuda")
    randomize_adapters(model)
    ids = torch.randint(4, 40, (2, 10))
    cpu = logits(model.eval(), ids)
    gpu = logits(model.to("cuda"), ids.to("cuda")).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("quantized", [False, True])
def test_merge_on_cuda(quantized):
    if quantized:
        pytest.importorskip("bitsandbytes")
    from loralab.lora.quant import quantize_model_4bit

    model = BUILDERS["llama"]().to("cuda")
    if quantized:
        quantize_model_4bit(model, compute_dtype=torch.float32)
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="all-linear"))
    randomize_adapters(model)
    ids = torch.randint(0, 100, (2, 8), device="cuda")
    unmerged = logits(model, ids)
    merged = merge_and_unload(model)
    assert next(merged.parameters()).device.type == "cuda"
    torch.testing.assert_close(logits(merged, ids), unmerged, rtol=1e-4, atol=1e-4)


# ---- generation and serving on CUDA -------------------------------------------------

@pytest.fixture(scope="module")
def adapter(tiny):
    from loralab.lora import save_adapter
    from loralab.models import load_model

    model, _ = load_model(str(tiny["model"]), "sft")
    inject_lora(model, LoRAConfig(r=4, alpha=8, targets="attention", task="sft"))
    randomize_adapters(model, std=0.5)
    return save_adapter(model, tiny["root"] / "run" / "adapter",
                        base_model_name_or_path=str(tiny["model"]))


def test_generate_on_cuda_equals_transformers(tiny, adapter):
    from loralab.generation import SamplingParams, generate, load_for_generation

    model, tok = load_for_generation(str(tiny["model"]), adapter)
    model.to("cuda")
    ids = tok("say the word twice")["input_ids"]
    ours = generate(model, tok, ids, SamplingParams(max_tokens=10))
    ref = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=10,
                         min_new_tokens=10, do_sample=False)[0, len(ids):].tolist()
    assert ours.token_ids == ref and ours.finish_reason == "length"


def test_serving_engine_on_cuda(tiny, adapter):
    """The server's worker decodes on whatever device its model is on; the base
    and the adapter rows of one batch answer as they do alone."""
    from loralab.generation import GenerationRequest, SamplingParams, generate
    from loralab.serve.engine import GenJob
    from loralab.serve.server import LoraServer, ServeConfig

    threads = torch.get_num_threads()
    server = LoraServer(ServeConfig(model=str(tiny["model"]), adapters={"a": str(adapter)},
                                    threads=1))
    try:
        served = server.served
        served.model.to("cuda")
        tok = served.tokenizer
        ids = tok("repeat hello")["input_ids"]
        params = SamplingParams(max_tokens=8)
        rows = [GenerationRequest(list(ids), params, adapter=name) for name in ("a", None)]
        finished = threading.Event()
        errors = []
        server.worker.submit(GenJob(rows, lambda err: (errors.append(err), finished.set())))
        assert finished.wait(60) and errors == [None]
        alone = [generate(served.model, tok, ids, params, adapter=name, route=served.route)
                 for name in ("a", None)]
        assert [r.token_ids for r in rows] == [r.token_ids for r in alone]
        assert rows[0].token_ids != rows[1].token_ids  # the adapter changes the answer
    finally:
        server.worker.stop()
        torch.set_num_threads(threads)


# ---- two processes --------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL DDP")
def test_ddp_two_processes_nccl(tiny, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "loralab",
           "train", "--model", str(tiny["model"]), "--data", str(tiny["sft"]), "--task", "sft",
           "--method", "lora", "--rank", "4", "--targets", "all-linear", "--epochs", "2",
           "--batch-size", "4", "--lr", "1e-2", "--output", str(out), "--quiet"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["peak_memory"]["device"] == "cuda"


# ---- the estimator against the GPU --------------------------------------------------

def test_estimator_within_10_percent_for_a_1b_lora_step(tmp_path):
    """Llama-3.2-1B shape, bf16 weights, LoRA r=16 on every linear layer,
    batch 2 x 1024: the analytical peak against ``max_memory_allocated`` (the
    estimate without the CUDA context, which the allocator never sees)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    s = gpu.Settings(device="cuda", dry_run=False, seq=1024, token_budget=2048, steps=1,
                     warmup=1, capacity=None, time_limit=1e9)
    fields = gpu.shape_fields("llama-3.2-1b", dry_run=False)
    spec = gpu.spec_for("llama-3.2-1b", fields, tmp_path)
    gpu.free("cuda")
    base = torch.cuda.memory_allocated()  # what earlier tests left on the GPU
    model = gpu.build_model(fields, "lora", s)
    rows = gpu.packed_rows(list(range(1000)) * 5, 4, s.seq)
    out = gpu.run_loralab(model, rows, "lora", 2, s)
    measured = torch.cuda.max_memory_allocated() - base
    del model
    gpu.free("cuda")
    predicted = gpu.estimator(spec, "lora", s, 2).at(2).bytes["total"]
    assert out["tokens"] == 2 * 1024
    assert abs(predicted - measured) / measured <= 0.10, (predicted, measured)
