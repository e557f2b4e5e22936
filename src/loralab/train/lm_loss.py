"""The causal-LM loss only where there are labels, in chunks.

The plain path runs the output head over every position, keeps the (B, T, V)
logits, copies them to fp32 and then ignores the prompt positions. Here the
decoder's last hidden states are gathered at the positions whose next token is
a label (response tokens for sft, every token for lm), and the head plus the
cross-entropy run over chunks of those rows: each chunk's logits exist only
while it is computed, so the full logits never do (the idea of Liger's fused
linear cross-entropy and of Apple's Cut Cross-Entropy, Wijmans et al., 2024).
Where the head's trainable weights are small (a frozen head, or LoRA on it),
each chunk's gradients are taken right there in the forward, as Liger does,
and the backward only scales them: one head matmul and one log-softmax per
chunk fewer than recomputing the chunk in the backward. A trainable full head
(full fine-tuning) and fp16 (a loss scaler's small gradients) keep the chunks
under activation checkpointing, recomputed in the backward.

The head is called as the module it is, so LoRA on ``lm_head``, tied
embeddings, full fine-tuning and 4-bit bases need nothing special. Models
whose forward does more between the last hidden state and the logits than
the head (and Gemma's final soft-capping, reproduced here) keep the plain path.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from loralab.data.encode import IGNORE

# Decoders whose logits are exactly head(final hidden state), with Gemma 2/3's
# tanh soft-cap as the only extra step.
PLAIN_HEAD_TYPES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt2", "phi3",
    "olmo", "olmo2", "gemma", "gemma2", "gemma3_text", "smollm3", "starcoder2",
})
# Logit elements per chunk: 2^25 fp32 values = 128 MiB, e.g. 682 rows of
# SmolLM2's 49,152-token vocabulary.
CHUNK_ELEMENTS = 2**25
# The head's trainable elements up to which its gradients are taken in the
# forward and held until the backward: 2^22 (16 MiB in fp32), an eighth of a
# chunk's logits. SmolLM2's head with a rank-8 adapter holds 0.4M; a whole
# trainable head, 28M, takes the checkpointed path.
GRADS_IN_FORWARD_ELEMENTS = 2**22


def chunkable(model) -> bool:
    """True if ``model`` (unwrapped) computes its logits as head(final hidden
    state), with at most Gemma's soft-cap after it."""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) in PLAIN_HEAD_TYPES
            and callable(getattr(model, "get_output_embeddings", None))
            and model.get_output_embeddings() is not None and not _sharded(model))


def _sharded(model) -> bool:
    """FSDP2 (``fully_shard``, also on CPU where accelerate reports no FSDP)
    gathers a head's weights only inside the root forward: calling the head
    after it would leave ranks waiting on each other."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _identity(hidden, *args, **kwargs):
    return hidden


@contextlib.contextmanager
def head_bypassed(model):
    """For the block, the model's forward returns its final hidden states where
    the logits would be (the head and the soft-cap are skipped); yields
    ``(head, softcap)`` to apply afterwards. Going through the model's own
    forward keeps a DDP wrapper's gradient bookkeeping intact."""
    head, config = model.get_output_embeddings(), model.config
    own = head.__dict__.get("forward")  # an instance forward someone set (hooks)
    softcap = getattr(config, "final_logit_softcapping", None)
    head.forward = _identity
    if softcap:
        config.final_logit_softcapping = None
    try:
        yield head, softcap
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own
        if softcap:
            config.final_logit_softcapping = softcap


def upcast(logits: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 logits to fp32 for the softmax; fp32/fp64 as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head, softcap) -> torch.Tensor:
    logits = upcast(head(hidden))  # (n, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def _cross_entropy_and_grad(logits: torch.Tensor, targets: torch.Tensor, softcap=None):
    """The summed cross-entropy of ``logits`` (n, V), soft-capped first where
    ``softcap`` is set, and its gradient for ``logits``: softmax minus the
    one-hot targets (times the cap's derivative, 1 - tanh^2), from one
    log-softmax and in place. Autograd's way writes a zeroed (n, V) gradient
    for the NLL and reads two (n, V) tensors more in the log-softmax's
    backward: 10-12 % of a chunk's forward and gradient for SmolLM2's head,
    and one chunk-sized copy more live (BENCHMARKS.md)."""
    capped = (logits / softcap).tanh_().mul_(softcap) if softcap else logits
    logp = torch.log_softmax(capped, -1)
    loss = -logp.gather(1, targets[:, None]).sum()
    grad = logp.exp_()
    grad[torch.arange(targets.shape[0], device=targets.device), targets] -= 1
    if softcap:  # d(c tanh(z / c)) / dz = 1 - tanh(z / c)^2
        grad.mul_(capped.div_(softcap).square_().neg_().add_(1))
    return loss, grad


def _same(t):
    return t


