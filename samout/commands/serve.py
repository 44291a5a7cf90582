"""`samout serve RUN_DIR [RUN_DIR ...]`: an OpenAI-compatible server with a chat page."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import socket
import sys

from samout.commands import add_command
from samout.errors import SamoutError
from samout.quant import add_dtype_argument

API_KEY_ENV = "SAMOUT_API_KEY"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" on every option that has a default, but not "(default: None)"."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


SUMMARY = "serve models over an OpenAI-compatible HTTP API with a web chat page"
DESCRIPTION = (
    "Serve one or more run directories (each under its directory name, or --name) at "
    "/v1/completions, /v1/chat/completions and /v1/models, with a chat page at /. "
    "Concurrent requests are decoded together (continuous batching); a request whose "
    "prompt extends an earlier conversation resumes from its saved state."
)


def register(subparsers) -> None:
    from samout.serve.engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK
    from samout.serve.loading import DEFAULT_STATE_CACHE_DIR_MB, DEFAULT_STATE_CACHE_MB
    from samout.serve.serving import (
        DEFAULT_MAX_BODY_BYTES,
        DEFAULT_MAX_LOGPROBS,
        DEFAULT_MAX_PROMPT_CHARS,
        DEFAULT_MAX_PROMPT_TOKENS,
        DEFAULT_MAX_STOP_CHARS,
        DEFAULT_MAX_STOP_SEQUENCES,
        DEFAULT_MAX_TOKENS_LIMIT,
    )
    from samout.serve.timeouts import DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, DEFAULT_KEEP_ALIVE_TIMEOUT

    p = add_command(subparsers, "serve", SUMMARY, DESCRIPTION, _HelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run or model directories to serve")
    p.add_argument("--name", action="append", help="model name for each RUN_DIR, in order (default: "
                   "the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_dtype_argument(p)
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1/* "
                   f"(default: ${API_KEY_ENV} if set)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests waiting for a slot; beyond it: 429 with Retry-After")
    p.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                   help="prompt tokens fed per engine step (bounds the stall of running sequences)")
    p.add_argument("--state-cache-mb", type=float, default=DEFAULT_STATE_CACHE_MB,
                   help="byte budget of the conversation-state cache per model (0 = off)")
    p.add_argument("--state-cache-dir", default=None, metavar="DIR",
                   help="also keep states on disk in DIR (created 0700; one subdirectory per model): "
                        "conversations survive a restart")
    p.add_argument("--state-cache-dir-mb", type=float, default=DEFAULT_STATE_CACHE_DIR_MB,
                   help="byte budget of --state-cache-dir per model; least recently used files go first")
    p.add_argument("--state-store", default=None, metavar="URL",
                   help="also keep states in Redis (redis://HOST:PORT/DB, redis://:PASSWORD@..., "
                        "rediss://...), shared by every replica serving the same model; unreachable at "
                        "start-up: error")
    p.add_argument("--state-store-ttl", type=int, default=None, metavar="SECONDS",
                   help="expire each state this long after it was written in --state-store (default: never; "
                        "Redis' maxmemory policy evicts)")
    p.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS,
                   help="longest prompt a request may send (in tokens, after the chat template); "
                        "longer: 400")
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                   help="largest max_tokens a request may ask for; larger: 400")
    p.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                   help="a Host header to answer besides localhost, 127.0.0.1 and [::1] (repeatable). "
                        "Bound to a loopback address the server answers only those names (against "
                        "DNS rebinding); bound elsewhere, any name unless this is given")
    p.add_argument("--timeout-headers", type=float, default=DEFAULT_HEADER_TIMEOUT,
                   help="seconds a client may take to send a request's headers; then 408 and closed")
    p.add_argument("--timeout-body", type=float, default=DEFAULT_BODY_TIMEOUT,
                   help="seconds a client may take to send a request's body after its headers; "
                        "then 408 and closed")
    p.add_argument("--timeout-keep-alive", type=int, default=DEFAULT_KEEP_ALIVE_TIMEOUT,
                   help="seconds an idle kept-alive connection stays open")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body, in bytes; larger: 413, before it is read")
    p.add_argument("--max-prompt-chars", type=int, default=DEFAULT_MAX_PROMPT_CHARS,
                   help="most prompt characters a request may send (all its prompt texts or messages), "
                        "checked before tokenizing; more: 400")
    p.add_argument("--max-stop-sequences", type=int, default=DEFAULT_MAX_STOP_SEQUENCES,
                   help="most stop strings a request may send; more: 400")
    p.add_argument("--max-stop-chars", type=int, default=DEFAULT_MAX_STOP_CHARS,
                   help="longest stop string, in characters; longer: 400")
    p.add_argument("--max-logprobs", type=int, default=DEFAULT_MAX_LOGPROBS,
                   help="most top logprobs a request may ask for (completions' logprobs, chat's "
                        "top_logprobs); more: 400")
    p.add_argument("--max-choices", type=int, default=None,
                   help="most choices (prompts x n) one request may ask for; more: 400 (default: half "
                        "of --max-batch, so that no single request can take every slot)")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="log level (info logs every request: uvicorn's line and samout.access's, "
                        "with its tokens and seconds)")
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from samout.serve.api_server import ServerSettings, build_app
    from samout.serve.loading import load_served_model

    names = args.name or []
    if len(names) > len(args.run_dirs):
        raise SamoutError(f"{len(names)} --name values for {len(args.run_dirs)} run directories")
    for label in ("max_batch", "prefill_chunk", "max_prompt_tokens", "max_tokens_limit", "max_body_bytes",
                  "max_prompt_chars", "max_stop_sequences", "max_stop_chars", "max_choices", "max_logprobs"):
        if getattr(args, label) is not None and getattr(args, label) < 1:
            raise SamoutError(f"--{label.replace('_', '-')} must be at least 1")
    for label in ("timeout_headers", "timeout_body", "timeout_keep_alive"):
        if not getattr(args, label) > 0:
            raise SamoutError(f"--{label.replace('_', '-')} must be more than 0")
    if not 1 <= args.port < 65536:
        raise SamoutError(f"--port must lie in [1, 65535], got {args.port}")
    if args.state_store is not None:  # before the (slow) model loading, like the port
        from samout.serve.redis_state_store import check_redis_url

        check_redis_url(args.state_store)
        if args.state_cache_dir is not None:
            raise SamoutError("give --state-cache-dir or --state-store, not both")
    # Bound before the (slow) model loading: a port in use is a one-line error at once.
    sock = listen_socket(args.host, args.port)
    models = []
    for i, run_dir in enumerate(args.run_dirs):
        served = load_served_model(run_dir, names[i] if i < len(names) else None, args.device,
                                   dtype=args.dtype, max_batch=args.max_batch, max_queue=args.max_queue,
                                   prefill_chunk=args.prefill_chunk, state_cache_mb=args.state_cache_mb,
                                   state_cache_dir=args.state_cache_dir,
                                   state_cache_dir_mb=args.state_cache_dir_mb, state_store=args.state_store,
                                   state_store_ttl=args.state_store_ttl)
        if any(m.name == served.name for m in models):
            raise SamoutError(f"two models named {served.name!r}: give each a --name")
        models.append(served)
        chat = "chat template" if served.render_chat else "no chat template"
        store = getattr(served.engine.cache, "store", None)
        states = "" if store is None else f", states also in {store.describe()}"
        print(f"loaded {served.name} from {run_dir} ({type(served.engine.model).__name__}, "
              f"{served.dtype}, {chat}{states})",
              file=sys.stderr)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    settings = ServerSettings(max_prompt_tokens=args.max_prompt_tokens,
                              max_tokens_limit=args.max_tokens_limit, api_key=api_key,
                              allowed_hosts=allowed_hosts(args.host, args.allowed_host),
                              header_timeout=args.timeout_headers, body_timeout=args.timeout_body,
                              keep_alive_timeout=args.timeout_keep_alive,
                              max_body_bytes=args.max_body_bytes, max_prompt_chars=args.max_prompt_chars,
                              max_stop_sequences=args.max_stop_sequences, max_stop_chars=args.max_stop_chars,
                              max_choices=args.max_choices, max_logprobs=args.max_logprobs)
    app = build_app(models, settings)
    _show_access_log(args.log_level)
    print(f"serving {', '.join(m.name for m in models)} at http://{args.host}:{args.port} "
          f"(chat page at /, API at /v1; Ctrl-C drains and stops)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=int(settings.drain_timeout),
                            **settings.uvicorn_options())
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the signal it handled, after draining
        pass
    except SystemExit as exit_:  # uvicorn exits this way when its startup fails
        raise SamoutError(f"the server failed to start (exit status {exit_.code})") from None
    if not server.started:
        raise SamoutError(f"the server failed to start on {args.host}:{args.port}")
    print("samout serve: stopped", file=sys.stderr)
    return 0


def allowed_hosts(bind: str, extra: list[str]) -> frozenset[str] | None:
    """The Host names the server answers (None: any). On a loopback address only the loopback
    names and `extra`: a DNS-rebinding page reaches it under its own name."""
    from samout.serve.api_server import host_name
    from samout.serve.serving import LOOPBACK_HOSTS

    if not extra and not is_loopback(bind):
        return None
    return LOOPBACK_HOSTS | {host_name(h.encode("latin-1")) for h in extra}


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port (IPv4 or IPv6, as the host resolves), or a
    SamoutError saying why not (port in use, unknown host, no permission)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        plain = err.errno and not isinstance(err, socket.gaierror)
        reason = os.strerror(err.errno) if plain else (err.strerror or str(err))
        hint = " (is another server running there? choose another --port)" \
            if err.errno == errno.EADDRINUSE else ""
        raise SamoutError(f"cannot listen on {host}:{port}: {reason}{hint}") from None


def _show_access_log(level: str) -> None:
    """The `samout.access` lines (one per request) on stderr at --log-level info or below."""
    log = logging.getLogger("samout.access")
    log.setLevel(level.upper())
    if not any(getattr(h, "samout_access", False) for h in log.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        handler.samout_access = True
        log.addHandler(handler)
