"""The Rspamd client: scans with failover and retries over an HTTP transport (SPEC §6.6, §6.8).

A scan is up to ``retry_count`` attempts through the shared retry loop
(``rmilter.backends.upstream.Failover``), each on a freshly chosen live server,
separated by a pause that never blocks the reactor.  Every attempt is one
``exchange`` of the transport, bounded as a whole by ``connect_timeout +
results_timeout`` (connecting, sending, the reply head *and* its body); the
connect itself is bounded by ``connect_timeout``.  A scan that gets no usable
reply fails with ``RspamdError``, naming every failed attempt.
"""
from __future__ import annotations

import random
from typing import Any, Optional, Sequence
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from rmilter.backends.rspamd.transport import EndpointFor, TreqTransport, server_endpoint
from rmilter.backends.rspamd.reply import ScanReply
from rmilter.backends.rspamd.request import MessageBody, ScanRequest
from rmilter.backends.upstream import AttemptFailed, Attempted, Exhausted, Failover, UpstreamList
from rmilter.config.schema import Config, ServerSpec, SpamdConfig

#: a successful scan: the reply, the server that gave it, the time spent (retries included), attempts
RspamdScan = Attempted[ServerSpec, ScanReply]


class RspamdError(Exception):
    """A scan that got no usable reply from any attempt; ``errors`` says why, one line per attempt."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("; ".join(errors) or "no attempt made")
        self.errors = tuple(errors)


def _rspamd_error(report: Exhausted[ServerSpec]) -> RspamdError:
    return RspamdError(report.errors)


class ScanTransport(TypingProtocol):
    """What the client needs from an HTTP implementation (``TreqTransport``; tests may plug another)."""

    def exchange(self, server: ServerSpec, request: ScanRequest, body: MessageBody) -> "Deferred[ScanReply]":
        """One request to one server, within the attempt's deadline."""

    def describe_failure(self, failure: Failure) -> Optional[AttemptFailed]:
        """Why an exchange failed; None for an error the transport does not know (a bug)."""

    def stop(self) -> "Deferred[None]":
        """Close what is kept open between scans."""


class RspamdClient:
    """Scans messages on the configured servers with failover and retries (SPEC §6.6)."""

    def __init__(
        self,
        config: SpamdConfig,
        reactor: Any,
        *,
        endpoint_for: Optional[EndpointFor] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self._rng = rng or random.Random()
        if endpoint_for is None:
            tls = None
            if any(s.tls for s in config.servers + config.also_check):  # pyOpenSSL only then (issue 19)
                from rmilter.backends.rspamd.tls import client_tls

                tls = client_tls(config)

            def endpoint_for(server: ServerSpec) -> Any:
                return server_endpoint(reactor, server, config.connect_timeout,
                                       tls(server) if tls is not None and server.tls else None)

        self.http: ScanTransport = TreqTransport(
            reactor,
            config.servers + config.also_check,
            path="/symbols" if config.protocol == "legacy" else "/checkv2",
            deadline=config.connect_timeout + config.results_timeout,
            endpoint_for=endpoint_for,
        )
        self.upstreams: UpstreamList[ServerSpec] = self._upstream_list(config.servers)
        self._scans = self._failover(self.upstreams, config.retry_count, "rspamd")
        self.also_check: Optional[UpstreamList[ServerSpec]] = None
        self._also_scans: Optional[Failover[ServerSpec]] = None
        if config.also_check:
            self.also_check = self._upstream_list(config.also_check)
            self._also_scans = self._failover(self.also_check, 1, "rspamd also_check")

    def _upstream_list(self, servers: Sequence[ServerSpec]) -> UpstreamList[ServerSpec]:
        c = self.config
        return UpstreamList(
            list(servers),
            error_time=c.error_time,
            dead_time=c.dead_time,
            maxerrors=max(1, c.maxerrors),
            clock=self.reactor,
            priorities=[s.priority for s in servers],
            rng=self._rng,
        )

    def _failover(self, upstreams: UpstreamList[ServerSpec], attempts: int, what: str) -> Failover[ServerSpec]:
        return Failover(
            upstreams,
            self.reactor,
            attempts=attempts,
            retry_timeout=self.config.retry_timeout,
            what=what,
            describe=self.http.describe_failure,
            give_up=_rspamd_error,
        )

    def scan(self, request: ScanRequest, body: MessageBody) -> "Deferred[RspamdScan]":
        """Up to ``retry_count`` attempts; fails with ``RspamdError`` when none worked."""
        return self._run(self._scans, request, body)

    def scan_also(self, request: ScanRequest, body: MessageBody) -> Optional["Deferred[RspamdScan]"]:
        """The ``also_check`` comparison scan: one attempt, or None without such servers."""
        if self._also_scans is None:
            return None
        return self._run(self._also_scans, request, body)

    def _run(self, failover: Failover[ServerSpec], request: ScanRequest, body: MessageBody) -> "Deferred[RspamdScan]":
        exchange = self.http.exchange
        return failover.run(lambda server: exchange(server, request, body), request.tag)

    def stop(self) -> "Deferred[None]":
        """Close the idle pooled connections (idempotent).

        Scans in flight, retries included, end on their own: a runtime is only
        stopped once no message uses it (``rmilter.runtime``).
        """
        return self.http.stop()


def from_config(config: Config, reactor: Any) -> Optional[RspamdClient]:
    """The rspamd client of a configuration, or None when no spamd servers are configured."""
    if not config.spamd.servers:
        return None
    return RspamdClient(config.spamd, reactor)

