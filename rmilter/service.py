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
from typing import Any, Callable, List, Optional, Sequence, Tuple

from twisted.application import service, strports
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from rmilter.log import Logger
from twisted.python.failure import Failure

from rmilter import __version__
from rmilter import config as rconfig
from rmilter.config.schema import DEFAULT_BIND_SOCKET, Config
from rmilter.dkim.keys import Keyring, KeyringError, load_keyring
from rmilter.milter.protocol import MilterFactory
from rmilter.pipeline import Pipeline
from rmilter.runtime import Runtime

log = Logger(namespace="rmilter.service")

#: exit status when the listener or the pid file cannot be set up (SPEC §8.1)
EX_UNAVAILABLE = 69


class StartupError(Exception):
    """The service cannot start (listener, pid file); carries the SPEC §8.1 exit status."""

    def __init__(self, message: str, status: int = EX_UNAVAILABLE) -> None:
        super().__init__(message)
        self.status = status


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
    """Remove a stale unix socket file; refuse to touch anything else (SPEC §8.1)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError("%s exists and is not a socket; refusing to replace it" % (path,))
    os.unlink(path)


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


def load_configuration(path: Optional[str]) -> Tuple[Config, Optional[Keyring]]:
    """The configuration file (or the embedded default) and its DKIM keys: the one place both are read.

    Blocking (files, DNS for host names in IP lists, key files): at start, or in a thread on
    reload.  Raises ``ConfigError`` with ``FILE:LINE: reason`` lines, key files included.
    """
    config = rconfig.load(path) if path else rconfig.default()
    try:
        keyring = load_keyring(config.dkim, config.origins)
    except KeyringError as e:
        raise rconfig.ConfigError(e.errors) from None
    return config, keyring


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
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config_path = config_path
        self.cli_listen = tuple(listen)
        self.install_signals = install_signals
        self.run_blocking = _run_in_threadpool(reactor)
        self.runtime = Runtime.build(config, reactor, self.run_blocking, keyring)
        self.pipeline = Pipeline(lambda: self.runtime)
        self.factory = MilterFactory(self.pipeline, reactor, lambda: self.runtime)
        self.pidfile: Optional[PidFile] = None
        self.listeners: List[service.Service] = []
        self.listen_endpoints: List[str] = []
        self._reloading: Optional[Deferred] = None
        self._reload_started = 0.0
        self._stopping = False
        self._previous_handlers: dict = {}
        self._announce(config, keyring)

    # -- listeners ---------------------------------------------------------------------------
    def endpoints_for(self, config: Config) -> List[str]:
        """--listen wins over bind_socket; with neither, the documented default socket."""
        specs = self.cli_listen or (config.main.bind_socket or DEFAULT_BIND_SOCKET,)
        return [_endpoint_for(s) for s in specs]

    def _bind(self, endpoints: List[str]) -> None:
        for endpoint in endpoints:
            path = unix_socket_path(endpoint)
            if path is not None:
                clear_stale_socket(path)
            listener = strports.service(with_backlog(endpoint, self.runtime.config.main.listen_backlog),
                                        self.factory, reactor=self.reactor)  # type: ignore[arg-type]
            # make a bind failure raise from startService instead of only being logged
            listener._raiseSynchronously = True  # type: ignore[attr-defined]
            listener.setServiceParent(self)
            self.listeners.append(listener)
            self.listen_endpoints.append(endpoint)

    @inlineCallbacks
    def _unbind(self):  # type: ignore[no-untyped-def]
        listeners, self.listeners = self.listeners, []
        self.listen_endpoints = []
        for listener in listeners:
            yield defer.maybeDeferred(listener.disownServiceParent)

    # -- lifetime ----------------------------------------------------------------------------
    def privilegedStartService(self) -> None:
        """Pid file and listeners come first, before twistd drops privileges (SPEC §8.1)."""
        self._open_listeners()
        self._guard(super().privilegedStartService)

    def startService(self) -> None:
        self._open_listeners()
        self._guard(super().startService)
        if self.install_signals:
            self._install_signal_handlers()
        log.info(
            "rmilter {version} listening on {endpoints}",
            version=__version__,
            endpoints=", ".join(self.listen_endpoints),
        )

    def _open_listeners(self) -> None:
        if self.listeners:
            return
        main = self.runtime.config.main
        if main.pidfile and self.pidfile is None:
            self.pidfile = PidFile(main.pidfile)
            self.pidfile.acquire()
        self._guard(self._bind, self.endpoints_for(self.runtime.config))

    def _guard(self, f: Callable[..., Any], *args: Any) -> Any:
        """Turn a bind failure into a StartupError naming the listeners."""
        try:
            return f(*args)
        except StartupError:
            raise
        except Exception as e:
            raise StartupError("cannot listen on %s: %s" % (", ".join(self.listen_endpoints), e)) from e

    def stopService(self) -> Deferred:
        """Stop accepting, let messages in flight finish up to shutdown_timeout, then stop."""
        self._stopping = True
        if self.install_signals:
            self._restore_signal_handlers()
        return self._stop()

    @inlineCallbacks
    def _stop(self):  # type: ignore[no-untyped-def]
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
        d = run_in_daemon_thread(self.reactor, load_configuration, self.config_path)
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
        new = Runtime.build(config, self.reactor, self.run_blocking, keyring)
        self.runtime = new
        old.retire()
        self._announce(config, keyring)
        endpoints = self.endpoints_for(config)
        if endpoints != self.listen_endpoints:
            log.info("listeners changed: re-binding {endpoints}", endpoints=", ".join(endpoints))
            yield self._unbind()
            self._bind(endpoints)
        log.info("configuration reloaded from {path}", path=self.config_path)
        return True

    def _reload_failed(self, failure):  # type: ignore[no-untyped-def]
        if failure.check(rconfig.ConfigError):
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
