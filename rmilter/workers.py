"""Worker processes (``workers = N``): every core serves mail, the main process only supervises.

The pattern Twisted documents for sharing a listener between processes: the main process binds
every listener itself (so socket ownership, mode and the pid file are handled once, before
privileges are dropped), stops reading from them, and starts N workers with the listening
descriptors passed as child fds; each worker is an ordinary single-process rmilter
(``twistd rmilter --worker K``) that adopts them (``--listen adopted-fd:N``), so the kernel hands
each new MTA connection to one of them.

Supervision: a worker that dies is logged and restarted with a growing delay (1 s doubling up to
30 s, back to 1 s once a worker has lived a minute).  SIGHUP/SIGUSR1 in the main process first
loads the configuration there: a broken file is refused once, with its ``FILE:LINE`` lines, and
no worker sees the signal; a good one is passed to every worker, which reloads it as a single
process does.  SIGTERM (twistd's stop) is passed on and the main process waits up to
``shutdown_timeout`` (plus a grace of 5 s) for the workers to drain, then kills what is left.
A worker's log lines reach the main process's log, tagged ``worker K``.
"""
from __future__ import annotations

import os
import re
import signal
import sys
from typing import Any, Dict, List, Optional, Sequence

from twisted.application import service
from twisted.internet import defer, endpoints, protocol, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure

from rmilter import config as rconfig
from rmilter.config.schema import DEFAULT_BIND_SOCKET, Config
from rmilter.log import Logger

log = Logger(namespace="rmilter.workers")

#: restart delays of a dying worker, seconds
FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
#: a worker that lived this long restarts after FIRST_RESTART_DELAY again
STABLE_AFTER = 60.0
#: beyond shutdown_timeout, how long the main process waits before SIGKILL
KILL_GRACE = 5.0
#: the twistd log prefix (time stamp) of a worker's line, dropped when the line is relayed
#: the line a worker logs once it listens, after its signal handlers are installed
_READY = re.compile(r"\[rmilter\.service#info\] rmilter \S+ listening on ")
_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} ")


def worker_count(configured: int) -> int:
    """``workers = auto`` (0) is one per core."""
    return configured if configured > 0 else (os.cpu_count() or 1)


class _NoConnections(protocol.Factory):
    """The factory of the main process's listeners: they never accept (reading is stopped)."""

    noisy = False

    def buildProtocol(self, addr: Any) -> None:
        return None


