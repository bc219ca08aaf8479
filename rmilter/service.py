"""The running daemon: listeners, pid file, reload on SIGHUP/SIGUSR1, graceful stop (SPEC §8).

``RmilterService`` owns the current ``Runtime`` (configuration + backend
clients).  A reload builds a new runtime next to the old one: new messages use
the new one, messages in flight finish with the one they started with, and the
old runtime closes its backend connections when its last message is done.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import stat
import threading
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Sequence, Tuple

from twisted.application import service, strports
from twisted.application.internet import TimerService
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from rmilter.log import Logger
from twisted.python.failure import Failure

from rmilter import __version__
from rmilter import config as rconfig
from rmilter import listeners, privileges
from rmilter.config.endpoints import UNIX_SOCKET_MODE, _parse_description
from rmilter.startup import EX_UNAVAILABLE, StartupError, fail, load_for_reload, os_reason
from rmilter.startup import load_configuration  # noqa: F401  # its old home: cli, tests, testmessage
from rmilter.config.schema import DEFAULT_BIND_SOCKET, Config
from rmilter.dkim.keys import Keyring
from rmilter.milter.protocol import MilterFactory
from rmilter.pipeline import Pipeline
from rmilter.runtime import Runtime
if TYPE_CHECKING:  # issue 19: prometheus_client and twisted.web only with a metrics_socket
    from rmilter.metrics import Metrics
from rmilter.memory import BurstTrimmer, freeze_startup_objects
from rmilter.spool import SpoolBudget
from rmilter.spool_io import SpoolIO

#: seconds between looks at whether a burst of messages has ended (then freed memory is returned)
TRIM_INTERVAL = 5.0

log = Logger(namespace="rmilter.service")

def metrics_endpoint(spec: str, listen_endpoints: Sequence[str]) -> str:
    """The endpoint of ``metrics_socket``, refused if it is a milter listener; a stale unix socket
    file is removed first (one process serves it: the only one, or the main of workers = N)."""
    endpoint = _endpoint_for(spec)
    if endpoint in listen_endpoints:
        raise StartupError("metrics_socket %s is a milter listener; give the metrics a socket of their own"
                           % (spec,))
    path = unix_socket_path(endpoint)
    if path is not None:
        clear_stale_socket(path)
    return endpoint


def _endpoint_for(spec: str) -> str:
    """A bind_socket spec or a Twisted endpoint string -> a Twisted endpoint description."""
    return rconfig.listen_endpoint(spec)


def unix_socket_path(endpoint: str) -> Optional[str]:
    """The filesystem path of a ``unix:`` endpoint description, else None."""
    if not endpoint.startswith("unix:"):
        return None
    rest = endpoint[len("unix:") :]
    # options follow unescaped colons; paths with colons must be escaped as "\:"
    path, _, _ = rest.replace("\\:", "\0").partition(":")
    return path.replace("\0", ":")


def clear_stale_socket(path: str) -> None:
    """Remove a stale unix socket file; refuse a live socket or anything else (SPEC §8.1, issue 18.8)."""
    try:
        listeners.clear_stale_socket(path)
    except listeners.ListenError as e:
        raise StartupError(str(e)) from None


def _where(config: Config, key: str) -> str:
    """`` (FILE:LINE)`` of a directive set in the file, else nothing."""
    origin = config.origins.get(key)
    return " (%s:%d)" % (origin.file, origin.line) if origin is not None else ""


def _openlog(name: str) -> None:
    """``twistd --syslog``: ident ``syslog_name`` with the pid, facility mail (SPEC §8.4).

    twistd opened syslog as ``twisted`` with facility user before the service starts; opening it
    again here changes both for every later line (nothing is sent when --syslog is not used).
    """
    import syslog

    syslog.openlog(name or "rmilter", syslog.LOG_PID, syslog.LOG_MAIL)


def _socket_access(config: Config) -> Tuple[Any, ...]:
    """What a unix socket is given besides its path: a change means re-binding at reload."""
    main = config.main
    return (main.bind_socket_owner or main.user, main.bind_socket_group or main.group,
            main.bind_socket_mode if "main.bind_socket_mode" in config.origins else None)


class PidFile:
    """A pid file locked before it is truncated (B25); closed, not removed, at exit (SPEC §8.1)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        except OSError as e:
            raise StartupError("cannot open pid file %s: %s" % (self.path, e.strerror))
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise StartupError("pid file %s is locked: another rmilter is running" % (self.path,))
            raise StartupError("cannot lock pid file %s: %s" % (self.path, e.strerror))
        os.ftruncate(fd, 0)
        os.write(fd, b"%d\n" % os.getpid())
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def unix_endpoint(reactor: Any, config: Config, endpoint: str, path: str) -> listeners.OwnedUnixEndpoint:
    """A unix listener with the socket's owner, group and mode: ``bind_socket_*``, owner/group
    defaulting to ``user``/``group``; an explicit ``mode=`` of a Twisted string yields to
    ``bind_socket_mode`` only when that directive is set."""
    main = config.main
    _args, kwargs = _parse_description(endpoint)
    if "main.bind_socket_mode" in config.origins:
        mode = main.bind_socket_mode
    else:
        mode = int(kwargs.get("mode", UNIX_SOCKET_MODE), 8)
    uid, gid = privileges.socket_owner(main.bind_socket_owner or main.user, main.bind_socket_group or main.group)
    backlog = int(kwargs.get("backlog", main.listen_backlog))
    return listeners.OwnedUnixEndpoint(reactor, path, mode, uid, gid, backlog)


