"""What autograd saves for backward, op by op, counted symbolically.

A layer is written as a short program over :class:`Sym` tensors (elements per
token, bytes per element, requires-grad). Each op saves what PyTorch's
derivative formulas keep for the inputs that need a gradient: a linear layer
keeps its input only when its weight trains; a frozen layer on a trainable
path keeps nothing (its weight is the parameter itself); LoRA keeps the input
for ``A`` and the rank-``r`` product for ``B``. A saved tensor is counted once
however many ops save it, as autograd shares storage. The programs in
``loralab.estimate.layers`` are checked against real saved tensors
(``torch.autograd.graph.saved_tensors_hooks``) in the tests.

Per-layer activation memory in the style of Korthikanti et al. 2022,
"Reducing Activation Recomputation in Large Transformer Models" §4.1
(``sbh(34 + 5as/h)`` bytes for a GPT layer in fp16), derived here for the
real dtype, norm, MLP, attention kernel and trainable set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

FP32 = 4

# elements saved per activation input element, by activation name in the config
ACT_SAVES = {
    "gelu": 1, "gelu_pytorch_tanh": 1, "silu": 1, "swish": 1, "relu": 1,
    # transformers' NewGELUActivation is written out in Python:
    # 0.5 * x * (1 + tanh(c * (x + 0.044715 x^3))) keeps x, tanh(.), 0.5x, 1 + tanh(.)
    "gelu_new": 4, "gelu_fast": 4, "quick_gelu": 2,
}
# hidden_act names whose gated MLP product train/gated_mlp.py runs as one
# function (the activation is one torch call): it keeps gate and up, not act(gate)
GATED_ACTS = ("silu", "swish", "gelu", "gelu_pytorch_tanh")


@dataclass(eq=False)
class Sym:
    """A tensor per token: ``elems`` elements of ``nbytes`` bytes each."""

    elems: float
    nbytes: int
    rg: bool  # requires grad
    view_of: Sym | None = None  # a view keeps its base's whole storage alive


@dataclass
class Regime:
    """Which weights train and how the step is computed.

    ``trainable(name)`` -> the module's own weights get gradients;
    ``lora(name)`` -> the module is wrapped by LoRA of rank ``rank``.
    """

    act_bytes: int  # bytes of one activation element (4 fp32, 2 bf16)
    seq: int  # tokens per sequence (for attention scores)
    trainable: callable
    lora: callable
    rank: int = 0
    lora_bytes: int = FP32  # dtype of the LoRA weights (the input is cast to it)
    lora_dropout: float = 0.0
    dora: bool = False  # DoRA on every LoRA layer (lora/layer.py ``_dora``)
    device: str = "cuda"  # "cuda" | "cpu": picks the attention kernel and the mask dtype
    attn_impl: str = "sdpa"  # the config's attention: "sdpa", "eager", "flash_attention_2"
    padded: bool = True  # a padding mask reaches attention (GQA keys get repeated)
    experts_impl: str = "grouped_mm"  # the config's MoE kernel: "eager" loops over experts
    # LoRA on 3-D parameters (LoRAParam, --target-parameters): {module: [parameter]}
    lora_params: dict = field(default_factory=dict)
    weight_bytes: int = FP32  # dtype of the base weights (a merged W + BA is one)
    training: bool = True

    def mask_bytes(self, nbytes: int) -> int:
        """A dropout mask element: CUDA's fused dropout keeps a bool, the CPU
        path a float noise tensor of the input's dtype."""
        return nbytes if self.device == "cpu" else 1

    def fused_attention(self, dropout: float) -> bool:
        """Whether attention runs a kernel that keeps no (T x T) scores.

        PyTorch's SDPA on CUDA has flash / memory-efficient kernels with
        dropout; on CPU its flash kernel takes no dropout, so a training step
        with attention dropout (BERT, GPT-2) falls back to the math path.
        """
        if self.attn_impl == "eager":
            return False
        if self.attn_impl == "sdpa" and self.device == "cpu":
            return not (dropout and self.training)
        return True

    def repeats_kv(self) -> bool:
        """GQA keys/values are expanded to every head (``repeat_kv``) by eager
        attention, and by SDPA whenever a mask is passed (transformers'
        ``use_gqa_in_sdpa``); flash-attention-2 reads them as they are."""
        if self.attn_impl == "flash_attention_2":
            return False
        return self.attn_impl == "eager" or self.padded


