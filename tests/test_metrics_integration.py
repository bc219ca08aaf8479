"""The metrics listener of a real ``twistd rmilter`` (issue 14), scraped by a real Prometheus.

A known batch goes through miltertest (messages accepted on one connection, then a bad
frame on another); Prometheus (Debian's ``prometheus``, a private instance scraping every
second) must then answer the expected counts through its HTTP API.  ``rmilter status``
asks the same daemon for its health.
"""
from __future__ import annotations

import io
import socket
import struct
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from rmilter import cli
from tests import harness
from tests.harness.base import free_port, tcp_accepts, wait_until


class PrometheusScrapeTests(SynchronousTestCase):
    def start(self) -> harness.Rmilter:
        self.metrics_port = free_port()
        self.spec = "inet:%d@127.0.0.1" % self.metrics_port
        milter = harness.start_rmilter(self, "metrics_socket = %s;\n" % self.spec, unix=False)
        wait_until(lambda: tcp_accepts("127.0.0.1", self.metrics_port), 20, "metrics listener",
                   lambda: harness.base.tail(milter.log_path))
        return milter

    def test_counts_after_a_batch_through_miltertest(self) -> None:
        milter = self.start()
        prometheus = harness.start_prometheus(self, "127.0.0.1:%d" % self.metrics_port)
        result = harness.miltertest(milter.milter_inet, messages=4)
        self.assertTrue(result.passed, result.output if hasattr(result, "output") else result)
        # a zero-length frame: the connection is closed and counted (SPEC §3.8)
        with socket.create_connection(("127.0.0.1", milter.inet_port), timeout=5) as sock:
            sock.sendall(struct.pack(">I", 0))
            self.assertEqual(sock.recv(10), b"")
        prometheus.wait_for('sum(rmilter_messages_total{action="accept"})', 4)
        prometheus.wait_for("sum(rmilter_messages_total)", 4)  # nothing but accepts
        prometheus.wait_for('rmilter_protocol_errors_total{kind="frame"}', 1)
        prometheus.wait_for("rmilter_config_generation", 1)
        self.assertEqual(prometheus.scalar('up{job="rmilter"}'), 1)
        self.assertGreater(prometheus.scalar("process_resident_memory_bytes") or 0, 0)

    def test_health_and_rmilter_status(self) -> None:
        milter = self.start()
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % self.metrics_port, timeout=5) as reply:
            self.assertEqual(reply.status, 200)
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(cli.main(["status", "--config", milter.config_path], out, err), cli.OK, err.getvalue())
        text = out.getvalue()
        self.assertIn("status: ok\n", text)
        self.assertIn("config_generation: 1\n", text)
        self.assertIn("listener: tcp:%d:interface=127.0.0.1\n" % milter.inet_port, text)
        out = io.StringIO()
        self.assertEqual(cli.main(["status", "--socket", self.spec], out, err), cli.OK)
        milter.stop()
        err = io.StringIO()
        self.assertEqual(cli.main(["status", "--socket", self.spec], io.StringIO(), err), cli.UNREACHABLE)
        self.assertIn("cannot ask %s" % self.spec, err.getvalue())

    def test_status_without_metrics_socket(self) -> None:
        err = io.StringIO()
        self.assertEqual(cli.main(["status"], io.StringIO(), err), cli.UNREACHABLE)
        self.assertIn("sets no metrics_socket", err.getvalue())
