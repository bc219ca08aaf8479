"""Spam scanning with Rspamd (SPEC §5.9 steps 4-5, §6.8).

``check`` sends the message with its SMTP context to Rspamd and turns the reply
into a ``CheckResult``: the verdict Rspamd's action calls for (§6.8.3), and the
header and envelope changes in the order of §6.8.5 - extended headers,
``dkim-signature``, the changes Rspamd asks for in its ``milter``/``rmilter``
block, the trace recipient, then the action's own Mark/Subject.  A scan that
fails after every retry is a ``failed`` result whose verdict is the
``tempfail_on_error`` TEMPFAIL, or nothing.  The pipeline decides whether a
full scan, a DKIM-only scan or none happens, and runs EOM greylisting when
``wants_greylist`` says Rspamd asked for it.

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
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.python.failure import Failure

from rmilter.backends.rspamd import (
    DKIM_ONLY_SETTINGS,
    MAX_HEADER_EDITS,
    MessageBody,
    ScanReply,
    ScanRequest,
    Symbol,
    prepare_body,
)
from rmilter.backends.upstream import SCAN_CANCELLED
from rmilter.config.schema import SpamdConfig
if TYPE_CHECKING:  # issue 19: the client (treq) is loaded only when spamd servers are configured
    from rmilter.backends.rspamd import RspamdClient, RspamdScan
from rmilter.context import MessageContext
from rmilter.deps import Deps
from rmilter.log import Logger
from rmilter.verdict import (
    SERVICE_FAILURE,
    Action,
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    Check,
    CheckResult,
    DeleteRecipient,
    Edit,
    InsertHeader,
    Quarantine,
    Verdict,
    header_value_safe,
    reject,
    sanitise_reply_text,
    skipped,
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


def action_of(result: CheckResult) -> Optional[str]:
    """Rspamd's action for a scan that happened, else None."""
    action = result.details.get("spam_action")
    return action if isinstance(action, str) else None


def wants_greylist(result: CheckResult) -> bool:
    """Rspamd said greylist, add header or rewrite subject (and not ``milter.no_action``): SPEC §5.9 4b."""
    return (
        result.check is Check.SPAM
        and not result.failed
        and not result.details.get("spam_dkim_only")
        and action_of(result) in WANTS_GREYLIST
        and not result.details.get("spam_no_action")
    )


def sender_spf_pass(result: CheckResult) -> bool:
    """Rspamd scanned the message and its SPF check passed for the envelope sender (``R_SPF_ALLOW``)."""
    return result.check is Check.SPAM and not result.failed and result.details.get("spf_allow") is True


def rejected(result: CheckResult) -> bool:
    """Rspamd said reject (whatever ``spamd_never_reject`` made of it): the message is a spam copy."""
    return result.check is Check.SPAM and action_of(result) == "reject" and not result.details.get("spam_dkim_only")


# -- request ------------------------------------------------------------------------------------
def scan_request(msg: MessageContext, spamd: SpamdConfig, dkim_only: bool) -> ScanRequest:
    """The SMTP context of the message as Rspamd's request headers (SPEC §6.8.1)."""
    conn = msg.connection
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
        AddHeader(name="X-Spamd-Result", value=header_value_safe(spamd_result(scan.reply))),
        AddHeader(name="X-Rspamd-Server", value=header_value_safe(scan.server.name)),
        AddHeader(name="X-Rspamd-Scan-Time", value="%.2f" % (scan.elapsed,)),
        AddHeader(name="X-Rspamd-Queue-ID", value=header_value_safe(msg.queue_id_or_noqueue)),
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
        edits.append(AddHeader(name="DKIM-Signature", value=_clean_value(signature.replace("\r", ""))))
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
                edits.append(ChangeHeader(name=name, index=index, value=""))
        elif legacy:
            continue  # C: only positive indexes in the rmilter block
        elif index == 0:
            # all occurrences, the last first so that the earlier indexes stay valid
            edits.extend(ChangeHeader(name=name, index=i, value="") for i in range(count, 0, -1))
        elif -index <= count:
            edits.append(ChangeHeader(name=name, index=count + index + 1, value=""))
    for addition in reply.add_headers:
        if not _valid_header_name(addition.name):
            log.warn("{tag}; rspamd asked to add an invalid header name {name!r}", tag=msg.tag, name=addition.name)
            continue
        value = _clean_value(addition.value)
        order = addition.order
        if order is None or order == -1:
            edits.append(AddHeader(name=addition.name, value=value))
        elif order >= 0:
            # a u32 on the wire; past the last header it means "at the end" anyway
            edits.append(InsertHeader(index=min(order, MAX_HEADER_INDEX), name=addition.name, value=value))
        else:
            # counted from the end of the headers the milter saw, as Rspamd's own milter does
            total = len(msg.headers)
            edits.append(InsertHeader(index=total + order + 1 if -order <= total else 0, name=addition.name,
                                      value=value))
    if reply.change_from is not None and _valid_address(reply.change_from):
        edits.append(ChangeFrom(address=reply.change_from))
    edits.extend(AddRecipient(address=a) for a in reply.add_rcpt if _valid_address(a))
    edits.extend(DeleteRecipient(address=a) for a in reply.del_rcpt if _valid_address(a))
    return edits


