"""The real-service fixtures start and answer (tests/harness): quick checks of each one."""
from __future__ import annotations

import os
import signal

from twisted.trial.unittest import SynchronousTestCase

from tests import harness
from tests.dates import message_date


class RedisFixtureTests(SynchronousTestCase):
    def test_ping_set_get(self) -> None:
        """A started Redis answers PING and keeps a value; the port is the fixture's."""
        redis = harness.start_redis(self)
        self.assertTrue(redis.ping())
        redis.command("SET", "harness:key", "value")
        self.assertEqual(redis.get("harness:key"), b"value")
        self.assertEqual(redis.address, "127.0.0.1:%d" % redis.port)

    def test_stop_and_start_on_same_port(self) -> None:
        """stop() makes the port refuse connections; start() serves again on it, empty."""
        redis = harness.start_redis(self)
        redis.command("SET", "k", "v")
        port = redis.port
        redis.stop()
        self.assertRaises(OSError, redis.command, "PING")
        redis.start()
        self.assertEqual(redis.port, port)
        self.assertTrue(redis.ping())
        self.assertIsNone(redis.get("k"))

    def test_publish_reaches_subscription(self) -> None:
        """A Subscription sees what is published on its channel, byte for byte."""
        redis = harness.start_redis(self)
        sub = redis.subscribe("copies")
        self.addCleanup(sub.close)
        self.assertEqual(redis.command("PUBLISH", "copies", b"Subject: x\r\n\r\nbody"), 1)
        self.assertEqual(sub.wait_messages(1, timeout=5), [b"Subject: x\r\n\r\nbody"])

    def test_error_reply_raises(self) -> None:
        """An error reply from Redis raises RedisError with its text."""
        redis = harness.start_redis(self)
        e = self.assertRaises(harness.RedisError, redis.command, "NOSUCHCOMMAND")
        self.assertIn("unknown command", str(e))


class RmilterFixtureTests(SynchronousTestCase):
    def test_start_listen_and_stop(self) -> None:
        """twistd rmilter starts with a config text, accepts on inet and unix, stops on TERM.

        twistd shuts down cleanly on SIGTERM, then re-raises the signal: status -SIGTERM."""
        milter = harness.start_rmilter(self, "# nothing configured\n")
        self.assertTrue(harness.base.tcp_accepts("127.0.0.1", milter.inet_port))
        self.assertTrue(harness.base.unix_accepts(milter.socket_path or ""))
        self.assertEqual(milter.milter_inet, "inet:%d@127.0.0.1" % milter.inet_port)
        self.assertEqual(milter.stop(), -signal.SIGTERM)
        self.assertIn("Server Shut Down.", milter.log_text())
        self.assertFalse(milter.running())

    def test_bad_config_fails_with_log(self) -> None:
        """A config that does not parse makes start() fail the test, showing why."""
        milter = harness.Rmilter("this is { not a config\n")
        self.addCleanup(milter.stop)
        e = self.assertRaises(harness.ServiceUnavailable, milter.start, 20)
        self.assertIn("exited", str(e))

    def test_reload_on_hup(self) -> None:
        """SIGHUP re-reads the config file and the log says so; the process keeps serving."""
        milter = harness.start_rmilter(self, "")
        milter.write_config("max_size = 10M;\n")
        milter.reload(wait_for="configuration reloaded")
        self.assertTrue(milter.running())
        self.assertTrue(harness.base.unix_accepts(milter.socket_path or ""))


class ScratchTests(SynchronousTestCase):
    def test_scratch_paths_short(self) -> None:
        """Scratch directories are short enough for unix sockets (sun_path is 108 bytes)."""
        path = harness.scratch_dir("sock")
        self.assertTrue(os.path.isdir(path))
        self.assertLess(len(os.path.join(path, "service.sock")), 80)

    def test_missing_program_fails(self) -> None:
        """A missing program is a failure (ServiceUnavailable is an AssertionError), never a skip."""
        e = self.assertRaises(
            harness.ServiceUnavailable, harness.base.find_program, "no-such-program-rmt"
        )
        self.assertIsInstance(e, AssertionError)
        self.assertIn("install-deps.sh", str(e))



