"""The `samout` command line: one module per subcommand under `samout/commands/`.

Each command module defines `register(subparsers)`, which adds its parser and sets
`func` to a `run(args) -> int`. Errors the user can fix (SamoutError, a bad config,
a missing file) become one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from samout import __version__
from samout.errors import SamoutError

# Subcommands, in the order `samout --help` lists them.
COMMANDS = ["prepare", "train", "generate", "chat", "chat-eval", "eval", "serve", "bench", "export",
            "convert"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samout",
        description="Train and run SamOut language models (softmax-free, fixed-size state).",
    )
    parser.add_argument("--version", action="version", version=f"samout {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"samout.commands.{name.replace('-', '_')}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (SamoutError, ValueError, OSError) as err:
        # OSError covers missing/unreadable/unwritable files; ValueError bad configs.
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"samout {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"samout {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
