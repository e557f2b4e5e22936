"""The CPU training attention: SDPA's math, loralab's dropout mask."""

import pytest
import torch
from tiny_models import padded_batch
from transformers import BertConfig, BertForSequenceClassification

from loralab.train import attention as A
from loralab.train.attention import NAME, use_fast_attention


def bert(attn_drop: float = 0.1, implementation: str = "sdpa"):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=attn_drop,
                     initializer_range=0.5, attn_implementation=implementation)
    return BertForSequenceClassification(cfg)


def batch():
    return padded_batch(50)


def test_switches_sdpa_models_only():
    model = bert()
    assert use_fast_attention(model) and model.config._attn_implementation == NAME
    assert not use_fast_attention(bert(implementation="eager"))


def test_same_outputs_as_sdpa_when_the_mask_keeps_everything(monkeypatch):
    """With the dropout mask forced to keep all, training mode computes what
    SDPA computes without dropout: the masking and scaling are SDPA's."""
    model, ref = bert(), bert()
    use_fast_attention(model)
    b = batch()
    with torch.no_grad():
        expected = ref.eval()(**b).logits
        assert torch.equal(model.eval()(**b).logits, expected)  # eval: SDPA itself
        calls = []
        monkeypatch.setattr(A, "fast_dropout", lambda x, p, t: calls.append(p) or x)
        got = model.train()(**b).logits
    assert calls == [0.1, 0.1]  # one per layer: the fast path ran
    assert torch.allclose(got, expected, atol=1e-5)


def test_dropout_is_applied_seeded_and_differentiable():
    model = bert(attn_drop=0.3)
    use_fast_attention(model)
    model.train()
    b = batch()
    torch.manual_seed(5)
    a = model(**b).logits
    torch.manual_seed(5)
    again = model(**b).logits
    with torch.no_grad():
        clean = model.eval()(**b).logits
    assert torch.equal(a, again)
    assert (a - clean).abs().max() > 1e-2 * clean.abs().max()
    a.sum().backward()
    grad = model.bert.encoder.layer[0].attention.self.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_attention_weights_keep_their_expectation(p):
    """Averaged over many masks, dropped-and-rescaled attention equals the clean one."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = False
    clean, _ = A.attention(module, q, k, v, None, dropout=0.0)
    runs = torch.stack([A.attention(module, q, k, v, None, dropout=p)[0] for _ in range(4000)])
    assert torch.allclose(runs.mean(0), clean, atol=0.05)
