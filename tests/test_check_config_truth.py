"""``rmilter check-config`` tells the truth and keeps secrets (issue 13 item 5, issue 18 item 10).

Run as the installed command would be (``python -m rmilter check-config``, a real process).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = """\
clamav { servers = clamd, /run/clamav/clamd.ctl; }
spamd { servers = r:rspamd.example:11334; }
memcached { servers_grey = localhost; }
redis { servers_limits = 127.0.0.1:6380; password = "hunter2"; }
greylisting { timeout = 5m; }
limits { limit_to = 100:1; }
dkim { sign_alg = sha256; }
"""


def check_config(text: str, *args: str) -> subprocess.CompletedProcess:
    path = os.path.join(tempfile.mkdtemp(), "rmilter.conf")
    with open(path, "w") as f:
        f.write(text)
    return subprocess.run([sys.executable, "-m", "rmilter", "check-config", *args, path], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=REPO), cwd=REPO)


class CheckConfigTruthTests(SynchronousTestCase):
    def test_password_masked_and_how_to_see_it(self) -> None:
        result = check_config(CONFIG)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("hunter2", result.stdout + result.stderr)
        self.assertIn('redis.password = "***"', result.stdout)
        self.assertIn("--show-secrets", result.stdout)

    def test_show_secrets(self) -> None:
        result = check_config(CONFIG, "--show-secrets")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn('redis.password = "hunter2"', result.stdout)

    def test_effective_ports(self) -> None:
        out = check_config(CONFIG).stdout
        self.assertIn("# effective clamav servers: clamd:3310, /run/clamav/clamd.ctl (unix socket)", out)
        self.assertIn("# effective spamd servers: rspamd.example:11334", out)
        self.assertIn("# effective redis servers_limits: 127.0.0.1:6380", out)

    def test_notes_for_enabled_but_inactive(self) -> None:
        out = check_config("redis { servers_limits = 127.0.0.1; }\ngreylisting { timeout = 5m; }\n"
                           "limits { limit_to = 100:1; limit_to_ip = 0:0; }\ndkim { sign_alg = sha256; }\n").stdout
        self.assertIn("# note: greylisting is enabled but inactive: no Redis servers_grey", out)
        self.assertIn("# note: dkim is enabled but inactive: no domain { } block and no key_table", out)
        self.assertNotIn("limits (limit_to) are set but inactive", out)  # servers_limits is there
        out = check_config("greylisting { timeout = 5m; }\nlimits { limit_to = 100:1; }\n").stdout
        self.assertIn("# note: limits (limit_to) are set but inactive: no Redis servers_limits", out)

    def test_memcached_with_redis_lists(self) -> None:
        out = check_config("memcached { servers_grey = localhost; }\n").stdout
        self.assertIn("# note: Redis servers are configured (servers_grey) but unused: the cache backend is memcached",
                      out)

    def test_quiet_default(self) -> None:
        """No notes about features the file never mentions (the embedded defaults enable them)."""
        out = check_config("max_size = 10M;\ntempdir = /tmp;\n").stdout
        self.assertNotIn("# note:", out)
