"""TLS (pyOpenSSL) in the process only when the configuration reaches a server over TLS (issue 19).

Twisted's TCP transport and its endpoints module import pyOpenSSL, and with it
cryptography's OpenSSL binding, as soon as the reactor is imported: 12 MB of a 53 MB idle
process that, with no ``https://`` Rspamd server, never opens a TLS connection.  Those
imports are optional in Twisted (an ``ImportError`` leaves TLS out), so ``twistd rmilter``
reads its configuration first and imports the reactor with pyOpenSSL held back when nothing
in it needs TLS.  The price: TLS cannot be added later in that process, so a reload that
brings the first ``https://`` server is refused with a message saying to restart
(``reload_problem``).  Anything that imported the reactor before (``twistd --reactor``, a
``.tac`` file, the tests) keeps TLS as usual.

Twisted's HTTP client (treq, ``twisted.web.client``) imports pyOpenSSL too, whatever the
URL: with plain ``http://`` Rspamd servers it is imported in the same window (the idle
floor with one such server: 54.5 -> 43.3 MB); its ``https://`` methods then raise, which no
server of that configuration asks for.  txredisapi cannot be imported without pyOpenSSL:
with Redis configured it is loaded after all.
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, List, Optional

#: what the reactor and the endpoints module pull in; imported here with pyOpenSSL held back
_TLS_USERS = ("twisted.internet.reactor", "twisted.internet.endpoints")
#: the HTTP client of the Rspamd transport, which imports pyOpenSSL as well
_HTTP_CLIENT = ("twisted.web.client", "treq.client")


def needs_tls(config: Any) -> bool:
    """True when any Rspamd server is ``https://`` (the only TLS client rmilter has)."""
    spamd = config.spamd
    return any(server.tls for server in (*spamd.servers, *spamd.also_check))


def uses_http(config: Any) -> bool:
    """True when the configuration scans on Rspamd (the HTTP client is needed)."""
    spamd = config.spamd
    return bool(spamd.servers or spamd.also_check)


def load_reactor(with_tls: bool, with_http: bool = False) -> bool:
    """Import the reactor (and the endpoints module); returns whether TLS is available.

    Without ``with_tls``, pyOpenSSL is hidden from the imports that would load it, and only
    if nothing has loaded the reactor, the endpoints or pyOpenSSL already.  ``with_http``
    imports the HTTP client in that window too.
    """
    names = _TLS_USERS + (_HTTP_CLIENT if with_http else ())
    if with_tls or any(name in sys.modules for name in _TLS_USERS + ("OpenSSL",)):
        for name in names:
            importlib.import_module(name)
        return tls_available()
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]  # "import OpenSSL" raises ImportError
    try:
        for name in names:
            importlib.import_module(name)
    finally:
        del sys.modules["OpenSSL"]
    return tls_available()


def tls_available() -> bool:
    """Whether TLS client endpoints work in this process (``wrapClientTLS``)."""
    from twisted.internet import endpoints

    return getattr(endpoints, "TLSMemoryBIOFactory", None) is not None


def reload_problem(config: Any) -> Optional[List[str]]:
    """The refusal of a configuration this process cannot run (TLS started without), or None."""
    if not needs_tls(config) or tls_available():
        return None
    directive = "spamd.servers" if any(server.tls for server in config.spamd.servers) else "spamd.also_check"
    origin = config.origins.get(directive)
    where = "%s:%d: " % (origin.file, origin.line) if origin is not None else ""
    return ["%sspamd servers over https:// need TLS, which this rmilter process started without "
            "(no https:// server was configured at start); restart rmilter to use them" % (where,)]
