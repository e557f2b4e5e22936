"""The tiny tokenizers, models and synthetic data the suite is built on."""

from train_support import CLASSES, class_rows, make_tokenizer, save_tiny


def test_tiny_tokenizers_round_trip(tmp_path):
    bert = make_tokenizer("bert")
    ids = bert("invoice error")["input_ids"]
    assert ids[0] == bert.cls_token_id and ids[-1] == bert.sep_token_id and len(ids) == 4
    causal = make_tokenizer("causal", chat=True)
    text = causal.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                      add_generation_prompt=True)
    assert text == "<user> hello <bot> "
    d = save_tiny(tmp_path, "gpt2")
    assert (d / "config.json").exists() and (d / "tokenizer.json").exists()


def test_synthetic_data_is_balanced():
    rows = class_rows(30)
    assert sorted({lab for _, lab in rows}) == sorted(CLASSES)
    assert all(len(t.split()) >= 3 for t, _ in rows)
