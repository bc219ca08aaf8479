"""A per-connection budget for warning lines (issue 18): a peer sending 100,000 stray frames
gets a few lines in the log, one line saying the rest are counted, and the count at the end."""
from __future__ import annotations

from typing import Any

from rmilter.log import Logger

log = Logger(namespace="rmilter.milter")

#: warning lines one connection may write before the rest are only counted
WARNINGS_PER_CONNECTION = 10


class WarningBudget:
    """Logs the first ``limit`` warnings of a connection; counts the others."""

    __slots__ = ("peer", "limit", "logged", "suppressed")

    def __init__(self, peer: str, limit: int = WARNINGS_PER_CONNECTION) -> None:
        self.peer = peer
        self.limit = limit
        self.logged = 0
        self.suppressed = 0

    def warn(self, format: str, **fields: Any) -> None:
        if self.logged < self.limit:
            self.logged += 1
            log.warn(format, **fields)
            if self.logged == self.limit:
                log.warn("{peer}: {limit} protocol warnings on this connection; further ones are only counted",
                         peer=self.peer, limit=self.limit)
            return
        self.suppressed += 1

    def close(self) -> None:
        """At the end of the connection: how many warnings were not written."""
        if self.suppressed:
            log.warn("{peer}: {count} further protocol warnings were not logged", peer=self.peer,
                     count=self.suppressed)
            self.suppressed = 0
