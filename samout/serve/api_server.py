"""The HTTP side of `samout serve`: an OpenAI-compatible API on FastAPI (the shape of vLLM's
`entrypoints/openai/api_server.py`) over one `Engine` per served model.

    GET  /                      the chat page (samout/serve/static/index.html)
    GET  /static/chat.js, .css  its script and style
    GET  /health                {"status": "ok"}: liveness, open without the key
    GET  /v1/health             engine statistics, state caches, memory (behind the key)
    GET  /metrics               Prometheus metrics (behind the key)
    GET  /v1/models
    POST /v1/completions        prompt: text, list of texts, or token ids
    POST /v1/chat/completions   messages rendered with the run's chat template

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}`: a malformed body
or a bad field is 400 (FastAPI's 422 is turned into 400), a missing or wrong API key 401, an
unknown model 404, a body over --max-body-bytes 413, a full queue 429 with Retry-After, a
server shutting down 503.

This module is the HTTP side only: routes, errors, authentication and the page. What an
endpoint does with a request is in serving_completions.py and serving_chat.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from samout.errors import SamoutError
from samout.procmem import memory_stats, release_free_memory, return_free_heap
from samout.serve import protocol as P
from samout.serve.metrics import CONTENT_TYPE, AccessLog, ServerMetrics
from samout.serve.protocol import OpenAIError
from samout.serve.serving import (
    DEFAULT_MAX_PROMPT_TOKENS,
    DEFAULT_MAX_TOKENS_LIMIT,
    ServedModel,
    ServerSettings,
)
from samout.serve.serving_chat import OpenAIServingChat
from samout.serve.serving_completions import OpenAIServingCompletion
from samout.serve.timeouts import BodyDeadline

# The page's own files (static/), with their media types: nothing else is served from there.
PAGE_FILES = {"chat.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8"}
# On every answer. The page loads its script and style from this origin only (no inline
# code, so an injected <script> does not run), talks to this origin only, and may not be
# framed (clickjacking); nosniff: a JSON answer is never run as a script or page.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
                    (b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]

# What a field of several accepted shapes must be, for its 400 message.
FIELD_FORMS = {"prompt": "a string, a list of strings, a list of token ids, or a list of lists of token ids",
               "stop": "a string or a list of strings"}


def build_app(models: list[ServedModel], settings: ServerSettings | None = None) -> FastAPI:
    if not models:
        raise SamoutError("no model to serve")
    settings = settings or ServerSettings()
    metrics = ServerMetrics(models)
    serving_completion = OpenAIServingCompletion(models, settings, metrics)
    serving_chat = OpenAIServingChat(models, settings, metrics)

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
    describe_errors_as_openai(app)

    # -- errors: always OpenAI's body ---------------------------------------------------
    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        code = None
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif first.get("type") == "extra_forbidden":  # a field nobody here reads: never ignored
            where = ".".join(loc)
            message, param = f"'{where}' is not supported by this server", where
            code = "unsupported_parameter"
        elif not loc and "json" not in request.headers.get("content-type", ""):
            message, param = "the request body must be a JSON object sent with " \
                             "'Content-Type: application/json'", None
        elif loc and loc[0] in FIELD_FORMS:  # a union: pydantic's message names one branch only
            message, param = f"{loc[0]} must be {FIELD_FORMS[loc[0]]}", loc[0]
        else:
            where = ".".join(loc) or "body"
            message, param = f"{where}: {first.get('msg', 'invalid value')}", (loc[0] if loc else None)
        # A field's name comes from the client and may hold a lone surrogate: escape it, or
        # writing the answer would fail.
        message, param = _encodable(message), (None if param is None else _encodable(param))
        return JSONResponse(P.error_body(message, param=param, code=code), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if err.status_code == 413 else None
        return JSONResponse(P.error_body(str(err.detail), type=kind, code=code), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        return JSONResponse(P.error_body(f"internal error: {type(err).__name__}", type="server_error"),
                            status_code=500)

    app.add_middleware(BodyDeadline, seconds=settings.body_timeout)
    if settings.api_key:
        app.add_middleware(_BearerAuth, api_key=settings.api_key)
    app.add_middleware(_BodyLimit, max_bytes=settings.max_body_bytes)
    # Outside the key and body checks: their 401s and 413s are logged too.
    app.add_middleware(AccessLog)
    # Added last, so outermost: a foreign Host is refused before anything else runs, and
    # every answer (a 401 or 413 too) carries the security headers.
    app.add_middleware(_Guard, allowed_hosts=settings.allowed_hosts)

    # -- routes -------------------------------------------------------------------------
    @app.get("/", response_class=Response, responses={200: _text("text/html"), **_errors(*ANY_ROUTE)})
    async def page():
        return HTMLResponse(chat_page_html())

    @app.get("/static/{name}", response_class=Response,
             responses={200: _text(*(t.split(";")[0] for t in PAGE_FILES.values())),
                        **_errors(*ANY_ROUTE, 404)})
    async def page_file(name: str):
        if name not in PAGE_FILES:
            raise StarletteHTTPException(404, f"no file {name!r}")
        return Response(static_text(name), media_type=PAGE_FILES[name])

    @app.get("/health", responses={200: {"model": P.Health}, **_errors(*ANY_ROUTE)})
    async def health():
        """Liveness only: open to anyone, so it must cost a constant and tell nothing."""
        return {"status": "ok"}

    @app.get("/v1/health", responses={200: {"model": P.HealthDetails}, **_errors(*KEYED_ROUTE)})
    async def health_details(reset_peaks: bool = False):
        """The engines' counters, the state caches and the process memory: behind the API key
        (under /v1/) when one is set. `reset_peaks` (benchmarks): the engines' peak figures
        start afresh, and the heap memory freed so far goes back to the OS, so that RSS read
        next is what the server holds now, not the most an earlier load ever needed."""
        stats = {m.name: m.engine.stats(reset_peaks) for m in models}
        if reset_peaks:
            release_free_memory()
        return {"status": "ok", "models": stats, "memory": memory_stats()}

    @app.get("/metrics", response_class=Response,
             responses={200: _text("text/plain"), **_errors(*KEYED_ROUTE)})
    async def prometheus_metrics():
        """Prometheus' text format: behind the key when one is set; a constant per model."""
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", responses={200: {"model": P.ModelList}, **_errors(*KEYED_ROUTE)})
    async def list_models():
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": m.created, "owned_by": "samout",
             "chat": m.render_chat is not None, "max_context": m.context_limit, "dtype": m.dtype}
            for m in models]}

    @app.post("/v1/completions", responses={200: {"model": P.CompletionResponse, "content": EVENT_STREAM},
                                            **_errors(*GENERATING_ROUTE)})
    async def completions(body: P.CompletionRequest, request: Request):
        return await serving_completion.create_completion(body, request)

    @app.post("/v1/chat/completions",
              responses={200: {"model": P.ChatCompletionResponse, "content": EVENT_STREAM},
                         **_errors(*GENERATING_ROUTE)})
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        return await serving_chat.create_chat_completion(body, request)

    return app


