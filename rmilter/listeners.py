"""Listening sockets the service opens: the ``adopted-fd:N`` endpoint type behind ``bind_socket = fd:N``.

``rmilter.config.endpoints`` maps ``bind_socket`` specs onto Twisted endpoint descriptions (pure
data); this module is the service side of one of them, registered with Twisted by
``twisted/plugins/rmilter_endpoints.py`` so that ``strports`` can build it.
"""
from __future__ import annotations

import re
import socket
from typing import Any

from twisted.internet import endpoints, tcp, unix
from twisted.internet.interfaces import IStreamServerEndpointStringParser
from twisted.plugin import IPlugin
from zope.interface import implementer  # type: ignore[import-untyped]

from rmilter.config.endpoints import ADOPTED_FD_PREFIX


@implementer(IPlugin, IStreamServerEndpointStringParser)
class AdoptedFdParser:
    """``adopted-fd:N``: listen on inherited listening socket N, whatever its family.

    The family is read from the descriptor when the description is parsed
    (service start), so the same description serves unix and TCP sockets.
    """

    prefix = ADOPTED_FD_PREFIX

    def parseStreamServer(self, reactor: Any, *args: str, **kwargs: str) -> Any:
        if len(args) != 1 or kwargs or not re.match(r"[0-9]+\Z", args[0]):
            raise ValueError("adopted-fd takes one descriptor number, e.g. adopted-fd:3")
        fileno = int(args[0])
        family = socket_family(fileno)
        return InheritedStreamServerEndpoint(reactor, fileno, family)


class InheritedStreamServerEndpoint(endpoints.AdoptedStreamServerEndpoint):
    """An adopted listening socket that stays as its owner made it when this process stops.

    Twisted's ports, adopted or not, ``shutdown()`` the listening socket when they stop
    listening (which stops it in every process sharing it) and a unix port also unlinks its
    path; but an inherited socket belongs to whoever created it (systemd's ``rmilter.socket``,
    or the main process with ``workers = N``), and the other workers go on accepting on it.
    So this process only closes its own descriptor.  The private pieces used (``_closeSocket``,
    the unix port's ``connectionLost``) are wrapped here only; tests/test_workers.py fails
    when they change.
    """

    def listen(self, factory: Any) -> Any:
        return super().listen(factory).addCallback(_close_own_descriptor_only)


def _close_own_descriptor_only(port: Any) -> Any:
    close = port._closeSocket
    port._closeSocket = lambda orderly: close(False)  # close(), never shutdown()
    if isinstance(port, unix.Port):
        def connectionLost(reason: Any) -> None:  # unix.Port's, without the unlink
            if port.lockFile is not None:
                port.lockFile.unlock()
            tcp.Port.connectionLost(port, reason)

        port.connectionLost = connectionLost
    return port


def socket_family(fileno: int) -> int:
    """The address family of an open stream socket descriptor (without closing it)."""
    try:
        sock = socket.socket(fileno=fileno)
    except OSError as e:
        raise ValueError("descriptor %d is not an open socket: %s" % (fileno, e.strerror)) from None
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError("descriptor %d is not a stream socket" % fileno)
        return int(sock.family)
    finally:
        sock.detach()


adoptedFdParser = AdoptedFdParser()
