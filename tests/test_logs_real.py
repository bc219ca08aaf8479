"""Logs as a mail administrator reads them, from a real ``twistd rmilter`` (issue 13 item 3).

``--logger=rmilter.logs.syslog``: datagrams read from a test syslog socket carry facility mail,
the ident ``syslog_name`` with the daemon's pid, and real severities; ``--logger=rmilter.logs.json``:
JSON lines with every field of the summary event.  The summary line keeps the C format of SPEC
§8.4 byte for byte.
"""
from __future__ import annotations

import json
import os
import re
import socket
from typing import List

from twisted.trial.unittest import SynchronousTestCase

from rmilter.summary import summary_text
from tests import harness
from tests.harness.base import wait_until
from tests.harness.rmilter import Rmilter


class LoggerRmilter(Rmilter):
    """An Rmilter with twistd's ``--logger`` (a twistd option: before the ``rmilter`` word)."""

    def __init__(self, config_text: str, logger: str, env: dict) -> None:
        super().__init__(config_text, unix=False, env=env)
        self.logger = logger

    def command_line(self) -> List[str]:
        argv = super().command_line()
        at = argv.index("rmilter")
        return argv[:at] + ["--logger=" + self.logger] + argv[at:]


class SummaryFormatTests(SynchronousTestCase):
    def event(self, **changes: object) -> dict:
        event = dict(tag="4f1a9c2d0e", queue_id="4ABCDEF01", message_id="undef", ip="192.0.2.10",
                     sender="alice@example.net", rcpt="<bob@example.org>", rcpt_count=1,
                     user="unauthorized", spam="no spam", virus="clean", dkim="unsigned",
                     published=None, reply_to=None, verdict="accept", reply=None)
        event.update(changes)
        return event

    def test_spec_example_byte_for_byte(self) -> None:
        """SPEC §8.4's example, then this implementation's fields after the C ones."""
        self.assertEqual(
            summary_text(self.event()),
            "<4f1a9c2d0e>; msg done: queue_id: <4ABCDEF01>; message id: <undef>; ip: 192.0.2.10; "
            "from: <alice@example.net>; rcpt: <bob@example.org> (1 total); user: unauthorized; "
            "spam scan: no spam; virus scan: clean; dkim: unsigned; verdict: accept")

    def test_rspamd_score_and_action_at_the_end(self) -> None:
        text = summary_text(self.event(spam_score=3.5, spam_required=15.0, spam_action="no action"))
        self.assertTrue(text.endswith("; verdict: accept; rspamd score: 3.50 / 15.00; rspamd action: no action"),
                        text)


class SyslogTests(SynchronousTestCase):
    def test_datagrams_mail_facility_ident_pid_severities(self) -> None:
        path = os.path.join(harness.scratch_dir("syslog"), "log.sock")
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind(path)
        receiver.settimeout(0.2)
        # a removed directive is a warning; the memcached backend is an error (features off)
        milter = LoggerRmilter('syslog_name = "rmilter-test";\nbeanstalk { }\nmemcached { servers_grey = 127.0.0.1; }\n',
                               "rmilter.logs.syslog", {"RMILTER_SYSLOG_SOCKET": path})
        self.addCleanup(milter.stop)
        milter.start()
        lines: List[str] = []

        def received(pattern: str) -> bool:
            try:
                while True:
                    lines.append(receiver.recv(65536).decode("utf-8"))
            except socket.timeout:
                pass
            return any(re.search(pattern, line) for line in lines)

        wait_until(lambda: received(r"listening on"), 20, "the listening line", milter.diagnostics)
        head = re.compile(r"<(\d+)>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d rmilter-test\[(\d+)\]: (.*)")
        parsed = [head.match(line) for line in lines]
        self.assertTrue(all(parsed), lines)
        self.assertEqual({int(m.group(2)) for m in parsed}, {milter.process.pid})  # type: ignore[union-attr]

        def pri(text: str) -> int:
            return next(int(m.group(1)) for m in parsed if text in m.group(3))  # type: ignore[union-attr]

        self.assertEqual(pri("listening on"), 2 * 8 + 6)  # mail.info
        self.assertEqual(pri("beanstalk"), 2 * 8 + 4)  # mail.warning
        self.assertEqual(pri("memcached backend is not supported"), 2 * 8 + 3)  # mail.err


class JsonLogTests(SynchronousTestCase):
    def test_summary_event_fields(self) -> None:
        path = os.path.join(harness.scratch_dir("json"), "rmilter.json")
        milter = LoggerRmilter("", "rmilter.logs.json", {"RMILTER_JSON_LOG": path})
        self.addCleanup(milter.stop)
        milter.start()
        result = harness.miltertest(milter.milter_inet, auth="alice", queue_id="4JSON1")
        self.assertTrue(result.passed, result.output)

        def summaries() -> List[dict]:
            with open(path) as f:
                events = [json.loads(line) for line in f if line.strip()]
            return [e for e in events if e.get("summary")]

        (event,) = wait_until(summaries, 20, "a summary event in the JSON log", milter.diagnostics)
        self.assertEqual((event["queue_id"], event["user"], event["rcpt_count"], event["verdict"]),
                         ("4JSON1", "alice", 1, "accept"))
        self.assertTrue(event["summary_text"].startswith("<%s>; msg done: queue_id: <4JSON1>; message id: <undef>;"
                                                         % event["tag"]), event["summary_text"])
        self.assertEqual(event["log_level"]["name"], "info")


class TwistdSyslogPriorityTests(SynchronousTestCase):
    def test_events_carry_their_syslog_priority(self) -> None:
        """``twistd --syslog`` sends every line as LOG_INFO unless the event names its priority:
        rmilter's events do (the facility comes from openlog(syslog_name, LOG_PID, LOG_MAIL))."""
        import syslog as pysyslog

        from twisted.logger import LogLevel

        from rmilter.log import Logger

        events: List[dict] = []
        log = Logger(namespace="rmilter.test", observer=events.append)
        log.warn("w")
        log.error("e")
        log.info("i")
        log.critical("c")
        self.assertEqual([e["syslogPriority"] for e in events],
                         [pysyslog.LOG_WARNING, pysyslog.LOG_ERR, pysyslog.LOG_INFO, pysyslog.LOG_CRIT])
        self.assertEqual(events[0]["log_level"], LogLevel.warn)