class ClamdFixtureTests(SynchronousTestCase):
    def test_ping_and_eicar(self) -> None:
        """clamd answers PING; EICAR in a mail body is FOUND on TCP, a clean body is OK."""
        clamd = harness.start_clamd(self)
        self.assertTrue(clamd.ping())
        self.assertEqual(
            clamd.scan(b"Subject: hi\r\n\r\n" + harness.EICAR + b"\r\n"),
            "stream: %s FOUND" % harness.EICAR_NAME,
        )
        self.assertEqual(clamd.scan(b"Subject: hi\r\n\r\nclean body\r\n"), "stream: OK")

    def test_unix_socket_and_harness_string(self) -> None:
        """The unix socket scans too, and the harness string has its own signature name."""
        clamd = harness.start_clamd(self)
        self.assertEqual(
            clamd.scan(b"x\r\n" + harness.HARNESS_VIRUS_STRING + b"\r\n", unix=True),
            "stream: %s FOUND" % harness.HARNESS_VIRUS_NAME,
        )

    def test_stream_max_length(self) -> None:
        """Uploads above StreamMaxLength get clamd's size-limit error."""
        clamd = harness.start_clamd(self, stream_max_length="100K")
        self.assertEqual(clamd.scan(b"\0" * 200000), "INSTREAM size limit exceeded. ERROR")
        self.assertEqual(clamd.scan(b"a" * 50000), "stream: OK")


HAM = (
    b"From: Alice <alice@example.com>\r\nTo: Bob <bob@example.org>\r\nSubject: Lunch\r\n"
    b"Date: %s\r\nMessage-ID: <ham-1@example.com>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    b"Hi Bob, lunch tomorrow?\r\n"
) % (message_date().encode("ascii"),)

SCAN_HEADERS = {
    "IP": "198.51.100.7",
    "Hostname": "mail.example.net",
    "Helo": "mail.example.net",
    "From": "alice@example.com",
    "Rcpt": "bob@example.org",
}


class RspamdFixtureTests(SynchronousTestCase):
    def test_ping_ham_and_gtube(self) -> None:
        """Rspamd answers /ping; ham gets no action, GTUBE is rejected with its message."""
        rspamd = harness.shared_rspamd()
        self.assertTrue(rspamd.ping())
        ham = rspamd.checkv2(HAM, SCAN_HEADERS)
        self.assertEqual(ham["action"], "no action")
        gtube = rspamd.checkv2(HAM + harness.GTUBE + b"\r\n", SCAN_HEADERS)
        self.assertEqual(gtube["action"], "reject")
        self.assertEqual(gtube["messages"].get("smtp_message"), "Gtube pattern")

    def test_harness_hooks(self) -> None:
        """The harness Lua hooks force an action or a score from a body line."""
        rspamd = harness.shared_rspamd()
        soft = rspamd.checkv2(HAM + b"RSPAMD-TEST-ACTION: soft reject\r\n", SCAN_HEADERS)
        self.assertEqual(soft["action"], "soft reject")
        scored = rspamd.checkv2(HAM + b"RSPAMD-TEST-SCORE: 6.5\r\n", SCAN_HEADERS)
        self.assertEqual(scored["action"], "add header")
        self.assertAlmostEqual(scored["score"], 6.5, places=2)

    def test_dkim_signing_for_authenticated(self) -> None:
        """Authenticated mail from example.com comes back with a DKIM signature by key 'test'."""
        rspamd = harness.shared_rspamd()
        signed = rspamd.checkv2(HAM, dict(SCAN_HEADERS, User="alice"))
        signature = signed["milter"]["add_headers"]["DKIM-Signature"]["value"]
        self.assertIn("d=example.com", signature)
        self.assertIn("s=test", signature)
        self.assertTrue(rspamd.dkim_txt_record.startswith("v=DKIM1"))


