"""POST /v1/chat/completions (the shape of vLLM's `serving_chat.py`): messages rendered with
the run's chat template (and the request's tools), structured output (`response_format`) and
tool calls, and the `chat.completion` response and chunks.

Tool calls: with tools offered (`tool_choice` not "none") the reply is parsed for
`<tool_call>{...}</tool_call>` (samout.chat.tools); "required" or a named function also holds
it to a grammar of calls (samout.decoding.tools). Calls come back in OpenAI's shape with
`finish_reason` "tool_calls"; the content is what is left (null when nothing), without the
leading and trailing whitespace. A stream sends the content as it comes until a call may be
starting (a `<` that could open `<tool_call>`), holds the rest, and at the end sends what is
left of the content, one `tool_calls` delta per call (whole: id, name and arguments), and the
finish reason: the same content and calls as without streaming. Where the markers are special
tokens (the OpenASH vocabulary) the reply's text keeps them for the parser; other special
tokens are still dropped.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import StreamingResponse

from samout.chat.tools import CALL_START, parse_tool_calls, prompt_tools
from samout.decoding.detokenizer import TextStream, token_bytes
from samout.decoding.grammar import response_format_constraint
from samout.decoding.logprobs import TokenLogprob
from samout.decoding.tools import call_marker_ids, tool_call_constraint
from samout.errors import SamoutError
from samout.serve import protocol as P
from samout.serve.protocol import OpenAIError
from samout.serve.serving import OpenAIServing, Run, ServedModel, finite, sse, token_text

CHAT_DEFAULT_MAX_TOKENS = 512


def reply_parts(text: str) -> tuple[str | None, list[dict]]:
    """A reply to a request with tools: (content, tool calls). Without calls, the text less
    its leading whitespace (what a stream can send before it knows whether calls follow)."""
    content, calls = parse_tool_calls(text)
    return (content, calls) if calls else (text.lstrip(), [])


def held_from(text: str) -> int:
    """Where text that may be (the start of) a tool call begins: the first `<tool_call>`, or a
    `<` whose rest is a prefix of it; len(text) when there is none."""
    at = text.find(CALL_START)
    if at >= 0:
        return at
    at = text.rfind("<", max(0, len(text) - len(CALL_START) + 1))
    return at if at >= 0 and CALL_START.startswith(text[at:]) else len(text)


class ChatRun(Run):
    id_prefix = "chatcmpl"

    def __init__(self, *args, tools: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tools = tools  # the reply is parsed for tool calls
        # Call markers that are special tokens (OpenASH) stay in the text the parser reads.
        keep = call_marker_ids(self.served.tokenizer) if tools else frozenset()
        if keep:
            self.streams = [TextStream(self.served.tokenizer, self.body.stop_list, keep=keep)
                            for _ in self.requests]
        # With tools, streamed: the reply's text released so far (past any stop string), the
        # content sent, whether a call has begun (all that follows is held to the end), calls.
        self.reply = [""] * len(self.requests)
        self.sent = [""] * len(self.requests)
        self.holding = [False] * len(self.requests)
        self.calls: list[list[dict]] = [[] for _ in self.requests]

    def _apply(self, index: int, event: tuple) -> str:
        text = super()._apply(index, event)
        if not (self.tools and self.body.stream):  # a whole response is parsed once, at its end
            return text
        self.reply[index] += text
        whole = self.reply[index]
        if self.finish[index] is None:  # send what cannot belong to a call (nor be stripped)
            if self.holding[index] or not text:
                return ""
            held = held_from(whole)
            self.holding[index] = whole.startswith(CALL_START, held)
            safe = whole[:held].strip()
        else:
            safe, self.calls[index] = reply_parts(whole)
            safe = safe or ""
        new = safe[len(self.sent[index]):] if safe.startswith(self.sent[index]) else ""
        self.sent[index] += new
        return new

    def _chunk(self, index: int, text: str | None, finish: str | None, usage: dict | None = None,
               logprobs: dict | None = None, role: bool = False) -> str:
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        calls = self.calls[index] if finish is not None else []
        if calls:  # the content, then each call, then the finish reason
            out = [sse(P.chat_chunk(self.rid, self.served.name, self.created, index, delta, None, None,
                                    logprobs), ensure_ascii=False)] if text or logprobs else []
            for i, call in enumerate(calls):
                delta = {"tool_calls": [{"index": i, **call}]}
                out.append(sse(P.chat_chunk(self.rid, self.served.name, self.created, index, delta, None),
                               ensure_ascii=False))
            out.append(sse(P.chat_chunk(self.rid, self.served.name, self.created, index, {},
                                        "tool_calls" if finish == "stop" else finish, usage),
                           ensure_ascii=False))
            return "".join(out)
        chunk = P.chat_chunk(self.rid, self.served.name, self.created, index, delta, finish, usage, logprobs)
        return sse(chunk, ensure_ascii=False)

    def _logprobs_object(self, index: int, entries: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        """The chat format: one object per token, with its bytes and its top tokens."""
        tokenizer = self.served.tokenizer

        def item(token: int, logprob: float) -> dict:
            return {"token": token_text(tokenizer, token), "logprob": finite(logprob),
                    "bytes": list(token_bytes(tokenizer, token))}

        content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                   for e in entries]
        return {"content": content, "refusal": None}, offset

    def _opening_chunks(self) -> list[str]:
        return [self._chunk(i, None, None, role=True) for i in range(len(self.requests))]

    def _response(self, choices: list[dict], usage: dict) -> dict:
        if self.tools:
            for choice in choices:
                choice["text"], choice["tool_calls"] = reply_parts(choice["text"])
                if choice["tool_calls"] and choice["finish_reason"] == "stop":
                    choice["finish_reason"] = "tool_calls"
        return P.chat_response(self.rid, self.served.name, self.created, choices, usage)

    def _usage_chunk(self, usage: dict) -> dict:
        return P.usage_chunk(self.rid, self.served.name, self.created, True, usage)


class OpenAIServingChat(OpenAIServing):
    run_class = ChatRun
    default_max_tokens = CHAT_DEFAULT_MAX_TOKENS
    prompt_param = "messages"

    async def create_chat_completion(self, body: P.ChatCompletionRequest,
                                     request: Request) -> dict | StreamingResponse:
        self.check_request(body)
        served = self.pick_model(body.model)
        self.check_choices(served, 1, body.n)
        chars = sum(len(m.text()) for m in body.messages)
        self.check_prompt_chars(chars)
        check_chat_template(served)
        tools = self.check_tools(body)
        constraint = None  # compiled first: a bad schema is a 400 before the prompt is rendered
        if tools and body.tool_choice not in (None, "auto"):
            constraint = await self.build_constraint(_tool_constraint, body, served)
        elif body.response_format is not None:
            constraint = await self.build_constraint(response_format_constraint, served.tokenizer,
                                                     body.response_format, "response_format",
                                                     served.chat_stop_ids)
        prompt = await self.off_loop(chars, chat_prompt, body, served, tools)
        return await self.generate(body, served, [prompt], request, constraint, {"tools": bool(tools)})

    @staticmethod
    def check_tools(body: P.ChatCompletionRequest) -> list[dict]:
        """The tools the prompt shows (none for tool_choice "none"), the fields checked: 400s."""
        if body.parallel_tool_calls is not None and not isinstance(body.parallel_tool_calls, bool):
            raise OpenAIError(400, "parallel_tool_calls must be true or false, got "
                                   f"{body.parallel_tool_calls!r}", param="parallel_tool_calls")
        try:
            return prompt_tools(body.tools, body.tool_choice)
        except SamoutError as err:
            message = str(err)
            raise OpenAIError(400, message, param="tool_choice" if message.startswith("tool_choice")
                              else "tools") from None

    def stop_ids(self, served: ServedModel) -> frozenset[int]:
        return served.chat_stop_ids


def check_chat_template(served: ServedModel) -> None:
    if served.render_chat is None:
        raise OpenAIError(400, f"model {served.name!r} has no chat template (its run directory's "
                               "tokenizer_config.json holds no \"chat_template\"): use /v1/completions",
                          param="messages", code="no_chat_template")


def _tool_constraint(body: P.ChatCompletionRequest, served: ServedModel):
    return tool_call_constraint(served.tokenizer, body.tools, body.tool_choice,
                                parallel_tool_calls=body.parallel_tool_calls is not False,
                                eos_ids=served.chat_stop_ids)


def chat_prompt(body: P.ChatCompletionRequest, served: ServedModel,
                tools: list[dict] | None = None) -> list[int]:
    """The messages rendered with the model's chat template (and `tools`), ending in the
    assistant marker."""
    check_chat_template(served)
    messages = []
    for m in body.messages:
        message = {"role": m.role, "content": None if m.content is None and m.tool_calls else m.text()}
        if m.tool_calls is not None:
            message["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    try:
        return served.render_chat(messages, tools or None)
    except SamoutError as err:
        raise OpenAIError(400, str(err), param="messages") from None
