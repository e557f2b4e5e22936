"""Put parameters, optimizer and activations together into one step's peak.

Gradients and activations never peak together: the backward frees each
layer's saved tensors as that layer's gradients appear, and gradients are
dropped (``zero_grad(set_to_none=True)``, PyTorch's default) before the next
forward. So the peak is the resident state (weights, master copy, optimizer
moments) plus the larger of

- the start of the backward: every saved activation, the logits and their
  gradient, one layer's gradients in flight and the QLoRA dequantization
  buffer; and
- the optimizer step: every gradient at once.
"""

from __future__ import annotations

from loralab.errors import LoralabError
from loralab.estimate.activations import CAUSAL_TASKS, count_activations
from loralab.estimate.formula import (
    CPU_CLASSIFY_EXTRA,
    CPU_PROCESS_BYTES,
    CPU_QLORA_EXTRA,
    CPU_RSS_MEASURED_RATIO,
    CUDA_CONTEXT_BYTES,
    OPTIMIZERS,
    Estimate,
    EstimateConfig,
    expert_targets,
    lora_bytes,
    optimizer_bytes,
    param_groups,
    quantized_linears,
    weights_by_dtype,
)
from loralab.estimate.layers import arch_of
from loralab.estimate.spec import ModelSpec
from loralab.estimate.tape import Regime

MAX_BATCH = 1 << 20