def trace_recipient(reply: ScanReply, spamd: SpamdConfig) -> List[Edit]:
    """SPEC §6.8.7: a silent copy to ``trace_addr`` when ``trace_symbol`` fired."""
    if spamd.trace_symbol and spamd.trace_addr and reply.has_symbol(spamd.trace_symbol):
        return [AddRecipient(address=spamd.trace_addr)]
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
            ChangeHeader(name=name if name is not None else spamd.spam_header, index=1, value=_clean_value(value))
            for name, value in reply.spam_headers
            if name is None or _valid_header_name(name)
        ]
    return [ChangeHeader(name=spamd.spam_header, index=1, value=_clean_value(spamd.spam_header_value))]


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


def full_outcome(msg: MessageContext, spamd: SpamdConfig, scan: RspamdScan) -> CheckResult:
    """SPEC §5.9 step 4 (c) and §6.8.3: what Rspamd's action means for this message."""
    reply = scan.reply
    action = reply.action
    edits: List[Edit] = []
    if wants_extended_headers(msg, spamd):
        edits += extended_headers(msg, scan)
    edits += requested_changes(msg, reply)
    edits += trace_recipient(reply, spamd)
    verdict: Optional[Verdict] = None
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
            edits.append(Quarantine(reason=_reply_text(reply.smtp_message, spamd.reject_message)))
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
            edits.append(ChangeHeader(name="Subject", index=1, value=_clean_value(new_subject(msg, reply))))
    else:
        summary = "no spam"  # greylist (after passing greylisting) and no action change nothing
    return CheckResult(Check.SPAM, summary, verdict=verdict, edits=tuple(edits), details=_details(scan))


def dkim_only_outcome(msg: MessageContext, spamd: SpamdConfig, scan: RspamdScan) -> CheckResult:
    """SPEC §6.8.6: headers and requested changes only; the action is ignored."""
    reply = scan.reply
    edits: List[Edit] = []
    if wants_extended_headers(msg, spamd):
        edits += extended_headers(msg, scan)
    edits += requested_changes(msg, reply)
    edits += trace_recipient(reply, spamd)
    details = _details(scan)
    details["spam_dkim_only"] = True
    return CheckResult(Check.SPAM, "dkim sign only, whitelisted", edits=tuple(edits), details=details)


def failure_outcome(spamd: SpamdConfig, reason: str) -> CheckResult:
    """SPEC §5.9 step 4 (a): TEMPFAIL with ``tempfail_on_error``, else go on unscanned."""
    if spamd.tempfail_on_error:
        return CheckResult(Check.SPAM, "delayed, temporary fail", verdict=tempfail(SERVICE_FAILURE),
                           details={"spam_error": reason}, failed=True)
    return CheckResult(Check.SPAM, "ignored, temporary fail", details={"spam_error": reason}, failed=True)


def _details(scan: RspamdScan) -> Dict[str, object]:
    reply = scan.reply
    details: Dict[str, object] = {
        "spam_server": scan.server.name,
        "spam_action": reply.action,
        "spam_score": reply.score,
        "spam_required": reply.required_score,
        "spam_time": round(scan.elapsed, 6),
        "spam_attempts": scan.attempts,
    }
    if reply.no_action:
        details["spam_no_action"] = True
    if reply.has_symbol("R_SPF_ALLOW"):
        details["spf_allow"] = True
    if reply.message_id:
        details["message_id"] = reply.message_id
    return details


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
    if reply.dropped_edits is not None:
        log.warn("{tag}; rspamd asked for more than {limit} edits of a kind; dropped: {dropped}",
                 tag=msg.tag, limit=MAX_HEADER_EDITS, dropped=reply.dropped_edits)
    log.info("{line}", line=scan_log_line(msg.tag, scan), tag=msg.tag, server=scan.server.name,
             action=reply.action, score=reply.score, required_score=reply.required_score,
             scan_time=scan.elapsed, attempts=scan.attempts, message_id=reply.message_id)


