"""``rmilter test-message --offline``: every reply shape, the JSON document, the exit statuses (issue 16).

The command runs the real pipeline against the in-package fakes; these tests call ``rmilter.cli.main``
as the console script does and read its output.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Dict, List, Tuple

from twisted.trial.unittest import SynchronousTestCase

from rmilter import cli, testmessage
from rmilter.testing.fake_rspamd import checkv2_reply

MESSAGE = (b"From: Alice <alice@example.net>\r\nTo: bob@example.org\r\nSubject: hello\r\n"
           b"Message-ID: <t1@example.net>\r\nX-Old: stale\r\n\r\nHello Bob.\r\n")
BACKENDS = """\
spamd { servers = r:127.0.0.1:11333; }
clamav { servers = 127.0.0.1:3310; }
redis { servers_grey = 127.0.0.1:6379; servers_limits = 127.0.0.1:6379; }
limits { limit_to = 1:0.0001; }
"""

#: the keys (and their types) every --json document has
SCHEMA = {
    "version": int, "action": str, "stage": str, "milter_reply": str, "smtp_reply": (dict, type(None)),
    "headers": dict, "recipients": dict, "sender": (str, type(None)), "body_replaced": bool,
    "quarantine": (str, type(None)), "dkim_signatures": list, "checks": list, "summary": str,
    "redis_writes_held_back": list, "exit_status": int,
}
CHECK_SCHEMA = {"check": str, "result": str, "failed": bool, "skipped": bool, "would": (str, type(None)),
                "would_reply": (str, type(None)),
                "demanded": (str, type(None)), "time": float, "details": dict}


class TestMessageTestCase(SynchronousTestCase):
    def write(self, name: str, data: Any) -> str:
        path = os.path.join(self.dir, name)
        mode = "wb" if isinstance(data, bytes) else "w"
        with open(path, mode) as f:
            f.write(data)
        return path

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.message = self.write("m.eml", MESSAGE)

    def run_command(self, *args: str, config: str = BACKENDS, reply: Any = None) -> Tuple[int, str, str]:
        argv = ["test-message", "--config", self.write("rmilter.conf", config), "--offline"]
        if reply is not None:
            argv += ["--rspamd-reply", self.write("reply.json", json.dumps(reply))]
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(argv + list(args) + [self.message], out, err)
        return status, out.getvalue(), err.getvalue()

    def run_json(self, *args: str, **kw: Any) -> Tuple[int, Dict[str, Any]]:
        status, out, err = self.run_command("--json", *args, **kw)
        self.assertEqual(err, "")
        doc = json.loads(out)
        self.check_schema(doc)
        self.assertEqual(doc["exit_status"], status)
        return status, doc

    def check_schema(self, doc: Dict[str, Any]) -> None:
        self.assertEqual(set(doc), set(SCHEMA))
        for key, kind in SCHEMA.items():
            self.assertIsInstance(doc[key], kind, key)
        self.assertEqual(set(doc["headers"]), {"added", "inserted", "changed", "removed"})
        self.assertEqual(set(doc["recipients"]), {"added", "removed", "refused"})
        self.assertTrue(doc["checks"])
        for entry in doc["checks"]:
            self.assertEqual(set(entry), set(CHECK_SCHEMA))
            for key, kind in CHECK_SCHEMA.items():
                self.assertIsInstance(entry[key], kind, key)

    @staticmethod
    def check_of(doc: Dict[str, Any], name: str) -> List[Dict[str, Any]]:
        return [c for c in doc["checks"] if c["check"] == name]


class ReplyShapeTests(TestMessageTestCase):
    def test_no_action_accepts_and_exits_0(self) -> None:
        status, doc = self.run_json()
        self.assertEqual((status, doc["action"], doc["milter_reply"], doc["stage"]),
                         (testmessage.ACCEPT_STATUS, "accept", "SMFIR_ACCEPT", "eom"))
        self.assertIsNone(doc["smtp_reply"])
        self.assertEqual(self.check_of(doc, "virus")[0]["result"], "clean")
        self.assertIn("; spam scan: no spam; virus scan: clean;", doc["summary"])

    def test_reject_is_554_and_exits_3(self) -> None:
        status, doc = self.run_json(reply=checkv2_reply(action="reject", score=1000, smtp_message="Gtube pattern"))
        self.assertEqual(status, testmessage.REJECT_STATUS)
        self.assertEqual(doc["milter_reply"], "SMFIR_REPLYCODE")
        self.assertEqual(doc["smtp_reply"]["line"], "554 5.7.1 Gtube pattern")
        self.assertEqual(self.check_of(doc, "spam")[0]["demanded"], "reject")

    def test_soft_reject_tempfails_and_exits_4(self) -> None:
        status, doc = self.run_json(reply=checkv2_reply(action="soft reject", score=9))
        self.assertEqual((status, doc["action"]), (testmessage.TEMPFAIL_STATUS, "tempfail"))
        self.assertEqual(doc["smtp_reply"]["code"], "451")

    def test_discard_exits_5(self) -> None:
        status, doc = self.run_json(reply=checkv2_reply(action="reject", score=30, milter={"reject": "discard"}))
        self.assertEqual((status, doc["milter_reply"]), (testmessage.DISCARD_STATUS, "SMFIR_DISCARD"))

    def test_add_header_and_rewrite_subject_show_the_header_edits(self) -> None:
        no_greylisting = BACKENDS + "greylisting { enable = no; }\n"
        _, doc = self.run_json(config=no_greylisting, reply=checkv2_reply(action="add header", score=7))
        self.assertIn({"name": "X-Spam", "index": 1, "value": "yes"}, doc["headers"]["changed"])
        _, doc = self.run_json(config=no_greylisting, reply=checkv2_reply(action="rewrite subject", score=7))
        self.assertIn({"name": "Subject", "index": 1, "value": "***SPAM*** hello"}, doc["headers"]["changed"])

    def test_rspamd_header_removal_and_recipient_changes_are_listed(self) -> None:
        reply = checkv2_reply(milter={"remove_headers": {"X-Old": 1}, "add_rcpt": ["<archive@example.org>"]})
        _, doc = self.run_json(reply=reply)
        self.assertIn({"name": "X-Old", "index": 1}, doc["headers"]["removed"])
        self.assertEqual(doc["recipients"]["added"], ["<archive@example.org>"])

    def test_a_dkim_signature_from_rspamd_is_shown(self) -> None:
        _, doc = self.run_json(reply=checkv2_reply(dkim_signature="v=1; a=rsa-sha256; d=example.net; b=abc"))
        self.assertEqual(doc["dkim_signatures"], ["v=1; a=rsa-sha256; d=example.net; b=abc"])

    def test_greylist_action_defers_a_first_triplet(self) -> None:
        status, doc = self.run_json(reply=checkv2_reply(action="greylist", score=5))
        self.assertEqual((status, doc["action"]), (testmessage.TEMPFAIL_STATUS, "tempfail"))
        self.assertIn("new record", self.check_of(doc, "greylist")[0]["result"])

    def test_virus_rejects(self) -> None:
        status, doc = self.run_json("--virus", "Eicar-Test-Signature")
        self.assertEqual(status, testmessage.REJECT_STATUS)
        self.assertEqual(doc["smtp_reply"]["text"], "Infected: Eicar-Test-Signature")

    def test_dry_run_accepts_and_the_summary_says_what_it_would_have_done(self) -> None:
        status, doc = self.run_json(config=BACKENDS + "spamd { dry_run = yes; }\n",
                                    reply=checkv2_reply(action="reject", score=1000, smtp_message="Gtube pattern"))
        self.assertEqual(status, testmessage.ACCEPT_STATUS)
        self.assertIn("spam scan: would reject, action: reject", doc["summary"])
        self.assertEqual(self.check_of(doc, "spam")[0]["would"], "reject")
        self.assertEqual(self.check_of(doc, "spam")[0]["would_reply"], "554 5.7.1 Gtube pattern")

    def test_greylisting_in_dry_run_accepts_a_first_triplet(self) -> None:
        status, doc = self.run_json(config=BACKENDS + "greylisting { dry_run = yes; }\n",
                                    reply=checkv2_reply(action="greylist", score=5))
        self.assertEqual(status, testmessage.ACCEPT_STATUS)
        self.assertIn("; greylist: would defer;", doc["summary"])


class CommandLineTests(TestMessageTestCase):
    def test_text_output_names_reply_checks_and_summary(self) -> None:
        status, out, _ = self.run_command(reply=checkv2_reply(action="reject", smtp_message="Gtube pattern"))
        self.assertEqual(status, 3)
        self.assertIn("milter reply: SMFIR_REPLYCODE (reject, at eom)\n", out)
        self.assertIn("smtp reply: 554 5.7.1 Gtube pattern\n", out)
        self.assertIn("check spam: rejected, action: reject (", out)
        self.assertIn("summary: ", out)

    def test_envelope_options_reach_the_pipeline(self) -> None:
        _, doc = self.run_json("--from", "carol@example.com", "--rcpt", "x@example.org", "--rcpt", "y@example.org",
                               "--ip", "198.51.100.7", "--auth", "carol", "--queue-id", "Q42")
        summary = doc["summary"]
        for part in ("queue_id: <Q42>", "ip: 198.51.100.7", "from: <carol@example.com>", "(2 total)", "user: carol"):
            self.assertIn(part, summary)

    def test_config_error_exits_1_with_file_line(self) -> None:
        status, _, err = self.run_command(config="spamd {\n dry_run = maybe;\n}\n")
        self.assertEqual(status, testmessage.ERROR_STATUS)
        self.assertIn("rmilter.conf:2:", err)

    def test_rspamd_reply_without_offline_is_a_usage_error(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["test-message", "--rspamd-reply", "x.json", self.message], out, err)
        self.assertEqual(status, testmessage.USAGE_STATUS)
        self.assertIn("need --offline", err.getvalue())

    def test_an_unreadable_message_exits_1(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["test-message", "--offline", os.path.join(self.dir, "absent.eml")], out, err)
        self.assertEqual(status, testmessage.ERROR_STATUS)
        self.assertIn("absent.eml", err.getvalue())

    def test_headers_are_split_and_unfolded(self) -> None:
        headers, body = testmessage.split_message(b"A: 1\nB: two\n  lines\n\nbody\n")
        self.assertEqual(headers, [("A", "1"), ("B", "two\r\n  lines")])
        self.assertEqual(body, b"body\r\n")
