"""The metrics listener of a real ``twistd rmilter`` (issue 14), scraped by a real Prometheus.

A known batch goes through miltertest (messages accepted on one connection, then a bad
frame on another); Prometheus (Debian's ``prometheus``, a private instance scraping every
second) must then answer the expected counts through its HTTP API.  ``rmilter status``
asks the same daemon for its health.
"""
from __future__ import annotations

import io
import re
import socket
import struct
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from rmilter import cli
from tests import harness
from tests.harness import chromium
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

    def test_reloads_counted_and_generation_follows(self) -> None:
        """A good reload: generation 2 in /health and the metrics; a broken file: counted as failed."""
        milter = self.start()
        milter.reload("configuration reloaded")
        milter.write_config("metrics_socket = %s;\nmax_size = ;\n" % self.spec)
        milter.reload("reload failed")
        code, document = cli.fetch_health(self.spec)
        self.assertEqual((code, document["config_generation"]), (200, 2))
        url = "http://127.0.0.1:%d/metrics" % self.metrics_port
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        self.assertIn("rmilter_config_generation 2.0\n", text)
        self.assertIn('rmilter_config_reloads_total{result="ok"} 1.0\n', text)
        self.assertIn('rmilter_config_reloads_total{result="failed"} 1.0\n', text)

    def test_status_without_metrics_socket(self) -> None:
        err = io.StringIO()
        self.assertEqual(cli.main(["status"], io.StringIO(), err), cli.UNREACHABLE)
        self.assertIn("sets no metrics_socket", err.getvalue())


class StatusPageBrowserTests(SynchronousTestCase):
    """The status page as headless Chromium renders it (Debian's ``chromium``)."""

    def test_chart_backends_and_summaries_in_a_real_browser(self) -> None:
        metrics_port = free_port()
        # one clamd server nobody listens on: the page shows it alive until it fails maxerrors times
        dead_port = free_port()
        milter = harness.start_rmilter(self, "metrics_socket = inet:%d@127.0.0.1;\n"
                                       "clamav { servers = 127.0.0.1:%d; maxerrors = 1; "
                                       "connect_timeout = 1s; };\n" % (metrics_port, dead_port), unix=False)
        wait_until(lambda: tcp_accepts("127.0.0.1", metrics_port), 20, "metrics listener")
        result = harness.miltertest(milter.milter_inet, messages=3, queue_id="4BROWSER")
        self.assertTrue(result.passed, result.output)
        url = "http://127.0.0.1:%d/" % metrics_port
        dom = chromium.dump_dom(url)
        bars = re.findall(r'<rect class="bar" data-action="(\w+)" data-count="(\d+)"', dom)
        self.assertEqual(sum(int(n) for action, n in bars if action == "accept"), 3, dom)
        self.assertEqual(len(re.findall(r"msg done: queue_id: (?:<|&lt;)4BROWSER", dom)), 3, dom)
        self.assertRegex(dom, r'<tr class="backend dead"><td>clamd</td><td>127\.0\.0\.1:%d</td>' % dead_port)
        self.assertRegex(dom, r'<p id="health" data-code="200">ok')
        pixels = chromium.png_pixels(chromium.screenshot(url))
        # a blank (one-colour) page compresses to a handful of byte values; text and bars do not
        self.assertGreater(len(set(pixels)), 50)
