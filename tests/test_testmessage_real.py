"""``rmilter test-message`` against the real Rspamd, clamd and Redis of the harness (issue 16).

The command runs in a process of its own (it runs the reactor), as an administrator runs it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Dict, Sequence, Tuple

from twisted.trial.unittest import SynchronousTestCase

from rmilter import testmessage
from tests.harness import EICAR, EICAR_NAME, GTUBE, shared_rspamd, start_clamd, start_redis
from tests.redis_support import c_grey_key

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = (b"From: <alice@example.net>\r\nTo: <bob@example.org>\r\nSubject: trial\r\n"
        b"Message-ID: <trial.%d@example.net>\r\n\r\n")


class RealServicesTests(SynchronousTestCase):
    def run_command(self, config: str, body: bytes, *args: str, n: int = 1) -> Tuple[int, Dict[str, Any]]:
        tmp = self.mktemp()
        os.makedirs(tmp)
        conf = os.path.join(tmp, "rmilter.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(config)
        env = dict(os.environ, PYTHONPATH=REPO)
        done = subprocess.run([sys.executable, "-m", "rmilter", "test-message", "--config", conf, "--json",
                               "--from", "alice@example.net", "--ip", "192.0.2.77", *args, "-"],
                              input=(HEAD % n) + body, capture_output=True, env=env, timeout=60)
        self.assertEqual(done.stderr, b"")
        return done.returncode, json.loads(done.stdout)

    def test_gtube_is_rejected_554_by_rspamd(self) -> None:
        rspamd = shared_rspamd()
        status, doc = self.run_command("spamd { servers = r:%s; }\n" % rspamd.address, GTUBE + b"\r\n")
        self.assertEqual(status, testmessage.REJECT_STATUS)
        self.assertEqual(doc["smtp_reply"]["code"], "554")
        [spam] = [c for c in doc["checks"] if c["check"] == "spam"]
        self.assertEqual(spam["result"], "rejected, action: reject")
        self.assertGreater(spam["time"], 0.0)

    def test_gtube_in_dry_run_is_accepted_and_would_be_rejected(self) -> None:
        rspamd = shared_rspamd()
        status, doc = self.run_command("spamd { servers = r:%s; dry_run = yes; }\n" % rspamd.address,
                                       GTUBE + b"\r\n")
        self.assertEqual(status, testmessage.ACCEPT_STATUS)
        self.assertIn("spam scan: would reject, action: reject", doc["summary"])

    def test_eicar_is_rejected_by_clamd(self) -> None:
        clamd = start_clamd(self)
        status, doc = self.run_command("clamav { servers = %s; results_timeout = 20s; }\n" % clamd.address,
                                       EICAR + b"\r\n")
        self.assertEqual(status, testmessage.REJECT_STATUS)
        self.assertEqual(doc["smtp_reply"]["line"], "554 5.7.1 Infected: %s" % EICAR_NAME)

    def test_first_triplet_would_be_deferred_and_nothing_is_written(self) -> None:
        redis = start_redis(self)
        config = ("spamd { spamd_greylist = no; }\nredis { servers_grey = %s; servers_limits = %s; }\n"
                  "limits { limit_to = 5:0.1; }\n" % (redis.address, redis.address))
        status, doc = self.run_command(config, b"Hello\r\n")
        self.assertEqual((status, doc["stage"]), (testmessage.TEMPFAIL_STATUS, "data"))
        self.assertEqual(doc["smtp_reply"]["line"], "451 4.7.1 Try again later")
        self.assertEqual(redis.keys(), [])  # read, never recorded
        self.assertTrue(any(w.startswith("SETEX grey") for w in doc["redis_writes_held_back"]), doc)
        # again: still a first triplet, since nothing was recorded
        status, _ = self.run_command(config, b"Hello\r\n")
        self.assertEqual(status, testmessage.TEMPFAIL_STATUS)
        # --write records it as the milter would
        status, doc = self.run_command(config, b"Hello\r\n", "--write")
        self.assertEqual(status, testmessage.TEMPFAIL_STATUS)
        self.assertEqual(doc["redis_writes_held_back"], [])
        self.assertIn(c_grey_key("grey", "alice@example.net", "192.0.2.77", ["<bob@example.org>"]), redis.keys())

    def test_greylisting_dry_run_records_the_triplet_with_write(self) -> None:
        redis = start_redis(self)
        config = ("spamd { spamd_greylist = no; }\nredis { servers_grey = %s; }\n"
                  "greylisting { dry_run = yes; }\n" % redis.address)
        status, doc = self.run_command(config, b"Hello\r\n", "--write")
        self.assertEqual(status, testmessage.ACCEPT_STATUS)
        self.assertIn("; greylist: would defer;", doc["summary"])
        self.assertEqual(len(redis.keys()), 1)
