"""rmilter's loggers: twisted.logger, with debug events dropped at the source unless asked for.

twistd's log observer formats every event it gets, debug included; a per-connection debug
event costs more than the milter step it describes.  Every rmilter module takes its
``Logger`` from here, so ``twistd rmilter --debug`` is the one switch.
"""
from __future__ import annotations

from typing import Any, Optional

from twisted.logger import Logger as _TwistedLogger
from twisted.logger import LogLevel

_debug = False


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
        super().emit(level, format, **kwargs)


#: syslog severities of the levels (LOG_CRIT, LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG)
_SYSLOG_PRIORITY = {LogLevel.critical: 2, LogLevel.error: 3, LogLevel.warn: 4, LogLevel.info: 6,
                    LogLevel.debug: 7}
