"""Virus scanning with clamd (SPEC §5.9 steps 7-8, §6.9).

The pipeline decides whether a message is scanned at all (clamav servers
configured, ``max_size``, ``clamav.whitelist``, recipient whitelist: SPEC §5.11)
and runs this check at the same time as rspamd; ``rmilter.verdict.decide``
orders the results.  This module turns one clamd scan into a ``CheckResult``:

- a virus: REJECT ``554 5.7.1 Infected: <name>`` (log ``rejected, virus found``);
- clean: no verdict (log ``clean``);
- clamd unusable after every retry (SPEC §6.10): with ``spamd.tempfail_on_error``
  TEMPFAIL ``451 4.7.1 Temporary service failure.`` (log ``delayed, temporary
  fail``), otherwise the message goes on unscanned (log ``ignored, temporary fail``).
"""
from __future__ import annotations

from typing import Tuple

from twisted.internet.defer import Deferred, succeed
from rmilter.log import Logger
from twisted.python.failure import Failure

from rmilter.backends.clamd import ScanResult, ScanStatus
from rmilter.context import MessageContext
from rmilter.verdict import SERVICE_FAILURE, CheckResult, reject, tempfail

log = Logger(namespace="rmilter.checks.virus")

CHECK = "virus"
#: SPEC §8.4 "virus scan" values produced here
LOG_CLEAN = "clean"
LOG_VIRUS = "rejected, virus found"
LOG_TEMPFAIL = "delayed, temporary fail"
LOG_IGNORED = "ignored, temporary fail"
LOG_NO_SERVERS = "skipped, no av servers"


def scan(msg: MessageContext) -> "Deferred[CheckResult]":
    """Scan the message's spool with clamd; the Deferred never fails.

    Cancelling it aborts the scan (the result is then a failure, which nobody reads).
    """
    client = msg.runtime.clamd
    if client is None:
        return succeed(CheckResult(CHECK, LOG_NO_SERVERS))
    if msg.spool is None:
        log.error("{tag}; clamscan: no spool to scan", tag=msg.tag)
        return succeed(_failed(msg, "no spool", details=()))
    checked: "Deferred[CheckResult]" = client.scan(msg.spool, tag=msg.tag).addCallback(_to_result, msg)
    return checked.addErrback(_unexpected, msg)


def _details(scan_result: ScanResult) -> Tuple[Tuple[str, object], ...]:
    details: Tuple[Tuple[str, object], ...] = (
        ("clamd_server", scan_result.server),
        ("clamd_scan_time", round(scan_result.elapsed, 6)),
        ("clamd_attempts", scan_result.attempts),
    )
    if scan_result.virus is not None:
        details += (("virus", scan_result.virus),)
    if scan_result.error is not None:
        details += (("clamd_error", scan_result.error),)
    return details


def _to_result(scan_result: ScanResult, msg: MessageContext) -> CheckResult:
    details = _details(scan_result)
    if scan_result.status is ScanStatus.FAILED:
        log.warn(
            "{tag}; clamscan: failed after {attempts} attempt(s), {server}: {error}",
            tag=msg.tag,
            attempts=scan_result.attempts,
            server=scan_result.server or "none",
            error=scan_result.error,
        )
        return _failed(msg, scan_result.error or "failed", details)
    if scan_result.status is ScanStatus.VIRUS:
        log.info(
            "{tag}; clamscan: scan {elapsed:.3f}, {server}, found {virus}",
            tag=msg.tag,
            elapsed=scan_result.elapsed,
            server=scan_result.server,
            virus=scan_result.virus,
        )
        return CheckResult(CHECK, LOG_VIRUS, verdict=reject("Infected: %s" % (scan_result.virus,)), details=details)
    log.info(
        "{tag}; clamscan: scan {elapsed:.3f}, {server}",
        tag=msg.tag,
        elapsed=scan_result.elapsed,
        server=scan_result.server,
    )
    return CheckResult(CHECK, LOG_CLEAN, details=details)


def _failed(msg: MessageContext, reason: str, details: Tuple[Tuple[str, object], ...]) -> CheckResult:
    """SPEC §5.9 step 8: tempfail with ``tempfail_on_error``, else continue unscanned."""
    if msg.runtime.config.spamd.tempfail_on_error:
        return CheckResult(CHECK, LOG_TEMPFAIL, verdict=tempfail(SERVICE_FAILURE), details=details, failed=True)
    return CheckResult(CHECK, LOG_IGNORED, details=details, failed=True)


def _unexpected(failure: Failure, msg: MessageContext) -> CheckResult:
    """A bug, not a clamd failure: log it once and apply the configured failure outcome."""
    log.failure("{tag}; clamscan: internal error", failure, tag=msg.tag)
    return _failed(msg, "internal error: %s" % (failure.getErrorMessage(),), details=())
