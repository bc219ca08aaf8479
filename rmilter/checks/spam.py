"""Spam scanning with Rspamd (SPEC §5.9 steps 4-5, §6.8).

``scan`` sends the message with its SMTP context to Rspamd and turns the reply
into a ``SpamOutcome``: the verdict Rspamd's action calls for (§6.8.3), and the
header and envelope changes in the order of §6.8.5 - extended headers,
``dkim-signature``, the changes Rspamd asks for in its ``milter``/``rmilter``
block, the trace recipient, then the action's own Mark/Subject.  A scan that
fails after every retry is a ``failed`` result whose verdict is the
``tempfail_on_error`` TEMPFAIL, or nothing.  The pipeline decides whether a
full scan, a DKIM-only scan or none happens, and runs EOM greylisting.

With ``also_check`` servers a full scan also goes, in parallel, to one of them
(one attempt, same deadline): its answer never counts, but when its action
differs from the main server's the message and both results are written to
``diff_dir`` - a way to try a new Rspamd on real traffic.  The verdict waits for
both scans, so the message bytes are still there to be written.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, gatherResults, succeed
from rmilter.log import Logger
from twisted.python.failure import Failure

from rmilter.backends.rspamd import (
    DKIM_ONLY_SETTINGS,
    MessageBody,
    RspamdClient,
    RspamdError,
    RspamdScan,
    ScanReply,
    ScanRequest,
    Symbol,
    prepare_body,
)
from rmilter.config.schema import SpamdConfig
from rmilter.context import MessageContext
from rmilter.verdict import (
    SERVICE_FAILURE,
    Action,
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    CheckResult,
    DeleteRecipient,
    Edit,
    InsertHeader,
    Quarantine,
    Verdict,
    header_value_safe,
    reject,
    sanitise_reply_text,
    tempfail,
)

log = Logger(namespace="rmilter.spam")

#: SPEC §6.8.8: longer scan lines are shortened
MAX_LOG_LINE = 900
SOFT_REJECT_TEXT = "Temporary failure"
SPAM_SUBJECT_PREFIX = "***SPAM***"
WANTS_GREYLIST = ("greylist", "add header", "rewrite subject")
#: header indexes are 32-bit in the milter protocol
MAX_HEADER_INDEX = 2**31 - 1


@dataclass(frozen=True)
class SpamOutcome:
    """An rspamd scan as the pipeline needs it.

    ``result.check`` is "spam" (or "spam_failure" when the scan failed and
    ``tempfail_on_error`` turns that into a TEMPFAIL); ``action`` is rspamd's action
    name; ``wants_greylist`` is True for greylist / add header / rewrite subject;
    ``rejected`` is True when rspamd said reject (before ``spamd_never_reject``).
    ``scan`` is the successful scan (None when it failed or did not happen).
    """

    result: CheckResult
    action: str = "no action"
    wants_greylist: bool = False
    rejected: bool = False
    scan: Optional[RspamdScan] = None


# -- request ------------------------------------------------------------------------------------
def scan_request(msg: MessageContext, dkim_only: bool) -> ScanRequest:
    """The SMTP context of the message as Rspamd's request headers (SPEC §6.8.1)."""
    conn = msg.connection
    spamd = msg.runtime.config.spamd
    return ScanRequest(
        queue_id=msg.queue_id_or_noqueue,
        recipients=tuple(msg.recipient_addresses),
        envelope_from=msg.envelope_from,
        helo=conn.helo,
        hostname=conn.client_hostname,
        ip=msg.client_address,
        user=msg.user,
        settings_id=spamd.spamd_settings_id,
        mta_tag=conn.daemon_name,
        settings=DKIM_ONLY_SETTINGS if dkim_only else None,
        tag=msg.tag,
    )


# -- header formats (SPEC §6.8.4) ----------------------------------------------------------------
def sorted_symbols(symbols: Sequence[Symbol]) -> List[Symbol]:
    """Descending absolute score; ties keep reply order (B22: exact scores, not truncated)."""
    return sorted(symbols, key=lambda s: -abs(s.score))


