"""One module per `samout` subcommand; see samout/cli.py."""
