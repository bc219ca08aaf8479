"""One configuration generation and its lifetime: the ``Deps`` the checks get, and when to stop them.

A ``Runtime`` is built at start and again on every successful reload.  Each
message keeps the runtime it started with, so messages in flight finish with
the configuration and backends they began with (SPEC §4.13); the old runtime
closes its backend connections once its last message is done.
"""
from __future__ import annotations

import random
from typing import Any, FrozenSet, List, Optional

from twisted.internet.defer import Deferred, DeferredList, succeed

from rmilter.backends import clamd, redis, rspamd
from rmilter.config.schema import Config
from rmilter.deps import Deps
from rmilter.dkim.keys import Keyring
from rmilter.log import Logger
from rmilter.spool import BlockingRunner, SpoolBudget
from rmilter.verdict import Check, dry_run_checks

log = Logger(namespace="rmilter.runtime")


class Runtime:
    """A generation's ``Deps`` plus the count of messages using it."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        #: checks whose demanded verdicts are only reported (``dry_run = yes``), looked up once
        self.dry_run: FrozenSet[Check] = dry_run_checks(deps.config)
        #: messages currently using this runtime; a retired runtime stops when it reaches 0
        self.in_flight = 0
        self.retired = False
        self._stopped: Optional["Deferred[None]"] = None

    @property
    def config(self) -> Config:
        return self.deps.config

    @classmethod
    def build(
        cls,
        config: Config,
        reactor: Any,
        run_blocking: BlockingRunner,
        keyring: Optional[Keyring] = None,
        rng: Optional[random.Random] = None,
        spool_budget: Optional[SpoolBudget] = None,
        spool_io: Optional[BlockingRunner] = None,
    ) -> "Runtime":
        """Create the backend clients the configuration asks for (no network I/O happens here).

        The keyring is loaded by the caller (``rmilter.dkim.keys.load_keyring``: at start, or in
        a thread on reload), so that building a runtime never reads the disk.
        """
        return cls(
            Deps(
                config=config,
                clock=reactor,
                run_blocking=run_blocking,
                rspamd=rspamd.from_config(config, reactor),
                clamd=clamd.from_config(config, reactor),
                redis=redis.from_config(config, reactor),
                keyring=keyring,
                rng=rng or random.Random(),
                spool_budget=spool_budget,
                spool_io=spool_io,
            )
        )

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
        for client in (self.deps.rspamd, self.deps.clamd, self.deps.redis):
            if client is not None:
                try:
                    stops.append(client.stop())
                except Exception:
                    log.failure("stopping backend client {client!r}", client=client)
        self._stopped = DeferredList(stops, consumeErrors=True).addCallback(lambda _: None) if stops else succeed(None)
        return self._stopped
