"""Per-architecture layer programs for the activation count (see ``tape``).

Each program mirrors the forward of one transformers layer: the same ops in
the same order, with the module names LoRA targets use. The families:

- Llama-style decoders (Llama, Mistral, Qwen2, Qwen3 with q/k norms; RMSNorm,
  SwiGLU, GQA, RoPE), and Qwen3-MoE: Qwen3's attention, a router and top-k
  experts in place of the MLP;
- Gemma 2 / Gemma 3: norms before *and* after attention and MLP (the "sandwich"),
  ``(1 + w)`` RMSNorm in fp32, GELU-tanh; Gemma 2's tanh soft-capped scores;
- OLMo 2: norms after attention and MLP only, q/k norms over the whole projection;
- Phi-3: fused ``qkv_proj`` and ``gate_up_proj``, residual dropout;
- BERT-style post-LN encoders (BERT, RoBERTa, XLM-R, ELECTRA), DeBERTa-v2
  (unfused attention, a padding mask per layer), ModernBERT (pre-LN, fused
  ``Wqkv``, GeGLU, RoPE), DistilBERT, and GPT-2 (pre-LN, fused qkv Conv1D, GELU-tanh).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from loralab.estimate.tape import FP32, Sym, Tape

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")
BERT_TYPES = ("bert", "roberta", "xlm-roberta", "electra")
FAMILIES = {**dict.fromkeys(LLAMA_TYPES, "llama"), **dict.fromkeys(BERT_TYPES, "bert"),
            "gemma2": "gemma", "gemma3_text": "gemma", "olmo2": "olmo2", "phi3": "phi3",
            "deberta-v2": "deberta", "modernbert": "modernbert", "distilbert": "distilbert",
            "gpt2": "gpt2"}
DECODER_FAMILIES = ("llama", "gemma", "olmo2", "phi3", "gpt2")
# Normalisations written as ``(w * x_normed).to(dtype)``: the weight's gradient
# keeps the fp32 normalised input (Llama's casts first and keeps it in the
# activation dtype).
FP32_NORM_FAMILIES = ("gemma", "olmo2")


@dataclass
class Arch:
    """The shape facts of a model that the activation count needs."""

    family: str  # a value of FAMILIES
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    act: str
    attn_dropout: float
    hidden_dropout: float
    embd_dropout: float
    cls_dropout: float
    qk_norm: str  # "" | "head" (RMSNorm per head: Qwen3, Gemma 3) | "proj" (OLMo 2)
    type_vocab: int
    layer_prefix: str  # e.g. "model.layers"
    names: dict  # role -> module name: embed, final_norm, head, pooler, pre_classifier
    model_type: str = ""
    attn_softcap: float = 0.0  # Gemma 2: tanh(scores / c) * c
    final_softcap: float = 0.0  # Gemma 2: tanh(logits / c) * c
    experts: int = 0  # MoE: experts per sparse layer
    top_k: int = 0  # MoE: experts each token is routed to
    moe_intermediate: int = 0
    sparse_layers: frozenset = frozenset()
    embed_dim: int = 0  # ELECTRA / DeBERTa embedding_size (0: hidden)
    pooler_dropout: float = 0.0  # DeBERTa's ContextPooler
    pooler_act: str = "gelu"  # DeBERTa's pooler, ModernBERT's prediction head
    chunked: bool = False  # the causal-LM loss runs chunked (``train.lm_loss``)
    sliding_window: int = 0  # Gemma 2/3, ModernBERT: local attention layers' window
    approx: list = field(default_factory=list)  # where a program is not exact, and why

    def approximations(self, seq: int) -> list[str]:
        """``approx``, plus what a sequence longer than the sliding window changes."""
        if self.sliding_window and seq > self.sliding_window:
            note = (f"sliding-window layers (window {self.sliding_window} < seq {seq}) "
                    "counted like global ones: their mask is made even without padding")
            return [*self.approx, note]
        return list(self.approx)


def _find(model: nn.Module, *suffixes: str) -> str:
    for name, _ in model.named_modules():
        if any(name == s or name.endswith("." + s) for s in suffixes):
            return name
    return suffixes[0]


def _layer_prefix(model: nn.Module, n_layers: int) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name:
            return name
    raise ValueError("no list of layers found")


def arch_of(config, model: nn.Module) -> Arch:
    """Read the shapes of ``config`` (model_type checked by ``spec.check_fields``)."""
    c, mtype = config, config.model_type
    h, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    family = FAMILIES[mtype]
    head_dim = getattr(c, "head_dim", None) or h // heads
    inter = {"distilbert": getattr(c, "hidden_dim", 0),
             "gpt2": getattr(c, "n_inner", None) or 4 * h}.get(family) or c.intermediate_size
    act = {"distilbert": getattr(c, "activation", "gelu"),
           "gpt2": getattr(c, "activation_function", "gelu_new")}.get(family) \
        or getattr(c, "hidden_activation", None) or c.hidden_act
    drops = _dropouts(c, family)
    names = {"embed": _find(model, "embed_tokens", "word_embeddings", "wte", "tok_embeddings"),
             "final_norm": _find(model, "norm", "ln_f", "final_norm"),
             "head": _find(model, "lm_head", "score", "classifier"),
             "pooler": _find(model, "pooler.dense"),
             "pre_classifier": _find(model, "pre_classifier"),
             "embed_project": _find(model, "embeddings_project")}
    if family == "modernbert":
        names["final_norm"] = _find(model, "final_norm")
    qk = "head" if mtype in ("qwen3", "qwen3_moe", "gemma3_text") else \
        "proj" if mtype == "olmo2" else ""
    arch = Arch(family, layers, h, heads, getattr(c, "num_key_value_heads", None) or heads,
                head_dim, inter, c.vocab_size, act, *drops, qk_norm=qk,
                type_vocab=getattr(c, "type_vocab_size", 0) or 0,
                layer_prefix=_layer_prefix(model, layers), names=names, model_type=mtype,
                attn_softcap=float(getattr(c, "attn_logit_softcapping", 0) or 0),
                final_softcap=float(getattr(c, "final_logit_softcapping", 0) or 0),
                embed_dim=getattr(c, "embedding_size", None) or h,
                pooler_dropout=float(getattr(c, "pooler_dropout", 0.0) or 0.0),
                pooler_act=getattr(c, "pooler_hidden_act", None)
                or getattr(c, "classifier_activation", None) or "gelu",
                chunked=_chunked(model))
    if mtype == "qwen3_moe":
        _moe_facts(arch, c)
    _approximations(arch, c)
    return arch


def _chunked(model: nn.Module) -> bool:
    """Whether ``loralab train`` computes this model's causal-LM loss in chunks."""
    from loralab.train.lm_loss import chunkable

    return chunkable(model)


