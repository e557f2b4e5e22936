"""The tokenizer as GGUF metadata: tokens, token types, merges, special ids,
the chat template, the pre-tokenizer llama.cpp should split text with.

Token types follow llama.cpp's ``TextModel.get_vocab_base``: an added token
marked special is CONTROL (llama.cpp parses it in prompts and treats it as an
end-of-generation candidate), another added token USER_DEFINED, ids the
embedding has but the tokenizer does not are UNUSED ``[PAD{i}]``. Merges and
the chat template are read by the gguf package's own ``SpecialVocab``.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

from loralab.errors import LoralabError

# The split regexes of the byte-level BPE tokenizers llama.cpp knows by name
# (src/llama-vocab.cpp); they differ only in how digits group.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def tokenizer_json(tok) -> dict:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise LoralabError("GGUF export needs a fast (tokenizer.json) tokenizer.",
                           hint="Fix: save the model's tokenizer with transformers' fast tokenizer.")
    return json.loads(backend.to_str())


def is_byte_level_bpe(tj: dict) -> bool:
    model, decoder = tj.get("model") or {}, tj.get("decoder") or {}
    return (model.get("type") == "BPE" and not model.get("byte_fallback")
            and decoder.get("type") == "ByteLevel")


def pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, from its structure
    (llama.cpp hashes a probe string's tokens; the structure says the same)."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = (steps[0].get("pattern") or {}).get("Regex")
        names = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}
        if regex in names:
            return names[regex]
    warnings.warn("unrecognised pre-tokenizer: llama.cpp will split text with its default "
                  "rules, which may tokenize some text differently", stacklevel=2)
    return "default"


def token_list(tok, n_vocab: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..n_vocab-1 (llama.cpp ``get_vocab_base``)."""
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special
                         else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def adds_special(tok) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, observed rather than read from a flag."""
    ids = tok("a")["input_ids"]
    bos = tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id
    eos = tok.eos_token_id is not None and bool(ids) and ids[-1] == tok.eos_token_id
    return bos, eos


def special_vocab(tok, n_vocab: int):
    """gguf's ``SpecialVocab`` over the saved tokenizer (merges, chat template),
    with the special ids and add-BOS/EOS the loaded tokenizer actually uses."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="loralab-tok-") as tmp:
        tok.save_pretrained(tmp)
        sv = gguf.SpecialVocab(Path(tmp), load_merges=True, n_vocab=n_vocab)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            sv.special_token_ids[kind] = tid
    sv.add_special_token["bos"], sv.add_special_token["eos"] = adds_special(tok)
    if sv.chat_template is None and isinstance(getattr(tok, "chat_template", None), str):
        sv.chat_template = tok.chat_template
    return sv


def write_vocab(writer, tok, n_vocab: int) -> dict:
    """Add the tokenizer to ``writer``; returns a summary for the report."""
    tj = tokenizer_json(tok)
    if not is_byte_level_bpe(tj):
        model = (tj.get("model") or {}).get("type")
        raise LoralabError(
            f"GGUF export writes byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen2/3); "
            f"this one is {model}{' with byte fallback' if model == 'BPE' else ''} "
            "(SentencePiece-style).",
            hint="Fix: convert this model with llama.cpp's convert_hf_to_gguf.py after "
            "`loralab merge`.")
    pre = pre_tokenizer_name(tj)
    tokens, types = token_list(tok, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    sv = special_vocab(tok, n_vocab)
    sv.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2", "pre": pre, "tokens": len(tokens), "merges": len(sv.merges),
            "chat_template": sv.chat_template is not None,
            "bytes": sum(len(t.encode()) + 8 for t in tokens)
            + sum(len(m.encode()) + 8 for m in sv.merges) + 4 * len(tokens)
            + len((sv.chat_template or "").encode())}
