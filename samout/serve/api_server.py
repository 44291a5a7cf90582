"""The HTTP side of `samout serve`: an OpenAI-compatible API on FastAPI (the shape of vLLM's
`entrypoints/openai/api_server.py`) over one `Engine` per served model.

    GET  /                      the chat page (samout/serve/static/index.html)
    GET  /health                {"status": "ok", ...engine statistics}
    GET  /v1/models
    POST /v1/completions        prompt: text, list of texts, or token ids
    POST /v1/chat/completions   messages rendered with the run's chat template

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`: a malformed body
or a bad field is 400 (FastAPI's 422 is turned into 400), a missing or wrong API key 401, an
unknown model 404, a full queue 429 with Retry-After, a server shutting down 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import hmac
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from samout.errors import SamoutError
from samout.generation import SamplingParams, encode_prompt
from samout.serve import protocol as P
from samout.serve.engine import Engine, EngineStoppedError, GenerationRequest, QueueFullError
from samout.serve.protocol import OpenAIError
from samout.tokenizer import end_ids

DEFAULT_MAX_PROMPT_TOKENS = 8192
DEFAULT_MAX_TOKENS_LIMIT = 4096
# What a field of several accepted shapes must be, for its 400 message.
FIELD_FORMS = {"prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
               "stop": "a string or a list of strings"}
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = 512
RETRY_AFTER_SECONDS = 1
# Non-streaming requests check for a vanished client this often while they wait.
DISCONNECT_POLL_SECONDS = 0.25


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


class TextStream:
    """Token ids -> text pieces for one choice: waits where a UTF-8 character spans tokens,
    and ends the text at the first stop string (holding back text that may start one)."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.pending: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token: int) -> str:
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending, skip_special_tokens=True)
        if piece.endswith("\ufffd") and len(self.pending) < 8:
            return ""
        self.pending = []
        self.text += piece
        return self._release(final=False)

    def finish(self) -> str:
        if self.pending and not self.stopped:
            self.text += self.tokenizer.decode(self.pending, skip_special_tokens=True)
            self.pending = []
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        start = max(0, self.sent - max((len(s) for s in self.stops), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
            end = len(self.text)
        elif final:
            end = len(self.text)
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])),
                       default=0)
            end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out