def _moe_facts(a: Arch, c) -> None:
    """Which layers are sparse: transformers' Qwen3MoeDecoderLayer rule."""
    a.experts, a.top_k = c.num_experts, c.num_experts_per_tok
    a.moe_intermediate = c.moe_intermediate_size
    only = set(getattr(c, "mlp_only_layers", None) or ())
    step = getattr(c, "decoder_sparse_step", 1) or 1
    a.sparse_layers = frozenset(i for i in range(a.layers)
                                if i not in only and a.experts > 0 and (i + 1) % step == 0)


def _approximations(a: Arch, c) -> None:
    if a.experts:
        a.approx.append("MoE experts: k of E routed rows per token, as transformers' "
                        "grouped_mm and eager expert kernels save them on CPU (checked "
                        "there); other kernels (deepgemm, sonicmoe) may keep other buffers")
    if a.family == "deberta" and getattr(c, "relative_attention", False):
        a.approx.append("DeBERTa-v2 disentangled attention (c2p/p2c position scores) "
                        "not counted: activations are a lower bound")
    if a.family in ("gemma", "modernbert"):
        a.sliding_window = int(getattr(c, "sliding_window", 0) or 0)


def _dropouts(c, family: str) -> tuple[float, float, float, float]:
    """(attention, hidden, embedding, classifier) dropout probabilities."""
    if family in ("llama", "gemma", "olmo2"):
        return float(getattr(c, "attention_dropout", 0.0) or 0.0), 0.0, 0.0, 0.0
    if family == "phi3":
        return (float(c.attention_dropout or 0.0), float(c.resid_pdrop or 0.0),
                float(c.embd_pdrop or 0.0), 0.0)
    if family == "gpt2":
        return c.attn_pdrop, c.resid_pdrop, c.embd_pdrop, getattr(c, "summary_first_dropout", 0.1)
    if family == "distilbert":
        return c.attention_dropout, c.dropout, c.dropout, c.seq_classif_dropout
    if family == "modernbert":
        return (float(c.attention_dropout), float(c.mlp_dropout), float(c.embedding_dropout),
                float(c.classifier_dropout))
    cls = getattr(c, "classifier_dropout", None)
    if family == "deberta":
        cls = getattr(c, "pooler_dropout", 0.0) if cls is None else cls
    return (c.attention_probs_dropout_prob, c.hidden_dropout_prob, c.hidden_dropout_prob,
            c.hidden_dropout_prob if cls is None else cls)


