"""Request bodies of the OpenAI API as ponder serves it, and OpenAI-shaped errors.

Bodies are validated by pydantic in strict mode (types and ranges, no coercion); anything a client gets wrong is a 4xx with OpenAI's error
object ``{"error": {"message", "type", "param", "code"}}``, never a 500. Fields ponder does not implement yet
(``tools``, ``logit_bias``, ...) are refused with a 400 that names them rather than silently ignored."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 4
MAX_STOPS = 4
MAX_LOGPROBS = 20  # ponder.sampling.MAX_LOGPROBS


# integer fields: strict mode refuses strings, booleans and fractions, but JSON does not tell 57 from 57.0 (JSON
# Schema's integers include both), so a whole float is taken as that integer (also inside lists of token ids)
INT_FIELDS = ("max_tokens", "max_completion_tokens", "seed", "n", "logprobs", "top_logprobs", "prompt", "tokens")


def _whole(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def whole_floats(data: Any) -> Any:
    """``data`` (a request body) with whole floats in the integer fields made integers (see ``INT_FIELDS``)."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name in INT_FIELDS:
        if name in out:
            v = out[name]
            out[name] = [_whole(x) for x in v] if isinstance(v, list) else _whole(v)
    return out


class APIError(Exception):
    """An error the client gets as OpenAI's error object with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class PonderOptions(BaseModel):
    """ponder's own per-request options, as an extra body field ``ponder`` (module ``app``: what a request may
    change is checked against the server's settings)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    speculate: str | bool | None = None
    kv: str | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # unknown fields: checked against UNSUPPORTED, the rest
    # ignored; strict: no coercion ("logprobs": false is not 0, "1" is not a token id)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate past the end-of-sequence token, up to max_tokens
    ponder: PonderOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _integers(cls, data: Any) -> Any:
        return whole_floats(data)

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops


class CompletionRequest(_Common):
    prompt: str | list[int]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # alternatives per token (None: off)

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[int]) -> str | list[int]:
        if not v:
            raise ValueError("the prompt is empty")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> "ChatRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# fields of OpenAI's API that ponder does not implement yet: a clear 400 instead of a silent default
UNSUPPORTED = ("echo", "best_of", "logit_bias", "suffix", "tools", "tool_choice",
               "functions", "function_call", "response_format", "presence_penalty", "frequency_penalty")


def check_supported(req: _Common) -> None:
    extra = req.model_extra or {}
    for name in UNSUPPORTED:
        value = extra.get(name)
        if value not in (None, False, 0, 0.0):
            raise APIError(400, f"'{name}' is not supported by this server yet", param=name)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options needs stream: true", param="stream_options")


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int]

    @model_validator(mode="before")
    @classmethod
    def _integers(cls, data: Any) -> Any:
        return whole_floats(data)
