"""`samout serve RUN_DIR [RUN_DIR ...]`: an OpenAI-compatible server with a chat page."""

from __future__ import annotations

import argparse
import os
import sys

from samout.errors import SamoutError
from samout.quant import add_dtype_argument

API_KEY_ENV = "SAMOUT_API_KEY"


def register(subparsers) -> None:
    from samout.serve.api_server import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_MAX_TOKENS_LIMIT
    from samout.serve.engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK
    from samout.serve.loading import DEFAULT_STATE_CACHE_MB

    p = subparsers.add_parser(
        "serve",
        help="serve models over an OpenAI-compatible HTTP API with a web chat page",
        description="Serve one or more run directories (each under its directory name, or --name) at "
                    "/v1/completions, /v1/chat/completions and /v1/models, with a chat page at /. "
                    "Concurrent requests are decoded together (continuous batching); a request whose "
                    "prompt extends an earlier conversation resumes from its saved state.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run or model directories to serve")
    p.add_argument("--name", action="append", help="model name for each RUN_DIR, in order (default: "
                   "the directory name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server)")
    p.add_argument("--port", type=int, default=8000)
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
    p.add_argument("--max-prompt-tokens", type=int, default=DEFAULT_MAX_PROMPT_TOKENS)
    p.add_argument("--max-tokens-limit", type=int, default=DEFAULT_MAX_TOKENS_LIMIT,
                   help="largest max_tokens a request may ask for")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info logs every request)")
    p.set_defaults(func=run)


def run(args) -> int:
    import uvicorn

    from samout.serve.api_server import ServerSettings, build_app
    from samout.serve.loading import load_served_model

    names = args.name or []
    if len(names) > len(args.run_dirs):
        raise SamoutError(f"{len(names)} --name values for {len(args.run_dirs)} run directories")
    for label in ("max_batch", "prefill_chunk", "max_prompt_tokens", "max_tokens_limit"):
        if getattr(args, label) < 1:
            raise SamoutError(f"--{label.replace('_', '-')} must be at least 1")
    if not 0 <= args.port < 65536:
        raise SamoutError(f"--port must lie in [0, 65535], got {args.port}")
    models = []
    for i, run_dir in enumerate(args.run_dirs):
        served = load_served_model(run_dir, names[i] if i < len(names) else None, args.device,
                                   dtype=args.dtype, max_batch=args.max_batch, max_queue=args.max_queue,
                                   prefill_chunk=args.prefill_chunk, state_cache_mb=args.state_cache_mb)
        if any(m.name == served.name for m in models):
            raise SamoutError(f"two models named {served.name!r}: give each a --name")
        models.append(served)
        chat = "chat template" if served.render_chat else "no chat template"
        print(f"loaded {served.name} from {run_dir} ({type(served.engine.model).__name__}, "
              f"{served.dtype}, {chat})",
              file=sys.stderr)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    settings = ServerSettings(max_prompt_tokens=args.max_prompt_tokens,
                              max_tokens_limit=args.max_tokens_limit, api_key=api_key)
    app = build_app(models, settings)
    print(f"serving {', '.join(m.name for m in models)} at http://{args.host}:{args.port} "
          f"(chat page at /, API at /v1; Ctrl-C drains and stops)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=int(settings.drain_timeout))
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the signal it handled, after draining
        pass
    if not server.started:
        raise SamoutError(f"could not start the server on {args.host}:{args.port} (is the port in use?)")
    print("samout serve: stopped", file=sys.stderr)
    return 0
