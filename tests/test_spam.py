"""The spam check: Rspamd's answer turned into verdicts and header edits (SPEC §6.8.3-§6.8.8)."""
from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from typing import Any, List, Optional, Sequence, Tuple

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends.rspamd import RspamdClient, RspamdScan, ScanReply, Symbol
from rmilter.checks import spam
from rmilter.checks.spam import scan_log_line, spamd_result
from rmilter.config.schema import Config, GlobalConfig, ServerSpec, SpamdConfig
from rmilter.context import ConnectionContext, MessageContext, Recipient
from rmilter.netlist import RecipientList
from rmilter.deps import Deps
from rmilter.spool import run_inline, spool_head
from rmilter.testing.fake_rspamd import (
    HANG,
    REFUSE,
    FakeRspamd,
    FakeRspamdCluster,
    checkv2_reply,
    legacy_reply,
)
from rmilter.verdict import (
    Action,
    Check,
    CheckResult,
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    DeleteRecipient,
    InsertHeader,
    Quarantine,
    decide,
    reply_line,
)

R1 = ServerSpec("r1", host="127.0.0.1", port=11333)
R2 = ServerSpec("r2", host="127.0.0.2", port=11333)
ALSO = ServerSpec("also", host="127.0.0.3", port=11333)
HEADERS = (("From", "Alice <alice@example.net>"), ("Subject", "hello world"), ("X-Spam", "maybe"),
           ("Received", "one"), ("Received", "two"), ("Received", "three"))


class Outcome:
    """A scan's CheckResult with what the pipeline reads from it (``spam.rejected`` and friends)."""

    def __init__(self, result: CheckResult) -> None:
        self.result = result
        self.rejected = spam.rejected(result)
        self.wants_greylist = spam.wants_greylist(result)


class SpamTestCase(SynchronousTestCase):
    servers: Sequence[ServerSpec] = (R1,)

    def make_message(
        self,
        spamd: Optional[SpamdConfig] = None,
        *,
        main: Optional[GlobalConfig] = None,
        user: Optional[str] = None,
        rcpts: Sequence[str] = ("<bob@example.org>",),
        headers: Sequence[Tuple[str, str]] = HEADERS,
        body: bytes = b"Hello Bob\r\n",
    ) -> MessageContext:
        spamd = spamd or SpamdConfig()
        spamd = dataclasses.replace(spamd, servers=spamd.servers or tuple(self.servers))
        config = Config(main=main or GlobalConfig(tempdir=tempfile.gettempdir()), spamd=spamd)
        self.clock = Clock()
        self.fakes = getattr(self, "fakes", None) or FakeRspamdCluster(
            {s.name: FakeRspamd() for s in tuple(spamd.servers) + tuple(spamd.also_check)})
        self.fakes.clock = self.clock
        self.deps = Deps(config=config, clock=self.clock, run_blocking=run_inline,
                         rspamd=RspamdClient(spamd, self.clock, endpoint_for=self.fakes.endpoint_for,
                                             rng=random.Random(3)))
        conn = ConnectionContext(hostname="mail.example.net", family="4", client_address="192.0.2.10",
                                 helo="helo.example.net", daemon_name="mx.example.org")
        msg = MessageContext(connection=conn, tag="0123456789")
        msg.set_sender("<alice@example.net>", "alice@example.net")
        msg.user = user
        msg.sasl_authenticated = user is not None
        msg.recipients = [Recipient(r) for r in rcpts]
        msg.headers = list(headers)
        subjects = [v for n, v in headers if n.lower() == "subject"]
        msg.subject = subjects[-1] if subjects else None
        msg.queue_id = "4ABCDEF"
        msg.spool = self.deps.new_spool()
        self.addCleanup(msg.spool.close)
        msg.spool.set_head(spool_head(helo=conn.helo, hostname=conn.hostname, client_address="192.0.2.10",
                                      tag=msg.tag, headers=msg.headers, has_return_path=False,
                                      envelope_from=msg.envelope_from, recipients=msg.recipient_addresses))
        msg.spool.append(body)
        self.successResultOf(msg.spool.finish())
        return msg

    def outcome(self, reply: Any, spamd: Optional[SpamdConfig] = None, *, dkim_only: bool = False,
                **message: Any) -> "Outcome":
        self.fakes = FakeRspamdCluster({"r1": FakeRspamd(reply)})
        self.msg = self.make_message(spamd, **message)
        d = spam.check(self.msg, self.deps, dkim_only=dkim_only)
        self.clock.advance(0)  # the in-memory Rspamd answers from the clock, as a socket would
        return Outcome(self.successResultOf(d))


