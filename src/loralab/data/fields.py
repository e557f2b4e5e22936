"""Which fields hold what, and so which task the data is for.

Instruction data comes in a few shapes the ecosystem shares: chat ``messages``
(OpenAI/TRL, ShareGPT's ``conversations`` with from/value), TRL's
``prompt``/``completion`` (strings, or lists of messages: TRL's
"conversational prompt-completion" type, trl/data_utils.py ``is_conversational``),
Alpaca's ``instruction``/``input``/``output``, Dolly's
``instruction``/``context``/``response``, and question/answer pairs under a
handful of common names. ``text``-only records are language-model data (TRL's
"language modeling" type). Anything else is not guessed: the user names the
task and the fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from loralab.errors import LoralabError

MESSAGE_FIELDS = ("messages", "conversations", "conversation")
# (prompt, response) names, most specific first; the first pair present wins
PAIRS = (("prompt", "completion"), ("instruction", "output"), ("instruction", "response"),
         ("instruction", "answer"), ("prompt", "response"), ("prompt", "answer"),
         ("question", "answer"), ("question", "response"), ("query", "response"),
         ("query", "answer"), ("input", "output"), ("input", "response"), ("input", "target"),
         ("source", "target"))
CONTEXT_FIELDS = ("input", "context")  # Alpaca's input, Dolly's context: appended to the prompt
SYSTEM_FIELDS = ("system", "system_prompt")


@dataclass(frozen=True)
class Mapping:
    """Where a record's conversation is: one messages field, or prompt + response
    (+ optional context appended to the prompt and a system message)."""
    messages: str | None = None
    prompt: str | None = None
    response: str | None = None
    context: str | None = None
    system: str | None = None

    def describe(self) -> str:
        if self.messages:
            return f"chat messages from field {self.messages!r}"
        extra = "".join(f", {role} {name!r}" for role, name in
                        (("context", self.context), ("system", self.system)) if name)
        return f"prompt {self.prompt!r}, response {self.response!r}{extra}"


def option(options, name: str):
    """``options.name`` or ``options[name]`` (a config or a plain dict), else None."""
    if options is None:
        return None
    return options.get(name) if isinstance(options, dict) else getattr(options, name, None)


def _require(name: str, fields: list[str], flag: str, source: str) -> None:
    if name not in fields:
        from loralab.data.sources import fields_found

        raise LoralabError(f"{source} has no field {name!r} (given by {flag}); fields found: "
                           f"{fields_found(fields)}.", hint=f"Fix: pass {flag} with one of them.")


def detect_mapping(fields: list[str], options=None, source: str = "the data") -> Mapping | None:
    """The mapping the options name (each checked against ``fields``), else the
    first known shape present, else None."""
    messages = option(options, "messages_field")
    prompt, response = option(options, "prompt_field"), option(options, "response_field")
    if messages:
        _require(messages, fields, "--messages-field", source)
        return Mapping(messages=messages)
    if not (prompt or response):
        found = next((f for f in MESSAGE_FIELDS if f in fields), None)
        if found:
            return Mapping(messages=found)
    pair = next(((p, r) for p, r in PAIRS if p in fields and r in fields
                 and (prompt in (None, p)) and (response in (None, r))), None)
    if prompt or response:
        if prompt:
            _require(prompt, fields, "--prompt-field", source)
        if response:
            _require(response, fields, "--response-field", source)
        prompt, response = prompt or (pair or (None, None))[0], response or (pair or (None,))[-1]
        if not (prompt and response):
            from loralab.data.sources import fields_found

            raise LoralabError(f"--{'response' if prompt else 'prompt'}-field is needed too: no "
                               f"known pair of names completes the one given (fields found: "
                               f"{fields_found(fields)}).", hint="Fix: pass both.")
        pair = (prompt, response)
    if pair is None:
        return None
    context = next((c for c in CONTEXT_FIELDS if c in fields and c not in pair), None)
    system = next((s for s in SYSTEM_FIELDS if s in fields), None)
    return Mapping(prompt=pair[0], response=pair[1], context=context, system=system)


def task_from_fields(fields: list[str], options=None, source: str = "the data",
                     table: bool = False) -> str:
    """sft for any instruction shape, classify for a label column, lm for text
    alone; a table (CSV/TSV) falls back to classify, other records ask."""
    if detect_mapping(fields, options, source) is not None:
        return "sft"
    label = str(option(options, "label_column") or "label")
    text = str(option(options, "text_column") or "text")
    if label in fields:
        return "classify"
    if text in fields and (not table or len(fields) == 1):
        return "lm"
    if table:
        return "classify"
    from loralab.data.sources import fields_found

    raise LoralabError(
        f"cannot tell the task of {source} from its fields ({fields_found(fields)}).",
        hint="Fix: pass --task sft with --prompt-field/--response-field (or "
             "--messages-field), --task classify with --text-column/--label-column, or "
             "--task lm with --text-column.")


def task_from_data(data: str, options=None) -> str:
    """The task ``data`` is for, read from as little of it as tells."""
    from pathlib import Path

    from loralab.data.sources import peek_fields, source_kind

    try:
        kind = source_kind(data)
    except LoralabError:  # missing: the data loader says so, with the task's own words
        return "lm" if Path(data).suffix.lower() == ".txt" else "classify"
    if kind == "text":
        return "lm"
    if kind in ("csv", "tsv"):
        return task_from_fields(_table_header(data, options), options, data, table=True)
    fields = peek_fields(data, option(options, "data_split"), option(options, "data_config"))
    return task_from_fields(fields, options, data)


def _table_header(path: str, options) -> list[str]:
    from pathlib import Path

    from loralab.data.tables import delimited_rows

    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        head = "".join(line for _, line in zip(range(50), fh))
    if not head.strip():
        return []
    text = str(option(options, "text_column") or "text")
    label = str(option(options, "label_column") or "label")
    return delimited_rows(head, Path(path).suffix.lower(), text, label)[1]
