"""The virus check (SPEC §5.9 steps 7-8, §6.9, §8.4) over the in-memory clamd, alone and in the pipeline."""
from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any, Dict, List, Sequence, Tuple

from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends import clamd
from rmilter.checks import virus
from rmilter.config.schema import ClamavConfig, Config, GlobalConfig, ServerSpec, SpamdConfig
from rmilter.context import ConnectionContext, MessageContext
from rmilter.netlist import NetList, RecipientList
from rmilter.deps import Deps
from rmilter.pipeline import Checks, Pipeline, Transaction
from rmilter.runtime import Runtime
from rmilter.spool import run_inline
from rmilter.summary import summary_event
from rmilter.testing.fake_clamd import REFUSE, MemoryClamdNetwork, Script
from rmilter.verdict import Action, Check, CheckResult, SmtpReply, decide, reject
from tests.pipeline_support import send_until_eom

CLAMD = ServerSpec(name="127.0.0.1:3310", host="127.0.0.1", port=3310)
ADDR = ("127.0.0.1", 3310)
SPAMD = ServerSpec(name="127.0.0.1:11333", host="127.0.0.1", port=11333)


def make_config(*, tempfail_on_error: bool = False, retry_count: int = 2, spamd_servers: Sequence[ServerSpec] = (),
                clamav_whitelist: Sequence[str] = (), whitelist: Sequence[str] = (), max_size: int = 0,
                tempdir: str = "/tmp") -> Config:
    return Config(
        main=GlobalConfig(tempdir=tempdir, max_size=max_size, whitelist=RecipientList(whitelist)),
        clamav=ClamavConfig(
            servers=(CLAMD,),
            whitelist=NetList(ipaddress.ip_network(n) for n in clamav_whitelist),
        ),
        spamd=SpamdConfig(
            servers=tuple(spamd_servers), retry_count=retry_count, retry_timeout=1.0,
            tempfail_on_error=tempfail_on_error,
        ),
    )