def spamd_result(reply: ScanReply) -> str:
    """The ``X-Spamd-Result`` value (SPEC §6.8.4, §9 vector)."""
    verdict = "True" if reply.score > reply.required_score else "False"
    head = "default: %s [%.2f / %.2f]" % (verdict, reply.score, reply.required_score)
    symbols = sorted_symbols(reply.symbols)
    if not symbols:
        return head + " "
    lines = ["%s(%.2f)[%s]" % (s.name, s.score, ", ".join(s.options)) for s in symbols]
    return head + "\n " + "\n ".join(lines)


def wants_extended_headers(msg: MessageContext, spamd: SpamdConfig) -> bool:
    """Every recipient in a non-empty ``extended_headers_rcpt``, or the flag for unauthenticated senders."""
    listed = spamd.extended_headers_rcpt
    if listed and msg.recipients and all(listed.matches(r.address) for r in msg.recipients):
        return True
    return spamd.extended_spam_headers and not msg.authenticated


def extended_headers(msg: MessageContext, scan: RspamdScan) -> List[Edit]:
    return [
        AddHeader("X-Spamd-Result", header_value_safe(spamd_result(scan.reply))),
        AddHeader("X-Rspamd-Server", header_value_safe(scan.server.name)),
        AddHeader("X-Rspamd-Scan-Time", "%.2f" % (scan.elapsed,)),
        AddHeader("X-Rspamd-Queue-ID", header_value_safe(msg.queue_id_or_noqueue)),
    ]


# -- changes requested by Rspamd (SPEC §6.8.5) -----------------------------------------------------
#: RFC 5322 field name: printable ASCII without ``:`` (so nothing a milter string cannot carry)
_HEADER_NAME = re.compile(r"[!-9;-~]+\Z")


#: names Rspamd asked about so far, valid or not (it sends the same few on every reply)
_header_names: Dict[str, bool] = {}


def _valid_header_name(name: str) -> bool:
    valid = _header_names.get(name)
    if valid is None:
        valid = _HEADER_NAME.match(name) is not None
        if len(_header_names) < 1024:
            _header_names[name] = valid
    return valid


def _clean_value(value: str) -> str:
    if "\n" not in value and "\r" not in value and "\0" not in value:
        return value  # nothing to drop or refold: the usual single-line value
    return header_value_safe(value.replace("\0", ""))


def _valid_address(address: str) -> bool:
    return bool(address) and not any(c in address for c in "\r\n\0")


def requested_changes(msg: MessageContext, reply: ScanReply) -> List[Edit]:
    """Steps (1)-(3) of SPEC §6.8.5 plus the envelope changes of the ``milter`` block."""
    edits: List[Edit] = []
    for signature in reply.dkim_signatures:
        edits.append(AddHeader("DKIM-Signature", _clean_value(signature.replace("\r", ""))))
    legacy = reply.header_block == "rmilter"
    counts: Optional[Dict[str, int]] = None
    for name, index in reply.remove_headers:
        if not _valid_header_name(name):
            log.warn("{tag}; rspamd asked to remove an invalid header name {name!r}", tag=msg.tag, name=name)
            continue
        if counts is None:
            counts = {}
            for seen, _ in msg.headers:
                key = seen.lower()
                counts[key] = counts.get(key, 0) + 1
        count = counts.get(name.lower(), 0)
        if index >= 1:
            if index <= count:
                edits.append(ChangeHeader(name, index, ""))
        elif legacy:
            continue  # C: only positive indexes in the rmilter block
        elif index == 0:
            # all occurrences, the last first so that the earlier indexes stay valid
            edits.extend(ChangeHeader(name, i, "") for i in range(count, 0, -1))
        elif -index <= count:
            edits.append(ChangeHeader(name, count + index + 1, ""))
    for addition in reply.add_headers:
        if not _valid_header_name(addition.name):
            log.warn("{tag}; rspamd asked to add an invalid header name {name!r}", tag=msg.tag, name=addition.name)
            continue
        value = _clean_value(addition.value)
        order = addition.order
        if order is None or order == -1:
            edits.append(AddHeader(addition.name, value))
        elif order >= 0:
            # a u32 on the wire; past the last header it means "at the end" anyway
            edits.append(InsertHeader(min(order, MAX_HEADER_INDEX), addition.name, value))
        else:
            # counted from the end of the headers the milter saw, as Rspamd's own milter does
            total = len(msg.headers)
            edits.append(InsertHeader(total + order + 1 if -order <= total else 0, addition.name, value))
    if reply.change_from is not None and _valid_address(reply.change_from):
        edits.append(ChangeFrom(reply.change_from))
    edits.extend(AddRecipient(a) for a in reply.add_rcpt if _valid_address(a))
    edits.extend(DeleteRecipient(a) for a in reply.del_rcpt if _valid_address(a))
    return edits


