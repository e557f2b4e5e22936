"""GPU benchmark: loralab's training step against HF Trainer + peft, in one run.

Models are built from their published configs with random weights, directly on
the GPU in bf16 (nothing is downloaded): Llama-3.2-1B, Llama-3.1-8B and
Qwen3-0.6B shapes. For each, full fine-tuning (1B only), LoRA r=16 and QLoRA
r=16 (bitsandbytes NF4 + double quant) on every linear layer but the output
head, at sequence 2,048, with the largest batch the estimator says fits, up to
a token budget. Both sides get the same weights (same seed), the same packed
rows, batch, precision (bf16 weights, bf16 autocast), fused AdamW, SDPA
attention and gradient clipping at 1.0.

- loralab: the engine (``apply_method``: ``inject_lora``, ``quantize_model_4bit``)
  and the loop's own optimizer step (``Loop.train_step``), as ``loralab train``
  runs them.
- HF: ``Trainer`` + ``peft.get_peft_model`` (adapters kept in the model's dtype,
  as loralab's are).
- TRL: ``SFTTrainer`` on the same peft model, where ``trl`` and ``datasets``
  import (``bench/gpu_prepare.sh`` fetches their wheels); TRL casts QLoRA
  adapters to bf16 itself (the QLoRA paper's recipe), as its users get.

Reported per row: tokens/s over the timed steps (after warm-up steps), MFU,
peak allocated/reserved GPU memory, and ``loralab estimate``'s prediction for
the same settings. MFU counts model FLOPs per token (Chowdhery et al. 2022,
PaLM, app. B; Narayanan et al. 2021): 6N for full fine-tuning and 4N + 6N_adapter
for LoRA (frozen weights need no weight gradient), N being the weights that
multiply activations (every linear layer, the output head included; not the
embedding lookup), plus attention 12·L·T·d (QK^T and AV forward and backward,
no causal discount), over the GPU's dense bf16 peak.

    python bench/gpu.py                 # on a GPU: a few minutes on an H100/H200
    python bench/gpu.py --dry-run       # CPU, tiny shapes, fp32: every code path

The rows are written as JSON (``$OUT/gpu-<date>.json`` when ``OUT`` is set,
else ``bench/results/``) and as the Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs without an installed loralab (PYTHONPATH=src)

from loralab.errors import LoralabError

ALPACA_NAME = "alpaca_data_first2000.json"
ALPACA_PLACES = (ROOT / ".whl" / ALPACA_NAME,  # carried to the GPU machine with the wheel
                 ROOT / "shared" / "datasets" / "alpaca" / ALPACA_NAME,
                 ROOT.parent / "shared" / "datasets" / "alpaca" / ALPACA_NAME)

_LLAMA3 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
           "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
           "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False,
           "bos_token_id": 128000, "eos_token_id": 128001}
# Shapes as published in each model's config.json (meta-llama/Llama-3.2-1B,
# meta-llama/Llama-3.1-8B, Qwen/Qwen3-0.6B).
SHAPES = {
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
                     "rope_scaling": {"rope_type": "llama3", "factor": 32.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}},
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
                     "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}},
    "qwen3-0.6b": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"],
                   "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
                   "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960,
                   "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": True,
                   "attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645},
}
# --dry-run: the same architectures, hidden 64, 2 layers (vocab 512 holds the byte tokens)
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
        "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2}
# Most telling first, so a run cut short still has the 1B and 8B LoRA rows.
PLAN = [("llama-3.2-1b", "lora"), ("llama-3.1-8b", "lora"), ("llama-3.2-1b", "qlora"),
        ("llama-3.1-8b", "qlora"), ("llama-3.2-1b", "full"), ("qwen3-0.6b", "lora"),
        ("qwen3-0.6b", "qlora")]
SIDES = ("loralab", "hf_peft", "trl")  # trl: only where trl and datasets import
RANK, ALPHA = 16, 32
LR = {"full": 1e-5, "lora": 2e-4, "qlora": 2e-4}
# Dense bf16 tensor-core peak, TFLOP/s, by vendor datasheet (no sparsity). Order
# matters: the first name found in torch.cuda.get_device_name() wins.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
               ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0),
               ("L4", 121.0), ("A10G", 70.0)]


@dataclass
class Settings:
    device: str
    dry_run: bool
    seq: int
    token_budget: int
    steps: int
    warmup: int
    capacity: int | None  # bytes of GPU memory the estimator may plan for
    time_limit: float
    seed: int = 0


# ---- environment ------------------------------------------------------------

def peak_tflops(name: str) -> float | None:
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops
    return None


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def environment(s: Settings, argv: list[str]) -> dict:
    import torch

    cuda = s.device == "cuda"
    from loralab.lab.environment import cpu_name

    name = torch.cuda.get_device_name(0) if cuda else f"CPU: {cpu_name()}"
    total = torch.cuda.get_device_properties(0).total_memory if cuda else None
    return {"device_name": name, "gpu_memory_bytes": total, "planned_bytes": s.capacity,
            "driver": driver_version() if cuda else None, "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": _version("transformers"),
            "peft": _version("peft"), "accelerate": _version("accelerate"),
            "bitsandbytes": _version("bitsandbytes"), "trl": _version("trl"),
            "python": platform.python_version(),
            "peak_tflops_bf16": peak_tflops(name) if cuda else None,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python", "bench/gpu.py", *argv]), "dry_run": s.dry_run,
            "seq_len": s.seq, "token_budget": s.token_budget, "timed_steps": s.steps,
            "warmup_steps": s.warmup}


def check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise LoralabError(
            f"--device cuda, but no CUDA GPU is visible (torch {torch.__version__}, "
            f"built for CUDA {torch.version.cuda or 'none'}).",
            hint="Fix: run on a machine with an NVIDIA GPU, or pass --dry-run for the CPU run.")


# ---- shapes, FLOPs and the estimate ---------------------------------------------

def shape_fields(name: str, dry_run: bool) -> dict:
    fields = dict(SHAPES[name])
    if dry_run:
        fields.update(TINY)
        fields.pop("rope_scaling", None)
    return fields


def hf_config(fields: dict):
    from transformers import AutoConfig

    rest = {k: v for k, v in fields.items() if k != "model_type"}
    config = AutoConfig.for_model(fields["model_type"], **rest)
    config._attn_implementation = "sdpa"  # both sides: torch's fused attention kernels
    return config


def spec_for(name: str, fields: dict, tmp: Path):
    """``loralab estimate``'s model spec, from the same fields as a config.json."""
    from loralab.estimate import load_spec

    path = tmp / f"{name}-config.json"
    path.write_text(json.dumps(fields), encoding="utf-8")
    return load_spec(str(path), task="sft")


