"""The order of checks for one message (SPEC §5, §5.9, §5.11), with the checks replaced by recorders."""
from __future__ import annotations

import dataclasses
import ipaddress
import tempfile
from typing import Any, List, Optional

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rmilter.checks import trace
from rmilter.checks.replies import reply_ids
from rmilter.config.schema import (
    ClamavConfig,
    Config,
    GlobalConfig,
    GreylistingConfig,
    LimitsConfig,
    RedisConfig,
    RedisServer,
    ServerSpec,
    SpamdConfig,
    Bucket,
)
from rmilter.context import ConnectionContext, MessageContext
from rmilter.deps import Deps
from rmilter.netlist import NetList, RecipientList
from rmilter.pipeline import Checks, Pipeline
from rmilter.runtime import Runtime
from rmilter.spool import run_inline
from rmilter.summary import summary_event
from rmilter.verdict import Action, AddHeader, Check, CheckResult, reject, tempfail
from tests.pipeline_support import send_until_eom

SPAMD = (ServerSpec("rspamd", host="127.0.0.1", port=11333),)
CLAMD = (ServerSpec("clamd", host="127.0.0.1", port=3310),)
REDIS = (RedisServer("127.0.0.1", "127.0.0.1"),)


def make_config(**sections: Any) -> Config:
    tempdir = tempfile.gettempdir()
    main = sections.pop("main", GlobalConfig())
    return Config(main=dataclasses.replace(main, tempdir=tempdir), **sections)


class Recorder:
    """Check entry points that record what the pipeline asked for and answer as told.

    ``checks`` is the ``Checks`` table to hand to the ``Pipeline``: no module is patched.
    """

    def __init__(self) -> None:
        self.calls: List[tuple] = []
        self.spam = CheckResult(Check.SPAM, "no spam", details={"spam_action": "no action"})
        self.virus = CheckResult(Check.VIRUS, "clean")
        self.grey = CheckResult(Check.GREYLIST, "new record",
                                edits=(AddHeader(name="X-Rmilter-Greylist", value="n"),))
        self.rate = CheckResult(Check.RATELIMIT, "within limits")
        self.reply_hit: Optional[str] = None
        self.checks = Checks(
            ratelimit=self.check_rate,
            ratelimit_record=self.answer("rate_update", CheckResult(Check.RATELIMIT, "counted")),
            greylist=self.check_grey,
            replies=self.check_replies,
            replies_record=self.answer("remember", CheckResult(Check.REPLIES, "message id stored")),
            spam=self.scan_spam,
            virus=self.scan_virus,
            copies=self.publish,
            dkim=self.answer("dkim", CheckResult(Check.DKIM, "signed",
                                                 edits=(AddHeader(name="DKIM-Signature", value="sig"),))),
            trace=trace.check,
        )

    def record(self, *call: Any) -> None:
        self.calls.append(call)

    def names(self) -> List[str]:
        return [c[0] for c in self.calls]

    def answer(self, name: str, result: CheckResult):  # type: ignore[no-untyped-def]
        def check(message: MessageContext, deps: Deps) -> "Deferred[CheckResult]":
            self.record(name)
            return succeed(result)

        return check

    def scan_spam(self, message, deps, *, dkim_only=False):  # type: ignore[no-untyped-def]
        self.record("spam", dkim_only)
        return succeed(self.spam)

    def scan_virus(self, message, deps):  # type: ignore[no-untyped-def]
        self.record("virus")
        return succeed(self.virus)

    def check_grey(self, message, deps, *, data_hash=False, sender_spf_pass=False):  # type: ignore[no-untyped-def]
        self.record("greylist", data_hash)
        return succeed(self.grey)

    def check_rate(self, message, deps, *, recipient):  # type: ignore[no-untyped-def]
        self.record("rate_check", recipient)
        return succeed(self.rate)

    def publish(self, message, deps, *, kind):  # type: ignore[no-untyped-def]
        self.record("publish", kind)
        return succeed(CheckResult(Check.COPIES, "no %s channel" % kind, skipped=True))

    def check_replies(self, message, deps):  # type: ignore[no-untyped-def]
        self.record("reply_lookup", tuple(reply_ids(message.headers)))
        if self.reply_hit:
            return succeed(CheckResult(Check.REPLIES, "reply to our message", details={"reply_to": self.reply_hit}))
        return succeed(CheckResult(Check.REPLIES, "not a reply to our mail"))


class PipelineTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.rec = Recorder()

    def run_message(self, config: Config, *, auth: Optional[str] = None, ip: Optional[str] = "192.0.2.10",
                    rcpts=("<bob@example.org>",), body: bytes = b"Hello\r\n", headers=(("Subject", "hi"),)):
        runtime = Runtime(Deps(config=config, clock=Clock(), run_blocking=run_inline))
        self.pipeline = Pipeline(lambda: runtime, self.rec.checks)
        txn, data, eom = send_until_eom(self, self.pipeline, ip=ip, auth=auth, rcpts=rcpts, headers=headers,
                                        body=body)
        if eom is None:
            return txn, data
        verdict = self.successResultOf(eom)
        self.pipeline.finish(txn, verdict)
        self.fields = summary_event(txn.message, txn.results, verdict)
        return txn, verdict


class PassThroughTests(PipelineTestCase):
    def test_no_backends_accepts_and_runs_no_scan(self) -> None:
        """Issue 2: with no checks configured every message ends in ACCEPT (SPEC §5.9 step 11)."""
        msg, verdict = self.run_message(make_config())
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertNotIn("spam", self.rec.names())
        self.assertNotIn("virus", self.rec.names())
        self.assertEqual(self.fields["spam"], "skipped, no spamd servers defined")
        self.assertEqual(self.fields["virus"], "skipped, no av servers")
        self.assertEqual(msg.message.queue_id, "QID1")
        self.assertEqual(self.pipeline.stages_needing_replies(), ("eom",))

    def test_trace_header(self) -> None:
        config = make_config(main=GlobalConfig(trace_header="X-Rmilter-Trace"))
        _, verdict = self.run_message(config, auth="alice")
        [edit] = [e for e in verdict.edits if isinstance(e, AddHeader) and e.name == "X-Rmilter-Trace"]
        self.assertIn("user=alice", edit.value)
        self.assertIn("client=192.0.2.10", edit.value)
        self.assertIn("queue_id=QID1", edit.value)

    def test_spool_holds_spec_bytes(self) -> None:
        msg, _ = self.run_message(make_config(), headers=(("Subject", "hi"),))
        self.assertTrue(msg.message.spool.closed)
        self.assertEqual(msg.message.spool.head.splitlines()[1:], [b"Subject: hi", b"Return-Path: <alice@example.net>",
                                                          b"X-Rcpt-To: <bob@example.org>", b""])


class WhoIsScannedTests(PipelineTestCase):
    def test_full_scan_for_unauthenticated(self) -> None:
        config = make_config(spamd=SpamdConfig(servers=SPAMD), clamav=ClamavConfig(servers=CLAMD))
        msg, verdict = self.run_message(config)
        self.assertIn(("spam", False), self.rec.calls)
        self.assertIn(("virus",), self.rec.calls)
        self.assertEqual(verdict.action, Action.ACCEPT)

    def test_authenticated_not_spam_scanned_but_virus_scanned(self) -> None:
        """SPEC §5.11: Auth skips rspamd (without strict_auth) but not clamav."""
        config = make_config(spamd=SpamdConfig(servers=SPAMD), clamav=ClamavConfig(servers=CLAMD))
        msg, _ = self.run_message(config, auth="alice")
        self.assertNotIn("spam", self.rec.names())
        self.assertIn("virus", self.rec.names())
        self.assertEqual(self.fields["spam"], "ignored, authenticated user")
        self.assertFalse(msg.strict)

    def test_strict_auth_scans_authenticated(self) -> None:
        config = make_config(main=GlobalConfig(strict_auth=True), spamd=SpamdConfig(servers=SPAMD))
        self.run_message(config, auth="alice")
        self.assertIn(("spam", False), self.rec.calls)

    def test_our_networks_is_authenticated_with_sender_as_user(self) -> None:
        config = make_config(main=GlobalConfig(our_networks=NetList([ipaddress.ip_network("192.0.2.0/24")])),
                             spamd=SpamdConfig(servers=SPAMD))
        msg, _ = self.run_message(config)
        self.assertEqual(msg.message.user, "alice@example.net")
        self.assertFalse(msg.message.sasl_authenticated)
        self.assertNotIn("spam", self.rec.names())

    def test_recipient_whitelist_needs_all_recipients(self) -> None:
        config = make_config(main=GlobalConfig(whitelist=RecipientList(["postmaster"])),
                             spamd=SpamdConfig(servers=SPAMD), clamav=ClamavConfig(servers=CLAMD))
        msg, _ = self.run_message(config, rcpts=("<postmaster@example.org>",))
        self.assertEqual(self.rec.names().count("spam"), 0)
        self.assertEqual(self.fields["virus"], "skipped, recipient whitelist")
        self.rec.calls.clear()
        self.run_message(config, rcpts=("<postmaster@example.org>", "<bob@example.org>"))
        self.assertIn("spam", self.rec.names())
        self.assertIn("virus", self.rec.names())

    def test_dkim_only_scan_when_skipped_and_rspamd_sign(self) -> None:
        from rmilter.config.schema import DkimConfig

        config = make_config(spamd=SpamdConfig(servers=SPAMD), dkim=DkimConfig(rspamd_sign=True))
        self.run_message(config, auth="alice")
        self.assertIn(("spam", True), self.rec.calls)

    def test_oversized_skips_scans_and_copy_but_updates_rates(self) -> None:
        config = make_config(main=GlobalConfig(max_size=10), spamd=SpamdConfig(servers=SPAMD),
                             clamav=ClamavConfig(servers=CLAMD))
        msg, verdict = self.run_message(config, body=b"x" * 100)
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertEqual(self.fields["spam"], "skipped(oversized)")
        self.assertEqual(self.fields["virus"], "skipped(oversized)")
        self.assertNotIn("publish", self.rec.names())
        self.assertIn("rate_update", self.rec.names())
        self.assertIn("dkim", self.rec.names())

    def test_reply_to_our_mail_skips_full_scan(self) -> None:
        """SPEC §6.4: a reply hit clears strict, so no rspamd full scan and no EOM greylisting."""
        self.rec.reply_hit = "<orig@example.com>"
        config = make_config(spamd=SpamdConfig(servers=SPAMD))
        msg, _ = self.run_message(config, headers=(("In-Reply-To", " <orig@example.com> "),
                                                   ("References", "<a@x> <orig@example.com>")))
        self.assertEqual([c for c in self.rec.calls if c[0] == "reply_lookup"],
                         [("reply_lookup", ("<orig@example.com>", "<a@x>"))])
        self.assertNotIn("spam", self.rec.names())
        self.assertEqual(self.fields["spam"], "skipped, reply to our message")

    def test_summary_line_names_the_reply(self) -> None:
        """The summary line says which of our messages a reply answers (issue 7)."""
        from twisted.logger import globalLogPublisher

        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.rec.reply_hit = "<orig@example.com>"
        self.run_message(make_config(), headers=(("In-Reply-To", "<orig@example.com>"),))
        [summary] = [e for e in events if e.get("summary")]
        self.assertIn("; reply to our message <orig@example.com>; verdict: accept", summary["summary_text"])
        self.assertEqual(summary["reply_to"], "<orig@example.com>")
        self.assertEqual(summary["queue_id"], "QID1")