def trace_recipient(reply: ScanReply, spamd: SpamdConfig) -> List[Edit]:
    """SPEC §6.8.7: a silent copy to ``trace_addr`` when ``trace_symbol`` fired."""
    if spamd.trace_symbol and spamd.trace_addr and reply.has_symbol(spamd.trace_symbol):
        return [AddRecipient(spamd.trace_addr)]
    return []


def _may_mark(msg: MessageContext, spamd: SpamdConfig) -> bool:
    return not (msg.authenticated and spamd.spam_no_auth_header)


def mark(msg: MessageContext, reply: ScanReply, spamd: SpamdConfig) -> List[Edit]:
    """"Mark" of SPEC §6.8.3: the spam header at index 1 (replaced or added).

    For ``add header``, Rspamd may name the value (``milter.spam_header``, a string) or
    whole headers (an object) instead of the configured ones, as its own milter allows.
    """
    if reply.action == "add header" and reply.spam_headers:
        return [
            ChangeHeader(name if name is not None else spamd.spam_header, 1, _clean_value(value))
            for name, value in reply.spam_headers
            if name is None or _valid_header_name(name)
        ]
    return [ChangeHeader(spamd.spam_header, 1, _clean_value(spamd.spam_header_value))]


def new_subject(msg: MessageContext, reply: ScanReply) -> str:
    """Rspamd's subject, else ``***SPAM*** <subject>`` in full (B15), else ``***SPAM***``."""
    if reply.subject is not None:
        return reply.subject
    if msg.subject is not None:
        return "%s %s" % (SPAM_SUBJECT_PREFIX, msg.subject)
    return SPAM_SUBJECT_PREFIX


# -- the outcome of a scan -------------------------------------------------------------------------
def _reply_text(preferred: Optional[str], fallback: str) -> str:
    """Rspamd's message when it can be an SMTP reply (SPEC §3.7, B34), else ours."""
    if preferred is not None and sanitise_reply_text(preferred) is not None:
        return preferred
    return fallback


def full_outcome(msg: MessageContext, scan: RspamdScan) -> SpamOutcome:
    """SPEC §5.9 step 4 (c) and §6.8.3: what Rspamd's action means for this message."""
    spamd = msg.runtime.config.spamd
    reply = scan.reply
    action = reply.action
    edits: List[Edit] = []
    if wants_extended_headers(msg, spamd):
        edits += extended_headers(msg, scan)
    edits += requested_changes(msg, reply)
    edits += trace_recipient(reply, spamd)
    verdict: Optional[Verdict] = None
    rejected = action == "reject"
    if reply.no_action:
        summary = "no spam"
        log.info("{tag}; rspamd asked not to apply action {action}", tag=msg.tag, action=action)
    elif action == "reject":
        if spamd.spamd_never_reject:
            summary = "add header, action: reject"
            if _may_mark(msg, spamd):
                edits += mark(msg, reply, spamd)
        elif reply.reject_mode == "discard":
            summary = "discarded, action: reject"
            verdict = Verdict(Action.DISCARD)
        elif reply.reject_mode == "quarantine":
            summary = "quarantined, action: reject"
            edits.append(Quarantine(_reply_text(reply.smtp_message, spamd.reject_message)))
        else:
            summary = "rejected, action: reject"
            verdict = reject(_reply_text(reply.smtp_message, spamd.reject_message))
    elif action == "soft reject":
        # spamd_soft_fail has no effect since C 1.8.5 (SPEC §4.7): soft reject always tempfails
        summary = "delayed, action: soft reject"
        verdict = tempfail(_reply_text(reply.smtp_message, SOFT_REJECT_TEXT))
    elif action == "add header":
        summary = "action: add header"
        if _may_mark(msg, spamd):
            edits += mark(msg, reply, spamd)
    elif action == "rewrite subject":
        summary = "action: rewrite subject"
        if _may_mark(msg, spamd):
            if spamd.spamd_spam_add_header:
                edits += mark(msg, reply, spamd)
            edits.append(ChangeHeader("Subject", 1, _clean_value(new_subject(msg, reply))))
    else:
        summary = "no spam"  # greylist (after passing greylisting) and no action change nothing
    result = CheckResult(
        "spam", summary, verdict=verdict, edits=tuple(edits), details=_details(scan)
    )
    return SpamOutcome(
        result,
        action=action,
        wants_greylist=action in WANTS_GREYLIST and not reply.no_action,
        rejected=rejected,
        scan=scan,
    )


