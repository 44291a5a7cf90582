"""What a state-cache hit costs from each tier: memory, a --state-cache-dir, a Redis.

    samout bench stores [--preset small] [--history 4096] [--state-store redis://...]

For each model (a random SamOut of the preset and its matched Transformer) and each tier, a
serving engine (`samout.serve.engine`, in process: no HTTP) sees one conversation of
`--history` tokens, then `--repeats` follow-ups (the history plus `--follow-up-tokens` new
ones, different each time), each resuming from the history's state. Time to first token of a
follow-up (submission to its first sampled token) is the figure; the median is kept, and the
minimum (on a shared machine, the figure least disturbed by other jobs). The
disk and Redis tiers run with no memory tier in front (budget 0), so every follow-up is read
from the store, checked and decoded: the cost of a hit after a restart or on another
replica. `none` is the same follow-up without any cache (the whole history prefilled).
`lookup` times the cache's lookup alone (hash the ids, find, read, check, decode).

The disk tier writes into a temporary directory (or --state-cache-dir): a file just written
sits in the page cache, so this is a warm read; a cold disk adds its read latency. Without
--state-store a redis-server from PATH is started on a free loopback port (and the Redis
tier skipped when there is none).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from samout.bench.arguments import add_run_arguments, command_line, names, settings_from_args
from samout.bench.common import (
    build_model,
    check_names,
    header_lines,
    median,
    prepare_out_dir,
    resolve_device,
    run_header,
    write_json,
    write_report,
)
from samout.config import PRESETS, SamOutConfig
from samout.errors import SamoutError
from samout.generation import SamplingParams
from samout.models.transformer_config import match_transformer_to
from samout.serve.disk_state_store import DiskStateStore
from samout.serve.engine import DEFAULT_PREFILL_CHUNK, Engine
from samout.serve.redis_state_store import RedisStateStore
from samout.serve.state_cache import StateCache
from samout.serve.state_format import encode_state
from samout.serve.state_store import TieredStateCache

TIERS = ("none", "memory", "disk", "redis")
MODELS = ("samout", "transformer")
BUDGET_BYTES = 4 << 30  # memory and disk: every state of a run fits


@dataclass
class StoresBenchSettings:
    preset: str = "small"
    history: int = 4096
    follow_up_tokens: int = 16
    repeats: int = 7
    models: list[str] = field(default_factory=lambda: list(MODELS))
    tiers: list[str] = field(default_factory=lambda: list(TIERS))
    device: str = "cpu"
    seed: int = 0


QUICK = dict(preset="tiny", history=256, follow_up_tokens=8, repeats=3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `samout bench stores`."""
    parser.add_argument("--preset", choices=list(PRESETS), help="SamOut preset (default small); the "
                        "Transformer is matched to it")
    parser.add_argument("--history", type=int, help="tokens of the conversation before the follow-up "
                        "(default 4096)")
    parser.add_argument("--follow-up-tokens", type=int, help="new tokens of a follow-up (default 16)")
    parser.add_argument("--repeats", type=int, help="follow-ups per tier (median kept; default 7)")
    parser.add_argument("--models", type=names, help="samout, transformer (default both)")
    parser.add_argument("--tiers", type=names, help=f"of {', '.join(TIERS)} (default all)")
    parser.add_argument("--state-cache-dir", help="directory of the disk tier (default: a temporary one)")
    parser.add_argument("--state-store", help="Redis URL of the redis tier (default: start redis-server "
                        "on a free loopback port)")
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """`samout bench stores`."""
    s = settings_from_args(args, StoresBenchSettings, QUICK,
                           ("preset", "history", "follow_up_tokens", "repeats", "models", "tiers", "device",
                            "seed"))
    check_names(s.models, MODELS, "model", "--models")
    check_names(s.tiers, TIERS, "tier", "--tiers")
    if s.history < 1 or s.follow_up_tokens < 1 or s.repeats < 1:
        raise SamoutError("--history, --follow-up-tokens and --repeats must be at least 1")
    out = prepare_out_dir(args.out)
    results = run_stores_bench(s, command_line(args), args.state_cache_dir, args.state_store)
    write_json(out / "stores.json", results)
    return write_report(out, "stores", results, format_stores(results))


def _models(s: StoresBenchSettings, device: torch.device) -> dict[str, torch.nn.Module]:
    config = SamOutConfig.from_preset(s.preset)
    configs = {"samout": config,
               "transformer": match_transformer_to(config, max_position_embeddings=max(
                   1024, s.history + (s.repeats + 2) * s.follow_up_tokens + 8))}
    return {name: build_model(configs[name], device, seed=s.seed).eval() for name in s.models}


def _ttft(engine: Engine, prompt: list[int]) -> float:
    """Seconds from submitting `prompt` to its first token (one greedy token asked)."""
    done, first, errors = threading.Event(), [], []

    def emit(event: tuple) -> None:
        if event[0] == "token" and not first:
            first.append(time.perf_counter())
        elif event[0] == "error":
            errors.append(event[1])
        if event[0] in ("finish", "error"):
            done.set()

    start = time.perf_counter()
    engine.submit(prompt, SamplingParams(max_new_tokens=1, temperature=0, stop_at_eot=False), emit)
    done.wait()
    if errors:
        raise SamoutError(f"the engine failed: {errors[0]}")
    return first[0] - start


