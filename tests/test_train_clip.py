"""Gradient clipping over sparse-row embedding gradients equals torch's clip_grad_norm_."""

import copy

import pytest
import torch

from loralab.train.loop import _DenseGrad, clip_grad_norm


def model(sparse: bool):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(50, 8, sparse=sparse), torch.nn.Linear(8, 3))
    return net


def backward(net, ids):
    net(ids).pow(2).sum().backward()


@pytest.mark.parametrize("max_norm", [0.05, 1e6])  # clips / leaves alone
def test_same_gradients_and_norm_as_torch(max_norm):
    ours, ref = model(True), model(False)
    dense = _DenseGrad(ours[0].weight)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):  # two steps: the buffer is reused, last step's rows cleared
        for net in (ours, ref):
            net.zero_grad(set_to_none=True)
        for _ in range(3):  # micro-batches, with repeated rows
            ids = torch.randint(0, 50, (4, 5), generator=gen)
            backward(ours, ids), backward(ref, ids)
        dense.load()
        assert not ours[0].weight.grad.is_sparse
        unclipped = [p.grad.clone() for p in ours.parameters()]
        got = clip_grad_norm(list(ours.parameters()), max_norm, [dense])
        want = torch.nn.utils.clip_grad_norm_(list(ref.parameters()), max_norm).item()
        assert got == pytest.approx(want, rel=1e-6)
        for a, b, before in zip(ours.parameters(), ref.parameters(), unclipped):
            assert torch.allclose(a.grad, b.grad, atol=1e-7)
            assert torch.equal(a.grad, before) == (max_norm > want)


def test_gradient_left_by_another_step_is_not_used():
    net = model(True)
    dense = _DenseGrad(net[0].weight)
    backward(net, torch.tensor([[1, 2]]))
    dense.load()
    old = copy.deepcopy(dense.values)
    net.zero_grad(set_to_none=True)
    net[0].weight.requires_grad_(False)  # this step: no embedding gradient
    backward(net, torch.tensor([[3, 4]]))
    total = clip_grad_norm([p for p in net.parameters() if p.requires_grad], 1e6, [dense])
    linear = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net[1].parameters()]))
    assert total == pytest.approx(linear.item()) and torch.equal(dense.values, old)
