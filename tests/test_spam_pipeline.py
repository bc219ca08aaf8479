"""Who is scanned by Rspamd, end to end through the pipeline with the real spam check (SPEC §5.9, §5.11).

The other checks are replaced by stubs; Rspamd is the in-memory fake, so these
tests see exactly which messages reach it and with which context.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import random
import tempfile
from typing import Any, List, Optional, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends.rspamd import RspamdClient
from rmilter.config.schema import (
    ClamavConfig,
    Config,
    DkimConfig,
    GlobalConfig,
    RedisConfig,
    RedisServer,
    ServerSpec,
    SpamdConfig,
)
from rmilter.context import MessageContext
from rmilter.deps import Deps
from rmilter.netlist import NetList, RecipientList
from rmilter.pipeline import Checks, Pipeline
from rmilter.runtime import Runtime
from rmilter.spool import run_inline
from rmilter.summary import summary_event
from rmilter.testing.fake_rspamd import HANG, FakeRspamd, FakeRspamdCluster, checkv2_reply
from rmilter.verdict import Action, AddHeader, ChangeHeader, Check, CheckResult, Verdict, reply_line, skipped, tempfail
from tests.pipeline_support import send_until_eom

R1 = ServerSpec("r1", host="127.0.0.1", port=11333)


def net(text: str) -> NetList:
    return NetList([ipaddress.ip_network(text)])


class PipelineSpamTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.fakes = FakeRspamdCluster({"r1": FakeRspamd()})
        self.grey_calls: List[bool] = []
        self.grey_spf: List[bool] = []
        self.grey_result = CheckResult(Check.GREYLIST, "passed")
        self.published: List[str] = []
        # the real spam check; the others answer as the tests say
        self.checks = Checks(
            virus=lambda message, deps: succeed(CheckResult(Check.VIRUS, "clean")),
            greylist=self.check_grey,
            ratelimit=lambda message, deps, *, recipient: succeed(skipped(Check.RATELIMIT, "limits inactive")),
            ratelimit_record=lambda message, deps: succeed(skipped(Check.RATELIMIT, "limits inactive")),
            dkim=lambda message, deps: succeed(CheckResult(Check.DKIM, "unsigned")),
            copies=self.publish,
            replies=lambda message, deps: succeed(skipped(Check.REPLIES, "inactive")),
            replies_record=lambda message, deps: succeed(skipped(Check.REPLIES, "inactive")),
        )

    def check_grey(self, msg: MessageContext, deps: Deps, *, data_hash: bool = False,  # type: ignore[no-untyped-def]
                   sender_spf_pass: bool = False):
        self.grey_calls.append(data_hash)
        self.grey_spf.append(sender_spf_pass)
        return succeed(self.grey_result)

    def publish(self, msg: MessageContext, deps: Deps, *, kind: str):  # type: ignore[no-untyped-def]
        self.published.append(kind)
        return succeed(skipped(Check.COPIES, "recorded by the test"))

    def config(self, *, main: Optional[GlobalConfig] = None, spamd: Optional[SpamdConfig] = None,
               **sections: Any) -> Config:
        main = dataclasses.replace(main or GlobalConfig(), tempdir=tempfile.gettempdir())
        spamd = dataclasses.replace(spamd or SpamdConfig(), servers=(R1,))
        return Config(main=main, spamd=spamd, **sections)

    def run_message(self, config: Config, *, auth: Optional[str] = None, ip: str = "192.0.2.10",
                    rcpts: Sequence[str] = ("<bob@example.org>",), body: bytes = b"Hello\r\n"):
        self.clock = Clock()
        self.fakes.clock = self.clock
        rspamd = RspamdClient(config.spamd, self.clock, endpoint_for=self.fakes.endpoint_for, rng=random.Random(0))
        runtime = Runtime(Deps(config=config, clock=self.clock, run_blocking=run_inline, rspamd=rspamd))
        pipeline = Pipeline(lambda: runtime, self.checks)
        txn, _, d = send_until_eom(self, pipeline, ip=ip, auth=auth, rcpts=rcpts, body=body, helo="helo.example.net")
        assert d is not None
        self.clock.advance(0)
        verdict: Verdict = self.successResultOf(d)
        pipeline.finish(txn, verdict)
        self.fields = summary_event(txn.message, txn.results, verdict)
        return txn, verdict

    @property
    def requests(self):  # type: ignore[no-untyped-def]
        return self.fakes["r1"].requests


class WhoIsScannedTests(PipelineSpamTestCase):
    def test_ordinary_message_is_scanned_with_its_context(self) -> None:
        msg, verdict = self.run_message(self.config())
        [request] = self.requests
        self.assertEqual(request.header("IP"), "192.0.2.10")
        self.assertEqual(request.header("Helo"), "helo.example.net")
        self.assertEqual(request.header("Hostname"), "mail.example.net")
        self.assertEqual(request.header("From"), "alice@example.net")
        self.assertEqual(request.header_values("Rcpt"), ["<bob@example.org>"])
        self.assertEqual(request.header("Queue-Id"), "QID1")
        self.assertIsNone(request.header("User"))
        self.assertTrue(request.body.endswith(b"\r\n\r\nHello\r\n"))
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertEqual(self.fields["spam"], "no spam")

    def test_authenticated_sender_is_not_scanned(self) -> None:
        msg, _ = self.run_message(self.config(), auth="alice")
        self.assertEqual(self.requests, [])
        self.assertEqual(self.fields["spam"], "ignored, authenticated user")

    def test_strict_auth_scans_authenticated_sender(self) -> None:
        self.run_message(self.config(main=GlobalConfig(strict_auth=True)), auth="alice")
        self.assertEqual(self.requests[0].header("User"), "alice")

    def test_our_networks_not_scanned_unless_strict_auth(self) -> None:
        main = GlobalConfig(our_networks=net("192.0.2.0/24"))
        self.run_message(self.config(main=main))
        self.assertEqual(self.requests, [])
        self.run_message(self.config(main=dataclasses.replace(main, strict_auth=True)))
        self.assertEqual(self.requests[0].header("User"), "alice@example.net")

    def test_spamd_whitelist(self) -> None:
        msg, _ = self.run_message(self.config(spamd=SpamdConfig(whitelist=net("192.0.2.0/24"))))
        self.assertEqual(self.requests, [])
        self.assertEqual(self.fields["spam"], "skipped, whitelisted")
        self.run_message(self.config(spamd=SpamdConfig(whitelist=net("192.0.2.0/24"))), ip="198.51.100.7")
        self.assertEqual(len(self.requests), 1)

    def test_recipient_whitelist_needs_every_recipient(self) -> None:
        """B3: a message is recipient-whitelisted only when all recipients are."""
        config = self.config(main=GlobalConfig(whitelist=RecipientList(["postmaster"])))
        self.run_message(config, rcpts=("<postmaster@example.org>",))
        self.assertEqual(self.requests, [])
        self.run_message(config, rcpts=("<postmaster@example.org>", "<bob@example.org>"))
        self.assertEqual(len(self.requests), 1)
        self.run_message(config, rcpts=("<bob@example.org>", "<postmaster@example.org>"))
        self.assertEqual(len(self.requests), 2)

    def test_oversized_message_is_not_scanned(self) -> None:
        msg, verdict = self.run_message(self.config(main=GlobalConfig(max_size=100)), body=b"x" * 200)
        self.assertEqual(self.requests, [])
        self.assertEqual(self.fields["spam"], "skipped(oversized)")
        self.assertEqual(verdict.action, Action.ACCEPT)

    def test_dkim_only_scan_for_skipped_messages(self) -> None:
        """SPEC §6.8.6: rspamd_sign makes skipped (not oversized) mail a DKIM-only scan."""
        self.fakes["r1"].answer(checkv2_reply(action="reject", dkim_signature="v=1; d=example.net"))
        msg, verdict = self.run_message(self.config(dkim=DkimConfig(rspamd_sign=True)), auth="alice")
        self.assertEqual(self.requests[0].header("Settings"), '{"groups_enabled":["dkim"]}')
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertIn(AddHeader(name="DKIM-Signature", value="v=1; d=example.net"), verdict.edits)
        self.assertEqual(self.fields["spam"], "dkim sign only, whitelisted")


class VerdictThroughPipelineTests(PipelineSpamTestCase):
    def test_reject_is_final_and_published(self) -> None:
        self.fakes["r1"].answer(checkv2_reply(action="reject", smtp_message="Gtube pattern"))
        msg, verdict = self.run_message(self.config())
        self.assertEqual(reply_line(verdict.action, verdict.reply), "554 5.7.1 Gtube pattern")
        self.assertEqual(self.published, ["spam"])
        self.assertEqual(self.fields["virus"], "skipped, spam detected")

    def test_soft_reject(self) -> None:
        self.fakes["r1"].answer(checkv2_reply(action="soft reject", smtp_message="later"))
        msg, verdict = self.run_message(self.config())
        self.assertEqual(reply_line(verdict.action, verdict.reply), "451 4.7.1 later")
        self.assertEqual(self.fields["spam"], "delayed, action: soft reject")

    def test_add_header_after_passing_greylisting(self) -> None:
        """SPEC §5.9 4(b): greylist/add header/rewrite subject run EOM greylisting first."""
        self.fakes["r1"].answer(checkv2_reply(action="add header"))
        config = self.config(redis=RedisConfig(servers_grey=(RedisServer("r", "127.0.0.1"),)))
        _, verdict = self.run_message(config)
        self.assertEqual(self.grey_calls, [True])
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertIn(ChangeHeader(name="X-Spam", index=1, value="yes"), verdict.edits)

    def test_spf_pass_handed_to_greylisting(self) -> None:
        """EOM greylisting learns from the spam result whether Rspamd saw SPF pass (R_SPF_ALLOW)."""
        config = self.config(redis=RedisConfig(servers_grey=(RedisServer("r", "127.0.0.1"),)))
        self.fakes["r1"].answer(checkv2_reply(action="greylist", symbols={"R_SPF_ALLOW": -0.2}))
        self.run_message(config)
        self.fakes["r1"].answer(checkv2_reply(action="greylist", symbols={"R_SPF_FAIL": 1.0}))
        self.run_message(config)
        self.assertEqual(self.grey_calls, [True, True])
        self.assertEqual(self.grey_spf, [True, False])

    def test_greylisted_after_add_header(self) -> None:
        self.fakes["r1"].answer(checkv2_reply(action="add header"))
        self.grey_result = CheckResult(Check.GREYLIST, "greylisted", verdict=tempfail("Try again later"))
        config = self.config(redis=RedisConfig(servers_grey=(RedisServer("r", "127.0.0.1"),)))
        msg, verdict = self.run_message(config)
        self.assertEqual(reply_line(verdict.action, verdict.reply), "451 4.7.1 Try again later")
        self.assertEqual(self.fields["spam"], "greylisted, action: add header")

    def test_no_greylisting_for_no_action(self) -> None:
        config = self.config(redis=RedisConfig(servers_grey=(RedisServer("r", "127.0.0.1"),)))
        self.run_message(config)
        self.assertEqual(self.grey_calls, [])

    def test_rspamd_down_with_tempfail_on_error(self) -> None:
        self.fakes["r1"].refuse()
        msg, verdict = self.run_message(self.config(spamd=SpamdConfig(tempfail_on_error=True, retry_count=1)))
        self.assertEqual(reply_line(verdict.action, verdict.reply), "451 4.7.1 Temporary service failure.")
        self.assertEqual(self.fields["spam"], "delayed, temporary fail")

    def test_rspamd_down_without_tempfail_on_error(self) -> None:
        self.fakes["r1"].refuse()
        msg, verdict = self.run_message(self.config(spamd=SpamdConfig(retry_count=1)))
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertEqual(self.fields["spam"], "ignored, temporary fail")
        self.assertEqual(self.published, [])  # no copy of unscanned mail (SPEC §6.5)


class AbandonedMessageTests(PipelineSpamTestCase):
    """The MTA closes the connection while Rspamd scans (SPEC §5.10): the scan stops, nothing follows."""

    def setUp(self) -> None:
        super().setUp()
        self.after_scan: List[str] = []
        self.virus_cancelled: List[bool] = []
        self.checks = dataclasses.replace(
            self.checks,
            ratelimit_record=lambda message, deps: self.record("ratelimit_record"),
            dkim=lambda message, deps: self.record("dkim"),
            replies_record=lambda message, deps: self.record("replies_record"),
        )

    def record(self, name: str):  # type: ignore[no-untyped-def]
        self.after_scan.append(name)
        return succeed(skipped(Check.RATELIMIT, "recorded by the test"))

    def start(self, config: Config):  # type: ignore[no-untyped-def]
        self.clock = Clock()
        self.fakes.clock = self.clock
        rspamd = RspamdClient(config.spamd, self.clock, endpoint_for=self.fakes.endpoint_for, rng=random.Random(0))
        runtime = Runtime(Deps(config=config, clock=self.clock, run_blocking=run_inline, rspamd=rspamd))
        pipeline = Pipeline(lambda: runtime, self.checks)
        txn, _, d = send_until_eom(self, pipeline)
        assert d is not None
        self.clock.advance(0)
        return pipeline, txn, d

    def test_abandon_cancels_the_scan_and_starts_nothing_more(self) -> None:
        self.fakes["r1"].answer(HANG)
        pipeline, txn, d = self.start(self.config(spamd=SpamdConfig(results_timeout=30.0, retry_count=5)))
        self.assertEqual(len(self.requests), 1)
        [request] = self.fakes["r1"].pending
        self.assertNoResult(d)
        pipeline.abandon(txn)
        self.successResultOf(d)  # at once, not after the 30 s deadline
        self.fakes["r1"].flush()
        self.assertTrue(request._disconnected, "the Rspamd connection was not closed")
        self.clock.advance(200)  # no retry of a cancelled scan
        self.assertEqual(len(self.requests), 1)
        self.assertEqual(self.after_scan, [])  # no rate recorded, no signature, no reply record
        self.assertEqual(self.published, [])
        self.assertEqual(txn.scans, set())
        self.assertEqual(self.flushLoggedErrors(), [])
        pipeline.finish(txn, None)
        assert txn.message.spool is not None
        self.assertTrue(txn.message.spool.closed)

    def test_abandon_cancels_the_virus_scan_too(self) -> None:
        def hanging_virus(message: MessageContext, deps: Deps):  # type: ignore[no-untyped-def]
            def cancel(d: Any) -> None:
                self.virus_cancelled.append(True)
                d.callback(CheckResult(Check.VIRUS, "cancelled"))
            return Deferred(cancel)

        self.checks = dataclasses.replace(self.checks, virus=hanging_virus)
        self.fakes["r1"].answer(HANG)
        config = dataclasses.replace(self.config(), clamav=ClamavConfig(servers=(ServerSpec("c1", host="127.0.0.1", port=3310),)))
        pipeline, txn, d = self.start(config)
        self.assertEqual(len(txn.scans), 2)  # Rspamd and clamd at the same time
        pipeline.abandon(txn)
        self.successResultOf(d)
        self.assertEqual(self.virus_cancelled, [True])
        self.assertEqual(self.after_scan, [])

    def test_a_scan_that_ends_normally_is_forgotten(self) -> None:
        pipeline, txn, d = self.start(self.config())
        self.assertEqual(self.successResultOf(d).action, Action.ACCEPT)
        self.assertEqual(txn.scans, set())
        self.assertEqual(self.after_scan, ["ratelimit_record", "dkim", "replies_record"])
        pipeline.abandon(txn)  # after the verdict: nothing left to cancel, no error
        self.assertEqual(self.flushLoggedErrors(), [])
