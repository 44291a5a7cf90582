"""The code stays `ruff` clean and free of import cycles: checked in CI like any other test."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: it is part of the dev extra"
    result = subprocess.run(
        [ruff, "check", "--output-format", "concise", "samout", "tests"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_import_cycles():
    """Every import statement counts, lazy ones inside functions included (`make lint`)."""
    result = subprocess.run([sys.executable, "scripts/check_import_cycles.py"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith(", 0 import cycles")
