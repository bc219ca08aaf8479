"""The ways users start rmilter: ``twistd -ny rmilter.tac`` with RMILTER_CONFIG, ``twistd rmilter``
with the embedded default configuration, and ``--version``."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from rmilter import __version__
from rmilter import config as rconfig
from rmilter.config.schema import DEFAULT_BIND_SOCKET
from rmilter.testing.mta import MessageSpec, MilterClient
from tests.harness.base import ManagedProcess, free_port, scratch_dir, tcp_accepts, wait_until, write_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


class DeploymentTests(TestCase):
    timeout = 60

    def start(self, args, env, port: int) -> str:  # type: ignore[no-untyped-def]
        directory = scratch_dir("deploy")
        log_path = os.path.join(directory, "twistd.log")
        process = ManagedProcess([sys.executable, "-c", TWISTD, "-n", "--pidfile=", "--logfile=" + log_path] + args,
                                 os.path.join(directory, "stdout.log"), cwd=directory, env=env)
        self.addCleanup(process.stop, 20)
        wait_until(lambda: tcp_accepts("127.0.0.1", port), 30, "rmilter on port %d" % port, process.diagnostics)
        return log_path

    @defer.inlineCallbacks
    def send(self, port: int):  # type: ignore[no-untyped-def]
        client = yield MilterClient.connect(reactor, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        result = yield client.send_message(MessageSpec(queue_id="4DEPLOY"))
        yield client.close()
        return result

    @defer.inlineCallbacks
    def test_tac_reads_rmilter_config(self):  # type: ignore[no-untyped-def]
        """``twistd -ny rmilter.tac`` runs the service configured by the file RMILTER_CONFIG names."""
        port = free_port()
        config = write_file(os.path.join(scratch_dir("tacconf"), "rmilter.conf"),
                            'bind_socket = inet:%d@127.0.0.1;\ntrace_header = "X-Tac-Trace";\n' % port)
        self.start(["-y", os.path.join(REPO, "rmilter.tac")], _env(RMILTER_CONFIG=config), port)
        result = yield self.send(port)
        self.assertEqual(result.action, "accept")
        self.assertEqual([name for name, _ in result.added_headers], ["X-Tac-Trace"])

    def test_embedded_default_listens_on_the_documented_socket(self) -> None:
        """The embedded default configuration listens on DEFAULT_BIND_SOCKET (checked without
        binding it: the port may be taken by an rmilter already running on this host)."""
        config = rconfig.default()
        self.assertEqual(config.main.bind_socket, DEFAULT_BIND_SOCKET)
        self.assertEqual(rconfig.listen_endpoint(DEFAULT_BIND_SOCKET), "tcp:11339:interface=127.0.0.1")
        self.assertEqual((config.spamd.servers, config.clamav.servers), ((), ()))
        self.assertFalse(config.redis_enabled and (config.greylisting_active or config.limits_active))
        self.assertEqual(config.warnings, ())

    @defer.inlineCallbacks
    def test_embedded_default_configuration(self):  # type: ignore[no-untyped-def]
        """``twistd rmilter`` without --config runs the embedded default and accepts mail unchanged;
        only the listener is moved to a free port, so the test runs beside a live rmilter."""
        port = free_port()
        log_path = self.start(["rmilter", "--listen", "inet:%d@127.0.0.1" % port], _env(), port)
        result = yield self.send(port)
        self.assertEqual(result.action, "accept")
        self.assertEqual(result.added_headers, [])
        with open(log_path, encoding="utf-8") as f:
            self.assertIn("msg done: queue_id: <4DEPLOY>", f.read())

    def test_python_floor(self) -> None:
        """setup.py claims Python 3.11 (Debian 12) and later, and the suite runs on such a Python;
        CI runs it on 3.11 itself, the oldest version claimed."""
        with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
            claimed = re.search(r'python_requires=">=(\d+)\.(\d+)"', f.read())
        assert claimed is not None
        floor = (int(claimed.group(1)), int(claimed.group(2)))
        self.assertEqual(floor, (3, 11))
        self.assertGreaterEqual(sys.version_info[:2], floor)

    def test_version(self) -> None:
        out = subprocess.run([sys.executable, "-c", TWISTD, "rmilter", "--version"], env=_env(),
                             capture_output=True, text=True, timeout=60, cwd=scratch_dir("version"))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "Rapid Milter Version %s" % __version__)
