"""Errors meant for the user: the CLI prints their message on one line and exits non-zero."""

from __future__ import annotations

import logging

_WORKER_PREFIX = "Caught "  # how torch's DataLoader re-makes a worker's exception in the main process


class ZerosegError(Exception):
    """A problem with the user's input or environment, not a bug: no traceback is shown."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker's error reaches the main process re-made from the worker's whole
        # traceback ("Caught InputError in DataLoader worker process 0.\nOriginal Traceback ...
        # pipeline.errors.InputError: MESSAGE"). Keep the worker's one line; log the rest.
        if isinstance(message, str) and message.startswith(_WORKER_PREFIX) and "\nOriginal Traceback" in message:
            logging.getLogger(__name__).debug("%s", message)
            message = message.rstrip().rsplit("\n", 1)[-1].split(": ", 1)[-1]
        super().__init__(message)


class ConfigError(ZerosegError):
    """A params file or override that does not fit the typed configuration."""


class InputError(ZerosegError):
    """A missing or malformed input (image source, store path, checkpoint)."""
