"""Issue 23's attacks on `samout serve`, each measured against a real server process: the
answer's status, the attack's wall time, /health's latency while it runs (a probe every
50 ms), and the server's RSS before and at its peak (/proc/PID/status). docs/serving.md,
"What the limits stop", shows the figures, before and after the hardening.

    python scripts/serve_attacks.py                                  # this checkout
    git worktree add /tmp/before-23 7698cb7
    python scripts/serve_attacks.py --server after=. --server before=/tmp/before-23 \\
        --json attacks.json --markdown attacks.md

Each --server LABEL=CHECKOUT runs `python -m samout serve` from that checkout (PYTHONPATH
set to it), on 127.0.0.1 and a free port, with its defaults (plus --api-key for the keyed
attack): a checkout from before the limits existed simply has none. Every attack gets a
fresh server, so that one's leftovers (a slot still busy, a grown heap) do not count in the
next. The run served is a tiny random SamOut with a chat tokenizer, made here (--run-dir to
serve another). Attacks are capped in time (--stall-seconds, --request-timeout): "open at
45 s" means the server had not closed the connection when we stopped waiting.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
KEY = "attack-key"
PROBE_INTERVAL = 0.05
FOX = "the quick brown fox jumps over the lazy dog. "


@dataclass
class Row:
    attack: str
    server: str
    status: str = ""
    seconds: float | None = None  # the attack request's wall time
    health_median_ms: float | None = None
    health_max_ms: float | None = None
    health_probes: int = 0
    rss_before_mib: float | None = None
    rss_peak_mib: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# -- the server process -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0]) * 1024
    return out


def reset_peak(pid: int) -> bool:
    """Start `pid`'s VmHWM afresh (Linux: clear_refs 5); False where that is not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Server:
    """`python -m samout serve RUN_DIR` from `checkout`, until closed."""

    def __init__(self, python: str, checkout: Path, run_dir: Path, log: Path, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        cmd = [python, "-m", "samout", "serve", str(run_dir), "--name", "tiny", "--host", "127.0.0.1",
               "--port", str(self.port)]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        env.pop("SAMOUT_API_KEY", None)
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start in 180 s; see {log}")
            time.sleep(0.1)
        self.pid = self.proc.pid

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stats(self) -> dict:
        """The engine's counters: /v1/health where it exists, else the old /health."""
        for path in ("/v1/health", "/health"):
            r = httpx.get(self.url + path, headers=self.auth, timeout=60)
            if r.status_code == 200 and "models" in r.json():
                return next(iter(r.json()["models"].values()))
        raise RuntimeError("no health route reports the engine's counters")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:  # still draining a long request: enough
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Watch:
    """While the attack runs: /health probed every 50 ms (each probe waits for the last), and
    the server's RSS sampled."""

    def __init__(self, server: Server, probe: bool = True):
        self.server, self.probe = server, probe
        self.latencies: list[float] = []
        self.rss_samples: list[int] = []
        self.stop = threading.Event()
        self.rss_before = proc_status(server.pid)["VmRSS"]
        self.peak_reset = reset_peak(server.pid)
        self.threads = [threading.Thread(target=self._sample, daemon=True)]
        if probe:
            self.threads.append(threading.Thread(target=self._probe, daemon=True))

    def __enter__(self) -> Watch:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def _probe(self) -> None:
        with httpx.Client(timeout=120) as http:
            while True:  # at least one probe, however short the attack
                start = time.perf_counter()
                try:
                    http.get(self.server.url + "/health")
                except httpx.HTTPError:
                    pass
                self.latencies.append(time.perf_counter() - start)
                if self.stop.wait(PROBE_INTERVAL):
                    break

    def _sample(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(OSError):
                self.rss_samples.append(proc_status(self.server.pid)["VmRSS"])
            self.stop.wait(0.02)

    def fill(self, row: Row) -> Row:
        mib = 2**20
        row.rss_before_mib = round(self.rss_before / mib, 1)
        peak = max(self.rss_samples, default=self.rss_before)
        if self.peak_reset:
            with contextlib.suppress(OSError):
                peak = max(peak, proc_status(self.server.pid)["VmHWM"])
        row.rss_peak_mib = round(peak / mib, 1)
        if self.latencies:
            row.health_median_ms = round(statistics.median(self.latencies) * 1000, 1)
            row.health_max_ms = round(max(self.latencies) * 1000, 1)
            row.health_probes = len(self.latencies)
        return row


# -- requests -----------------------------------------------------------------------------
def post(server: Server, path: str, body: dict | bytes,
         timeout: float) -> tuple[str, float, httpx.Response | None]:
    """(status or what went wrong, seconds, response)."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    start = time.perf_counter()
    try:
        r = httpx.post(server.url + path, content=content, timeout=timeout,
                       headers={"Content-Type": "application/json", **server.auth})
    except httpx.TimeoutException:
        return f"no answer in {timeout:g} s", time.perf_counter() - start, None
    except httpx.HTTPError as err:
        return type(err).__name__, time.perf_counter() - start, None
    return str(r.status_code), time.perf_counter() - start, r


def error_code(r: httpx.Response | None) -> str:
    if r is None or r.status_code < 400:
        return ""
    try:
        error = r.json()["error"]
        if error.get("code"):
            return error["code"]
        return f"param={error['param']}" if error.get("param") else error.get("type", "")
    except (ValueError, KeyError, TypeError):
        return r.text[:60]


def simple(server: Server, body: dict | bytes, timeout: float, path: str = "/v1/completions") -> Row:
    row = Row("", "")
    with Watch(server) as watch:
        row.status, row.seconds, r = post(server, path, body, timeout)
    code = error_code(r)
    if code:
        row.status += f" {code}"
    return watch.fill(row)


def attack_prompt(mb: int):
    def run(server: Server, args) -> Row:
        text = (FOX * (mb * 10**6 // len(FOX) + 1))[:mb * 10**6]
        return simple(server, {"prompt": text, "max_tokens": 1}, args.request_timeout)
    return run


def attack_long_stop(server: Server, args) -> Row:
    body = {"prompt": "Hi", "max_tokens": 20, "ignore_eos": True, "stop": "x" * 400_000}
    return simple(server, body, args.request_timeout)


def attack_slots(server: Server, args) -> Row:
    """320 choices of 300 tokens, and a small request 1 s later: how long does it wait?"""
    body = {"prompt": [[5] * 50] * 40, "n": 8, "max_tokens": 300}
    row, small = Row("", ""), {}

    def small_request():
        time.sleep(1.0)
        status, seconds, _ = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 5},
                                  args.request_timeout)
        small.update(status=status, seconds=seconds)

    thread = threading.Thread(target=small_request)
    with Watch(server) as watch:
        thread.start()
        row.status, row.seconds, r = post(server, "/v1/completions", body, args.request_timeout)
        thread.join(args.request_timeout + 5)
    row.status += f" {error_code(r)}".rstrip()
    row.extra["small_request"] = small
    row.note = f"a small request sent 1 s in: {small.get('status')} in {small.get('seconds', math.nan):.2f} s"
    return watch.fill(row)


def attack_many_prompts(server: Server, args) -> Row:
    return simple(server, {"prompt": ["Hello there"] * 20_000, "max_tokens": 1}, args.request_timeout)


def raw_socket(server: Server, head: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(head)
    return sock


def attack_disconnect(server: Server, args) -> Row:
    """max_tokens 4000, non-streaming; the client leaves after 0.2 s. Tokens generated for
    nobody after that, and the time until the engine is idle again."""
    body = json.dumps({"prompt": "Hi", "max_tokens": 4000, "ignore_eos": True}).encode()
    row = Row("", "")
    with Watch(server) as watch:
        start = time.perf_counter()
        sock = raw_socket(server, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  b"Content-Type: application/json\r\n"
                                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.2)
        at_close = server.stats()["tokens_generated"]  # just before it leaves
        sock.close()
        left = time.perf_counter()
        while True:
            stats = server.stats()
            if stats["active"] == 0 and stats["waiting"] == 0:
                break
            if time.perf_counter() - left > args.request_timeout:
                break
            time.sleep(0.1)  # the old /health is not free: polled harder, it slows the engine
        freed = time.perf_counter() - left
        time.sleep(0.3)
        after = server.stats()["tokens_generated"] - at_close
        row.seconds = time.perf_counter() - start
    busy = stats["active"] + stats["waiting"]
    row.status = "client gone"
    row.note = f"tokens generated after the client left: {after}; " + (
        f"slot free after {freed:.2f} s" if not busy else f"still busy at {freed:.0f} s")
    row.extra.update(tokens_after_disconnect=after, slot_free_seconds=None if busy else freed)
    return watch.fill(row)


def wait_closed(sock: socket.socket, seconds: float) -> tuple[float | None, bytes]:
    """(seconds until the server closed `sock`, or None if still open after `seconds`; what it sent)."""
    start, received = time.monotonic(), b""
    sock.settimeout(seconds)
    try:
        while chunk := sock.recv(4096):
            received += chunk
            sock.settimeout(max(0.01, seconds - (time.monotonic() - start)))
    except TimeoutError:
        return None, received
    except OSError:
        pass
    return time.monotonic() - start, received


def stall(head: bytes):
    def run(server: Server, args) -> Row:
        row = Row("", "")
        with Watch(server) as watch:
            sock = raw_socket(server, head)
            closed, answer = wait_closed(sock, args.stall_seconds)
            sock.close()
        first = answer.split(b"\r\n", 1)[0].decode("latin-1")
        status = first.split(" ")[1] if first.startswith("HTTP/") else "no answer"
        if closed is None:
            row.status, row.seconds = f"{status}, open at {args.stall_seconds:g} s", args.stall_seconds
            row.note = "the connection was still open when the client gave up"
        else:
            row.status, row.seconds = f"{status}, closed", closed
            row.note = f"the server closed the connection after {closed:.1f} s"
        return watch.fill(row)
    return run


def attack_surrogate(server: Server, args) -> Row:
    # json.dumps writes the lone surrogate as the escape \ud800: valid JSON, invalid UTF-8.
    return simple(server, json.dumps({"prompt": "Hi \ud800 there", "max_tokens": 1}).encode(),
                  args.request_timeout)


def attack_string_temperature(server: Server, args) -> Row:
    return simple(server, {"prompt": "Hi", "max_tokens": 1, "temperature": "0.5"}, args.request_timeout)


def attack_keyless_health(server: Server, args) -> Row:
    """With --api-key: two keyless clients loop /health and /health?reset_peaks=true while an
    authorised client times its own small completions (first alone, then under the loops)."""
    row = Row("", "")
    body = {"prompt": "Hi", "max_tokens": 1}

    def authorised(seconds: float) -> list[float]:
        out, end = [], time.monotonic() + seconds
        with httpx.Client(timeout=60, headers=server.auth) as http:
            while time.monotonic() < end:
                start = time.perf_counter()
                r = http.post(server.url + "/v1/completions", json=body)
                assert r.status_code == 200, r.text
                out.append(time.perf_counter() - start)
        return out

    alone = authorised(2.0)
    stop, counts = threading.Event(), {"keyless": 0}

    def keyless(params: dict) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                http.get(server.url + "/health", params=params)
                counts["keyless"] += 1

    loops = [threading.Thread(target=keyless, args=(p,)) for p in ({}, {"reset_peaks": "true"})]
    with Watch(server, probe=False) as watch:
        start = time.perf_counter()
        for t in loops:
            t.start()
        attacked = authorised(args.keyless_seconds)
        stop.set()
        for t in loops:
            t.join(60)
        row.seconds = time.perf_counter() - start
    row.status = "200"
    ms = [x * 1000 for x in attacked]
    row.health_median_ms, row.health_max_ms, row.health_probes = None, None, 0
    row.note = (f"authorised completion: median {statistics.median(alone) * 1000:.1f} ms alone, "
                f"{statistics.median(ms):.1f} ms (max {max(ms):.0f}) under "
                f"{counts['keyless'] / row.seconds:.0f} keyless /health calls/s")
    row.extra.update(authorised_alone_ms=[round(x * 1000, 2) for x in alone], authorised_attacked_ms=ms,
                     keyless_calls=counts["keyless"])
    return watch.fill(row)


ATTACKS = {
    "a1": ("1 MB text prompt", attack_prompt(1), False),
    "a4": ("4 MB text prompt", attack_prompt(4), False),
    "b": ("400,000-char stop string, max_tokens 20", attack_long_stop, False),
    "c": ("40 prompts x n=8, max_tokens 300", attack_slots, False),
    "d": ("20,000 prompts in one request", attack_many_prompts, False),
    "e": ("max_tokens 4000, client leaves at 0.2 s", attack_disconnect, False),
    "f1": ("stalled body (10 of 1000 bytes)",
           stall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"prompt\":"), False),
    "f2": ("half-sent headers",
           stall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le"), False),
    "g": ("lone surrogate in the prompt", attack_surrogate, False),
    "h": ("temperature \"0.5\" (a string)", attack_string_temperature, False),
    "i": ("2 keyless /health loops vs a keyed client", attack_keyless_health, True),
}


# -- the run served -----------------------------------------------------------------------
def make_run(directory: Path) -> Path:
    """A tiny random SamOut with a chat tokenizer (trained on a little Shakespeare)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from samout import SamOut, SamOutConfig
    from samout.chat.template import DEFAULT_CHAT_TEMPLATE
    from samout.data.sources import shakespeare_works
    from samout.tokenizer import TOKENIZER_NAME, train_tokenizer, update_tokenizer_config

    text = shakespeare_works()["sonnets_gut.txt"][:100_000]
    tokenizer = train_tokenizer([text], 400, chat=True)
    torch.manual_seed(0)
    model = SamOut(SamOutConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size())).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    (directory / TOKENIZER_NAME).write_text(tokenizer.to_str())
    update_tokenizer_config(directory, chat_template=DEFAULT_CHAT_TEMPLATE)
    return directory


def describe(checkout: Path) -> dict:
    commit = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"], capture_output=True,
                            text=True).stdout.strip()
    return {"checkout": str(checkout), "commit": commit}


