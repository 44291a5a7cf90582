"""The OpenAI wire format: request models (validated by pydantic), the error object, and
builders for the response and stream-chunk objects (plain dicts: they are only written).

Nothing a request asks for is silently ignored: an unknown field, a field of the wrong type
(numbers are strict: "0.5" is not a temperature), a value out of range, or an OpenAI field
asking for something this server does not do (best_of, functions, ...) is a 400 with OpenAI's
error body naming the field. `response_format`, `tools`, `tool_choice` and
`parallel_tool_calls` are checked when their grammar is built (samout.decoding.grammar,
samout.decoding.tools), with the same 400s. Only `user`, which asks nothing of the server, is
accepted and ignored. docs/serving.md has the table of every field.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

MAX_STOP_SEQUENCES = 4  # the default of --max-stop-sequences (OpenAI's limit)
MAX_N = 8
MAX_LOGPROBS = 20  # the default of --max-logprobs (OpenAI's cap for chat's top_logprobs)

# OpenAI's (and vLLM's) fields this server does not implement, each with the values that mean
# "off" (accepted, since clients send defaults). Any other value is a 400 naming the field.
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "best_of": (None, 1), "suffix": (None, ""),
    "functions": (None, []), "function_call": (None, "none"),
    "store": (None, False), "metadata": (None, {}), "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,), "reasoning_effort": (None,),
    "web_search_options": (None,), "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True), "use_beam_search": (None, False),
}


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


# A number: an int or a float, never a string or a bool (pydantic's lax mode took "0.5").
Number = StrictFloat


def _off_values_only(schema: dict[str, Any]) -> None:
    """The request's JSON schema (OpenAPI) names, for each UNSUPPORTED_FIELDS entry, only the
    values accepted: its type `Any` would describe every value, and all but these are a 400."""
    for name, allowed in UNSUPPORTED_FIELDS.items():
        values: list = []
        for value in allowed:  # JSON Schema's equality: 0 and 0.0 are one value, False another
            if not any(v == value and isinstance(v, bool) == isinstance(value, bool) for v in values):
                values.append(value)
        schema["properties"][name] = {"title": schema["properties"][name].get("title", name),
                                      "enum": values, "default": None}


class _Request(BaseModel):
    # An unknown field is a 400: a misspelt or unimplemented option must not pass unnoticed.
    model_config = ConfigDict(extra="forbid", json_schema_extra=_off_values_only)

    model: str | None = None
    user: str | None = None  # OpenAI's end-user id for abuse monitoring: nothing to do here
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None  # the chat API's newer name for max_tokens
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    top_k: StrictInt | None = Field(default=None, ge=1)  # vLLM's extension
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    n: StrictInt = Field(default=1, ge=1, le=MAX_N)
    ignore_eos: StrictBool = False  # vLLM's extension: keep going past end of text (benchmarks)
    # OpenAI's penalties and bias, and vLLM's extensions (samout.decoding.params)
    frequency_penalty: Number | None = Field(default=None, ge=-2, le=2)
    presence_penalty: Number | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: Number | None = Field(default=None, gt=0, le=100, allow_inf_nan=False)
    repetition_window: StrictInt | None = Field(default=None, ge=1)  # samout's: the last n tokens
    min_p: Number | None = Field(default=None, ge=0, le=1)
    min_tokens: StrictInt | None = Field(default=None, ge=0)
    # token id (a string, as JSON keys are) -> bias in [-100, 100]; ids checked against the vocabulary
    logit_bias: dict[str, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None
    # Structured output: checked and compiled by samout.decoding.grammar (400s naming the field).
    response_format: Any = None
    # UNSUPPORTED_FIELDS: accepted only at the values that mean "off".
    best_of: Any = None
    suffix: Any = None
    functions: Any = None
    function_call: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    use_beam_search: Any = None

    # The endpoint's own unimplemented fields, as UNSUPPORTED_FIELDS.
    unsupported: ClassVar[dict[str, tuple]] = {}

    def check_supported(self, max_stops: int = MAX_STOP_SEQUENCES, max_stop_chars: int | None = None) -> None:
        """400 for an unimplemented option, a stop list over the limits, or text that is not
        valid Unicode (a lone surrogate, which JSON can escape but UTF-8 cannot encode)."""
        for name, allowed in {**UNSUPPORTED_FIELDS, **self.unsupported}.items():
            value = getattr(self, name)
            if not any(value == a and type(value) is type(a) for a in allowed):
                raise OpenAIError(400, f"'{name}' is not supported by this server", param=name,
                                  code="unsupported_parameter")
        stops = self.stop_list
        if len(stops) > max_stops:
            raise OpenAIError(400, f"'stop' holds at most {max_stops} sequences (--max-stop-sequences)",
                              param="stop")
        for stop in stops:
            if stop == "":
                raise OpenAIError(400, "'stop' sequences must not be empty", param="stop")
            if max_stop_chars is not None and len(stop) > max_stop_chars:
                raise OpenAIError(400, f"a 'stop' sequence holds at most {max_stop_chars} characters "
                                       "(--max-stop-chars)", param="stop")
            check_unicode(stop, "stop")

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage_chunk(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


def check_unicode(text: str, param: str) -> None:
    """400 unless `text` encodes as UTF-8: a lone surrogate ("\\ud800" in JSON) parses into a
    Python str, but the tokenizer and the response writer cannot encode it."""
    if text.isascii():  # the common case, in a fraction of the time of encoding
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIError(400, f"'{param}' holds a lone surrogate (invalid Unicode)", param=param,
                          code="invalid_unicode") from None


class CompletionRequest(_Request):
    # OpenAI's four forms: a text, texts, token ids, lists of token ids (one prompt each).
    # Token ids are tried first, and the first form that fits wins: pydantic's default
    # ("smart") union checks every form, which made parsing a long history's ids dominate a
    # cache hit's time to first token (measured in docs/benchmarks.md, "Serving").
    prompt: Annotated[list[StrictInt] | str | list[str] | list[list[StrictInt]],
                      Field(union_mode="left_to_right")]
    # OpenAI's legacy logprobs: the sampled token's and the `logprobs` most likely (<= --max-logprobs).
    logprobs: StrictInt | None = Field(default=None, ge=0)
    echo: StrictBool = False  # the prompt's text (and, with logprobs, its tokens' logprobs) first
    top_logprobs: Any = None  # chat's field
    tools: Any = None  # chat's fields: a completion has no messages to show tools in
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    unsupported: ClassVar[dict[str, tuple]] = {"top_logprobs": (None, 0), "tools": (None, []),
                                                "tool_choice": (None, "none"), "parallel_tool_calls": (None,)}

    def check_supported(self, max_stops: int = MAX_STOP_SEQUENCES, max_stop_chars: int | None = None) -> None:
        super().check_supported(max_stops, max_stop_chars)
        for text in [self.prompt] if isinstance(self.prompt, str) else self.prompt:
            if isinstance(text, str):
                check_unicode(text, "prompt")
            else:  # token ids: there is no text to check
                break


# Fields of OpenAI's message objects that this server does not implement, with the values that
# mean "unset" (the openai client sends an assistant reply back with refusal/audio/... null).
MESSAGE_UNSUPPORTED: dict[str, tuple] = {"name": (None,), "refusal": (None,), "annotations": (None, []),
                                         "audio": (None,), "function_call": (None,)}


class ChatMessage(BaseModel):
    # An unknown field is a 400 here too: a participant's `name`, say, must not vanish unnoticed.
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: Any = None  # an assistant's calls (checked by samout.chat.tools.check_tool_calls)
    tool_call_id: Any = None  # a tool message's: the call it answers
    name: Any = None
    refusal: Any = None
    annotations: Any = None
    audio: Any = None
    function_call: Any = None

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

    def check_unicode(self) -> None:
        check_unicode(self.text(), "messages")

    def check_supported(self, index: int) -> None:
        for name, allowed in MESSAGE_UNSUPPORTED.items():
            value = getattr(self, name)
            if not any(value == a and type(value) is type(a) for a in allowed):
                raise OpenAIError(400, f"'messages[{index}].{name}' is not supported by this server",
                                  param=f"messages[{index}].{name}", code="unsupported_parameter")
        self.check_unicode()


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0)  # needs logprobs: true
    echo: Any = None  # vLLM's chat echo (the last message) is not done
    tools: Any = None  # checked by samout.chat.tools (400s naming the field)
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    unsupported: ClassVar[dict[str, tuple]] = {"echo": (None, False)}

    def check_supported(self, max_stops: int = MAX_STOP_SEQUENCES, max_stop_chars: int | None = None) -> None:
        super().check_supported(max_stops, max_stop_chars)
        for i, message in enumerate(self.messages):
            message.check_supported(i)


# -- responses --------------------------------------------------------------------------
# What the answers look like, for the OpenAPI schema only (api_server.py names them in each
# route's `responses`): the builders below write plain dicts, never validated against these.
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]


FinishReason = Literal["stop", "length", "abort", "tool_calls"]


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: parallel lists, one entry per token (the prompt's first: null)."""
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # a JSON text, as OpenAI's


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None  # null when the reply is only tool calls
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    chat: bool
    max_context: int | None
    dtype: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"]


