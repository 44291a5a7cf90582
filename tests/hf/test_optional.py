"""samout works without transformers; `import samout` never imports it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

BLOCK_TRANSFORMERS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Block())
"""


def test_samout_imports_and_runs_without_transformers():
    code = BLOCK_TRANSFORMERS + """
import warnings
warnings.simplefilter("error")
import torch, samout
model = samout.SamOut(samout.SamOutConfig.from_preset("tiny"))
logits, state = model(torch.zeros(1, 3, dtype=torch.long))
assert "transformers" not in sys.modules
try:
    import samout.hf
except ModuleNotFoundError as err:
    assert err.name == "transformers", err
else:
    raise AssertionError("samout.hf imported without transformers")
print("ok", tuple(logits.shape))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "(1,", "3,", "512)"]