def matmul_params(model) -> int:
    """Weights that multiply activations: every linear layer, the head included."""
    from torch import nn

    return sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m, nn.Linear))


def flops_per_token(fields: dict, n_matmul: int, n_adapter: int, method: str, seq: int) -> float:
    d_attn = fields["num_attention_heads"] * fields.get(
        "head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    attention = 12 * fields["num_hidden_layers"] * seq * d_attn  # (B, H, T, T) products
    if method == "full":
        return 6 * n_matmul + attention
    return 4 * n_matmul + 6 * n_adapter + attention


def estimator(spec, method: str, s: Settings, batch: int):
    from loralab.estimate import EstimateConfig, Estimator

    precision = "fp32" if s.dry_run else "bf16"  # bf16 weights, as both sides build them
    return Estimator(spec, EstimateConfig(
        method=method, precision=precision, batch_size=batch, seq_len=s.seq, rank=RANK,
        targets="all-linear", device=s.device, overhead=False, padded=False))


def choose_batch(spec, method: str, s: Settings) -> tuple[int, int]:
    """(batch, estimator's largest batch): the budget's batch, or less if it won't fit."""
    budget = max(1, s.token_budget // s.seq)
    if s.capacity is None:
        return budget, budget
    most = estimator(spec, method, s, 1).max_batch_size(s.capacity)
    return max(1, min(budget, most)), most


def preflight(plan, specs: dict, s: Settings) -> dict:
    """Batches per row; a row that fits not even batch 1 stops the run before it starts."""
    from loralab.estimate import format_bytes

    batches, fits, too_big = {}, [], []
    for name, method in plan:
        batch, most = choose_batch(specs[name], method, s)
        batches[(name, method)] = (batch, most)
        label = f"{name} {method}"
        if most == 0:
            need = estimator(specs[name], method, s, 1).at(1).total
            too_big.append(f"{label} needs {format_bytes(need)} at batch 1 x {s.seq}")
        else:
            fits.append(f"{label} (batch <= {most})")
    if too_big:
        cap = format_bytes(s.capacity)
        raise LoralabError(
            f"the GPU is too small: {'; '.join(too_big)} (estimate), {cap} usable. "
            f"The estimator says these fit: {', '.join(fits) or 'none'}.",
            hint="Fix: pick rows that fit with --models/--methods, or a shorter --seq.")
    return batches


# ---- data -------------------------------------------------------------------------

def find_alpaca(explicit: str | None) -> Path | None:
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise LoralabError(f"--data {explicit}: no such file.",
                               hint=f"Fix: give the path of {ALPACA_NAME}, or leave --data out.")
        return path
    return next((p for p in ALPACA_PLACES if p.is_file()), None)


def token_stream(alpaca: Path | None, n: int, vocab: int, seed: int) -> tuple[list[int], str]:
    """``n`` token ids: alpaca's records as UTF-8 bytes (a tokenizer-free stand-in
    that both sides see alike), repeated as needed; random ids without the file."""
    import torch

    if alpaca is not None:
        records = json.loads(alpaca.read_text(encoding="utf-8"))
        text = "\n\n".join(f"### Instruction:\n{r['instruction']}\n\n### Input:\n"
                           f"{r.get('input', '')}\n\n### Response:\n{r['output']}"
                           for r in records)
        ids = list(text.encode("utf-8"))
        reps = math.ceil(n / len(ids))
        return (ids * reps)[:n], f"alpaca ({alpaca.name}, UTF-8 bytes packed)"
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen).tolist(), "synthetic random tokens"


def packed_rows(stream: list[int], rows: int, seq: int):
    """``rows`` blocks of ``seq`` tokens; labels are the inputs (causal LM on
    every position), so no row is padded and both sides count the same tokens."""
    from loralab.data.encode import Encoded

    blocks = [stream[i * seq:(i + 1) * seq] for i in range(rows)]
    return Encoded(blocks, [list(b) for b in blocks])


# ---- building one model ----------------------------------------------------------

def build_model(fields: dict, method: str, s: Settings):
    """Random weights from the config, on the device in the run's dtype; NF4 for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    from loralab.lora.quant import quantize_model_4bit

    dtype = torch.float32 if s.dry_run else torch.bfloat16
    torch.manual_seed(s.seed)  # the same weights for both sides
    with torch.device(s.device):
        model = AutoModelForCausalLM.from_config(hf_config(fields), dtype=dtype,
                                                 attn_implementation="sdpa")
    model.config.use_cache = False
    if method == "qlora":
        quantize_model_4bit(model, compute_dtype=dtype)
    return model


def train_config(method: str, batch: int, steps: int, s: Settings):
    from loralab.config import TrainConfig

    return TrainConfig(model="bench", data="bench", task="sft", method=method, rank=RANK,
                       alpha=ALPHA, targets="all-linear", batch_size=batch, max_steps=steps,
                       lr=LR[method], warmup_ratio=0.0, scheduler="constant", max_length=s.seq,
                       group_by_length=False, log_every=10**6, keep_best=False,
                       save_checkpoints=False, quiet=True, seed=s.seed,
                       mixed_precision="no" if s.dry_run else "bf16").resolve()


def adapter_dtypes(model) -> str:
    return ",".join(sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()
                            if p.requires_grad}))


# ---- timing ----------------------------------------------------------------------

def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def memory_peak(device: str) -> dict:
    import torch

    from loralab.train.memory import peak_process_memory

    out = {"peak_allocated_bytes": None, "peak_reserved_bytes": None, "peak_rss_bytes": None}
    if device == "cuda":
        out.update(peak_allocated_bytes=torch.cuda.max_memory_allocated(),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved())
    else:
        out["peak_rss_bytes"] = peak_process_memory("cpu")["peak_rss_bytes"]
    return out


def run_loralab(model, data, method: str, batch: int, s: Settings) -> dict:
    """The loop's own step (``Loop.train_step``), warm-up steps first, then timed."""
    from loralab.train.loop import Loop
    from loralab.train.methods import apply_method
    from loralab.train.run import make_accelerator

    cfg = train_config(method, batch, s.warmup + s.steps, s)
    apply_method(model, cfg)
    acc = make_accelerator(cfg)
    loop = Loop(model, cfg, data, None, 0, acc, None)
    loop.model.train()
    plan = loop._epoch_plan(0)
    losses, tokens = [], 0
    for step in plan[:s.warmup]:
        losses.append(_loss(loop.train_step(step)[0]))
    sync(s.device)
    t0 = time.perf_counter()
    for step in plan[s.warmup:s.warmup + s.steps]:
        loss, n = loop.train_step(step)
        losses.append(_loss(loss))
        tokens += n
    sync(s.device)
    seconds = time.perf_counter() - t0
    out = {"tokens": tokens, "seconds": seconds, "loss_first": losses[0],
           "loss_last": losses[-1], "trainable_params": sum(p.numel() for p in loop.params),
           "trainable_dtype": adapter_dtypes(loop.model)}
    acc.free_memory()
    return out


def _loss(value) -> float:
    """A float from the step's loss: a float, or a 0-d tensor (no host sync in the step)."""
    return float(value)


def peft_model(model, method: str):
    from peft import LoraConfig, get_peft_model

    if method == "full":
        return model
    if method == "qlora":
        model.is_loaded_in_4bit = True  # peft's 4-bit dispatch asks the model, as from_pretrained sets
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                        bias="none", task_type="CAUSAL_LM")
    # adapters in the base's dtype, as loralab makes them (peft's default upcasts to fp32)
    return get_peft_model(model, config, autocast_adapter_dtype=False)


