"""Start-up weight (issue 19): a configuration loads only the stacks it uses.

A fresh interpreter (a subprocess: the test process has imported everything already) starts
the service with no backends and lists which of the lazily imported modules are loaded; then a
reload adds https:// Rspamd servers and a metrics socket, and the same process must build the
client (treq, TLS with service-identity) and serve the metrics - lazy imports must not make a
feature unavailable later.
"""
from __future__ import annotations

import json

from twisted.trial.unittest import TestCase

from tests.harness.base import free_port, probe_config, run_python_probe

#: loaded only when the configuration asks for them (the modules and their reasons)
LAZY = {
    "treq": "the Rspamd client's HTTP",
    "twisted.web.client": "the Rspamd client's HTTP",
    "twisted.web.server": "the metrics/status page",
    "rmilter.backends.rspamd.client": "spamd servers",
    "rmilter.backends.rspamd.transport": "spamd servers",
    "rmilter.backends.rspamd.tls": "https:// spamd servers",
    "rmilter.metrics": "metrics_socket",
    "rmilter.status": "metrics_socket",
    "prometheus_client": "metrics_socket",
    "txredisapi": "a Redis feature",
    "hiredis": "a Redis feature",
    "dkim": "DKIM signing",
    "dns": "DKIM signing",
}

PROBE = r"""
import json, sys
from twisted.internet import reactor
from rmilter.service import RmilterService, load_configuration

lazy, path = json.loads(sys.argv[1]), sys.argv[2]
milter_port, spamd_port, metrics_port = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
config, keyring = load_configuration(path)
svc = RmilterService(config, keyring=keyring, config_path=path, listen=["tcp:%d:interface=127.0.0.1" % milter_port],
                     reactor=reactor, install_signals=False)
out = {}

def loaded():
    return sorted(m for m in lazy if m in sys.modules)

def started():
    out["no_backends"] = loaded()
    with open(path, "w") as f:
        f.write("metrics_socket = inet:%d@127.0.0.1;\n"
                "spamd { servers = 127.0.0.1:%d, https://localhost:%d; }\n" % (metrics_port, spamd_port, spamd_port))
    d = svc.reload()

    def reloaded(ok):
        out["reloaded"] = ok
        out["after_reload"] = loaded()
        out["rspamd_client"] = svc.runtime.deps.rspamd is not None
        import treq  # loaded by the reload already
        return treq.get("http://127.0.0.1:%d/health" % metrics_port).addCallback(
            lambda response: out.__setitem__("health", response.code))

    d.addCallback(reloaded)
    d.addErrback(lambda f: out.setdefault("error", f.getTraceback()))
    d.addBoth(lambda _: svc.stopService()).addBoth(lambda _: reactor.stop())

svc.startService()
reactor.callWhenRunning(started)
reactor.run()
print(json.dumps(out))
"""


class StartupWeightTests(TestCase):
    def probe(self) -> dict:
        folder, path = probe_config("# no backends\n", prefix="rmilter-weight-")
        return run_python_probe(
            PROBE, [json.dumps(sorted(LAZY)), path, str(free_port()), str(free_port()), str(free_port())], cwd=folder)

    def test_no_backends_loads_no_backend_stack_and_a_reload_adds_them(self) -> None:
        out = self.probe()
        self.assertNotIn("error", out, out.get("error"))
        self.assertEqual(out["no_backends"], [], "loaded without being configured: %s" % (
            ", ".join("%s (%s)" % (m, LAZY[m]) for m in out["no_backends"])))
        self.assertTrue(out["reloaded"])
        self.assertTrue(out["rspamd_client"], "the reload built the Rspamd client")
        for module in ("treq", "rmilter.backends.rspamd.tls", "rmilter.metrics", "prometheus_client"):
            self.assertIn(module, out["after_reload"])
        self.assertNotIn("txredisapi", out["after_reload"], "no Redis feature configured")
        self.assertEqual(out["health"], 200)

    def test_the_twistd_entry_point_does_not_load_the_metrics_stack(self) -> None:
        """``twistd rmilter`` imports rmilter.tap, which knows workers: metrics wait for them."""
        probe = "import json, sys, rmilter.tap; print(json.dumps(sorted(m for m in %r if m in sys.modules)))" % (
            ["rmilter.metrics", "prometheus_client", "treq", "txredisapi", "dkim"],)
        self.assertEqual(run_python_probe(probe, []), [])