class _GradsInForward(torch.autograd.Function):
    """The summed chunk losses of ``rows`` (N, H), with each chunk's gradients
    for ``rows`` and for the head's trainable ``params`` taken in the forward
    (the weights' summed over the chunks) and scaled by the incoming gradient
    in the backward. The loss is linear in its upstream gradient, so
    this is the same gradient as autograd's through each chunk."""

    @staticmethod
    def forward(ctx, rows, targets, head, softcap, chunk: int, *params):
        need_rows, need = ctx.needs_input_grad[0], ctx.needs_input_grad[5:]
        wanted = [p for p, n in zip(params, need) if n]
        total = rows.new_zeros((), dtype=torch.promote_types(rows.dtype, torch.float32))
        grad_rows = torch.empty_like(rows) if need_rows else None
        sums: list[torch.Tensor | None] = [None] * len(wanted)
        # the chunks' own graphs live only inside this loop: hooks on what the
        # outer graph saves (offloading, memory accounting) must not see them
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
            for start in range(0, rows.shape[0], chunk):
                part = rows[start:start + chunk].detach().requires_grad_(need_rows)
                logits = upcast(head(part))  # (n, V)
                loss, grad_logits = _cross_entropy_and_grad(logits.detach(),
                                                            targets[start:start + chunk], softcap)
                found = torch.autograd.grad(logits, ([part] if need_rows else []) + wanted,
                                            grad_logits, allow_unused=True
                                            ) if need_rows or wanted else ()
                del logits, grad_logits  # before the next chunk's logits exist
                if need_rows:
                    grad_rows[start:start + chunk] = found[0]
                    found = found[1:]
                for i, g in enumerate(found):
                    if g is not None:
                        sums[i] = g if sums[i] is None else sums[i].add_(g)
                total += loss
        grads = iter(sums)
        ctx.param_grads = [next(grads) if n else None for n in need]
        ctx.save_for_backward(grad_rows)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad_rows,) = ctx.saved_tensors  # scaled in place: a second backward would fail
        scaled = [None if p is None else p * g for p in ctx.param_grads]
        return (None if grad_rows is None else grad_rows.mul_(g), None, None, None, None,
                *scaled)


def grads_in_forward(rows: torch.Tensor, head) -> bool:
    """True where the chunks' gradients may be taken in the forward: grads on,
    the head's trainable weights small, and no fp16 (whose loss scaling
    would come only after these unscaled gradients had rounded)."""
    device = rows.device.type
    if not torch.is_grad_enabled() or rows.dtype == torch.float16 or (
            torch.is_autocast_enabled(device)
            and torch.get_autocast_dtype(device) == torch.float16):
        return False
    held = sum(p.numel() for p in head.parameters() if p.requires_grad)
    return held <= GRADS_IN_FORWARD_ELEMENTS


def label_positions(hidden: torch.Tensor, labels: torch.Tensor):
    """``(rows, targets)``: the hidden states (N, H) of the positions whose next
    token is a label, and those tokens (N,). Position t predicts token t+1."""
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != IGNORE  # (B, T-1)
    return hidden[:, :-1][keep], targets[keep]  # (N, H), (N,)


def chunked_loss_sum(hidden: torch.Tensor, labels: torch.Tensor, head, softcap=None,
                     chunk_rows: int | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy over the labelled positions of
    ``hidden`` (B, T, H), the head run chunk by chunk: the gradients taken in
    the forward where :func:`grads_in_forward` allows, else each chunk
    recomputed in the backward."""
    rows, targets = label_positions(hidden, labels)
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    chunk = chunk_rows or max(1, CHUNK_ELEMENTS // int(vocab))
    if grads_in_forward(rows, head):
        params = [p for p in head.parameters() if p.requires_grad]
        return _GradsInForward.apply(rows, targets, head, softcap, chunk, *params)
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for start in range(0, rows.shape[0], chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, rows[part], targets[part], head, softcap,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss(rows[part], targets[part], head, softcap)
    return total


def plain_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference: full (B, T, V) logits, position t predicting token t+1."""
    shift = upcast(logits[:, :-1])  # (B, T-1, V)
    return F.cross_entropy(shift.reshape(-1, shift.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def causal_lm_loss_sum(model, batch: dict, inner, chunk_rows: int | None = None):
    """Summed next-token cross-entropy where ``batch["labels"]`` != IGNORE.

    ``model`` is what is called (the module, or its DDP wrapper); ``inner`` the
    bare module whose head may be bypassed, or None for the plain path (FSDP).
    Chunked when the architecture allows."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if inner is None or not chunkable(inner):
        return plain_loss_sum(model(**inputs).logits, batch["labels"])
    with head_bypassed(inner) as (head, softcap):
        hidden = model(**inputs, use_cache=False).logits  # (B, T, H): the head skipped
    return chunked_loss_sum(hidden, batch["labels"], head, softcap, chunk_rows)


def row_loss_sums(model, batch: dict, inner) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss sum, label count)`` per row (B,), for evaluation: the same
    labelled positions and chunks as training, without the full logits."""
    labels = batch["labels"]
    counts = (labels[:, 1:] != IGNORE).sum(-1)  # (B,)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if inner is None or not chunkable(inner):
        logits = upcast(model(**inputs).logits[:, :-1])  # (B, T-1, V)
        token = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE,
                                reduction="none")  # (B, T-1)
        return token.sum(-1), counts
    with head_bypassed(inner) as (head, softcap):
        hidden = model(**inputs, use_cache=False).logits  # (B, T, H): the head skipped
    rows, targets = label_positions(hidden, labels)  # (N, H), (N,)
    owner = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(
        labels[:, 1:])[labels[:, 1:] != IGNORE]  # (N,) row of each labelled position
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    chunk = max(1, CHUNK_ELEMENTS // int(vocab))
    sums = hidden.new_zeros(labels.shape[0], dtype=torch.promote_types(hidden.dtype,
                                                                        torch.float32))
    for start in range(0, rows.shape[0], chunk):
        part = slice(start, start + chunk)
        logits = upcast(head(rows[part]))  # (n, V)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        sums.index_add_(0, owner[part], F.cross_entropy(logits, targets[part],
                                                         reduction="none").to(sums.dtype))
    return sums, counts
