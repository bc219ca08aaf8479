"""Listening sockets: rmilter ``bind_socket`` specs as Twisted endpoint descriptions (SPEC §4.4, §8.3).

=============================  ==============================================
``bind_socket``                Twisted server endpoint description
=============================  ==============================================
``unix:/p``, ``local:/p``,     ``unix:/p:mode=660:lockfile=0`` (B25: 0660
``/p``                         instead of C's world-writable socket)
``inet:PORT@HOST``             ``tcp:PORT:interface=HOST`` (``[a.b.c.d]``
                               loses its brackets)
``inet:PORT``                  ``tcp:PORT:interface=0.0.0.0`` (all IPv4)
``inet6:PORT@[v6]``/``@HOST``  ``tcp6:PORT:interface=v6`` (colons escaped)
``inet6:PORT``                 ``tcp6:PORT:interface=\\:\\:``
``fd:N``                       ``adopted-fd:N``
=============================  ==============================================

``fd:N`` maps to the ``adopted-fd`` endpoint type (``rmilter.listeners``, registered by
``twisted/plugins/rmilter_endpoints.py``), not to Twisted's
``systemd:domain=...:index=...``: the systemd form needs the address family
written in the description, which ``fd:N`` does not carry and which differs
between a ``ListenStream=/run/rmilter.sock`` and a ``ListenStream=127.0.0.1:11332``
unit, and it only works when ``LISTEN_PID`` names this process.  The adopted
form takes the absolute descriptor number (systemd passes its sockets from 3
on, so the first is ``fd:3``), asks the kernel for the socket's family when
the listener starts, and works under any supervisor that passes a listening
socket (systemd, s6, einhorn).

Twisted endpoint strings (``tcp:...``, ``tcp6:...``, ``unix:/p:mode=660``,
``systemd:...``, any installed endpoint plugin) are returned unchanged, so
``--listen`` accepts both notations.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, List

from twisted.internet.interfaces import IStreamServerEndpointStringParser

from rmilter.config.values import ValueProblem

#: unix socket mode of SPEC B25
UNIX_SOCKET_MODE = "660"

#: the endpoint type ``fd:N`` maps to; the parser for it is ``rmilter.listeners.AdoptedFdParser``
ADOPTED_FD_PREFIX = "adopted-fd"

_PORT = re.compile(r"[0-9]{1,5}\Z")
_HOST = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?\Z")
_TWISTED_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9+._-]*):")


def _escape(text: str) -> str:
    """Twisted endpoint descriptions split on ':' and '='; a backslash escapes them."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _port(text: str, spec: str) -> str:
    if not _PORT.match(text) or not 0 < int(text) < 65536:
        raise ValueProblem("%r: %r is not a port number (1-65535)" % (spec, text))
    return str(int(text))


def _unix(path: str, spec: str) -> str:
    if not path.startswith("/") and not path.startswith("."):
        raise ValueProblem("%r: the unix socket path must be a file path" % spec)
    return "unix:%s:mode=%s:lockfile=0" % (_escape(path), UNIX_SOCKET_MODE)


def _inet(rest: str, spec: str, v6: bool) -> str:
    port_text, at, host = rest.partition("@")
    port = _port(port_text, spec)
    if not at:
        return "tcp6:%s:interface=%s" % (port, _escape("::")) if v6 else "tcp:%s:interface=0.0.0.0" % port
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueProblem("%r: empty host after '@'" % spec)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        if not _HOST.match(host):
            raise ValueProblem("%r: %r is not a host name or address" % (spec, host)) from None
        return "%s:%s:interface=%s" % ("tcp6" if v6 else "tcp", port, host)
    if ip.version == 6 and not v6:
        raise ValueProblem("%r: an IPv6 address needs inet6:" % spec)
    if ip.version == 4 and v6:
        raise ValueProblem("%r: an IPv4 address needs inet:" % spec)
    return "%s:%s:interface=%s" % ("tcp6" if v6 else "tcp", port, _escape(str(ip)))


