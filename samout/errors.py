"""User-facing errors. The CLI prints these as one line and exits non-zero."""


class SamoutError(Exception):
    """Bad input from the user (a file, a flag, a config): say what and how to fix it."""
