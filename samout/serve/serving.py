"""What the OpenAI endpoints share (the shape of vLLM's `entrypoints/openai/serving_engine.py`):
the served models and the server's limits, turning a request's prompts into engine
submissions, and an engine's events for one request into a response or a stream of chunks.
`serving_completions.py` and `serving_chat.py` add what differs: how prompts are made and
how the response and chunks look.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import StreamingResponse

from samout.decoding.detokenizer import TextStream, token_bytes
from samout.decoding.grammar import GrammarConstraint
from samout.decoding.logprobs import TokenLogprob
from samout.decoding.params import SamplingParams
from samout.errors import SamoutError
from samout.serve import protocol as P
from samout.serve.engine import Engine, EngineStoppedError, GenerationRequest, QueueFullError
from samout.serve.metrics import USAGE_SCOPE_KEY, ModelMetrics, ServerMetrics
from samout.serve.protocol import OpenAIError
from samout.serve.timeouts import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEP_ALIVE_TIMEOUT,
    timed_protocol,
)

DEFAULT_MAX_PROMPT_TOKENS = 8192
DEFAULT_MAX_TOKENS_LIMIT = 4096
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
# Checked before tokenizing, so that a huge text costs nothing: 16 characters a token at the
# default token limit, far more than any tokenizer's average.
DEFAULT_MAX_PROMPT_CHARS = 16 * DEFAULT_MAX_PROMPT_TOKENS
DEFAULT_MAX_STOP_SEQUENCES = P.MAX_STOP_SEQUENCES
DEFAULT_MAX_STOP_CHARS = 256
DEFAULT_MAX_LOGPROBS = P.MAX_LOGPROBS
# Prompt texts longer than this are tokenized (or rendered) on a worker thread, so that the
# event loop keeps answering others; shorter ones inline, where the thread hop would cost more.
OFFLOAD_CHARS = 4096
RETRY_AFTER_SECONDS = 1
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
# Deprecated, unused: a non-streaming request now learns of a vanished client at once.
DISCONNECT_POLL_SECONDS = 0.25
_MARKER = "\x00samout-text\x00"  # stands for a chunk's text in its template


@dataclass
class ServedModel:
    """One model behind the API: its engine, tokenizer and (optional) chat renderer."""

    name: str
    engine: Engine
    tokenizer: object
    # messages -> prompt ids ending in the assistant marker; None: no chat template.
    render_chat: Callable[[list[dict]], list[int]] | None = None
    chat_stop_ids: frozenset[int] = frozenset()
    context_limit: int | None = None  # a Transformer's max_position_embeddings
    dtype: str = "float32"  # the weights' inference dtype (samout.quant)
    created: int = field(default_factory=P.now)


@dataclass
class ServerSettings:
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT
    api_key: str | None = None
    drain_timeout: float = 30.0
    # Host headers answered (any port); None: any. Loopback names by default, against DNS
    # rebinding: `samout serve` widens it to None when bound to a non-loopback address.
    allowed_hosts: frozenset[str] | None = LOOPBACK_HOSTS
    # Seconds a client may take to send a request's headers, then its body, and a kept-alive
    # connection may stay idle (samout.serve.timeouts).
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    keep_alive_timeout: int = DEFAULT_KEEP_ALIVE_TIMEOUT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_stop_sequences: int = DEFAULT_MAX_STOP_SEQUENCES
    max_stop_chars: int = DEFAULT_MAX_STOP_CHARS
    # Prompts x n a request may ask for; None: half of each model's batch slots, so that no
    # single request can take them all.
    max_choices: int | None = None
    # The most top logprobs a request may ask for (completions' logprobs, chat's top_logprobs).
    max_logprobs: int = DEFAULT_MAX_LOGPROBS

    def uvicorn_options(self) -> dict:
        """What uvicorn.Config needs to enforce the header and keep-alive timeouts."""
        return {"http": timed_protocol(self.header_timeout), "timeout_keep_alive": self.keep_alive_timeout}


class Run:
    """The choices of one request as they come from the engine. Subclasses say how the
    response and the stream's chunks look."""

    id_prefix: str  # of the response's id

    def __init__(self, body: P.CompletionRequest | P.ChatCompletionRequest, served: ServedModel,
                 requests: list[GenerationRequest], queue: asyncio.Queue, metrics: ModelMetrics | None = None,
                 access: dict | None = None) -> None:
        self.body, self.served, self.requests, self.queue = body, served, requests, queue
        # metrics: observed as events arrive; access: the access log's usage (metrics.py).
        self.metrics, self.access, self._recorded = metrics, access, False
        self.start = time.perf_counter()
        self._last_token: list[float | None] = [None] * len(requests)
        self.rid = P.new_id(self.id_prefix)
        self.created = P.now()
        self.streams = [TextStream(served.tokenizer, body.stop_list) for _ in requests]
        # Logprobs: every token's (prompt ones too, with echo) in order, and how many went out.
        self.want_logprobs = requested_logprobs(body) is not None
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in requests]
        self.logprobs_sent = [0] * len(requests)
        self.logprobs_offset = [0] * len(requests)  # text_offset of the next one to send
        self.echo = [""] * len(requests)  # the prompt text each choice's text starts with
        self.finish: list[str | None] = [None] * len(requests)
        self.usage = [{"prompt_tokens": len(r.prompt), "completion_tokens": 0, "cached_tokens": 0}
                      for r in requests]
        self._templates: dict[int, list[str]] = {}

    # -- what a subclass defines ------------------------------------------------------------
    def _chunk(self, index: int, text: str | None, finish: str | None, usage: dict | None = None,
               logprobs: dict | None = None) -> str:
        """One `data:` line of the stream for choice `index`."""
        raise NotImplementedError

    def _logprobs_object(self, index: int, entries: list[TokenLogprob], offset: int) -> tuple[dict, int]:
        """The response's (or a chunk's) logprobs object for `entries`, the first of which
        starts `offset` characters into the text; and the offset after the last."""
        raise NotImplementedError

    def _echo_text(self, index: int) -> str:
        """The prompt's text, when the request asks for it back (completions' echo)."""
        return ""

    def _opening_chunks(self) -> list[str]:
        """What the stream starts with, before any text."""
        return []

    def _response(self, choices: list[dict], usage: dict) -> dict:
        raise NotImplementedError

    def _usage_chunk(self, usage: dict) -> dict:
        raise NotImplementedError

    # -- engine events ------------------------------------------------------------------------
    def _abort_unfinished(self) -> None:
        for i, r in enumerate(self.requests):
            if self.finish[i] is None:
                self.served.engine.abort(r)

    def _total_usage(self) -> dict:
        # Prompts shared by several choices (n > 1) are counted once per distinct prompt.
        prompt = sum(u["prompt_tokens"] for u in self.usage[::self.body.n])
        cached = sum(u["cached_tokens"] for u in self.usage[::self.body.n])
        return P.usage_dict(prompt, sum(u["completion_tokens"] for u in self.usage), cached)

    def _apply(self, index: int, event: tuple) -> str:
        """Update choice `index` with an engine event; returns the new text (may be "")."""
        stream = self.streams[index]
        if event[0] == "admitted":
            self.usage[index]["cached_tokens"] = event[1]
            self.echo[index] = self._echo_text(index)
            return self.echo[index]
        if event[0] == "prompt_logprobs":
            self.logprobs[index].extend(event[1])
            return ""
        if event[0] == "stop_token":
            self.logprobs[index].append(event[2])
            return ""
        if event[0] == "token":
            if len(event) > 2:
                self.logprobs[index].append(event[2])
            self.usage[index]["completion_tokens"] += 1
            if self.metrics is not None:
                now, last = time.perf_counter(), self._last_token[index]
                if last is None:
                    self.metrics.ttft.observe(now - self.start)
                else:
                    self.metrics.itl.observe(now - last)
                self._last_token[index] = now
            text = stream.add(event[1])
            if stream.stopped:
                self.finish[index] = "stop"
                self.served.engine.abort(self.requests[index])
            return text
        if event[0] == "finish":
            self.usage[index].update(event[2])
            self.finish[index] = "stop" if stream.stopped else event[1]
            return stream.finish()
        raise OpenAIError(500, event[1], type="server_error")

    def _record(self) -> None:
        """Once, at the request's end: its usage into the counters and the access log."""
        if self._recorded:
            return
        self._recorded = True
        usage = self._total_usage()
        if self.access is not None:
            self.access.update(usage)
        m = self.metrics
        if m is not None:
            for finish in self.finish:
                m.success(finish or "abort")
            m.prompt_tokens.inc(usage["prompt_tokens"])
            m.generated_tokens.inc(usage["completion_tokens"])
            m.e2e.observe(time.perf_counter() - self.start)

    # -- the two ways out ---------------------------------------------------------------------
    async def collect(self, request: Request) -> dict:
        # A watcher, not a poll between events: while tokens keep arriving a poll never ran,
        # and a vanished client's request generated to its end.
        watcher = asyncio.create_task(_watch_disconnect(request, self.queue))
        try:
            while any(f is None for f in self.finish):
                index, event = await self.queue.get()
                if index is None:  # the client went away
                    break
                if self.finish[index] is None:
                    self._apply(index, event)
        finally:
            watcher.cancel()
            self._abort_unfinished()
            self._record()
        choices = [{"index": i, "text": self.echo[i] + s.text, "finish_reason": self.finish[i] or "abort",
                    "logprobs": self._logprobs_object(i, self.logprobs[i], 0)[0] if self.want_logprobs
                    else None} for i, s in enumerate(self.streams)]
        return self._response(choices, self._total_usage())

    def _text_chunk(self, index: int, text: str) -> str:
        """A chunk carrying only new text (nearly every chunk): the JSON of `_chunk` made from a
        per-choice template, so each token costs one small json.dumps of its text."""
        parts = self._templates.get(index)
        if parts is None:
            marker = json.dumps(_MARKER)
            parts = self._chunk(index, _MARKER, None).split(marker)
            self._templates[index] = parts
        if len(parts) != 2:  # the marker did not come out once (cannot happen): the plain way
            return self._chunk(index, text, None)
        return parts[0] + json.dumps(text, ensure_ascii=False) + parts[1]

    def _new_logprobs(self, index: int) -> dict | None:
        """The logprobs of choice `index`'s tokens not sent yet (a chunk carries those that came
        since the last one, whether or not their text is out yet); None when there are none."""
        entries = self.logprobs[index]
        start = self.logprobs_sent[index]
        if start == len(entries):
            return None
        self.logprobs_sent[index] = len(entries)
        obj, self.logprobs_offset[index] = self._logprobs_object(index, entries[start:],
                                                                 self.logprobs_offset[index])
        return obj

    async def stream(self) -> AsyncIterator[str]:
        try:
            for chunk in self._opening_chunks():
                yield chunk
            while any(f is None for f in self.finish):
                # Everything that has arrived goes out in one write (fewer sends under load).
                events = [await self.queue.get()]
                while not self.queue.empty():
                    events.append(self.queue.get_nowait())
                out = []
                for index, event in events:
                    if self.finish[index] is not None:
                        continue
                    try:
                        text = self._apply(index, event)
                    except OpenAIError as err:
                        yield "".join(out) + sse(err.body())
                        return
                    logprobs = self._new_logprobs(index) if self.want_logprobs else None
                    if self.finish[index] is not None:  # usage: once, in the usage chunk (OpenAI's way)
                        out.append(self._chunk(index, text, self.finish[index], logprobs=logprobs))
                    elif logprobs is not None and (text or logprobs):
                        out.append(self._chunk(index, text, None, logprobs=logprobs))
                    elif text:
                        out.append(self._text_chunk(index, text))
                if out:
                    yield "".join(out)
            self._record()  # before [DONE]: a client that scrapes next sees this request
            if self.body.include_usage_chunk:
                yield sse(self._usage_chunk(self._total_usage()))
            yield "data: [DONE]\n\n"
        finally:  # also on cancellation: the client went away, free the slots now
            self._abort_unfinished()
            self._record()