class ActionTests(SpamTestCase):
    def test_reject_uses_rspamd_message(self) -> None:
        """SPEC §6.8.3: reject -> 554 5.7.1 with Rspamd's smtp_message."""
        out = self.outcome(checkv2_reply(action="reject", score=15, smtp_message="Gtube pattern"))
        self.assertEqual(reply_line(Action.REJECT, out.result.verdict.reply), "554 5.7.1 Gtube pattern")
        self.assertEqual(out.result.verdict.action, Action.REJECT)
        self.assertTrue(out.rejected)
        self.assertFalse(out.wants_greylist)
        self.assertEqual(out.result.summary, "rejected, action: reject")
        self.assertEqual(out.result.check, Check.SPAM)
        self.assertFalse(out.result.failed)

    def test_reject_without_message_uses_reject_message(self) -> None:
        out = self.outcome(checkv2_reply(action="reject"), SpamdConfig(reject_message="Go away"))
        self.assertEqual(reply_line(Action.REJECT, out.result.verdict.reply), "554 5.7.1 Go away")
        out = self.outcome(checkv2_reply(action="reject", smtp_message=" \r\n "), SpamdConfig(reject_message="Go away"))
        self.assertEqual(out.result.verdict.reply.text, "Go away")

    def test_reject_message_with_crlf_is_one_line(self) -> None:
        """B34: Rspamd's text cannot break the SMTP reply."""
        out = self.outcome(checkv2_reply(action="reject", smtp_message="spam\r\n250 ok"))
        self.assertEqual(reply_line(Action.REJECT, out.result.verdict.reply), "554 5.7.1 spam  250 ok")

    def test_reject_also_for_authenticated_sender(self) -> None:
        """With strict_auth an authenticated sender is scanned and rejected like others."""
        out = self.outcome(checkv2_reply(action="reject"), main=GlobalConfig(strict_auth=True), user="alice")
        self.assertEqual(out.result.verdict.action, Action.REJECT)
        self.assertEqual(self.fakes["r1"].requests[0].header("User"), "alice")

    def test_never_reject_marks_instead(self) -> None:
        out = self.outcome(checkv2_reply(action="reject"), SpamdConfig(spamd_never_reject=True))
        self.assertIsNone(out.result.verdict)
        self.assertTrue(out.rejected)  # the spam copy still happens (SPEC §6.5)
        self.assertEqual(out.result.edits, (ChangeHeader(name="X-Spam", index=1, value="yes"),))
        self.assertEqual(out.result.summary, "add header, action: reject")

    def test_soft_reject(self) -> None:
        """soft reject -> 451 4.7.1 with Rspamd's message, else "Temporary failure"."""
        out = self.outcome(checkv2_reply(action="soft reject", smtp_message="harness forced soft reject"))
        self.assertEqual(reply_line(Action.TEMPFAIL, out.result.verdict.reply),
                         "451 4.7.1 harness forced soft reject")
        self.assertEqual(out.result.summary, "delayed, action: soft reject")
        out = self.outcome(checkv2_reply(action="soft reject"))
        self.assertEqual(reply_line(Action.TEMPFAIL, out.result.verdict.reply), "451 4.7.1 Temporary failure")

    def test_spamd_soft_fail_has_no_effect(self) -> None:
        """SPEC §4.7: spamd_soft_fail is accepted and ignored since C 1.8.5."""
        out = self.outcome(checkv2_reply(action="soft reject"), SpamdConfig(spamd_soft_fail=False))
        self.assertEqual(out.result.verdict.action, Action.TEMPFAIL)

    def test_add_header_marks(self) -> None:
        out = self.outcome(checkv2_reply(action="add header", score=6.5))
        self.assertIsNone(out.result.verdict)
        self.assertEqual(out.result.edits, (ChangeHeader(name="X-Spam", index=1, value="yes"),))
        self.assertTrue(out.wants_greylist)
        self.assertEqual(out.result.summary, "action: add header")

    def test_custom_spam_header(self) -> None:
        out = self.outcome(checkv2_reply(action="add header"),
                           SpamdConfig(spam_header="X-Spam-Flag", spam_header_value="YES"))
        self.assertEqual(out.result.edits, (ChangeHeader(name="X-Spam-Flag", index=1, value="YES"),))

    def test_rspamd_spam_header_for_add_header(self) -> None:
        """milter.spam_header: a string replaces the value, an object the whole headers."""
        out = self.outcome(checkv2_reply(action="add header", milter={"spam_header": "Yes, 7.0"}))
        self.assertEqual(out.result.edits, (ChangeHeader(name="X-Spam", index=1, value="Yes, 7.0"),))
        out = self.outcome(checkv2_reply(action="add header", milter={"spam_header": {"X-Junk": "1"}}))
        self.assertEqual(out.result.edits, (ChangeHeader(name="X-Junk", index=1, value="1"),))

    def test_no_mark_for_authenticated_with_spam_no_auth_header(self) -> None:
        spamd = SpamdConfig(spam_no_auth_header=True)
        out = self.outcome(checkv2_reply(action="add header"), spamd, main=GlobalConfig(strict_auth=True),
                           user="alice")
        self.assertEqual(out.result.edits, ())
        out = self.outcome(checkv2_reply(action="rewrite subject", subject="S"), spamd,
                           main=GlobalConfig(strict_auth=True), user="alice")
        self.assertEqual(out.result.edits, ())
        out = self.outcome(checkv2_reply(action="add header"), spamd)
        self.assertEqual(out.result.edits, (ChangeHeader(name="X-Spam", index=1, value="yes"),))

    def test_rewrite_subject_with_rspamd_subject(self) -> None:
        out = self.outcome(checkv2_reply(action="rewrite subject", subject="*** SPAM *** hello world"))
        self.assertEqual(out.result.edits, (ChangeHeader(name="X-Spam", index=1, value="yes"),
                                            ChangeHeader(name="Subject", index=1, value="*** SPAM *** hello world")))
        self.assertTrue(out.wants_greylist)
        self.assertEqual(out.result.summary, "action: rewrite subject")

    def test_rewrite_subject_without_rspamd_subject(self) -> None:
        """B15: the whole original subject after ``***SPAM***``; ``***SPAM***`` without Subject."""
        out = self.outcome(checkv2_reply(action="rewrite subject"), SpamdConfig(spamd_spam_add_header=False))
        self.assertEqual(out.result.edits, (ChangeHeader(name="Subject", index=1, value="***SPAM*** hello world"),))
        out = self.outcome(checkv2_reply(action="rewrite subject"), SpamdConfig(spamd_spam_add_header=False),
                           headers=(("From", "a@b"),))
        self.assertEqual(out.result.edits, (ChangeHeader(name="Subject", index=1, value="***SPAM***"),))

    def test_greylist_and_no_action_change_nothing(self) -> None:
        out = self.outcome(checkv2_reply(action="greylist", score=4.5))
        self.assertEqual((out.result.verdict, out.result.edits, out.wants_greylist), (None, (), True))
        self.assertEqual(out.result.summary, "no spam")
        out = self.outcome(checkv2_reply(action="no action"))
        self.assertEqual((out.result.verdict, out.result.edits, out.wants_greylist), (None, (), False))
        self.assertEqual(out.result.summary, "no spam")

    def test_no_action_flag(self) -> None:
        """milter.no_action: Rspamd's action is not applied."""
        out = self.outcome(checkv2_reply(action="reject", milter={"no_action": True}))
        self.assertIsNone(out.result.verdict)
        self.assertFalse(out.wants_greylist)

    def test_reject_as_discard_or_quarantine(self) -> None:
        """milter.reject = discard / quarantine, as Rspamd's own milter does."""
        out = self.outcome(checkv2_reply(action="reject", milter={"reject": "discard"}))
        self.assertEqual(out.result.verdict.action, Action.DISCARD)
        out = self.outcome(checkv2_reply(action="reject", smtp_message="held", milter={"reject": "quarantine"}))
        self.assertIsNone(out.result.verdict)
        self.assertEqual(out.result.edits, (Quarantine(reason="held"),))

    def test_legacy_reply_decides_the_same(self) -> None:
        out = self.outcome(legacy_reply(action="reject", smtp_message="old style"), SpamdConfig(protocol="legacy"))
        self.assertEqual(reply_line(Action.REJECT, out.result.verdict.reply), "554 5.7.1 old style")
        self.assertEqual(self.fakes["r1"].requests[0].path, "/symbols")


