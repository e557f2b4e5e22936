"""The memory breakdown of one training step, per method, before anything loads.

    total = weights + master weights + gradients + optimizer state
            + activations + logits + workspace + framework overhead

Parameters are counted exactly on the meta-device model; LoRA targets come
from the engine's own ``find_targets``, so the estimate wraps the same layers
``loralab train`` wraps. Each assumption is named in ``Estimate.assumptions``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loralab.errors import LoralabError
from loralab.estimate.spec import ModelSpec
from loralab.estimate.tape import FP32

METHODS = ("full", "lora", "qlora", "head")
DEVICES = ("cuda", "cpu")

# NF4 with double quantization (QLoRA §3; bitsandbytes): 4-bit codes, one
# 8-bit absmax per 64 weights, one fp32 constant per 256 absmax values.
NF4_BLOCK = 64
NF4_BLOCK2 = 256
NF4_TABLES = 16 * 4 + 256 * 4 + 4  # per tensor: NF4 code, 8-bit map, offset (fp32)

# A CUDA context with cuBLAS/cuDNN handles takes 300-600 MB of GPU memory
# outside torch's allocator (it never shows in max_memory_allocated).
CUDA_CONTEXT_BYTES = 500 * 10**6
# The resident memory a `loralab train` process needs besides the model's tensors
# (interpreter, torch, transformers, tokenizer, kernel code, thread pools):
# measured by training a tiny twin of each model with the same command in
# bench/estimate_vs_measured.py (BENCHMARKS.md, "Memory: estimate vs measured").
CPU_PROCESS_BYTES = 470 * 10**6
CPU_CLASSIFY_EXTRA = 120 * 10**6  # scikit-learn, loaded for the classification metrics
CPU_QLORA_EXTRA = 40 * 10**6  # bitsandbytes' CPU library
# The estimate is live memory. `loralab train` on CPU lets glibc keep freed
# blocks for reuse (allocator.py keep_freed_heap), so the peak RSS it then
# measures has been this many times the estimate: 0.98-1.05 for minilm,
# 1.11-1.27 for smollm2-135m, 1.19-1.28 for a Qwen3-0.6B-shaped model, full /
# LoRA / QLoRA; with a fixed malloc threshold 0.97-1.04 (BENCHMARKS.md,
# "Memory: estimate vs measured").
CPU_RSS_MEASURED_RATIO = (0.98, 1.28)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each copy a training step keeps."""

    name: str
    weight: int  # working weights (frozen ones too)
    grad: int
    master: int  # extra fp32 copy of the trainable weights (0: none)
    act: int  # activations
    note: str
    autocast_cache: int = 0  # torch.autocast keeps a cast copy of each trainable weight


PRECISIONS = {
    "fp32": Precision("fp32", 4, 4, 0, 4, "fp32 weights, gradients and activations"),
    "bf16": Precision("bf16", 2, 2, 0, 2,
                      "bf16 weights, gradients and activations, no fp32 copy"),
    # ZeRO (Rajbhandari et al. 2020) §3.1 / Megatron: 2 + 2 + (4 + 4 + 4) = 16 B/param
    "bf16-mixed": Precision("bf16-mixed", 2, 2, 4, 2,
                            "bf16 weights, gradients and activations; fp32 master weights"),
    # what `loralab train` does on a GPU: fp32 model, bf16 autocast (HF's "model
    # memory anatomy" counts it as 4 + 2 weights + 4 grads + 8 Adam = 18 B/param)
    "amp-bf16": Precision("amp-bf16", 4, 4, 0, 2,
                          "fp32 weights and gradients, bf16 autocast (cast copies of the "
                          "trainable weights live through the step)", autocast_cache=2),
}

# Optimizer state bytes per trainable parameter
OPTIMIZERS = {
    "adamw": "two fp32 moments (m, v): 8 B/param",
    "adamw-8bit": "bitsandbytes 8-bit blockwise moments: 2 B/param + fp32 absmax per 256; "
                  "tensors under 4096 elements keep fp32 moments",
    "sgd": "plain SGD keeps no state",
    "sgd-momentum": "one momentum buffer in the gradient dtype",
}