# -- decoder layers: (tape, arch, x, "prefix.i.") -> layer output --------------

def _norm(t: Tape, a: Arch, x: Sym, name: str, rows: int = 1) -> Sym:
    return t.rmsnorm(x, name, rows=rows, w32=a.family in FP32_NORM_FAMILIES)


def _self_attention(t: Tape, a: Arch, n: Sym, p: str) -> Sym:
    """q/k/v (fused for Phi-3), q/k norms, RoPE, attention, o_proj."""
    p += "self_attn."
    qd, kd = a.heads * a.head_dim, a.kv_heads * a.head_dim
    if a.family == "phi3":
        qkv = t.linear(n, p + "qkv_proj", qd + 2 * kd)  # (B, T, (h + 2 kv) d)
        q, k, v = (Sym(e, qkv.nbytes, qkv.rg, view_of=qkv) for e in (qd, kd, kd))
    else:
        q, k, v = (t.linear(n, p + s, d) for s, d in (("q_proj", qd), ("k_proj", kd),
                                                       ("v_proj", kd)))
    if a.qk_norm == "head":  # Qwen3, Gemma 3: RMSNorm over each head's d
        q, k = _norm(t, a, q, p + "q_norm", rows=a.heads), _norm(t, a, k, p + "k_norm",
                                                                   rows=a.kv_heads)
    elif a.qk_norm == "proj":  # OLMo 2: over the whole projection
        q, k = _norm(t, a, q, p + "q_norm"), _norm(t, a, k, p + "k_norm")
    q, k = t.new(q.elems, q.rg), t.new(k.elems, k.rg)  # RoPE: q*cos + rot(q)*sin
    o = t.attention(q, k, v, a.heads, a.head_dim, a.kv_heads, a.attn_dropout,
                    softmax_bytes=4, softcap=a.attn_softcap)  # eager softmax in fp32
    if a.family == "phi3":  # strided q/k/v views: the kernel's output is laid out
        o = t.new(o.elems, o.rg)  # (B, h, T, d), so o_proj reads a contiguous copy
    return t.linear(o, p + "o_proj", a.hidden)


def _mlp(t: Tape, a: Arch, n: Sym, p: str) -> Sym:
    if a.experts and _index(p) in a.sparse_layers:
        return moe_mlp(t, a, n, p + "mlp.")
    if a.family == "phi3":  # gate_up_proj(x).chunk(2): gate and up are views
        gu = t.linear(n, p + "mlp.gate_up_proj", 2 * a.intermediate)  # (B, T, 2I)
        gate, up = (Sym(a.intermediate, gu.nbytes, gu.rg, view_of=gu) for _ in range(2))
        h = t.gated(gate, up, a.act)
    else:
        gate = t.linear(n, p + "mlp.gate_proj", a.intermediate)  # (B, T, I)
        h = t.gated(gate, t.linear(n, p + "mlp.up_proj", a.intermediate), a.act)
    return t.linear(h, p + "mlp.down_proj", a.hidden)


def _index(prefix: str) -> int:
    return int(prefix.rstrip(".").rsplit(".", 1)[1])