class FailureTests(SpamTestCase):
    def test_failure_with_tempfail_on_error(self) -> None:
        """SPEC §5.9 4(a): 451 4.7.1 Temporary service failure., check spam_failure."""
        out = self.outcome(REFUSE, SpamdConfig(tempfail_on_error=True, retry_count=1))
        self.assertEqual((out.result.check, out.result.failed), (Check.SPAM, True))
        self.assertTrue(out.result.failed)
        self.assertEqual(reply_line(Action.TEMPFAIL, out.result.verdict.reply),
                         "451 4.7.1 Temporary service failure.")
        self.assertEqual(out.result.summary, "delayed, temporary fail")
        self.assertEqual(decide([out.result]).action, Action.TEMPFAIL)

    def test_failure_without_tempfail_on_error(self) -> None:
        out = self.outcome(REFUSE, SpamdConfig(retry_count=1))
        self.assertEqual((out.result.check, out.result.failed, out.result.verdict), (Check.SPAM, True, None))
        self.assertEqual(out.result.summary, "ignored, temporary fail")
        self.assertEqual(decide([out.result]).action, Action.ACCEPT)

    def test_failure_after_retries_waits_without_blocking(self) -> None:
        self.fakes = FakeRspamdCluster({"r1": FakeRspamd(REFUSE)})
        msg = self.make_message(SpamdConfig(retry_count=3, retry_timeout=2.0, tempfail_on_error=True))
        d = spam.check(msg, self.deps)
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.assertNoResult(d)
        self.clock.advance(2.0)
        result = self.successResultOf(d)
        self.assertEqual((result.check, result.failed), (Check.SPAM, True))
        self.assertIsNotNone(result.verdict)
        self.assertEqual((len(self.fakes["r1"].requests), self.fakes["r1"].refused), (0, 3))

    def test_slow_scan_still_gives_rspamd_verdict(self) -> None:
        """A scan slower than usual (but within the deadline) ends with Rspamd's verdict."""
        self.fakes = FakeRspamdCluster({"r1": FakeRspamd(HANG)})
        msg = self.make_message(SpamdConfig(results_timeout=20.0))
        d = spam.check(msg, self.deps)
        self.clock.advance(15.0)
        self.assertNoResult(d)
        self.fakes["r1"].release(checkv2_reply(action="reject", smtp_message="slow but sure"))
        out = Outcome(self.successResultOf(d))
        self.assertEqual(out.result.verdict.reply.text, "slow but sure")

    def test_no_client(self) -> None:
        msg = self.make_message()
        no_servers = dataclasses.replace(self.deps, rspamd=None)
        result = self.successResultOf(spam.check(msg, no_servers))
        self.assertEqual((result.summary, result.skipped), ("skipped, no spamd servers defined", True))


