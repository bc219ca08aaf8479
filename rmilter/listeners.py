"""Listening sockets the service opens: the ``adopted-fd:N`` endpoint type behind ``bind_socket = fd:N``.

``rmilter.config.endpoints`` maps ``bind_socket`` specs onto Twisted endpoint descriptions (pure
data); this module is the service side of one of them, registered with Twisted by
``twisted/plugins/rmilter_endpoints.py`` so that ``strports`` can build it.
"""
from __future__ import annotations

import re
import socket
from typing import Any

from twisted.internet import endpoints
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
        return endpoints.AdoptedStreamServerEndpoint(reactor, fileno, family)


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
