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
A worker's log lines reach the main process's log destination, tagged ``worker K``: written
there by the worker itself (``rmilter.worker_log``), or relayed by the main process where the
destination cannot be shared.  A worker also stops (draining) when the main process dies: its
stdin is a pipe from the main process, and EOF there is the main process gone.
"""
from __future__ import annotations

import os
import pickle
import re
import signal
import struct
import sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from twisted.application import service
from twisted.internet import defer, endpoints, protocol, stdio, task, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.python.failure import Failure

from rmilter import config as rconfig
from rmilter.config.schema import DEFAULT_BIND_SOCKET, Config
from rmilter.log import Logger

if TYPE_CHECKING:
    from types import ModuleType


def _metrics() -> "ModuleType":
    """rmilter.metrics (and prometheus_client) only once workers run: a single process without
    ``metrics_socket`` never loads them (issue 19: 1.4 MB of the idle floor)."""
    from rmilter import metrics

    return metrics

log = Logger(namespace="rmilter.workers")

#: restart delays of a dying worker, seconds
FIRST_RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
#: a worker that lived this long restarts after FIRST_RESTART_DELAY again
STABLE_AFTER = 60.0
#: beyond shutdown_timeout, how long the main process waits before SIGKILL
KILL_GRACE = 5.0
#: the twistd log prefix (time stamp) of a worker's line, dropped when the line is relayed
#: the worker's end of the control channel: frames to the main process (its stdin is the other way)
CHANNEL_FD = 3
#: the first listening descriptor a worker adopts
FIRST_LISTEN_FD = 4
#: how often a worker sends its metrics unasked (what a SIGKILLed worker can lose at most)
SNAPSHOT_INTERVAL = 1.0
#: how long a scrape of the main process waits for the workers' fresh figures
SCRAPE_WAIT = 2.0
_FRAME = struct.Struct("!cI")
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
        #: the last figures the worker sent ({"metrics": Metrics.snapshot(), "state": state_of()})
        self.snapshot: Optional[Dict[str, Any]] = None
        self._channel = b""
        self._snapshot_waiters: List[Deferred] = []

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            self._relay(line)

    errReceived = outReceived

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != CHANNEL_FD:
            return super().childDataReceived(childFD, data)
        buffer = self._channel + data
        while len(buffer) >= _FRAME.size:
            kind, size = _FRAME.unpack_from(buffer)
            if len(buffer) < _FRAME.size + size:
                break
            payload, buffer = buffer[_FRAME.size:_FRAME.size + size], buffer[_FRAME.size + size:]
            self._frame(kind, payload)
        self._channel = buffer

    def _frame(self, kind: bytes, payload: bytes) -> None:
        if kind == b"R":  # it listens and has its signal handlers
            self.ready = True
            if self.reload_pending:
                self.reload_pending = False
                self.signal(signal.SIGHUP)
        elif kind == b"S":
            self.snapshot = pickle.loads(payload)  # our own child over a private pipe
            waiters, self._snapshot_waiters = self._snapshot_waiters, []
            for waiter in waiters:
                waiter.callback(self.snapshot)

    def fresh_snapshot(self) -> Deferred:
        """Ask the worker for its figures now; fires with them (or never, if it dies first)."""
        waiter: Deferred = Deferred()
        self._snapshot_waiters.append(waiter)
        try:
            self.transport.write(b"s")  # type: ignore[union-attr,call-arg,misc]
        except Exception:
            pass
        return waiter

    def _relay(self, raw: bytes) -> None:
        text = _STAMP.sub("", raw.decode("utf-8", "replace").rstrip("\r"))
        if text:
            log.info("worker {worker}: {line}", worker=self.number, line=text)

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
        waiters, self._snapshot_waiters = self._snapshot_waiters, []
        for waiter in waiters:
            waiter.callback(None)


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
        self._log_rotation: Optional[task.LoopingCall] = None
        #: 1 at start, +1 per reload the main process passed on (what /health and the metrics show)
        self.generation = 1
        self.reloads: Dict[str, int] = {"ok": 0, "failed": 0}
        #: the summed figures of workers that ended (their last snapshot, counted once)
        self.departed: Optional[Dict[str, Any]] = None
        self.metrics: Optional[WorkerMetrics] = None
        self.metrics_port: Any = None
        self.metrics_endpoint: Optional[str] = None
        #: where workers log themselves (``rmilter.worker_log``); None: through this process
        self.log_destination: Optional[str] = None

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
        self._bind_metrics(main.metrics_socket)

    def _bind_metrics(self, spec: Optional[str]) -> None:
        """``metrics_socket`` is served here, with the workers' figures summed (``WorkerMetrics``)."""
        from rmilter import status
        from rmilter.service import StartupError, metrics_endpoint

        if not spec or self.metrics_port is not None:
            return
        endpoint = metrics_endpoint(spec, self.listen_endpoints)
        self.metrics = WorkerMetrics(self)
        site = status.site(self.metrics, self, refresh=self.refresh_metrics)  # type: ignore[arg-type]
        result: List[Any] = []
        endpoints.serverFromString(self.reactor, endpoint).listen(site).addBoth(result.append)
        if not result or isinstance(result[0], Failure):
            why = result[0].getErrorMessage() if result else "did not listen at once"
            raise StartupError("cannot listen on metrics_socket %s: %s" % (spec, why))
        self.metrics_port = result[0]
        self.metrics_endpoint = endpoint

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
        if self.metrics_endpoint is not None:
            log.info("metrics, health and status page of all workers on {endpoint}", endpoint=self.metrics_endpoint)
        from rmilter.worker_log import main_destination

        self.log_destination = main_destination()
        if self.log_destination is not None and self.log_destination.startswith("text-file:"):
            from rmilter.worker_log import rotate_if_due

            self._log_rotation = task.LoopingCall(rotate_if_due)
            self._log_rotation.clock = self.reactor
            self._log_rotation.start(1.0, now=False)
        log.info("workers log {how}", how=("straight to %s" % (self.log_destination,)) if self.log_destination
                 else "through the main process (its log observer is not one a worker can share)")
        for number in range(1, self.count + 1):
            self._spawn(number)

    # -- workers -----------------------------------------------------------------------------
    def _spawn(self, number: int) -> None:
        self._pending_restarts.pop(number, None)
        if self.stopping:
            return
        # 0: the main process's requests (and its death: EOF), 3: the worker's frames back
        fds: Dict[int, Any] = {0: "w", 1: "r", 2: "r", CHANNEL_FD: "r"}
        listen: List[str] = []
        for i, port in enumerate(self.ports):
            fds[FIRST_LISTEN_FD + i] = port.fileno()
            listen += ["--listen", "adopted-fd:%d" % (FIRST_LISTEN_FD + i)]
        env = os.environ.copy()
        if self.log_destination is not None:
            from rmilter.worker_log import ENV_DESTINATION, ENV_NUMBER

            logging = ["--logger=rmilter.worker_log.observer"]
            env[ENV_DESTINATION], env[ENV_NUMBER] = self.log_destination, str(number)
            if self.log_destination.endswith("-fd:1"):
                fds[1] = 1  # this process's own standard output
        else:
            logging = ["--logfile=-"]
        args = [self.python, "-c", TWISTD, "-n", "--pidfile="] + logging + ["rmilter", "--worker", str(number)] + listen
        if self.config_path:
            args += ["--config", self.config_path]
        if self.debug:
            args.append("--debug")
        worker = WorkerProcess(self, number)
        self.reactor.spawnProcess(worker, self.python, args, env=env, childFDs=fds)
        self.workers[number] = worker
        log.info("worker {worker} started (pid {pid})", worker=number, pid=worker.pid)

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        if self.workers.get(worker.number) is worker:
            del self.workers[worker.number]
        if worker.snapshot is not None:  # its counts stay in the sum, once; its gauges leave with it
            before = [self.departed] if self.departed is not None else []
            self.departed = _metrics().Metrics.merge(self.reactor, before + [worker.snapshot["metrics"]]).snapshot()
            worker.snapshot = None
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
            from rmilter.startup import load_for_reload

            try:
                config, _keyring = yield threads.deferToThread(load_for_reload, self.config_path)
            except rconfig.ConfigError as e:
                log.error("reload failed, workers keep the running configuration:\n{errors}",
                          errors="\n".join(e.errors))
                self.reloads["failed"] += 1
                return False
            if worker_count(config.main.workers) != self.count:
                log.warn("workers = changes need a restart; keeping {count} workers", count=self.count)
            if config.main.metrics_socket != self.config.main.metrics_socket:
                log.warn("metrics_socket changes need a restart with workers; keeping {endpoint}",
                         endpoint=self.metrics_endpoint)
            self.config = config
            self.generation += 1
            self.reloads["ok"] += 1
            for worker in list(self.workers.values()):
                worker.reload()
            log.info("configuration {path} checked; reload passed to {count} workers",
                     path=self.config_path, count=len(self.workers))
            return True
        finally:
            self._reloading = False

    # -- metrics, health -----------------------------------------------------------------------
    def refresh_metrics(self) -> Deferred:
        """Fresh figures from every ready worker (at most SCRAPE_WAIT), then summed."""
        asked = [w.fresh_snapshot() for w in self.workers.values() if w.ready]
        waiting = defer.DeferredList(asked, consumeErrors=True)
        waiting.addTimeout(SCRAPE_WAIT, self.reactor)
        waiting.addErrback(lambda _: None)  # a slow worker: its last figures serve
        waiting.addCallback(lambda _: self.metrics.update() if self.metrics is not None else None)
        return waiting

    def live_snapshots(self) -> List[Dict[str, Any]]:
        return [w.snapshot for w in self.workers.values() if w.snapshot is not None]

    def health(self) -> dict:
        """/health of the main process: its listeners, and the workers' connections summed."""
        state = _metrics().merge_states([snap["state"] for snap in self.live_snapshots()], self.generation)
        return {
            "version": _version(),
            "pid": os.getpid(),
            "config_file": self.config_path,
            "config_generation": self.generation,
            "listeners": list(self.listen_endpoints) if self.ports else [],
            "metrics_listener": self.metrics_endpoint,
            "shutting_down": self.stopping,
            "connections": state["connections"],
            "messages_in_flight": state["in_flight"],
            "workers": self.count,
            "workers_alive": sum(1 for w in self.workers.values() if w.ready),
            "worker_pids": sorted(w.pid for w in self.workers.values() if w.pid is not None),
            "worker_restarts": self.restarts,
        }

    def backend_states(self) -> List[Any]:
        """For the status page: a server is alive while every worker has it alive."""
        return _metrics().merge_states([snap["state"] for snap in self.live_snapshots()], self.generation)["backends"]

    # -- stop --------------------------------------------------------------------------------
    def stopService(self) -> Deferred:
        self.stopping = True
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()
        for call in self._pending_restarts.values():
            if call.active():
                call.cancel()
        if self._log_rotation is not None and self._log_rotation.running:
            self._log_rotation.stop()
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
        for port in self.ports + ([self.metrics_port] if self.metrics_port is not None else []):
            try:
                yield defer.maybeDeferred(port.stopListening)
            except OSError:  # a worker's graceful stop already removed the unix socket file
                pass
        self.ports = []
        self.metrics_port = None
        if self.pidfile is not None:
            self.pidfile.release()
        super().stopService()
        log.info("rmilter stopped")