class _Rows:
    """A map-style dataset of the packed rows (no ``datasets`` needed)."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        import torch

        ids = torch.tensor(self.data.input_ids[i])  # (T,)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _clock(s: Settings):
    """A Trainer callback that notes the time after the warm-up and the last step."""
    from transformers import TrainerCallback

    total = s.warmup + s.steps

    class Clock(TrainerCallback):
        t0 = t1 = None

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (s.warmup, total):
                sync(s.device)
                setattr(self, "t0" if state.global_step == s.warmup else "t1",
                        time.perf_counter())

    return Clock()


def trainer_args(cls, method: str, batch: int, s: Settings, tmp: Path, **extra):
    """The same settings for HF's Trainer and TRL's SFTTrainer (``cls``: their
    arguments class): batch, steps, lr, fused AdamW, clipping, bf16, no eval."""
    total = s.warmup + s.steps
    return cls(output_dir=str(tmp / cls.__name__), per_device_train_batch_size=batch,
               max_steps=total, learning_rate=LR[method], lr_scheduler_type="constant",
               warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch_fused",
               bf16=not s.dry_run, use_cpu=s.device == "cpu", logging_steps=total,
               logging_first_step=True, save_strategy="no", eval_strategy="no", report_to=[],
               disable_tqdm=True, dataloader_num_workers=0, seed=s.seed, data_seed=s.seed,
               gradient_checkpointing=False, **extra)


def train_hf_like(trainer, clock, model, batch: int, s: Settings) -> dict:
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for quiet in (PrinterCallback, ProgressCallback):  # one line per row is ours to print
        trainer.remove_callback(quiet)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    params = [p for p in model.parameters() if p.requires_grad]
    out = {"tokens": s.steps * batch * s.seq, "seconds": clock.t1 - clock.t0,
           "loss_first": losses[0] if losses else None,
           "loss_last": losses[-1] if losses else None,
           "trainable_params": sum(p.numel() for p in params),
           "trainable_dtype": adapter_dtypes(model)}
    trainer.accelerator.free_memory()
    return out


def run_hf(model, data, method: str, batch: int, s: Settings, tmp: Path) -> dict:
    """HF Trainer + peft, same rows, batch, precision, optimizer and clipping."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = peft_model(model, method)
    clock = _clock(s)
    trainer = Trainer(model=model, args=trainer_args(TrainingArguments, method, batch, s, tmp),
                      train_dataset=_Rows(data), data_collator=default_data_collator,
                      callbacks=[clock])
    return train_hf_like(trainer, clock, model, batch, s)


