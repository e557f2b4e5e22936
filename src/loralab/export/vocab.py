"""The tokenizer as GGUF metadata: tokens, token types, merges or scores,
special ids, the chat template, the pre-tokenizer llama.cpp should split text with.

Two kinds of tokenizer, as llama.cpp has them: byte-level BPE (Llama 3,
SmolLM2, Qwen2/3; GGUF model ``gpt2``: tokens and merges) and SentencePiece-
style BPE with byte fallback (Llama 2, Mistral v0.x, Gemma; GGUF model
``llama``: tokens and scores, merged by llama.cpp's SPM tokenizer, which
joins the adjacent pair whose result scores highest). The scores are read
from the tokenizer.json's merge ranks: the token a merge makes scores minus
its rank, so llama.cpp joins pairs in the order the merges list them, as the
BPE model does; a multi-character token no merge makes scores below every
merge. Byte tokens ``<0x00>`` .. ``<0xFF>`` are typed BYTE (the fallback),
the unknown token UNKNOWN.

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


def is_spm_bpe(tj: dict) -> bool:
    """BPE with byte fallback over ``\u2581``-marked spaces (SentencePiece's BPE)."""
    model = tj.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def adds_space_prefix(tj: dict) -> bool:
    """Whether the text gets a leading ``\u2581`` before merging: a Prepend
    normalizer (Llama 2's tokenizer.json) or a Metaspace that prepends."""
    def steps(node):
        if not node:
            return []
        return node.get("normalizers") or node.get("pretokenizers") or [node]

    if any(n.get("type") == "Prepend" for n in steps(tj.get("normalizer"))):
        return True
    for pre in steps(tj.get("pre_tokenizer")):
        if pre.get("type") == "Metaspace":
            return pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True)
                           else "never") != "never"
    return False


def merge_scores(tj: dict, n_vocab: int) -> list[float]:
    """A score per id for llama.cpp's SPM tokenizer, from the merge ranks."""
    model = tj["model"]
    vocab, merges = model["vocab"], model.get("merges") or []
    scores = [0.0] * n_vocab
    made = set()
    for rank, merge in enumerate(merges):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        tid = vocab.get(a + b)
        if tid is not None and tid < n_vocab and tid not in made:
            scores[tid] = -float(rank)
            made.add(tid)
    floor = -float(len(merges))
    for piece, tid in vocab.items():
        if tid < n_vocab and tid not in made and len(piece) > 1 and not _is_byte(piece):
            scores[tid] = floor - tid
    return scores


def _is_byte(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


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


def special_vocab(tok, n_vocab: int, merges: bool = True):
    """gguf's ``SpecialVocab`` over the saved tokenizer (merges, chat template),
    with the special ids and add-BOS/EOS the loaded tokenizer actually uses."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="loralab-tok-") as tmp:
        tok.save_pretrained(tmp)
        sv = gguf.SpecialVocab(Path(tmp), load_merges=merges, n_vocab=n_vocab)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            sv.special_token_ids[kind] = tid
    sv.add_special_token["bos"], sv.add_special_token["eos"] = adds_special(tok)
    if sv.chat_template is None and isinstance(getattr(tok, "chat_template", None), str):
        sv.chat_template = tok.chat_template
    return sv


def _unsupported(tj: dict) -> LoralabError:
    model = (tj.get("model") or {}).get("type")
    return LoralabError(
        f"GGUF export writes byte-level BPE tokenizers (Llama 3, SmolLM2, Qwen2/3) and "
        f"BPE with byte fallback (Llama 2, Mistral, Gemma); this one is {model}.",
        hint="Fix: convert this model with llama.cpp's convert_hf_to_gguf.py after "
        "`loralab merge`.")


def write_vocab(writer, tok, n_vocab: int) -> dict:
    """Add the tokenizer to ``writer``; returns a summary for the report."""
    import gguf

    tj = tokenizer_json(tok)
    spm = is_spm_bpe(tj)
    if not spm and not is_byte_level_bpe(tj):
        raise _unsupported(tj)
    tokens, types = token_list(tok, n_vocab)
    if spm:
        scores = merge_scores(tj, n_vocab)
        unk = tok.unk_token_id
        for i, t in enumerate(tokens):
            if types[i] == gguf.TokenType.NORMAL and _is_byte(t):
                types[i] = gguf.TokenType.BYTE
            elif i == unk:
                types[i] = gguf.TokenType.UNKNOWN
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(adds_space_prefix(tj))
        pre = "default"
    else:
        pre = pre_tokenizer_name(tj)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
    sv = special_vocab(tok, n_vocab, merges=not spm)
    sv.add_to_gguf(writer, quiet=True)
    return {"model": "llama" if spm else "gpt2", "pre": pre, "tokens": len(tokens),
            "merges": len(sv.merges), "chat_template": sv.chat_template is not None,
            "bytes": sum(len(t.encode()) + 8 for t in tokens)
            + sum(len(m.encode()) + 8 for m in sv.merges) + (8 if spm else 4) * len(tokens)
            + len((sv.chat_template or "").encode())}
