"""rmilter's loggers: twisted.logger, with debug events dropped at the source unless asked for.

twistd's log observer formats every event it gets, debug included; a per-connection debug
event costs more than the milter step it describes.  Every rmilter module takes its
``Logger`` from here, so ``twistd rmilter --debug`` is the one switch.
"""
from __future__ import annotations

import re
from typing import Any, Optional

from twisted.logger import Logger as _TwistedLogger
from twisted.logger import LogLevel

_debug = False

#: what may not reach a log line from a field: line ends (log injection), other controls, and
#: lone surrogates (a log file writes UTF-8 and would fail on them)
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")


def _escape(match: "re.Match[str]") -> str:
    ch = match.group()
    return {"\n": "\\n", "\r": "\\r"}.get(ch) or ("\\x%02x" % ord(ch) if ord(ch) < 0x100 else "\\u%04x" % ord(ch))


def log_safe(text: str) -> str:
    """``text`` on one line and encodable: CR, LF, controls and surrogates written as escapes."""
    return _UNSAFE.sub(_escape, text) if _UNSAFE.search(text) else text


def set_debug(enabled: bool) -> None:
    """Emit debug events (``twistd rmilter --debug``)."""
    global _debug
    _debug = enabled


class Logger(_TwistedLogger):
    """A twisted.logger.Logger whose debug events cost nothing while debugging is off."""

    def emit(self, level: LogLevel, format: Optional[str] = None, **kwargs: Any) -> None:
        if level is LogLevel.debug and not _debug:
            return
        # for ``twistd --syslog``: Twisted's syslog observer sends every line as LOG_INFO (errors
        # as LOG_ALERT) unless the event names its priority (issue 13; facility from openlog)
        kwargs.setdefault("syslogPriority", _SYSLOG_PRIORITY.get(level, 6))
        # every text field made one-line and encodable: backends' replies, virus names and
        # peers' words end up in fields, and a CR/LF there forged log lines (issue 18)
        for key, value in kwargs.items():
            if type(value) is str and _UNSAFE.search(value) is not None:
                kwargs[key] = log_safe(value)
        super().emit(level, format, **kwargs)


#: syslog severities of the levels (LOG_CRIT, LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG)
_SYSLOG_PRIORITY = {LogLevel.critical: 2, LogLevel.error: 3, LogLevel.warn: 4, LogLevel.info: 6,
                    LogLevel.debug: 7}
