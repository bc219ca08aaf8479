"""The order of checks for one message (SPEC §5, decision matrix §5.11).

The milter session calls one method per SMTP stage with the connection or
message context and sends back whatever ``Verdict`` it gets.  This module
decides *which* checks run and *when*; each check lives in its own module in
``rmilter.checks`` and ``rmilter.verdict.decide`` orders their results.
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from rmilter.log import Logger
from twisted.python.failure import Failure

from rmilter.checks import copies, dkim, greylist, ratelimit, replies, spam, virus
from rmilter.context import ConnectionContext, MessageContext, Recipient
from rmilter.runtime import Runtime
from rmilter.spool import spool_head
from rmilter.verdict import (
    BARE_TEMPFAIL,
    AddHeader,
    CONTINUE,
    Action,
    CheckResult,
    Verdict,
    decide,
    deciding_result,
)

log = Logger(namespace="rmilter.pipeline")


class Pipeline:
    """Stage handlers shared by every connection; ``current_runtime`` follows reloads."""

    def __init__(self, current_runtime: Callable[[], Runtime]) -> None:
        self.current_runtime = current_runtime

    # -- which stages may answer something else than CONTINUE (for milter negotiation) -----
    def stages_needing_replies(self) -> Tuple[str, ...]:
        """Stages whose reply may not be CONTINUE with the current config.

        The milter layer asks the MTA not to wait for replies at every other stage
        (SMFIP_NR_*), which saves a round trip per command.
        """
        config = self.current_runtime().config
        stages = ["eom"]
        if config.limits_active:
            stages.append("rcpt")
        if config.greylisting_active and not config.spamd.spamd_greylist:
            stages.append("data")
        return tuple(stages)

    # -- connection stages -------------------------------------------------------------------
    def connect(self, conn: ConnectionContext) -> Verdict:
        conn.daemon_name = conn.macros.get("{daemon_name}")
        conn.mta_hostname = conn.macros.get("j")
        log.debug(
            "accepted connection from {mta}; client: {ip}:{port} ({hostname})",
            mta=conn.mta_hostname or "undefined",
            ip=conn.client_address,
            port=conn.client_port,
            hostname=conn.hostname or "unknown",
        )
        return CONTINUE

    def helo(self, conn: ConnectionContext, helo: str) -> Verdict:
        conn.helo = helo[:324]
        return CONTINUE

    # -- message stages ----------------------------------------------------------------------
    def mail(self, conn: ConnectionContext, argv: Sequence[str]) -> Tuple[MessageContext, Verdict]:
        """Start a new message (SPEC §5.4); the caller has reset any previous one."""
        runtime = self.current_runtime()
        runtime.acquire()
        conn.messages += 1
        msg = MessageContext(connection=conn, runtime=runtime, started=time.time())
        msg.esmtp_args = tuple(argv[1:])
        msg.set_sender(argv[0] if argv else "", conn.macros.get("{mail_addr}"))
        login = conn.macros.get("{auth_authen}")
        config = runtime.config
        if login:
            msg.user = login
            msg.sasl_authenticated = True
            log.debug("{tag}; client is authenticated as: {user}", tag=msg.tag, user=login)
        elif msg.client_address in config.main.our_networks:
            msg.user = msg.envelope_from
            log.debug("{tag}; client comes from our network: {sender}", tag=msg.tag, sender=msg.envelope_from)
        return msg, CONTINUE

    def rcpt(self, msg: MessageContext, argv: Sequence[str]) -> "Deferred[Verdict]":
        """SPEC §5.5: record the recipient unless its rate limit is exceeded."""
        address = (argv[0] if argv else "") or "<>"
        config = msg.runtime.config
        recipient = Recipient(address, whitelisted=config.main.whitelist.matches(address))
        if not config.limits_active:
            msg.recipients.append(recipient)
            return succeed(CONTINUE)

        def checked(verdict: Optional[Verdict]) -> Verdict:
            if verdict is not None and verdict.ends_message:
                return verdict
            msg.recipients.append(recipient)
            return CONTINUE

        return ratelimit.check(msg, address).addCallback(checked)

    def data(self, msg: MessageContext) -> "Deferred[Verdict]":
        """SPEC §5.6: queue id, strict flag, and greylisting at DATA when rspamd does not decide it."""
        config = msg.runtime.config
        msg.queue_id = msg.connection.macros.get("i") or None
        if msg.authenticated and not config.main.strict_auth:
            msg.strict = False
        if (
            not config.spamd.spamd_greylist
            and not msg.authenticated
            and msg.client_address is not None
            and config.greylisting_active
        ):
            def greylisted(result: CheckResult) -> Verdict:
                msg.log_fields["greylist"] = result.log
                return result.verdict if result.verdict is not None else CONTINUE

            return greylist.check(msg, with_data_hash=False).addCallback(greylisted)
        return succeed(CONTINUE)

    def header(self, msg: MessageContext, name: str, value: str) -> Verdict:
        """SPEC §5.7: remember the header; start reply lookups for In-Reply-To / References."""
        msg.headers.append((name, value))
        lname = name.lower()
        if lname == "return-path":
            msg.has_return_path = True
        elif lname == "subject":
            msg.subject = value
        elif lname in ("in-reply-to", "references"):
            ids = [value.strip()] if lname == "in-reply-to" else value.split()
            replies.lookup(msg, [i for i in ids if i])
        return CONTINUE

    def eoh(self, msg: MessageContext) -> Verdict:
        """SPEC §5.8: the spool head is complete once the headers are."""
        self._ensure_spool(msg)
        return CONTINUE

    def body(self, msg: MessageContext, chunk: bytes) -> "Deferred[Verdict]":
        spool = self._ensure_spool(msg)
        pending = spool.append(chunk)
        if pending is None:
            return succeed(CONTINUE)
        return pending.addCallbacks(lambda _: CONTINUE, lambda f: self._spool_failed(msg, f))

    def _spool_failed(self, msg: MessageContext, failure: Failure) -> Verdict:
        log.failure("{tag}; cannot write spool file", failure, tag=msg.tag)
        return BARE_TEMPFAIL

    def _ensure_spool(self, msg: MessageContext):  # type: ignore[no-untyped-def]
        if msg.spool is None:
            conn = msg.connection
            msg.spool = msg.runtime.new_spool()
            msg.spool.set_head(
                spool_head(
                    helo=conn.helo,
                    hostname=conn.client_hostname,
                    client_address=conn.client_address,
                    tag=msg.tag,
                    headers=msg.headers,
                    has_return_path=msg.has_return_path,
                    envelope_from=msg.envelope_from,
                    recipients=msg.recipient_addresses,
                )
            )
        return msg.spool

    def eom(self, msg: MessageContext) -> "Deferred[Verdict]":
        return self._eom(msg).addErrback(self._eom_failed, msg)

    def _eom_failed(self, failure: Failure, msg: MessageContext) -> Verdict:
        log.failure("{tag}; internal error at end of message", failure, tag=msg.tag)
        msg.log_fields.setdefault("spam", "skipped(internal failure)")
        msg.log_fields.setdefault("virus", "skipped(internal failure)")
        msg.log_fields.setdefault("dkim", "skipped(internal failure)")
        return BARE_TEMPFAIL

    @inlineCallbacks
    def _eom(self, msg: MessageContext):  # type: ignore[no-untyped-def]
        """SPEC §5.9, with rspamd and clamd scanning at the same time."""
        config = msg.runtime.config
        fields = msg.log_fields
        if msg.queue_id is None:
            msg.queue_id = msg.connection.macros.get("i") or None
        spool = self._ensure_spool(msg)
        try:
            yield spool.finish()
        except Exception:
            log.failure("{tag}; cannot write spool file", tag=msg.tag)
            fields.update(spam="skipped(internal failure)", virus="skipped(internal failure)",
                          dkim="skipped(internal failure)")
            return BARE_TEMPFAIL
        yield replies.settle(msg)

        oversized = config.main.max_size > 0 and spool.size > config.main.max_size
        ip = msg.client_address
        results: List[CheckResult] = []

        # which scans run (SPEC §5.11)
        spam_mode = self._spam_mode(msg, oversized)
        virus_exempt = msg.recipient_whitelisted or ip in config.clamav.whitelist
        scan_virus = bool(config.clamav.servers) and not oversized and not virus_exempt
        virus_scan: Optional[Deferred] = virus.scan(msg) if scan_virus else None

        # -- rspamd (steps 4-5) ----------------------------------------------------------------
        spam_failed = False
        spam_outcome = None
        if spam_mode in ("full", "dkim"):
            spam_outcome = yield spam.scan(msg, dkim_only=(spam_mode == "dkim"))
            results.append(spam_outcome.result)
            fields["spam"] = spam_outcome.result.log
            spam_failed = spam_outcome.result.failed
            if spam_outcome.rejected:
                yield copies.publish(msg, "spam")
            if (
                spam_mode == "full"
                and not spam_failed
                and spam_outcome.wants_greylist
                and config.spamd.spamd_greylist
                and not msg.authenticated
                and ip is not None
                and config.greylisting_active
            ):
                grey = yield greylist.check(msg, with_data_hash=True)
                fields["greylist"] = grey.log
                results.append(grey)
                if grey.verdict is not None:
                    fields["spam"] = "greylisted, action: %s" % (spam_outcome.action,)
        else:
            fields["spam"] = spam_mode

        ended_by = deciding_result(results)
        if ended_by is not None:
            self._skip_after(msg, ended_by, virus_scan)
            return ended_by.verdict

        # -- pub/sub copy (step 6) --------------------------------------------------------------
        if not oversized and not spam_failed:
            yield copies.publish(msg, "copy")

        # -- clamd (steps 7-8) ------------------------------------------------------------------
        if virus_scan is not None:
            virus_result = yield virus_scan
            results.append(virus_result)
            fields["virus"] = virus_result.log
        else:
            fields["virus"] = self._virus_skip_reason(msg, oversized, virus_exempt)

        verdict = decide(results)
        if verdict.action is not Action.ACCEPT:
            fields["dkim"] = "skipped, clamav virus" if verdict.action is Action.REJECT else "skipped, clamav tempfail"
            return verdict

        # -- accepted: rate update, DKIM, remember Message-ID (steps 9-10, SPEC §6.4) -----------
        yield ratelimit.update(msg)
        dkim_result = yield dkim.sign(msg)
        fields["dkim"] = dkim_result.log
        results.append(dkim_result)
        replies.remember(msg)
        if config.main.trace_header:
            results.append(trace_result(msg, config.main.trace_header))
        return decide(results)

    def _spam_mode(self, msg: MessageContext, oversized: bool) -> str:
        """"full", "dkim", or the summary-line reason why rspamd is skipped (SPEC §5.9 step 4-5)."""
        config = msg.runtime.config
        if oversized:
            return "skipped(oversized)"
        if not config.spamd.servers:
            return "skipped, no spamd servers defined"
        skip_reason = None
        if msg.recipient_whitelisted:
            skip_reason = "skipped, whitelisted"
        elif msg.reply_to_our_mail is not None:
            skip_reason = "skipped, reply to our message"
        elif msg.authenticated and not config.main.strict_auth:
            skip_reason = "ignored, authenticated user"
        elif not msg.strict:
            skip_reason = "skipped, whitelisted"
        elif msg.client_address in config.spamd.whitelist:
            skip_reason = "skipped, whitelisted"
        if skip_reason is None:
            return "full"
        if config.dkim.rspamd_sign:
            return "dkim"
        return skip_reason

    @staticmethod
    def _virus_skip_reason(msg: MessageContext, oversized: bool, exempt: bool) -> str:
        config = msg.runtime.config
        if oversized:
            return "skipped(oversized)"
        if not config.clamav.servers:
            return "skipped, no av servers"
        if msg.recipient_whitelisted:
            return "skipped, recipient whitelist"
        return "skipped, ip whitelist"

    def _skip_after(self, msg: MessageContext, ended_by: CheckResult, virus_scan: Optional[Deferred]) -> None:
        """Log values for the checks a spam-stage verdict made unnecessary (SPEC §8.4)."""
        if virus_scan is not None:
            virus_scan.cancel()  # the result no longer matters: free the clamd connection now
        if ended_by.check == "spam_failure":
            reason = "spamd tempfail"
        elif ended_by.check == "greylist":
            reason = "spamd greylist"
        elif ended_by.verdict is not None and ended_by.verdict.action is Action.TEMPFAIL:
            reason = "spam soft reject"
        else:
            reason = "spam detected"
        msg.log_fields["virus"] = msg.log_fields["dkim"] = "skipped, " + reason

    # -- end of transaction ------------------------------------------------------------------
    def finish(self, msg: MessageContext, verdict: Optional[Verdict]) -> None:
        """The message is over (EOM answered, ABORT, QUIT or lost connection): log and clean up."""
        if msg.spool is not None:
            msg.spool.close()
        if verdict is not None:
            log_summary(msg, verdict)
        msg.runtime.release()


def trace_result(msg: MessageContext, header: str) -> CheckResult:
    """The optional administrator trace header (extension directive ``trace_header``)."""
    from rmilter import __version__

    value = "rmilter %s; tag=%s; queue_id=%s; client=%s; user=%s" % (
        __version__,
        msg.tag,
        msg.queue_id_or_noqueue,
        msg.client_address or "unknown",
        msg.user or "unauthorized",
    )
    return CheckResult("trace", "", edits=(AddHeader(header, value),))


def log_summary(msg: MessageContext, verdict: Verdict) -> None:
    """One line per message, SPEC §8.4, also a structured event with every field.

    The text is formatted here with ``%`` once: a ``{}`` format of twenty fields parsed again by
    the log observer for every message costs more than a milter step.
    """
    fields = msg.log_fields
    first = msg.recipients[0].address if msg.recipients else "<>"  # B35: no recipients is fine
    published = fields.get("published")
    event = dict(
        tag=msg.tag,
        queue_id=msg.queue_id_or_noqueue,
        message_id=fields.get("message_id", "undef"),
        ip=msg.client_address or "unknown",
        sender=msg.envelope_from,
        rcpt=first,
        rcpt_count=len(msg.recipients),
        user=msg.user or "unauthorized",
        spam=fields.get("spam", "unknown"),
        virus=fields.get("virus", "unknown"),
        dkim=fields.get("dkim", "unsigned"),
        published=published,
        verdict=verdict.action.value,
        reply=(None if verdict.reply is None else "%s %s %s" % (verdict.reply.code, verdict.reply.ecode, verdict.reply.text)),
        greylist=fields.get("greylist"),
        reply_to=msg.reply_to_our_mail,
        duration=round(time.time() - msg.started, 6),
    )
    text = (
        "%(tag)s; msg done: queue_id: %(queue_id)s; message id: %(message_id)s; ip: %(ip)s; "
        "from: <%(sender)s>; rcpt: %(rcpt)s (%(rcpt_count)d total); user: %(user)s; "
        "spam scan: %(spam)s; virus scan: %(virus)s; dkim: %(dkim)s" % event
    )
    if published:
        text += "; " + published
    if msg.reply_to_our_mail:
        text += "; reply to our message " + msg.reply_to_our_mail
    text += "; verdict: " + verdict.action.value
    if event["reply"]:
        text += " (%s)" % event["reply"]
    log.info("{summary_text}", summary_text=text, summary=True, **event)
