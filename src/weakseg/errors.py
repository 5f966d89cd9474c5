"""User-facing errors.

Anything a user can cause (a missing folder, a wrong band count, a checkpoint from another configuration)
raises :class:`WeaksegError`. The CLI catches it, prints ``error: <message>`` and exits with status 2, so a
user mistake never ends in a bare traceback. Programming errors keep their tracebacks.
"""

from __future__ import annotations


class WeaksegError(Exception):
    """An error caused by input or configuration, with a message that names the file or setting."""


class DataError(WeaksegError):
    """A dataset file or folder is missing, unreadable or malformed."""


class ConfigError(WeaksegError):
    """A setting is invalid or inconsistent with the data or a checkpoint."""