# -- also_check: a second opinion that never decides ----------------------------------------------
def _compare(msg: MessageContext, deps: Deps, body: MessageBody, main: Optional[RspamdScan],
             other: Optional[RspamdScan]) -> "Deferred[None]":
    """Log the comparison and keep messages whose actions differ in ``diff_dir``."""
    if main is None or other is None:
        return succeed(None)
    a, b = main.reply, other.reply
    log.info("{tag}; also_check: {server} says {action} [{score:.2f}], {main_server} said {main_action} [{main_score:.2f}]",
             tag=msg.tag, server=other.server.name, action=b.action, score=b.score,
             main_server=main.server.name, main_action=a.action, main_score=a.score)
    diff_dir = deps.config.spamd.diff_dir
    if a.action == b.action or not diff_dir:
        return succeed(None)
    summary = (
        "queue id: %s\nmain: %s: %s [%.2f / %.2f]\nalso_check: %s: %s [%.2f / %.2f]\n" % (
            msg.queue_id_or_noqueue, main.server.name, a.action, a.score, a.required_score,
            other.server.name, b.action, b.score, b.required_score)
    ).encode("utf-8", "replace")
    base = os.path.join(diff_dir, msg.tag)

    def write(data: bytes) -> "Deferred[None]":
        return deps.run_blocking(_write_diff, base, data, summary)

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
def check(message: MessageContext, deps: Deps, *, dkim_only: bool = False) -> "Deferred[CheckResult]":
    """Scan the message with Rspamd (full, or DKIM-only for mail it would not scan); never fails."""
    client: Optional[RspamdClient] = deps.rspamd
    if client is None or message.spool is None:
        return succeed(skipped(Check.SPAM, "skipped, no spamd servers defined"))
    spamd = deps.config.spamd
    request = scan_request(message, spamd, dkim_only)
    reasons: List[str] = []

    def send(body: MessageBody) -> "Deferred[CheckResult]":
        main = client.scan(request, body).addCallbacks(lambda s: s, scan_failed)
        other = None if dkim_only else client.scan_also(request, body)
        if other is None:
            return main.addCallback(outcome)
        other.addErrback(lambda f: _also_failed(f, message))
        both: "Deferred[Any]" = gatherResults([main, other], consumeErrors=True)
        both.addCallback(lambda pair: _compare(message, deps, body, pair[0], pair[1]).addCallback(lambda _: pair[0]))
        return both.addCallback(outcome)

    def scan_failed(failure: Failure) -> Optional[RspamdScan]:
        from rmilter.backends.rspamd import RspamdError  # loaded already: there is a client

        failure.trap(RspamdError)
        reason = failure.getErrorMessage()
        if failure.value.errors[-1:] == (SCAN_CANCELLED,):
            log.info("{tag}; spamdscan: scan cancelled ({reason})", tag=message.tag, reason=reason)
        else:
            log.warn("{tag}; spamdscan: scan failed after all retries: {reason}", tag=message.tag, reason=reason)
        reasons.append(reason)
        return None

    def outcome(result: Optional[RspamdScan]) -> CheckResult:
        if result is None:
            return failure_outcome(spamd, reasons[0] if reasons else "scan failed")
        _log_scan(message, result)
        return dkim_only_outcome(message, spamd, result) if dkim_only else full_outcome(message, spamd, result)

    def internal(failure: Failure) -> CheckResult:
        if failure.check(CancelledError):  # cancelled before the scan began (body compression)
            return failure_outcome(spamd, SCAN_CANCELLED)
        log.failure("{tag}; spamdscan: internal error", failure, tag=message.tag)
        return failure_outcome(spamd, "internal error: %s" % (failure.getErrorMessage(),))

    d = prepare_body(message.spool, spamd.compression, deps.run_blocking)
    return d.addCallback(send).addErrback(internal)


def _also_failed(failure: Failure, msg: MessageContext) -> None:
    """The comparison scan failing never matters to the message."""
    log.info("{tag}; also_check: scan failed: {reason}", tag=msg.tag, reason=failure.getErrorMessage())
    return None
