"""Service pieces that need no running reactor: pid file lock (B25), stale unix sockets (SPEC §8.1)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from rmilter.service import PidFile, StartupError, clear_stale_socket, unix_socket_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECOND_INSTANCE = """
import sys
from rmilter.service import PidFile, StartupError
try:
    PidFile(sys.argv[1]).acquire()
except StartupError as e:
    print(e)
    sys.exit(42)
"""


class PidFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.path = os.path.join(self.dir, "rmilter.pid")

    def test_written_and_locked(self) -> None:
        """The pid is written; a second holder is refused while the first holds the lock."""
        first = PidFile(self.path)
        first.acquire()
        self.addCleanup(first.release)
        # (reading the file here would drop the lock: closing any descriptor of a file releases the
        # process's fcntl locks on it, so the content is checked last)
        # fcntl locks are per process: try from a second process
        child = subprocess.run(
            [sys.executable, "-c", SECOND_INSTANCE, self.path],
            env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(child.returncode, 42, child.stdout + child.stderr)
        self.assertIn("another rmilter is running", child.stdout)
        with open(self.path) as f:
            self.assertEqual(f.read(), "%d\n" % os.getpid())

    def test_not_truncated_before_lock(self) -> None:
        """B25: a refused second instance leaves the running instance's pid file intact."""
        with open(self.path, "w") as f:
            f.write("12345\n")
        holder = PidFile(self.path)
        holder.acquire()
        holder.release()
        with open(self.path) as f:
            self.assertEqual(f.read(), "%d\n" % os.getpid())

    def test_unwritable_location(self) -> None:
        self.assertRaises(StartupError, PidFile("/nonexistent-dir/rmilter.pid").acquire)


class SocketPathTests(SynchronousTestCase):
    def test_unix_path_from_endpoint(self) -> None:
        self.assertEqual(unix_socket_path("unix:/run/rmilter/rmilter.sock:mode=660:lockfile=0"),
                         "/run/rmilter/rmilter.sock")
        self.assertEqual(unix_socket_path("unix:/tmp/a\\:b.sock"), "/tmp/a:b.sock")
        self.assertIsNone(unix_socket_path("tcp:11339"))

    def test_stale_socket_removed_regular_file_refused(self) -> None:
        d = tempfile.mkdtemp()
        sock_path = os.path.join(d, "s.sock")
        s = socket.socket(socket.AF_UNIX)
        s.bind(sock_path)
        s.close()
        clear_stale_socket(sock_path)
        self.assertFalse(os.path.exists(sock_path))
        clear_stale_socket(sock_path)  # missing is fine
        file_path = os.path.join(d, "file")
        open(file_path, "w").close()
        self.assertRaises(StartupError, clear_stale_socket, file_path)
        self.assertTrue(os.path.exists(file_path))

    def test_live_socket_refused(self) -> None:
        """Issue 18.8: a socket something accepts on is another instance's: refused, kept."""
        d = tempfile.mkdtemp()
        sock_path = os.path.join(d, "live.sock")
        live = socket.socket(socket.AF_UNIX)
        self.addCleanup(live.close)
        live.bind(sock_path)
        live.listen(1)
        with self.assertRaises(StartupError) as caught:
            clear_stale_socket(sock_path)
        self.assertIn("another process is accepting connections", str(caught.exception))
        self.assertTrue(os.path.exists(sock_path))