async def _watch_disconnect(request: Request, queue: asyncio.Queue) -> None:
    """Put (None, None) on `queue` when the client disconnects. The body has been read, so
    the next ASGI message is the disconnect (or the response's end, when this is cancelled)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait((None, None))


def sse(obj: dict, ensure_ascii: bool = True) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=ensure_ascii)}\n\n"


class OpenAIServing:
    """One endpoint's serving over the served models: the subclass makes the prompts and
    names its defaults; `generate` checks the limits, submits and answers."""

    run_class: type[Run]
    default_max_tokens: int  # when the request names none
    prompt_param: str  # the field a prompt over --max-prompt-tokens is blamed on

    def __init__(self, models: list[ServedModel], settings: ServerSettings,
                 metrics: ServerMetrics | None = None) -> None:
        self.models, self.settings, self.metrics = models, settings, metrics
        self.by_name = {m.name: m for m in models}

    def pick_model(self, name: str | None) -> ServedModel:
        if name is None:
            return self.models[0]
        if name not in self.by_name:
            raise OpenAIError(404, f"the model {name!r} does not exist; served: {', '.join(self.by_name)}",
                              type="not_found_error", param="model", code="model_not_found")
        return self.by_name[name]

    def stop_ids(self, served: ServedModel) -> frozenset[int]:
        """The token ids that end a reply."""
        raise NotImplementedError

    def check_request(self, body: P.CompletionRequest | P.ChatCompletionRequest) -> None:
        """The checks that need no model: unsupported options, stop strings, Unicode, logprobs."""
        body.check_supported(self.settings.max_stop_sequences, self.settings.max_stop_chars)
        param = "top_logprobs" if isinstance(body, P.ChatCompletionRequest) else "logprobs"
        asked = body.top_logprobs if param == "top_logprobs" else body.logprobs
        if asked is not None and asked > self.settings.max_logprobs:
            raise OpenAIError(400, f"'{param}' must be at most {self.settings.max_logprobs} "
                                   f"(--max-logprobs), got {asked}", param=param)
        if param == "top_logprobs" and asked and not body.logprobs:
            raise OpenAIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")

    def choice_limit(self, served: ServedModel) -> int:
        """The most choices (prompts x n) one request may ask of `served`'s engine."""
        engine = served.engine
        limit = self.settings.max_choices
        if limit is None:
            limit = max(1, engine.max_batch // 2)
        return min(limit, engine.max_batch + engine.max_queue)  # more could never be admitted

    def check_choices(self, served: ServedModel, prompts: int, n: int) -> None:
        """400 (not 429: waiting would not help) for a request asking more choices than allowed."""
        limit = self.choice_limit(served)
        if prompts * n > limit:
            raise OpenAIError(400, f"the request asks for {prompts} prompt(s) x n={n} = {prompts * n} "
                                   f"choices, more than this server's limit of {limit} per request "
                                   "(--max-choices)",
                              param="n", code="too_many_choices")

    def check_prompt_chars(self, chars: int) -> None:
        """400 for prompt text over --max-prompt-chars, before any tokenizing."""
        if chars > self.settings.max_prompt_chars:
            raise OpenAIError(400, f"the prompt is {chars} characters, more than this server's limit of "
                                   f"{self.settings.max_prompt_chars} (--max-prompt-chars)",
                              param=self.prompt_param, code="context_length_exceeded")

    @staticmethod
    async def off_loop(chars: int, work: Callable, *args):
        """`work(*args)`, on a worker thread when the text is long enough to stall the loop."""
        if chars > OFFLOAD_CHARS:
            return await run_in_threadpool(work, *args)
        return work(*args)

    def release_prompt(self, body: P.CompletionRequest | P.ChatCompletionRequest) -> None:
        """Drop the body's copy of the prompt once the engine holds its own."""

    def max_tokens(self, body: P.CompletionRequest | P.ChatCompletionRequest, served: ServedModel,
                   prompts: list[list[int]]) -> int:
        """The request's token budget, checked against the server's and the model's limits."""
        settings = self.settings
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        for ids in prompts:
            if len(ids) > settings.max_prompt_tokens:
                raise OpenAIError(400, f"the prompt is {len(ids)} tokens, more than this server's limit of "
                                       f"{settings.max_prompt_tokens} (--max-prompt-tokens)",
                                  param=self.prompt_param, code="context_length_exceeded")
        room = settings.max_tokens_limit
        if served.context_limit is not None:
            room = min(room, served.context_limit - max(len(ids) for ids in prompts))
            if room < 1:
                raise OpenAIError(400, f"the prompt fills the model's context of {served.context_limit} "
                                       "tokens", param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            return min(self.default_max_tokens, room)
        least = 0 if getattr(body, "echo", False) is True else 1  # echo + max_tokens 0: scoring
        if not least <= max_tokens <= room:
            raise OpenAIError(400, f"max_tokens must lie in [{least}, {room}] for this prompt and server, "
                                   f"got {max_tokens}", param="max_tokens")
        return max_tokens

    async def build_constraint(self, work: Callable, *args):
        """A grammar constraint (or None) built by `work(*args)` on a worker thread (a big
        schema takes milliseconds to compile); its SamoutError is a 400 naming the field its
        message starts with (`response_format...`, `tools[0]...`)."""
        try:
            return await run_in_threadpool(work, *args)
        except SamoutError as err:
            message = str(err)
            param = re.match(r"[A-Za-z_]+", message)
            raise OpenAIError(400, message, param=param.group(0) if param else None) from None

    async def generate(self, body: P.CompletionRequest | P.ChatCompletionRequest, served: ServedModel,
                       prompts: list[list[int]], request: Request,
                       constraint: GrammarConstraint | None = None,
                       run_options: dict | None = None) -> dict | StreamingResponse:
        """Submit `body.n` choices per prompt; the response, or the stream of its chunks.
        `constraint`: a grammar every choice is held to (each its own, from the start);
        `run_options`: keyword arguments of the run class."""
        max_tokens = self.max_tokens(body, served, prompts)
        stop_ids = self.stop_ids(served)
        vocab = served.tokenizer.get_vocab_size()
        if body.stop_token_ids:
            if max(body.stop_token_ids) >= vocab:
                raise OpenAIError(400, f"'stop_token_ids' must lie in [0, {vocab})", param="stop_token_ids")
            stop_ids = stop_ids | frozenset(body.stop_token_ids)
        logit_bias = None
        if body.logit_bias:
            logit_bias = {}
            for key, bias in body.logit_bias.items():
                if not (key.isascii() and key.isdigit() and int(key) < vocab):
                    raise OpenAIError(400, f"'logit_bias' keys must be token ids in [0, {vocab}), "
                                           f"got {key!r}", param="logit_bias")
                logit_bias[int(key)] = bias
        prompt_logprobs = body.logprobs if getattr(body, "echo", False) and body.logprobs is not None \
            and not isinstance(body, P.ChatCompletionRequest) else None
        choices = [(ids, j) for ids in prompts for j in range(body.n)]
        queue: asyncio.Queue = asyncio.Queue()
        submitted: list[GenerationRequest] = []
        try:
            for index, (ids, j) in enumerate(choices):
                def emit(event, index=index):  # on the event loop (the engine's `deliver`)
                    queue.put_nowait((index, event))
                grammar = None if constraint is None else constraint if index == 0 else constraint.fresh()
                submitted.append(served.engine.submit(ids, sampling_params(body, max_tokens, j, logit_bias),
                                                      emit, stop_ids, constraint=grammar,
                                                      prompt_logprobs=prompt_logprobs))
        except QueueFullError as err:
            for r in submitted:
                served.engine.abort(r)
            raise OpenAIError(429, f"{err}; retry later", type="rate_limit_error", code="queue_full",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except EngineStoppedError as err:
            for r in submitted:
                served.engine.abort(r)
            raise OpenAIError(503, str(err), type="server_error", code="shutting_down") from None
        run = self.run_class(body, served, submitted, queue,
                             None if self.metrics is None else self.metrics.models.get(served.name),
                             request.scope.get(USAGE_SCOPE_KEY), **(run_options or {}))
        # The engine holds the ids as int32. The body's list of Python ints (36 bytes a token)
        # need not live as long as the stream, nor the copies Starlette's Request caches for
        # its whole life: the raw bytes and the parsed JSON.
        self.release_prompt(body)
        for cached in ("_body", "_json"):
            request.__dict__.pop(cached, None)
        if body.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.collect(request)


def requested_logprobs(body: P.CompletionRequest | P.ChatCompletionRequest) -> int | None:
    """How many top logprobs each generated token carries (0: its own only); None: no logprobs."""
    if isinstance(body, P.ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


def sampling_params(body: P.CompletionRequest | P.ChatCompletionRequest, max_tokens: int,
                    choice: int, logit_bias: dict[int, float] | None = None) -> SamplingParams:
    """The sampling of one choice; choice j of a seeded request samples with seed + j."""
    return SamplingParams(max_new_tokens=max_tokens,
                          temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=body.top_p, top_k=body.top_k, stop_at_eot=not body.ignore_eos,
                          seed=None if body.seed is None else (body.seed + choice) % 2**63,
                          min_p=body.min_p or 0.0, presence_penalty=body.presence_penalty or 0.0,
                          frequency_penalty=body.frequency_penalty or 0.0,
                          repetition_penalty=body.repetition_penalty or 1.0,
                          repetition_window=body.repetition_window, logit_bias=logit_bias,
                          min_tokens=body.min_tokens or 0, logprobs=requested_logprobs(body))


def token_text(tokenizer, token: int) -> str:
    """A token's text for logprobs: its UTF-8 text, or "bytes:\\xNN..." when its bytes are not
    whole characters (OpenAI's way)."""
    raw = token_bytes(tokenizer, token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def finite(logprob: float | None) -> float | None:
    """JSON has no -inf: a token the model gives no chance at all reports -9999 (vLLM's floor)."""
    return None if logprob is None else max(logprob, -9999.0)
