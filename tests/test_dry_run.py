"""Dry run (issue 16): a check runs and records as usual, the message goes on as if it had passed.

The rewriting happens in one place (``verdict.dry_run_result``, applied where the pipeline keeps a
result); these tests drive the real pipeline with recorded checks and read the summary line.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from rmilter import config as rconfig
from rmilter.config.schema import (
    ClamavConfig,
    GlobalConfig,
    GreylistingConfig,
    LimitsConfig,
    RedisConfig,
    SpamdConfig,
    Bucket,
)
from rmilter.summary import summary_text
from rmilter.verdict import (
    Action,
    AddHeader,
    Check,
    CheckResult,
    Quarantine,
    Verdict,
    dry_run_checks,
    dry_run_result,
    reject,
    tempfail,
)
from tests.test_pipeline import CLAMD, REDIS, SPAMD, PipelineTestCase, make_config

GTUBE_REJECT = CheckResult(Check.SPAM, "rejected, action: reject",
                           verdict=reject("Gtube pattern"), edits=(AddHeader(name="X-Spamd-Result", value="r"),),
                           details={"spam_action": "reject"})
NEW_TRIPLET = CheckResult(Check.GREYLIST, "0 seconds passed (new record), greylisted till x",
                          verdict=tempfail("Try again later"),
                          edits=(AddHeader(name="X-Rmilter-Greylist", value="new"),))


class DryRunResultTests(SynchronousTestCase):
    def test_reject_becomes_would_reject_with_the_action(self) -> None:
        result = dry_run_result(GTUBE_REJECT)
        self.assertIsNone(result.verdict)
        self.assertFalse(result.demands_verdict)
        self.assertEqual(result.summary, "would reject, action: reject")
        self.assertEqual(result.would, "reject")
        self.assertEqual(result.would_verdict, GTUBE_REJECT.verdict)
        self.assertEqual(result.edits, GTUBE_REJECT.edits)  # the headers of a passing scan stay

    def test_tempfail_is_would_defer_and_the_note_is_kept(self) -> None:
        result = dry_run_result(NEW_TRIPLET)
        self.assertEqual(result.summary, "would defer, 0 seconds passed (new record), greylisted till x")
        self.assertEqual(result.would, "defer")

    def test_discard_and_quarantine(self) -> None:
        discard = dry_run_result(CheckResult(Check.SPAM, "discarded, action: reject", verdict=Verdict(Action.DISCARD)))
        self.assertEqual((discard.summary, discard.would), ("would discard, action: reject", "discard"))
        held = dry_run_result(CheckResult(Check.SPAM, "quarantined, action: reject",
                                          edits=(AddHeader(name="A", value="1"), Quarantine(reason="spam"))))
        self.assertEqual(held.edits, (AddHeader(name="A", value="1"),))
        self.assertEqual((held.summary, held.would), ("would quarantine, action: reject", "quarantine"))

    def test_a_result_that_wants_nothing_is_left_alone(self) -> None:
        clean = CheckResult(Check.VIRUS, "clean")
        self.assertIs(dry_run_result(clean), clean)

    def test_which_checks_each_directive_covers(self) -> None:
        base = make_config()
        self.assertEqual(dry_run_checks(base), frozenset())
        self.assertEqual(dry_run_checks(dataclasses.replace(base, spamd=SpamdConfig(dry_run=True))),
                         {Check.SPAM})
        self.assertEqual(dry_run_checks(dataclasses.replace(base, clamav=ClamavConfig(dry_run=True))),
                         {Check.VIRUS})
        self.assertEqual(dry_run_checks(dataclasses.replace(base, limits=LimitsConfig(dry_run=True))),
                         {Check.RATELIMIT})
        self.assertEqual(dry_run_checks(dataclasses.replace(base, greylisting=GreylistingConfig(dry_run=True))),
                         {Check.GREYLIST})
        self.assertEqual(dry_run_checks(dataclasses.replace(base, main=GlobalConfig(dry_run=True))),
                         {Check.SPAM, Check.VIRUS, Check.RATELIMIT, Check.GREYLIST})


class DryRunDirectiveTests(SynchronousTestCase):
    def parse(self, text: str) -> Any:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return rconfig.load(path)

    def test_every_section_and_the_global_one_parse(self) -> None:
        config = self.parse("dry_run = yes;\nspamd { dry_run = yes; }\nclamav { dry_run = yes; }\n"
                            "greylisting { dry_run = yes; }\nlimits { dry_run = yes; }\n")
        self.assertTrue(all((config.main.dry_run, config.spamd.dry_run, config.clamav.dry_run,
                             config.greylisting.dry_run, config.limits.dry_run)))
        self.assertIn("dry_run", rconfig.format_effective(config))

    def test_a_bad_value_is_a_file_line_error(self) -> None:
        with self.assertRaises(rconfig.ConfigError) as caught:
            self.parse("spamd {\n  dry_run = maybe;\n}\n")
        self.assertIn(":2:", caught.exception.errors[0])


class DryRunPipelineTests(PipelineTestCase):
    def test_spam_reject_in_dry_run_goes_on_and_the_line_says_so(self) -> None:
        self.rec.spam = GTUBE_REJECT
        config = make_config(spamd=SpamdConfig(servers=SPAMD, dry_run=True), clamav=ClamavConfig(servers=CLAMD))
        txn, verdict = self.run_message(config)
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertIn(AddHeader(name="X-Spamd-Result", value="r"), verdict.edits)
        # the message went on: clamd, DKIM and the rate update ran as for a clean message
        self.assertEqual(self.rec.names()[-3:], ["rate_update", "dkim", "remember"])
        self.assertIn("virus", self.rec.names())
        self.assertEqual(self.fields["spam"], "would reject, action: reject")
        text = summary_text(self.fields)
        self.assertIn("; spam scan: would reject, action: reject; ", text)
        self.assertTrue(text.endswith("; verdict: accept"), text)

    def test_spam_reject_without_dry_run_still_rejects(self) -> None:
        self.rec.spam = GTUBE_REJECT
        _, verdict = self.run_message(make_config(spamd=SpamdConfig(servers=SPAMD)))
        self.assertEqual(verdict.action, Action.REJECT)
        self.assertEqual(self.fields["spam"], "rejected, action: reject")

    def test_greylisting_at_data_in_dry_run_continues(self) -> None:
        self.rec.grey = NEW_TRIPLET
        config = make_config(spamd=SpamdConfig(spamd_greylist=False), redis=RedisConfig(servers_grey=REDIS),
                             greylisting=GreylistingConfig(dry_run=True))
        txn, verdict = self.run_message(config)
        self.assertEqual(self.rec.names().count("greylist"), 1)  # it ran (and recorded the triplet)
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertIn("; greylist: would defer; verdict: accept", summary_text(self.fields))

    def test_greylisting_after_rspamd_in_dry_run_keeps_the_spam_field(self) -> None:
        self.rec.spam = CheckResult(Check.SPAM, "no spam", details={"spam_action": "greylist"})
        self.rec.grey = NEW_TRIPLET
        config = make_config(spamd=SpamdConfig(servers=SPAMD), redis=RedisConfig(servers_grey=REDIS),
                             greylisting=GreylistingConfig(dry_run=True))
        _, verdict = self.run_message(config)
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertIn(AddHeader(name="X-Rmilter-Greylist", value="new"), verdict.edits)
        self.assertEqual(self.fields["spam"], "no spam")
        self.assertEqual(self.fields["greylist"], "would defer, 0 seconds passed (new record), greylisted till x")
        self.assertIn("; greylist: would defer;", summary_text(self.fields))

    def test_rate_limit_in_dry_run_keeps_the_recipient(self) -> None:
        self.rec.rate = CheckResult(Check.RATELIMIT, "rate limit exceeded", verdict=tempfail("Rate limit exceeded"))
        config = make_config(redis=RedisConfig(servers_limits=REDIS),
                             limits=LimitsConfig(limit_to=Bucket(1, 0.1), dry_run=True))
        txn, verdict = self.run_message(config, rcpts=("<a@example.org>", "<b@example.org>"))
        self.assertEqual(txn.message.recipient_addresses, ["<a@example.org>", "<b@example.org>"])
        self.assertEqual(verdict.action, Action.ACCEPT)
        text = summary_text(self.fields)
        self.assertEqual(text.count("rate limit: would defer"), 1)  # once, however many recipients

    def test_virus_in_dry_run_is_signed_and_accepted(self) -> None:
        self.rec.virus = CheckResult(Check.VIRUS, "rejected, virus found", verdict=reject("Infected: Eicar"))
        config = make_config(clamav=ClamavConfig(servers=CLAMD), main=GlobalConfig(dry_run=True))
        _, verdict = self.run_message(config)
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertIn("dkim", self.rec.names())
        self.assertIn("; virus scan: would reject, virus found;", summary_text(self.fields))

    def test_quarantine_in_dry_run_is_not_applied(self) -> None:
        self.rec.spam = CheckResult(Check.SPAM, "quarantined, action: reject", edits=(Quarantine(reason="spam"),),
                                    details={"spam_action": "reject"})
        _, verdict = self.run_message(make_config(spamd=SpamdConfig(servers=SPAMD, dry_run=True)))
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertFalse(any(isinstance(e, Quarantine) for e in verdict.edits))
        self.assertEqual(self.fields["spam"], "would quarantine, action: reject")

    def test_observers_see_the_would_result(self) -> None:
        seen = []
        self.rec.spam = GTUBE_REJECT
        config = make_config(spamd=SpamdConfig(servers=SPAMD, dry_run=True))
        from rmilter.deps import Deps
        from rmilter.pipeline import Pipeline
        from rmilter.runtime import Runtime
        from rmilter.spool import run_inline
        from twisted.internet.task import Clock
        from tests.pipeline_support import send_until_eom
        runtime = Runtime(Deps(config=config, clock=Clock(), run_blocking=run_inline))
        pipeline = Pipeline(lambda: runtime, self.rec.checks)
        pipeline.observers.append(lambda result, seconds: seen.append(result))
        _, _, eom = send_until_eom(self, pipeline)
        assert eom is not None
        self.assertEqual(self.successResultOf(eom).action, Action.ACCEPT)
        [spam] = [r for r in seen if r.check is Check.SPAM]
        self.assertEqual(spam.would, "reject")
