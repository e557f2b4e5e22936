"""Per-architecture layer programs for the activation count (see ``tape``).

Each program mirrors the forward of one transformers layer: the same ops in
the same order, with the module names LoRA targets use. Four families cover
the presets: Llama-style decoders (Llama, Mistral, Qwen2, Qwen3 with q/k
norms; RMSNorm, SwiGLU, GQA, RoPE), BERT-style post-LN encoders (BERT,
RoBERTa), DistilBERT, and GPT-2 (pre-LN, fused qkv Conv1D, GELU-tanh).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from loralab.estimate.tape import Sym, Tape

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
BERT_TYPES = ("bert", "roberta", "xlm-roberta")


@dataclass
class Arch:
    """The shape facts of a model that the activation count needs."""

    family: str  # "llama" | "bert" | "distilbert" | "gpt2"
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
    qk_norm: bool
    type_vocab: int
    layer_prefix: str  # e.g. "model.layers"
    names: dict  # role -> module name: embed, final_norm, head, pooler, pre_classifier


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
    family = "llama" if mtype in LLAMA_TYPES else "bert" if mtype in BERT_TYPES else mtype
    head_dim = getattr(c, "head_dim", None) or h // heads
    inter = {"distilbert": getattr(c, "hidden_dim", 0),
             "gpt2": getattr(c, "n_inner", None) or 4 * h}.get(family) or c.intermediate_size
    act = {"distilbert": getattr(c, "activation", "gelu"),
           "gpt2": getattr(c, "activation_function", "gelu_new")}.get(family) or c.hidden_act
    drops = _dropouts(c, family)
    names = {"embed": _find(model, "embed_tokens", "word_embeddings", "wte"),
             "final_norm": _find(model, "norm", "ln_f"),
             "head": _find(model, "lm_head", "score", "classifier"),
             "pooler": _find(model, "pooler.dense"),
             "pre_classifier": _find(model, "pre_classifier")}
    return Arch(family, layers, h, heads, getattr(c, "num_key_value_heads", None) or heads,
                head_dim, inter, c.vocab_size, act, *drops, qk_norm=mtype == "qwen3",
                type_vocab=getattr(c, "type_vocab_size", 0) or 0,
                layer_prefix=_layer_prefix(model, layers), names=names)


def _dropouts(c, family: str) -> tuple[float, float, float, float]:
    """(attention, hidden, embedding, classifier) dropout probabilities."""
    if family == "llama":
        return float(getattr(c, "attention_dropout", 0.0) or 0.0), 0.0, 0.0, 0.0
    if family == "gpt2":
        return c.attn_pdrop, c.resid_pdrop, c.embd_pdrop, getattr(c, "summary_first_dropout", 0.1)
    if family == "distilbert":
        return c.attention_dropout, c.dropout, c.dropout, c.seq_classif_dropout
    cls = getattr(c, "classifier_dropout", None)
    return (c.attention_probs_dropout_prob, c.hidden_dropout_prob, c.hidden_dropout_prob,
            c.hidden_dropout_prob if cls is None else cls)


# -- layers: (tape, arch, x, "prefix.i.") -> layer output ----------------------

def llama_layer(t: Tape, a: Arch, x: Sym, p: str) -> Sym:
    n = t.rmsnorm(x, p + "input_layernorm")
    q = t.linear(n, p + "self_attn.q_proj", a.heads * a.head_dim)  # (B, T, heads*d)
    k = t.linear(n, p + "self_attn.k_proj", a.kv_heads * a.head_dim)  # (B, T, kv*d)
    v = t.linear(n, p + "self_attn.v_proj", a.kv_heads * a.head_dim)
    if a.qk_norm:  # Qwen3: RMSNorm over each head's d
        q = t.rmsnorm(q, p + "self_attn.q_norm", rows=a.heads)
        k = t.rmsnorm(k, p + "self_attn.k_norm", rows=a.kv_heads)
    q, k = t.new(q.elems, q.rg), t.new(k.elems, k.rg)  # RoPE: q*cos + rot(q)*sin
    o = t.attention(q, k, v, a.heads, a.head_dim, a.kv_heads, a.attn_dropout,
                    softmax_bytes=4)  # eager softmax runs in fp32
    x = t.add(x, t.linear(o, p + "self_attn.o_proj", a.hidden))
    n = t.rmsnorm(x, p + "post_attention_layernorm")
    gate = t.act(t.linear(n, p + "mlp.gate_proj", a.intermediate), a.act)  # (B, T, I)
    up = t.linear(n, p + "mlp.up_proj", a.intermediate)
    return t.add(x, t.linear(t.mul(gate, up), p + "mlp.down_proj", a.hidden))


def bert_layer(t: Tape, a: Arch, x: Sym, p: str) -> Sym:
    q = t.linear(x, p + "attention.self.query", a.hidden)
    k = t.linear(x, p + "attention.self.key", a.hidden)
    v = t.linear(x, p + "attention.self.value", a.hidden)
    o = t.attention(q, k, v, a.heads, a.head_dim, a.heads, a.attn_dropout)
    o = t.dropout(t.linear(o, p + "attention.output.dense", a.hidden), a.hidden_dropout)
    x = t.layernorm(t.add(o, x), p + "attention.output.LayerNorm")
    f = t.act(t.linear(x, p + "intermediate.dense", a.intermediate), a.act)  # (B, T, I)
    f = t.dropout(t.linear(f, p + "output.dense", a.hidden), a.hidden_dropout)
    return t.layernorm(t.add(f, x), p + "output.LayerNorm")


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


def gpt2_layer(t: Tape, a: Arch, x: Sym, p: str) -> Sym:
    n = t.layernorm(x, p + "ln_1")
    qkv = t.linear(n, p + "attn.c_attn", 3 * a.hidden)  # (B, T, 3h); q, k, v are views
    q, k, v = (Sym(a.hidden, qkv.nbytes, qkv.rg) for _ in range(3))
    o = t.attention(q, k, v, a.heads, a.head_dim, a.heads, a.attn_dropout)
    x = t.add(x, t.dropout(t.linear(o, p + "attn.c_proj", a.hidden), a.hidden_dropout))
    n = t.layernorm(x, p + "ln_2")
    f = t.act(t.linear(n, p + "mlp.c_fc", a.intermediate), a.act)  # (B, T, 4h)
    return t.add(x, t.dropout(t.linear(f, p + "mlp.c_proj", a.hidden), a.hidden_dropout))


LAYERS = {"llama": llama_layer, "bert": bert_layer, "distilbert": distilbert_layer,
          "gpt2": gpt2_layer}


# -- embeddings and heads --------------------------------------------------------

def embeddings(t: Tape, a: Arch) -> Sym:
    x = t.embedding(a.names["embed"], a.hidden)  # (B, T, h)
    if a.family == "bert":
        if a.type_vocab:
            t.embedding(a.names["embed"], 0)  # token type ids, kept like the word ids
        x = t.layernorm(x, a.names["embed"].rsplit(".", 1)[0] + ".LayerNorm")
    elif a.family == "distilbert":
        x = t.layernorm(x, a.names["embed"].rsplit(".", 1)[0] + ".LayerNorm")
    return t.dropout(x, a.embd_dropout)


def head(t: Tape, a: Arch, x: Sym, task: str, num_labels: int, seq: int) -> Sym:
    """Everything after the last layer, up to the logits."""
    n = a.names
    if a.family in ("llama", "gpt2"):
        if a.family == "llama":
            x = t.rmsnorm(x, n["final_norm"])
        else:
            x = t.layernorm(x, n["final_norm"])
        out = a.vocab if task == "sft" else num_labels
        return t.linear(x, n["head"], out)  # (B, T, V) or (B, T, labels)
    # encoders classify the first token: x[:, 0] is a view of the whole (B, T, h)
    first = Sym(a.hidden / seq, x.nbytes, x.rg, view_of=x)  # (B, h)
    if a.family == "distilbert":
        first = t.act(t.linear(first, n["pre_classifier"], a.hidden / seq), "relu")
    else:
        first = t.act(t.linear(first, n["pooler"], a.hidden / seq), "tanh")  # (B, h)
    first = t.dropout(first, a.cls_dropout)
    return t.linear(first, n["head"], num_labels / seq)
