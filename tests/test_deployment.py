"""The ways users start rmilter: ``twistd -ny rmilter.tac`` with RMILTER_CONFIG, ``twistd rmilter``
with the embedded default configuration, and ``--version``."""
from __future__ import annotations

import os
import subprocess
import sys

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import TestCase

from rmilter import __version__
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

    @defer.inlineCallbacks
    def test_embedded_default_configuration(self):  # type: ignore[no-untyped-def]
        """``twistd rmilter`` without --config listens on the documented default socket and
        accepts mail unchanged."""
        port = int(DEFAULT_BIND_SOCKET.split(":")[1].split("@")[0])
        self.assertFalse(tcp_accepts("127.0.0.1", port), "the default port %d is already in use" % port)
        self.start(["rmilter"], _env(), port)
        result = yield self.send(port)
        self.assertEqual(result.action, "accept")
        self.assertEqual(result.added_headers, [])

    def test_version(self) -> None:
        out = subprocess.run([sys.executable, "-c", TWISTD, "rmilter", "--version"], env=_env(),
                             capture_output=True, text=True, timeout=60, cwd=scratch_dir("version"))
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "Rapid Milter Version %s" % __version__)
