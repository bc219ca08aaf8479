"""Which checks run at which stage of a message (SPEC §5, decision matrix §5.11), nothing more.

The milter session calls one method per SMTP stage and sends back whatever
``Verdict`` it gets.  Every check is ``check(message, deps) -> Deferred[CheckResult]``
(``rmilter.checks``); this module decides *which* run and *when*, hands each the
message and the dependencies of the configuration generation the message started
with, and keeps their results.  ``rmilter.verdict.decide`` orders the results,
``rmilter.summary`` turns them into the summary line.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Set, Tuple

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.python.failure import Failure

from rmilter.checks import copies, replies, spam
from rmilter.checks import copies as copies_check
from rmilter.checks import replies as replies_check
from rmilter.checks import spam as spam_check
from rmilter.checks import dkim as dkim_check
from rmilter.checks import greylist as greylist_check
from rmilter.checks import ratelimit as ratelimit_check
from rmilter.checks import trace as trace_check
from rmilter.checks import virus as virus_check
from rmilter.context import ConnectionContext, MessageContext, Recipient
from rmilter.deps import Deps
from rmilter.log import Logger
from rmilter.runtime import Runtime
from rmilter.spool import Spool, spool_head
from rmilter.summary import log_summary
from rmilter.verdict import (
    BARE_TEMPFAIL,
    CONTINUE,
    HEADERS_TOO_LARGE,
    Action,
    MessageAbandoned,
    Check,
    CheckResult,
    Verdict,
    decide,
    deciding_result,
    dry_run_result,
    skipped,
)

log = Logger(namespace="rmilter.pipeline")

#: a check's entry point: ``(message, deps, **stage options) -> Deferred[CheckResult]``
CheckFunction = Callable[..., "Deferred[CheckResult]"]


@dataclass(frozen=True)
class Checks:
    """The entry points the pipeline calls; a test hands in recorders instead of patching modules."""

    ratelimit: CheckFunction = ratelimit_check.check
    ratelimit_record: CheckFunction = ratelimit_check.record
    greylist: CheckFunction = greylist_check.check
    replies: CheckFunction = replies_check.check
    replies_record: CheckFunction = replies_check.record
    spam: CheckFunction = spam_check.check
    virus: CheckFunction = virus_check.check
    copies: CheckFunction = copies_check.check
    dkim: CheckFunction = dkim_check.check
    trace: CheckFunction = trace_check.check


#: observes every check result with the seconds it took (metrics)
ResultObserver = Callable[[CheckResult, float], None]
#: observes every finished message: its results, its verdict and its summary line (metrics)
MessageObserver = Callable[[MessageContext, List[CheckResult], Verdict, Optional[str]], None]


@dataclass
class Transaction:
    """The pipeline's bookkeeping for one message: the message, its generation, its results."""

    message: MessageContext
    runtime: Runtime
    deps: Deps
    #: SPEC §5.6: strict checks apply (off for authenticated senders without strict_auth, replies)
    strict: bool = True
    #: the replies check, started once the headers are complete, waited for at EOM
    replies: Optional["Deferred[CheckResult]"] = None
    #: every result so far, in the order the checks ended (the summary line is built from them)
    results: List[CheckResult] = field(default_factory=list)
    #: name + value bytes of the headers so far (bounded by ``header_limit``)
    header_bytes: int = 0
    #: the MTA closed the connection while a stage waited (``Pipeline.abandon``)
    abandoned: bool = False
    #: the backend scans in flight (Rspamd, clamd), cancelled when the message is abandoned
    scans: Set["Deferred[CheckResult]"] = field(default_factory=set)

    @property
    def tag(self) -> str:
        return self.message.tag


def header_limit(main: Any) -> int:
    """Bytes the header section of one message may take: one largest frame always fits."""
    return max(main.spool_memory_limit, main.max_frame_size)


