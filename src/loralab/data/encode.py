"""Tokenize once, up front: lists of token ids, no padding.

Padding happens per batch in ``batching`` (to the longest row of that batch),
so a 20-token message costs 20 tokens, not ``max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loralab.data.prompts import build_chat_prompt, has_chat_template, split_response

IGNORE = -100  # label value the loss skips (PyTorch CrossEntropyLoss ignore_index)


@dataclass
class Encoded:
    input_ids: list[list[int]]
    labels: list  # classify: list[int]; sft/text: list[list[int]] aligned with input_ids
    truncated: int = 0  # rows cut to max_length
    dropped: int = 0  # sft rows with no response token left after truncation
    prompt_cut: int = 0  # sft rows whose prompt was cut from the left to fit
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.input_ids]

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)


def encode_classification(tokenizer, texts: list[str], label_ids: list[int],
                          max_length: int) -> Encoded:
    full = tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
    long_rows = [i for i, ids in enumerate(full) if len(ids) > max_length]
    if long_rows:
        # the tokenizer's own truncation keeps [CLS] ... [SEP] intact
        cut = tokenizer([texts[i] for i in long_rows], add_special_tokens=True,
                        truncation=True, max_length=max_length)["input_ids"]
        for i, ids in zip(long_rows, cut):
            full[i] = ids
    return Encoded(full, list(label_ids), truncated=len(long_rows))


def encode_conversations(tokenizer, conversations: list[list[dict]], max_length: int,
                         truncation: str = "left") -> Encoded:
    """Prompt tokens get label IGNORE; the loss is on response tokens only.

    A record longer than ``max_length`` keeps its response (up to half of
    ``max_length`` when it must be cut itself, then cut at the end) and, with
    ``truncation="left"``, loses the start of its prompt's content, the template
    kept: the question usually comes last (TRL's ``truncation_mode="keep_end"``
    cuts the same side, without the template). ``"drop"`` keeps the old rule:
    cut at ``max_length``, skip a record left with no response token.
    """
    specials = not has_chat_template(tokenizer)  # templates write their own BOS
    out = Encoded([], [])
    for messages in conversations:
        prompt, response = split_response(tokenizer, messages)
        p = tokenizer(prompt, add_special_tokens=specials)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if len(p) + len(r) > max_length:
            out.truncated += 1
            room = max_length - min(len(r), max(max_length - len(p), max_length // 2))
            if truncation == "left" and len(p) > room:
                cut = cut_prompt(tokenizer, messages[:-1], room, specials)
                if cut is not None:
                    p = cut
                    out.prompt_cut += 1
        ids, labels = p + r, [IGNORE] * len(p) + r
        ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels[1:]):  # nothing left to learn (shifted by 1)
            out.dropped += 1
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
    return out


def cut_prompt(tokenizer, context: list[dict], room: int, specials: bool) -> list[int] | None:
    """Token ids of the prompt for ``context`` with its content cut from the left
    until the rendered prompt (template included) fits ``room``; None if the
    template alone does not fit."""
    contents = [tokenizer(m["content"], add_special_tokens=False)["input_ids"] for m in context]
    full = tokenizer(build_chat_prompt(tokenizer, context), add_special_tokens=specials)
    excess = len(full["input_ids"]) - room
    for _ in range(4):  # re-tokenizing at the cut can merge or split a token or two
        kept = _drop_left(contents, excess)
        messages = [dict(m, content=tokenizer.decode(ids)) for m, ids in zip(context, kept)
                    if ids is not None]
        while len(messages) > 1 and messages[0]["role"] == "assistant":
            messages = messages[1:]  # a conversation does not open with the answer
        ids = tokenizer(build_chat_prompt(tokenizer, messages),
                        add_special_tokens=specials)["input_ids"]
        if len(ids) <= room:
            return ids
        if not any(kept[-1] or ()):
            return None
        excess += len(ids) - room
    return None


def _drop_left(contents: list[list[int]], n: int) -> list[list[int] | None]:
    """Remove ``n`` tokens from the front of the concatenated contents; a message
    consumed entirely becomes None (the last one stays, possibly empty)."""
    out: list[list[int] | None] = []
    for i, ids in enumerate(contents):
        take = min(n, len(ids))
        n -= take
        last = i == len(contents) - 1
        out.append(ids[take:] if take < len(ids) or last else None)
    return out


def encode_documents(tokenizer, documents: list[str], max_length: int) -> Encoded:
    """Causal LM on every token: documents tokenized, joined with EOS after each
    (GPT-2's document separator) and cut into consecutive blocks of
    ``max_length`` tokens, as transformers' run_clm.py ``group_texts`` packs."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for chunk in _chunks(documents, 256):
        for row in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            ids.extend(row + ([eos] if eos is not None else []))
    blocks = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    blocks = [b for b in blocks if len(b) > 1]
    return Encoded(blocks, [list(b) for b in blocks],
                   meta={"documents": len(documents), "tokens": len(ids)})


def encode_text_blocks(tokenizer, text: str, max_length: int) -> Encoded:
    """Plain text -> packed blocks (perplexity, forgetting): its paragraphs as documents."""
    from loralab.data.documents import paragraphs

    return encode_documents(tokenizer, paragraphs(text), max_length)


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]
