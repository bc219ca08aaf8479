"""A private Rspamd (REAL-SERVICES §4): normal worker, controller, proxy in milter mode.

The stock rules of /etc/rspamd are used as they are; only the top-level file and a private
``local.d/`` are ours.  DNS points at a port where nothing listens (every lookup fails at once),
modules needing the network are off, test patterns are on, and two harness symbols make every
action reachable from a message body:

========================================  ==================================================
body line                                 effect
========================================  ==================================================
``XJS*C4JDBQADN1...`` (GTUBE)             reject, 554 5.7.1 Gtube pattern (no other symbols)
``YJS*...`` / ``ZJS*...`` / ``AJS*...``   add header / rewrite subject / no action
``RSPAMD-TEST-ACTION: <action>``          that action (``soft reject``, ``greylist``, ...),
                                          message ``harness forced <action>``
``RSPAMD-TEST-SCORE: <n>``                symbol HARNESS_TEST_SCORE with score n; thresholds:
                                          greylist 4, add header 6, rewrite subject 8, reject 15
========================================  ==================================================

Authenticated mail (``User`` header / ``{auth_authen}``) from example.com is DKIM-signed with the
key in ``dkim_key_path`` (selector ``test``; public record in ``dkim_txt_record``).

The first start compiles Hyperscan databases (10-14 s); they are cached in
``/var/tmp/rmilter-test-hs-cache`` across runs, so later starts take about a second.  Use
``shared_rspamd()`` so a test process starts it once.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import urllib.error
import urllib.request
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from tests.harness.base import (
    ManagedProcess,
    ServiceUnavailable,
    at_exit,
    find_program,
    free_port,
    run,
    scratch_dir,
    tail,
    tcp_accepts,
    wait_until,
    write_file,
)

#: kept between runs: Hyperscan compiles the stock regexps only once per content
HS_CACHE_DIR = os.environ.get("RMILTER_HS_CACHE", "/var/tmp/rmilter-test-hs-cache")

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
GTUBE_ADD_HEADER = b"Y" + GTUBE[1:]
GTUBE_REWRITE_SUBJECT = b"Z" + GTUBE[1:]
GTUBE_NO_ACTION = b"A" + GTUBE[1:]

#: modules that need DNS, Redis or the internet, or add noise with DNS dead
DISABLED_MODULES = (
    "rbl surbl fuzzy_check dcc asn emails spf dmarc phishing url_redirector rspamd_update "
    "neural ratelimit greylist history_redis replies mx_check whitelist mid mime_types multimap "
    "reputation bimi arc external_services spamtrap clickhouse elastic metric_exporter hfilter"
).split()

_TOP_CONF = """\
.include "$CONFDIR/common.conf"
options {
  pidfile = "$RUNDIR/rspamd.pid";
  .include "$CONFDIR/options.inc"
  .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}
logging { type = "file"; filename = "$LOGDIR/rspamd.log"; level = "%(log_level)s"; }
worker "normal" { bind_socket = "127.0.0.1:%(normal)d";%(normal_unix)s count = 1; task_timeout = 8s; }
worker "controller" {
  bind_socket = "127.0.0.1:%(controller)d"; count = 1;
  password = "q1"; secure_ip = "127.0.0.1"; static_dir = "${WWWDIR}";
}
worker "rspamd_proxy" {
  bind_socket = "127.0.0.1:%(proxy)d"; count = 1;
  milter = yes; timeout = 120s;
  %(proxy_upstream)s
  spam_header = "X-Spam";
  reject_message = "Spam message rejected";
}
"""

_OPTIONS_INC = """\
dns { nameserver = ["127.0.0.1:%(dns)d"]; timeout = 0.3s; retransmits = 1; }
filters = "chartable,dkim,regexp";
enable_test_patterns = true;
hs_cache_dir = "%(hs_cache)s/";
"""

_MILTER_HEADERS = """\
use = ["x-spamd-result", "x-rspamd-queue-id", "x-spam-status", "authentication-results"];
skip_local = false;
skip_authenticated = false;
"""

_DKIM_SIGNING = """\
path = "%(dkim_dir)s/$domain.$selector.key";
selector = "test";
allow_username_mismatch = true;
sign_authenticated = true;
sign_local = false;
use_milter_headers = true;
"""

HARNESS_LUA = """\
-- harness hooks: body line "RSPAMD-TEST-ACTION: <action>" forces that action;
--                body line "RSPAMD-TEST-SCORE: <n>" adds symbol HARNESS_TEST_SCORE with score n
local function harness_find(task, pat)
  local c = task:get_content()
  return c and tostring(c):match(pat)
