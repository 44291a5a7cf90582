"""Register samout with `transformers` without importing it at `import samout`.

Importing transformers' model classes takes seconds, and most samout users never need
them. So `import samout` only installs an import hook: when `transformers` is imported
(later, by anyone) samout's Auto-class registration runs right after it. If transformers
is already imported, or not installed, nothing is deferred.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings


def _register() -> None:
    try:
        import samout.hf

        samout.hf.register()
    except Exception as err:  # never break the user's `import transformers`
        warnings.warn(f"samout could not register with transformers: {err}", stacklevel=2)


class _RegisterAfterLoad(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        for finder in [f for f in sys.meta_path if isinstance(f, _TransformersFinder)]:
            sys.meta_path.remove(finder)  # done: transformers is loaded
        _register()

    def __getattr__(self, name):  # e.g. get_resource_reader, is_package
        return getattr(self.loader, name)


class _TransformersFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        # Find the real spec without us, and stay installed until transformers is really loaded:
        # a mere `importlib.util.find_spec("transformers")` (TRL's availability checks) looks
        # the spec up without loading it.
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterLoad(spec.loader)
        return spec


def install() -> None:
    if sys.modules.get("transformers") is not None:
        _register()
    elif _installed("transformers"):
        if not any(isinstance(f, _TransformersFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _TransformersFinder())


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


install()