def _run_in_threadpool(reactor: Any) -> Callable[..., Deferred]:
    def run(f: Callable[..., Any], *args: Any) -> Deferred:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


def with_backlog(endpoint: str, backlog: int) -> str:
    """``tcp:``/``unix:`` endpoint strings get ``backlog=N`` unless they name one (listen_backlog)."""
    kind = endpoint.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "unix") or backlog <= 0 or re.search(r"(^|:)backlog=", endpoint):
        return endpoint
    return "%s:backlog=%d" % (endpoint, backlog)


def run_in_daemon_thread(reactor: Any, f: Callable[..., Any], *args: Any) -> Deferred:
    """``f(*args)`` in a thread of its own that shutdown never joins (a reload must not hold
    up SIGTERM: the reactor's pool is joined at exit); the result comes back on the reactor."""
    d: Deferred = Deferred()

    def work() -> None:
        try:
            result = f(*args)
        except BaseException:
            failure = Failure()
            reactor.callFromThread(d.errback, failure)
        else:
            reactor.callFromThread(d.callback, result)

    threading.Thread(target=work, name="rmilter-reload", daemon=True).start()
    return d


class RmilterService(service.MultiService):
    """Listeners + the current runtime; reloads and stops gracefully."""

    def __init__(
        self,
        config: Config,
        *,
        keyring: Optional[Keyring] = None,
        config_path: Optional[str],
        listen: Sequence[str] = (),
        reactor: Any = None,
        install_signals: bool = True,
        worker: Optional[int] = None,
    ) -> None:
        super().__init__()
        #: worker number under a main process (``workers = N``): the main process owns the pid file
        self.worker = worker
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config_path = config_path
        self.cli_listen = tuple(listen)
        self.install_signals = install_signals
        self.run_blocking = _run_in_threadpool(reactor)
        #: one budget for the in-memory spools of every generation (messages outlive reloads)
        self.spool_budget = SpoolBudget(config.main.spool_memory_total)
        #: the spool files' one I/O thread, shared by every generation like the budget
        self.spool_io = SpoolIO(reactor)
        self.runtime = Runtime.build(config, reactor, self.run_blocking, keyring,
                                     spool_budget=self.spool_budget, spool_io=self.spool_io)
        #: after a burst of messages, freed buffers go back to the system (RSS returns to its floor)
        self.trimmer = BurstTrimmer(lambda: self.spool_budget.open, lambda: self.spool_budget.opened)
        trim_timer = TimerService(TRIM_INTERVAL, self.trimmer.tick)
        trim_timer.clock = reactor
        trim_timer.setServiceParent(self)
        self.pipeline = Pipeline(lambda: self.runtime)
        self.factory = MilterFactory(self.pipeline, reactor, lambda: self.runtime)
        self.factory.spool_budget = self.spool_budget  # read sizes follow it (issue 19)
        self.pidfile: Optional[PidFile] = None
        self.listeners: List[service.Service] = []
        self.listen_endpoints: List[str] = []
        self._reloading: Optional[Deferred] = None
        self._dropped = False
        self._reload_started = 0.0
        self._stopping = False
        self._previous_handlers: dict = {}
        #: for /health and the metrics: 1 at start, +1 per successful reload
        self.generation = 1
        self.shutting_down = False
        self.clock = reactor
        #: the metrics of issue 14, made when metrics_socket is first configured
        self.metrics: Optional[Metrics] = None
        self.metrics_listener: Optional[service.Service] = None
        self.metrics_endpoint: Optional[str] = None
        if config.main.metrics_socket:
            self._enable_metrics()
        self._announce(config, keyring)

    # -- listeners ---------------------------------------------------------------------------
    def endpoints_for(self, config: Config) -> List[str]:
        """--listen wins over bind_socket; with neither, the documented default socket."""
        return [endpoint for endpoint, _label in self._listen_specs(config)]

    def _listen_specs(self, config: Config) -> List[Tuple[str, str]]:
        """(endpoint description, where it came from) for every listener, for one-line errors."""
        if self.cli_listen:
            return [(_endpoint_for(s), "--listen %s" % s) for s in self.cli_listen]
        spec = config.main.bind_socket
        if not spec:
            return [(_endpoint_for(DEFAULT_BIND_SOCKET), "default listener %s" % DEFAULT_BIND_SOCKET)]
        return [(_endpoint_for(spec), "bind_socket = %s%s" % (spec, _where(config, "main.bind_socket")))]

    def _unix_endpoint(self, config: Config, endpoint: str, path: str) -> listeners.OwnedUnixEndpoint:
        return unix_endpoint(self.reactor, config, endpoint, path)

    def _bind(self, config: Config) -> None:
        from twisted.application.internet import StreamServerEndpointService

        for endpoint, label in self._listen_specs(config):
            path = unix_socket_path(endpoint)
            if path is not None:
                listener = StreamServerEndpointService(self._unix_endpoint(config, endpoint, path), self.factory)
            else:
                listener = strports.service(with_backlog(endpoint, config.main.listen_backlog),
                                            self.factory, reactor=self.reactor)  # type: ignore[arg-type]
            # make a bind failure raise from startService instead of only being logged
            listener._raiseSynchronously = True  # type: ignore[attr-defined]
            listener._rmilter_label = label  # type: ignore[attr-defined]
            listener.setServiceParent(self)
            self.listeners.append(listener)
            self.listen_endpoints.append(endpoint)

    # -- metrics (issue 14) ------------------------------------------------------------------
    def _enable_metrics(self) -> Metrics:
        """Count from now on: the pipeline's observers, this generation's server lists, the state."""
        if self.metrics is None:
            from rmilter.metrics import Metrics, StateCollector

            self.metrics = Metrics(self.reactor)
            self.metrics.registry.register(StateCollector(self))
        metrics = self.metrics
        if metrics.observe_result not in self.pipeline.observers:
            self.pipeline.observers.append(metrics.observe_result)
            self.pipeline.message_observers.append(metrics.message_done)
        metrics.watch_runtime(self.runtime.deps)
        return metrics

    def _disable_metrics(self) -> None:
        """metrics_socket removed on reload: stop paying for the observers (counts are kept)."""
        if self.metrics is not None and self.metrics.observe_result in self.pipeline.observers:
            self.pipeline.observers.remove(self.metrics.observe_result)
            self.pipeline.message_observers.remove(self.metrics.message_done)

    def _bind_metrics(self, spec: Optional[str]) -> None:
        if self.worker is not None:  # workers = N: the main process serves the sum (rmilter.workers.WorkerMetrics)
            if spec is not None:
                self._enable_metrics()  # counted here all the same, the new generation's servers too
            return
        if spec is None or self.metrics_listener is not None:
            return
        endpoint = metrics_endpoint(spec, self.listen_endpoints)
        from rmilter import status

        listener = strports.service(endpoint, status.site(self._enable_metrics(), self),  # type: ignore[arg-type]
                                    reactor=self.reactor)
        listener._raiseSynchronously = True  # type: ignore[attr-defined]
        try:
            listener.setServiceParent(self)
        except Exception as e:
            raise StartupError("cannot listen on metrics_socket %s: %s" % (spec, e)) from e
        self.metrics_listener = listener
        self.metrics_endpoint = endpoint

    @inlineCallbacks
    def _unbind_metrics(self):  # type: ignore[no-untyped-def]
        listener, self.metrics_listener, self.metrics_endpoint = self.metrics_listener, None, None
        if listener is not None:
            yield defer.maybeDeferred(listener.disownServiceParent)

    def health(self) -> dict:
        """What /health and ``rmilter status`` show (``rmilter.status.health`` adds the verdict)."""
        return {
            "version": __version__,
            "pid": os.getpid(),
            "config_file": self.config_path,
            "config_generation": self.generation,
            "listeners": list(self.listen_endpoints),
            "metrics_listener": self.metrics_endpoint,
            "shutting_down": self.shutting_down,
            "connections": len(self.factory.connections),
            "messages_in_flight": self.factory.messages_in_flight,
        }

    @inlineCallbacks
    def _unbind(self):  # type: ignore[no-untyped-def]
        listeners, self.listeners = self.listeners, []
        self.listen_endpoints = []
        for listener in listeners:
            yield defer.maybeDeferred(listener.disownServiceParent)

    # -- lifetime ----------------------------------------------------------------------------
    def privilegedStartService(self) -> None:
        """Pid file and listeners come first, then the switch to ``user``/``group`` (issue 13).

        twistd has opened its log before this; ``twistd --uid/--gid`` switch after it, too.
        A failure is one line and exit status 69 (SPEC §8.1), not a traceback.
        """
        _openlog(self.runtime.config.main.syslog_name)
        try:
            self._open_listeners()
            self._start_children(super().privilegedStartService)
            self._drop_privileges()
        except StartupError as e:
            fail(e)

    def startService(self) -> None:
        try:
            self._open_listeners()
            self._start_children(super().startService)
            self._drop_privileges()
        except StartupError as e:
            fail(e)
        if self.install_signals:
            self._install_signal_handlers()
            # the daemon, not a test run in-process: start-up objects out of the collector's way
            freeze_startup_objects()
        # twistd starts the service before the reactor runs, and the reactor installs its SIGTERM
        # handler when it starts: the line that says "serving" comes after that, so whoever waits
        # for it (an administrator, the test harness) may stop rmilter gracefully from then on
        self.reactor.callWhenRunning(self._announce_listening)

    def _announce_listening(self) -> None:
        log.info(
            "rmilter {version} listening on {endpoints}",
            version=__version__,
            endpoints=", ".join(self.listen_endpoints),
        )
        if self.metrics_endpoint is not None:
            log.info("metrics, health and status page on {endpoint}", endpoint=self.metrics_endpoint)

    def _drop_privileges(self) -> None:
        main = self.runtime.config.main
        if self._dropped or not (main.user or main.group):
            return
        where = _where(self.runtime.config, "main.user") or _where(self.runtime.config, "main.group")
        done = privileges.drop(main.user, main.group, "user = %s, group = %s%s: " % (
            main.user or "(unset)", main.group or "(unset)", where))
        self._dropped = True
        if done:
            log.info("{done} (user = {user}, group = {group})", done=done, user=main.user, group=main.group)

    def _open_listeners(self) -> None:
        if self.listeners:
            return
        config = self.runtime.config
        main = config.main
        if main.pidfile and self.pidfile is None and self.worker is None:
            self.pidfile = PidFile(main.pidfile)
            try:
                self.pidfile.acquire()
            except StartupError as e:
                self.pidfile = None
                raise StartupError("pidfile%s: %s" % (_where(config, "main.pidfile"), e)) from None
        self._bind(config)
        self._bind_metrics(main.metrics_socket)

    def _start_children(self, f: Callable[[], Any]) -> Any:
        """Start the listeners; turn a bind failure into a StartupError naming the listener."""
        try:
            return f()
        except StartupError:
            raise
        except Exception as e:
            raise StartupError(self._listen_failure(e)) from None

    def _listen_failure(self, error: BaseException) -> str:
        """``bind_socket = inet:25@127.0.0.1 (FILE:LINE): cannot listen: Address already in use``."""
        label = None
        for listener in self.listeners:
            waiting = getattr(listener, "_waitingForPort", None)
            # not started yet, or started and failed (its errback left None as the result)
            if waiting is None or (waiting.called and getattr(waiting, "result", None) is None):
                label = getattr(listener, "_rmilter_label", None)
                break
        if isinstance(error, listeners.ListenError):
            reason = str(error)
        else:
            reason = "cannot listen: %s" % os_reason(error)
        return "%s: %s" % (label or ", ".join(self.listen_endpoints), reason)

    def stopService(self) -> Deferred:
        """Stop accepting, let messages in flight finish up to shutdown_timeout, then stop."""
        self._stopping = True
        if self.install_signals:
            self._restore_signal_handlers()
        return self._stop()

    @inlineCallbacks
    def _stop(self):  # type: ignore[no-untyped-def]
        self.shutting_down = True  # /health answers 503 while messages drain
        yield self._unbind()
        timeout = self.runtime.config.main.shutdown_timeout
        waiting = self.factory.wait_for_messages()
        waiting.addTimeout(timeout, self.reactor)
        try:
            yield waiting
        except defer.TimeoutError:
            log.warn("shutdown: messages still in flight after {timeout} s; closing them", timeout=timeout)
        self.factory.close_idle_connections()
        yield defer.maybeDeferred(super().stopService)
        yield self.runtime.stop()
        yield self.spool_io.drain()  # the last spool files are deleted before the process exits
        self.spool_io.stop()
        if self.pidfile is not None:
            self.pidfile.release()
        log.info("rmilter stopped")

    # -- reload ------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            self._previous_handlers[signum] = signal.signal(signum, self._on_reload_signal)

    def _restore_signal_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _on_reload_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> Deferred:
        """Re-read the configuration (SPEC §4.13, B24); on error keep the running one."""
        if self._reloading is not None:
            log.warn("reload requested while the previous one (started {seconds:.1f} s ago) is still running; "
                     "this request is ignored", seconds=self.reactor.seconds() - self._reload_started)
            return self._reloading
        if self.config_path is None:
            log.info("reload requested: running with the embedded default configuration, nothing to re-read")
            return defer.succeed(False)
        log.info("reloading configuration from {path}", path=self.config_path)
        self._reload_started = self.reactor.seconds()
        d = run_in_daemon_thread(self.reactor, load_for_reload, self.config_path)
        d.addCallback(self._apply_reload)
        d.addErrback(self._reload_failed)

        def done(result: Any) -> Any:
            self._reloading = None
            return result

        d.addBoth(done)
        self._reloading = d
        return d

    @inlineCallbacks
    def _apply_reload(self, loaded):  # type: ignore[no-untyped-def]
        config, keyring = loaded
        if self._stopping:
            log.info("configuration re-read after the stop began: not applied")
            return False
        old = self.runtime
        self.spool_budget.total = config.main.spool_memory_total
        new = Runtime.build(config, self.reactor, self.run_blocking, keyring,
                            spool_budget=self.spool_budget, spool_io=self.spool_io)
        self.runtime = new
        self.generation += 1
        old.retire()
        self._announce(config, keyring)
        endpoints = self.endpoints_for(config)
        if (config.main.user, config.main.group) != (old.config.main.user, old.config.main.group):
            log.warn("config: user/group changed; the running process keeps its user until a restart")
        if endpoints != self.listen_endpoints or _socket_access(config) != _socket_access(old.config):
            log.info("listeners changed: re-binding {endpoints}", endpoints=", ".join(endpoints))
            yield self._unbind()
            self._start_children(lambda: self._bind(config))
        spec = config.main.metrics_socket
        wanted = _endpoint_for(spec) if spec else None
        if wanted != self.metrics_endpoint:
            yield self._unbind_metrics()
            if wanted is None:
                self._disable_metrics()
            elif self.running:
                self._bind_metrics(spec)
        elif self.metrics is not None and wanted is not None:
            self.metrics.watch_runtime(new.deps)
        if self.metrics is not None:
            self.metrics.reload_done(True)
        log.info("configuration reloaded from {path}", path=self.config_path)
        return True

    def _reload_failed(self, failure):  # type: ignore[no-untyped-def]
        if self.metrics is not None:
            self.metrics.reload_done(False)
        if failure.check(StartupError):
            log.error("reload: {error}", error=str(failure.value))
        elif failure.check(rconfig.ConfigError):
            for line in failure.value.errors:
                log.error("reload failed, keeping the running configuration: {error}", error=line)
        else:
            log.failure("reload failed, keeping the running configuration", failure)
        return False

    def _announce(self, config: Config, keyring: Optional[Keyring]) -> None:
        """Log the configuration's warnings, key problems and start-up remarks (SPEC §8.1)."""
        for warning in config.warnings:
            log.warn("config: {warning}", warning=warning)
        if keyring is not None:
            for problem in keyring.problems:
                log.error("{problem}", problem=problem)
            # (sign_alg = sha1 is reported once, with the other start-up notices)
            log.info("dkim: {count} signing keys loaded for {entries} domain entries",
                     count=keyring.key_count, entries=len(config.dkim.domains))
        for notice in rconfig.startup_notices(config):
            log.info("config: {notice}", notice=notice)
        if config.cache_backend == "memcached":
            log.error(
                "greylisting, rate limits, replies check and pub/sub copies are disabled: "
                "the memcached backend is not supported (use a redis section or use_redis = yes)"
            )