def _version() -> str:
    from rmilter import __version__

    return __version__


class WorkerMetrics:
    """What the main process's ``metrics_socket`` serves: the workers' figures summed.

    Why the main process aggregates rather than ``prometheus_client``'s multiprocess mode: the
    counts of ``rmilter.metrics`` are plain numbers (a lock and an mmap write per update would
    cost more than issue 14's budget) and the gauges are read at scrape time from the live
    service (``state_of``), which ``MultiProcessCollector`` cannot run in another process.  So
    each worker sends ``Metrics.snapshot()`` and ``state_of()`` over its channel, once a second
    and when a scrape asks; the sum is built here.  A worker that ends leaves its last snapshot
    in ``departed``, counted exactly once (its replacement counts from zero); what a SIGKILLed
    worker counted after its last snapshot (at most SNAPSHOT_INTERVAL) is lost.
    """

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        from prometheus_client import CollectorRegistry, ProcessCollector

        self.supervisor = supervisor
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)  # process_*: the main process's own
        self.current = _metrics().Metrics(supervisor.reactor, process_collector=False)
        self.state = _metrics().merge_states([], supervisor.generation)
        self.registry.register(self)  # type: ignore[arg-type]

    def update(self) -> None:
        supervisor = self.supervisor
        live = supervisor.live_snapshots()
        snapshots = ([supervisor.departed] if supervisor.departed is not None else []) + [s["metrics"] for s in live]
        self.current = _metrics().Metrics.merge(supervisor.reactor, snapshots)
        self.current.reloads = dict(supervisor.reloads)  # reloads are the main process's, not N times
        self.state = _metrics().merge_states([s["state"] for s in live], supervisor.generation)

    def describe(self) -> List[Any]:
        return []

    def collect(self) -> Any:
        yield from _metrics().MessageCounts(self.current).collect()
        yield from _metrics().state_families(self.state)

    def per_minute(self, minutes: int = 60) -> Any:
        return self.current.per_minute(minutes)

    @property
    def recent(self) -> Any:
        return self.current.recent


