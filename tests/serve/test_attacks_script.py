"""scripts/serve_attacks.py, the issue 23 attack table's measurement, without running the
attacks (each starts a server and some take a minute: docs/serving.md shows their figures;
test_limits.py and test_hardening.py test each defect)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "serve_attacks.py"


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("serve_attacks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "serve_attacks", module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def test_the_attack_script_explains_itself():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps its lines
    assert "--server LABEL=CHECKOUT" in text and "of: a1, a4, b, c, d, e, f1, f2, g, h, i" in text


def test_the_attack_script_refuses_an_unknown_attack():
    result = subprocess.run([sys.executable, str(SCRIPT), "--attacks", "a1,zz"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "unknown attack(s): zz" in result.stderr


def test_the_table_has_a_row_per_attack_and_server(monkeypatch):
    script = load_script(monkeypatch)
    rows = [script.Row("(a1) 1 MB text prompt", "before", "400", 5.2, 2506.1, 5004.6, 3, 265.0, 504.0),
            script.Row("(a1) 1 MB text prompt", "after", "400", 0.17, None, None, 0, 267.0, 270.0, "n")]
    table = script.markdown(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| (a1) 1 MB text prompt | before | 400 | 5.20 | 2506.1 |")
    assert "| – | – |" in table[3] and "265 → 504" in table[2]
