"""The OpenAI wire format: request models (validated by pydantic), the error object, and
builders for the response and stream-chunk objects (plain dicts: they are only written).

Requests accept unknown fields (clients send things like `user`), but a known field of
the wrong type, out of range, or asking for something this server does not do (logprobs,
penalties, tools, ...) is a 400 with OpenAI's error body, never a silent misreading.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

MAX_STOP_SEQUENCES = 4
MAX_N = 8


class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None  # the chat API's newer name for max_tokens
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=1)  # vLLM's extension
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    ignore_eos: StrictBool = False  # vLLM's extension: keep going past end of text (benchmarks)
    # Accepted only at the values that mean "off": this server does not implement them.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    best_of: StrictInt | None = None
    echo: StrictBool | None = None
    suffix: str | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None

    def check_supported(self) -> None:
        off = {"frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
               "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
               "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "tools": (None, []),
               "functions": (None, [])}
        for name, allowed in off.items():
            value = getattr(self, name)
            if not any(value == a and type(value) is type(a) for a in allowed):
                raise OpenAIError(400, f"'{name}' is not supported by this server", param=name,
                                  code="unsupported_parameter")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP_SEQUENCES:
            raise OpenAIError(400, f"'stop' holds at most {MAX_STOP_SEQUENCES} sequences", param="stop")
        if any(s == "" for s in self.stop_list):
            raise OpenAIError(400, "'stop' sequences must not be empty", param="stop")

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage_chunk(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    # OpenAI's four forms: a text, texts, token ids, lists of token ids (one prompt each).
    # Token ids are tried first, and the first form that fits wins: pydantic's default
    # ("smart") union checked every form and took 1 ms for a 4096-token history, 20x this.
    prompt: Annotated[list[StrictInt] | str | list[str] | list[list[StrictInt]],
                      Field(union_mode="left_to_right")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (content parts of type "text" joined; others refused)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(400, "only text content parts are supported", param="messages")
            pieces.append(part["text"])
        return "".join(pieces)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


# -- responses --------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_response(rid: str, model: str, created: int, choices: list[dict], usage: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "logprobs": None,
                         "finish_reason": c["finish_reason"]} for c in choices],
            "usage": usage}


def chat_response(rid: str, model: str, created: int, choices: list[dict], usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]},
                         "logprobs": None, "finish_reason": c["finish_reason"]} for c in choices],
            "usage": usage}


def _chunk(rid: str, obj: str, model: str, created: int, choice: dict, usage: dict | None) -> dict:
    """One streamed chunk: OpenAI's envelope around one choice, with usage when given."""
    chunk = {"id": rid, "object": obj, "created": created, "model": model,
             "choices": [{**choice, "logprobs": None}]}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def completion_chunk(rid: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None, usage: dict | None = None) -> dict:
    return _chunk(rid, "text_completion", model, created,
                  {"index": index, "text": text, "finish_reason": finish_reason}, usage)


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict,
               finish_reason: str | None, usage: dict | None = None) -> dict:
    return _chunk(rid, "chat.completion.chunk", model, created,
                  {"index": index, "delta": delta, "finish_reason": finish_reason}, usage)


def usage_chunk(rid: str, model: str, created: int, chat: bool, usage: dict) -> dict:
    """The final chunk OpenAI sends with `stream_options: {"include_usage": true}`."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage}


def now() -> int:
    return int(time.time())
