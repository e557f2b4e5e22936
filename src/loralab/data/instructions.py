"""Instruction data for sft: Alpaca JSON/JSONL and chat JSONL records.

Every record becomes a conversation ending in the assistant turn to learn;
``prompts.split_response`` turns it into (prompt, response) text.
"""

from __future__ import annotations

import json
from pathlib import Path

from loralab.data.tables import read_text_file
from loralab.errors import LoralabError


def read_records(path: str | Path) -> list[dict]:
    """Parse a JSON list or JSONL file into dict records."""
    text = read_text_file(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as err:
            raise LoralabError(f"{path} is not valid JSON (line {err.lineno}). Fix the file.")
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise LoralabError(
                    f"{path} line {n} is not valid JSON. Instruction data must be a JSON list "
                    "or JSONL with instruction/input/output or messages fields.") from None
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise LoralabError(f"{path} record {bad + 1} is not a JSON object. Fix the file.")
    return records


def to_conversation(record: dict, index: int, source: str) -> list[dict]:
    """One record -> messages ending with the assistant response."""
    where = f"{source} record {index + 1}"
    if "messages" in record:
        messages = record["messages"]
        ok = isinstance(messages, list) and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages)
        if not ok:
            raise LoralabError(f"{where}: 'messages' must be a list of {{role, content}} objects.")
        if not messages or messages[-1]["role"] != "assistant" or not str(
                messages[-1]["content"]).strip():
            raise LoralabError(
                f"{where} has no response: the last message must be a non-empty assistant turn. "
                "Add the response or remove the record.")
        return [{"role": m["role"], "content": str(m["content"])} for m in messages]
    if "instruction" not in record:
        keys = ", ".join(map(repr, record)) or "none"
        raise LoralabError(
            f"{where} has neither 'instruction' nor 'messages' (fields found: {keys}). "
            "Use Alpaca fields instruction/input/output or chat 'messages'.")
    output = record.get("output", record.get("response"))
    if output is None or not str(output).strip():
        raise LoralabError(
            f"{where} has no response ('output' is missing or empty). "
            "Add the response or remove the record.")
    from loralab.data.prompts import instruction_messages

    messages = instruction_messages(str(record["instruction"]), str(record.get("input") or ""))
    return messages + [{"role": "assistant", "content": str(output)}]


def read_conversations(path: str | Path) -> list[list[dict]]:
    records = read_records(path)
    if not records:
        raise LoralabError(f"{path} holds no records. Give a file with instruction data.")
    return [to_conversation(r, i, str(path)) for i, r in enumerate(records)]


def split_conversations(convs: list[list[dict]], eval_split: float, test_split: float,
                        seed: int, has_eval: bool, has_test: bool):
    """Seeded random split of the records still needed for eval/test."""
    import random

    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_eval = 0 if has_eval else max(1, round(n * eval_split)) if eval_split > 0 else 0
    n_test = 0 if has_test else max(1, round(n * test_split)) if test_split > 0 else 0
    if n - n_eval - n_test < 1:
        raise LoralabError(f"only {n} records: too few to split off eval and test sets. "
                           "Give more data or --eval-data/--test-data files.")
    eval_idx, test_idx = order[:n_eval], order[n_eval:n_eval + n_test]
    train_idx = order[n_eval + n_test:]
    pick = lambda idx: [convs[i] for i in sorted(idx)]
    return pick(train_idx), pick(eval_idx) if n_eval else None, pick(test_idx) if n_test else None
