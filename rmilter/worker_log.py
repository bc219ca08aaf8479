"""Workers' log lines go straight where the main process logs, tagged ``worker K`` (issue 15).

Relaying every worker line through the main process cost it about 80 µs of CPU per message
(a read, a parse, a re-format and a write of each summary line), a third of a core at 4000
messages a second.  Instead the main process finds its own log destination (the observer
twistd gave it) and tells each worker to write there itself:

- a text log file (``--logfile``): each worker opens the file ``O_APPEND`` and writes each event
  as one ``write`` (whole lines, never interleaved); the main process's own ``LogFile`` is
  switched to ``O_APPEND`` too, so its lines never overwrite a worker's.  A worker reopens the
  path when its inode changes (the main process rotated it, or logrotate did);
- standard output (``-n`` without ``--logfile``, ``--logfile=-``): the worker's descriptor 1 *is*
  the main process's (one ``write`` per event: whole lines on a pipe, a tty or a file);
- ``--logger=rmilter.logs.syslog``: each worker its own ``/dev/log`` socket;
- ``--logger=rmilter.logs.json`` with ``RMILTER_JSON_LOG``: the same file, ``O_APPEND``, each
  event with ``"worker": K``.

Anything else (``--syslog``, another ``--logger``) is relayed by the main process as before.
The destination is passed as ``RMILTER_WORKER_LOG`` (``text-fd:1``, ``text-file:PATH``,
``json-file:PATH``, ``json-fd:1``, ``syslog:PATH``) with ``RMILTER_WORKER_NUMBER``, and the
worker runs ``twistd --logger=rmilter.worker_log.observer``.
"""
from __future__ import annotations

import fcntl
import os
import time
from typing import Any, Callable, Dict, Optional

from twisted.logger import ILogObserver, eventAsJSON, formatEvent, formatEventAsClassicLogText, globalLogPublisher
from zope.interface import implementer  # type: ignore[import-untyped]

from rmilter import logs

ENV_DESTINATION = "RMILTER_WORKER_LOG"
ENV_NUMBER = "RMILTER_WORKER_NUMBER"
#: how often a worker checks that its log file is still the one at the path
REOPEN_CHECK = 1.0


def main_destination(publisher: Any = globalLogPublisher) -> Optional[str]:
    """Where the main process logs, as a ``RMILTER_WORKER_LOG`` value (None: relay).

    Read from the observers twistd installed; for a text log file, the main process's own
    file is switched to ``O_APPEND`` (twistd opens it ``r+`` and seeks: its writes would land
    at its own offset, over lines the workers appended).
    """
    for observer in list(getattr(publisher, "_observers", ())):
        observer = getattr(observer, "legacyObserver", observer)  # twistd wraps what is not ILogObserver
        if isinstance(observer, logs.SyslogObserver):
            return "syslog:" + observer.path
        json_path = getattr(observer, "rmilter_json_path", None)
        if json_path is not None:
            return ("json-file:" + os.path.abspath(json_path)) if json_path else "json-fd:1"
        out = getattr(observer, "_outFile", None)
        if out is None:
            continue
        path = getattr(out, "path", None)
        if path is not None and hasattr(out, "_openFile"):  # twisted.python.logfile.LogFile
            _append_only(out)
            return "text-file:" + os.path.abspath(path)
        try:
            if out.fileno() == 1:
                return "text-fd:1"
        except (AttributeError, OSError, ValueError):
            continue
    return None


#: the main process's twistd ``LogFile`` once workers write to it too (see ``rotate_if_due``)
_shared_logfile: Any = None


def rotate_if_due() -> None:
    """Called once a second by the main process: rotate the shared log file by its real size.

    twistd's ``LogFile`` counts only its own writes towards ``rotateLength`` (1 MB); with the
    workers writing most of the lines it would never rotate.  Workers follow within a second
    (they reopen the path when its inode changes).
    """
    logfile = _shared_logfile
    if logfile is not None and logfile.shouldRotate():
        logfile.rotate()


def _append_only(logfile: Any) -> None:
    """Make a twistd ``LogFile`` write ``O_APPEND``, now and after each rotation, and judge
    its rotation by the file's real size."""
    global _shared_logfile
    _shared_logfile = logfile
    def set_append() -> None:
        fd = logfile._file.fileno()
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)

    if getattr(logfile, "_rmilter_append", False):
        return
    opened = logfile._openFile

    def reopen() -> None:
        opened()
        set_append()

    def should_rotate() -> bool:
        length = logfile.rotateLength
        return bool(length) and os.fstat(logfile._file.fileno()).st_size >= length

    logfile._openFile = reopen
    logfile.shouldRotate = should_rotate
    logfile._rmilter_append = True
    set_append()


class _Output:
    """One descriptor, one ``write`` per event; a path is reopened when it was rotated away."""

    def __init__(self, fd: Optional[int] = None, path: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.clock = clock
        self.checked = clock()
        self.fd = fd if fd is not None else self._open()

    def _open(self) -> int:
        assert self.path is not None
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, data: bytes) -> None:
        if self.path is not None and self.clock() - self.checked >= REOPEN_CHECK:
            self.checked = self.clock()
            try:
                current = os.stat(self.path).st_ino
            except OSError:
                current = -1
            if current != os.fstat(self.fd).st_ino:
                os.close(self.fd)
                self.fd = self._open()
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # a full disk or a closed pipe must not stop the mail


@implementer(ILogObserver)
class WorkerLogObserver:
    """A worker's observer: the main process's format, each event tagged ``worker K``."""

    def __init__(self, destination: str, number: int) -> None:
        kind, _, where = destination.partition(":")
        self.kind = kind
        self.tag = "worker %d: " % number
        self.number = number
        self.syslog: Optional[logs.SyslogObserver] = None
        self.output: Optional[_Output] = None
        if kind == "syslog":
            self.syslog = logs.SyslogObserver(where)
        elif where.startswith("/"):
            self.output = _Output(path=where)
        else:
            self.output = _Output(fd=int(where or "1"))

    def __call__(self, event: Dict[str, Any]) -> None:
        if self.syslog is not None:
            text = formatEvent(event)
            failure = event.get("log_failure")
            if failure is not None:
                text = "%s: %s" % (text, failure.getErrorMessage())
            if text:
                tagged = "\n".join(self.tag + line for line in text.splitlines())
                self.syslog({"log_format": "{text}", "text": tagged, "log_level": event.get("log_level"),
                             "isError": event.get("isError")})
            return
        assert self.output is not None
        if self.kind.startswith("json"):
            event = dict(event, worker=self.number)
            self.output.write((eventAsJSON(event) + "\n").encode("utf-8"))
            return
        line = formatEventAsClassicLogText(event)
        if not line:
            return
        cut = line.find("] ")  # "STAMP [namespace#level] text": the tag goes before the text
        line = line[:cut + 2] + self.tag + line[cut + 2:] if cut >= 0 else self.tag + line
        self.output.write(line.encode("utf-8", "replace"))


def observer() -> WorkerLogObserver:
    """``twistd --logger=rmilter.worker_log.observer`` (in a worker, from the main's environment)."""
    return WorkerLogObserver(os.environ.get(ENV_DESTINATION, "text-fd:1"), int(os.environ.get(ENV_NUMBER, "0")))
