"""Verdict precedence (SPEC §5.9) and reply sanitising (SPEC §3.7, B34)."""
from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from rmilter.verdict import (
    Action,
    AddHeader,
    Check,
    CheckResult,
    SmtpReply,
    decide,
    header_value_safe,
    reject,
    reply_line,
    sanitise_reply_text,
    tempfail,
)


class DecideTests(SynchronousTestCase):
    def test_no_demands_accepts_with_all_edits_in_order(self) -> None:
        results = [
            CheckResult(Check.SPAM, "no spam", edits=(AddHeader(name="X-Spamd-Result", value="r"),)),
            CheckResult(Check.VIRUS, "clean"),
            CheckResult(Check.DKIM, "signed", edits=(AddHeader(name="DKIM-Signature", value="s"),)),
        ]
        verdict = decide(results)
        self.assertEqual(verdict.action, Action.ACCEPT)
        self.assertEqual([e.name for e in verdict.edits], ["X-Spamd-Result", "DKIM-Signature"])  # type: ignore[union-attr]

    def test_spam_failure_beats_greylist_beats_spam_beats_virus(self) -> None:
        """SPEC §5.9 order: scan failure tempfail (4a), greylist (4b), spam action (4c), virus (8)."""
        virus = CheckResult(Check.VIRUS, "rejected, virus found", verdict=reject("Infected: X"))
        spam = CheckResult(Check.SPAM, "rejected, action: reject", verdict=reject("spam"))
        grey = CheckResult(Check.GREYLIST, "note", verdict=tempfail("Try again later"))
        failure = CheckResult(Check.SPAM, "delayed, temporary fail", verdict=tempfail("Temporary service failure."),
                              failed=True)
        self.assertEqual(decide([virus, spam]).reply.text, "spam")  # type: ignore[union-attr]
        self.assertEqual(decide([virus, spam, grey]).reply.text, "Try again later")  # type: ignore[union-attr]
        self.assertEqual(decide([virus, grey, failure]).reply.text, "Temporary service failure.")  # type: ignore[union-attr]
        self.assertEqual(decide([CheckResult(Check.DKIM, "signed"), virus]).action, Action.REJECT)

    def test_demanded_verdict_drops_edits(self) -> None:
        verdict = decide([CheckResult(Check.SPAM, "x", verdict=reject("no"), edits=(AddHeader(name="A", value="b"),))])
        self.assertEqual(verdict.edits, ())


class ReplyTextTests(SynchronousTestCase):
    def test_crlf_replaced_and_percent_doubled(self) -> None:
        self.assertEqual(sanitise_reply_text("bad\r\nRCPT TO:<x> 100%"), "bad  RCPT TO:<x> 100%%")

    def test_long_text_cut_to_980_bytes(self) -> None:
        text = sanitise_reply_text("é" * 1000)
        assert text is not None
        self.assertLessEqual(len(text.encode()), 980)
        text.encode("utf-8")  # still valid UTF-8

    def test_empty_text_unusable(self) -> None:
        self.assertIsNone(sanitise_reply_text(" \r\n "))

    def test_reply_line_requires_matching_class(self) -> None:
        """The first digit must agree with the action, and the enhanced code's class too (SPEC §3.7)."""
        self.assertEqual(reply_line(Action.REJECT, SmtpReply("554", "5.7.1", "Gtube")), "554 5.7.1 Gtube")
        self.assertIsNone(reply_line(Action.TEMPFAIL, SmtpReply("554", "5.7.1", "x")))
        self.assertIsNone(reply_line(Action.REJECT, SmtpReply("554", "4.7.1", "x")))
        self.assertIsNone(reply_line(Action.REJECT, SmtpReply("5x4", "5.7.1", "x")))
        self.assertIsNone(reply_line(Action.REJECT, SmtpReply("554", "5.7.1", "\r\n")))
        self.assertIsNone(reply_line(Action.ACCEPT, SmtpReply("250", "2.0.0", "ok")))

    def test_header_value_cannot_inject_headers(self) -> None:
        """Bare line breaks become folding; CR is dropped (SPEC §6.8.5)."""
        self.assertEqual(header_value_safe("a\r\nX-Evil: 1"), "a\n X-Evil: 1")
        self.assertEqual(header_value_safe("a\n\tb"), "a\n\tb")
        self.assertEqual(header_value_safe("a\n\nb"), "a\n b")