def moe_mlp(t: Tape, a: Arch, n: Sym, p: str) -> Sym:
    """Router + top-k experts (transformers' Qwen3MoeSparseMoeBlock): per token,
    the E router probabilities (fp32) and k routed rows through an expert's
    gate_up / act / down, weighted by the router. Counted per token at k
    expert rows each, whatever the experts' load balance."""
    k, inter, r = a.top_k, a.moe_intermediate, t.regime
    logits = t.linear(n, p + "gate", a.experts)  # (B, T, E)
    if logits.rg:
        t.save(t.new(a.experts, True, nbytes=FP32))  # softmax(dtype=float) output
        t.save(t.new(k, False, nbytes=8))  # topk indices
    # gather / sort / scatter indices, int64 per routed row: eager's loop keeps
    # one (rows, 2) `where` result, grouped_mm three permutations
    idx = 16 if r.experts_impl == "eager" else 24
    full = r.trainable(p + "experts")
    adapted = r.lora_params.get(p + "experts", ())
    # LoRAParam runs the experts on W + BA, a tensor of its own the matmuls save
    per = {"gate_up_proj": 2 * inter * a.hidden, "down_proj": inter * a.hidden}
    t.fixed += sum(a.experts * per[name] * r.weight_bytes for name in adapted)
    train_gu, train_down = full or "gate_up_proj" in adapted, full or "down_proj" in adapted
    if n.rg or train_gu or train_down:
        t.save(t.new(k * idx / 8, False, nbytes=8))
    rows = t.new(k * a.hidden, n.rg)  # (S, h): the routed copies of the input
    if train_gu:
        t.save(rows)  # dW_gate_up = dy^T x per expert
    gu = t.new(k * 2 * inter, n.rg or train_gu)  # (S, 2I)
    gate, up = (Sym(k * inter, gu.nbytes, gu.rg, view_of=gu) for _ in range(2))
    h = t.mul(t.act(gate, a.act), up)  # (S, I)
    if train_down:
        t.save(h)  # dW_down
    out = t.new(k * a.hidden, h.rg or train_down)  # (S, h)
    weights = Sym(k, r.act_bytes, logits.rg)  # routing weights of the rows
    t.mul(out, weights)
    return t.new(a.hidden, out.rg or weights.rg)  # summed over the k rows


def llama_layer(t: Tape, a: Arch, x: Sym, p: str) -> Sym:
    """Llama / Mistral / Qwen2 / Qwen3 / Qwen3-MoE / Phi-3: pre-norm residual blocks."""
    o = _self_attention(t, a, _norm(t, a, x, p + "input_layernorm"), p)
    x = t.add(x, t.dropout(o, a.hidden_dropout))  # Phi-3's resid_attn_dropout
    m = _mlp(t, a, _norm(t, a, x, p + "post_attention_layernorm"), p)
    return t.add(x, t.dropout(m, a.hidden_dropout))


def gemma_layer(t: Tape, a: Arch, x: Sym, p: str) -> Sym:
    """Gemma 2 / 3: each block normed before and after (pre- and post-norm)."""
    o = _self_attention(t, a, _norm(t, a, x, p + "input_layernorm"), p)
    x = t.add(x, _norm(t, a, o, p + "post_attention_layernorm"))
    m = _mlp(t, a, _norm(t, a, x, p + "pre_feedforward_layernorm"), p)
    return t.add(x, _norm(t, a, m, p + "post_feedforward_layernorm"))


def olmo2_layer(t: Tape, a: Arch, x: Sym, p: str) -> Sym:
    """OLMo 2: the norm after each block only (x + norm(block(x)))."""
    x = t.add(x, _norm(t, a, _self_attention(t, a, x, p), p + "post_attention_layernorm"))
    return t.add(x, _norm(t, a, _mlp(t, a, x, p), p + "post_feedforward_layernorm"))


def gpt2_layer(t: Tape, a: Arch, x: Sym, p: str) -> Sym:
    n = t.layernorm(x, p + "ln_1")
    qkv = t.linear(n, p + "attn.c_attn", 3 * a.hidden)  # (B, T, 3h); q, k, v are views
    q, k, v = (Sym(a.hidden, qkv.nbytes, qkv.rg) for _ in range(3))
    o = t.attention(q, k, v, a.heads, a.head_dim, a.heads, a.attn_dropout)
    x = t.add(x, t.dropout(t.linear(o, p + "attn.c_proj", a.hidden), a.hidden_dropout))
    n = t.layernorm(x, p + "ln_2")
    f = t.act(t.linear(n, p + "mlp.c_fc", a.intermediate), a.act)  # (B, T, 4h)
    return t.add(x, t.dropout(t.linear(f, p + "mlp.c_proj", a.hidden), a.hidden_dropout))


# -- encoder layers ----------------------------------------------------------------

def bert_layer(t: Tape, a: Arch, x: Sym, p: str) -> Sym:
    q = t.linear(x, p + "attention.self.query", a.hidden)
    k = t.linear(x, p + "attention.self.key", a.hidden)
    v = t.linear(x, p + "attention.self.value", a.hidden)
    o = t.attention(q, k, v, a.heads, a.head_dim, a.heads, a.attn_dropout)
    return _bert_output(t, a, x, o, p)


