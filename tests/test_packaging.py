"""pyproject.toml builds its metadata without deprecation warnings (the license is an SPDX string)."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_metadata_builds_without_a_license_warning(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    (src / "samout").mkdir()
    (src / "samout" / "__init__.py").write_text("")
    code = ("from setuptools import build_meta; import sys; "
            f"print(build_meta.prepare_metadata_for_build_wheel({str(tmp_path / 'meta')!r}))")
    (tmp_path / "meta").mkdir()
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=src, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "license" not in done.stderr.lower(), done.stderr
    metadata = (tmp_path / "meta" / done.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: MIT" in metadata