def dkim_only_outcome(msg: MessageContext, scan: RspamdScan) -> SpamOutcome:
    """SPEC §6.8.6: headers and requested changes only; the action is ignored."""
    spamd = msg.runtime.config.spamd
    reply = scan.reply
    edits: List[Edit] = []
    if wants_extended_headers(msg, spamd):
        edits += extended_headers(msg, scan)
    edits += requested_changes(msg, reply)
    edits += trace_recipient(reply, spamd)
    result = CheckResult("spam", "dkim sign only, whitelisted", edits=tuple(edits), details=_details(scan))
    return SpamOutcome(result, action=reply.action, scan=scan)


def failure_outcome(msg: MessageContext, reason: str) -> SpamOutcome:
    """SPEC §5.9 step 4 (a): TEMPFAIL with ``tempfail_on_error``, else go on unscanned."""
    spamd = msg.runtime.config.spamd
    if spamd.tempfail_on_error:
        result = CheckResult(
            "spam_failure", "delayed, temporary fail", verdict=tempfail(SERVICE_FAILURE),
            details=(("spam_error", reason),), failed=True,
        )
    else:
        result = CheckResult("spam", "ignored, temporary fail", details=(("spam_error", reason),), failed=True)
    return SpamOutcome(result)


def _details(scan: RspamdScan) -> Tuple[Tuple[str, object], ...]:
    reply = scan.reply
    return (
        ("spam_server", scan.server.name),
        ("spam_action", reply.action),
        ("spam_score", reply.score),
        ("spam_required", reply.required_score),
        ("spam_time", round(scan.elapsed, 6)),
        ("spam_attempts", scan.attempts),
    )


# -- logging (SPEC §6.8.8) -----------------------------------------------------------------------
def scan_log_line(tag: str, scan: RspamdScan) -> str:
    """``spamdscan: scan, ...``; over 900 bytes: without options, then without symbols, then cut."""
    reply = scan.reply
    head = "%s; spamdscan: scan, time: %.3f, server: %s, metric: default: [%.3f / %.3f], symbols: " % (
        tag, scan.elapsed, scan.server.name, reply.score, reply.required_score)
    symbols = sorted_symbols(reply.symbols)
    if not symbols:
        return head + "no symbols"
    line = head + ", ".join("%s(%.2f)[%s]" % (s.name, s.score, ", ".join(s.options)) for s in symbols)
    if len(line.encode("utf-8", "replace")) <= MAX_LOG_LINE:
        return line
    line = head + ", ".join("%s(%.2f)[]" % (s.name, s.score) for s in symbols)
    if len(line.encode("utf-8", "replace")) <= MAX_LOG_LINE:
        return line
    line = head
    return line.encode("utf-8", "replace")[:MAX_LOG_LINE].decode("utf-8", "ignore")


def _log_scan(msg: MessageContext, scan: RspamdScan) -> None:
    reply = scan.reply
    if reply.unknown_action is not None:
        log.warn("{tag}; rspamd sent no known action ({action!r}), assuming no action",
                 tag=msg.tag, action=reply.unknown_action)
    log.info("{line}", line=scan_log_line(msg.tag, scan), tag=msg.tag, server=scan.server.name,
             action=reply.action, score=reply.score, required_score=reply.required_score,
             scan_time=scan.elapsed, attempts=scan.attempts, message_id=reply.message_id)


