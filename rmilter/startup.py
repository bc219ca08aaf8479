"""Start-up failures: one line, exit status 69 (SPEC §8.1; issue 13 item 4, issue 18 item 9).

A listener that cannot be opened, a pid file that is locked, a user that cannot be switched to:
the administrator gets one line naming the directive, where it was set and the OS error, and
the process exits with ``EX_UNAVAILABLE`` instead of printing a traceback.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Optional, Tuple

from rmilter import config as rconfig
from rmilter.log import Logger

if TYPE_CHECKING:
    from rmilter.config.schema import Config
    from rmilter.dkim.keys import Keyring

log = Logger(namespace="rmilter.service")

#: exit status when the listener or the pid file cannot be set up (SPEC §8.1)
EX_UNAVAILABLE = 69


class StartupError(Exception):
    """The service cannot start (listener, pid file, privileges); carries the exit status."""

    def __init__(self, message: str, status: int = EX_UNAVAILABLE) -> None:
        super().__init__(message)
        self.status = status


def os_reason(error: BaseException) -> str:
    """``No such file or directory``, not ``[Errno 2] No such file or directory: '/x'``."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    reason = getattr(error, "socketError", None)  # twisted's CannotListenError
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    if reason is not None:
        return str(reason)
    return str(error) or error.__class__.__name__


def fail(error: StartupError, stream: Optional[object] = None) -> "NoReturn":  # type: ignore[name-defined]
    """Log the one line, write it to stderr (twistd may have sent the log to a file), and exit.

    Called from ``privilegedStartService`` under twistd, where an exception would end in a
    traceback and exit status 1.
    """
    text = "rmilter: %s; not starting" % (error,)
    log.critical("{text}", text=text)
    out: Any = stream if stream is not None else sys.__stderr__
    try:
        out.write(text + "\n")
        out.flush()
    except (OSError, ValueError, AttributeError):
        pass
    raise SystemExit(error.status)


def load_configuration(path: Optional[str]) -> Tuple["Config", Optional["Keyring"]]:
    """The configuration file (or the embedded default) and its DKIM keys: the one place both are read.

    Blocking (files, DNS for host names in IP lists, key files): at start, or in a thread on
    reload.  Raises ``ConfigError`` with ``FILE:LINE: reason`` lines, key files included.
    """
    from rmilter.dkim.keys import KeyringError, load_keyring

    config = rconfig.load(path) if path else rconfig.default()
    try:
        keyring = load_keyring(config.dkim, config.origins)
    except KeyringError as e:
        raise rconfig.ConfigError(e.errors) from None
    return config, keyring


def load_for_reload(path: Optional[str]) -> Tuple["Config", Optional["Keyring"]]:
    """``load_configuration`` plus what this process cannot take without a restart (TLS when it
    started without it: ``rmilter.tls_stack``); raises ``ConfigError`` for both."""
    from rmilter import tls_stack

    config, keyring = load_configuration(path)
    problem = tls_stack.reload_problem(config)
    if problem:
        raise rconfig.ConfigError(problem)
    return config, keyring