class LogCapture:
    """Collects formatted log lines of the test."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.lines: List[str] = []
        observer: Any = self  # an ILogObserver: a callable taking the event
        globalLogPublisher.addObserver(observer)
        test.addCleanup(globalLogPublisher.removeObserver, observer)

    def __call__(self, event: Any) -> None:
        self.lines.append(formatEvent(event))

    def matching(self, text: str) -> List[str]:
        return [line for line in self.lines if text in line]


class VirusCheckBase(SynchronousTestCase):
    def setUp(self) -> None:
        self.log = LogCapture(self)

    def deps_for(self, config: Config) -> Deps:
        self.reactor = MemoryReactorClock()
        self.network = MemoryClamdNetwork(self.reactor)
        self.deps = Deps(config=config, clock=self.reactor, run_blocking=run_inline,
                         clamd=clamd.from_config(config, self.reactor))
        return self.deps

    def message(self, config: Config, body: bytes = b"Hello\r\n") -> MessageContext:
        deps = self.deps_for(config)
        conn = ConnectionContext(hostname="mail.example.net", family="4", client_address="192.0.2.10")
        msg = MessageContext(connection=conn)
        msg.spool = deps.new_spool()
        msg.spool.set_head(b"Received: from x\r\nSubject: hi\n\r\n")
        msg.spool.append(body)
        self.successResultOf(msg.spool.finish())
        self.addCleanup(msg.spool.close)
        return msg

    def scan(self, msg: MessageContext) -> CheckResult:
        d = virus.check(msg, self.deps)
        self.network.run()
        for _ in range(10):  # retries wait retry_timeout between attempts
            if d.called:
                break
            self.reactor.advance(1.0)
            self.network.run()
        return self.successResultOf(d)


class VirusCheckTests(VirusCheckBase):
    """CheckResult per scan outcome (SPEC §5.9 step 8, §8.4 V values)."""

    def test_virus_rejects_with_name(self) -> None:
        """A virus: REJECT 554 5.7.1 Infected: <name>, log "rejected, virus found", scan line logged."""
        msg = self.message(make_config())
        self.network.add(ADDR, Script.found("Harness.Eicar.Body.UNOFFICIAL"))
        result = self.scan(msg)
        self.assertEqual((result.check, result.summary, result.failed), (Check.VIRUS, "rejected, virus found", False))
        assert result.verdict is not None
        self.assertEqual(result.verdict.action, Action.REJECT)
        self.assertEqual(result.verdict.reply, SmtpReply("554", "5.7.1", "Infected: Harness.Eicar.Body.UNOFFICIAL"))
        details = dict(result.details)
        self.assertEqual((details["virus_name"], details["clamd_server"]), ("Harness.Eicar.Body.UNOFFICIAL", CLAMD.name))
        (line,) = self.log.matching("clamscan: scan")
        self.assertRegex(line, r"^%s; clamscan: scan \d+\.\d{3}, 127\.0\.0\.1:3310, found Harness\.Eicar\.Body\.UNOFFICIAL$"
                         % msg.tag)

    def test_clean_has_no_verdict(self) -> None:
        """Clean: no verdict, log "clean", scan time and server in the details."""
        msg = self.message(make_config())
        self.network.add(ADDR, Script.ok())
        result = self.scan(msg)
        self.assertEqual((result.summary, result.verdict, result.failed), ("clean", None, False))
        self.assertEqual(result.details["clamd_server"], CLAMD.name)
        self.assertIn("clamd_scan_time", dict(result.details))
        self.assertEqual(len(self.log.matching("clamscan: scan")), 1)

    def test_failure_with_tempfail_on_error(self) -> None:
        """clamd unusable after retries with tempfail_on_error: TEMPFAIL 451 4.7.1 Temporary service failure."""
        msg = self.message(make_config(tempfail_on_error=True))
        self.network.add(ADDR, REFUSE)
        result = self.scan(msg)
        self.assertEqual((result.summary, result.failed), ("delayed, temporary fail", True))
        assert result.verdict is not None
        self.assertEqual(result.verdict.action, Action.TEMPFAIL)
        self.assertEqual(result.verdict.reply, SmtpReply("451", "4.7.1", "Temporary service failure."))
        self.assertEqual(len(self.network.attempts), 2)  # spamd.retry_count attempts

    def test_failure_without_tempfail_continues(self) -> None:
        """Without tempfail_on_error a failed scan demands nothing: "ignored, temporary fail"."""
        msg = self.message(make_config(tempfail_on_error=False))
        self.network.add(ADDR, Script.error())
        result = self.scan(msg)
        self.assertEqual((result.summary, result.verdict, result.failed), ("ignored, temporary fail", None, True))
        self.assertIn("size limit", dict(result.details)["clamd_error"])

    def test_failure_details_and_log_line(self) -> None:
        """A scan failing with ClamdError: server, scan time, attempts and the last reason in the
        details, and one warning naming them."""
        msg = self.message(make_config(tempfail_on_error=False))
        self.network.add(ADDR, REFUSE)
        result = self.scan(msg)
        details = dict(result.details)
        self.assertEqual((details["clamd_server"], details["clamd_scan_time"], details["clamd_attempts"]),
                         (CLAMD.name, 1.0, 2))
        self.assertIn("connect failed", details["clamd_error"])
        self.assertNotIn("virus", details)
        (line,) = self.log.matching("clamscan: failed after")
        self.assertTrue(line.startswith("%s; clamscan: failed after 2 attempt(s), 127.0.0.1:3310: connect failed"
                                        % msg.tag), line)

    def test_never_fails_on_internal_error(self) -> None:
        """A bug inside the client still gives a result (the configured failure outcome), logged once."""
        msg = self.message(make_config(tempfail_on_error=True))

        class Broken:
            def scan(self, source: Any, tag: str = "") -> Deferred:
                return fail(RuntimeError("boom"))

        self.deps = dataclasses.replace(self.deps, clamd=Broken())
        result = self.successResultOf(virus.check(msg, self.deps))
        self.assertEqual((result.summary, result.failed), ("delayed, temporary fail", True))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_cancel_ends_scan_quietly(self) -> None:
        """Cancelling the check (the message already ended) aborts the clamd connection and
        still fires with a result, without logging an error."""
        msg = self.message(make_config(tempfail_on_error=True))
        self.network.add(ADDR, Script.silence())
        d = virus.check(msg, self.deps)
        self.network.run()
        d.cancel()
        result = self.successResultOf(d)
        self.assertEqual((result.summary, result.failed), ("delayed, temporary fail", True))
        self.assertTrue(self.network.links[0].client_transport.disconnected)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_no_client_is_no_av_servers(self) -> None:
        """Called without a clamd client the check reports "skipped, no av servers"."""
        msg = self.message(make_config())
        self.deps = dataclasses.replace(self.deps, clamd=None)
        result = self.successResultOf(virus.check(msg, self.deps))
        self.assertEqual((result.summary, result.skipped), ("skipped, no av servers", True))

    def test_virus_result_wins_over_clean_spam_in_decide(self) -> None:
        """decide() orders results: a virus REJECT ends the message after a clean spam scan."""
        verdict = decide([CheckResult(Check.SPAM, "no spam"), CheckResult(Check.VIRUS, "rejected, virus found",
                                                                          verdict=reject("Infected: X"))])
        self.assertEqual((verdict.action, verdict.reply), (Action.REJECT, SmtpReply("554", "5.7.1", "Infected: X")))


class PipelineVirusTests(VirusCheckBase):
    """The pipeline with the real virus check and the in-memory clamd (SPEC §5.9, §5.11)."""

    def run_message(self, config: Config, *, ip: str = "192.0.2.10", rcpts: Sequence[str] = ("<bob@example.org>",),
                    body: bytes = b"Hello\r\n", settle: bool = True,
                    checks: Checks = Checks()) -> Tuple[Transaction, "Deferred[Any]"]:
        runtime = Runtime(self.deps_for(config))
        pipeline = Pipeline(lambda: runtime, checks)
        msg, _, d = send_until_eom(self, pipeline, ip=ip, rcpts=rcpts, body=body)
        assert d is not None
        if settle:
            self.network.run()
            for _ in range(10):
                if d.called:
                    break
                self.reactor.advance(1.0)
                self.network.run()
        def finished(verdict: Any) -> Any:
            pipeline.finish(msg, verdict)
            self.fields = summary_event(msg.message, msg.results, verdict)
            return verdict

        return msg, d.addCallback(finished)

    def test_infected_message_is_rejected(self) -> None:
        """A message clamd finds a virus in ends with 554 5.7.1 Infected: <name>; the spool reached clamd."""
        msg, d = self.run_message(make_config(tempdir=self.tmp()), body=b"X5O!P%@AP...\r\n", settle=False)
        self.network.add(ADDR, Script.found("Eicar-Signature"))
        self.network.run()
        verdict = self.successResultOf(d)
        self.assertEqual((verdict.action, verdict.reply), (Action.REJECT, SmtpReply("554", "5.7.1", "Infected: Eicar-Signature")))
        self.assertEqual(self.fields["virus"], "rejected, virus found")
        self.assertEqual(self.fields["dkim"], "skipped, clamav virus")
        (server,) = self.network.servers(ADDR)
        self.assertTrue(bytes(server.received).endswith(b"\r\n\r\nX5O!P%@AP...\r\n"))
        (summary,) = self.log.matching("msg done")
        self.assertIn("virus scan: rejected, virus found", summary)

    def tmp(self) -> str:
        import os

        path = self.mktemp()
        os.makedirs(path)
        return path

    def test_clean_message_is_accepted(self) -> None:
        """A clean message is accepted with "virus scan: clean"."""
        msg, d = self.run_message(make_config(tempdir=self.tmp()), settle=False)
        self.network.add(ADDR, Script.ok())
        self.network.run()
        verdict = self.successResultOf(d)
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertEqual(self.fields["virus"], "clean")

    def test_failure_outcomes_follow_tempfail_on_error(self) -> None:
        """clamd down: TEMPFAIL 451 4.7.1 with tempfail_on_error, ACCEPT (unscanned) without."""
        msg, d = self.run_message(make_config(tempdir=self.tmp(), tempfail_on_error=True))
        verdict = self.successResultOf(d)
        self.assertEqual((verdict.action, verdict.reply),
                         (Action.TEMPFAIL, SmtpReply("451", "4.7.1", "Temporary service failure.")))
        self.assertEqual(self.fields["virus"], "delayed, temporary fail")
        msg, d = self.run_message(make_config(tempdir=self.tmp(), tempfail_on_error=False))
        self.assertEqual(self.successResultOf(d).action, Action.ACCEPT)
        self.assertEqual(self.fields["virus"], "ignored, temporary fail")

    def test_exemptions_open_no_connection(self) -> None:
        """clamav.whitelist clients, all-whitelisted recipients and oversized messages are not scanned."""
        cases: List[Tuple[Config, Dict[str, Any], str]] = [
            (make_config(tempdir=self.tmp(), clamav_whitelist=["192.0.2.0/24"]), {}, "skipped, ip whitelist"),
            (make_config(tempdir=self.tmp(), whitelist=["bob@example.org"]), {}, "skipped, recipient whitelist"),
            (make_config(tempdir=self.tmp(), max_size=10), {}, "skipped(oversized)"),
        ]
        for config, kwargs, expected in cases:
            msg, d = self.run_message(config, **kwargs)
            self.assertEqual(self.successResultOf(d).action, Action.ACCEPT)
            self.assertEqual(self.fields["virus"], expected)
            self.assertEqual(self.network.attempts, [])

    def test_rspamd_and_clamd_run_concurrently(self) -> None:
        """clamd is already scanning while rspamd has not answered; decide() orders both results."""
        pending_spam: "Deferred[CheckResult]" = Deferred()
        checks = Checks(spam=lambda message, deps, *, dkim_only=False: pending_spam)
        msg, d = self.run_message(make_config(tempdir=self.tmp(), spamd_servers=[SPAMD]), settle=False, checks=checks)
        self.network.add(ADDR, Script.found("Win.Test.Virus"))
        self.network.run()
        self.assertEqual(len(self.network.attempts), 1)  # clamd connected before rspamd answered
        (server,) = self.network.servers(ADDR)
        self.assertTrue(server.replied)
        self.assertNoResult(d)
        pending_spam.callback(CheckResult(Check.SPAM, "no spam", details={"spam_action": "no action"}))
        verdict = self.successResultOf(d)
        self.assertEqual(verdict.reply, SmtpReply("554", "5.7.1", "Infected: Win.Test.Virus"))
        self.assertEqual((self.fields["spam"], self.fields["virus"]), ("no spam", "rejected, virus found"))