@dataclass
class EstimateConfig:
    # defaults follow `loralab train` (TrainConfig): batch 16, r=8, attention targets
    method: str = "lora"
    precision: str = "bf16-mixed"
    optimizer: str = "adamw"
    batch_size: int = 16
    seq_len: int = 512
    rank: int = 8
    targets: str = "attention"
    # MoE experts' 3-D weights, as `loralab train --target-parameters` (lora/param.py)
    target_parameters: str | None = None
    lora_dropout: float = 0.0
    # DoRA (loralab train --use-dora): a magnitude per output feature, two more
    # (tokens x out) tensors saved per adapted layer, the weight norm's temporaries
    use_dora: bool = False
    grad_checkpointing: bool = False
    device: str = "cuda"
    overhead: bool = True  # add the CUDA context / CPU process baseline
    padded: bool | None = None  # padding reaches attention; None: when batch > 1
    # padded tokens per forward/backward pass, as `loralab train --micro-batch-tokens`
    # packs them (data/batching.py pack_by_tokens); None or 0: batch_size x seq_len
    micro_batch_tokens: int | None = None

    def check(self) -> None:
        _one_of("method", self.method, METHODS)
        _one_of("optimizer", self.optimizer, tuple(OPTIMIZERS))
        _one_of("device", self.device, DEVICES)
        if not isinstance(self.precision, Precision):
            _one_of("precision", self.precision, tuple(PRECISIONS))
        for key in ("batch_size", "seq_len", "rank"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                flag = "--" + key.replace("_", "-")
                raise LoralabError(f"{key} must be a positive integer (got {value!r}).",
                                   hint=f"Fix: pass {flag} 1 or more.")
        self._check_budget()
        if not 0 <= self.lora_dropout < 1:
            raise LoralabError(f"lora_dropout must be in [0, 1) (got {self.lora_dropout}).",
                               hint="Fix: pass --lora-dropout 0.05, or 0.")

    def _check_budget(self) -> None:
        budget = self.micro_batch_tokens
        if budget is None:
            return
        if not isinstance(budget, int) or budget < 0:
            raise LoralabError(f"micro_batch_tokens must be >= 0 (got {budget!r}).",
                               hint="Fix: pass --micro-batch-tokens 4096, or 0 for "
                               "batch_size rows per pass.")
        if 0 < budget < self.seq_len:
            raise LoralabError(
                f"--micro-batch-tokens {budget} is smaller than one row of {self.seq_len} "
                "tokens, which `loralab train` refuses.",
                hint=f"Fix: pass --micro-batch-tokens {self.seq_len} or more, or a "
                "shorter --seq-len.")

    @property
    def tokens(self) -> int:
        """Tokens per pass: the budget (rows = budget // seq_len), else batch x seq."""
        return self.micro_batch_tokens or self.batch_size * self.seq_len

    @property
    def prec(self) -> Precision:
        return self.precision if isinstance(self.precision, Precision) \
            else PRECISIONS[self.precision]


def _one_of(key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise LoralabError(f"unknown {key} {value!r}.",
                           hint=f"Fix: use one of {', '.join(choices)}.")


@dataclass
class Group:
    """Parameters that share a dtype and trainability."""

    label: str
    numels: list[int]
    dtype: str  # torch dtype name, or "nf4"
    nbytes: float  # bytes per element
    trainable: bool
    grad: int = 0
    master: int = 0

    @property
    def count(self) -> int:
        return sum(self.numels)


@dataclass
class Estimate:
    model: str
    model_type: str
    task: str
    config: EstimateConfig
    params: dict
    bytes: dict
    weights_by_dtype: dict
    assumptions: list[str] = field(default_factory=list)
    approximate: list[str] = field(default_factory=list)  # where the count is not exact

    @property
    def total(self) -> int:
        return self.bytes["total"]

    def to_dict(self) -> dict:
        cfg = self.config
        return {
            "model": self.model, "model_type": self.model_type, "task": self.task,
            "method": cfg.method, "precision": cfg.prec.name, "optimizer": cfg.optimizer,
            "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
            "micro_batch_tokens": cfg.tokens, "rows_per_pass": cfg.tokens // cfg.seq_len,
            "rank": cfg.rank if cfg.method in ("lora", "qlora") else None,
            "targets": cfg.targets if cfg.method in ("lora", "qlora") else None,
            "use_dora": cfg.use_dora if cfg.method in ("lora", "qlora") else None,
            "grad_checkpointing": cfg.grad_checkpointing, "device": cfg.device,
            "params": dict(self.params), "bytes": dict(self.bytes),
            "weights_by_dtype": dict(self.weights_by_dtype),
            "assumptions": list(self.assumptions),
            "approximate": list(self.approximate),
        }


# -- parameters ------------------------------------------------------------------

def _numels(module) -> list[int]:
    return [p.numel() for p in module.parameters()]


def quantized_linears(model) -> list[str]:
    """Names of the linear layers ``loralab.lora.quant`` turns into NF4."""
    from loralab.lora.base import is_linear
    from loralab.models import OUTPUT_HEADS  # what quantize_model_4bit leaves in float

    skip = OUTPUT_HEADS
    return [n for n, m in model.named_modules() if is_linear(m) and not any(
        n == s or n.startswith(s + ".") or n.endswith("." + s) for s in skip)]


def lora_targets(spec: ModelSpec, targets: str) -> tuple[list[tuple[str, int, int]], list[str]]:
    """``([(name, d_in, d_out)], modules_to_save)`` exactly as ``inject_lora`` picks."""
    from loralab.lora import default_modules_to_save, find_targets, lora_shapes

    mts = default_modules_to_save(spec.model, spec.task)
    names = find_targets(spec.model, targets, exclude=tuple(mts))
    return lora_shapes(spec.model, names), mts


def param_groups(spec: ModelSpec, cfg: EstimateConfig) -> tuple[list[Group], set, list]:
    """Parameter groups for the method, the LoRA target names and the heads trained."""
    p, model = cfg.prec, spec.model
    wdtype = "float32" if p.weight == 4 else "bfloat16"
    if cfg.method == "full":
        return [Group("model", _numels(model), wdtype, p.weight, True, p.grad, p.master)], \
            set(), []
    shapes, mts = ([], None) if cfg.method == "head" else lora_targets(spec, cfg.targets)
    if mts is None:
        from loralab.lora import default_modules_to_save
        mts = default_modules_to_save(model, spec.task)
    groups = _frozen_groups(model, cfg, wdtype)
    if shapes:
        lbytes = lora_bytes(cfg)
        numels = [n for _, d_in, d_out in shapes for n in (cfg.rank * d_in, cfg.rank * d_out)]
        ldtype, lmaster = "float32" if lbytes == 4 else "bfloat16", 0 if lbytes == FP32 \
            else p.master
        groups.append(Group("lora", numels, ldtype, lbytes, True, lbytes, lmaster))
        if cfg.use_dora:  # lora_magnitude_vector: one per output feature, A's dtype
            groups.append(Group("dora magnitude", [d_out for _, _, d_out in shapes], ldtype,
                                lbytes, True, lbytes, lmaster))
    heads = [n for m in mts for n in _numels(model.get_submodule(m))]
    if heads:  # ModulesToSave: a trainable copy next to the frozen original
        groups.append(Group("head copy", heads, wdtype, p.weight, True, p.grad, p.master))
    experts = expert_lora_numels(spec, cfg)
    if experts:  # LoRAParam makes its factors in the expert weight's dtype
        groups.append(Group("lora experts", experts, wdtype, p.weight, True, p.grad, p.master))
    return groups, {name for name, _, _ in shapes}, list(mts)


def expert_targets(spec: ModelSpec, cfg: EstimateConfig) -> dict[str, list[str]]:
    """``{experts module: [3-D parameter]}`` that ``--target-parameters`` adapts."""
    if cfg.method not in ("lora", "qlora") or not cfg.target_parameters:
        return {}
    from loralab.lora.param import find_target_parameters

    return find_target_parameters(spec.model, cfg.target_parameters)


def expert_lora_numels(spec: ModelSpec, cfg: EstimateConfig) -> list[int]:
    """peft's ParamWrapper factors per 3-D parameter (E, out, in): A = Linear(in, r*E),
    B = Linear(r*E, out), the shapes ``lora.param.LoRAParam.add_adapter`` makes."""
    out = []
    for module, pnames in expert_targets(spec, cfg).items():
        for pname in pnames:
            e, a, b = getattr(spec.model.get_submodule(module), pname).shape
            out += [cfg.rank * e * b, cfg.rank * e * a]
    return out


def lora_bytes(cfg: EstimateConfig) -> int:
    """The engine makes LoRA weights in the base weight's dtype; fp32 over NF4."""
    return FP32 if cfg.method == "qlora" else cfg.prec.weight


def _frozen_groups(model, cfg: EstimateConfig, wdtype: str) -> list[Group]:
    p = cfg.prec
    if cfg.method != "qlora":
        return [Group("base (frozen)", _numels(model), wdtype, p.weight, False)]
    qnames = quantized_linears(model)
    qweights = {id(model.get_submodule(n).weight) for n in qnames}
    qnumels = [model.get_submodule(n).weight.numel() for n in qnames]
    rest = [t.numel() for t in model.parameters() if id(t) not in qweights]
    return [Group("base NF4", qnumels, "nf4", 0.5, False),
            Group("base (frozen)", rest, wdtype, p.weight, False)]


def nf4_constants(numels: list[int]) -> int:
    """Bytes of the quantization state of NF4 tensors: the double-quantized
    absmax constants, plus the code tables each tensor's QuantState holds."""
    total = 0
    for n in numels:
        blocks = math.ceil(n / NF4_BLOCK)
        total += blocks + 4 * math.ceil(blocks / NF4_BLOCK2)  # uint8 absmax + fp32 absmax2
    return total + NF4_TABLES * len(numels)


def optimizer_bytes(groups: list[Group], optimizer: str) -> int:
    total = 0
    for g in groups:
        if not g.trainable:
            continue
        if optimizer == "adamw":  # + torch's fp32 `step` counter per tensor
            total += 8 * g.count + 4 * len(g.numels)
        elif optimizer == "sgd-momentum":
            total += g.grad * g.count
        elif optimizer == "adamw-8bit":  # bitsandbytes min_8bit_size=4096, blocks of 256
            total += sum(8 * n if n < 4096 else 2 * n + 8 * math.ceil(n / 256)
                         for n in g.numels)
    return total


def weights_by_dtype(groups: list[Group], model, cfg: EstimateConfig) -> dict[str, int]:
    """Bytes by dtype, keyed as ``loralab.train.memory.weight_account`` keys them."""
    out: dict[str, int] = {}

    def add(key: str, nbytes: int) -> None:
        if nbytes:
            out[key] = out.get(key, 0) + int(nbytes)

    for g in groups:
        if g.dtype == "nf4":
            add("nf4", sum(math.ceil(n / 2) for n in g.numels))  # two 4-bit codes a byte
            add("nf4_quant_state", nf4_constants(g.numels))
        else:
            add(g.dtype, g.count * g.nbytes)
    wdtype = "float32" if cfg.prec.weight == 4 else "bfloat16"
    for b in model.buffers():  # position ids, rotary frequencies
        key = wdtype if b.is_floating_point() else str(b.dtype).replace("torch.", "")
        add(key, b.numel() * (cfg.prec.weight if b.is_floating_point() else b.element_size()))
    return out
