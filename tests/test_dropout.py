"""The CPU dropout used in training: same distribution as nn.Dropout, cheaper mask."""

import math

import torch
from torch import nn

from loralab.lora.dropout import Dropout, dropout, keep_mask, use_fast_dropout


def test_keep_rate_matches_p_at_every_chunk_position():
    torch.manual_seed(0)
    n = 400_000
    for p in (0.05, 0.1, 0.5):
        keep = keep_mask(n, p).float()
        sd = math.sqrt(p * (1 - p) / n)
        assert abs(keep.mean().item() - (1 - p)) < 5 * sd + 2**-15
        # four elements share one 64-bit draw: each position of the four is fair
        for pos in keep.view(-1, 4).mean(0).tolist():
            assert abs(pos - (1 - p)) < 5 * sd * 2 + 2**-15
        # neighbours are independent: P(both kept) = (1 - p)^2
        both = (keep[:-1] * keep[1:]).mean().item()
        assert abs(both - (1 - p) ** 2) < 0.01


def test_mask_is_the_compare_of_the_chunks_with_the_threshold():
    # the mask is chunk >= threshold at every p, one that rounds to a drop of
    # all too (its threshold, 2^15, does not fit the int16 chunks)
    n = 10_001
    for p in (1e-6, 0.001, 0.1, 0.3, 0.5, 0.9, 0.99, 1 - 1e-6):
        torch.manual_seed(5)
        keep = keep_mask(n, p)
        torch.manual_seed(5)
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_().bitwise_left_shift_(1)
        threshold = 2 * round(p * 2**15) - 2**15
        expected = (bits.view(torch.int16).to(torch.int32) >= threshold)[:n]
        assert keep.dtype == torch.bool and torch.equal(keep, expected), p
    assert keep_mask(n, 1 - 1e-6).sum() == 0 and keep_mask(n, 1e-6).all()


def test_kept_values_are_scaled_and_gradient_uses_the_same_mask():
    torch.manual_seed(1)
    x = torch.randn(64, 300, requires_grad=True)
    y = dropout(x, 0.2)
    kept = y != 0
    assert torch.allclose(y[kept], x[kept] / 0.8)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() / 0.8)


def test_seeded_repeatable_and_off_outside_training():
    x = torch.ones(1000)
    torch.manual_seed(3)
    a = dropout(x, 0.1)
    torch.manual_seed(3)
    b = dropout(x, 0.1)
    assert torch.equal(a, b)
    assert not torch.equal(a, dropout(x, 0.1))
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x


def test_model_dropouts_switched_in_place():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.Sequential(nn.Dropout(0.1)))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fast_dropout(model) == 2
    assert isinstance(model[1], Dropout) and isinstance(model[1], nn.Dropout)
    assert model[1].p == 0.3 and model[2][0].p == 0.1
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.eval()
    x = torch.randn(2, 4)
    assert torch.equal(model(x), model[0](x))