# -- also_check: a second opinion that never decides ----------------------------------------------
def _compare(msg: MessageContext, body: MessageBody, main: Optional[RspamdScan],
             other: Optional[RspamdScan]) -> "Deferred[None]":
    """Log the comparison and keep messages whose actions differ in ``diff_dir``."""
    if main is None or other is None:
        return succeed(None)
    a, b = main.reply, other.reply
    log.info("{tag}; also_check: {server} says {action} [{score:.2f}], {main_server} said {main_action} [{main_score:.2f}]",
             tag=msg.tag, server=other.server.name, action=b.action, score=b.score,
             main_server=main.server.name, main_action=a.action, main_score=a.score)
    diff_dir = msg.runtime.config.spamd.diff_dir
    if a.action == b.action or not diff_dir:
        return succeed(None)
    summary = (
        "queue id: %s\nmain: %s: %s [%.2f / %.2f]\nalso_check: %s: %s [%.2f / %.2f]\n" % (
            msg.queue_id_or_noqueue, main.server.name, a.action, a.score, a.required_score,
            other.server.name, b.action, b.score, b.required_score)
    ).encode("utf-8", "replace")
    base = os.path.join(diff_dir, msg.tag)

    def write(data: bytes) -> "Deferred[None]":
        return msg.runtime.run_blocking(_write_diff, base, data, summary)

    def failed(failure: Failure) -> None:
        log.failure("{tag}; also_check: cannot write the message to {dir}", failure, tag=msg.tag, dir=diff_dir)

    return body.read_all().addCallback(write).addErrback(failed)


def _write_diff(base: str, message: bytes, summary: bytes) -> None:
    """Runs in the thread pool: ``<tag>.msg`` (what both servers scanned) and ``<tag>.diff``."""
    for suffix, data in ((".msg", message), (".diff", summary)):
        fd = os.open(base + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


# -- entry point -------------------------------------------------------------------------------------
def scan(msg: MessageContext, dkim_only: bool) -> "Deferred[SpamOutcome]":
    """Scan the message with Rspamd (full or DKIM-only); the Deferred never fails."""
    client: Optional[RspamdClient] = msg.runtime.rspamd
    if client is None or msg.spool is None:
        return succeed(SpamOutcome(CheckResult("spam", "skipped, no spamd servers defined")))
    spamd = msg.runtime.config.spamd
    request = scan_request(msg, dkim_only)
    reasons: List[str] = []

    def send(body: MessageBody) -> "Deferred[SpamOutcome]":
        main = client.scan(request, body).addCallbacks(lambda s: s, scan_failed)
        other = None if dkim_only else client.scan_also(request, body)
        if other is None:
            return main.addCallback(outcome)
        other.addErrback(lambda f: _also_failed(f, msg))
        both: "Deferred[Any]" = gatherResults([main, other], consumeErrors=True)
        both.addCallback(lambda pair: _compare(msg, body, pair[0], pair[1]).addCallback(lambda _: pair[0]))
        return both.addCallback(outcome)

    def scan_failed(failure: Failure) -> Optional[RspamdScan]:
        failure.trap(RspamdError)
        reason = failure.getErrorMessage()
        log.warn("{tag}; spamdscan: scan failed after all retries: {reason}", tag=msg.tag, reason=reason)
        reasons.append(reason)
        return None

    def outcome(result: Optional[RspamdScan]) -> SpamOutcome:
        if result is None:
            return failure_outcome(msg, reasons[0] if reasons else "scan failed")
        _log_scan(msg, result)
        if result.reply.message_id:
            msg.log_fields["message_id"] = result.reply.message_id
        return dkim_only_outcome(msg, result) if dkim_only else full_outcome(msg, result)

    def internal(failure: Failure) -> SpamOutcome:
        log.failure("{tag}; spamdscan: internal error", failure, tag=msg.tag)
        return failure_outcome(msg, "internal error: %s" % (failure.getErrorMessage(),))

    d = prepare_body(msg.spool, spamd.compression, msg.runtime.run_blocking)
    return d.addCallback(send).addErrback(internal)


def _also_failed(failure: Failure, msg: MessageContext) -> None:
    """The comparison scan failing never matters to the message."""
    log.info("{tag}; also_check: scan failed: {reason}", tag=msg.tag, reason=failure.getErrorMessage())
    return None
