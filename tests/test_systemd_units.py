"""The shipped systemd units (share/rmilter/systemd/): ``systemd-analyze verify`` accepts them, and
the service's own command line, socket-activated by ``systemd-socket-activate`` with the socket
unit's owner/group/mode and run as a non-root user, delivers a real Postfix's mail (issue 13).
"""
from __future__ import annotations

import configparser
import grp
import os
import pwd
import re
import shlex
import shutil
import socket
import sys
from typing import Dict, List

from twisted.trial.unittest import SynchronousTestCase

from tests.harness import start_postfix
from tests.harness.base import ManagedProcess, find_program, run, scratch_dir, wait_until, write_file
from tests.harness.rmilter import REPO_ROOT, _TWISTD

UNITS = os.path.join(REPO_ROOT, "systemd")
#: the unit's twistd, replaced by the interpreter running the tests
UNIT_TWISTD = "/opt/rmilter/bin/twistd"
MESSAGE = (b"From: <alice@example.net>\r\nTo: <bob@example.org>\r\nSubject: unit\r\n"
           b"Message-ID: <unit.1@example.net>\r\n\r\nHello\r\n")


def unit(name: str) -> Dict[str, Dict[str, str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(os.path.join(UNITS, name))
    return {section: dict(parser[section]) for section in parser.sections()}


class UnitFilesTests(SynchronousTestCase):
    def test_systemd_analyze_verify(self) -> None:
        """Both units verify (twistd's path pointed at an existing one: verify checks it is executable)."""
        directory = scratch_dir("units")
        twistd = shutil.which("twistd") or find_program("twistd")
        for name in ("rmilter.service", "rmilter.socket"):
            with open(os.path.join(UNITS, name)) as f:
                write_file(os.path.join(directory, name), f.read().replace(UNIT_TWISTD, twistd))
        result = run([find_program("systemd-analyze"), "verify",
                      os.path.join(directory, "rmilter.socket"), os.path.join(directory, "rmilter.service")],
                     timeout=60, cwd=directory)
        self.assertEqual(result.returncode, 0, result.stdout.decode())
        self.assertEqual(result.stdout.decode().strip(), "")

    def test_shipped_by_setup_and_manifest(self) -> None:
        with open(os.path.join(REPO_ROOT, "setup.py")) as f:
            setup = f.read()
        with open(os.path.join(REPO_ROOT, "MANIFEST.in")) as f:
            manifest = f.read()
        for name in ("rmilter.service", "rmilter.socket", "rmilter.tmpfiles"):
            self.assertIn("systemd/" + name, setup)
            self.assertIn("systemd/" + name, manifest)
        self.assertIn('"share/rmilter/systemd"', setup)

    def test_service_settings(self) -> None:
        service = unit("rmilter.service")["Service"]
        self.assertEqual((service["User"], service["RuntimeDirectory"]), ("rmilter", "rmilter"))
        self.assertEqual(service["ExecReload"], "/bin/kill -HUP $MAINPID")
        self.assertIn(" -n ", service["ExecStart"])
        socket_unit = unit("rmilter.socket")["Socket"]
        self.assertEqual((socket_unit["SocketGroup"], socket_unit["SocketMode"]), ("postfix", "0660"))
        with open(os.path.join(UNITS, "rmilter.tmpfiles")) as f:
            self.assertRegex(f.read(), r"(?m)^d /run/rmilter 0755 rmilter rmilter -$")


class SocketActivationTests(SynchronousTestCase):
    def test_unit_command_line_socket_activated_as_nobody_delivers(self) -> None:
        """ExecStart of rmilter.service under systemd-socket-activate, socket owned as rmilter.socket
        says, the process ending as user nobody: Postfix delivers.

        systemd's User= is played by the ``user``/``group`` directives (the interpreter running the
        tests lives under /root, which an unprivileged user cannot import from)."""
        directory = scratch_dir("sd")
        sock_path = os.path.join(directory, "rmilter.sock")
        config_path = write_file(os.path.join(directory, "rmilter.conf"), "tempdir = /tmp;\nuser = nobody;\ngroup = nogroup;\n")
        syslog_path = os.path.join(directory, "log.sock")
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.bind(syslog_path)
        os.chmod(syslog_path, 0o666)
        receiver.settimeout(0.2)
        argv = shlex.split(unit("rmilter.service")["Service"]["ExecStart"])
        self.assertEqual(argv[0], UNIT_TWISTD)
        argv = [sys.executable, "-c", _TWISTD] + [a.replace("/etc/rmilter.conf", config_path) for a in argv[1:]]
        socket_unit = unit("rmilter.socket")["Socket"]
        env = {"PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "RMILTER_SYSLOG_SOCKET": syslog_path, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        command: List[str] = [find_program("systemd-socket-activate"), "-l", sock_path]
        for name, value in env.items():
            command += ["-E", "%s=%s" % (name, value)]
        command += ["--"] + argv
        process = ManagedProcess(command, os.path.join(directory, "activate.log"), cwd=directory)
        self.addCleanup(process.stop)
        wait_until(lambda: os.path.exists(sock_path), 20, "systemd-socket-activate's socket")
        # what systemd does for SocketUser=/SocketGroup=/SocketMode= (the unit's user is nobody here)
        os.chown(sock_path, pwd.getpwnam("nobody").pw_uid, grp.getgrnam(socket_unit["SocketGroup"]).gr_gid)
        os.chmod(sock_path, int(socket_unit["SocketMode"], 8))
        postfix = start_postfix(self, milters="unix:" + sock_path)
        sent = postfix.swaks(MESSAGE, sender="alice@example.net")
        self.assertEqual(sent.status, 0, sent.transcript)
        self.assertEqual(len(postfix.wait_delivered(1)), 1)
        lines: List[str] = []

        def logged() -> bool:
            try:
                while True:
                    lines.append(receiver.recv(65536).decode("utf-8"))
            except socket.timeout:
                pass
            return any("msg done: queue_id: <%s>" % sent.queue_id in line for line in lines)

        wait_until(logged, 20, "the summary line in syslog", process.diagnostics)
        (summary,) = [line for line in lines if "msg done" in line]
        self.assertRegex(summary, r"^<22>\S+ +\d+ [\d:]+ rmilter\[\d+\]: <[0-9a-f]{10}>; msg done")  # mail.info
        pid = int(re.search(r"rmilter\[(\d+)\]", summary).group(1))  # type: ignore[union-attr]
        with open("/proc/%d/status" % pid) as f:
            uid_line = next(line for line in f if line.startswith("Uid:"))
        self.assertEqual(int(uid_line.split()[1]), pwd.getpwnam("nobody").pw_uid)
