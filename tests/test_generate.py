"""Generation: the decoding loop against transformers' own greedy search,
batched rows against single rows, sampling reproducibility, stop strings,
streamed deltas, and the ``loralab generate`` command with an adapter.

The tiny Llama (hidden 64, 2 layers, context 96, the MiniLM tokenizer) and its
adapters come from ``train_support``, shared with the server tests.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli
from train_support import build_adapters, tiny_llama_dir

from loralab.errors import LoralabError
from loralab.generation import (
    GenerationRequest,
    SamplingParams,
    TextStream,
    complete,
    encode_prompt,
    generate,
    generate_batch,
    load_for_generation,
)

PROMPTS = ["hello world", "the quick brown fox jumps over the lazy dog", "a",
           "tell me a story about dragons"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model_dir = tiny_llama_dir(root)
    adapters = build_adapters(model_dir, root / "runs", ["one", "two"])
    model, tok = load_for_generation(str(model_dir))
    return model_dir, adapters, model, tok


def test_greedy_equals_transformers_generate(tiny):
    _, _, model, tok = tiny
    for prompt in PROMPTS[:2]:
        ids = encode_prompt(tok, prompt)
        ours = generate(model, tok, ids, SamplingParams(max_tokens=12))
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False)[0, len(ids):].tolist()
        assert ours.token_ids == ref
        assert ours.finish_reason == "length"
        assert ours.text == tok.decode(ref, skip_special_tokens=True,
                                       clean_up_tokenization_spaces=False)


def test_batched_rows_equal_single_rows(tiny):
    _, _, model, tok = tiny
    params = [SamplingParams(max_tokens=n) for n in (10, 3, 7, 10)]
    singles = [generate(model, tok, encode_prompt(tok, p), sp) for p, sp in zip(PROMPTS, params)]
    batch = [GenerationRequest(encode_prompt(tok, p), sp) for p, sp in zip(PROMPTS, params)]
    generate_batch(model, tok, batch)  # left-padded, rows leave as they finish
    for one, row in zip(singles, batch):
        assert row.token_ids == one.token_ids and row.text == one.text
    assert [len(r.token_ids) for r in batch] == [10, 3, 7, 10]


def test_sampling_is_seeded_per_row(tiny):
    _, _, model, tok = tiny
    ids = encode_prompt(tok, PROMPTS[0])
    sp = SamplingParams(max_tokens=12, temperature=1.5, top_p=0.9, seed=7)
    a = generate(model, tok, ids, sp)
    # the same seed in a batch with other rows draws the same tokens
    rows = [GenerationRequest(encode_prompt(tok, PROMPTS[1]), SamplingParams(max_tokens=5)),
            GenerationRequest(ids, sp)]
    generate_batch(model, tok, rows)
    assert rows[1].token_ids == a.token_ids
    b = generate(model, tok, ids, SamplingParams(max_tokens=12, temperature=1.5, seed=8))
    greedy = generate(model, tok, ids, SamplingParams(max_tokens=12))
    assert a.token_ids != b.token_ids or a.token_ids != greedy.token_ids


def test_top_p_tiny_keeps_only_the_argmax(tiny):
    _, _, model, tok = tiny
    ids = encode_prompt(tok, PROMPTS[1])
    greedy = generate(model, tok, ids, SamplingParams(max_tokens=8))
    nucleus = generate(model, tok, ids, SamplingParams(max_tokens=8, temperature=1.0,
                                                      top_p=1e-6, seed=3))
    assert nucleus.token_ids == greedy.token_ids


def test_stop_string_cuts_and_streams_the_same(tiny):
    _, _, model, tok = tiny
    ids = encode_prompt(tok, PROMPTS[0])
    full = generate(model, tok, ids, SamplingParams(max_tokens=12)).text
    words = full.split()
    stop = words[2][:3]  # a string that first appears inside the third word or earlier
    cut = full[: full.index(stop)]
    sp = SamplingParams(max_tokens=12, stop=(stop,))
    stopped = generate(model, tok, ids, sp)
    assert stopped.text == cut and stopped.finish_reason == "stop"
    assert "".join(streamed(model, tok, ids, sp)) == cut
    assert "".join(streamed(model, tok, ids, SamplingParams(max_tokens=12))) == full


def streamed(model, tok, ids, params) -> list[str]:
    """The text deltas ``on_text`` receives, in order (what serve streams)."""
    deltas: list[str] = []
    generate_batch(model, tok, [GenerationRequest(ids, params, on_text=deltas.append)])
    return deltas


class _CharTokenizer:
    """Decodes ids as characters: enough to test stop-string hold-back."""

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_a_possible_stop():
    s = TextStream(_CharTokenizer(), stop=("END",))
    assert [s.push(ord(c)) for c in "abE"] == ["a", "b", ""]
    assert s.push(ord("x")) == "Ex"  # 'Ex' cannot start 'END': released
    assert [s.push(ord(c)) for c in "EN"] == ["", ""]
    assert s.push(ord("D")) == "" and s.stopped and s.text == "abEx"
    assert s.flush() == ""


def test_sampling_params_are_checked():
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"stop": ("",)}):
        with pytest.raises(LoralabError):
            SamplingParams(**bad)


def test_context_length_is_enforced(tiny):
    _, _, model, tok = tiny
    ids = encode_prompt(tok, "word " * 90)
    with pytest.raises(LoralabError, match="context length is 96"):
        generate(model, tok, ids, SamplingParams(max_tokens=16))


def test_adapter_changes_output_and_cli_prints_it(tiny, capsys):
    model_dir, adapters, model, tok = tiny
    prompt = PROMPTS[1]
    base = complete(model, tok, prompt, SamplingParams(max_tokens=10)).text
    with_one = load_for_generation(str(model_dir), adapters["one"])
    one = complete(*with_one, prompt, SamplingParams(max_tokens=10)).text
    assert one != base
    run_dir = adapters["two"].parent  # a run dir is accepted too
    assert cli("generate", "--model", str(model_dir), "--adapter", str(run_dir),
                    "--prompt", prompt, "--max-tokens", "10", "--json") == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    two = complete(*load_for_generation(str(model_dir), run_dir), prompt,
                   SamplingParams(max_tokens=10))
    assert out["text"] == two.text != one
    assert out["completion_tokens"] == 10 and out["finish_reason"] == "length"


def test_cli_chat_and_user_errors(tiny, capsys):
    model_dir, _adapters, model, tok = tiny
    assert cli("generate", "--model", str(model_dir), "--prompt", "hi", "--chat",
                    "--max-tokens", "5") == 0
    chat = complete(model, tok, "hi", SamplingParams(max_tokens=5), chat=True)
    assert capsys.readouterr().out == chat.text + "\n"
    for argv in (["--adapter", str(model_dir)], ["--max-tokens", "0"], ["--top-p", "2"]):
        assert cli("generate", "--model", str(model_dir), "--prompt", "hi", *argv) == 2
        assert capsys.readouterr().err.startswith("error:")


def test_cancelled_row_leaves_the_batch(tiny):
    _, _, model, tok = tiny
    rows = [GenerationRequest(encode_prompt(tok, p), SamplingParams(max_tokens=10))
            for p in PROMPTS[:2]]
    rows[0].on_text = lambda delta: setattr(rows[0], "cancelled", True)  # a client went away
    generate_batch(model, tok, rows)
    assert rows[0].finish_reason == "cancelled" and len(rows[0].token_ids) < 10
    alone = generate(model, tok, rows[1].prompt_ids, SamplingParams(max_tokens=10))
    assert rows[1].token_ids == alone.token_ids  # the other row is unaffected
