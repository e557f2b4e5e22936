"""The chunked causal-LM loss equals the plain full-logits loss, in value and in
every gradient (float64), for tied and untied heads, with and without LoRA on
the head, and with Gemma's soft-capped logits: with the chunks' gradients
taken in the forward and with the chunks recomputed in the backward."""

from __future__ import annotations

import pytest
import torch
from tiny_models import VOCAB, tiny_gpt2, tiny_llama, tiny_qwen3
from transformers import Gemma2Config, Gemma2ForCausalLM

from loralab.data.encode import IGNORE
from loralab.lora import LoRAConfig, inject_lora
from loralab.train import lm_loss
from loralab.train.lm_loss import causal_lm_loss_sum, chunkable, plain_loss_sum


def tiny_gemma2(seed=0):
    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=16, max_position_embeddings=64, final_logit_softcapping=3.0)
    return Gemma2ForCausalLM(cfg).eval()


def tiny_llama_tied():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


BUILD = {"llama": tiny_llama, "llama-tied": tiny_llama_tied, "gpt2": tiny_gpt2,
         "qwen3": tiny_qwen3, "gemma2": tiny_gemma2}


def batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE  # a prompt: no loss there
    labels[mask == 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def grads(model, loss):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    values = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return {n: g for (n, _), g in zip(params, values) if g is not None}


@pytest.mark.parametrize("arch", list(BUILD))
@pytest.mark.parametrize("method", ["full", "lora-head"])
@pytest.mark.parametrize("path", ["grads-in-forward", "checkpointed"])
def test_chunked_equals_plain(arch, method, path, monkeypatch):
    if path == "checkpointed":  # as a trainable head too big to hold its gradients
        monkeypatch.setattr(lm_loss, "GRADS_IN_FORWARD_ELEMENTS", -1)
    model = BUILD[arch]().double()
    if method == "lora-head":
        head = "lm_head"
        targets = ["q_proj", "v_proj", head] if arch != "gpt2" else ["c_attn", head]
        inject_lora(model, LoRAConfig(r=4, alpha=8, targets=targets))
        for m in model.modules():  # B nonzero, so the head's adapter matters
            if hasattr(m, "lora_B"):
                for lin in m.lora_B.values():
                    torch.nn.init.normal_(lin.weight, std=0.1)
    assert chunkable(model)
    assert lm_loss.grads_in_forward(torch.zeros(1, dtype=torch.float64),
                                    model.get_output_embeddings()) == (path == "grads-in-forward")
    b = batch()
    plain = plain_loss_sum(model(input_ids=b["input_ids"],
                                 attention_mask=b["attention_mask"]).logits, b["labels"])
    g_plain = grads(model, plain)
    chunked = causal_lm_loss_sum(model, b, model, chunk_rows=4)  # 15 label rows: 4 chunks
    g_chunked = grads(model, chunked)
    # Gemma's RMSNorm computes in float32 even in a float64 model: its gradients
    # carry float32 rounding from the different summation order of the chunks
    tol = {"rtol": 1e-5, "atol": 1e-6} if arch == "gemma2" else {"rtol": 1e-9, "atol": 1e-12}
    assert torch.allclose(chunked, plain, rtol=1e-12, atol=1e-10)
    assert g_plain.keys() == g_chunked.keys() and g_plain
    for name in g_plain:
        assert torch.allclose(g_chunked[name], g_plain[name], **tol), name
    # the head is restored: a plain forward gives logits again
    assert model(input_ids=b["input_ids"]).logits.shape[-1] == VOCAB


def test_unknown_architectures_keep_the_plain_path():
    model = tiny_llama()
    model.config.model_type = "somethingelse"
    assert not chunkable(model)
    b = batch()
    expected = plain_loss_sum(model(input_ids=b["input_ids"],
                                    attention_mask=b["attention_mask"]).logits, b["labels"])
    assert torch.allclose(causal_lm_loss_sum(model, b, model), expected)
    assert torch.allclose(causal_lm_loss_sum(model, b, None), expected)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_per_row_eval_sums_equal_the_plain_path(arch):
    from loralab.train.lm_loss import row_loss_sums

    model = BUILD[arch]().double()
    b = batch()
    with torch.no_grad():
        sums, counts = row_loss_sums(model, b, model)
        plain_sums, plain_counts = row_loss_sums(model, b, None)
    assert torch.equal(counts, plain_counts) and counts.tolist() == [6, 6, 3]
    assert torch.allclose(sums, plain_sums, rtol=1e-6 if arch == "gemma2" else 1e-12)