class WorkerProcess(protocol.ProcessProtocol):
    """One worker: relays its log lines and tells the supervisor when it ends."""

    def __init__(self, supervisor: "WorkerSupervisor", number: int) -> None:
        self.supervisor = supervisor
        self.number = number
        self.started_at = supervisor.reactor.seconds()
        self.ended: Deferred = Deferred()
        self._partial = b""
        #: set when the process is started (the transport forgets it once the process ended)
        self.pid: Optional[int] = None
        #: the worker listens and has its signal handlers (a SIGHUP before that would kill it)
        self.ready = False
        #: a reload was asked for while the worker was starting: sent once it is ready
        self.reload_pending = False

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._relay(line)

    errReceived = outReceived

    def _relay(self, raw: bytes) -> None:
        text = _STAMP.sub("", raw.decode("utf-8", "replace").rstrip("\r"))
        if text:
            log.info("worker {worker}: {line}", worker=self.number, line=text)
            if not self.ready and _READY.search(text):
                self.ready = True
                if self.reload_pending:
                    self.reload_pending = False
                    self.signal(signal.SIGHUP)

    def reload(self) -> None:
        """SIGHUP now, or as soon as the worker has its handlers."""
        if self.ready:
            self.signal(signal.SIGHUP)
        else:
            self.reload_pending = True

    def signal(self, signum: int) -> None:
        try:
            self.transport.signalProcess(signum)  # type: ignore[union-attr,call-arg,misc]
        except Exception:  # already gone: processEnded follows
            pass

    def processEnded(self, reason: Failure) -> None:
        if self._partial:
            self._relay(self._partial)
            self._partial = b""
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(service.Service):
    """The main process with ``workers = N``: listeners, N workers, signals (see module doc)."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Optional[str],
        listen: Sequence[str] = (),
        reactor: Any = None,
        debug: bool = False,
        install_signals: bool = True,
        python: str = sys.executable,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self.config_path = config_path
        self.cli_listen = tuple(listen)
        self.debug = debug
        self.install_signals = install_signals
        self.python = python
        self.count = worker_count(config.main.workers)
        self.ports: List[Any] = []
        self.listen_endpoints: List[str] = []
        self.workers: Dict[int, WorkerProcess] = {}
        self.restart_delay: Dict[int, float] = {}
        self.restarts = 0
        self.stopping = False
        self.pidfile: Any = None
        self._previous_handlers: Dict[int, Any] = {}
        self._pending_restarts: Dict[int, Any] = {}
        self._reloading = False

    # -- listeners ---------------------------------------------------------------------------
    def _open_listeners(self) -> None:
        from rmilter.service import PidFile, StartupError, _endpoint_for, unix_endpoint, unix_socket_path, with_backlog

        if self.ports:
            return
        main = self.config.main
        if main.pidfile and self.pidfile is None:
            self.pidfile = PidFile(main.pidfile)
            self.pidfile.acquire()
        specs = self.cli_listen or (main.bind_socket or DEFAULT_BIND_SOCKET,)
        for spec in specs:
            endpoint = _endpoint_for(spec)
            path = unix_socket_path(endpoint)
            if path is not None:  # owner, group, mode and the live-socket check as a single process
                server: Any = unix_endpoint(self.reactor, self.config, endpoint, path)
            else:
                server = endpoints.serverFromString(self.reactor, with_backlog(endpoint, main.listen_backlog))
            listening = server.listen(_NoConnections())
            result: List[Any] = []
            listening.addBoth(result.append)
            if not result or isinstance(result[0], Failure):
                why = result[0].getErrorMessage() if result else "did not listen at once"
                raise StartupError("cannot listen on %s: %s" % (endpoint, why))
            port = result[0]
            port.stopReading()  # the workers accept; this process never does
            self.ports.append(port)
            self.listen_endpoints.append(endpoint)

    def privilegedStartService(self) -> None:
        self._open_listeners()
        super().privilegedStartService()

    def startService(self) -> None:
        self._open_listeners()
        super().startService()
        if self.install_signals:
            for signum in (signal.SIGHUP, signal.SIGUSR1):
                self._previous_handlers[signum] = signal.signal(signum, self._on_reload_signal)
        log.info("rmilter main process supervising {count} workers on {endpoints}",
                 count=self.count, endpoints=", ".join(self.listen_endpoints))
        if self.config.main.metrics_socket:
            log.warn("metrics_socket {spec} is not served with workers = {count}: metrics are per process "
                     "and not yet summed across workers; use workers = 1 to have them",
                     spec=self.config.main.metrics_socket, count=self.count)
        for number in range(1, self.count + 1):
            self._spawn(number)

    # -- workers -----------------------------------------------------------------------------
    def _spawn(self, number: int) -> None:
        self._pending_restarts.pop(number, None)
        if self.stopping:
            return
        fds: Dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        listen: List[str] = []
        for i, port in enumerate(self.ports):
            fds[3 + i] = port.fileno()
            listen += ["--listen", "adopted-fd:%d" % (3 + i)]
        args = [self.python, "-c", TWISTD, "-n", "--pidfile=", "--logfile=-", "rmilter",
                "--worker", str(number)] + listen
        if self.config_path:
            args += ["--config", self.config_path]
        if self.debug:
            args.append("--debug")
        worker = WorkerProcess(self, number)
        self.reactor.spawnProcess(worker, self.python, args, env=os.environ.copy(), childFDs=fds)
        self.workers[number] = worker
        log.info("worker {worker} started (pid {pid})", worker=number, pid=worker.pid)

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        status = reason.value
        if self.stopping:
            log.info("worker {worker} (pid {pid}) stopped", worker=worker.number, pid=worker.pid)
            return
        lived = self.reactor.seconds() - worker.started_at
        delay = FIRST_RESTART_DELAY if lived >= STABLE_AFTER else self.restart_delay.get(worker.number, FIRST_RESTART_DELAY)
        self.restart_delay[worker.number] = min(delay * 2, MAX_RESTART_DELAY)
        self.restarts += 1
        log.warn("worker {worker} (pid {pid}) died ({status}) after {lived:.0f} s; restarting in {delay:.0f} s",
                 worker=worker.number, pid=worker.pid, status=status, lived=lived, delay=delay)
        self._pending_restarts[worker.number] = self.reactor.callLater(delay, self._spawn, worker.number)

    # -- reload ------------------------------------------------------------------------------
    def _on_reload_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    @inlineCallbacks
    def reload(self):  # type: ignore[no-untyped-def]
        """Check the file here; only a good one reaches the workers."""
        if self._reloading:
            log.warn("reload requested while a reload is running; ignored")
            return False
        self._reloading = True
        try:
            from rmilter.service import load_configuration

            try:
                config, _keyring = yield threads.deferToThread(load_configuration, self.config_path)
            except rconfig.ConfigError as e:
                log.error("reload failed, workers keep the running configuration:\n{errors}",
                          errors="\n".join(e.errors))
                return False
            if worker_count(config.main.workers) != self.count:
                log.warn("workers = changes need a restart; keeping {count} workers", count=self.count)
            self.config = config
            for worker in list(self.workers.values()):
                worker.reload()
            log.info("configuration {path} checked; reload passed to {count} workers",
                     path=self.config_path, count=len(self.workers))
            return True
        finally:
            self._reloading = False

    # -- stop --------------------------------------------------------------------------------
    def stopService(self) -> Deferred:
        self.stopping = True
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        for call in self._pending_restarts.values():
            if call.active():
                call.cancel()
        self._pending_restarts.clear()
        return self._stop()

    @inlineCallbacks
    def _stop(self):  # type: ignore[no-untyped-def]
        """Workers drain first (they still hold this process's log pipe), then the listeners close."""
        workers = list(self.workers.values())
        for worker in workers:
            worker.signal(signal.SIGTERM)
        if workers:
            waiting = defer.DeferredList([w.ended for w in workers])
            grace = self.config.main.shutdown_timeout + KILL_GRACE
            waiting.addTimeout(grace, self.reactor)
            try:
                yield waiting
            except defer.TimeoutError:
                log.warn("shutdown: workers still running after {timeout} s; killing them", timeout=grace)
                for worker in workers:
                    worker.signal(signal.SIGKILL)
        for port in self.ports:
            try:
                yield defer.maybeDeferred(port.stopListening)
            except OSError:  # a worker's graceful stop already removed the unix socket file
                pass
        self.ports = []
        if self.pidfile is not None:
            self.pidfile.release()
        super().stopService()
        log.info("rmilter stopped")


#: run twistd from the interpreter given (``python -m twisted`` is ``twist``, not ``twistd``)
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
