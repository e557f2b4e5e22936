"""Seeded batch plans with length grouping, and collators with dynamic padding.

A plan is a pure function of (lengths, batch size, seed, epoch): every rank of
a distributed run computes the same global batches and takes its own slice,
and a resumed run recomputes the exact batches it had not yet seen.
"""

from __future__ import annotations

import torch

from loralab.data.encode import IGNORE, Encoded

# Group-by-length pools ~50 batches (as HF's LengthGroupedSampler does): big
# enough that neighbours have similar lengths, small enough to stay random.
MEGABATCH = 50


def pool_batches(n: int, batch_size: int) -> int:
    """Batches per length-sorted pool: MEGABATCH, or a quarter of a small data
    set's batches (HF's rule), so each epoch still draws fresh groups."""
    return max(1, min(n // (batch_size * 4), MEGABATCH))


def plan_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                 group_by_length: bool = True, shuffle: bool = True,
                 pool: int | None = None) -> list[list[int]]:
    """Index lists, one per (global) batch. Grouped by length, each shuffled
    ``pool`` of rows (default ``pool_batches`` batches) is sorted and cut into
    batches."""
    n = len(lengths)
    if not shuffle:
        order = sorted(range(n), key=lambda i: -lengths[i]) if group_by_length else list(range(n))
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    gen = torch.Generator().manual_seed(seed * 1009 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    pool = pool or batch_size * pool_batches(n, batch_size)
    batches = []
    for start in range(0, n, pool):
        chunk = sorted(order[start:start + pool], key=lambda i: -lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    # shuffle batch order so the loss curve does not follow length
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def shard(batch: list[int], rank: int, world: int) -> list[int]:
    """This rank's contiguous share of a global batch (sizes differ by <= 1)."""
    size, extra = divmod(len(batch), world)
    start = rank * size + min(rank, extra)
    return batch[start:start + size + (1 if rank < extra else 0)]


def plan_steps(lengths: list[int], batch_size: int, grad_accum: int, seed: int, epoch: int,
               group_by_length: bool = True) -> list[list[list[int]]]:
    """An epoch's optimizer steps, each ``grad_accum`` (global) batches of
    ``batch_size`` rows; one step (the pool's remainder) may be shorter.

    Grouping by length works on whole steps: a pool of ~``pool_batches``
    batches (whole steps' worth) is sorted by length and cut into steps, then each
    step into its batches, and the steps are shuffled so the loss curve does
    not follow length. So the rows of one step have similar lengths (as in HF's
    LengthGroupedSampler, whose consecutive batches come from one sorted pool),
    and the token budget packs them into fewer, less padded passes than rows
    from batches of any length would make (BENCHMARKS.md, "Length grouping by
    optimizer step"). With ``grad_accum`` 1 this is ``plan_batches``' plan.
    """
    rows = batch_size * grad_accum
    pool = rows * max(1, round(pool_batches(len(lengths), batch_size) * batch_size / rows))
    groups = plan_batches(lengths, rows, seed, epoch, group_by_length, pool=pool)
    return [[g[i:i + batch_size] for i in range(0, len(g), batch_size)] for g in groups]


def _pad(rows: list[list[int]], value: int, multiple: int = 1) -> torch.Tensor:
    width = max(len(r) for r in rows)
    width = -(-width // multiple) * multiple
    out = torch.full((len(rows), width), value, dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def collate(enc: Encoded, idx: list[int], pad_id: int, multiple: int = 1) -> dict:
    """Right-padded tensors for rows ``idx`` of ``enc``; padded to the batch's longest."""
    rows = [enc.input_ids[i] for i in idx]
    input_ids = _pad(rows, pad_id, multiple)  # (B, T)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        mask[i, : len(r)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    first = enc.labels[idx[0]] if idx else None
    if isinstance(first, list):
        batch["labels"] = _pad([enc.labels[i] for i in idx], IGNORE, multiple)  # (B, T)
    elif first is not None:
        batch["labels"] = torch.tensor([enc.labels[i] for i in idx], dtype=torch.long)  # (B,)
    return batch


def count_targets(enc: Encoded, idx: list[int]) -> int:
    """Loss terms in rows ``idx``: examples (classify) or predicted tokens (LM)."""
    if idx and isinstance(enc.labels[idx[0]], list):
        # causal LM: position t predicts token t+1, so the first label never counts
        return sum(sum(1 for x in enc.labels[i][1:] if x != IGNORE) for i in idx)
    return len(idx)


def padded_width(length: int, multiple: int = 1) -> int:
    return -(-length // multiple) * multiple


# What one forward/backward pass costs beyond its tokens, in tokens: a minilm
# step on 1 x 2 tokens took as long as ~56 more tokens in a 4 x 26 batch on this
# project's CPU (BENCHMARKS.md, "Training"). Not measured on GPUs.
PASS_COST_TOKENS = 64


def pack_by_tokens(rows: list[int], lengths: list[int], budget: int, multiple: int = 1,
                   max_passes: int | None = None) -> list[list[int]]:
    """An optimizer step's rows as micro-batches of at most ``budget`` padded
    tokens (rows x longest row, rounded up to ``multiple``).

    A user who asks for batch x max-length tokens per micro-batch has accepted
    that much activation memory; short rows may fill it with more of the step's
    rows, so a step takes fewer, larger passes. But padding costs compute too:
    the rows, sorted by length, are cut where padded tokens plus a fixed cost
    per pass (PASS_COST_TOKENS) is least (dynamic programming over the cut
    points). Never more passes than ``max_passes`` (the fixed-rows plan): when
    the cheapest cut has more, the greedy fill is used, which cannot.
    The rows, and so the step's summed loss and gradient, are the same.
    """
    order = sorted(rows, key=lambda i: (-lengths[i], i))
    width = [padded_width(lengths[i], multiple) for i in order]
    n = len(order)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)  # best[j]: rows [0, j) packed
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # rows [i, j) in one pass, widest first
            if (j - i) * width[i] > budget:
                break
            cost = best[i] + PASS_COST_TOKENS + (j - i) * width[i]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    out, j = [], n
    while j > 0:
        out.append(order[cut[j]:j])
        j = cut[j]
    out.reverse()
    if max_passes is not None and len(out) > max_passes:
        return _greedy_pack(order, width, budget)
    return out


def _greedy_pack(order: list[int], width: list[int], budget: int) -> list[list[int]]:
    """Fill each pass up to the budget, longest rows first: every pass but the
    last holds at least budget // max-width rows, so never more passes than
    fixed rows of that many."""
    out: list[list[int]] = []
    first = 0
    for k, i in enumerate(order):
        if out and (len(out[-1]) + 1) * width[first] <= budget:
            out[-1].append(i)
        else:
            out.append([i])
            first = k
    return out
