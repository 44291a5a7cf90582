"""The documentation runs, and its links resolve.

Every ```python and ```bash / ```sh block of README.md, CONTRIBUTING.md and docs/*.md is
executed, in page order, in a fresh working directory per page that holds the paths the
examples use: `data/kjv` (a small prepared data set), `runs/kjv` (a briefly trained tiny run
of it) and `runs/sft` (a tiny chat run). The Python blocks of a page share one namespace (a
page reads as one session); shell blocks run with `bash -e`, the venv's bin first on PATH.

A block that cannot run on a CPU in seconds (it trains for minutes, needs a server or a
download) has a marker on the line before it that says why:

    <!-- doc-test: skip (trains for 10 minutes) -->

Every relative link (and its #anchor, for Markdown targets) must point at something that
exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chat.chat_fixtures import make_chat_run

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python": "python", "bash": "bash", "sh": "bash"}
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!-- doc-test: skip \((?P<why>[^)].*)\) -->$")
SHELL_TIMEOUT_S = 120


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    skip: str | None  # the reason, for a block marked skip

    @property
    def where(self) -> str:
        return f"{rel(self.page)}:{self.line}"


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


def parse_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a page, with their skip markers (checked for misuse)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        line = lines[i]
        if "doc-test:" in line:
            where = f"{rel(page)}:{i + 1}"
            match = MARKER.match(line.strip())
            assert match, f"{where}: a marker reads `<!-- doc-test: skip (why) -->`"
            nxt = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            assert nxt and nxt.group(1) in RUNNABLE, f"{where}: a skip marker must precede a runnable block"
        fence = FENCE.match(line)
        if fence is None:
            i += 1
            continue
        start, language = i, fence.group(1)
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            i += 1
        assert i < len(lines), f"{rel(page)}:{start + 1}: unclosed code block"
        marker = MARKER.match(lines[start - 1].strip()) if start else None
        blocks.append(Block(page, start + 1, language, "\n".join(lines[start + 1:i]) + "\n",
                            marker.group("why") if marker else None))
        i += 1
    return blocks


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("doc-chat") / "sft"
    make_chat_run(path)
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch, prepared_data, trained_run, chat_run) -> Path:
    # Copies, so that an example cannot change what other tests see.
    shutil.copytree(prepared_data, tmp_path / "data" / "kjv")
    shutil.copytree(trained_run, tmp_path / "runs" / "kjv")
    shutil.copytree(chat_run, tmp_path / "runs" / "sft")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def shell_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_block(block: Block, namespace: dict, cwd: Path) -> None:
    if RUNNABLE[block.language] == "python":
        try:
            exec(compile(block.code, block.where, "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{block.where}: the example raised {err!r}\n{block.code}") from err
        return
    result = subprocess.run(["bash", "-e", "-c", block.code], cwd=cwd, env=shell_env(), capture_output=True,
                            text=True, timeout=SHELL_TIMEOUT_S)
    assert result.returncode == 0, (f"{block.where}: exit status {result.returncode}\n{block.code}\n"
                                    f"stdout:\n{result.stdout[-2000:]}\nstderr:\n{result.stderr[-4000:]}")


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_examples_run(page: Path, workdir: Path) -> None:
    blocks = [b for b in parse_blocks(page) if b.language in RUNNABLE]
    namespace: dict = {"__name__": "__doc_example__"}
    for block in blocks:
        if block.skip is None:
            run_block(block, namespace, workdir)


# Links ---------------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose(page: Path) -> list[tuple[int, str]]:
    """(line number, text) of the page's lines outside fenced code blocks, inline code unquoted."""
    out, in_code = [], False
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            out.append((number, re.sub(r"`([^`]*)`", r"\1", line)))
    return out


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as '-', repeats numbered."""
    seen: dict[str, int] = {}
    for _, line in prose(page):
        match = HEADING.match(line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(2).lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            if n:
                seen[f"{slug}-{n}"] = 1
    return set(seen)


def test_every_relative_link_resolves() -> None:
    broken = []
    for page in PAGES:
        for number, line in prose(page):
            for target in LINK.findall(line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
                    continue
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                if not dest.exists():
                    broken.append(f"{rel(page)}:{number}: {target} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    broken.append(f"{rel(page)}:{number}: {target} (no heading with that anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_markers_are_well_formed_and_every_skip_says_why() -> None:
    for page in PAGES:
        for block in parse_blocks(page):
            if block.skip is not None:
                assert block.skip.strip(), f"{block.where}: a skip marker must say why"


def test_a_broken_example_fails(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nfrom samout.chat import NoSuchName\n```\n\n"
                    "<!-- doc-test: skip (never runs) -->\n```bash\nexit 1\n```\n")
    blocks = parse_blocks(page)
    assert [b.skip for b in blocks] == [None, "never runs"]
    with pytest.raises(AssertionError, match="ImportError"):
        run_block(Block(ROOT / "README.md", 3, "python", blocks[0].code, None), {}, tmp_path)
