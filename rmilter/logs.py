"""Log observers an administrator can name on the command line (issue 13, SPEC §8.4).

    twistd --logger=rmilter.logs.syslog rmilter -c /etc/rmilter.conf   # mail.log, real severities
    twistd --logger=rmilter.logs.json rmilter -c /etc/rmilter.conf     # one JSON object per event

``syslog``: RFC 3164 datagrams to ``/dev/log`` (``RMILTER_SYSLOG_SOCKET`` overrides it), facility
``mail``, ident ``syslog_name`` of the configuration with the pid, and the event's own severity
(error is LOG_ERR, warning LOG_WARNING) as the C rmilter logged.  ``json``: Twisted's JSON event
format, every field of the per-message summary event included (``summary_text``, ``queue_id``,
``spam_score`` ...), to the file named by ``RMILTER_JSON_LOG`` (standard output when unset).

twistd creates the observer after ``makeService`` has read the configuration, so the ident is
the configuration's.  ``twistd --syslog`` (Python's syslog module) is also given facility
``mail``, the pid and the severities: see ``rmilter.log`` and ``RmilterService``.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any, Callable, Dict, Optional

from twisted.logger import FileLogObserver, LogLevel, eventAsJSON, formatEvent

#: syslog facility mail (3 << 3 is LOG_DAEMON; mail is 2)
LOG_MAIL = 2 << 3
#: RFC 5424 severities of twisted.logger levels
SEVERITY: Dict[LogLevel, int] = {
    LogLevel.critical: 2,  # LOG_CRIT
    LogLevel.error: 3,  # LOG_ERR
    LogLevel.warn: 4,  # LOG_WARNING
    LogLevel.info: 6,  # LOG_INFO
    LogLevel.debug: 7,  # LOG_DEBUG
}
DEFAULT_SOCKET = "/dev/log"

_ident = "rmilter"


def set_ident(name: str) -> None:
    """``syslog_name`` of the configuration (called by ``makeService``)."""
    global _ident
    _ident = name or "rmilter"


def ident() -> str:
    return _ident


def severity(event: Dict[str, Any]) -> int:
    level = event.get("log_level")
    if level is None and event.get("isError"):
        return 3
    return SEVERITY.get(level, 6)  # type: ignore[arg-type]


class SyslogObserver:
    """Send each event as one datagram per line: ``<PRI>Mmm dd hh:mm:ss ident[pid]: text``."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.sock: Optional[socket.socket] = None

    def _socket(self) -> socket.socket:
        if self.sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.connect(self.path)
            self.sock = sock
        return self.sock

    def __call__(self, event: Dict[str, Any]) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = "%s: %s" % (text, failure.getErrorMessage())
        if not text:
            return
        pri = LOG_MAIL | severity(event)
        stamp = time.strftime("%b %d %H:%M:%S", time.localtime(self.clock()))
        head = "<%d>%s %s[%d]: " % (pri, stamp, _ident, os.getpid())
        for line in text.splitlines():
            if line.strip():
                self._send((head + line).encode("utf-8", "replace"))

    def _send(self, datagram: bytes) -> None:
        try:
            self._socket().send(datagram)
        except OSError:
            # no syslog daemon right now (restart, full queue): drop, reconnect on the next line
            if self.sock is not None:
                self.sock.close()
                self.sock = None


def syslog() -> SyslogObserver:
    """``twistd --logger=rmilter.logs.syslog``."""
    return SyslogObserver(os.environ.get("RMILTER_SYSLOG_SOCKET") or DEFAULT_SOCKET)


def json() -> FileLogObserver:
    """``twistd --logger=rmilter.logs.json``: one JSON object per line (``RMILTER_JSON_LOG``)."""
    path = os.environ.get("RMILTER_JSON_LOG")
    out = open(path, "a", encoding="utf-8", buffering=1) if path and path != "-" else sys.stdout
    observer = FileLogObserver(out, lambda event: eventAsJSON(event) + "\n")
    observer.rmilter_json_path = path if path and path != "-" else ""  # type: ignore[attr-defined]  # workers write there too
    return observer
