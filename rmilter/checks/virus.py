"""Virus scanning with clamd (SPEC §5.9 steps 7-8, §6.9).

The pipeline decides whether a message is scanned at all (clamav servers
configured, ``max_size``, ``clamav.whitelist``, recipient whitelist: SPEC §5.11)
and runs this check at the same time as rspamd; ``rmilter.verdict.decide``
orders the results.  ``check`` turns one clamd scan into a ``CheckResult``:

- a virus: REJECT ``554 5.7.1 Infected: <name>`` (log ``rejected, virus found``);
- clean: no verdict (log ``clean``);
- clamd unusable after every retry (SPEC §6.10): with ``spamd.tempfail_on_error``
  TEMPFAIL ``451 4.7.1 Temporary service failure.`` (log ``delayed, temporary
  fail``), otherwise the message goes on unscanned (log ``ignored, temporary fail``).
"""
from __future__ import annotations

from typing import Dict

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from rmilter.backends.clamd import ScanResult, ScanStatus
from rmilter.context import MessageContext
from rmilter.deps import Deps
from rmilter.log import Logger
from rmilter.verdict import SERVICE_FAILURE, Check, CheckResult, reject, skipped, tempfail

log = Logger(namespace="rmilter.checks.virus")

#: SPEC §8.4 "virus scan" values produced here
LOG_CLEAN = "clean"
LOG_VIRUS = "rejected, virus found"
LOG_TEMPFAIL = "delayed, temporary fail"
LOG_IGNORED = "ignored, temporary fail"
LOG_NO_SERVERS = "skipped, no av servers"


def check(message: MessageContext, deps: Deps) -> "Deferred[CheckResult]":
    """Scan the message's spool with clamd; the Deferred never fails.

    Cancelling it aborts the scan (the result is then a failure, which nobody reads).
    """
    client = deps.clamd
    if client is None:
        return succeed(skipped(Check.VIRUS, LOG_NO_SERVERS))
    if message.spool is None:
        log.error("{tag}; clamscan: no spool to scan", tag=message.tag)
        return succeed(_failed(message, deps, "no spool", details={}))
    checked: "Deferred[CheckResult]" = client.scan(message.spool, tag=message.tag).addCallback(
        _to_result, message, deps)
    return checked.addErrback(_unexpected, message, deps)


def _details(scan_result: ScanResult) -> Dict[str, object]:
    details: Dict[str, object] = {
        "clamd_server": scan_result.server,
        "clamd_scan_time": round(scan_result.elapsed, 6),
        "clamd_attempts": scan_result.attempts,
    }
    if scan_result.virus is not None:
        details["virus_name"] = scan_result.virus
    if scan_result.error is not None:
        details["clamd_error"] = scan_result.error
    return details


def _to_result(scan_result: ScanResult, message: MessageContext, deps: Deps) -> CheckResult:
    details = _details(scan_result)
    if scan_result.status is ScanStatus.FAILED:
        log.warn(
            "{tag}; clamscan: failed after {attempts} attempt(s), {server}: {error}",
            tag=message.tag,
            attempts=scan_result.attempts,
            server=scan_result.server or "none",
            error=scan_result.error,
        )
        return _failed(message, deps, scan_result.error or "failed", details)
    if scan_result.status is ScanStatus.VIRUS:
        log.info(
            "{tag}; clamscan: scan {elapsed:.3f}, {server}, found {virus}",
            tag=message.tag,
            elapsed=scan_result.elapsed,
            server=scan_result.server,
            virus=scan_result.virus,
        )
        return CheckResult(Check.VIRUS, LOG_VIRUS, verdict=reject("Infected: %s" % (scan_result.virus,)),
                           details=details)
    log.info(
        "{tag}; clamscan: scan {elapsed:.3f}, {server}",
        tag=message.tag,
        elapsed=scan_result.elapsed,
        server=scan_result.server,
    )
    return CheckResult(Check.VIRUS, LOG_CLEAN, details=details)


def _failed(message: MessageContext, deps: Deps, reason: str, details: Dict[str, object]) -> CheckResult:
    """SPEC §5.9 step 8: tempfail with ``tempfail_on_error``, else continue unscanned."""
    if deps.config.spamd.tempfail_on_error:
        return CheckResult(Check.VIRUS, LOG_TEMPFAIL, verdict=tempfail(SERVICE_FAILURE), details=details,
                           failed=True)
    return CheckResult(Check.VIRUS, LOG_IGNORED, details=details, failed=True)


def _unexpected(failure: Failure, message: MessageContext, deps: Deps) -> CheckResult:
    """A bug, not a clamd failure: log it once and apply the configured failure outcome."""
    log.failure("{tag}; clamscan: internal error", failure, tag=message.tag)
    return _failed(message, deps, "internal error: %s" % (failure.getErrorMessage(),), details={})
