"""What every check is handed: the configuration and the clients built from it (one generation).

A ``Deps`` is built at start and again on every successful reload; a message keeps the one it
started with, so a reload never changes the rules in the middle of a message (SPEC §4.13).  Checks
get it as an argument (``check(message, deps)``) and never fetch a client from anywhere else, so a
test hands in fakes the same way (``rmilter.testing``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from rmilter.config.schema import Config
from rmilter.spool import BlockingRunner, Spool, SpoolBudget

if TYPE_CHECKING:
    from rmilter.backends.clamd import ClamdClient
    from rmilter.backends.redis import RedisRoles
    from rmilter.backends.rspamd import RspamdClient
    from rmilter.dkim.keys import Keyring


@dataclass(frozen=True)
class Deps:
    """One configuration generation: config, clock, thread pool, backend clients, DKIM keys."""

    config: Config
    #: IReactorTime (a ``task.Clock`` in unit tests)
    clock: Any
    #: runs blocking work (spool files, signatures) off the reactor thread
    run_blocking: BlockingRunner
    rspamd: Optional["RspamdClient"] = None
    clamd: Optional["ClamdClient"] = None
    redis: Optional["RedisRoles"] = None
    keyring: Optional["Keyring"] = None
    #: sampling for copy_probability (seeded in tests)
    rng: random.Random = field(default_factory=random.Random, compare=False)
    #: what all in-memory spools of the process may hold together (shared across reloads)
    spool_budget: Optional[SpoolBudget] = field(default=None, compare=False)
    #: runs the spool files' operations (``rmilter.spool_io.SpoolIO``: one thread, batched);
    #: None runs them through ``run_blocking``
    spool_io: Optional[BlockingRunner] = field(default=None, compare=False)

    def new_spool(self) -> Spool:
        main = self.config.main
        return Spool(main.tempdir, main.tempfiles_mode, main.spool_memory_limit,
                     self.spool_io or self.run_blocking, self.spool_budget)