@dataclass
class Tape:
    regime: Regime
    saved: dict = field(default_factory=dict)  # id -> (Sym, bytes)
    fixed: float = 0.0  # saved bytes that do not grow with the tokens (merged weights)

    # -- bookkeeping ------------------------------------------------------
    def new(self, elems: float, rg: bool, nbytes: int | None = None) -> Sym:
        return Sym(elems, self.regime.act_bytes if nbytes is None else nbytes, rg)

    def save(self, t: Sym) -> None:
        t = t.view_of or t
        self.saved[id(t)] = (t, t.elems * t.nbytes)

    def bytes(self) -> float:
        return sum(b for _, b in self.saved.values())

    # -- ops --------------------------------------------------------------
    def input(self, elems: float, rg: bool = False) -> Sym:
        return self.new(elems, rg)

    def embedding(self, name: str, elems: float) -> Sym:
        """Lookup: keeps the int64 ids when the table trains."""
        train = self.regime.trainable(name)
        if train:
            self.save(self.new(1, False, nbytes=8))
        return self.new(elems, train)

    def linear(self, x: Sym, name: str, out: float) -> Sym:
        r = self.regime
        train, lora = r.trainable(name), r.lora(name)
        if train:
            self.save(x)  # dW = dy^T x
        if lora:
            self._lora_branch(x)
            if r.dora:  # (scale - 1) * base + scale * lora: both products keep their input
                self.save(self.new(out, True, nbytes=r.lora_bytes))  # base = Wx (or W x_drop)
                self.save(self.new(out, True, nbytes=r.lora_bytes))  # lora = s BAx
        return self.new(out, x.rg or train or lora)

    def _lora_branch(self, x: Sym) -> None:
        r = self.regime
        xin = x
        if r.lora_bytes != x.nbytes:  # x.to(A.weight.dtype)
            xin = self.new(x.elems, x.rg, nbytes=r.lora_bytes)
        if r.lora_dropout > 0 and r.training:
            if not r.dora:  # LoRABranch: x itself and a bool keep-mask
                self.save(self.new(xin.elems, False, nbytes=1))
            else:  # DoRA's dropout module: its mask, and the dropped copy for dA
                if xin.rg:
                    self.save(self.new(xin.elems, False, nbytes=r.mask_bytes(xin.nbytes)))
                xin = self.new(xin.elems, xin.rg, nbytes=xin.nbytes)
        self.save(xin)  # dA needs A's input
        self.save(self.new(r.rank, True, nbytes=r.lora_bytes))  # dB needs A x

    def rmsnorm(self, x: Sym, name: str, rows: int = 1, w32: bool = False) -> Sym:
        """transformers' Python RMSNorm over ``rows`` groups per token:
        h32 = x.float(); h32 * rsqrt(mean(h32^2) + eps); then Llama's
        ``w * that.to(dtype)`` keeps the normalised input in the activation
        dtype for dw, Gemma's ``(that * (1 + w)).to(dtype)`` and OLMo 2's
        ``(w * that).to(dtype)`` (``w32``) keep it in fp32."""
        train = self.regime.trainable(name)
        if x.rg:
            x32 = x if x.nbytes == FP32 else self.new(x.elems, True, nbytes=FP32)
            self.save(x32)  # pow and the mul by rsqrt
            self.save(self.new(rows, True, nbytes=FP32))  # rsqrt(...)
        if train:
            self.save(self.new(x.elems, x.rg, nbytes=FP32 if w32 else None))
        return self.new(x.elems, x.rg or train)

    def layernorm(self, x: Sym, name: str, rows: float = 1) -> Sym:
        """ATen's fused layer norm: input plus mean and rstd (fp32) per row
        (``rows`` rows per token: 1 / T for a pooled (B, h) input)."""
        train = self.regime.trainable(name)
        if x.rg or train:
            self.save(x)
            # mean and rstd: fp32 on CUDA, the input's dtype on CPU
            stats = FP32 if self.regime.device == "cuda" else x.nbytes
            self.save(self.new(2 * rows, False, nbytes=stats))
        return self.new(x.elems, x.rg or train)

    def act(self, x: Sym, fn: str) -> Sym:
        if x.rg:
            self.save(x)
            for _ in range(ACT_SAVES.get(fn, 1) - 1):
                self.save(self.new(x.elems, True))
        return self.new(x.elems, x.rg)

    def mul(self, a: Sym, b: Sym) -> Sym:
        if a.rg:
            self.save(b)
        if b.rg:
            self.save(a)
        return self.new(a.elems, a.rg or b.rg)

    def gated(self, gate: Sym, up: Sym, fn: str) -> Sym:
        """``act(gate) * up`` of a SwiGLU/GeGLU MLP in training: train/gated_mlp.py
        keeps ``gate`` (and ``up`` when ``gate`` needs a gradient) and recomputes
        the activation; other activations run as plain ops."""
        if fn not in GATED_ACTS:
            return self.mul(self.act(gate, fn), up)
        if gate.rg or up.rg:
            self.save(gate)
        if gate.rg:
            self.save(up)
        return self.new(gate.elems, gate.rg or up.rg)

    def add(self, a: Sym, b: Sym) -> Sym:
        return self.new(a.elems, a.rg or b.rg)

    def dropout(self, x: Sym, p: float) -> Sym:
        if not p or not self.regime.training:
            return x
        if x.rg:
            self.save(self.new(x.elems, False, nbytes=self.regime.mask_bytes(x.nbytes)))
        return self.new(x.elems, x.rg)

    def attention(self, q: Sym, k: Sym, v: Sym, heads: int, head_dim: int, kv_heads: int,
                  dropout: float = 0.0, softmax_bytes: int | None = None,
                  softcap: float = 0.0) -> Sym:
        """Scaled dot-product attention; returns the input of the output projection."""
        r = self.regime
        rg = q.rg or k.rg or v.rg
        full = heads * head_dim
        fused = r.fused_attention(dropout) and not softcap
        # repeat_kv copies k and v to every head; with one kv head its expand is a
        # view, which the fused kernels read as it is and matmul still copies
        if kv_heads != heads and r.repeats_kv() and (kv_heads > 1 or not fused):
            k, v = self.new(full, k.rg), self.new(full, v.rg)
        if fused:
            if rg and r.padded and r.attn_impl == "sdpa" and r.device == "cpu":
                # the CPU kernel takes a float (B, 1, T, T) mask, made per layer
                self.save(self.new(r.seq, False))
            return self._flash(q, k, v, heads, full, rg)
        return self._math(q, k, v, heads, full, rg, dropout, softmax_bytes, softcap)

    def _flash(self, q, k, v, heads, full, rg) -> Sym:
        """Flash / memory-efficient kernels keep q, k, v, the output and the
        log-sum-exp (fp32, one per head); the output feeds o_proj as a view."""
        out = self.new(full, rg)
        if rg:
            for t in (q, k, v, out):
                self.save(t)
            self.save(self.new(heads, False, nbytes=FP32))
        return out

    def _math(self, q, k, v, heads, full, rg, dropout, softmax_bytes, softcap=0.0) -> Sym:
        """Unfused attention keeps the (heads x T) probabilities per token.

        PyTorch's math SDPA computes bf16/fp16 inputs in fp32 (upcast copies of
        q, k, v); transformers' eager attention keeps the input dtype and runs
        only the softmax in fp32 for Llama-style models. Gemma 2's soft-cap
        ``tanh(scores / c) * c`` keeps the tanh output (eager only).
        """
        r = self.regime
        if not rg:
            return self.new(full, False)
        nbytes = FP32 if r.attn_impl == "sdpa" else r.act_bytes
        softmax_bytes = FP32 if r.attn_impl == "sdpa" else (softmax_bytes or r.act_bytes)
        scores = heads * r.seq  # (B, heads, T, T) elements / (B T)
        for _ in (q, k):  # Q K^T keeps both operands (scaled copies on the math path)
            self.save(self.new(full, True, nbytes=nbytes))
        if softcap:
            self.save(self.new(scores, True, nbytes=nbytes))  # tanh output
        self.save(self.new(scores, True, nbytes=softmax_bytes))  # softmax backward
        if dropout and r.training:
            self.save(self.new(scores, False, nbytes=r.mask_bytes(nbytes)))
            self.save(self.new(scores, True, nbytes=nbytes))  # dropped probabilities
        elif softmax_bytes != nbytes:
            self.save(self.new(scores, True, nbytes=nbytes))  # softmax(fp32).to(dtype)
        self.save(v if v.nbytes == nbytes else self.new(full, True, nbytes=nbytes))
        return self.new(full, True)  # (B, heads, T, d) -> (B, T, heads*d) copy
