"""Request bodies of the HTTP API (OpenAI-compatible where OpenAI has one).

Defaults follow OpenAI's API reference: ``temperature`` 1, ``top_p`` 1,
``max_tokens`` 16 for completions; chat answers run to the end of the turn
(capped here at ``CHAT_MAX_TOKENS`` or the context left).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

CHAT_MAX_TOKENS = 256


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use


class _Sampling(_Body):
    model: str
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)  # one choice per prompt

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


def _non_empty_list(value):
    if isinstance(value, list) and not value:
        raise ValueError("give at least one item")
    return value


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    _prompt = field_validator("prompt")(_non_empty_list)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)


class ClassifyRequest(_Body):
    model: str
    input: str | list[str]

    _input = field_validator("input")(_non_empty_list)


class AdapterLoad(_Body):
    name: str
    path: str
