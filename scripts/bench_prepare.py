"""Measure `samout prepare` against the tokenizer's own speed on the same machine.

    python scripts/bench_prepare.py CORPUS_DIR --tokenizer tokenizer.json --out DATA_DIR \
        [--workers N] [--samout-path DIR] [--old-cli]

1. The limit: the `tokenizers` library alone, ids only, `--workers` processes (one thread
   each), each encoding its share of the files of CORPUS_DIR, each file cut after a line
   break about every 2^20 characters, with encode_batch_fast.
2. `samout prepare CORPUS_DIR --tokenizer ... --workers N --quiet` under /usr/bin/time -v
   (wall time, the largest single process's peak RSS), sampling the summed PSS (proportional
   set size: shared pages counted once, split between the processes sharing them) of the
   process and its worker children every 0.2 s: the whole tree's peak memory.

Prints one JSON line: bytes, limit MB/s, prepare wall s, MB/s, the fraction of the limit,
peak RSS. `--samout-path` runs another checkout's samout (PYTHONPATH); `--old-cli` leaves
out the options the code before shards did not have (--workers).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

_TOK = None


def _init(path: str) -> None:
    global _TOK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer
    _TOK = Tokenizer.from_file(path)


def _lines_pieces(text: str, size: int = 1 << 20) -> list[str]:
    """`text` cut after a line break about every `size` characters (one 5 MB string is
    several times slower to encode than its pieces)."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def _encode_files(files: list[str]) -> int:
    tokens = 0
    for name in files:
        text = Path(name).read_text(encoding="utf-8")
        encodings = _TOK.encode_batch_fast(_lines_pieces(text), add_special_tokens=False)
        tokens += sum(len(e.ids) for e in encodings)
    return tokens


def tokenizer_limit(files: list[Path], tokenizer: str, workers: int) -> tuple[float, int]:
    """(seconds, tokens) for `workers` processes encoding `files` between them."""
    shares = [[str(f) for f in files[i::workers]] for i in range(workers)]
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    with multiprocessing.get_context("fork").Pool(workers, initializer=_init, initargs=(tokenizer,)) as pool:
        start = time.perf_counter()
        tokens = sum(pool.map(_encode_files, shares, chunksize=1))
        return time.perf_counter() - start, tokens


def run_prepare(cmd: list[str], env: dict) -> dict:
    proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            total = 0
            try:
                for p in root.children(recursive=True):
                    total += p.memory_full_info().pss
            except psutil.Error:
                pass
            peak[0] = max(peak[0], total)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode:
        sys.exit(f"prepare failed ({proc.returncode}):\n{err[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", err).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    max_rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)) * 1024
    return {"wall_s": round(seconds, 1), "max_rss_process_mb": round(max_rss / 2**20),
            "peak_pss_tree_mb": round(peak[0] / 2**20)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus")
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--samout-path", default=str(Path(__file__).resolve().parent.parent))
    parser.add_argument("--old-cli", action="store_true")
    parser.add_argument("--skip-limit", action="store_true", help="do not measure the tokenizer limit")
    args = parser.parse_args(argv)
    files = sorted(p for p in Path(args.corpus).rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    result: dict = {"corpus_mb": round(size / 1e6, 1), "files": len(files), "workers": args.workers}
    if not args.skip_limit:
        seconds, tokens = tokenizer_limit(files, args.tokenizer, args.workers)
        result.update(limit_s=round(seconds, 1), limit_mb_s=round(size / 1e6 / seconds, 2), tokens=tokens)
    cmd = [sys.executable, "-m", "samout", "prepare", args.corpus, "--tokenizer", args.tokenizer,
           "--out", args.out, "--quiet"]
    if not args.old_cli:
        cmd += ["--workers", str(args.workers)]
    env = {**os.environ, "PYTHONPATH": args.samout_path}
    result.update(run_prepare(cmd, env))
    result["prepare_mb_s"] = round(size / 1e6 / result["wall_s"], 2)
    if "limit_mb_s" in result:
        result["fraction_of_limit"] = round(result["prepare_mb_s"] / result["limit_mb_s"], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