class PostfixFixtureTests(SynchronousTestCase):
    def test_milter_spec_syntax(self) -> None:
        """sendmail's inet:PORT@HOST is rewritten into Postfix's inet:HOST:PORT."""
        self.assertEqual(
            harness.postfix.postfix_milter_spec("inet:1234@127.0.0.1, unix:/tmp/x.sock"),
            "inet:127.0.0.1:1234, unix:/tmp/x.sock",
        )

    def test_relay_plain_message_to_sink(self) -> None:
        """Postfix with no milter relays a message to smtp-sink; the dump has no pseudo headers."""
        postfix = harness.start_postfix(self)
        result = postfix.swaks(HAM)
        self.assertEqual(result.status, 0, result.transcript)
        self.assertIsNotNone(result.queue_id)
        [delivered] = postfix.wait_delivered(1)
        self.assertEqual(delivered.header("Subject"), "Lunch")
        self.assertEqual(delivered.envelope["X-Mail-Args"], ("<alice@example.com>",))
        self.assertFalse(delivered.raw.startswith(b"X-"))
        self.assertIn(b"Hi Bob, lunch tomorrow?", delivered.body)

    def test_sasl_auth_and_relay_denied(self) -> None:
        """alice/secret authenticates; a wrong password is refused with 535."""
        postfix = harness.start_postfix(self)
        good = postfix.swaks(HAM, auth_user="alice")
        self.assertEqual(good.status, 0, good.transcript)
        self.assertIn("235 2.7.0 Authentication successful", good.transcript)
        bad = postfix.swaks(HAM, auth_user="alice", auth_password="wrong")
        self.assertNotEqual(bad.status, 0)
        self.assertTrue(any(r.startswith("535") for r in bad.server_replies), bad.transcript)

    def test_unreachable_milter_tempfails(self) -> None:
        """With smtpd_milters pointing nowhere and default tempfail, Postfix answers 451."""
        postfix = harness.start_postfix(self)
        postfix.set_milters("inet:127.0.0.1:%d" % harness.free_port(), default_action="tempfail")
        result = postfix.swaks(HAM)
        self.assertNotEqual(result.status, 0)
        self.assertIn("451 4.7.1 Service unavailable - try again later", result.server_replies)

    def test_rspamd_proxy_milter_behind_postfix(self) -> None:
        """Through Rspamd's own milter proxy, GTUBE is rejected at end of DATA (reference peer)."""
        rspamd = harness.shared_rspamd()
        postfix = harness.start_postfix(self, milters=rspamd.proxy_milter)
        result = postfix.swaks(HAM + harness.GTUBE + b"\r\n")
        self.assertIn("554 5.7.1 Gtube pattern", result.server_replies, result.transcript)


class MiltertestFixtureTests(SynchronousTestCase):
    """The general miltertest script, checked against Rspamd's milter proxy (a reference peer)."""

    def test_header_added_and_printed(self) -> None:
        """An accepted message: EOM reply 'a' and the added header's value are reported."""
        rspamd = harness.shared_rspamd()
        result = harness.miltertest(rspamd.proxy_milter, hdr="X-Rspamd-Queue-Id", queue_id="4QID1")
        self.assertTrue(result.passed, result.output)
        self.assertEqual(result.eom_replies, ["a"])
        self.assertEqual(result.headers("X-Rspamd-Queue-Id"), ["4QID1"])

    def test_reply_expected(self) -> None:
        """expect=reply passes only with the exact code, enhanced code and text."""
        rspamd = harness.shared_rspamd()
        gtube = harness.GTUBE.decode()
        good = harness.miltertest(rspamd.proxy_milter, body=gtube, expect="reply",
                                  code="554", esc="5.7.1", text="Gtube pattern")
        self.assertTrue(good.passed, good.output)
        wrong = harness.miltertest(rspamd.proxy_milter, body=gtube, expect="reply",
                                   code="554", esc="5.7.1", text="something else")
        self.assertFalse(wrong.passed)
        self.assertEqual(wrong.status, 1)
        self.assertIn("FAIL: ", wrong.output)

    def test_several_messages_with_abort(self) -> None:
        """messages=3 with abort_first: the first is aborted, the next two complete."""
        rspamd = harness.shared_rspamd()
        result = harness.miltertest(rspamd.proxy_milter, messages=3, abort_first=1,
                                    hdr="X-Rspamd-Queue-Id", queue_id="4QID")
        self.assertTrue(result.passed, result.output)
        self.assertIn("MSG 1 ABORTED", result.output)
        self.assertEqual(result.headers("X-Rspamd-Queue-Id"), ["4QID2", "4QID3"])

    def test_unreachable_socket_fails(self) -> None:
        """Nothing listening: the script fails saying why instead of printing nothing."""
        result = harness.miltertest("inet:%d@127.0.0.1" % harness.free_port(), connect_tries=2)
        self.assertFalse(result.passed)
        self.assertIn("Connection refused", result.output)