def _byte_tokenizer():
    """TRL asks for a tokenizer (its pad id); the rows are already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "<unk>")),
                                   pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def run_trl(model, data, method: str, batch: int, s: Settings, tmp: Path) -> dict:
    """TRL's SFTTrainer on the same peft model and rows (already tokenized, so TRL
    only truncates to ``max_length``; its collator makes the labels)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = peft_model(model, method)
    clock = _clock(s)
    args = trainer_args(SFTConfig, method, batch, s, tmp, max_length=s.seq, packing=False)
    trainer = SFTTrainer(model=model, args=args, processing_class=_byte_tokenizer(),
                         train_dataset=Dataset.from_dict({"input_ids": data.input_ids}),
                         callbacks=[clock])
    return train_hf_like(trainer, clock, model, batch, s)


@functools.cache
def trl_missing() -> str | None:
    """Why TRL's side cannot run here (None: it can)."""
    import importlib.util

    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{' and '.join(missing)} not installed"
    try:
        import datasets
        import trl  # noqa: F401
    except Exception as err:  # noqa: BLE001 - a carried wheel that does not fit the machine
        return f"trl does not import: {type(err).__name__}: {str(err).splitlines()[0]}"
    datasets.disable_progress_bars()
    return None


# ---- one row ---------------------------------------------------------------------