def _is_twisted_unix(rest: str) -> bool:
    """``unix:/p:mode=660`` is a Twisted string: rmilter unix paths have no ':' or '='."""
    return "=" in rest or ":" in rest.replace("\\:", "")


def _check_twisted(spec: str) -> str:
    """Light validation of a Twisted description: a known type and, for TCP, a port."""
    m = _TWISTED_PREFIX.match(spec)
    if not m:
        raise ValueProblem(
            "%r is not a socket spec (unix:/path, inet:PORT@HOST, inet6:PORT@[::1], fd:N) "
            "or a Twisted endpoint description (tcp:PORT:interface=HOST, ...)" % spec
        )
    prefix = m.group(1)
    args, _kwargs = _parse_description(spec)
    if prefix in ("tcp", "tcp6", "ssl"):
        if not args:
            raise ValueProblem("%r: missing port" % spec)
        _port(args[0], spec)
    elif prefix == "unix":
        if not args or not args[0]:
            raise ValueProblem("%r: missing socket path" % spec)
    elif not _known_server_type(prefix):
        raise ValueProblem("%r: unknown endpoint type %r" % (spec, prefix))
    return spec


def _parse_description(spec: str) -> "tuple[List[str], dict]":
    """The positional and keyword arguments of a Twisted endpoint description.

    Twisted's own grammar: fields split on ``:``, ``name=value`` fields are keywords, a
    backslash escapes the next character.  The type prefix is dropped.
    """
    fields: List[str] = []
    current: List[str] = []
    escaped = False
    for char in spec:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise ValueProblem("%r is not a valid endpoint description: it ends with a backslash" % spec)
    fields.append("".join(current))
    args: List[str] = []
    kwargs: dict = {}
    for item in fields[1:]:
        name, equals, value = item.partition("=")
        if equals:
            kwargs[name] = value
        else:
            args.append(item)
    return args, kwargs


#: endpoint types known without asking Twisted's plugin system
_BUILT_IN_SERVER_TYPES = frozenset({"tcp", "tcp6", "unix", "ssl", "systemd", ADOPTED_FD_PREFIX})


def _known_server_type(prefix: str) -> bool:
    """Whether PREFIX names a server endpoint type; plugins are searched only for other names.

    The search imports every endpoint plugin, and with them Twisted's endpoints module and
    pyOpenSSL, before the configuration says whether TLS is needed (``rmilter.tls_stack``):
    a worker's ``--listen adopted-fd:N`` must not cost it 12 MB."""
    if prefix in _BUILT_IN_SERVER_TYPES:
        return True
    from twisted.plugin import getPlugins

    return any(parser.prefix == prefix for parser in getPlugins(IStreamServerEndpointStringParser))


def endpoint_description(spec: str) -> str:
    """Map one socket spec to a Twisted server endpoint description; ValueProblem if unparsable."""
    spec = spec.strip()
    if not spec:
        raise ValueProblem("empty socket spec")
    if spec.startswith("/"):
        return _unix(spec, spec)
    kind, colon, rest = spec.partition(":")
    if not colon:
        raise ValueProblem(
            "%r is not a socket spec (unix:/path, inet:PORT@HOST, inet6:PORT@[::1], fd:N)" % spec
        )
    if kind in ("unix", "local"):
        if kind == "unix" and _is_twisted_unix(rest):
            return _check_twisted(spec)
        return _unix(rest, spec)
    if kind == "inet":
        return _inet(rest, spec, v6=False)
    if kind == "inet6":
        return _inet(rest, spec, v6=True)
    if kind == "fd":
        if not re.match(r"[0-9]+\Z", rest):
            raise ValueProblem("%r: fd: takes a descriptor number" % spec)
        return "%s:%d" % (ADOPTED_FD_PREFIX, int(rest))
    return _check_twisted(spec)

