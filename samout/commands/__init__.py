"""One module per `samout` subcommand; see samout/cli.py."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help where there is a default worth stating: not
    for None or False, nor where the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        # `is`, not `in`: a default of 0 (== False) is worth stating.
        if action.default is None or action.default is False or "default" in help_text:
            return help_text
        return super()._get_help_string(action)


def add_command(subparsers, name: str, summary: str, description: str,
                formatter_class: type[argparse.HelpFormatter] = DefaultsHelpFormatter,
                ) -> argparse.ArgumentParser:
    """A subcommand's parser: `summary` is its line in `samout --help`, `description` heads its
    own --help, and every command states its defaults the same way (DefaultsHelpFormatter)."""
    return subparsers.add_parser(name, help=summary, description=description, formatter_class=formatter_class)