class ExtendedHeaderTests(SpamTestCase):
    VECTOR = ScanReply(score=5.5, required_score=15.0, symbols=(
        Symbol("FORGED_SENDER", 5.0, ("a@b", "c@d")),
        Symbol("DATE_IN_PAST", 0.1),
        Symbol("R_SPF_ALLOW", -0.2, ("+ip4:1.2.3.4",)),
    ))

    def test_spamd_result_format(self) -> None:
        """SPEC §9 vector with B22 fixed: sorted by exact absolute score."""
        self.assertEqual(
            spamd_result(self.VECTOR),
            "default: False [5.50 / 15.00]\n FORGED_SENDER(5.00)[a@b, c@d]\n R_SPF_ALLOW(-0.20)[+ip4:1.2.3.4]"
            "\n DATE_IN_PAST(0.10)[]",
        )
        self.assertEqual(spamd_result(ScanReply(required_score=15.0)), "default: False [0.00 / 15.00] ")
        self.assertTrue(spamd_result(ScanReply(score=16, required_score=15.0)).startswith("default: True"))

    def test_ties_keep_reply_order(self) -> None:
        reply = ScanReply(symbols=(Symbol("B", 1.0), Symbol("A", -1.0), Symbol("C", 2.0)))
        self.assertEqual(spamd_result(reply).split("\n ")[1:], ["C(2.00)[]", "B(1.00)[]", "A(-1.00)[]"])

    def test_extended_headers_for_unauthenticated(self) -> None:
        reply = checkv2_reply(action="no action", score=5.5, symbols={"FORGED_SENDER": (5.0, ["a@b", "c@d"])})
        self.fakes = FakeRspamdCluster({"r1": FakeRspamd()})
        self.fakes["r1"].answer_next(REFUSE, reply)
        msg = self.make_message(SpamdConfig(extended_spam_headers=True, retry_timeout=1.25))
        d = spam.check(msg, self.deps)
        self.clock.advance(1.25)
        out = Outcome(self.successResultOf(d))
        self.assertEqual(out.result.edits, (
            AddHeader(name="X-Spamd-Result", value="default: False [5.50 / 15.00]\n FORGED_SENDER(5.00)[a@b, c@d]"),
            AddHeader(name="X-Rspamd-Server", value="r1"),
            AddHeader(name="X-Rspamd-Scan-Time", value="1.25"),  # retries included
            AddHeader(name="X-Rspamd-Queue-ID", value="4ABCDEF"),
        ))

    def test_not_for_authenticated_senders(self) -> None:
        out = self.outcome(checkv2_reply(), SpamdConfig(extended_spam_headers=True),
                           main=GlobalConfig(strict_auth=True), user="alice")
        self.assertEqual(out.result.edits, ())

    def test_extended_headers_rcpt_needs_every_recipient(self) -> None:
        spamd = SpamdConfig(extended_headers_rcpt=RecipientList(["@example.org"]))
        out = self.outcome(checkv2_reply(), spamd, rcpts=("<bob@example.org>", "<Carol@Example.ORG>"),
                           main=GlobalConfig(strict_auth=True), user="alice")
        self.assertEqual([e.name for e in out.result.edits],
                         ["X-Spamd-Result", "X-Rspamd-Server", "X-Rspamd-Scan-Time", "X-Rspamd-Queue-ID"])
        out = self.outcome(checkv2_reply(), spamd, rcpts=("<bob@example.org>", "<dave@example.net>"))
        self.assertEqual(out.result.edits, ())


