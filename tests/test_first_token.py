"""The last encoder layer run for the first token only: same logits, same gradients."""

import copy

import pytest
import torch
import transformers as T
from tiny_models import padded_batch

from loralab.train.attention import use_fast_attention
from loralab.train.first_token import use_first_token_only
from loralab.train.methods import enable_checkpointing

SMALL = {"vocab_size": 60, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "intermediate_size": 64, "num_labels": 3, "max_position_embeddings": 64,
         "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
         "initializer_range": 0.5}
HEADS = {
    "bert": (T.BertConfig, T.BertForSequenceClassification),
    "roberta": (T.RobertaConfig, T.RobertaForSequenceClassification),
    "xlm-roberta": (T.XLMRobertaConfig, T.XLMRobertaForSequenceClassification),
    "camembert": (T.CamembertConfig, T.CamembertForSequenceClassification),
    "electra": (T.ElectraConfig, T.ElectraForSequenceClassification),
}


def build(kind: str, implementation: str = "sdpa", **extra):
    config_cls, model_cls = HEADS[kind]
    torch.manual_seed(0)
    cfg = config_cls(**dict(SMALL, **extra), attn_implementation=implementation,
                     pad_token_id=1)
    return model_cls(cfg)


def batch():
    return dict(padded_batch(60, pad_id=1), labels=torch.tensor([0, 2, 1]))


def close(got, want):  # in float64: rounding only, relative to the tensor's scale
    return (got - want).abs().max() <= 1e-9 * want.abs().max() + 1e-12


def grads(model, b):
    model.zero_grad(set_to_none=True)
    out = model(**b)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                 if p.grad is not None}


@pytest.mark.parametrize("kind", sorted(HEADS))
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_same_logits_and_gradients(kind, implementation):
    ref = build(kind, implementation).double()
    model = copy.deepcopy(ref)
    assert use_first_token_only(model)
    layers = getattr(model, model.base_model_prefix).encoder.layer
    widths = []
    layers[-1].register_forward_hook(lambda m, args, out: widths.append(out.shape[1]))
    b = batch()
    with torch.no_grad():
        assert close(model.eval()(**b).logits, ref.eval()(**b).logits)
    ref.train(), model.train()
    want_logits, want = grads(ref, b)
    got_logits, got = grads(model, b)
    assert widths == [1, 1]  # the last layer ran for the first position only
    assert close(got_logits, want_logits)
    # the last layer's query never sees positions 1..T-1, but every weight gets its gradient
    assert got.keys() == want.keys()
    for name in want:
        assert close(got[name], want[name]), name


def test_with_loralab_attention_dropout_and_gradient_checkpointing():
    ref = build("bert").double()
    model = copy.deepcopy(ref)
    assert use_fast_attention(model) and use_first_token_only(model)
    enable_checkpointing(model, "full")
    ref.train(), model.train()
    b = batch()
    calls = []
    layer = model.bert.encoder.layer[-1]
    inner = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: calls.append(1) or inner(*a, **k)
    want_logits, want = grads(ref, b)
    got_logits, got = grads(model, b)
    assert calls  # the last layer was checkpointed too
    assert close(got_logits, want_logits)
    for name in want:
        assert close(got[name], want[name]), name


def test_dropout_still_applies_in_the_last_layer():
    model = build("bert", attention_probs_dropout_prob=0.5, hidden_dropout_prob=0.5)
    assert use_first_token_only(model)
    b = batch()
    with torch.no_grad():
        clean = model.eval()(**b).logits
        torch.manual_seed(3)
        noisy = model.train()(**b).logits
        torch.manual_seed(3)
        again = model(**b).logits
    assert not torch.allclose(noisy, clean) and torch.equal(noisy, again)


def test_left_alone_where_other_positions_count():
    torch.manual_seed(0)
    llama = T.LlamaForSequenceClassification(T.LlamaConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, num_labels=2, pad_token_id=0))
    assert not use_first_token_only(llama)  # reads the last real token
    mlm = T.BertForMaskedLM(T.BertConfig(**{k: v for k, v in SMALL.items()
                                            if k != "num_labels"}))
    assert not use_first_token_only(mlm)  # every position has a prediction
    assert not use_first_token_only(build("bert", "eager", chunk_size_feed_forward=4))
    assert not use_first_token_only(build("bert", is_decoder=True))


def test_whole_layer_when_the_attention_is_no_longer_supported(monkeypatch):
    from loralab.train import first_token

    ref = build("bert", "eager")
    model = copy.deepcopy(ref)
    assert use_first_token_only(model)
    monkeypatch.setattr(first_token, "ATTENTION", frozenset())  # as if switched after install
    widths = []
    model.bert.encoder.layer[-1].register_forward_hook(
        lambda m, args, out: widths.append(out.shape[1]))
    b = batch()
    with torch.no_grad():
        assert torch.equal(model.eval()(**b).logits, ref.eval()(**b).logits)
    assert widths == [b["input_ids"].shape[1]]
