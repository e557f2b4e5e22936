"""Tiny models with tokenizers saved to disk, and small synthetic data sets,
for end-to-end training tests (no downloads, seconds per run)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import torch

CLASSES = {
    "billing": "invoice charge refund payment card bill price paid",
    "tech": "crash error bug login password screen broken slow",
    "shipping": "package delivery courier tracking parcel late address box",
}
FILLER = ["the", "my", "a", "is", "was", "and", "please", "help", "today", "again", "this",
          "why", "not"]
EXTRA = {"repeat", "say", "word", "twice", "reverse", "list", "first", "last", "hello", "world"}
WORDS = sorted({w for ws in CLASSES.values() for w in ws.split()} | set(FILLER) | EXTRA)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "<eos>", "<user>", "<bot>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<user> {{ m['content'] }} "
    "{% else %}<bot> {{ m['content'] }} <eos> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<bot> {% endif %}"
)


def make_tokenizer(kind: str, chat: bool = False):
    """A word-level fast tokenizer: BERT-style ([CLS] x [SEP]) or causal (eos only)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS + list("0123456789"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                       pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]")
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                       pad_token="[PAD]", eos_token="<eos>", bos_token="<eos>",
                                       additional_special_tokens=["<user>", "<bot>"])
        if chat:
            fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(kind: str, vocab_size: int, num_labels: int = 3, seed: int = 0):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, num_labels=num_labels,
                         max_position_embeddings=128, pad_token_id=0, initializer_range=0.2,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(cfg)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                         bos_token_id=4, eos_token_id=4, pad_token_id=0)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, bos_token_id=4, eos_token_id=4,
                      pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def save_tiny(root: Path, kind: str) -> Path:
    """Save a tiny model + tokenizer dir (``bert``, ``gpt2``, ``llama`` with chat template)."""
    out = root / f"tiny-{kind}"
    if (out / "config.json").exists():
        return out
    tok = make_tokenizer("bert" if kind == "bert" else "causal", chat=kind == "llama")
    model = make_model(kind, len(tok))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def class_rows(n: int = 150, seed: int = 0) -> list[tuple[str, str]]:
    """Texts made of two class keywords among filler words; labels balanced."""
    rng = random.Random(seed)
    rows = []
    names = sorted(CLASSES)
    for i in range(n):
        label = names[i % len(names)]
        words = rng.sample(CLASSES[label].split(), 2) + rng.sample(FILLER, rng.randint(1, 6))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


def write_csv(path: Path, rows, header=("text", "label"), delimiter=",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def sft_records(n: int = 60, seed: int = 0) -> list[dict]:
    """Instructions with a learnable answer: say a word twice, or repeat it."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        word = rng.choice(WORDS[:30])
        if i % 2:
            out.append({"instruction": "say the word twice", "input": word,
                        "output": f"{word} {word}"})
        else:
            out.append({"instruction": f"repeat {word}", "input": "", "output": word})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