class RequestedChangeTests(SpamTestCase):
    def edits(self, reply: Any, **kw: Any) -> List[Any]:
        return list(self.outcome(reply, **kw).result.edits)

    def test_dkim_signature_without_cr(self) -> None:
        sig = "v=1; a=rsa-sha256; d=example.com;\r\n\tb=abc"
        self.assertEqual(self.edits(checkv2_reply(dkim_signature=sig)),
                         [AddHeader(name="DKIM-Signature", value="v=1; a=rsa-sha256; d=example.com;\n\tb=abc")])

    def test_remove_headers(self) -> None:
        """milter.remove_headers: n >= 1 that occurrence, 0 all (last first), negative from the end."""
        edits = self.edits(checkv2_reply(milter={"remove_headers": {
            "X-Spam": 1, "Received": 0, "X-Missing": 0, "X-Absent": 2}}))
        self.assertEqual(edits, [ChangeHeader(name="X-Spam", index=1, value=""), ChangeHeader(name="Received", index=3, value=""),
                                 ChangeHeader(name="Received", index=2, value=""), ChangeHeader(name="Received", index=1, value="")])
        edits = self.edits(checkv2_reply(milter={"remove_headers": {"received": -1}}))
        self.assertEqual(edits, [ChangeHeader(name="received", index=3, value="")])
        edits = self.edits(checkv2_reply(milter={"remove_headers": {"Received": -3, "X-Spam": -2}}))
        self.assertEqual(edits, [ChangeHeader(name="Received", index=1, value="")])

    def test_legacy_block_removes_positive_indexes_only(self) -> None:
        edits = self.edits(legacy_reply(rmilter={"remove_headers": {"X-Spam": 1, "Received": 0, "From": -1}}))
        self.assertEqual(edits, [ChangeHeader(name="X-Spam", index=1, value="")])

    def test_add_headers(self) -> None:
        edits = self.edits(checkv2_reply(milter={"add_headers": {
            "X-Spamd-Result": {"value": "default: False", "order": -1},
            "X-First": {"value": "top", "order": 0},
            "X-Near-End": {"value": "n", "order": -2},
            "X-Way-Back": {"value": "w", "order": -50},
            "X-Far": {"value": "f", "order": 10**12},
            "X-Two": ["a", "b"],
        }}))
        self.assertEqual(edits, [
            AddHeader(name="X-Spamd-Result", value="default: False"),
            InsertHeader(index=0, name="X-First", value="top"),
            InsertHeader(index=5, name="X-Near-End", value="n"),
            InsertHeader(index=0, name="X-Way-Back", value="w"),
            InsertHeader(index=2**31 - 1, name="X-Far", value="f"),
            AddHeader(name="X-Two", value="a"),
            AddHeader(name="X-Two", value="b"),
        ])

    def test_header_injection_is_impossible(self) -> None:
        """CR/LF from Rspamd become folding; a bad name is dropped (SPEC §6.8.5)."""
        edits = self.edits(checkv2_reply(milter={"add_headers": {
            "X-Evil": "x\r\nBcc: victim@example.org", "Bad Name": "v", "Bad:Name": "v", "X-Nul": "a\0b"}}))
        self.assertEqual(edits, [AddHeader(name="X-Evil", value="x\n Bcc: victim@example.org"), AddHeader(name="X-Nul", value="ab")])

    def test_envelope_changes(self) -> None:
        edits = self.edits(checkv2_reply(milter={
            "change_from": "<bounce@example.net>", "add_rcpt": ["<archive@example.org>", "bad\r\n"],
            "del_rcpt": ["<bob@example.org>"]}))
        self.assertEqual(edits, [ChangeFrom(address="<bounce@example.net>"), AddRecipient(address="<archive@example.org>"),
                                 DeleteRecipient(address="<bob@example.org>")])

    def test_trace_recipient(self) -> None:
        """SPEC §6.8.7: symbol compared up to ``(``; ADDRCPT trace_addr."""
        spamd = SpamdConfig(trace_symbol="TRACE_ME", trace_addr="<trace@example.org>")
        self.assertEqual(self.edits(checkv2_reply(symbols={"TRACE_ME(1)": 1.0}), spamd=spamd),
                         [AddRecipient(address="<trace@example.org>")])
        self.assertEqual(self.edits(checkv2_reply(symbols={"OTHER": 1.0}), spamd=spamd), [])

    def test_edit_order(self) -> None:
        """SPEC §6.8.5: extended headers, DKIM-Signature, removals, additions, trace, then the action."""
        spamd = SpamdConfig(extended_spam_headers=True, trace_symbol="T", trace_addr="<t@example.org>")
        edits = self.edits(checkv2_reply(
            action="rewrite subject", subject="[SPAM] hi", symbols={"T": 1.0}, dkim_signature="v=1",
            milter={"remove_headers": {"X-Spam": 1}, "add_headers": {"X-Added": "1"}}), spamd=spamd)
        self.assertEqual([(type(e).__name__, getattr(e, "name", getattr(e, "address", None))) for e in edits], [
            ("AddHeader", "X-Spamd-Result"), ("AddHeader", "X-Rspamd-Server"), ("AddHeader", "X-Rspamd-Scan-Time"),
            ("AddHeader", "X-Rspamd-Queue-ID"), ("AddHeader", "DKIM-Signature"), ("ChangeHeader", "X-Spam"),
            ("AddHeader", "X-Added"), ("AddRecipient", "<t@example.org>"), ("ChangeHeader", "X-Spam"),
            ("ChangeHeader", "Subject"),
        ])


