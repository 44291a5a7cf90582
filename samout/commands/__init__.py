"""One module per `samout` subcommand; see samout/cli.py."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help where there is a default worth stating: not
    for None or False, nor where the help already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False) or "default" in help_text:
            return help_text
        return super()._get_help_string(action)