def _bert_output(t: Tape, a: Arch, x: Sym, o: Sym, p: str) -> Sym:
    o = t.dropout(t.linear(o, p + "attention.output.dense", a.hidden), a.hidden_dropout)
    x = t.layernorm(t.add(o, x), p + "attention.output.LayerNorm")
    f = t.act(t.linear(x, p + "intermediate.dense", a.intermediate), a.act)  # (B, T, I)
    f = t.dropout(t.linear(f, p + "output.dense", a.hidden), a.hidden_dropout)
    return t.layernorm(t.add(f, x), p + "output.LayerNorm")


def deberta_layer(t: Tape, a: Arch, x: Sym, p: str) -> Sym:
    """DeBERTa-v2's own attention (always unfused, bmm): contiguous per-head
    copies of q, k/scale and v, the bool mask ``masked_fill`` keeps (made per
    layer from the shared (B, 1, T, T) mask) and the probabilities."""
    q, k, v = (t.linear(x, p + f"attention.self.{s}_proj", a.hidden)
               for s in ("query", "key", "value"))
    r, rg = t.regime, q.rg or k.rg or v.rg
    if rg:
        for _ in range(3):  # q copy, k / scale, v copy: (B*heads, T, d)
            t.save(t.new(a.hidden, True))
        t.save(t.new(r.seq, False, nbytes=1))  # ~mask, (B, 1, T, T) bool
        t.save(t.new(a.heads * r.seq, True))  # softmax output, (B, heads, T, T)
        if a.attn_dropout and r.training:
            t.save(t.new(a.heads * r.seq, False, nbytes=r.mask_bytes(r.act_bytes)))
            t.save(t.new(a.heads * r.seq, True))
    return _bert_output(t, a, x, t.new(a.hidden, rg), p)


def modernbert_layer(t: Tape, a: Arch, x: Sym, p: str) -> Sym:
    """ModernBERT: pre-LN (none before the first layer's attention), fused Wqkv,
    RoPE, GeGLU ``act(input) * gate`` from one Wi."""
    n = x if _index(p) == 0 else t.layernorm(x, p + "attn_norm")
    qkv = t.linear(n, p + "attn.Wqkv", 3 * a.hidden)  # (B, T, 3h); q, k, v are views
    v = Sym(a.hidden, qkv.nbytes, qkv.rg, view_of=qkv)
    q, k = t.new(a.hidden, qkv.rg), t.new(a.hidden, qkv.rg)  # RoPE
    o = t.attention(q, k, v, a.heads, a.head_dim, a.heads, a.attn_dropout)
    x = t.add(x, t.dropout(t.linear(o, p + "attn.Wo", a.hidden), a.attn_dropout))
    wi = t.linear(t.layernorm(x, p + "mlp_norm"), p + "mlp.Wi", 2 * a.intermediate)
    inp, gate = (Sym(a.intermediate, wi.nbytes, wi.rg, view_of=wi) for _ in range(2))
    h = t.dropout(t.mul(t.act(inp, a.act), gate), a.hidden_dropout)  # (B, T, I)
    return t.add(x, t.linear(h, p + "mlp.Wo", a.hidden))


def distilbert_layer(t: Tape, a: Arch, x: Sym, p: str) -> Sym:
    q = t.linear(x, p + "attention.q_lin", a.hidden)
    k = t.linear(x, p + "attention.k_lin", a.hidden)
    v = t.linear(x, p + "attention.v_lin", a.hidden)
    o = t.attention(q, k, v, a.heads, a.head_dim, a.heads, a.attn_dropout)
    x = t.layernorm(t.add(t.linear(o, p + "attention.out_lin", a.hidden), x),
                    p + "sa_layer_norm")
    f = t.act(t.linear(x, p + "ffn.lin1", a.intermediate), a.act)  # (B, T, I)
    f = t.dropout(t.linear(f, p + "ffn.lin2", a.hidden), a.hidden_dropout)
    return t.layernorm(t.add(f, x), p + "output_layer_norm")


LAYERS = {"llama": llama_layer, "phi3": llama_layer, "gemma": gemma_layer,
          "olmo2": olmo2_layer, "gpt2": gpt2_layer, "bert": bert_layer,
          "deberta": deberta_layer, "modernbert": modernbert_layer,
          "distilbert": distilbert_layer}


# -- embeddings and heads --------------------------------------------------------