end
rspamd_config:register_symbol{
  name = 'HARNESS_TEST_ACTION', type = 'prefilter', priority = 10,
  callback = function(task)
    local act = harness_find(task, 'RSPAMD%-TEST%-ACTION: ([%a ]+[%a])')
    if act then
      task:set_pre_result{action = act, message = 'harness forced ' .. act, module = 'harness'}
      return true, act
    end
  end,
}
rspamd_config:register_symbol{
  name = 'HARNESS_TEST_SCORE', score = 1.0, group = 'harness', description = 'harness test score',
  callback = function(task)
    local s = harness_find(task, 'RSPAMD%-TEST%-SCORE: ([%d%.]+)')
    if s then task:insert_result('HARNESS_TEST_SCORE', tonumber(s), s) end
  end,
}
"""


class Rspamd:
    """Rspamd on free ports: ``address`` (normal worker, rmilter's ``spamd { servers }``),
    ``proxy_milter`` (the proxy in milter mode, ``inet:PORT@127.0.0.1``), ``controller_url``.

    ``extra_lua`` is a mapping name -> Lua source appended to ``rspamd.local.lua`` (e.g. a rule
    echoing the request); ``extra_local_d`` maps file names to contents added to ``local.d/``.

    For benchmarks (bench/rspamd_bench.py): ``proxy_self_scan=False`` makes the milter proxy
    forward to the normal worker (over its unix socket ``normal_socket`` when ``normal_unix``),
    so the proxy and rmilter scan on the same worker; ``log_level`` quietens the log.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        extra_lua: Optional[Mapping[str, str]] = None,
        extra_local_d: Optional[Mapping[str, str]] = None,
        *,
        proxy_self_scan: bool = True,
        normal_unix: bool = False,
        log_level: str = "notice",
    ) -> None:
        self.dir = scratch_dir("rspamd")
        self.proxy_self_scan = proxy_self_scan
        self.normal_socket: Optional[str] = os.path.join(self.dir, "normal.sock") if normal_unix else None
        self.log_level = log_level
        self.normal_port = free_port()
        self.controller_port = free_port()
        self.proxy_port = free_port()
        self.dns_port = free_port(socket.SOCK_DGRAM)
        self.extra_lua: Dict[str, str] = dict(extra_lua or {})
        self.extra_local_d: Dict[str, str] = dict(extra_local_d or {})
        self.log_path = os.path.join(self.dir, "log", "rspamd.log")
        self.dkim_dir = os.path.join(self.dir, "dkim")
        self.dkim_key_path = os.path.join(self.dkim_dir, "example.com.test.key")
        self.dkim_txt_path = os.path.join(self.dkim_dir, "example.com.test.txt")
        self.process: Optional[ManagedProcess] = None
        for sub in ("local.d", "db", "run", "log", "dkim"):
            os.makedirs(os.path.join(self.dir, sub))

    # --- addresses ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the normal worker (HTTP /checkv2)."""
        return "%s:%d" % (self.host, self.normal_port)

    @property
    def url(self) -> str:
        return "http://%s:%d" % (self.host, self.normal_port)

    @property
    def controller_url(self) -> str:
        return "http://%s:%d" % (self.host, self.controller_port)

    @property
    def proxy_milter(self) -> str:
        return "inet:%d@%s" % (self.proxy_port, self.host)

    @property
    def dkim_txt_record(self) -> str:
        """The DNS TXT value (``v=DKIM1; k=rsa; p=...``) for ``test._domainkey.example.com``."""
        with open(self.dkim_txt_path, encoding="ascii") as f:
            text = f.read()
        # rspamadm prints a zone-file record: name IN TXT ( "part" "part" ... ) ;
        return "".join(re.findall(r'"([^"]*)"', text))

    # --- configuration -------------------------------------------------------------------------

    def write_config(self) -> None:
        ports = {
            "normal": self.normal_port,
            "controller": self.controller_port,
            "proxy": self.proxy_port,
            "dns": self.dns_port,
            "hs_cache": HS_CACHE_DIR,
            "dkim_dir": self.dkim_dir,
            "log_level": self.log_level,
            "normal_unix": ' bind_socket = "%s";' % self.normal_socket if self.normal_socket else "",
            "proxy_upstream": (
                'upstream "local" { default = yes; self_scan = yes; }' if self.proxy_self_scan
                else 'upstream "normal" { default = yes; hosts = "%s"; }' % (self.normal_socket or self.address)
            ),
        }
        local_d = os.path.join(self.dir, "local.d")
        write_file(os.path.join(self.dir, "rspamd.conf"), _TOP_CONF % ports)
        write_file(os.path.join(local_d, "options.inc"), _OPTIONS_INC % ports)
        for module in DISABLED_MODULES:
            write_file(os.path.join(local_d, module + ".conf"), "enabled = false;\n")
        write_file(os.path.join(local_d, "actions.conf"), "rewrite_subject = 8;\n")
        write_file(os.path.join(local_d, "milter_headers.conf"), _MILTER_HEADERS)
        write_file(os.path.join(local_d, "dkim_signing.conf"), _DKIM_SIGNING % ports)
        for name, text in self.extra_local_d.items():
            write_file(os.path.join(local_d, name), text)
        lua = [HARNESS_LUA] + [
            "-- extra rules: %s\n%s\n" % (name, text) for name, text in sorted(self.extra_lua.items())
        ]
        write_file(os.path.join(self.dir, "rspamd.local.lua"), "\n".join(lua))
        if not os.path.exists(self.dkim_key_path):
            result = run(
                [find_program("rspamadm"), "dkim_keygen", "-d", "example.com", "-s", "test",
                 "-b", "1024", "-k", self.dkim_key_path],
                timeout=60,
            )
            if result.returncode != 0:
                raise ServiceUnavailable("rspamadm dkim_keygen failed:\n" + result.stdout.decode())
            with open(self.dkim_txt_path, "wb") as f:
                f.write(result.stdout)

    # --- life cycle ----------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> "Rspamd":
        """Start and wait for /ping on the worker and the proxy's port (first start: ~15 s)."""
        if self.process is not None and self.process.running():
            return self
        os.makedirs(HS_CACHE_DIR, exist_ok=True)
        self.write_config()
        argv = [find_program("rspamd"), "-f"]
        if os.geteuid() == 0:
            argv += ["-u", "root", "-g", "root"]  # rspamd refuses to run workers as root otherwise
        argv += [
            "-c", os.path.join(self.dir, "rspamd.conf"),
            "--var=LOCAL_CONFDIR=" + self.dir,
            "--var=DBDIR=" + os.path.join(self.dir, "db"),
            "--var=RUNDIR=" + os.path.join(self.dir, "run"),
            "--var=LOGDIR=" + os.path.join(self.dir, "log"),
        ]
        self.process = ManagedProcess(argv, os.path.join(self.dir, "stdout.log"))
        wait_until(self._answers, timeout, "rspamd on %s" % self.address, self.diagnostics,
                   interval=0.1)
        return self

    def _answers(self) -> bool:
        if self.process is not None and not self.process.running():
            raise ServiceUnavailable("rspamd exited during start-up\n" + self.diagnostics())
        return self.ping() and tcp_accepts(self.host, self.proxy_port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10.0)
            self.process = None

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def diagnostics(self) -> str:
        parts = [self.process.diagnostics()] if self.process is not None else []
        parts.append(tail(self.log_path))
        return "\n".join(p for p in parts if p)

    # --- HTTP ----------------------------------------------------------------------------------

    def ping(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/ping", timeout=2) as response:
                return b"pong" in response.read()
        except (OSError, urllib.error.URLError):
            return False

    def checkv2(
        self,
        message: bytes,
        headers: Union[None, Mapping[str, str], Sequence[Tuple[str, str]]] = None,
        timeout: float = 30.0,
    ) -> Dict[str, Any]:
        """POST /checkv2 with request headers (``IP``, ``From``, ``Rcpt``, ``User`` ...); the JSON.

        ``headers`` may be a list of pairs to repeat a header (one ``Rcpt`` per recipient).
        """
        request = urllib.request.Request(self.url + "/checkv2", data=message, method="POST")
        pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
        for name, value in pairs:
            request.add_header(name, value)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            result: Dict[str, Any] = json.loads(response.read())
            return result


_shared_lock = threading.Lock()
_shared: Optional[Rspamd] = None
_registered_lua: Dict[str, str] = {}
_shared_failure: Optional[str] = None


def register_lua(name: str, source: str) -> None:
    """Add Lua rules (by name; the same name again replaces) to the shared Rspamd.

    Call at import time of a test module (or before ``shared_rspamd()``); a shared instance
    already running without these rules is restarted on the next ``shared_rspamd()`` call.
    """
    with _shared_lock:
        _registered_lua[name] = source


def shared_rspamd() -> Rspamd:
    """The Rspamd of this test process (started on first use, stopped at exit).

    A failed start is remembered: later tests fail at once with the same message instead of
    waiting for the start-up timeout again.
    """
    global _shared, _shared_failure
    with _shared_lock:
        if _shared_failure is not None:
            raise ServiceUnavailable("(an earlier start failed) " + _shared_failure)
        if _shared is not None and (_shared.extra_lua != _registered_lua or not _shared.running()):
            _shared.stop()
            _shared = None
        if _shared is None:
            instance = Rspamd(extra_lua=_registered_lua)
            at_exit(instance.stop)
            try:
                instance.start()
            except ServiceUnavailable as e:
                _shared_failure = str(e)
                instance.stop()
                raise
            _shared = instance
        return _shared
