"""The one place where instruction prompts are formatted.

Training, evaluation, ``loralab generate`` and the server all build prompts
here, so a model is always asked questions in the format it was tuned on: the
tokenizer's chat template where it has one, else the Alpaca template (Taori et
al., 2023), which base models without a template learn quickly.

Public API (stable):
    build_prompt(tokenizer, instruction, input="") -> str
    build_chat_prompt(tokenizer, messages) -> str
    split_response(tokenizer, messages) -> (prompt, response)
"""

from __future__ import annotations

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def instruction_messages(instruction: str, input: str = "") -> list[dict]:
    """An Alpaca record as one user turn (instruction, blank line, input)."""
    content = instruction.strip()
    if input and input.strip():
        content = f"{content}\n\n{input.strip()}"
    return [{"role": "user", "content": content}]


def build_prompt(tokenizer, instruction: str, input: str = "") -> str:
    """The text a model continues to answer ``instruction`` (generation prompt included)."""
    if has_chat_template(tokenizer):
        return build_chat_prompt(tokenizer, instruction_messages(instruction, input))
    template = ALPACA_WITH_INPUT if input and input.strip() else ALPACA_NO_INPUT
    return template.format(instruction=instruction.strip(), input=(input or "").strip())


def build_chat_prompt(tokenizer, messages: list[dict]) -> str:
    """Render ``messages`` and open the assistant's turn."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _plain_chat(messages) + "### Response:\n"


def _plain_chat(messages: list[dict]) -> str:
    """Alpaca-style rendering of a conversation for tokenizers without a template."""
    parts = []
    for m in messages:
        role = m["role"]
        if role == "system":
            parts.append(f"{m['content'].strip()}\n\n")
        elif role == "user":
            parts.append(f"### Instruction:\n{m['content'].strip()}\n\n")
        else:
            parts.append(f"### Response:\n{m['content'].strip()}\n\n")
    return "".join(parts)


def split_response(tokenizer, messages: list[dict]) -> tuple[str, str]:
    """Split a conversation ending in an assistant turn into (prompt, response).

    The response is exactly the text the model must learn to produce after the
    prompt, including the template's end-of-turn marker (or the EOS token), so
    the trained model knows when to stop.
    """
    *context, last = messages
    prompt = build_chat_prompt(tokenizer, context)
    eos = tokenizer.eos_token or ""
    if has_chat_template(tokenizer):
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if full.startswith(prompt):
            response = full[len(prompt):]
            if eos and eos not in response:
                response += eos
            return prompt, response
    return prompt, last["content"].strip() + eos


def split_instruction(tokenizer, instruction: str, input: str, output: str) -> tuple[str, str]:
    """(prompt, response) for an Alpaca record, formatted like ``build_prompt``."""
    if has_chat_template(tokenizer):
        messages = instruction_messages(instruction, input)
        return split_response(tokenizer, messages + [{"role": "assistant", "content": output}])
    return build_prompt(tokenizer, instruction, input), output.strip() + (tokenizer.eos_token or "")