def build_app(models: list[ServedModel], settings: ServerSettings | None = None) -> FastAPI:
    if not models:
        raise SamoutError("no model to serve")
    settings = settings or ServerSettings()
    by_name = {m.name: m for m in models}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def deliver(batch: list) -> None:  # on an engine thread: one loop wake-up per engine step
            loop.call_soon_threadsafe(_run_events, batch)

        for m in models:
            m.engine.deliver = deliver  # requests' emit callbacks run on this loop
            m.engine.on_idle = return_free_heap
            m.engine.start()
        yield
        for m in models:  # drain: the running requests finish (uvicorn waited for their responses)
            await loop.run_in_executor(None, m.engine.shutdown, True, settings.drain_timeout)

    app = FastAPI(title="samout", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    # -- errors: always OpenAI's body ---------------------------------------------------
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif not loc and "json" not in request.headers.get("content-type", ""):
            message, param = "the request body must be a JSON object sent with " \
                             "'Content-Type: application/json'", None
        elif loc and loc[0] in FIELD_FORMS:  # a union: pydantic's message names one branch only
            message, param = f"{loc[0]} must be {FIELD_FORMS[loc[0]]}", loc[0]
        else:
            where = ".".join(loc) or "body"
            message, param = f"{where}: {first.get('msg', 'invalid value')}", (loc[0] if loc else None)
        return JSONResponse(P.error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(P.error_body(str(err.detail), type=kind), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        return JSONResponse(P.error_body(f"internal error: {type(err).__name__}", type="server_error"),
                            status_code=500)

    if settings.api_key:
        app.add_middleware(_BearerAuth, api_key=settings.api_key)

    # -- routes -------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(chat_page_html())

    @app.get("/health")
    async def health(reset_peaks: bool = False):
        """`reset_peaks` (benchmarks): the engines' peak figures start afresh, and the heap
        memory freed so far goes back to the OS, so that RSS read next is what the server
        holds now, not the most an earlier load ever needed."""
        stats = {m.name: m.engine.stats(reset_peaks) for m in models}
        if reset_peaks:
            _release_free_memory()
        return {"status": "ok", "models": stats, "memory": memory_stats()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "samout",
             "chat": m.render_chat is not None, "max_context": m.context_limit, "dtype": m.dtype}
            for m in models]}

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        body.check_supported()
        served = _pick_model(body.model)
        prompts = _completion_prompts(body, served)
        return await _generate(body, served, prompts, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        body.check_supported()
        served = _pick_model(body.model)
        if served.render_chat is None:
            raise OpenAIError(400, f"model {served.name!r} has no chat template (its run directory's "
                                   "tokenizer_config.json holds no \"chat_template\"): use /v1/completions",
                              param="messages", code="no_chat_template")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            prompt = served.render_chat(messages)
        except SamoutError as err:
            raise OpenAIError(400, str(err), param="messages") from None
        return await _generate(body, served, [prompt], request, chat=True)

    def _pick_model(name: str | None) -> ServedModel:
        if name is None:
            return models[0]
        if name not in by_name:
            raise OpenAIError(404, f"the model {name!r} does not exist; served: {', '.join(by_name)}",
                              type="not_found_error", param="model", code="model_not_found")
        return by_name[name]

    def _completion_prompts(body: P.CompletionRequest, served: ServedModel) -> list[list[int]]:
        prompt = body.prompt
        if isinstance(prompt, str):
            return [encode_prompt(served.tokenizer, prompt)]
        if not prompt:
            raise OpenAIError(400, "'prompt' is empty", param="prompt")
        if all(isinstance(p, str) for p in prompt):
            return [encode_prompt(served.tokenizer, p) for p in prompt]
        token_lists = prompt if isinstance(prompt[0], list) else [prompt]
        vocab = served.tokenizer.get_vocab_size()
        for ids in token_lists:
            if not ids:
                raise OpenAIError(400, "a token-id prompt in 'prompt' is empty", param="prompt")
            if min(ids) < 0 or max(ids) >= vocab:  # builtins: a long history costs microseconds
                raise OpenAIError(400, f"token ids in 'prompt' must lie in [0, {vocab})", param="prompt")
        return token_lists  # the request body's lists; the engine keeps int32 copies

    async def _generate(body, served: ServedModel, prompts: list[list[int]], request: Request, chat: bool):
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        for ids in prompts:
            if len(ids) > settings.max_prompt_tokens:
                raise OpenAIError(400, f"the prompt is {len(ids)} tokens, more than this server's limit of "
                                       f"{settings.max_prompt_tokens} (--max-prompt-tokens)",
                                  param="messages" if chat else "prompt", code="context_length_exceeded")
        room = settings.max_tokens_limit
        if served.context_limit is not None:
            room = min(room, served.context_limit - max(len(ids) for ids in prompts))
            if room < 1:
                raise OpenAIError(400, f"the prompt fills the model's context of {served.context_limit} "
                                       "tokens", param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(CHAT_DEFAULT_MAX_TOKENS if chat else COMPLETION_DEFAULT_MAX_TOKENS, room)
        elif not 1 <= max_tokens <= room:
            raise OpenAIError(400, f"max_tokens must lie in [1, {room}] for this prompt and server, "
                                   f"got {max_tokens}", param="max_tokens")
        stop_ids = served.chat_stop_ids if chat else end_ids(served.tokenizer)
        choices = [(ids, j) for ids in prompts for j in range(body.n)]

        def params_for(j: int) -> SamplingParams:
            return SamplingParams(max_new_tokens=max_tokens,
                                  temperature=1.0 if body.temperature is None else body.temperature,
                                  top_p=body.top_p, top_k=body.top_k, stop_at_eot=not body.ignore_eos,
                                  seed=None if body.seed is None else (body.seed + j) % 2**63)

        queue: asyncio.Queue = asyncio.Queue()
        submitted: list[GenerationRequest] = []
        try:
            for index, (ids, j) in enumerate(choices):
                def emit(event, index=index):  # on the event loop (the engine's `deliver`)
                    queue.put_nowait((index, event))
                submitted.append(served.engine.submit(ids, params_for(j), emit, stop_ids))
        except QueueFullError as err:
            for r in submitted:
                served.engine.abort(r)
            raise OpenAIError(429, f"{err}; retry later", type="rate_limit_error", code="queue_full",
                              headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except EngineStoppedError as err:
            for r in submitted:
                served.engine.abort(r)
            raise OpenAIError(503, str(err), type="server_error", code="shutting_down") from None
        run = _Run(body, served, submitted, queue, chat, len(prompts[0]))
        # The engine holds the ids as int32. The body's list of Python ints (36 bytes a token:
        # 150 KB for a 4096-token history) need not live as long as the stream, nor the copies
        # Starlette's Request caches for its whole life: the raw bytes and the parsed JSON.
        if not chat:
            body.prompt = ""
        for cached in ("_body", "_json"):
            request.__dict__.pop(cached, None)
        if body.stream:
            return StreamingResponse(run.stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.collect(request)

    return app


class _BearerAuth:
    """401 for a /v1/ request without `Authorization: Bearer KEY`. A plain ASGI middleware:
    Starlette's `@app.middleware("http")` (BaseHTTPMiddleware) wraps every request and kept
    its body (20 KB for a 4096-token history) alive as long as the stream ran."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                body = P.error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                                    code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
    return libc


def return_free_heap() -> None:
    """glibc keeps freed memory for reuse (RSS stays at the highest load's working set);
    malloc_trim hands it back to the OS. About 10 ms for a few hundred MiB: engines call it
    after a second without work, not between steps."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _release_free_memory() -> None:
    gc.collect()
    return_free_heap()


def memory_stats() -> dict[str, int | None]:
    """The process's resident memory and, under glibc, what its heap holds: bytes in use
    (live allocations of every thread, Python's and torch's) and bytes freed but kept by the
    allocator for reuse. RSS minus the two is code, libraries and untouched pages."""
    rss = None
    with contextlib.suppress(OSError):
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    in_use = free = None
    libc = _libc()
    if libc is not None and hasattr(libc, "mallinfo2"):
        info = libc.mallinfo2()
        in_use, free = info.uordblks + info.hblkhd, info.fordblks
    return {"rss_bytes": rss, "heap_in_use_bytes": in_use, "heap_free_bytes": free}


_MARKER = "\x00samout-text\x00"  # stands for a chunk's text in its template


def _run_events(batch: list) -> None:
    for emit, event in batch:
        emit(event)


class _Run:
    """The choices of one request as they come from the engine."""

    def __init__(self, body, served: ServedModel, requests: list[GenerationRequest], queue: asyncio.Queue,
                 chat: bool, prompt_tokens: int) -> None:
        self.body, self.served, self.requests, self.queue, self.chat = body, served, requests, queue, chat
        self.rid = P.new_id("chatcmpl" if chat else "cmpl")
        self.created = P.now()
        self.streams = [TextStream(served.tokenizer, body.stop_list) for _ in requests]
        self.finish: list[str | None] = [None] * len(requests)
        self.usage = [{"prompt_tokens": len(r.prompt), "completion_tokens": 0, "cached_tokens": 0}
                      for r in requests]
        self._templates: dict[int, list[str]] = {}

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
            return ""
        if event[0] == "token":
            self.usage[index]["completion_tokens"] += 1
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

    async def collect(self, request: Request) -> dict:
        try:
            while any(f is None for f in self.finish):
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        break
                    continue
                if self.finish[index] is None:
                    self._apply(index, event)
        finally:
            self._abort_unfinished()
        choices = [{"index": i, "text": s.text, "finish_reason": self.finish[i] or "abort"}
                   for i, s in enumerate(self.streams)]
        build = P.chat_response if self.chat else P.completion_response
        return build(self.rid, self.served.name, self.created, choices, self._total_usage())

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

    def _chunk(self, index: int, text: str | None, finish: str | None, usage: dict | None = None,
               role: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            chunk = P.chat_chunk(self.rid, self.served.name, self.created, index, delta, finish, usage)
        else:
            chunk = P.completion_chunk(self.rid, self.served.name, self.created, index, text or "", finish,
                                       usage)
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    async def stream(self) -> AsyncIterator[str]:
        try:
            if self.chat:
                for i in range(len(self.requests)):
                    yield self._chunk(i, None, None, role=True)
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
                        yield "".join(out) + f"data: {json.dumps(err.body())}\n\n"
                        return
                    if self.finish[index] is not None:
                        u = self.usage[index]
                        usage = P.usage_dict(u["prompt_tokens"], u["completion_tokens"], u["cached_tokens"])
                        out.append(self._chunk(index, text, self.finish[index], usage))
                    elif text:
                        out.append(self._text_chunk(index, text))
                if out:
                    yield "".join(out)
            if self.body.include_usage_chunk:
                chunk = P.usage_chunk(self.rid, self.served.name, self.created, self.chat,
                                      self._total_usage())
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also on cancellation: the client went away, free the slots now
            self._abort_unfinished()


def chat_page_html() -> str:
    return resources.files("samout.serve").joinpath("static/index.html").read_text(encoding="utf-8")