class _BearerAuth:
    """401 for a /v1/ or /metrics request without `Authorization: Bearer KEY`. A plain ASGI middleware:
    Starlette's `@app.middleware("http")` (BaseHTTPMiddleware) wraps every request and kept
    its body alive as long as the stream ran."""

    def __init__(self, app, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] == "/metrics"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                body = P.error_body("invalid or missing API key (send 'Authorization: Bearer KEY')",
                                    code="invalid_api_key")
                await JSONResponse(body, status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _Guard:
    """Refuses a request whose Host header is not allowed (400: a DNS-rebinding page reaches
    a loopback server under its own name), and adds SECURITY_HEADERS to every answer."""

    def __init__(self, app, allowed_hosts: frozenset[str] | None) -> None:
        self.app, self.allowed = app, allowed_hosts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *SECURITY_HEADERS]
            await send(message)

        host = dict(scope["headers"]).get(b"host")  # None: an HTTP/1.0 client; browsers send one
        if self.allowed is not None and host is not None and host_name(host) not in self.allowed:
            body = P.error_body(f"the Host {host.decode('latin-1')[:100]!r} is not served here "
                                "(see --allowed-host)", code="host_not_allowed")
            await JSONResponse(body, status_code=400)(scope, receive, send_secured)
            return
        await self.app(scope, receive, send_secured)