class Pipeline:
    """Stage handlers shared by every connection; ``current_runtime`` follows reloads."""

    def __init__(self, current_runtime: Callable[[], Runtime], checks: Checks = Checks()) -> None:
        self.current_runtime = current_runtime
        self.checks = checks
        self.observers: List[ResultObserver] = []
        self.message_observers: List[MessageObserver] = []

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

    # -- running one check -------------------------------------------------------------------
    def _run(self, txn: Transaction, check: CheckFunction, **options: Any) -> "Deferred[CheckResult]":
        """Run one check for the message; its result is kept (and observed) when it arrives.

        Every result enters the transaction through ``_keep``/``_keep_result``: there a check in
        dry run has its demanded verdict turned into a "would" (``verdict.dry_run_result``), so
        every stage below sees a result that let the message pass.
        """
        if txn.abandoned:
            return fail(MessageAbandoned())
        observed = bool(self.observers)
        started = txn.deps.clock.seconds() if observed else 0.0
        running = check(txn.message, txn.deps, **options)
        if running.called and isinstance(running.result, CheckResult):
            # answered at once (most checks, most of the time): no callback to run
            result = running.result
            if observed:
                kept = self._keep(txn, result, txn.deps.clock.seconds() - started)
                return running if kept is result else succeed(kept)
            dry_run = txn.runtime.dry_run
            if dry_run and result.check in dry_run:
                return succeed(self._keep_result(result, txn))
            txn.results.append(result)
            return running
        if observed:
            return running.addCallback(self._ended, txn, started)
        return running.addCallback(self._keep_result, txn)

    @staticmethod
    def _keep_result(result: CheckResult, txn: Transaction) -> CheckResult:
        if result.check in txn.runtime.dry_run:
            result = dry_run_result(result)
        txn.results.append(result)
        return result

    def _ended(self, result: CheckResult, txn: Transaction, started: float) -> CheckResult:
        return self._keep(txn, result, txn.deps.clock.seconds() - started)

    def _run_cancellable(self, txn: Transaction, check: CheckFunction) -> "Deferred[CheckResult]":
        """``_run`` for a check the message may stop needing (clamd while Rspamd decides).

        Cancelling the returned Deferred cancels the check; what it then answers is not the
        message's result and is not kept.
        """
        clock = txn.deps.clock
        started = clock.seconds()
        running = check(txn.message, txn.deps)
        cancelled: List[bool] = []

        def cancel(_: "Deferred[CheckResult]") -> None:
            cancelled.append(True)
            running.cancel()

        outcome: "Deferred[CheckResult]" = Deferred(cancel)

        def ended(result: Any) -> None:
            if outcome.called:
                return
            if isinstance(result, Failure):  # checks never fail: a bug, answered as one (bare TEMPFAIL)
                outcome.errback(result)
                return
            if not cancelled:
                result = self._keep(txn, result, clock.seconds() - started)
            outcome.callback(result)

        running.addBoth(ended)
        return self._scan_in_flight(txn, outcome)

    @staticmethod
    def _scan_in_flight(txn: Transaction, scan: "Deferred[CheckResult]") -> "Deferred[CheckResult]":
        """Remember a backend scan until it ends, for ``abandon`` to cancel.

        (``called`` is no test: a Deferred waiting on a chained one is called but not done.)"""
        txn.scans.add(scan)

        def ended(result: Any) -> Any:
            txn.scans.discard(scan)
            return result

        scan.addBoth(ended)
        return scan

    def abandon(self, txn: Transaction) -> None:
        """The MTA closed the connection while a stage waited (SPEC §5.10): stop working for it.

        Postfix gives up on a milter after ``milter_content_timeout`` and retries the message
        later; scanning on would load an Rspamd that is already behind with work nobody waits
        for, and record rates, replies and signatures for a message that was not delivered.  The
        scans in flight are cancelled (their connections closed), no further check starts, and
        the stage's Deferred fires soon after with a verdict the session drops.
        """
        if txn.abandoned:
            return
        txn.abandoned = True
        scans = list(txn.scans)
        if scans:
            log.info("{tag}; the MTA closed the connection; {count} scan(s) in flight cancelled",
                     tag=txn.tag, count=len(scans))
        for scan in scans:
            scan.cancel()

    def _keep(self, txn: Transaction, result: CheckResult, seconds: float = 0.0) -> CheckResult:
        if result.check in txn.runtime.dry_run:
            result = dry_run_result(result)
        txn.results.append(result)
        if not self.observers:
            return result
        for observer in self.observers:
            try:
                observer(result, seconds)
            except Exception:
                log.failure("{tag}; result observer failed", tag=txn.tag)
        return result

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
    def mail(self, conn: ConnectionContext, argv: Sequence[str]) -> Tuple[Transaction, Verdict]:
        """Start a new message (SPEC §5.4); the caller has reset any previous one."""
        runtime = self.current_runtime()
        runtime.acquire()
        conn.messages += 1
        msg = MessageContext(connection=conn, started=time.time())
        msg.esmtp_args = tuple(argv[1:])
        msg.set_sender(argv[0] if argv else "", conn.macros.get("{mail_addr}"))
        login = conn.macros.get("{auth_authen}")
        deps = runtime.deps
        if login:
            msg.user = login
            msg.sasl_authenticated = True
            log.debug("{tag}; client is authenticated as: {user}", tag=msg.tag, user=login)
        elif msg.client_address in deps.config.main.our_networks:
            msg.user = msg.envelope_from
            log.debug("{tag}; client comes from our network: {sender}", tag=msg.tag, sender=msg.envelope_from)
        return Transaction(msg, runtime, deps), CONTINUE

    def rcpt(self, txn: Transaction, argv: Sequence[str]) -> "Deferred[Verdict]":
        """SPEC §5.5: record the recipient unless its rate limit is exceeded."""
        address = (argv[0] if argv else "") or "<>"
        config = txn.deps.config
        recipient = Recipient(address, whitelisted=config.main.whitelist.matches(address))
        if not config.limits_active:
            txn.message.recipients.append(recipient)
            return succeed(CONTINUE)

        def checked(result: CheckResult) -> Verdict:
            if result.demands_verdict:
                assert result.verdict is not None
                return result.verdict
            txn.message.recipients.append(recipient)
            return CONTINUE

        return self._run(txn, self.checks.ratelimit, recipient=address).addCallback(checked)

    def data(self, txn: Transaction) -> "Deferred[Verdict]":
        """SPEC §5.6: queue id, strict flag, and greylisting at DATA when rspamd does not decide it."""
        msg, config = txn.message, txn.deps.config
        msg.queue_id = msg.connection.macros.get("i") or None
        if msg.authenticated and not config.main.strict_auth:
            txn.strict = False
        if (
            not config.spamd.spamd_greylist
            and not msg.authenticated
            and msg.client_address is not None
            and config.greylisting_active
        ):
            def greylisted(result: CheckResult) -> Verdict:
                return result.verdict if result.verdict is not None else CONTINUE

            return self._run(txn, self.checks.greylist, data_hash=False).addCallback(greylisted)
        return succeed(CONTINUE)

    def header(self, txn: Transaction, name: str, value: str) -> Verdict:
        """SPEC §5.7: remember the header, within the bound of what a message may hold in memory."""
        msg = txn.message
        txn.header_bytes += len(name) + len(value) + 3
        limit = header_limit(txn.deps.config.main)
        if txn.header_bytes > limit:
            log.warn("{tag}; the header section is larger than {limit} bytes (the in-memory bound: "
                     "max(spool_memory_limit, max_frame_size)); message refused", tag=txn.tag, limit=limit)
            return HEADERS_TOO_LARGE
        msg.headers.append((name, value))
        lname = name.lower()
        if lname == "return-path":
            msg.has_return_path = True
        elif lname == "subject":
            msg.subject = value
        return CONTINUE

    def eoh(self, txn: Transaction) -> Verdict:
        """SPEC §5.8: the spool head is complete once the headers are; replies lookups start."""
        self._ensure_spool(txn)
        self._start_replies(txn)
        return CONTINUE

    def body(self, txn: Transaction, chunk: bytes) -> "Deferred[Verdict]":
        spool = self._ensure_spool(txn)
        pending = spool.append(chunk)
        if pending is None:
            return succeed(CONTINUE)
        return pending.addCallbacks(lambda _: CONTINUE, lambda f: self._spool_failed(txn, f))

    def _spool_failed(self, txn: Transaction, failure: Failure) -> Verdict:
        log.failure("{tag}; cannot write spool file", failure, tag=txn.tag)
        return BARE_TEMPFAIL

    def _ensure_spool(self, txn: Transaction) -> Spool:
        msg = txn.message
        if msg.spool is None:
            conn = msg.connection
            msg.spool = txn.deps.new_spool()
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

    def _start_replies(self, txn: Transaction) -> "Deferred[CheckResult]":
        """The replies lookups (SPEC §6.4) run while the body arrives; EOM waits for them."""
        if txn.replies is None:
            txn.replies = self._run(txn, self.checks.replies)
        return txn.replies

    def eom(self, txn: Transaction) -> "Deferred[Verdict]":
        return self._eom(txn).addErrback(self._eom_failed, txn)

    def _eom_failed(self, failure: Failure, txn: Transaction) -> Verdict:
        if failure.check(MessageAbandoned):
            return BARE_TEMPFAIL  # nobody reads it: the MTA is gone
        log.failure("{tag}; internal error at end of message", failure, tag=txn.tag)
        self._skip_missing(txn, "skipped(internal failure)")
        return BARE_TEMPFAIL

    def _skip_missing(self, txn: Transaction, reason: str) -> None:
        """Results for the summary's spam, virus and dkim fields that no check gave."""
        have = {r.check for r in txn.results}
        for check in (Check.SPAM, Check.VIRUS, Check.DKIM):
            if check not in have:
                self._keep(txn, skipped(check, reason))

    @inlineCallbacks
    def _eom(self, txn: Transaction):  # type: ignore[no-untyped-def]
        """SPEC §5.9, with rspamd and clamd scanning at the same time."""
        msg, deps, checks = txn.message, txn.deps, self.checks
        config = deps.config
        if msg.queue_id is None:
            msg.queue_id = msg.connection.macros.get("i") or None
        spool = self._ensure_spool(txn)
        try:
            yield spool.finish()
        except Exception:
            log.failure("{tag}; cannot write spool file", tag=txn.tag)
            self._skip_missing(txn, "skipped(internal failure)")
            return BARE_TEMPFAIL
        reply_to = replies.hit((yield self._start_replies(txn)))
        if reply_to is not None:
            txn.strict = False

        oversized = config.main.max_size > 0 and spool.size > config.main.max_size
        ip = msg.client_address
        results: List[CheckResult] = []  # what decides the verdict, in the order the checks ran

        # which scans run (SPEC §5.11)
        spam_mode = self._spam_mode(txn, oversized, reply_to)
        virus_exempt = msg.recipient_whitelisted or ip in config.clamav.whitelist
        scan_virus = bool(config.clamav.servers) and not oversized and not virus_exempt
        virus_scan: Optional[Deferred] = self._run_cancellable(txn, checks.virus) if scan_virus else None

        # -- rspamd (steps 4-5) ----------------------------------------------------------------
        spam_failed = False
        if spam_mode in ("full", "dkim"):
            spam_result = yield self._scan_in_flight(
                txn, self._run(txn, checks.spam, dkim_only=(spam_mode == "dkim")))
            results.append(spam_result)
            spam_failed = spam_result.failed
            if spam.rejected(spam_result):
                yield self._run(txn, checks.copies, kind=copies.SPAM)
            if (
                spam_mode == "full"
                and spam.wants_greylist(spam_result)
                and config.spamd.spamd_greylist
                and not msg.authenticated
                and ip is not None
                and config.greylisting_active
            ):
                grey = yield self._run(txn, checks.greylist, data_hash=True,
                                       sender_spf_pass=spam.sender_spf_pass(spam_result))
                results.append(grey)
                if grey.verdict is not None:
                    # the summary shows why Rspamd's verdict did not end the message
                    self._keep(txn, dataclasses.replace(
                        spam_result, summary="greylisted, action: %s" % (spam.action_of(spam_result),)))
        else:
            self._keep(txn, skipped(Check.SPAM, spam_mode))

        ended_by = deciding_result(results)
        if ended_by is not None:
            self._skip_after(txn, ended_by, virus_scan)
            assert ended_by.verdict is not None
            return ended_by.verdict

        # -- pub/sub copy (step 6) --------------------------------------------------------------
        if not oversized and not spam_failed:
            yield self._run(txn, checks.copies, kind=copies.COPY)

        # -- clamd (steps 7-8) ------------------------------------------------------------------
        if virus_scan is not None:
            results.append((yield virus_scan))
        else:
            self._keep(txn, skipped(Check.VIRUS, self._virus_skip_reason(config, msg, oversized, virus_exempt)))

        verdict = decide(results)
        if verdict.action is not Action.ACCEPT:
            self._keep(txn, skipped(Check.DKIM, "skipped, clamav virus" if verdict.action is Action.REJECT
                                    else "skipped, clamav tempfail"))
            return verdict

        # -- accepted: rate update, DKIM, remember Message-ID (steps 9-10, SPEC §6.4) -----------
        yield self._run(txn, checks.ratelimit_record)
        results.append((yield self._run(txn, checks.dkim)))
        yield self._run(txn, checks.replies_record)
        results.append((yield self._run(txn, checks.trace)))
        return decide(results)

    def _spam_mode(self, txn: Transaction, oversized: bool, reply_to: Optional[str]) -> str:
        """"full", "dkim", or the summary-line reason why rspamd is skipped (SPEC §5.9 step 4-5)."""
        msg, config = txn.message, txn.deps.config
        if oversized:
            return "skipped(oversized)"
        if not config.spamd.servers:
            return "skipped, no spamd servers defined"
        skip_reason = None
        if msg.recipient_whitelisted:
            skip_reason = "skipped, whitelisted"
        elif reply_to is not None:
            skip_reason = "skipped, reply to our message"
        elif msg.authenticated and not config.main.strict_auth:
            skip_reason = "ignored, authenticated user"
        elif not txn.strict:
            skip_reason = "skipped, whitelisted"
        elif msg.client_address in config.spamd.whitelist:
            skip_reason = "skipped, whitelisted"
        if skip_reason is None:
            return "full"
        if config.dkim.rspamd_sign:
            return "dkim"
        return skip_reason

    @staticmethod
    def _virus_skip_reason(config: Any, msg: MessageContext, oversized: bool, exempt: bool) -> str:
        if oversized:
            return "skipped(oversized)"
        if not config.clamav.servers:
            return "skipped, no av servers"
        if msg.recipient_whitelisted:
            return "skipped, recipient whitelist"
        return "skipped, ip whitelist"

    def _skip_after(self, txn: Transaction, ended_by: CheckResult, virus_scan: Optional[Deferred]) -> None:
        """Results for the checks a spam-stage verdict made unnecessary (SPEC §8.4)."""
        if virus_scan is not None:
            virus_scan.addErrback(lambda _: None)  # the result no longer matters
            virus_scan.cancel()  # free the clamd connection now
        if ended_by.check is Check.SPAM and ended_by.failed:
            reason = "spamd tempfail"
        elif ended_by.check is Check.GREYLIST:
            reason = "spamd greylist"
        elif ended_by.verdict is not None and ended_by.verdict.action is Action.TEMPFAIL:
            reason = "spam soft reject"
        else:
            reason = "spam detected"
        for check in (Check.VIRUS, Check.DKIM):
            self._keep(txn, skipped(check, "skipped, " + reason))

    # -- end of transaction ------------------------------------------------------------------
    def finish(self, txn: Transaction, verdict: Optional[Verdict]) -> None:
        """The message is over (EOM answered, ABORT, QUIT or lost connection): log and clean up."""
        if txn.message.spool is not None:
            txn.message.spool.close()
        if verdict is not None:
            summary = log_summary(txn.message, txn.results, verdict)
            for observer in self.message_observers:
                try:
                    observer(txn.message, txn.results, verdict, summary)
                except Exception:
                    log.failure("{tag}; message observer failed", tag=txn.tag)
        txn.runtime.release()
