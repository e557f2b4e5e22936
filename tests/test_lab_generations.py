"""The lab's side-by-side answers come from loralab's one decoding loop and
equal transformers' own greedy search, prompt by prompt, whatever else shares
the batch (left padding, rows finishing early)."""

from __future__ import annotations

import pytest
import torch
from train_support import save_tiny

from loralab.errors import LoralabError
from loralab.generation import encode_chat
from loralab.lab.generations import generate
from loralab.models import load_model

pytestmark = pytest.mark.usefixtures("single_thread")

PROMPTS = [[{"role": "user", "content": "say the word twice"}],
           [{"role": "user", "content": "repeat hello"}],
           [{"role": "user", "content": "why is my login slow again today please help"}]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model, tok = load_model(str(save_tiny(tmp_path_factory.mktemp("gen"), "llama")), "sft")
    return model.eval(), tok


def reference(model, tok, messages, n: int) -> str:
    """transformers' greedy search on the prompt alone (no padding)."""
    ids = torch.tensor([encode_chat(tok, messages)])  # (1, T)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)  # (1, T + new)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True,
                      clean_up_tokenization_spaces=False).strip()


def test_side_by_side_answers_equal_transformers_greedy(llama):
    model, tok = llama
    answers = generate(model, tok, [{"messages": m} for m in PROMPTS], 8)
    assert answers == [reference(model, tok, m, 8) for m in PROMPTS]
    assert any(answers)  # the tiny model says something


def test_prompt_longer_than_the_context_is_refused(llama):
    model, tok = llama
    long = [{"role": "user", "content": "hello " * 200}]
    with pytest.raises(LoralabError, match="context length"):
        generate(model, tok, [{"messages": long}], 8)
