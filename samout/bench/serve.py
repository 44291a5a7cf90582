"""`samout bench serve`: SamOut and the matched Transformer behind one `samout serve` process.

Throughput: N concurrent streaming clients (default 1, 8, 32, 64), each with a conversation
history of H tokens (default 512, 4096) and `max_tokens` greedy tokens to generate (end of
text ignored, so every client generates the same count). Per (model, H, N): aggregate
generated tokens/s (all tokens / wall time from the first request to the last answer), time
to first token p50/p95, inter-token latency p50/p95 (gaps between streamed chunks), the server
process's peak RSS during the point (sampled from /proc at 50 Hz) and its growth over the
idle RSS before the point, and the engine's exact peak bytes of live sequence states
(`state_bytes`, from /v1/health; the Transformer's KV caches count as held in its padded
decode batch, padding included) with the bytes per session. This server runs with the state
cache off, so its memory is the model plus the sessions.

Conversations: the same N clients and H, but each client is in a conversation whose
history the server has seen (a first turn of H tokens, untimed, with the state cache on),
and the timed request is its next turn: the history plus `follow_up_tokens` new tokens,
which resumes from the cached state. What a chat server does all day, and where a state
of fixed size pays: the cache holds every conversation at any history length. The cache
budget (`CONVERSATION_CACHE_MB`) holds every Transformer KV cache too, so both run at their
best.

Memory: before each point the server returns its freed heap to the OS (`/v1/health?reset_peaks`),
and the point's RSS growth is its peak over that idle RSS. The heap in use (glibc's mallinfo2,
from /v1/health) is read too: while every session decodes (what requests in flight hold) and
after the point (what the server keeps: the state cache's new entries). Bytes per session are
least-squares slopes of these growths over N.

Points with one client are run `repeats` times and the median kept (they last a fraction of
a second, and every "x one client" ratio divides by them).

Follow-up turns: a second server with the state cache on. One client sends a history of H
tokens, then the follow-up (the same history plus `follow_up_tokens` new ones): a cache hit
(it resumes after H tokens). A miss is the same follow-up with one early token changed, so no
cached prefix applies. Median time to first token of each over `repeats` conversations.

Models are random (throughput does not depend on the weights); histories are random token ids.
The server is a separate process (`samout serve`), so its RSS is the server's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samout.bench.arguments import (
    add_baseline_argument,
    add_run_arguments,
    command_line,
    ints,
    settings_from_args,
)
from samout.bench.common import (
    build_model,
    header_line,
    plot_lines,
    positive_ints,
    prepare_out_dir,
    resolve_device,
    run_header,
    write_json,
    write_report,
)
from samout.config import PRESETS, SamOutConfig
from samout.errors import SamoutError
from samout.files import CONFIG_NAME
from samout.models.transformer_config import DEFAULT_BASELINE, match_transformer_to
from samout.procmem import proc_status_kib
from samout.tokenizer import EOT_ID, TOKENIZER_NAME, train_tokenizer

MODELS = ("samout", "transformer")
FOLLOW_UP_CACHE_MB = 1024  # holds every follow-up history of a run, KV caches included
CONVERSATION_CACHE_MB = 4096  # 64 Transformer KV caches at H=4096 (33 MiB each), with room


@dataclass
class ServeBenchSettings:
    preset: str = "small"
    baseline: str = DEFAULT_BASELINE  # the Transformer's style (BASELINE_STYLES)
    clients: list[int] = field(default_factory=lambda: [1, 8, 32, 64])
    histories: list[int] = field(default_factory=lambda: [512, 4096])
    max_tokens: int = 64
    follow_up_tokens: int = 16
    repeats: int = 5
    prefill_chunk: int = 512
    device: str = "cpu"
    seed: int = 0
    startup_timeout: float = 300.0


QUICK = dict(preset="tiny", clients=[1, 4], histories=[64, 256], max_tokens=8, follow_up_tokens=8,
             repeats=2, prefill_chunk=128)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `samout bench serve`."""
    parser.add_argument("--preset", choices=list(PRESETS), help="SamOut preset (default small); the "
                        "Transformer is matched to it")
    parser.add_argument("--clients", type=ints, help="concurrent clients (default 1,8,32,64)")
    parser.add_argument("--histories", type=ints, help="history tokens per client (default 512,4096)")
    for name, what in (("max_tokens", "greedy tokens each client asks for (default 64)"),
                       ("follow_up_tokens", "new tokens of a next or follow-up turn (default 16)"),
                       ("repeats", "runs of each one-client point and follow-up (median kept; default 5)"),
                       ("prefill_chunk", "the server's --prefill-chunk (default 512)")):
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=what)
    parser.add_argument("--work-dir", help="where the temporary run directories go (default: system temp)")
    add_baseline_argument(parser)
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """`samout bench serve`."""
    s = settings_from_args(args, ServeBenchSettings, QUICK,
                           ("preset", "baseline", "clients", "histories", "max_tokens", "follow_up_tokens",
                            "repeats", "prefill_chunk", "device", "seed"))
    results = run_serve_bench(s, args.out, command=command_line(args), progress=not args.no_progress,
                              work_dir=args.work_dir)
    return write_report(args.out, "serve", results, format_serve(results))


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _tokenizer_text(limit: int = 400_000) -> str:
    """Some of the running Python's standard library: offline and always there."""
    import sysconfig

    pieces, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        pieces.append(text)
        total += len(text)
        if total >= limit:
            break
    return "".join(pieces)


