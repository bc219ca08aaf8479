"""Listening sockets the service opens: the ``adopted-fd:N`` endpoint type behind ``bind_socket = fd:N``,
and the unix sockets rmilter creates itself (owner, group, mode; never another process's socket).

``rmilter.config.endpoints`` maps ``bind_socket`` specs onto Twisted endpoint descriptions (pure
data); this module is the service side of one of them, registered with Twisted by
``twisted/plugins/rmilter_endpoints.py`` so that ``strports`` can build it.
"""
from __future__ import annotations

import os
import re
import socket
import stat
from typing import Any, Optional, Tuple

from twisted.internet import defer, endpoints, tcp, unix
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IStreamServerEndpoint, IStreamServerEndpointStringParser
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

        port.connectionLost = connectionLost  # type: ignore[method-assign]
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


# --- unix sockets rmilter creates: owner/group/mode, takeover guard, own-inode removal -------------


class ListenError(Exception):
    """A unix listener cannot be opened; the message is one line for the administrator."""


def clear_stale_socket(path: str) -> None:
    """Remove a socket file nothing answers on; refuse a live socket or anything else (issue 18.8).

    A second instance started with the same ``bind_socket`` must not unlink the first one's
    live socket (which keeps running unreachable): a connect test tells a stale file from a
    socket somebody is accepting on.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError("%s exists and is not a socket; refusing to replace it" % (path,))
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # stale: nobody listens
    except FileNotFoundError:
        return
    except socket.timeout:
        raise ListenError("%s: a process holds this socket and does not answer (another rmilter?); "
                          "not replacing it" % (path,)) from None
    except OSError as e:
        raise ListenError("cannot test socket %s: %s" % (path, e.strerror or e)) from None
    else:
        raise ListenError("%s: another process is accepting connections on this socket (a second "
                          "rmilter?); stop it or choose another bind_socket" % (path,))
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ListenError("cannot remove stale socket %s: %s" % (path, e.strerror)) from None


class OwnedUnixPort(unix.Port):
    """A unix listening port that, on close, removes its socket file only if it is still its own.

    Twisted unlinks the path unconditionally; if another process has since put its own socket
    there, that would cut the other process off (issue 18.8).
    """

    #: (st_dev, st_ino) of the socket file this port created
    identity: Optional[Tuple[int, int]] = None

    def connectionLost(self, reason: Any) -> None:
        if self.identity is not None and _identity(self._bindPath) == self.identity:
            try:
                os.unlink(self._bindPath)
            except OSError:
                pass  # e.g. the directory is not writable after dropping root: the file stays
        if self.lockFile is not None:
            self.lockFile.unlock()
        tcp.Port.connectionLost(self, reason)


def _identity(path: Any) -> Optional[Tuple[int, int]]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@implementer(IStreamServerEndpoint)
class OwnedUnixEndpoint:
    """Listen on a unix socket with the owner, group and mode of ``bind_socket_*`` (issue 13).

    ``uid``/``gid`` of -1 leave that part as created (the process's own).  The socket is
    chowned and chmodded after ``bind`` and before the first connection is accepted.
    """

    def __init__(self, reactor: Any, path: str, mode: int, uid: int = -1, gid: int = -1,
                 backlog: int = 50) -> None:
        self.reactor = reactor
        self.path = path
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.backlog = backlog

    def listen(self, factory: Any) -> "defer.Deferred[OwnedUnixPort]":
        return defer.execute(self._listen, factory)

    def _listen(self, factory: Any) -> OwnedUnixPort:
        clear_stale_socket(self.path)
        port = OwnedUnixPort(self.path, factory, self.backlog, self.mode, self.reactor)  # type: ignore[arg-type]
        try:
            port.startListening()
        except CannotListenError as e:
            reason = e.socketError
            text = getattr(reason, "strerror", None) or str(reason)
            raise ListenError("cannot create socket %s: %s" % (self.path, text)) from None
        try:
            if self.uid != -1 or self.gid != -1:
                os.chown(self.path, self.uid, self.gid)
            os.chmod(self.path, self.mode)
        except OSError as e:
            port.stopListening()
            raise ListenError("cannot give socket %s owner %s, group %s, mode %04o: %s" % (
                self.path, _id_text(self.uid), _id_text(self.gid), self.mode, e.strerror)) from None
        port.identity = _identity(self.path)
        return port


def _id_text(number: int) -> str:
    return "(unchanged)" if number == -1 else str(number)