class EomOrderTests(PipelineTestCase):
    def config(self, **spamd: Any) -> Config:
        return make_config(
            spamd=SpamdConfig(servers=SPAMD, **spamd),
            clamav=ClamavConfig(servers=CLAMD),
            redis=RedisConfig(servers_grey=REDIS),
        )

    def test_spam_reject_wins_and_publishes_spam_copy(self) -> None:
        self.rec.spam = CheckResult(Check.SPAM, "rejected, action: reject", verdict=reject("Gtube"),
                                    details={"spam_action": "reject"})
        self.rec.virus = CheckResult(Check.VIRUS, "rejected, virus found", verdict=reject("Infected: X"))
        msg, verdict = self.run_message(self.config())
        self.assertEqual(verdict.action, Action.REJECT)
        self.assertEqual(verdict.reply.text, "Gtube")  # type: ignore[union-attr]
        self.assertIn(("publish", "spam"), self.rec.calls)
        self.assertNotIn(("publish", "copy"), self.rec.calls)
        self.assertNotIn("rate_update", self.rec.names())
        self.assertNotIn("dkim", self.rec.names())
        self.assertEqual(self.fields["virus"], "skipped, spam detected")
        self.assertEqual(self.fields["dkim"], "skipped, spam detected")

    def test_soft_reject_names_the_reason_for_skipped_checks(self) -> None:
        self.rec.spam = CheckResult(Check.SPAM, "delayed, action: soft reject", verdict=tempfail("Temporary failure"),
                                    details={"spam_action": "soft reject"})
        msg, verdict = self.run_message(self.config())
        self.assertEqual(verdict.action, Action.TEMPFAIL)
        self.assertEqual(self.fields["virus"], "skipped, spam soft reject")
        self.assertEqual(self.fields["dkim"], "skipped, spam soft reject")

    def test_add_header_action_greylists_at_eom(self) -> None:
        """SPEC §5.9 4b: greylist / add header / rewrite subject are greylisted after rspamd."""
        self.rec.spam = CheckResult(Check.SPAM, "action: add header", details={"spam_action": "add header"})
        self.rec.grey = CheckResult(Check.GREYLIST, "greylisted", verdict=tempfail("Try again later"))
        msg, verdict = self.run_message(self.config())
        self.assertIn(("greylist", True), self.rec.calls)
        self.assertEqual(verdict.action, Action.TEMPFAIL)
        self.assertEqual(self.fields["spam"], "greylisted, action: add header")
        self.assertEqual(self.fields["virus"], "skipped, spamd greylist")

    def test_greylist_pass_adds_header_and_continues(self) -> None:
        self.rec.spam = CheckResult(Check.SPAM, "action: greylist", details={"spam_action": "greylist"})
        _, verdict = self.run_message(self.config())
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertIn(AddHeader(name="X-Rmilter-Greylist", value="n"), verdict.edits)

    def test_no_eom_greylisting_for_authenticated_with_strict_auth(self) -> None:
        config = dataclasses.replace(self.config(), main=dataclasses.replace(self.config().main, strict_auth=True))
        self.rec.spam = CheckResult(Check.SPAM, "action: greylist", details={"spam_action": "greylist"})
        self.run_message(config, auth="alice")
        self.assertNotIn("greylist", self.rec.names())

    def test_scan_failure_with_tempfail(self) -> None:
        self.rec.spam = CheckResult(Check.SPAM, "delayed, temporary fail",
                                    verdict=tempfail("Temporary service failure."), failed=True)
        msg, verdict = self.run_message(self.config(tempfail_on_error=True))
        self.assertEqual(verdict.action, Action.TEMPFAIL)
        self.assertEqual(self.fields["virus"], "skipped, spamd tempfail")

    def test_scan_failure_without_tempfail_skips_copy_keeps_virus(self) -> None:
        self.rec.spam = CheckResult(Check.SPAM, "ignored, temporary fail", failed=True)
        _, verdict = self.run_message(self.config())
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertNotIn(("publish", "copy"), self.rec.calls)
        self.assertIn("virus", self.rec.names())

    def test_virus_rejects_after_clean_spam(self) -> None:
        self.rec.virus = CheckResult(Check.VIRUS, "rejected, virus found", verdict=reject("Infected: Eicar"))
        msg, verdict = self.run_message(self.config())
        self.assertEqual(verdict.reply.text, "Infected: Eicar")  # type: ignore[union-attr]
        self.assertEqual(self.fields["dkim"], "skipped, clamav virus")
        self.assertIn(("publish", "copy"), self.rec.calls)
        self.assertNotIn("rate_update", self.rec.names())

    def test_accepted_message_updates_rates_signs_and_remembers(self) -> None:
        _, verdict = self.run_message(self.config())
        names = self.rec.names()
        self.assertLess(names.index("rate_update"), names.index("dkim"))
        self.assertIn("remember", names)
        self.assertIn(AddHeader(name="DKIM-Signature", value="sig"), verdict.edits)


