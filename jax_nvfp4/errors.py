"""Exceptions shared by the CLI and its commands (here so that neither imports the other)."""

from __future__ import annotations

import signal


class UserError(Exception):
    """An error the user can act on: printed without a traceback, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """A terminating signal (SIGTERM, SIGHUP) turned into an exception: exit 128 + signum."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
