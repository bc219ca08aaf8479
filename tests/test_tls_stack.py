"""TLS loaded only when the configuration needs it (rmilter/tls_stack.py, issue 19).

Each case runs ``twistd rmilter``'s own entry (``rmilter.tap.makeService``) in a fresh
interpreter: this test process has imported pyOpenSSL long ago.
"""
from __future__ import annotations

from typing import Any, Dict

from twisted.trial.unittest import TestCase

from tests.dates import message_date
from tests.harness import GTUBE, shared_rspamd
from tests.harness.base import free_port, probe_config, run_python_probe

PROBE = r"""
import json, sys
from twisted.logger import formatEvent, globalLogPublisher
events = []
globalLogPublisher.addObserver(lambda e: events.append(formatEvent(e)))
from rmilter import tap
path, port, later = sys.argv[1], int(sys.argv[2]), sys.argv[3]
options = tap.Options()
options.parseOptions(["--config", path, "--listen", "tcp:%d:interface=127.0.0.1" % port])
service = tap.makeService(options)
from rmilter import tls_stack
out = {"openssl": "OpenSSL" in sys.modules, "rust_binding": "cryptography.hazmat.bindings._rust" in sys.modules,
       "tls": tls_stack.tls_available(), "generation_at_start": service.generation}
from twisted.internet import reactor

def reload():
    with open(path, "w") as f:
        f.write(later)
    d = service.reload()

    def done(result):
        out["reloaded"] = result
        out["refusal"] = [e for e in events if "restart rmilter" in e]
        out["generation"] = service.generation
        print(json.dumps(out))
        reactor.stop()

    d.addBoth(done)

reactor.callWhenRunning(reload)
reactor.run()
"""

HTTPS = "spamd { servers = https://127.0.0.1:%d; };\n"


class TlsStackTests(TestCase):
    def probe(self, first: str, later: str) -> Dict[str, Any]:
        folder, path = probe_config(first, prefix="rmilter-tls-")
        return run_python_probe(PROBE, [path, str(free_port()), later + "tempdir = %s;\n" % folder], cwd=folder)

    def test_no_tls_configured_loads_no_openssl_and_refuses_a_reload_that_needs_it(self) -> None:
        out = self.probe("# no backends\n", HTTPS % free_port())
        self.assertFalse(out["openssl"], "pyOpenSSL loaded without an https:// server")
        self.assertFalse(out["rust_binding"], "cryptography's OpenSSL binding loaded")
        self.assertFalse(out["tls"])
        self.assertFalse(out["reloaded"], "a configuration this process cannot run was applied")
        self.assertEqual(out["generation"], out["generation_at_start"])
        self.assertEqual(len(out["refusal"]), 1, out)
        self.assertIn("rmilter.conf:1: spamd servers over https:// need TLS", out["refusal"][0])

    def test_https_at_start_has_tls_and_reloads_keep_it(self) -> None:
        out = self.probe(HTTPS % free_port(), HTTPS % free_port())
        self.assertTrue(out["openssl"])
        self.assertTrue(out["tls"])
        self.assertTrue(out["reloaded"])
        self.assertEqual(out["refusal"], [])

    def test_a_reload_without_tls_in_a_process_without_it_is_applied(self) -> None:
        out = self.probe("# no backends\n", "spamd { servers = 127.0.0.1:%d; };\n" % free_port())
        self.assertFalse(out["openssl"])
        self.assertTrue(out["reloaded"])
        self.assertEqual(out["generation"], out["generation_at_start"] + 1)

    def test_a_workers_listen_options_load_no_endpoint_plugins(self) -> None:
        """A worker starts with ``--listen adopted-fd:N``: its check must not import every
        endpoint plugin (and with them the endpoints module and pyOpenSSL) before the
        configuration is read; an unknown type is still refused."""
        probe = (
            "import json, sys\n"
            "from twisted.python import usage\n"
            "from rmilter import tap\n"
            "tap.Options().parseOptions(['--worker', '1', '--listen', 'adopted-fd:4', '--listen', 'fd:5',\n"
            "                            '--listen', 'systemd:domain=UNIX:index=0', '--listen', 'tcp:1:interface=::1'])\n"
            "loaded = [m for m in ('OpenSSL', 'twisted.internet.endpoints') if m in sys.modules]\n"
            "try:\n"
            "    tap.Options().parseOptions(['--listen', 'nosuchtype:4'])\n"
            "    refused = ''\n"
            "except usage.UsageError as e:\n"
            "    refused = str(e)\n"
            "print(json.dumps({'loaded': loaded, 'refused': refused}))\n"
        )
        out = run_python_probe(probe, [])
        self.assertEqual(out["loaded"], [])
        self.assertIn("unknown endpoint type 'nosuchtype'", out["refused"])

    def test_plain_http_rspamd_loads_no_openssl_and_still_scans(self) -> None:
        """With ``http://`` Rspamd servers only, the HTTP client is imported with pyOpenSSL
        held back (12 MB of the idle floor), and a scan of GTUBE on the real Rspamd through it
        is still rejected."""
        probe = r"""
import json, sys
path, port = sys.argv[1], sys.argv[2]
from rmilter import tap
options = tap.Options()
options.parseOptions(["--config", path, "--listen", "tcp:%s:interface=127.0.0.1" % port])
service = tap.makeService(options)
from twisted.internet import reactor
from rmilter.backends.rspamd.client import RspamdClient
from rmilter.backends.rspamd.request import MessageBody, ScanRequest
from rmilter.startup import load_configuration
config, _keys = load_configuration(path)
out = {"openssl": "OpenSSL" in sys.modules, "treq": "treq" in sys.modules}

def scan():
    client = RspamdClient(config.spamd, reactor)
    d = client.scan(ScanRequest(queue_id="PROBE1", envelope_from="alice@example.net",
                                recipients=("bob@example.org",)),
                    MessageBody(data=sys.argv[3].encode("ascii")))

    def done(result):
        reply = getattr(result, "reply", None)
        out["result"] = repr(result)[:2000]
        out["action"] = getattr(reply, "action", None)
        out["gtube"] = bool(reply is not None and reply.has_symbol("GTUBE"))
        out["openssl_after"] = "OpenSSL" in sys.modules
        print(json.dumps(out))
        reactor.stop()

    d.addBoth(done)

reactor.callWhenRunning(scan)
reactor.run()
"""
        rspamd = shared_rspamd()
        message = ("From: Alice <alice@example.net>\r\nTo: Bob <bob@example.org>\r\nSubject: probe\r\n"
                   "Date: %s\r\nMessage-ID: <tls-probe@example.net>\r\n\r\n%s\r\n"
                   % (message_date(), GTUBE.decode("ascii")))
        folder, path = probe_config("spamd { servers = %s; };\n" % rspamd.address, prefix="rmilter-tls-")
        out = run_python_probe(probe, [path, str(free_port()), message], cwd=folder)
        self.assertTrue(out["treq"], "the HTTP client was not imported at start")
        self.assertFalse(out["openssl"], "pyOpenSSL loaded with plain http:// Rspamd servers only")
        self.assertEqual(out["action"], "reject", out["result"])
        self.assertTrue(out["gtube"], out["result"])
        self.assertFalse(out["openssl_after"], "a plain http:// scan loaded pyOpenSSL")
