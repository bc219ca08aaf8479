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

from typing import Dict, Optional, cast

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from rmilter.backends.clamd import ClamdError, ClamdScan, ReplyKind
from rmilter.config.schema import ServerSpec
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
    checked: "Deferred[CheckResult]" = client.scan(message.spool, tag=message.tag).addCallbacks(
        _to_result, _scan_failed, callbackArgs=(message, deps), errbackArgs=(message, deps))
    return checked.addErrback(_unexpected, message, deps)


def _details(server: Optional[ServerSpec], elapsed: float, attempts: int) -> Dict[str, object]:
    return {
        "clamd_server": server.name if server is not None else None,
        "clamd_scan_time": round(elapsed, 6),
        "clamd_attempts": attempts,
    }


def _to_result(scan: ClamdScan, message: MessageContext, deps: Deps) -> CheckResult:
    details = _details(scan.server, scan.elapsed, scan.attempts)
    virus = scan.reply.virus
    if scan.reply.kind is ReplyKind.VIRUS:
        log.info(
            "{tag}; clamscan: scan {elapsed:.3f}, {server}, found {virus}",
            tag=message.tag,
            elapsed=scan.elapsed,
            server=scan.server.name,
            virus=virus,
        )
        details["virus_name"] = virus
        return CheckResult(Check.VIRUS, LOG_VIRUS, verdict=reject("Infected: %s" % (virus,)), details=details)
    log.info(
        "{tag}; clamscan: scan {elapsed:.3f}, {server}",
        tag=message.tag,
        elapsed=scan.elapsed,
        server=scan.server.name,
    )
    return CheckResult(Check.VIRUS, LOG_CLEAN, details=details)


def _scan_failed(failure: Failure, message: MessageContext, deps: Deps) -> CheckResult:
    """clamd gave no verdict after every attempt (or the scan was cancelled)."""
    failure.trap(ClamdError)
    error = cast(ClamdError, failure.value)
    details = _details(error.server, error.elapsed, error.attempts)
    details["clamd_error"] = error.reason
    log.warn(
        "{tag}; clamscan: failed after {attempts} attempt(s), {server}: {error}",
        tag=message.tag,
        attempts=error.attempts,
        server=error.server.name if error.server is not None else "none",
        error=error.reason,
    )
    return _failed(message, deps, error.reason, details)


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