def free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def is_oom(err: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def run_side(side: str, name: str, method: str, batch: int, ctx: dict, s: Settings) -> dict:
    """One side of one row; on out-of-memory the batch steps down by a quarter (noted)."""
    import torch

    fields, data = ctx["fields"][name], ctx["data"]
    while True:
        free(s.device)
        base = torch.cuda.memory_allocated() if s.device == "cuda" else 0
        model = None
        try:
            model = build_model(fields, method, s)
            if s.device == "cuda":  # the peak of training, not of building (bf16 before NF4)
                torch.cuda.reset_peak_memory_stats()
            rows = packed_rows(data, batch * (s.warmup + s.steps), s.seq)
            fn = {"loralab": run_loralab, "hf_peft": run_hf, "trl": run_trl}[side]
            extra = (ctx["tmp"],) if side != "loralab" else ()
            out = fn(model, rows, method, batch, s, *extra)
            out.update(memory_peak(s.device), batch_size=batch, baseline_allocated_bytes=base)
            return out
        except Exception as err:  # a row's failure is a result
            if not (is_oom(err) and batch > 1):
                raise
            batch = batch * 3 // 4  # the estimate's batch was close: step down gently
            ctx["notes"].append(f"{name} {method} {side}: out of memory, retried at batch "
                                f"{batch}")
        finally:
            del model
            free(s.device)


def row_result(side: str, name: str, method: str, ctx: dict, s: Settings) -> dict:
    batch, most = ctx["batches"][(name, method)]
    row = {"model": name, "method": method, "side": side, "seq_len": s.seq,
           "planned_batch": batch, "estimator_max_batch": most, "status": "ok", "error": None}
    try:
        row.update(run_side(side, name, method, batch, ctx, s))
    except Exception as err:  # noqa: BLE001
        row.update(status="error", error=f"{type(err).__name__}: {str(err).splitlines()[0]}"
                   if str(err) else type(err).__name__)
        return row
    return finish_row(row, name, method, ctx, s)


def finish_row(row: dict, name: str, method: str, ctx: dict, s: Settings) -> dict:
    spec = ctx["specs"][name]
    est = estimator(spec, method, s, row["batch_size"]).at(row["batch_size"])
    n_adapter = est.params["lora"]
    flops = flops_per_token(ctx["fields"][name], ctx["n_matmul"][name], n_adapter, method, s.seq)
    tps = row["tokens"] / max(row["seconds"], 1e-9)
    peak = ctx["env"]["peak_tflops_bf16"]
    measured = row["peak_allocated_bytes"]
    if measured:  # what an earlier row may have left allocated is not this row's
        measured -= row.get("baseline_allocated_bytes") or 0
    row.update(tokens_per_second=tps, flops_per_token=flops,
               mfu=tps * flops / (peak * 1e12) if peak else None,
               estimate_bytes=est.bytes["total"],
               estimate_error_percent=(100.0 * (est.bytes["total"] - measured) / measured
                                       if measured else None))
    return row


# ---- the run ---------------------------------------------------------------------

def selected_plan(models: list[str] | None, methods: list[str] | None) -> list:
    plan = [(n, m) for n, m in PLAN if (not models or n in models)
            and (not methods or m in methods)]
    if not plan:
        raise LoralabError("--models/--methods select no benchmark row.",
                           hint="Fix: models " + ", ".join(SHAPES) + "; methods full (1B only), "
                           "lora, qlora.")
    return plan


def prepare(plan, s: Settings, args, tmp: Path) -> dict:
    fields = {name: shape_fields(name, s.dry_run) for name, _ in plan}
    specs = {name: spec_for(name, f, tmp) for name, f in fields.items()}
    batches = preflight(plan, specs, s)
    most_rows = max(b for b, _ in batches.values()) * (s.warmup + s.steps)
    vocab = min(f["vocab_size"] for f in fields.values())
    stream, source = token_stream(find_alpaca(args.data), most_rows * s.seq, vocab, s.seed)
    return {"fields": fields, "specs": specs, "batches": batches, "data": stream,
            "data_source": source, "tmp": tmp, "notes": [],
            "n_matmul": {n: matmul_params(specs[n].model) for n in fields}}


def jobs(plan, sides) -> list[tuple[str, str, str]]:
    """loralab and HF side by side per row, in the plan's order; TRL's rows after
    all of those, so a run cut short by its time limit loses TRL first."""
    pairs = [(n, m, side) for n, m in plan for side in sides if side != "trl"]
    return pairs + [(n, m, "trl") for n, m in plan if "trl" in sides]


def run(plan, s: Settings, args, out_path: Path, argv: list[str]) -> dict:
    env = environment(s, argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        ctx = prepare(plan, s, args, Path(tmp))
        ctx["env"] = env
        result = {"environment": env, "data": ctx["data_source"], "notes": ctx["notes"],
                  "rows": []}
        for name, method, side in jobs(plan, args.sides):
            why = "time limit" if time.perf_counter() - started > s.time_limit else (
                trl_missing() if side == "trl" else None)
            if why:
                result["rows"].append({"model": name, "method": method, "side": side,
                                       "status": "skipped", "error": why})
                continue
            row = row_result(side, name, method, ctx, s)
            result["rows"].append(row)
            print(progress_line(row), flush=True)
            write_json(out_path, result)  # a run cut short keeps what it measured
    result["wall_seconds"] = time.perf_counter() - started
    write_json(out_path, result)
    return result


def progress_line(row: dict) -> str:
    head = f"{row['model']:>13} {row['method']:>5} {row['side']:>8}"
    if row["status"] != "ok":
        return f"{head}: {row['status']} ({row['error']})"
    mfu = f", MFU {100 * row['mfu']:.1f} %" if row.get("mfu") is not None else ""
    return (f"{head}: batch {row['batch_size']}, {row['tokens_per_second']:,.0f} tok/s{mfu}, "
            f"loss {row['loss_first']:.3f} -> {row['loss_last']:.3f}")


def write_json(path: Path, result: dict) -> None:
    """The JSON and its Markdown table, rewritten after every row."""
    from loralab.io import atomic_write_json, atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, result)
    atomic_write_text(path.with_suffix(".md"), markdown(result))


# ---- the Markdown table -----------------------------------------------------------

def _gib(n) -> str:
    from loralab.estimate import format_bytes

    return format_bytes(n) if n else "-"


def _mem(row: dict) -> str:
    if row.get("peak_allocated_bytes") is not None:
        return f"{_gib(row['peak_allocated_bytes'])} / {_gib(row['peak_reserved_bytes'])}"
    if row.get("peak_rss_bytes"):
        return f"RSS {_gib(row['peak_rss_bytes'])}"
    return "-"


def _cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None or row.get("status") != "ok":
        return (row or {}).get("status", "-")
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def markdown(result: dict) -> str:
    env = result["environment"]
    label = "CPU dry run (tiny shapes, fp32; not performance)" if env["dry_run"] else "GPU run"
    head = (f"{label}: {env['device_name']}, driver {env['driver'] or '-'}, torch {env['torch']} "
            f"(CUDA {env['cuda'] or '-'}), transformers {env['transformers']}, peft "
            f"{env['peft']}, bitsandbytes {env['bitsandbytes']}; {env['date']}; data: "
            f"{result['data']}; `{env['command']}`")
    columns = ("| model | method | batch x seq | loralab tok/s | HF+peft tok/s | loralab / HF | "
               "TRL tok/s | MFU loralab / HF | peak alloc / reserved, loralab | same, HF | "
               "estimate (vs loralab alloc) |")
    lines = [head, "", columns, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = list(dict.fromkeys((r["model"], r["method"]) for r in result["rows"]))
    for name, method in keys:
        sides = {r["side"]: r for r in result["rows"] if (r["model"], r["method"]) == (name, method)}
        lines.append(table_row(name, method, sides.get("loralab"), sides.get("hf_peft"),
                               sides.get("trl")))
    for text in result["notes"]:
        lines.append(f"\nNote: {text}")
    return "\n".join(lines) + "\n"


def table_row(name: str, method: str, ours: dict | None, hf: dict | None,
              trl: dict | None) -> str:
    ok = [r for r in (ours, hf) if r and r.get("status") == "ok"]
    shape = f"{ok[0]['batch_size']} x {ok[0]['seq_len']}" if ok else "-"
    ratio = "-"
    if len(ok) == 2 and ours is ok[0]:
        ratio = f"{ours['tokens_per_second'] / hf['tokens_per_second']:.2f}x"
        if hf["batch_size"] != ours["batch_size"]:
            ratio += f" (HF at batch {hf['batch_size']})"
    mfu = f"{_cell(ours, 'mfu', '{:.1%}')} / {_cell(hf, 'mfu', '{:.1%}')}"
    est = "-"
    if ours and ours.get("status") == "ok":
        err = ours.get("estimate_error_percent")
        est = _gib(ours["estimate_bytes"]) + (f" ({err:+.1f} %)" if err is not None else "")
    return (f"| {name} | {method} | {shape} | {_cell(ours, 'tokens_per_second', '{:,.0f}')} | "
            f"{_cell(hf, 'tokens_per_second', '{:,.0f}')} | {ratio} | "
            f"{_cell(trl, 'tokens_per_second', '{:,.0f}')} | {mfu} | "
            f"{_mem(ours) if ours and ours.get('status') == 'ok' else '-'} | "
            f"{_mem(hf) if hf and hf.get('status') == 'ok' else '-'} | {est} |")


# ---- command line ------------------------------------------------------------------

def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny shapes, fp32, a few steps: every code path but CUDA's")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda (cpu with --dry-run)")
    p.add_argument("--models", nargs="+", choices=list(SHAPES))
    p.add_argument("--methods", nargs="+", choices=("full", "lora", "qlora"))
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--seq", type=int, default=None, help="default 2048 (64 with --dry-run)")
    p.add_argument("--token-budget", type=int, default=None,
                   help="tokens per step at most; default 16384 (256 with --dry-run)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 6; dry: 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; 1)")
    p.add_argument("--gpu-memory", default=None,
                   help="plan for this much memory (e.g. 24GB) instead of the GPU's own")
    p.add_argument("--time-limit", type=float, default=420.0,
                   help="seconds; rows not started by then are recorded as skipped")
    p.add_argument("--data", default=None, help=f"path of {ALPACA_NAME} (default: searched)")
    p.add_argument("--out", default=None, help="result dir (default: $OUT or bench/results)")
    return p.parse_args(argv)


def settings(args) -> Settings:
    from loralab.estimate import parse_size

    device = args.device or ("cpu" if args.dry_run else "cuda")
    check_device(device)
    capacity = parse_size(args.gpu_memory) if args.gpu_memory else None
    if capacity is None and device == "cuda":
        import torch

        # headroom for the allocator's fragmentation and what the estimate leaves out
        capacity = int(0.85 * torch.cuda.get_device_properties(0).total_memory)
    dry = args.dry_run
    s = Settings(device=device, dry_run=dry, seq=args.seq or (64 if dry else 2048),
                 token_budget=args.token_budget or (256 if dry else 16384),
                 steps=args.steps or (2 if dry else 6),
                 warmup=args.warmup if args.warmup is not None else (1 if dry else 2),
                 capacity=capacity, time_limit=args.time_limit)
    if s.warmup < 1 or s.steps < 1 or s.seq < 8:
        raise LoralabError("--warmup and --steps must be >= 1 and --seq >= 8.",
                           hint="Fix: e.g. --warmup 2 --steps 5 --seq 2048.")
    return s


def out_path(args, s: Settings) -> Path:
    base = Path(args.out or os.environ.get("OUT") or ROOT / "bench" / "results")
    day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    return base / f"gpu-{'dry-run-' if s.dry_run else ''}{day}.json"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        s = settings(args)
        plan = selected_plan(args.models, args.methods)
        path = out_path(args, s)
        result = run(plan, s, args, path, argv)
    except LoralabError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    print(markdown(result))
    print(f"wrote {path} and {path.with_suffix('.md')} ({result['wall_seconds']:.0f} s)")
    return 1 if any(r["status"] == "error" for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
