"""Worker processes (``workers = N``) with real processes: supervision, reload, graceful stop."""
from __future__ import annotations

import os
import re
import signal
import subprocess
from typing import List

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rmilter.config import ConfigError, parse_text
from rmilter.testing.mta import MessageSpec, MilterClient
from rmilter.workers import worker_count
from tests import harness


def _sleep(seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def worker_pids(milter: harness.Rmilter) -> List[int]:
    assert milter.process is not None
    out = subprocess.run(["pgrep", "-P", str(milter.process.pid), "-f", "rmilter --worker"],
                         capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


class WorkersDirectiveTests(SynchronousTestCase):
    def test_count_auto_and_bounds(self) -> None:
        self.assertEqual(parse_text("workers = 3;\n").main.workers, 3)
        self.assertEqual(parse_text("workers = auto;\n").main.workers, 0)
        self.assertEqual(worker_count(0), os.cpu_count() or 1)
        self.assertEqual(parse_text("").main.workers, 1)
        for bad in ("0", "257", "many"):
            with self.assertRaises(ConfigError) as caught:
                parse_text("workers = %s;\n" % bad)
            self.assertRegex(caught.exception.errors[0], r":1: .*workers")


class SilentServer(Protocol):
    """An Rspamd that never answers: keeps a message in flight at its end of message."""


class WorkerProcessTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def send(self, endpoint, queue_id: str):  # type: ignore[no-untyped-def]
        return (yield MilterClient.send_one(reactor, endpoint, MessageSpec(queue_id=queue_id)))

    def inet(self, milter: harness.Rmilter) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(reactor, "127.0.0.1", milter.inet_port)

    @defer.inlineCallbacks
    def wait_for_workers(self, milter: harness.Rmilter, count: int, exclude=()):  # type: ignore[no-untyped-def]
        """The pids of ``count`` workers, once each has logged that it listens."""
        for _ in range(400):
            pids = worker_pids(milter)
            if len(pids) == count and not set(pids) & set(exclude):
                text = milter.log_text()
                ready = [p for p in pids if re.search(r"worker \d+ started \(pid %d\)(.|\n)*listening on adopted-fd" % p, text)]
                if len(ready) == count and len(re.findall(r"worker \d+: .*listening on adopted-fd", text)) >= count:
                    return pids
            yield _sleep(0.05)
        self.fail("expected %d workers, have %r\n%s" % (count, worker_pids(milter), milter.diagnostics()))

    @defer.inlineCallbacks
    def test_two_workers_share_both_listeners(self):  # type: ignore[no-untyped-def]
        """Both listeners (TCP and unix) are served; both workers take connections."""
        milter = harness.start_rmilter(self, 'workers = 2;\ntrace_header = "X-Trace";\n')
        pids = yield self.wait_for_workers(milter, 2)
        results = yield defer.gatherResults(
            [self.send(self.inet(milter), "4W%03d" % i) for i in range(40)]
            + [self.send(UNIXClientEndpoint(reactor, milter.socket_path), "4U%03d" % i) for i in range(10)])
        self.assertEqual({r.action for r in results}, {"accept"})
        text = milter.log_text()
        self.assertEqual(len(re.findall(r"msg done: queue_id: <4[WU]\d+>", text)), 50)
        served = set(re.findall(r"worker (\d): .*msg done", text))
        self.assertEqual(len(pids), 2)
        self.assertTrue(served <= {"1", "2"} and served, served)

    @defer.inlineCallbacks
    def test_killed_worker_is_replaced_and_messages_still_answered(self):  # type: ignore[no-untyped-def]
        """SIGKILL to one worker under load: every message is answered (by the other), the dead
        one is logged and replaced."""
        milter = harness.start_rmilter(self, "workers = 2;\n")
        pids = yield self.wait_for_workers(milter, 2)
        sending = defer.gatherResults([self.send(self.inet(milter), "4K%03d" % i) for i in range(30)])
        os.kill(pids[0], signal.SIGKILL)
        more = yield defer.gatherResults([self.send(self.inet(milter), "4L%03d" % i) for i in range(30)])
        first = yield sending.addErrback(lambda f: f)  # connections the dead worker held may break
        self.assertEqual({r.action for r in more}, {"accept"})
        new = yield self.wait_for_workers(milter, 2, exclude=[pids[0]])
        self.assertIn(pids[1], new)
        self.assertRegex(milter.log_text(), r"worker \d \(pid %d\) died .*restarting in 1 s" % pids[0])
        after = yield defer.gatherResults([self.send(self.inet(milter), "4N%03d" % i) for i in range(20)])
        self.assertEqual({r.action for r in after}, {"accept"})
        del first

    @defer.inlineCallbacks
    def test_reload_checked_once_in_main_process(self):  # type: ignore[no-untyped-def]
        """A broken file is refused by the main process and no worker reloads; a good one
        reaches every worker."""
        milter = harness.start_rmilter(self, 'workers = 2;\ntrace_header = "X-Trace-Old";\n')
        pids = yield self.wait_for_workers(milter, 2)
        milter.write_config('workers = 2;\nbogus_directive = 1;\n')
        offset = milter.log_size()
        yield threads.deferToThread(milter.reload, re.compile(r"reload failed, workers keep"))
        self.assertNotIn("reloading configuration", milter.log_text(offset))
        milter.write_config('workers = 2;\ntrace_header = "X-Trace-New";\n')
        offset = milter.log_size()
        milter.signal(signal.SIGHUP)
        for n in (1, 2):
            yield threads.deferToThread(milter.wait_for_log,
                                        r"worker %d: .*configuration reloaded" % n, 15.0, offset)
        results = yield defer.gatherResults([self.send(self.inet(milter), "4R%03d" % i) for i in range(10)])
        for result in results:
            self.assertEqual([n for n, _ in result.added_headers if n.startswith("X-Trace")], ["X-Trace-New"])
        self.assertEqual(worker_pids(milter), pids, "reload restarts no worker")

    @defer.inlineCallbacks
    def test_sigterm_drains_messages_in_flight(self):  # type: ignore[no-untyped-def]
        """SIGTERM to the main process: a message waiting for Rspamd still gets its answer, then
        every process exits and the pid file is gone."""
        port = reactor.listenTCP(0, Factory.forProtocol(SilentServer), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pidfile = os.path.join(harness.scratch_dir("workers-pid"), "rmilter.pid")
        milter = harness.start_rmilter(self, (
            'workers = 2;\npidfile = "%s";\nspamd {\n  servers = 127.0.0.1:%d;\n  results_timeout = 3s;\n'
            '  connect_timeout = 1s;\n  retry_count = 1;\n  tempfail_on_error = no;\n};\n')
            % (pidfile, port.getHost().port))
        pids = yield self.wait_for_workers(milter, 2)
        with open(pidfile) as f:
            self.assertEqual(int(f.read().strip()), milter.process.pid)
        in_flight = self.send(self.inet(milter), "4TERM1")
        yield _sleep(1.0)
        milter.signal(signal.SIGTERM)
        result = yield in_flight
        self.assertEqual(result.action, "accept")
        status = yield threads.deferToThread(milter.wait_exit, 30.0)
        self.assertIn(status, (0, -signal.SIGTERM), "twistd ends by re-raising the SIGTERM it handled")
        for pid in pids:
            self.assertFalse(os.path.exists("/proc/%d/status" % pid) and "zombie" not in open(
                "/proc/%d/status" % pid).read().lower(), "worker %d still running" % pid)
        self.assertRegex(milter.log_text(), r"worker \d: .*msg done: queue_id: <4TERM1>")

    @defer.inlineCallbacks
    def test_worker_stopping_keeps_the_shared_unix_socket(self):  # type: ignore[no-untyped-def]
        """A worker that stops gracefully leaves the unix socket file (it belongs to the main
        process): the other workers still answer on it, and the stopped one is replaced."""
        milter = harness.start_rmilter(self, "workers = 2;\n")
        pids = yield self.wait_for_workers(milter, 2)
        os.kill(pids[0], signal.SIGTERM)
        yield self.wait_for_workers(milter, 2, exclude=[pids[0]])
        self.assertTrue(os.path.exists(milter.socket_path))
        results = yield defer.gatherResults(
            [self.send(UNIXClientEndpoint(reactor, milter.socket_path), "4S%03d" % i) for i in range(10)]
            + [self.send(self.inet(milter), "4T%03d" % i) for i in range(10)])
        self.assertEqual({r.action for r in results}, {"accept"})

    @defer.inlineCallbacks
    def test_workers_stop_when_the_main_process_is_killed(self):  # type: ignore[no-untyped-def]
        """SIGKILL to the main process: its end of each worker's stdin pipe closes, and every
        worker stops (draining) instead of serving on unsupervised."""
        from tests.harness.base import tcp_accepts

        milter = harness.start_rmilter(self, "workers = 2;\nshutdown_timeout = 5s;\n")
        pids = yield self.wait_for_workers(milter, 2)
        result = yield self.send(self.inet(milter), "4D001")
        self.assertEqual(result.action, "accept")
        os.kill(milter.process.pid, signal.SIGKILL)  # type: ignore[union-attr]

        def running(pid: int) -> bool:
            try:
                with open("/proc/%d/status" % pid) as f:
                    return "zombie" not in f.read().lower()
            except OSError:
                return False

        for _ in range(200):
            if not any(running(p) for p in pids):
                break
            yield _sleep(0.05)
        self.assertEqual([p for p in pids if running(p)], [], "workers outlived the main process")
        text = milter.log_text()
        self.assertEqual(len(re.findall(r"worker \d: the main process is gone", text)), 2, text[-2000:])
        self.assertFalse(tcp_accepts("127.0.0.1", milter.inet_port), "nobody serves the listener any more")

    @defer.inlineCallbacks
    def test_metrics_summed_across_workers_and_kept_when_one_dies(self):  # type: ignore[no-untyped-def]
        """The main process serves metrics_socket: one scrape shows the sum of both workers; a
        worker SIGKILLed and replaced neither loses nor doubles what it had counted."""
        from tests.harness.base import free_port

        port = free_port()
        redis = harness.start_redis(self)
        config = ("workers = 2;\nmetrics_socket = inet:%d@127.0.0.1;\nredis { servers_limits = %s; }\n"
                  "limits { limit_to = 100000000:1; }\n" % (port, redis.address))
        milter = harness.start_rmilter(self, config)
        pids = yield self.wait_for_workers(milter, 2)
        results = []
        for batch in range(10):  # small batches: one worker's accept loop does not take all 40 at once
            results += yield defer.gatherResults([self.send(self.inet(milter), "4M%03d" % (batch * 4 + i))
                                                  for i in range(4)])
        self.assertEqual({r.action for r in results}, {"accept"})
        served = re.findall(r"worker (\d): .*msg done: queue_id: <4M\d+>", milter.log_text())
        self.assertEqual(len(served), 40)
        self.assertEqual(set(served), {"1", "2"}, "both workers took messages")
        accepted = 'rmilter_messages_total{action="accept",check="none"}'
        scrape = yield threads.deferToThread(scrape_metrics, port)
        self.assertEqual(scrape[accepted], 40)
        self.assertEqual(scrape["rmilter_messages_in_flight"], 0)
        self.assertEqual(scrape["rmilter_config_generation"], 1)
        health = yield threads.deferToThread(get_json, port, "/health")
        self.assertEqual((health["status"], health["workers"], health["workers_alive"]), ("ok", 2, 2))
        self.assertEqual(sorted(health["worker_pids"]), pids)
        # the worker that served more dies; its 20-odd messages must stay counted, once
        busiest = max(("1", "2"), key=served.count)
        victim = [p for p in pids if re.search(r"worker %s started \(pid %d\)" % (busiest, p), milter.log_text())][0]
        os.kill(victim, signal.SIGKILL)
        yield self.wait_for_workers(milter, 2, exclude=[victim])
        scrape = yield threads.deferToThread(scrape_metrics, port)
        self.assertEqual(scrape[accepted], 40)
        # a reload: counted once (the main process's), not once per worker
        up = 'rmilter_backend_up{backend="redis_limits",server="%s"}' % redis.address
        self.assertEqual(scrape[up], 1, "alive in every worker")
        milter.write_config(config + "# reloaded\n")
        offset = milter.log_size()
        yield threads.deferToThread(milter.reload, re.compile(r"reload passed to 2 workers"))
        for n in (1, 2):
            yield threads.deferToThread(milter.wait_for_log, r"worker %d: .*configuration reloaded" % n, 15.0, offset)
        more = yield defer.gatherResults([self.send(self.inet(milter), "4P%03d" % i) for i in range(10)])
        self.assertEqual({r.action for r in more}, {"accept"})
        scrape = yield threads.deferToThread(scrape_metrics, port)
        self.assertEqual(scrape[accepted], 50)
        self.assertEqual((scrape["rmilter_config_generation"], scrape['rmilter_config_reloads_total{result="ok"}']),
                         (2, 1))
        self.assertEqual(scrape[up], 1)
        health = yield threads.deferToThread(get_json, port, "/health")
        self.assertEqual((health["workers_alive"], health["worker_restarts"]), (2, 1))
        page = yield threads.deferToThread(get_text, port, "/")
        self.assertIn("2 of 2 workers alive", page)
        self.assertIn("queue_id: &lt;4P009&gt;", page)


def get_text(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=10) as reply:
        return reply.read().decode("utf-8")


def get_json(port: int, path: str) -> dict:
    import json

    return json.loads(get_text(port, path))  # type: ignore[no-any-return]


def scrape_metrics(port: int) -> dict:
    """``name{labels}`` -> value of one scrape of /metrics (labels in the exposition's order)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(get_text(port, "/metrics")):
        for sample in family.samples:
            labels = ",".join('%s="%s"' % kv for kv in sample.labels.items())
            out[sample.name + ("{%s}" % labels if labels else "")] = sample.value
    return out


class WorkerLogTests(TestCase):
    """Workers write their own lines to the main process's destination, tagged ``worker K``
    (``rmilter.worker_log``): nothing relayed, nothing overwritten."""

    timeout = 120

    @defer.inlineCallbacks
    def through_both(self, milter: harness.Rmilter, prefix: str, served):  # type: ignore[no-untyped-def]
        """Messages in small batches until both workers have taken some (``served()``: the set)."""
        for batch in range(50):
            results = yield defer.gatherResults([
                MilterClient.send_one(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", milter.inet_port),
                                      MessageSpec(queue_id="%s%03d" % (prefix, batch * 4 + i))) for i in range(4)])
            self.assertEqual({r.action for r in results}, {"accept"})
            yield _sleep(0.05)
            if len(served()) == 2:
                return
        self.fail("one worker took every message: %r" % (served(),))

    @defer.inlineCallbacks
    def test_text_log_file_lines_of_both_workers_whole_and_tagged(self):  # type: ignore[no-untyped-def]
        milter = harness.start_rmilter(self, "workers = 2;\n")
        yield WorkerProcessTests.wait_for_workers(self, milter, 2)  # type: ignore[arg-type]
        yield self.through_both(milter, "4F", lambda: set(re.findall(r"worker (\d): .*msg done", milter.log_text())))
        text = milter.log_text()
        self.assertRegex(text, r"workers log straight to text-file:%s" % re.escape(milter.log_path))
        self.assertRegex(text, r"\] worker 1: .*msg done: queue_id: <4F\d+>")
        self.assertRegex(text, r"\] worker 2: .*msg done: queue_id: <4F\d+>")
        self.assertNotRegex(text, r"\[rmilter\.workers#info\] worker \d: ", "no line went through the main process")
        stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[")
        broken = [line for line in text.splitlines() if not stamp.match(line) and not line.startswith("\t")]
        self.assertEqual(broken, [], "every line whole: the main process appends, it never overwrites")
        # the main process's own lines are there, between the workers'
        milter.write_config("workers = 2;\n")
        yield threads.deferToThread(milter.reload, re.compile(r"reload passed to 2 workers"))

    @defer.inlineCallbacks
    def test_syslog_datagrams_from_each_worker_tagged(self):  # type: ignore[no-untyped-def]
        import socket as socketlib

        from tests.test_logs_real import LoggerRmilter

        path = os.path.join(harness.scratch_dir("syslog-workers"), "log.sock")
        receiver = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind(path)
        receiver.setblocking(False)
        lines: List[str] = []

        def received() -> List[str]:
            try:
                while True:
                    lines.append(receiver.recv(65536).decode("utf-8"))
            except BlockingIOError:
                pass
            return lines

        milter = LoggerRmilter('workers = 2;\nsyslog_name = "rmilter-w";\n', "rmilter.logs.syslog",
                               {"RMILTER_SYSLOG_SOCKET": path})
        self.addCleanup(milter.stop)
        milter.start()
        head = re.compile(r"<\d+>[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d rmilter-w\[(\d+)\]: worker (\d): .*msg done")
        yield self.through_both(milter, "4Y", lambda: {m.group(2) for m in map(head.match, received()) if m})
        senders = {m.group(1): m.group(2) for m in map(head.match, lines) if m}
        self.assertEqual(set(senders.values()), {"1", "2"})
        self.assertEqual(len(senders), 2, "two worker pids, each with its own socket")
        self.assertNotIn(str(milter.process.pid), senders)  # type: ignore[union-attr]

    @defer.inlineCallbacks
    def test_json_log_events_carry_the_worker(self):  # type: ignore[no-untyped-def]
        import json

        from tests.test_logs_real import LoggerRmilter

        path = os.path.join(harness.scratch_dir("json-workers"), "rmilter.json")
        milter = LoggerRmilter("workers = 2;\n", "rmilter.logs.json", {"RMILTER_JSON_LOG": path})
        self.addCleanup(milter.stop)
        milter.start()

        def events() -> List[dict]:
            with open(path) as f:
                return [json.loads(line) for line in f if line.strip()]  # every line whole JSON

        yield self.through_both(milter, "4J", lambda: {e.get("worker") for e in events() if e.get("summary")})
        summaries = [e for e in events() if e.get("summary")]
        self.assertEqual({e["worker"] for e in summaries}, {1, 2})
        self.assertTrue(all(e["queue_id"].startswith("4J") for e in summaries))
        self.assertTrue(any("supervising {count} workers" in (e.get("log_format") or "") and "worker" not in e
                            for e in events()), "the main process's own events, untagged")


class SharedLogFileTests(SynchronousTestCase):
    """The main process's twistd ``LogFile`` and a worker's ``_Output`` on one real file."""

    def test_append_only_rotation_by_real_size_and_the_worker_follows(self) -> None:
        from twisted.python.logfile import LogFile

        from rmilter import worker_log

        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "rmilter.log")
        main = LogFile.fromFullPath(path, rotateLength=1000)
        self.addCleanup(main.close)
        self.addCleanup(setattr, worker_log, "_shared_logfile", None)
        worker_log._append_only(main)
        now = [0.0]
        worker = worker_log._Output(path=path, clock=lambda: now[0])
        main.write("main 1\n")
        worker.write(b"worker 1\n")
        main.write("main 2\n")  # twistd's offset is before "worker 1": O_APPEND keeps that line
        with open(path) as f:
            self.assertEqual(f.read(), "main 1\nworker 1\nmain 2\n")
        worker.write(b"w" * 1100 + b"\n")  # the workers' lines alone pass rotateLength
        worker_log.rotate_if_due()
        self.assertTrue(os.path.exists(path + ".1"), "rotated by the file's real size")
        worker.write(b"late line\n")  # before its next check: still the old file, whole
        now[0] += worker_log.REOPEN_CHECK
        worker.write(b"after rotation\n")
        main.write("main 3\n")
        with open(path) as f:
            self.assertEqual(f.read(), "after rotation\nmain 3\n")
        with open(path + ".1") as f:
            self.assertTrue(f.read().endswith("\nlate line\n"))
