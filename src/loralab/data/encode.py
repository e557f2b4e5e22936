"""Tokenize once, up front: lists of token ids, no padding.

Padding happens per batch in ``batching`` (to the longest row of that batch),
so a 20-token message costs 20 tokens, not ``max_length``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loralab.data.prompts import has_chat_template, split_response

IGNORE = -100  # label value the loss skips (PyTorch CrossEntropyLoss ignore_index)


@dataclass
class Encoded:
    input_ids: list[list[int]]
    labels: list  # classify: list[int]; sft/text: list[list[int]] aligned with input_ids
    truncated: int = 0  # rows cut to max_length
    dropped: int = 0  # sft rows with no response token left after truncation
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


def encode_conversations(tokenizer, conversations: list[list[dict]], max_length: int) -> Encoded:
    """Prompt tokens get label IGNORE; the loss is on response tokens only."""
    specials = not has_chat_template(tokenizer)  # templates write their own BOS
    ids_out, labels_out, truncated, dropped = [], [], 0, 0
    for messages in conversations:
        prompt, response = split_response(tokenizer, messages)
        p = tokenizer(prompt, add_special_tokens=specials)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        ids, labels = p + r, [IGNORE] * len(p) + r
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        if all(x == IGNORE for x in labels[1:]):  # nothing left to learn (shifted by 1)
            dropped += 1
            continue
        ids_out.append(ids)
        labels_out.append(labels)
    return Encoded(ids_out, labels_out, truncated=truncated, dropped=dropped)


def encode_text_blocks(tokenizer, text: str, max_length: int) -> Encoded:
    """Plain text -> consecutive blocks of ``max_length`` tokens (perplexity)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    for chunk in _chunks(lines, 256):
        for row in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
            ids.extend(row + ([eos] if eos is not None else []))
    blocks = [ids[i:i + max_length] for i in range(0, len(ids), max_length)]
    blocks = [b for b in blocks if len(b) > 1]
    return Encoded(blocks, [list(b) for b in blocks])


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]
