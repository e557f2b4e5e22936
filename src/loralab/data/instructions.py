"""Instruction data for sft: chat messages, prompt/completion, Alpaca and other
field pairs (``fields.detect_mapping``), from any source ``sources`` reads.

Every record becomes a conversation ending in the assistant turn to learn;
``prompts.split_response`` turns it into (prompt, response) text.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from loralab.data.fields import Mapping, detect_mapping, option
from loralab.data.prompts import instruction_messages
from loralab.data.sources import Records, fields_found, read_records
from loralab.errors import LoralabError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "bot": "assistant", "model": "assistant", "system": "system"}


def _message(m, where: str) -> dict:
    """{role, content} (OpenAI/TRL) or {from, value} (ShareGPT) -> {role, content}."""
    if isinstance(m, dict):
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role is not None and content is not None:
            return {"role": ROLES.get(str(role).lower(), str(role)), "content": str(content)}
    raise LoralabError(f"{where}: a message must be a {{role, content}} object (or ShareGPT's "
                       "{from, value}).", hint="Fix the record.")


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise LoralabError(f"{where}: expected a list of messages, got {type(value).__name__}.",
                           hint="Fix the record.")
    return [_message(m, where) for m in value]


def _turns(value, role: str, where: str) -> list[dict]:
    """A string is one turn of ``role``; a list is messages (conversational)."""
    if isinstance(value, list):
        return _messages(value, where)
    return [{"role": role, "content": "" if value is None else str(value)}]


def _field(record: dict, name: str, where: str):
    if name not in record:
        from loralab.data.sources import fields_found

        raise LoralabError(f"{where} has no field {name!r} (fields found: "
                           f"{fields_found(record)}).", hint="Fix the record or remove it.")
    return record[name]


def to_conversation(record: dict, index: int, source: str,
                    mapping: Mapping) -> list[dict] | None:
    """One record -> messages ending with the assistant response to learn; None
    when the record has no response (empty, or a conversation ending on the user)."""
    where = f"{source} record {index + 1}"
    if mapping.messages:
        messages = _messages(_field(record, mapping.messages, where), where)
    else:
        prompt = _field(record, mapping.prompt, where)
        context = str(record.get(mapping.context) or "") if mapping.context else ""
        if isinstance(prompt, list):
            messages = _messages(prompt, where)
        else:
            messages = instruction_messages(str(prompt if prompt is not None else ""), context)
        system = record.get(mapping.system) if mapping.system else None
        if system and str(system).strip() and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": str(system)}] + messages
        messages += _turns(_field(record, mapping.response, where), "assistant", where)
    if not messages or messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return None
    return messages


def find_mapping(recs: Records, options=None) -> Mapping:
    mapping = detect_mapping(recs.fields, options, recs.source)
    if mapping is None:
        raise LoralabError(
            f"{recs.source} holds no instruction data: fields found: "
            f"{fields_found(recs.fields)}.",
            hint="Fix: use chat 'messages', prompt/completion or instruction/input/output "
                 "fields, or name yours with --prompt-field NAME --response-field NAME "
                 "(or --messages-field NAME).")
    return mapping


class SftData(NamedTuple):
    conversations: list[list[dict]]
    mapping: Mapping
    skipped: int  # records without a response to learn


def read_sft(data: str, options=None) -> SftData:
    """Every record of ``data`` with a response, as a conversation; the field
    mapping used; how many records had no response (real sets have some:
    4 of Alpaca's first 2,000 have an empty output)."""
    recs = read_records(data, option(options, "data_split"), option(options, "data_config"))
    if not recs.rows:
        raise LoralabError(f"{data} holds no records.", hint="Fix: give a file with "
                                                             "instruction data.")
    mapping = find_mapping(recs, options)
    convs = [to_conversation(r, i, data, mapping) for i, r in enumerate(recs.rows)]
    kept = [c for c in convs if c is not None]
    if not kept:
        raise LoralabError(f"{data} has no response to learn in any record "
                           f"({mapping.describe()}).",
                           hint="Fix: the last turn of each record must be a non-empty "
                                "assistant turn.")
    return SftData(kept, mapping, len(convs) - len(kept))


def read_conversations(path: str | Path, options=None) -> list[list[dict]]:
    return read_sft(str(path), options)[0]


def split_conversations(convs: list, eval_split: float, test_split: float,
                        seed: int, has_eval: bool, has_test: bool, what: str = "records"):
    """Seeded random split of the records still needed for eval/test."""
    import random

    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n = len(order)
    n_eval = 0 if has_eval else max(1, round(n * eval_split)) if eval_split > 0 else 0
    n_test = 0 if has_test else max(1, round(n * test_split)) if test_split > 0 else 0
    if n - n_eval - n_test < 1:
        raise LoralabError(f"only {n} {what}: too few to split off eval and test sets. "
                           "Give more data or --eval-data/--test-data files.")
    eval_idx, test_idx = order[:n_eval], order[n_eval:n_eval + n_test]
    train_idx = order[n_eval + n_test:]
    pick = lambda idx: [convs[i] for i in sorted(idx)]
    return pick(train_idx), pick(eval_idx) if n_eval else None, pick(test_idx) if n_test else None
