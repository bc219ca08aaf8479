"""``rmilter check-config FILE`` and ``python -m rmilter check-config FILE``; the shipped sample."""
from __future__ import annotations

import io
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from rmilter import cli
from rmilter import config as rconfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "rmilter.conf.sample")


class CheckConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, text: str) -> str:
        path = os.path.join(self.dir, "rmilter.conf")
        with open(path, "w") as f:
            f.write(text)
        return path

    def run_cli(self, *args: str) -> "tuple[int, str, str]":
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(list(args), out, err)
        return status, out.getvalue(), err.getvalue()

    def test_valid_file_prints_every_directive(self) -> None:
        """Exit 0; one line per directive; '# FILE:LINE' only on values that differ from the default."""
        path = self.write("max_size = 10M;\nspamd {\n  servers = r:localhost:11333;\n  retry_count = 5;\n}\n")
        status, out, err = self.run_cli("check-config", path)
        self.assertEqual((status, err), (0, ""))
        lines = out.splitlines()
        self.assertIn("main.max_size = 10M  # %s:1" % path, lines)
        self.assertIn('spamd.servers = "localhost:11333"  # %s:3' % path, lines)
        self.assertIn("spamd.retry_count = 5", lines)  # set, but to the default
        self.assertIn("greylisting.timeout = 5m", lines)
        self.assertIn("main.pidfile = (unset)", lines)
        self.assertIn("dkim.domain = (none)", lines)
        directive_lines = [line for line in lines if not line.startswith("#") and not line.startswith("dkim.domain")]
        expected = sum(1 for section, ds in rconfig.directives.SECTIONS.items() if section != "dkim.domain"
                       for d in ds if d.attr is None)
        self.assertEqual(len(directive_lines), expected)
        self.assertTrue(lines[-1].endswith("configuration is valid (0 warnings)"))

    def test_warnings_are_printed_after_the_values(self) -> None:
        """Warnings follow the listing, with their FILE:LINE; the exit status stays 0."""
        path = self.write("greylisting {\n  awl_enable = yes;\n}\n")
        status, out, _ = self.run_cli("check-config", path)
        self.assertEqual(status, 0)
        self.assertIn("# warning: %s:2: awl_enable ignored" % path, out)

    def test_invalid_file_prints_every_error_and_exits_1(self) -> None:
        """Exit 1; every error as FILE:LINE: reason on stderr; nothing on stdout."""
        path = self.write("max_size = big;\nspamd {\n  timeout = 5s;\n}\n")
        status, out, err = self.run_cli("check-config", path)
        self.assertEqual((status, out), (1, ""))
        lines = err.splitlines()
        self.assertTrue(lines[0].startswith("%s:1: max_size: 'big'" % path), lines)
        self.assertTrue(lines[1].startswith("%s:3: " % path), lines)
        self.assertEqual(lines[2], "%s: configuration is invalid (2 errors)" % path)

    def test_missing_file(self) -> None:
        """A file that does not exist is an error (exit 1), not a traceback."""
        status, _, err = self.run_cli("check-config", os.path.join(self.dir, "absent.conf"))
        self.assertEqual(status, 1)
        self.assertIn("absent.conf:0: cannot read", err)

    def test_no_command_is_a_usage_error(self) -> None:
        """Without a command: usage on stderr, exit 2."""
        status, _, err = self.run_cli()
        self.assertEqual(status, 2)
        self.assertIn("usage: rmilter", err)

    def test_python_dash_m(self) -> None:
        """python -m rmilter check-config FILE works the same way (exit status and output)."""
        path = self.write("bind_socket = inet:11332@127.0.0.1;\n")
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        done = subprocess.run([sys.executable, "-m", "rmilter", "check-config", path],
                              capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn('main.bind_socket = "inet:11332@127.0.0.1"  # %s:1' % path, done.stdout)
        bad = self.write("bind_socket = ;\n")
        done = subprocess.run([sys.executable, "-m", "rmilter", "check-config", bad],
                              capture_output=True, text=True, env=env, timeout=60)
        self.assertEqual(done.returncode, 1)
        self.assertIn("%s:1: bind_socket: expects one socket spec" % bad, done.stderr)


class SampleConfigTests(SynchronousTestCase):
    def test_sample_passes_check_config(self) -> None:
        """rmilter.conf.sample (shipped, shown in the README) passes check-config without warnings."""
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(cli.main(["check-config", SAMPLE], out, err), 0, err.getvalue())
        self.assertIn("configuration is valid (0 warnings)", out.getvalue())

    def test_sample_covers_every_section(self) -> None:
        """The sample sets something in every section and activates the features it describes."""
        config = rconfig.load(SAMPLE)
        for section in ("main", "clamav", "spamd", "redis", "greylisting", "limits", "dkim"):
            self.assertTrue(any(key.startswith(section + ".") for key in config.origins), section)
        self.assertTrue(config.greylisting_active and config.limits_active)
        self.assertEqual(config.cache_backend, "redis")
        self.assertEqual(rconfig.listen_endpoint(config.main.bind_socket or ""), "tcp:11339:interface=127.0.0.1")
        self.assertEqual(len(config.dkim.domains), 1)

    def test_sample_is_commented(self) -> None:
        """Most directives in the sample carry an explanation: at least a third of its lines are comments."""
        with open(SAMPLE) as f:
            lines = [line.strip() for line in f if line.strip()]
        comments = [line for line in lines if line.startswith("#")]
        self.assertGreater(len(comments) * 3, len(lines))
