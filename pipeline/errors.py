"""Errors meant for the user: the CLI prints their message on one line and exits non-zero."""


class ZerosegError(Exception):
    """A problem with the user's input or environment, not a bug: no traceback is shown."""


class ConfigError(ZerosegError):
    """A params file or override that does not fit the typed configuration."""


class InputError(ZerosegError):
    """A missing or malformed input (image source, store path, checkpoint)."""