class WorkerChannel(service.Service):
    """The worker's end of its channel with the main process.

    Reads the main process's requests on stdin (``s``: send your figures now) and writes frames
    on CHANNEL_FD: ``R`` once the worker listens with its signal handlers, ``S`` + pickled
    snapshot once a second and on request.  EOF on stdin means the main process is gone
    (even SIGKILLed: the kernel closes its end): the worker stops as on SIGTERM, draining its
    messages, rather than serve on unsupervised.
    """

    def __init__(self, target: Any, reactor: Any = None, *, fd_in: int = 0, fd_out: int = CHANNEL_FD) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.target = target
        self.reactor = reactor
        self.fd_in, self.fd_out = fd_in, fd_out
        self.transport: Any = None
        self.loop: Optional[task.LoopingCall] = None

    def startService(self) -> None:
        super().startService()
        self.transport = stdio.StandardIO(  # type: ignore[call-arg]  # (mypy sees the win32 one)
            _ChannelProtocol(self), stdin=self.fd_in, stdout=self.fd_out, reactor=self.reactor)
        self.reactor.callWhenRunning(self._send, b"R", b"")
        self.loop = task.LoopingCall(self.send_snapshot)
        self.loop.clock = self.reactor
        self.loop.start(SNAPSHOT_INTERVAL, now=False)

    def stopService(self) -> Any:
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        self.send_snapshot()  # the last figures of a worker stopping on its own
        return super().stopService()

    def _send(self, kind: bytes, payload: bytes) -> None:
        if self.transport is not None and not getattr(self.transport, "disconnected", False):
            self.transport.write(_FRAME.pack(kind, len(payload)) + payload)

    def send_snapshot(self) -> None:
        metrics = getattr(self.target, "metrics", None)
        if metrics is None:
            return
        snapshot = {"metrics": metrics.snapshot(), "state": _metrics().state_of(self.target)}
        self._send(b"S", pickle.dumps(snapshot, pickle.HIGHEST_PROTOCOL))

    def main_gone(self) -> None:
        if not self.running:
            return
        log.warn("the main process is gone (its pipe closed); stopping: messages in flight drain")
        self.reactor.stop()


class _ChannelProtocol(protocol.Protocol):
    def __init__(self, channel: WorkerChannel) -> None:
        self.channel = channel

    def dataReceived(self, data: bytes) -> None:
        for _ in range(data.count(b"s")):
            self.channel.send_snapshot()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.channel.main_gone()


#: run twistd from the interpreter given (``python -m twisted`` is ``twist``, not ``twistd``)
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
