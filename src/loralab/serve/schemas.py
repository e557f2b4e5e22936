"""Request bodies of the HTTP API (OpenAI-compatible where OpenAI has one).

Defaults follow OpenAI's API reference: ``temperature`` 1, ``top_p`` 1,
``max_tokens`` 16 for completions; chat answers run to the end of the turn
(capped here at ``CHAT_MAX_TOKENS`` or the context left).

Every field is checked here, strictly (``"stream": "yes"`` or ``"max_tokens":
"5"`` is a 422 naming the field, not a guess): numbers finite and in range,
strings valid Unicode (a lone surrogate such as ``"\\ud800"`` cannot be
tokenized), lists and names bounded. What depends on the model (``max_tokens``
against its context length) is checked by the routes before any work.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
)

from loralab.errors import LoralabError
from loralab.lora.adapters import check_adapter_name

CHAT_MAX_TOKENS = 256
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit int
MAX_TOKENS_CAP = 1 << 20  # above any context; the model's own limit is checked per route
MAX_ITEMS = 64  # prompts / inputs in one request
MAX_MESSAGES = 1024
MAX_STOP_CHARS = 256
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux


def _unicode(value: str) -> str:
    """Refuse text that cannot be written as UTF-8 (lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"not valid Unicode: a lone surrogate at character {err.start}") from err
    return value


def _path(value: str) -> str:
    if "\x00" in value:
        raise ValueError("a path cannot hold a NUL byte")
    return value


def _adapter_name(value: str) -> str:
    try:
        return check_adapter_name(value)
    except LoralabError as err:
        raise ValueError(str(err)) from err


Text = Annotated[StrictStr, AfterValidator(_unicode)]
ModelName = Annotated[StrictStr, Field(min_length=1, max_length=256), AfterValidator(_unicode)]
Probability = Annotated[float, Field(strict=True, gt=0.0, le=1.0, allow_inf_nan=False)]
Temperature = Annotated[float, Field(strict=True, ge=0.0, le=2.0, allow_inf_nan=False)]
Stop = Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS),
                 AfterValidator(_unicode)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class _Sampling(_Body):
    model: ModelName
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None
    temperature: Temperature = 1.0
    top_p: Probability = 1.0
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    stream: StrictBool = False
    n: Annotated[StrictInt, Field(ge=1, le=1)] = 1  # one choice per prompt

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        return [value] if isinstance(value, str) else list(value or [])


Texts = Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_ITEMS)]


class CompletionRequest(_Sampling):
    prompt: Texts


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]


class ClassifyRequest(_Body):
    model: ModelName
    input: Texts


class AdapterLoad(_Body):
    name: Annotated[StrictStr, AfterValidator(_adapter_name)]
    path: Annotated[StrictStr, Field(min_length=1, max_length=MAX_PATH_CHARS),
                    AfterValidator(_path), AfterValidator(_unicode)]
