"""Production set-up against real processes (issue 13, issue 18 items 8 and 9).

- a unix socket given to group ``postfix`` and a daemon that dropped root: a real Postfix, whose
  smtpd runs as user ``postfix``, delivers through it (the seed's ``smtpd_milters = unix:...``);
- a second instance never takes over a live socket, and a stopping instance removes only the
  socket file it created;
- start-up failures (port in use, a regular file at the socket path, a locked pid file, a user
  that cannot be switched to) are one line and exit status 69, without a traceback.
"""
from __future__ import annotations

import grp
import os
import pwd
import socket
import subprocess

from twisted.trial.unittest import SynchronousTestCase

from tests.harness import start_postfix
from tests.harness.base import unix_accepts, wait_until
from tests.harness.rmilter import REPO_ROOT, Rmilter

MESSAGE = (b"From: <alice@example.net>\r\nTo: <bob@example.org>\r\nSubject: production\r\n"
           b"Message-ID: <production.1@example.net>\r\n\r\nHello\r\n")

#: an unprivileged user and group every Debian system has
USER, GROUP = "nobody", "nogroup"


def process_ids(pid: int) -> "tuple[int, int]":
    """(real uid, real gid) of a running process, from /proc."""
    uid = gid = -1
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("Uid:"):
                uid = int(line.split()[1])
            elif line.startswith("Gid:"):
                gid = int(line.split()[1])
    return uid, gid


def run_failing(milter: Rmilter, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run the daemon's command line in the foreground, logging to stdout; it must exit by itself."""
    argv = [a for a in milter.command_line() if not a.startswith("--logfile=")]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=milter.dir)


class PostfixAsPostfixTests(SynchronousTestCase):
    def test_group_socket_and_dropped_root_deliver(self) -> None:
        """bind_socket_group = postfix, user/group = nobody: the socket is nobody:postfix 0660, the
        daemon runs as nobody, and Postfix's smtpd (user postfix) delivers through it."""
        milter = Rmilter("bind_socket_group = postfix;\nuser = %s;\ngroup = %s;\n" % (USER, GROUP), inet=False)
        os.chown(milter.dir, pwd.getpwnam(USER).pw_uid, -1)  # what RuntimeDirectory= gives
        self.addCleanup(milter.stop)
        milter.start()
        # the socket accepts (backlog) from bind on; the switch follows right after it
        milter.wait_for_log(r"running as uid %d, gid %d" % (pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid))
        st = os.stat(milter.socket_path)
        self.assertEqual((pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, st.st_mode & 0o777),
                         (USER, "postfix", 0o660))
        self.assertEqual(process_ids(milter.process.pid),
                         (pwd.getpwnam(USER).pw_uid, grp.getgrnam(GROUP).gr_gid))
        postfix = start_postfix(self, milters=milter.milter_unix)
        sent = postfix.swaks(MESSAGE, sender="alice@example.net")
        self.assertEqual(sent.status, 0, sent.transcript)
        self.assertEqual(len(postfix.wait_delivered(1)), 1)
        self.assertNotIn("Permission denied", postfix.maillog())
        milter.wait_for_log(r"msg done: queue_id: <%s>" % sent.queue_id)

    def test_without_group_postfix_is_refused(self) -> None:
        """The failure of the issue, kept as a check that the test above proves something: a root
        0660 socket is refused to Postfix's smtpd (Permission denied, 451 4.7.1)."""
        milter = Rmilter("", inet=False)
        self.addCleanup(milter.stop)
        milter.start()
        postfix = start_postfix(self, milters=milter.milter_unix)
        sent = postfix.swaks(MESSAGE, sender="alice@example.net")
        self.assertNotEqual(sent.status, 0)
        self.assertTrue(any(r.startswith("451 4.7.1") for r in sent.server_replies), sent.transcript)
        wait_until(lambda: "Permission denied" in postfix.maillog(), 10, "Permission denied in maillog")