class DkimOnlyTests(SpamTestCase):
    def test_dkim_only_ignores_action(self) -> None:
        """SPEC §6.8.6: Settings header sent; a reject answer leaves the message accepted and signed."""
        out = self.outcome(checkv2_reply(action="reject", dkim_signature="v=1; d=example.net"), dkim_only=True)
        [request] = self.fakes["r1"].requests
        self.assertEqual(request.header("Settings"), '{"groups_enabled":["dkim"]}')
        self.assertIsNone(out.result.verdict)
        self.assertFalse(out.rejected)
        self.assertEqual(out.result.edits, (AddHeader(name="DKIM-Signature", value="v=1; d=example.net"),))
        self.assertEqual(out.result.summary, "dkim sign only, whitelisted")

    def test_dkim_only_failure(self) -> None:
        out = self.outcome(REFUSE, SpamdConfig(tempfail_on_error=True, retry_count=1), dkim_only=True)
        self.assertEqual((out.result.check, out.result.failed), (Check.SPAM, True))


class LoggingTests(SpamTestCase):
    def test_message_id_and_scan_line(self) -> None:
        events: List[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        out = self.outcome(checkv2_reply(action="add header", score=6.5, required_score=15,
                                   symbols={"A": (6.0, ["x", "y"]), "B": 0.5}, message_id="<mid@example.net>"))
        self.assertEqual(out.result.details["message_id"], "<mid@example.net>")
        lines = [e["line"] for e in events if e.get("log_namespace") == "rmilter.spam" and "line" in e]
        self.assertEqual(lines, [
            "0123456789; spamdscan: scan, time: 0.000, server: r1, metric: default: [6.500 / 15.000], "
            "symbols: A(6.00)[x, y], B(0.50)[]"])

    def test_long_scan_lines_are_shortened(self) -> None:
        many = tuple(Symbol("SYMBOL_%02d" % i, 1.0, ("option-%d" % i,) * 5) for i in range(40))
        result = RspamdScan(ScanReply(symbols=many), R1, 0.5)
        line = scan_log_line("tag", result)
        self.assertLessEqual(len(line), 900)
        self.assertIn("SYMBOL_00(1.00)[]", line)
        self.assertNotIn("option-", line)
        huge = tuple(Symbol("SYMBOL_%03d_%s" % (i, "X" * 20), 1.0) for i in range(100))
        line = scan_log_line("tag", RspamdScan(ScanReply(symbols=huge), R1, 0.5))
        self.assertTrue(line.endswith("symbols: "))
        self.assertEqual(scan_log_line("t", RspamdScan(ScanReply(), R1, 0.0)).split("symbols: ")[1], "no symbols")


class AlsoCheckTests(SpamTestCase):
    def setUp(self) -> None:
        self.diff_dir = tempfile.mkdtemp()

        def cleanup() -> None:
            for name in os.listdir(self.diff_dir):
                os.unlink(os.path.join(self.diff_dir, name))
            os.rmdir(self.diff_dir)

        self.addCleanup(cleanup)

    def run_both(self, main: Any, other: Any) -> Outcome:
        self.fakes = FakeRspamdCluster({"r1": FakeRspamd(main), "also": FakeRspamd(other)})
        msg = self.make_message(SpamdConfig(also_check=(ALSO,), diff_dir=self.diff_dir))
        d = spam.check(msg, self.deps)
        self.clock.advance(0)
        return Outcome(self.successResultOf(d))

    def test_also_check_never_decides(self) -> None:
        """Both servers see the message; only the main server's action counts."""
        out = self.run_both(checkv2_reply(action="no action"), checkv2_reply(action="reject"))
        self.assertEqual(len(self.fakes["r1"].requests), 1)
        self.assertEqual(len(self.fakes["also"].requests), 1)
        self.assertEqual(self.fakes["also"].requests[0].body, self.fakes["r1"].requests[0].body)
        self.assertIsNone(out.result.verdict)

    def test_different_results_are_written_to_diff_dir(self) -> None:
        self.run_both(checkv2_reply(action="no action"), checkv2_reply(action="reject", score=20))
        names = sorted(os.listdir(self.diff_dir))
        self.assertEqual(names, ["0123456789.diff", "0123456789.msg"])
        with open(os.path.join(self.diff_dir, "0123456789.msg"), "rb") as f:
            self.assertEqual(f.read(), self.fakes["r1"].requests[0].body)
        with open(os.path.join(self.diff_dir, "0123456789.diff"), "rb") as f:
            summary = f.read()
        self.assertIn(b"main: r1: no action", summary)
        self.assertIn(b"also_check: also: reject [20.00 / 15.00]", summary)

    def test_same_results_write_nothing(self) -> None:
        self.run_both(checkv2_reply(action="reject"), checkv2_reply(action="reject"))
        self.assertEqual(os.listdir(self.diff_dir), [])

    def test_also_check_failure_is_ignored(self) -> None:
        out = self.run_both(checkv2_reply(action="reject"), REFUSE)
        self.assertEqual(out.result.verdict.action, Action.REJECT)
        self.assertEqual(os.listdir(self.diff_dir), [])
