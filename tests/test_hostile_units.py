"""Issue 18, unit level: per-command idle timeout (Clock), warning budget, header bound, reply
parsing never raising, encodable one-line texts, header edits capped, backlog, reload thread."""
from __future__ import annotations

import json
import struct
import threading
from typing import List

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from rmilter import log as rlog
from rmilter.backends.clamd import _verdict
from rmilter.backends.rspamd.reply import MAX_HEADER_EDITS, BadReply, parse_scan_reply
from rmilter.backends.upstream import AttemptFailed
from rmilter.milter import budget
from rmilter.milter import protocol as protocol_module
from rmilter.verdict import Action, SmtpReply, header_value_safe, reply_line, sanitise_reply_text
from rmilter.service import with_backlog
from tests.test_milter_protocol import ENVELOPE, POSTFIX, Harness


class SlowlorisTests(SynchronousTestCase):
    def test_a_frame_trickled_byte_by_byte_is_closed_after_idle_timeout(self) -> None:
        events: List[dict] = []
        self.patch(protocol_module, "log", Logger(namespace="rmilter.milter", observer=events.append))
        h = Harness(idle_timeout=60.0)
        h.send(POSTFIX)
        frame = struct.pack(">I", 1000) + b"H" + b"x" * 999
        for i in range(59):
            h.protocol.dataReceived(frame[i:i + 1])
            h.clock.advance(1)
        self.assertFalse(h.transport.disconnecting)
        h.protocol.dataReceived(frame[59:60])
        h.clock.advance(1)
        self.assertTrue(h.transport.disconnecting)
        self.assertIn("begun but not completed", events[-1]["log_format"])

    def test_complete_commands_keep_the_connection(self) -> None:
        h = Harness(idle_timeout=60.0)
        h.send(POSTFIX)
        for command in ENVELOPE[:4]:
            h.clock.advance(50)
            h.send(command)
        self.assertFalse(h.transport.disconnecting)


class WarningBudgetTests(SynchronousTestCase):
    def test_ten_lines_then_a_count(self) -> None:
        events: List[dict] = []
        self.patch(budget, "log", Logger(namespace="rmilter.milter", observer=events.append))
        b = budget.WarningBudget("peer")
        for i in range(1000):
            b.warn("w {i}", i=i)
        b.close()
        self.assertEqual(len(events), budget.WARNINGS_PER_CONNECTION + 2)
        self.assertEqual(events[-1]["count"], 1000 - budget.WARNINGS_PER_CONNECTION)


class HeaderBoundTests(SynchronousTestCase):
    def test_headers_beyond_the_bound_refused(self) -> None:
        from rmilter.pipeline import header_limit
        from rmilter.config.schema import GlobalConfig
        self.assertEqual(header_limit(GlobalConfig()), 2 * 1024 * 1024)
        self.assertEqual(header_limit(GlobalConfig(spool_memory_limit=8 << 20)), 8 << 20)


class RspamdReplyTests(SynchronousTestCase):
    def test_nesting_is_a_bad_reply(self) -> None:
        for body in (b"[" * 100000, b'{"a":' * 100000, b"[" * 100000 + b"]" * 100000):
            with self.assertRaises(BadReply):
                parse_scan_reply(body)

    @given(st.binary(max_size=300))
    @settings(max_examples=500)
    def test_any_bytes_are_a_reply_or_bad_reply(self, body: bytes) -> None:
        try:
            parse_scan_reply(body)
        except BadReply:
            pass

    def test_edits_capped_per_kind(self) -> None:
        doc = {"action": "no action", "score": 0, "milter": {
            "add_headers": {"X-%d" % i: "v" for i in range(20000)},
            "remove_headers": {"Y-%d" % i: 1 for i in range(150)},
            "add_rcpt": ["r%d@x" % i for i in range(101)]}}
        reply = parse_scan_reply(json.dumps(doc).encode())
        self.assertEqual(MAX_HEADER_EDITS, 100)
        self.assertEqual((len(reply.add_headers), len(reply.remove_headers), len(reply.add_rcpt)), (100, 100, 100))
        self.assertEqual(reply.dropped_edits, "50 remove_headers, 19900 add_headers, 1 add_rcpt")


class ClamdReplyTests(SynchronousTestCase):
    @given(st.binary(max_size=200))
    @settings(max_examples=300)
    def test_any_bytes_are_a_verdict_or_a_failed_attempt(self, raw: bytes) -> None:
        try:
            _verdict(raw)
        except AttemptFailed:
            pass


texts = st.text(st.characters(), max_size=60)


class TextSafetyTests(SynchronousTestCase):
    @given(texts)
    @settings(max_examples=1000)
    def test_reply_lines_encodable_and_one_line(self, text: str) -> None:
        line = reply_line(Action.REJECT, SmtpReply("554", "5.7.1", text))
        if line is not None:
            line.encode("utf-8")
            self.assertNotRegex(line, r"[\r\n\x00\u2028\u2029]")
        safe = sanitise_reply_text(text)
        if safe is not None:
            safe.encode("utf-8")

    @given(texts)
    @settings(max_examples=1000)
    def test_header_values_encodable_no_blank_lines(self, text: str) -> None:
        value = header_value_safe(text)
        value.encode("utf-8")
        self.assertNotIn("\r", value)
        for line in value.split("\n")[1:]:
            self.assertTrue(line[:1] in (" ", "\t") and line.strip(), repr(value))

    @given(texts)
    @settings(max_examples=1000)
    def test_log_fields_one_line_and_encodable(self, text: str) -> None:
        events: List[dict] = []
        rlog.Logger(namespace="t", observer=events.append).info("{x}", x=text)
        field = events[0]["x"]
        field.encode("utf-8")
        self.assertNotRegex(field, r"[\r\n\u2028\u2029\x85]")

    def test_surrogate_reject_keeps_its_code(self) -> None:
        self.assertEqual(reply_line(Action.REJECT, SmtpReply("554", "5.7.1", "bad \ud800")), "554 5.7.1 bad \ufffd")


class BacklogTests(SynchronousTestCase):
    def test_with_backlog(self) -> None:
        self.assertEqual(with_backlog("tcp:11339:interface=127.0.0.1", 1024), "tcp:11339:interface=127.0.0.1:backlog=1024")
        self.assertEqual(with_backlog("unix:/run/r.sock:mode=660", 7), "unix:/run/r.sock:mode=660:backlog=7")
        self.assertEqual(with_backlog("tcp:1:backlog=5", 1024), "tcp:1:backlog=5")
        self.assertEqual(with_backlog("adopted-fd:3", 1024), "adopted-fd:3")


class ReloadThreadTests(SynchronousTestCase):
    def test_reload_thread_is_a_daemon_and_the_result_comes_back_on_the_reactor(self) -> None:
        from rmilter.service import run_in_daemon_thread

        class Reactor(Clock):
            def callFromThread(self, f, *a):  # type: ignore[no-untyped-def]
                self.callLater(0, f, *a)

        reactor = Reactor()
        release = threading.Event()
        seen: List[threading.Thread] = []

        def slow() -> str:
            seen.append(threading.current_thread())
            release.wait(10)
            return "done"

        d = run_in_daemon_thread(reactor, slow)
        while not seen:
            threading.Event().wait(0.01)
        self.assertTrue(seen[0].daemon)
        self.assertNoResult(d)
        release.set()
        seen[0].join(10)
        reactor.advance(0)
        self.assertEqual(self.successResultOf(d), "done")