class SecondInstanceTests(SynchronousTestCase):
    def test_live_socket_not_taken_over(self) -> None:
        """Issue 18.8: a second instance on the same socket exits 69 with one line; the first one
        keeps its socket and still answers."""
        first = Rmilter("", inet=False)
        self.addCleanup(first.stop)
        first.start()
        inode = os.stat(first.socket_path).st_ino
        second = Rmilter("", inet=False)
        second.socket_path = first.socket_path
        result = run_failing(second)
        self.assertEqual(result.returncode, 69, result.stdout + result.stderr)
        self.assertEqual(result.stderr.strip().count("\n"), 0, result.stderr)
        self.assertIn("another process is accepting connections on this socket", result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertEqual(os.stat(first.socket_path).st_ino, inode)
        self.assertTrue(unix_accepts(first.socket_path))

    def test_stale_socket_replaced(self) -> None:
        """A socket file nothing answers on (a crashed instance) is replaced at start."""
        milter = Rmilter("", inet=False)
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(milter.socket_path)
        dead.close()
        self.addCleanup(milter.stop)
        milter.start()
        self.assertTrue(unix_accepts(milter.socket_path))

    def test_stop_removes_only_own_socket(self) -> None:
        """Issue 18.8: when another process's socket is at the path by then, stopping leaves it."""
        first = Rmilter("", inet=False)
        self.addCleanup(first.stop)
        first.start()
        os.unlink(first.socket_path)
        other = socket.socket(socket.AF_UNIX)
        self.addCleanup(other.close)
        other.bind(first.socket_path)
        other.listen(1)
        inode = os.stat(first.socket_path).st_ino
        self.assertIsNotNone(first.stop())
        self.assertEqual(os.stat(first.socket_path).st_ino, inode)
        self.assertTrue(unix_accepts(first.socket_path))

    def test_stop_removes_own_socket(self) -> None:
        milter = Rmilter("", inet=False)
        self.addCleanup(milter.stop)
        milter.start()
        self.assertIsNotNone(milter.stop())
        self.assertFalse(os.path.exists(milter.socket_path))


class StartupFailureTests(SynchronousTestCase):
    """Issue 18.9 / SPEC §8.1: exit status 69 and one line naming the listener or file."""

    def assertOneLine(self, result: subprocess.CompletedProcess, *needles: str) -> str:
        self.assertEqual(result.returncode, 69, result.stdout + result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        for needle in needles:
            self.assertIn(needle, lines[0])
        return lines[0]

    def test_port_in_use(self) -> None:
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        milter = Rmilter("", unix=False)
        milter.port = busy.getsockname()[1]
        line = self.assertOneLine(run_failing(milter), "--listen inet:%d@127.0.0.1" % milter.port,
                                  "Address already in use")
        self.assertNotIn("[Errno", line)

    def test_port_in_use_names_bind_socket_file_line(self) -> None:
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        milter = Rmilter("# production\nbind_socket = inet:%d@127.0.0.1;\n" % busy.getsockname()[1],
                         unix=False, inet=False)
        self.assertOneLine(run_failing(milter), "bind_socket = inet:%d@127.0.0.1 (%s:2)"
                           % (busy.getsockname()[1], milter.config_path), "Address already in use")

    def test_regular_file_at_socket_path(self) -> None:
        milter = Rmilter("", inet=False)
        with open(milter.socket_path, "w") as f:
            f.write("not a socket\n")
        self.assertOneLine(run_failing(milter), "exists and is not a socket")
        with open(milter.socket_path) as f:
            self.assertEqual(f.read(), "not a socket\n")

    def test_socket_directory_missing(self) -> None:
        milter = Rmilter("", inet=False)
        milter.socket_path = os.path.join(milter.dir, "missing", "rmilter.sock")
        self.assertOneLine(run_failing(milter), "No such file or directory", milter.socket_path)

    def test_pid_file_locked(self) -> None:
        first = Rmilter("pidfile = %s;\n" % "PIDFILE", inet=False)
        pidfile = os.path.join(first.dir, "rmilter.pid")
        first.write_config("pidfile = %s;\n" % pidfile)
        self.addCleanup(first.stop)
        first.start()
        second = Rmilter("pidfile = %s;\n" % pidfile, inet=False)
        self.assertOneLine(run_failing(second), "pidfile (%s:1)" % second.config_path, "is locked")
        with open(pidfile) as f:
            self.assertEqual(f.read().strip(), str(first.process.pid))


class ReloadRebindTests(SynchronousTestCase):
    def test_rebind_keeps_owner_group_mode(self) -> None:
        """A bind_socket changed at reload is created with bind_socket_group/mode again; the old
        socket file is removed."""
        milter = Rmilter("", inet=False, unix=False)
        first = os.path.join(milter.dir, "first.sock")
        second = os.path.join(milter.dir, "second.sock")
        config = "bind_socket = unix:%s;\nbind_socket_group = postfix;\nbind_socket_mode = 0640;\n"
        milter.write_config(config % first)
        self.addCleanup(milter.stop)
        milter.start()
        wait_until(lambda: unix_accepts(first), 20, "first socket", milter.diagnostics)
        milter.write_config(config % second)
        milter.reload(wait_for="configuration reloaded")
        self.assertTrue(unix_accepts(second))
        st = os.stat(second)
        self.assertEqual((grp.getgrgid(st.st_gid).gr_name, st.st_mode & 0o777), ("postfix", 0o640))
        self.assertFalse(os.path.exists(first))