@contextlib.contextmanager
def local_redis(url: str | None):
    """`url`, or a redis-server started on a free loopback port (None when there is none)."""
    if url is not None:
        yield url
        return
    server = shutil.which("redis-server")
    if server is None:
        yield None
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        process = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", directory],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            import redis

            client, deadline = redis.Redis(port=port), time.monotonic() + 10
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise SamoutError("redis-server did not start") from None
                    time.sleep(0.05)
            client.close()
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(10)


def _cache(tier: str, directory: Path, url: str | None, namespace: str):
    if tier == "none":
        return None
    if tier == "memory":
        return StateCache(BUDGET_BYTES)
    store = DiskStateStore(directory, BUDGET_BYTES) if tier == "disk" else RedisStateStore(url, namespace)
    return TieredStateCache(StateCache(0), store)  # nothing in front: every hit is read from the store


@torch.no_grad()
def run_stores_bench(s: StoresBenchSettings, command: str, state_cache_dir: str | None = None,
                     state_store: str | None = None) -> dict[str, Any]:
    device = resolve_device(s.device)
    torch.manual_seed(s.seed)
    results: dict[str, Any] = {"header": run_header(device, command), "settings": asdict(s), "points": []}
    models = _models(s, device)
    rng = random.Random(s.seed)
    with local_redis(state_store if "redis" in s.tiers else None) as url, \
            tempfile.TemporaryDirectory() as scratch:
        for name, model in models.items():
            vocab = model.config.vocab_size
            history = [rng.randrange(vocab) for _ in range(s.history)]
            follow_ups = [history + [rng.randrange(vocab) for _ in range(s.follow_up_tokens)]
                          for _ in range(s.repeats + 1)]  # the first is a warm-up
            results["points"] += _measure(s, name, model, history, follow_ups, url,
                                          Path(state_cache_dir or scratch))
    return results


def _measure(s: StoresBenchSettings, name: str, model: torch.nn.Module, history: list[int],
             follow_ups: list[list[int]], url: str | None, root: Path) -> list[dict[str, Any]]:
    """One model's points: an engine per tier sees `history`, then the follow-ups."""
    points, engines = [], {}
    try:
        for tier in s.tiers:
            if tier == "redis" and url is None:
                points.append({"model": name, "tier": tier, "skipped": "no redis-server"})
                continue
            cache = _cache(tier, root / f"{name}-{time.monotonic_ns()}", url,
                           f"samout-bench:{time.monotonic_ns()}:")
            engines[tier] = Engine(model, cache=cache, prefill_chunk=DEFAULT_PREFILL_CHUNK, name=name).start()
            _ttft(engines[tier], history)
            if cache is not None:
                cache.flush()
        # The tiers take turns, so that a noisy moment on a shared machine hits them alike;
        # each store's writes finish (untimed) before the next tier's turn.
        ttfts: dict[str, list[float]] = {tier: [] for tier in engines}
        for follow_up in follow_ups:
            for tier, engine in engines.items():
                ttfts[tier].append(_ttft(engine, follow_up))
                if engine.cache is not None:
                    engine.cache.flush()
        for tier, engine in engines.items():
            lookups, state_bytes = [], None
            if engine.cache is not None:
                for follow_up in follow_ups[1:]:
                    start = time.perf_counter()
                    hit = engine.cache.lookup(follow_up)
                    lookups.append(time.perf_counter() - start)
                    if hit is None or hit.length < s.history:
                        raise SamoutError(f"{tier}: the follow-up missed the history's state")
                state_bytes = len(encode_state((hit.length, b"\0" * 32), hit.state))
            points.append({"model": name, "tier": tier, "ttft_s": median(ttfts[tier][1:]),
                           "ttft_min_s": min(ttfts[tier][1:]),
                           "ttfts_s": ttfts[tier][1:], "lookup_s": median(lookups) if lookups else None,
                           "state_bytes": state_bytes})
    finally:
        for engine in engines.values():
            engine.shutdown()
    return points


def format_stores(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [*header_lines("stores", results["header"]),
             f"# follow-up of {s['follow_up_tokens']} tokens after H={s['history']} ({s['preset']} preset), "
             f"median of {s['repeats']}",
             f"{'model':<12} {'tier':<7} {'TTFT ms':>9} {'min ms':>9} {'lookup ms':>10} {'state bytes':>12} "
             f"{'x memory':>9}"]
    memory = {p["model"]: p["ttft_s"] for p in results["points"] if p["tier"] == "memory"}
    for p in results["points"]:
        if "skipped" in p:
            lines.append(f"{p['model']:<12} {p['tier']:<7} skipped: {p['skipped']}")
            continue
        lookup = "-" if p["lookup_s"] is None else f"{p['lookup_s'] * 1e3:.3f}"
        size = "-" if p["state_bytes"] is None else str(p["state_bytes"])
        ratio = f"{p['ttft_s'] / memory[p['model']]:.2f}" if p["model"] in memory else "-"
        ttft, fastest = p["ttft_s"] * 1e3, p["ttft_min_s"] * 1e3
        lines.append(f"{p['model']:<12} {p['tier']:<7} {ttft:>9.2f} {fastest:>9.2f} {lookup:>10} {size:>12} "
                     f"{ratio:>9}")
    return "\n".join(lines)
