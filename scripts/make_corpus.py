"""Write a large, seeded, English-like text corpus for measuring `samout prepare`.

    python scripts/make_corpus.py OUT_DIR --mb 200 [--file-mb 5] [--seed 0]

Files `part-00000.txt`, ... of about --file-mb MB each (the last one smaller), totalling
--mb MB (10^6 bytes). Each file is chapters of the built-in corpora (the King James Bible
and Shakespeare, shipped with samout) in a seeded random order, each chapter with a seeded
word substitution (common words swapped for others), so the text does not repeat exactly
and the tokenizer sees realistic, varied input. The same arguments give the same bytes.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path


def base_texts() -> list[str]:
    from samout.data.sources import BUILTIN_CORPORA

    texts = []
    for name in ("kjv", "shakespeare"):
        texts.extend(BUILTIN_CORPORA[name]()[0])
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory (created)")
    parser.add_argument("--mb", type=float, required=True, help="total size in MB (10^6 bytes)")
    parser.add_argument("--file-mb", type=float, default=5.0, help="size of each file in MB")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    texts = base_texts()
    words = sorted({w for t in texts[:200] for w in re.findall(r"[a-z]{3,}", t)})
    common = sorted(words, key=lambda w: (-sum(t.count(w) for t in texts[:20]), w))[:300]
    pattern = re.compile(r"\b(" + "|".join(common) + r")\b")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    total, target, file_target, index = 0, int(args.mb * 1e6), int(args.file_mb * 1e6), 0
    while total < target:
        size = min(file_target, target - total)
        parts, written = [], 0
        while written < size:
            swap = dict(zip(common, rng.sample(words, len(common))))
            text = pattern.sub(lambda m, swap=swap: swap[m.group(0)], rng.choice(texts)) + "\n\n"
            data = text.encode("utf-8")
            if written + len(data) > size:
                cut = text.encode("utf-8")[:size - written].decode("utf-8", "ignore")
                data = cut.encode("utf-8")
            parts.append(data)
            written += len(data)
        (out / f"part-{index:05d}.txt").write_bytes(b"".join(parts))
        total += written
        index += 1
    print(f"wrote {index} files, {total:,} bytes, to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