class EarlyStageTests(PipelineTestCase):
    def test_rate_limit_at_rcpt_drops_recipient(self) -> None:
        config = make_config(redis=RedisConfig(servers_limits=REDIS), limits=LimitsConfig(limit_to=Bucket(1, 1.0)))
        self.rec.rate = CheckResult(Check.RATELIMIT, "rate limit exceeded", verdict=tempfail("Rate limit exceeded"))
        runtime = Runtime(Deps(config=config, clock=Clock(), run_blocking=run_inline))
        pipeline = Pipeline(lambda: runtime, self.rec.checks)
        conn = ConnectionContext(family="4", client_address="192.0.2.1")
        msg, _ = pipeline.mail(conn, ["<a@b>"])
        verdict = self.successResultOf(pipeline.rcpt(msg, ["<c@d>"]))
        self.assertEqual(verdict.reply.text, "Rate limit exceeded")  # type: ignore[union-attr]
        self.assertEqual(msg.message.recipients, [])
        self.assertEqual(self.rec.calls, [("rate_check", "<c@d>")])
        self.assertEqual(pipeline.stages_needing_replies(), ("eom", "rcpt"))

    def test_greylisting_at_data_when_rspamd_does_not_decide(self) -> None:
        config = make_config(spamd=SpamdConfig(spamd_greylist=False), redis=RedisConfig(servers_grey=REDIS))
        self.rec.grey = CheckResult(Check.GREYLIST, "new", verdict=tempfail("Try again later"))
        msg, verdict = self.run_message(config)
        self.assertEqual(verdict.action, Action.TEMPFAIL)
        self.assertIn(("greylist", False), self.rec.calls)
        runtime = Runtime(Deps(config=config, clock=Clock(), run_blocking=run_inline))
        self.assertIn("data", Pipeline(lambda: runtime).stages_needing_replies())

    def test_no_data_greylisting_for_authenticated_or_unknown_ip(self) -> None:
        config = make_config(spamd=SpamdConfig(spamd_greylist=False), redis=RedisConfig(servers_grey=REDIS))
        self.run_message(config, auth="alice")
        self.run_message(config, ip=None)
        self.assertNotIn("greylist", self.rec.names())

    def test_greylisting_disabled(self) -> None:
        config = make_config(spamd=SpamdConfig(spamd_greylist=False), redis=RedisConfig(servers_grey=REDIS),
                             greylisting=GreylistingConfig(enable=False))
        self.run_message(config)
        self.assertNotIn("greylist", self.rec.names())