def write_runs(s: ServeBenchSettings, work: Path) -> dict[str, Path]:
    """Random SamOut (preset) and matched Transformer run directories, sharing a tokenizer."""
    if s.preset not in PRESETS:
        raise SamoutError(f"unknown preset {s.preset!r}: choose from {', '.join(PRESETS)}")
    vocab = PRESETS[s.preset]["vocab_size"]
    tokenizer = train_tokenizer([_tokenizer_text()], vocab_size=vocab)
    config = SamOutConfig.from_preset(s.preset, vocab_size=tokenizer.get_vocab_size())
    context = max(s.histories) + s.follow_up_tokens + 2 * s.max_tokens + 8
    configs = {"samout": config,
               "transformer": match_transformer_to(config, s.baseline,
                                                   max_position_embeddings=max(context, 1024))}
    dirs = {}
    for name, cfg in configs.items():
        model = build_model(cfg, torch.device("cpu"), seed=s.seed)
        dirs[name] = work / name
        model.save_pretrained(dirs[name])
        tokenizer.save(str(dirs[name] / TOKENIZER_NAME))
    return dirs


class ServerProcess:
    """`samout serve` in a child process, with its RSS sampled on demand."""

    def __init__(self, dirs: dict[str, Path], s: ServeBenchSettings, cache_mb: float) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        limit = max(s.histories) + s.follow_up_tokens + 16
        cmd = [sys.executable, "-m", "samout", "serve", str(dirs["samout"]), str(dirs["transformer"]),
               "--name", "samout", "--name", "transformer", "--port", str(self.port),
               "--device", s.device, "--max-batch", str(max(s.clients)),
               "--max-queue", str(4 * max(s.clients)),
               "--prefill-chunk", str(s.prefill_chunk), "--state-cache-mb", str(cache_mb),
               "--max-prompt-tokens", str(limit), "--max-tokens-limit", str(max(s.max_tokens, 16))]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + s.startup_timeout
        import httpx

        while True:
            if self.proc.poll() is not None:
                raise SamoutError(f"samout serve exited: {self.proc.stderr.read().strip()[-500:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SamoutError("samout serve did not start in time")
            time.sleep(0.2)

    def rss(self) -> int:
        return (proc_status_kib("VmRSS", self.proc.pid) or 0) * 1024

    def health(self, reset_peaks: bool = False) -> dict:
        import httpx

        return httpx.get(self.url + "/v1/health", params={"reset_peaks": reset_peaks}, timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: drain and exit
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _Sampler:
    """Peak RSS and peak engine state bytes while a point runs."""

    HEAP_EVERY_S = 0.25  # the heap is read through /v1/health: rarely, so as not to load the server

    def __init__(self, server: ServerProcess, model: str) -> None:
        self.server, self.model = server, model
        self.peak_rss = self.peak_state = self.peak_sessions = 0
        self.samples: list[tuple[float, int]] = []
        self.heap_samples: list[tuple[float, int]] = []
        self.heap_after: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        next_heap = 0.0
        while not self._stop.is_set():
            now = time.perf_counter()
            rss = self.server.rss()
            self.samples.append((now, rss))
            self.peak_rss = max(self.peak_rss, rss)
            if now >= next_heap:
                in_use = self.server.health()["memory"]["heap_in_use_bytes"]
                if in_use is not None:
                    self.heap_samples.append((time.perf_counter(), in_use))
                next_heap = now + self.HEAP_EVERY_S
            time.sleep(0.02)

    def rss_between(self, start: float, end: float) -> float | None:
        """Median RSS sampled in [start, end] (None if no sample fell there)."""
        inside = [rss for t, rss in self.samples if start <= t <= end]
        return float(np.median(inside)) if inside else None

    def heap_between(self, start: float, end: float) -> float | None:
        """Median heap in use read in [start, end] (None if none was read there)."""
        inside = [b for t, b in self.heap_samples if start <= t <= end]
        return float(np.median(inside)) if inside else None

    def __enter__(self) -> _Sampler:
        # Frees what earlier points left, so the idle figures are what the server holds.
        self.idle_heap = self.server.health(reset_peaks=True)["memory"]["heap_in_use_bytes"]
        self.idle_rss = self.server.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        # The engine's own exact peak of live state bytes since the reset above, and the heap
        # in use once every request has ended (after a garbage collection): what the server
        # keeps from the point (the state cache's new entries).
        health = self.server.health(reset_peaks=True)
        stats = health["models"][self.model]
        self.peak_state, self.peak_sessions = stats["peak_state_bytes"], stats["peak_state_sessions"]
        self.heap_after = health["memory"]["heap_in_use_bytes"]


async def _stream_one(http, url: str, body: dict) -> dict:
    start = time.perf_counter()
    arrivals, tokens, cached = [], 0, None
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise SamoutError(f"server answered {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if '"finish_reason": null' in line:
                # A text chunk (the server sends no empty ones; the final chunks, a choice's
                # last and the usage chunk, are parsed): not parsed, so that the clients, on
                # the same cores as the server, take as little CPU as they can.
                arrivals.append(time.perf_counter())
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"]:  # a choice's last chunk
                arrivals.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
    end = time.perf_counter()
    return {"ttft": (arrivals[0] - start) if arrivals else end - start,
            "itl": list(np.diff(arrivals)), "tokens": tokens, "cached": cached, "start": start, "end": end}


def _history(rng: random.Random, vocab: int, length: int) -> list[int]:
    return [EOT_ID] + [rng.randrange(2, vocab) for _ in range(length - 1)]


async def _concurrent(url: str, model: str, histories: list[list[int]], max_tokens: int) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(histories) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        bodies = [{"model": model, "prompt": h, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                   "ignore_eos": True, "stream_options": {"include_usage": True}} for h in histories]
        return await asyncio.gather(*(_stream_one(http, url, b) for b in bodies))


def throughput_point(server: ServerProcess, model: str, vocab: int, history: int, clients: int,
                     s: ServeBenchSettings, rng: random.Random) -> dict[str, Any]:
    """N clients each send a history of H tokens the server has not seen."""
    histories = [_history(rng, vocab, history) for _ in range(clients)]
    point = _timed_point(server, model, histories, s.max_tokens)
    return {"model": model, "history": history, "clients": clients, **point}


def conversation_point(server: ServerProcess, model: str, vocab: int, history: int, clients: int,
                       s: ServeBenchSettings, rng: random.Random) -> dict[str, Any]:
    """N clients each send the next turn of a conversation the server has already seen."""
    histories = [_history(rng, vocab, history) for _ in range(clients)]
    asyncio.run(_concurrent(server.url, model, histories, s.max_tokens))  # the first turns, untimed
    turns = [h + [rng.randrange(2, vocab) for _ in range(s.follow_up_tokens)] for h in histories]
    point = _timed_point(server, model, turns, s.max_tokens)
    return {"model": model, "history": history, "clients": clients, **point}


def _timed_point(server: ServerProcess, model: str, prompts: list[list[int]], max_tokens: int) -> dict:
    with _Sampler(server, model) as sampler:
        results = asyncio.run(_concurrent(server.url, model, prompts, max_tokens))
    idle_heap, idle_rss = sampler.idle_heap, sampler.idle_rss
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    # Every session decoding: from the last first token to the first answer's end. The RSS
    # there is what the sessions hold, without the prefill's passing peak (one chunk at a
    # time, whatever N).
    first_tokens = [r["start"] + r["ttft"] for r in results]
    decode_rss = sampler.rss_between(max(first_tokens), min(r["end"] for r in results))
    decode_heap = sampler.heap_between(max(first_tokens), min(r["end"] for r in results))

    def growth(value):
        return None if value is None or idle_heap is None else value - idle_heap

    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
            "decode_rss_bytes": decode_rss,
            "decode_rss_growth_bytes": None if decode_rss is None else decode_rss - idle_rss,
            "ttft_p50_s": _percentile(ttft, 50), "ttft_p95_s": _percentile(ttft, 95),
            "itl_p50_s": _percentile(itl, 50), "itl_p95_s": _percentile(itl, 95),
            "cached_tokens": sum(r["cached"] or 0 for r in results),
            "prompt_tokens": sum(len(p) for p in prompts),
            "idle_rss_bytes": idle_rss, "peak_rss_bytes": sampler.peak_rss,
            "idle_heap_bytes": idle_heap, "decode_heap_growth_bytes": growth(decode_heap),
            "held_heap_growth_bytes": growth(sampler.heap_after),
            "rss_growth_bytes": max(0, sampler.peak_rss - idle_rss),
            "peak_state_bytes": sampler.peak_state, "peak_state_sessions": sampler.peak_sessions,
            "state_bytes_per_session": (sampler.peak_state / sampler.peak_sessions
                                        if sampler.peak_sessions else None)}


def follow_up_point(server: ServerProcess, model: str, vocab: int, history: int, s: ServeBenchSettings,
                    rng: random.Random) -> dict[str, Any]:
    hits, misses, cached = [], [], []
    for _ in range(s.repeats):
        first = _history(rng, vocab, history)
        asyncio.run(_concurrent(server.url, model, [first], s.max_tokens))
        new = [rng.randrange(2, vocab) for _ in range(s.follow_up_tokens)]
        hit = asyncio.run(_concurrent(server.url, model, [first + new], s.max_tokens))[0]
        changed = list(first)
        changed[1] = 2 + (changed[1] - 1) % (vocab - 2)  # a different token: no cached prefix applies
        miss = asyncio.run(_concurrent(server.url, model, [changed + new], s.max_tokens))[0]
        hits.append(hit["ttft"])
        misses.append(miss["ttft"])
        cached.append((hit["cached"], miss["cached"]))
    return {"model": model, "history": history, "follow_up_tokens": s.follow_up_tokens,
            "ttft_hit_s": float(np.median(hits)), "ttft_miss_s": float(np.median(misses)),
            "cached_tokens_hit": cached[0][0], "cached_tokens_miss": cached[0][1]}


def _sweep(dirs: dict[str, Path], s: ServeBenchSettings, cache_mb: float, point_fn, label: str, vocab: int,
           rng: random.Random, progress: bool) -> list[dict[str, Any]]:
    """`point_fn` at every (model, H, N), on one server with a `cache_mb` state cache."""
    points = []
    server = ServerProcess(dirs, s, cache_mb=cache_mb)
    try:
        for model in MODELS:  # warm-up (first-call costs), untimed
            asyncio.run(_concurrent(server.url, model, [_history(rng, vocab, 16)], 2))
        for model in MODELS:
            for history in s.histories:
                for clients in s.clients:
                    # One client's point lasts a fraction of a second (64 tokens), so one
                    # scheduler hiccup moves it visibly: the median of `repeats` runs, since
                    # every "x one client" ratio divides by it.
                    runs = [point_fn(server, model, vocab, history, clients, s, rng)
                            for _ in range(s.repeats if clients == 1 else 1)]
                    point = sorted(runs, key=lambda p: p["tokens_per_s"])[len(runs) // 2]
                    point["runs_tokens_per_s"] = [p["tokens_per_s"] for p in runs]
                    points.append(point)
                    if progress:
                        print(f"  {label}{model:<12} H={history:<6} N={clients:<3} "
                              f"{point['tokens_per_s']:8.1f} tok/s  ttft p50 {point['ttft_p50_s']:.3f} s",
                              file=sys.stderr)
    finally:
        server.stop()
    return points


def run_serve_bench(s: ServeBenchSettings, out: str | Path, command: str, progress: bool = True,
                    work_dir: str | Path | None = None) -> dict[str, Any]:
    out = prepare_out_dir(out)
    s.clients = positive_ints("--clients", s.clients)
    s.histories = positive_ints("--histories", s.histories)
    for name in ("max_tokens", "follow_up_tokens", "repeats", "prefill_chunk"):
        if getattr(s, name) < 1:
            raise SamoutError(f"--{name.replace('_', '-')} must be at least 1")
    device = resolve_device(s.device)
    header = run_header(device, command)
    print(header_line(header), file=sys.stderr)
    rng = random.Random(s.seed)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        dirs = write_runs(s, Path(tmp))
        vocab = json.loads((dirs["samout"] / CONFIG_NAME).read_text())["vocab_size"]
        follow_ups = []
        points = _sweep(dirs, s, 0, throughput_point, "", vocab, rng, progress)
        conversations = _sweep(dirs, s, CONVERSATION_CACHE_MB, conversation_point, "next turn ", vocab, rng,
                               progress)
        server = ServerProcess(dirs, s, cache_mb=FOLLOW_UP_CACHE_MB)
        try:
            for model in MODELS:
                for history in s.histories:
                    point = follow_up_point(server, model, vocab, history, s, rng)
                    follow_ups.append(point)
                    if progress:
                        print(f"  follow-up {model:<12} H={history:<6} ttft hit {point['ttft_hit_s']:.3f} s, "
                              f"miss {point['ttft_miss_s']:.3f} s", file=sys.stderr)
        finally:
            server.stop()
        models = {name: json.loads((d / CONFIG_NAME).read_text()) for name, d in dirs.items()}
    results = {"benchmark": "serve", "header": header, "settings": asdict(s), "models": models,
               "throughput": points, "conversations": conversations, "follow_up": follow_ups, "plots": []}
    results["plots"] = _plots(results, out)
    write_json(out / "serve.json", results)
    return results


def _plots(results: dict, out: Path) -> list[str]:
    footer = header_line(results["header"])
    names = []
    for key, label, fname in (("tokens_per_s", "aggregate generated tokens/s", "serve_throughput.png"),
                              ("ttft_p50_s", "time to first token p50 (s)", "serve_ttft.png"),
                              ("itl_p50_s", "inter-token latency p50 (s)", "serve_itl.png")):
        series = {}
        for p in results["throughput"]:
            series.setdefault(f"{p['model']} H={p['history']}", []).append((p["clients"], p[key]))
        for p in results.get("conversations") or []:
            series.setdefault(f"{p['model']} H={p['history']} next turn", []).append((p["clients"], p[key]))
        plot_lines(out / fname, f"samout serve: {label}", "concurrent clients", label, series, footer,
                   logy=key != "tokens_per_s")
        names.append(fname)
    series = {}
    for p in results["follow_up"]:
        series.setdefault(f"{p['model']} cache hit", []).append((p["history"], p["ttft_hit_s"]))
        series.setdefault(f"{p['model']} cache miss", []).append((p["history"], p["ttft_miss_s"]))
    plot_lines(out / "serve_follow_up.png", "follow-up turn: time to first token", "history (tokens)",
               "seconds", series, footer, logy=True)
    names.append("serve_follow_up.png")
    return names


def per_session_bytes(points: list[dict], key: str = "rss_growth_bytes") -> float | None:
    """Least-squares slope of an RSS growth (`key`) over the number of clients: what one
    more session costs the server (points of one model and history)."""
    points = [p for p in points if p.get(key) is not None]
    if len({p["clients"] for p in points}) < 2:
        return None
    n = np.array([p["clients"] for p in points], dtype=float)
    growth = np.array([p[key] for p in points], dtype=float)
    return float(np.polyfit(n, growth, 1)[0])


def _table(points: list[dict]) -> list[str]:
    lines = [f"{'model':<12} {'H':>6} {'N':>4} {'tok/s':>9} {'ttft p50':>9} {'ttft p95':>9} "
             f"{'itl p50':>9} {'itl p95':>9} {'peak RSS MiB':>12} {'RSS +MiB':>9} {'state B/session':>15}"]
    for p in points:
        def f(x, scale=1.0, fmt="{:9.4f}"):
            return fmt.format(x * scale) if x is not None else f"{'-':>9}"
        rate = f(p["tokens_per_s"], fmt="{:9.1f}")
        lines.append(f"{p['model']:<12} {p['history']:>6} {p['clients']:>4} {rate} "
                     f"{f(p['ttft_p50_s'])} {f(p['ttft_p95_s'])} {f(p['itl_p50_s'])} {f(p['itl_p95_s'])} "
                     f"{p['peak_rss_bytes'] / 2**20:12.1f} {p['rss_growth_bytes'] / 2**20:9.1f} "
                     f"{p['state_bytes_per_session'] or 0:15.0f}")
    return lines


def _summary(points: list[dict]) -> list[str]:
    """Tokens/s against one client, bytes per session, and SamOut against the Transformer."""
    lines = []
    by = {(p["model"], p["history"], p["clients"]): p for p in points}
    clients = sorted({p["clients"] for p in points})
    histories = sorted({p["history"] for p in points})
    for model in MODELS:
        for h in histories:
            one = by.get((model, h, clients[0]))
            ratios = [f"{n}: {by[(model, h, n)]['tokens_per_s'] / one['tokens_per_s']:.1f}x"
                      for n in clients[1:] if one and (model, h, n) in by]
            if ratios:
                lines.append(f"{model} H={h}: tokens/s against {clients[0]} client(s): " + ", ".join(ratios))
    for model in MODELS:
        for h in histories:
            group = [p for p in points if p["model"] == model and p["history"] == h]
            kib = {key: (f"{slope / 1024:+,.1f} KiB" if slope is not None else "-")
                   for key in ("rss_growth_bytes", "decode_rss_growth_bytes", "decode_heap_growth_bytes",
                               "held_heap_growth_bytes")
                   for slope in [per_session_bytes(group, key)]}
            state = max((p["state_bytes_per_session"] or 0 for p in group), default=0)
            if kib["rss_growth_bytes"] != "-" and state:
                lines.append(f"{model} H={h}: per session (slope over {clients[0]}-{clients[-1]} clients): "
                             f"peak RSS {kib['rss_growth_bytes']}, RSS while all decode "
                             f"{kib['decode_rss_growth_bytes']}, heap in use while all decode "
                             f"{kib['decode_heap_growth_bytes']}, heap kept after the request "
                             f"{kib['held_heap_growth_bytes']}; state {state / 1024:,.1f} KiB")
    for h in histories:
        for n in clients:
            a, b = by.get(("samout", h, n)), by.get(("transformer", h, n))
            if a and b:
                lines.append(f"H={h} N={n}: SamOut/Transformer tokens/s = "
                             f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x")
    return lines


def format_serve(results: dict) -> str:
    lines = [f"samout bench serve — {header_line(results['header'])}",
             f"command: {results['header']['command']}",
             f"transformer: the {results['settings'].get('baseline', 'seed-004')} baseline", "",
             "new histories (the server has not seen them; state cache off)"]
    lines += _table(results["throughput"]) + [""] + _summary(results["throughput"])
    conversations = results.get("conversations") or []
    if conversations:
        lines += ["", "next turn of a conversation (its history cached; the turn adds "
                      f"{results['settings']['follow_up_tokens']} tokens)"]
        lines += _table(conversations) + [""] + _summary(conversations)
    lines.append("")
    lines.append("follow-up turn (time to first token, median): cache hit vs miss")
    for p in results["follow_up"]:
        lines.append(f"  {p['model']:<12} H={p['history']:>6}: hit {p['ttft_hit_s']:.4f} s "
                     f"({p['cached_tokens_hit']} cached tokens), miss {p['ttft_miss_s']:.4f} s")
    return "\n".join(lines)