class Estimator:
    """Everything that does not depend on the batch size, computed once."""

    def __init__(self, spec: ModelSpec, cfg: EstimateConfig):
        cfg.check()
        if cfg.method == "head" and spec.task in CAUSAL_TASKS:
            raise LoralabError("method 'head' trains a classification head and does not fit "
                               f"task '{spec.task}'.", hint="Fix: use --method lora, qlora "
                               "or full.")
        self.spec, self.cfg = spec, cfg
        self.arch = arch_of(spec.config, spec.model)
        self.groups, self.targets, self.heads = param_groups(spec, cfg)
        self.by_dtype = weights_by_dtype(self.groups, spec.model, cfg)
        self.expert_targets = expert_targets(spec, cfg)
        self._acts = {}
        self._static = self.static_bytes()
        self._params = self.params()
        self._dequant = 0  # elements of the largest NF4 weight
        if cfg.method == "qlora":
            model = spec.model
            self._dequant = max((model.get_submodule(n).weight.numel()
                                 for n in quantized_linears(model)), default=0)
        # DoRA's weight norm, ||W + sBA|| per output, builds sBA and W + sBA for one
        # layer at a time (no graph: lora/layer.py ``_dora``)
        self._dora_temp = 0
        if cfg.use_dora and cfg.method in ("lora", "qlora") and self.targets:
            self._dora_temp = 2 * max(spec.model.get_submodule(n).weight.numel()
                                      for n in self.targets)

    # -- static parts ----------------------------------------------------------
    def params(self) -> dict:
        g = {x.label: x.count for x in self.groups}
        total = sum(x.count for x in self.groups)
        trainable = sum(x.count for x in self.groups if x.trainable)
        return {"total": total, "trainable": trainable,
                "trainable_percent": round(100.0 * trainable / total, 4) if total else 0.0,
                "lora": g.get("lora", 0) + g.get("lora experts", 0),
                "quantized": g.get("base NF4", 0),
                "lora_layers": len(self.targets)}

    def static_bytes(self) -> dict:
        trainable = [g for g in self.groups if g.trainable]
        return {"weights": sum(self.by_dtype.values()),
                "master_weights": int(sum(g.count * g.master for g in trainable)),
                "gradients": int(sum(g.count * g.grad for g in trainable)),
                "optimizer": optimizer_bytes(self.groups, self.cfg.optimizer)}

    def regime(self, padded: bool) -> Regime:
        cfg, heads = self.cfg, self.heads
        if cfg.method == "full":
            def trainable(name):
                return True
        else:
            def trainable(name):
                return any(name == h or name.startswith(h + ".") for h in heads)
        return Regime(act_bytes=cfg.prec.act, seq=cfg.seq_len, trainable=trainable,
                      lora=self.targets.__contains__, rank=cfg.rank,
                      lora_params=self.expert_targets, weight_bytes=cfg.prec.weight,
                      lora_bytes=lora_bytes(cfg), lora_dropout=cfg.lora_dropout,
                      dora=cfg.use_dora and cfg.method in ("lora", "qlora"),
                      device=cfg.device, padded=padded,
                      attn_impl=getattr(self.spec.model.config, "_attn_implementation", "sdpa")
                      or "sdpa", experts_impl=getattr(self.spec.model.config,
                                                      "_experts_implementation", None)
                      or "grouped_mm")

    def profile(self, rows: int):
        """Bytes per token each layer saves (``activations.Activations``)."""
        padded = self.cfg.padded
        if padded is None:
            padded = rows > 1  # batches of several texts are padded to the longest
        if padded not in self._acts:
            self._acts[padded] = count_activations(self.arch, self.regime(padded),
                                                   self.spec.task, self.spec.num_labels)
        return self._acts[padded]

    def tokens(self, batch: int | None = None) -> int:
        """Tokens per forward/backward pass: the micro-batch token budget for the
        configured batch, ``batch x seq_len`` for any other (``max_batch_size``)."""
        if batch is None or batch == self.cfg.batch_size:
            return self.cfg.tokens
        return batch * self.cfg.seq_len

    def activations(self, batch: int | None = None) -> dict:
        tokens, seq = self.tokens(batch), self.cfg.seq_len
        return self.profile(max(1, tokens // seq)).total(tokens, seq,
                                                         self.cfg.grad_checkpointing)

    def workspace(self, batch: int | None = None) -> int:
        """One layer's gradients in flight, the largest NF4 weight dequantized to
        the compute dtype (bitsandbytes does it per matmul), autocast's cast
        copies of the trainable weights and DoRA's weight-norm temporaries."""
        a, act = self.arch, self.cfg.prec.act
        ws = self.tokens(batch) * (a.hidden + a.intermediate) * act
        cast = self.cfg.prec.autocast_cache * self._params["trainable"]
        dora = self._dora_temp * lora_bytes(self.cfg)
        return int(ws + act * self._dequant + cast + dora)

    def overhead(self) -> int:
        if not self.cfg.overhead:
            return 0
        if self.cfg.device == "cuda":
            return CUDA_CONTEXT_BYTES
        return (CPU_PROCESS_BYTES + (CPU_CLASSIFY_EXTRA if self.spec.task == "classify" else 0)
                + (CPU_QLORA_EXTRA if self.cfg.method == "qlora" else 0))

    def mapped_checkpoint(self) -> int:
        """On CPU the checkpoint is memory-mapped and QLoRA quantizes from it: the
        pages of the full-precision weights it replaced stay resident while the
        model lives (for the other methods those pages are the weights)."""
        if self.cfg.device != "cpu" or self.cfg.method != "qlora":
            return 0
        return self._params["quantized"] * self.spec.checkpoint_bytes

    # -- one batch size -----------------------------------------------------------
    def at(self, batch: int | None = None) -> Estimate:
        """The peak for the configured pass, or for ``batch`` rows of ``seq_len``."""
        batch = self.cfg.batch_size if batch is None else batch
        b = dict(self._static)
        b.update({k: int(v) for k, v in self.activations(batch).items()})
        b["workspace"] = self.workspace(batch)
        b["mapped_checkpoint"] = self.mapped_checkpoint()
        b["overhead"] = self.overhead()
        b["tensors"] = b["weights"] + b["master_weights"] + b["gradients"] + b["optimizer"]
        backward = b["activations"] + b["logits"] + b["workspace"]
        b["total"] = (b["weights"] + b["master_weights"] + b["optimizer"]
                      + max(backward, b["gradients"]) + b["mapped_checkpoint"]
                      + b["overhead"])
        if self.cfg.device == "cpu" and self.cfg.overhead:  # what RSS has measured at
            lo, hi = CPU_RSS_MEASURED_RATIO
            b["rss_low"], b["rss_high"] = int(b["total"] * lo), int(b["total"] * hi)
        cfg = self.cfg if batch == self.cfg.batch_size else _with_batch(self.cfg, batch)
        return Estimate(self.spec.name, self.spec.model_type, self.spec.task, cfg,
                        dict(self._params), b, dict(self.by_dtype), self.assumptions(),
                        approximate=self.arch.approximations(self.cfg.seq_len))

    def max_batch_size(self, capacity: int) -> int:
        """Largest batch whose peak fits ``capacity`` bytes (0: not even 1)."""
        if self.at(1).total > capacity:
            return 0
        lo, hi = 1, 2
        while hi <= MAX_BATCH and self.at(hi).total <= capacity:
            lo, hi = hi, hi * 2
        hi = min(hi, MAX_BATCH + 1)
        while hi - lo > 1:  # invariant: lo fits, hi does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.at(mid).total <= capacity else (lo, mid)
        return lo

    def assumptions(self) -> list[str]:
        cfg, p = self.cfg, self.cfg.prec
        out = [f"precision {p.name}: {p.note}", f"optimizer {cfg.optimizer}: "
               + OPTIMIZERS[cfg.optimizer]]
        if cfg.method == "qlora":
            out.append("NF4 + double quantization: 4 + 0.127 bits per quantized weight "
                       "(QLoRA §3); norms, embeddings and the head stay in "
                       f"{'fp32' if p.weight == 4 else 'bf16'}; LoRA weights in fp32")
        attn = self.regime(True)
        kernel = "fused (no T x T scores)" if attn.fused_attention(self.arch.attn_dropout) \
            else "unfused (keeps T x T probabilities)"
        out.append(f"attention: {attn.attn_impl} on {cfg.device}, {kernel}")
        if cfg.micro_batch_tokens:
            out.append(f"micro-batch token budget {cfg.micro_batch_tokens}: "
                       f"{cfg.tokens // cfg.seq_len} rows of {cfg.seq_len} tokens per pass "
                       "(more, shorter rows fill the same budget)")
        if self.spec.task in CAUSAL_TASKS:
            out.append("causal-LM loss: " + ("chunked over the labelled positions (at most "
                       "2^25 fp32 logits live, train/lm_loss.py); every position counted "
                       "as labelled" if self.arch.chunked else "plain (B, T, V) logits"))
        out += [f"approximate: {n}" for n in self.arch.approximations(cfg.seq_len)]
        if cfg.grad_checkpointing:
            out.append("gradient checkpointing: each layer keeps its input; one layer "
                       "is recomputed at a time")
        out.append("peak = weights + master + optimizer + max(activations + logits + "
                   "workspace, gradients) + "
                   + ("mapped checkpoint + " if self.mapped_checkpoint() else "") + "overhead")
        out.append("overhead: " + ("CUDA context ~0.5 GB" if cfg.device == "cuda"
                                   else "CPU process of `loralab train` (measured, BENCHMARKS.md)")
                   if cfg.overhead else "overhead: not counted")
        if cfg.device == "cpu":
            lo, hi = CPU_RSS_MEASURED_RATIO
            out.append(f"CPU: live memory; glibc keeps freed blocks for reuse, so the peak "
                       f"RSS `loralab train` measures has been {lo:g}-{hi:g}x this estimate "
                       "(BENCHMARKS.md, estimate vs measured)")
        return out


def _with_batch(cfg: EstimateConfig, batch: int) -> EstimateConfig:
    from dataclasses import replace

    return replace(cfg, batch_size=batch, micro_batch_tokens=None)


def estimate(spec: ModelSpec, cfg: EstimateConfig) -> Estimate:
    return Estimator(spec, cfg).at()
