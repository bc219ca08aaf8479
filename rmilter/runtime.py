"""The configuration together with the backend clients built from it.

A ``Runtime`` is built at start and again on every successful reload.  Each
message keeps the runtime it started with, so messages in flight finish with
the configuration and backends they began with (SPEC §4.13); the old runtime
is stopped once its last message is done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional

from twisted.internet.defer import Deferred, DeferredList, succeed
from rmilter.log import Logger

from rmilter.config.schema import Config
from rmilter.spool import BlockingRunner, Spool

if TYPE_CHECKING:
    from rmilter.backends.clamd import ClamdClient
    from rmilter.backends.redis import RedisRoles
    from rmilter.backends.rspamd import RspamdClient
    from rmilter.checks.dkim import Keyring

log = Logger(namespace="rmilter.runtime")

#: Runtime.build's default: read the DKIM keys now (at start, before the reactor runs)
_LOAD_KEYS = object()


@dataclass
class Runtime:
    config: Config
    reactor: Any  # IReactorTime + IReactorTCP + IReactorUNIX (+ threads for run_blocking)
    run_blocking: BlockingRunner
    rspamd: Optional["RspamdClient"] = None
    clamd: Optional["ClamdClient"] = None
    redis: Optional["RedisRoles"] = None
    dkim: Optional["Keyring"] = None
    #: messages currently using this runtime; an old runtime stops when it reaches 0
    in_flight: int = 0
    retired: bool = False
    _stopped: Optional["Deferred[None]"] = field(default=None, repr=False)

    @property
    def clock(self) -> Any:
        return self.reactor

    @classmethod
    def build(
        cls,
        config: Config,
        reactor: Any,
        run_blocking: BlockingRunner,
        dkim_keyring: Any = _LOAD_KEYS,
    ) -> "Runtime":
        """Create the backend clients the configuration asks for (no network I/O happens here).

        DKIM keys are read from disk by ``dkim.from_config``; a reload passes the
        keyring it loaded in a thread so the reactor never waits for the disk.
        """
        from rmilter.backends import clamd, redis, rspamd
        from rmilter.checks import dkim

        runtime = cls(config=config, reactor=reactor, run_blocking=run_blocking)
        runtime.rspamd = rspamd.from_config(config, reactor)
        runtime.clamd = clamd.from_config(config, reactor)
        runtime.redis = redis.from_config(config, reactor)
        # a reload passes the keyring it loaded in a thread, None included: no disk I/O here then
        runtime.dkim = dkim.from_config(config) if dkim_keyring is _LOAD_KEYS else dkim_keyring
        return runtime

    def new_spool(self) -> Spool:
        main = self.config.main
        return Spool(main.tempdir, main.tempfiles_mode, main.spool_memory_limit, self.run_blocking)

    # -- lifetime --------------------------------------------------------------------------
    def acquire(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        if self.retired and self.in_flight <= 0:
            self.stop()

    def retire(self) -> None:
        """Replaced by a newer runtime: stop as soon as no message uses it."""
        self.retired = True
        if self.in_flight <= 0:
            self.stop()

    def stop(self) -> "Deferred[None]":
        """Close every backend connection (idempotent)."""
        if self._stopped is not None:
            return self._stopped
        stops: List[Deferred] = []
        for client in (self.rspamd, self.clamd, self.redis):
            if client is not None:
                try:
                    stops.append(client.stop())
                except Exception:
                    log.failure("stopping backend client {client!r}", client=client)
        self._stopped = DeferredList(stops, consumeErrors=True).addCallback(lambda _: None) if stops else succeed(None)
        return self._stopped