def embeddings(t: Tape, a: Arch) -> Sym:
    emb = a.names["embed"]
    x = t.embedding(emb, a.embed_dim)  # (B, T, e)
    parent = emb.rsplit(".", 1)[0]
    if a.family in ("bert", "deberta"):
        if a.type_vocab:
            t.embedding(emb, 0)  # token type ids, kept like the word ids
        if a.family == "deberta" and a.embed_dim != a.hidden:
            x = t.linear(x, parent + ".embed_proj", a.hidden)
        x = t.layernorm(x, parent + ".LayerNorm")
        if a.family == "deberta":
            x = t.mul(x, Sym(1, t.regime.act_bytes, False))  # * mask.to(dtype), (B, T, 1)
    elif a.family in ("distilbert", "modernbert"):
        x = t.layernorm(x, parent + (".norm" if a.family == "modernbert" else ".LayerNorm"))
    x = t.dropout(x, a.embd_dropout)
    if a.family == "bert" and a.embed_dim != a.hidden:  # ELECTRA's embeddings_project
        x = t.linear(x, a.names["embed_project"], a.hidden)
    return x


def head(t: Tape, a: Arch, x: Sym, task: str, num_labels: int, seq: int) -> Sym:
    """Everything after the last layer, up to the logits (for a chunked
    causal-LM loss: up to the gathered rows, see ``activations``)."""
    n = a.names
    if a.family in DECODER_FAMILIES:
        x = t.layernorm(x, n["final_norm"]) if a.family == "gpt2" \
            else _norm(t, a, x, n["final_norm"])
        if task == "classify":
            return t.linear(x, n["head"], num_labels)  # (B, T, labels)
        if a.chunked:  # lm_loss.label_positions, then the head in checkpointed chunks
            labelled = (seq - 1) / seq  # position t predicts token t + 1
            rows = t.new(x.elems * labelled, x.rg)  # (N, h) the gathered rows
            if x.rg:
                t.save(t.new(1, False, nbytes=1))  # the bool mask indexing them
                t.save(rows)  # the checkpoint keeps its inputs: the rows...
                t.save(t.new(labelled, False, nbytes=8))  # ... and the int64 targets
            return rows
        logits = t.linear(x, n["head"], a.vocab)  # (B, T, V)
        if a.final_softcap and logits.rg:
            t.save(t.new(a.vocab, True))  # tanh(logits / c) keeps its output
        return logits
    if a.family == "modernbert":
        x = t.layernorm(x, n["final_norm"])
    # encoders classify the first token: x[:, 0] is a view of the whole (B, T, h)
    first = Sym(a.hidden / seq, x.nbytes, x.rg, view_of=x)  # (B, h)
    return ENCODER_HEADS[a.family](t, a, first, seq, num_labels)


def _bert_head(t: Tape, a: Arch, first: Sym, seq: int, labels: int) -> Sym:
    if a.model_type == "electra":  # dropout, dense, GELU, dropout, out_proj
        first = t.dropout(first, a.cls_dropout)
        first = t.act(t.linear(first, "classifier.dense", a.hidden / seq), "gelu")
        first = t.dropout(first, a.cls_dropout)
        return t.linear(first, "classifier.out_proj", labels / seq)
    first = t.act(t.linear(first, a.names["pooler"], a.hidden / seq), "tanh")  # (B, h)
    return t.linear(t.dropout(first, a.cls_dropout), a.names["head"], labels / seq)


def _distilbert_head(t: Tape, a: Arch, first: Sym, seq: int, labels: int) -> Sym:
    first = t.act(t.linear(first, a.names["pre_classifier"], a.hidden / seq), "relu")
    return t.linear(t.dropout(first, a.cls_dropout), a.names["head"], labels / seq)


def _deberta_head(t: Tape, a: Arch, first: Sym, seq: int, labels: int) -> Sym:
    """ContextPooler (dropout, dense, its activation), dropout, classifier."""
    first = t.dropout(first, a.pooler_dropout)
    first = t.act(t.linear(first, "pooler.dense", a.hidden / seq), a.pooler_act)
    return t.linear(t.dropout(first, a.cls_dropout), a.names["head"], labels / seq)


def _modernbert_head(t: Tape, a: Arch, first: Sym, seq: int, labels: int) -> Sym:
    """ModernBertPredictionHead (dense, activation, LayerNorm), dropout, classifier."""
    first = t.act(t.linear(first, "head.dense", a.hidden / seq), a.pooler_act)
    first = t.layernorm(first, "head.norm", rows=1 / seq)
    return t.linear(t.dropout(first, a.cls_dropout), a.names["head"], labels / seq)


ENCODER_HEADS = {"bert": _bert_head, "distilbert": _distilbert_head,
                 "deberta": _deberta_head, "modernbert": _modernbert_head}