# The errors each route may answer, for its OpenAPI description (all OpenAI's error body).
ERROR_STATUSES = {400: "a bad request: a malformed body or field, or a Host not served here",
                  401: "a missing or wrong API key (when the server has one)",
                  404: "no such model, or no such file", 408: "the request body did not arrive in time",
                  413: "the request body is over --max-body-bytes", 429: "the queue is full: retry later",
                  503: "the server is shutting down"}
ANY_ROUTE = (400, 408, 413)
KEYED_ROUTE = (*ANY_ROUTE, 401)
GENERATING_ROUTE = (*KEYED_ROUTE, 404, 429, 503)
# With "stream": true. The schema of a server-sent event stream describes each event (OpenAPI
# 3.1): its data is a chunk's JSON, or [DONE] at the end.
EVENT_STREAM = {"text/event-stream": {"schema": {"type": "object", "required": ["data"],
                                                 "properties": {"data": {"type": "string"}}}}}


def _text(*media_types: str) -> dict:
    """An answer of text in one of `media_types`, for a route's OpenAPI `responses`."""
    return {"content": {t: {"schema": {"type": "string"}} for t in media_types}}


def _errors(*statuses: int) -> dict:
    return {s: {"model": P.ErrorResponse, "description": ERROR_STATUSES[s]} for s in statuses}


def describe_errors_as_openai(app: FastAPI) -> None:
    """FastAPI's schema promises a 422 with its own body for a bad request; this server answers
    400 with OpenAI's (the routes' `responses` name it). Drop the 422 from `app.openapi()`."""
    make_schema = app.openapi

    def openapi() -> dict:
        schema = make_schema()  # cached by FastAPI: patched once
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi


def host_name(host: bytes) -> str:
    """A Host header's name without its port, lower case: b"[::1]:80" -> "[::1]"."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[:text.find("]") + 1] if "]" in text else text
    return text.rsplit(":", 1)[0] if ":" in text else text


def _encodable(text: str) -> str:
    """`text` with any lone surrogate written as its escape, so that it encodes as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _BodyLimit:
    """413 for a request body over `max_bytes`: at once from its Content-Length, else (a
    chunked body, or one longer than it said) as soon as the bytes read pass the limit, so
    that no more of it is read or held. A plain ASGI middleware, like _BearerAuth."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> StarletteHTTPException:
        return StarletteHTTPException(413, f"the request body is larger than this server's limit of "
                                           f"{self.max_bytes} bytes (--max-body-bytes)")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            err = self._too_large()
            body = P.error_body(str(err.detail), code="request_too_large")
            # Connection: close, so that the unread body is never read.
            await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
            return
        seen = 0

        async def limited_receive():
            # Raised while FastAPI reads the body: it passes HTTPExceptions on to the handler.
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)


def _run_events(batch: list) -> None:
    for emit, event in batch:
        emit(event)


def chat_page_html() -> str:
    return static_text("index.html")


def static_text(name: str) -> str:
    return resources.files("samout.serve").joinpath(f"static/{name}").read_text(encoding="utf-8")


# Names that lived here before the serving split; importing them from here still works for
# one release (deprecated: import them from their new modules).
_MOVED = {"TextStream": "samout.serve.detokenizer",
          "COMPLETION_DEFAULT_MAX_TOKENS": "samout.serve.serving_completions",
          "CHAT_DEFAULT_MAX_TOKENS": "samout.serve.serving_chat",
          "RETRY_AFTER_SECONDS": "samout.serve.serving", "DISCONNECT_POLL_SECONDS": "samout.serve.serving"}


def __getattr__(name: str):
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"samout.serve.api_server.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_MAX_PROMPT_TOKENS", "DEFAULT_MAX_TOKENS_LIMIT", "FIELD_FORMS", "ServedModel",
           "ServerSettings", "build_app", "chat_page_html"]