class HealthDetails(Health):
    models: dict[str, dict[str, Any]]
    memory: dict[str, Any]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_response(rid: str, model: str, created: int, choices: list[dict], usage: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": c["index"], "text": c["text"], "logprobs": c.get("logprobs"),
                         "finish_reason": c["finish_reason"]} for c in choices],
            "usage": usage}


def chat_message(text: str | None, tool_calls: list[dict] | None = None) -> dict:
    """A response's assistant message; content null when the reply is only tool calls."""
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chat_response(rid: str, model: str, created: int, choices: list[dict], usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": c["index"], "message": chat_message(c["text"], c.get("tool_calls")),
                         "logprobs": c.get("logprobs"), "finish_reason": c["finish_reason"]}
                        for c in choices],
            "usage": usage}


def _chunk(rid: str, obj: str, model: str, created: int, choice: dict, usage: dict | None,
           logprobs: dict | None = None) -> dict:
    """One streamed chunk: OpenAI's envelope around one choice, with usage when given."""
    chunk = {"id": rid, "object": obj, "created": created, "model": model,
             "choices": [{**choice, "logprobs": logprobs}]}
    if usage is not None:
        chunk["usage"] = usage
    return chunk


def completion_chunk(rid: str, model: str, created: int, index: int, text: str,
                     finish_reason: str | None, usage: dict | None = None,
                     logprobs: dict | None = None) -> dict:
    return _chunk(rid, "text_completion", model, created,
                  {"index": index, "text": text, "finish_reason": finish_reason}, usage, logprobs)


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict,
               finish_reason: str | None, usage: dict | None = None, logprobs: dict | None = None) -> dict:
    return _chunk(rid, "chat.completion.chunk", model, created,
                  {"index": index, "delta": delta, "finish_reason": finish_reason}, usage, logprobs)


def usage_chunk(rid: str, model: str, created: int, chat: bool, usage: dict) -> dict:
    """The final chunk OpenAI sends with `stream_options: {"include_usage": true}`."""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage}


def now() -> int:
    return int(time.time())