def machine(python: str) -> dict:
    torch = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch}


# -- output -------------------------------------------------------------------------------
def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[Row]) -> str:
    lines = ["| attack | server | status | time (s) | /health median (ms) | /health max (ms) | "
             "RSS before → peak (MiB) | note |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.attack} | {r.server} | {r.status} | {fmt(r.seconds, 2)} | "
                     f"{fmt(r.health_median_ms)} | {fmt(r.health_max_ms)} | "
                     f"{fmt(r.rss_before_mib, 0)} → {fmt(r.rss_peak_mib, 0)} | {r.note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", action="append", metavar="LABEL=CHECKOUT",
                        help="a samout checkout to serve from, under a label (repeatable; default: "
                             "this checkout, as 'current')")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs the servers")
    parser.add_argument("--run-dir", type=Path,
                        help="the run to serve (default: a tiny random one made here)")
    parser.add_argument("--attacks", default=",".join(ATTACKS),
                        help=f"which attacks, comma-separated, of: {', '.join(ATTACKS)}")
    parser.add_argument("--request-timeout", type=float, default=120.0,
                        help="seconds an attack request may take before we stop waiting")
    parser.add_argument("--stall-seconds", type=float, default=45.0,
                        help="seconds a stalled connection is held open before we give up")
    parser.add_argument("--keyless-seconds", type=float, default=5.0,
                        help="seconds the keyless /health loops run")
    parser.add_argument("--repeat", type=int, default=1,
                        help="tries of each attack on each server; the table shows the try of median time")
    parser.add_argument("--json", type=Path, help="write the rows, the machine and the commits here")
    parser.add_argument("--markdown", type=Path, help="write the table here (it is printed anyway)")
    args = parser.parse_args(argv)

    servers = []
    for spec in args.server or [f"current={ROOT}"]:
        label, sep, path = spec.partition("=")
        if not sep:
            parser.error(f"--server takes LABEL=CHECKOUT, got {spec!r}")
        servers.append((label, Path(path).resolve()))
    chosen = [a.strip() for a in args.attacks.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack(s): {', '.join(unknown)}")

    started = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "loadavg": os.getloadavg()}
    commits = {label: describe(checkout) for label, checkout in servers}  # as the servers start
    with tempfile.TemporaryDirectory(prefix="serve-attacks-") as tmp:
        run_dir = args.run_dir or make_run(Path(tmp) / "tiny")
        rows: list[Row] = []
        for name in chosen:
            title, attack, keyed = ATTACKS[name]
            for label, checkout in servers:
                tries = []
                for _ in range(args.repeat):
                    server = Server(args.python, checkout, run_dir, Path(tmp) / f"{label}.log",
                                    api_key=KEY if keyed else None)
                    try:
                        tries.append(attack(server, args))
                    finally:
                        server.close()
                # The try of median time (the machine may be shared: one slow try is noise).
                row = sorted(tries, key=lambda r: r.seconds or 0.0)[len(tries) // 2]
                row.extra["seconds_of_each_try"] = [t.seconds for t in tries]
                row.attack, row.server = f"({name}) {title}", label
                rows.append(row)
                print(f"{row.attack} [{label}]: {row.status} in {fmt(row.seconds, 2)} s; /health median "
                      f"{fmt(row.health_median_ms)} ms, max {fmt(row.health_max_ms)} ms; RSS "
                      f"{fmt(row.rss_before_mib, 0)} -> {fmt(row.rss_peak_mib, 0)} MiB; {row.note}",
                      file=sys.stderr, flush=True)
    table = markdown(rows)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        finished = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "loadavg": os.getloadavg()}
        report = {"machine": machine(args.python), "started": started, "finished": finished,
                  "servers": commits,
                  "rows": [asdict(r) for r in rows]}
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
