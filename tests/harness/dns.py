"""A DNS responder on loopback for the real Rspamd: DKIM keys and SPF records the tests choose.

The harness Rspamd sends every lookup to ``rspamd.dns_port``; the shared one leaves nothing
there (every lookup fails at once).  ``dns_rspamd()`` gives a second Rspamd whose port is
answered by a ``DnsResponder``: TXT records from its ``records`` mapping (name -> list of
strings), NXDOMAIN for every name it does not know, an empty answer for other types of a
known name.  The responder is a thread with a blocking UDP socket (the reactor of a
``SynchronousTestCase`` is not running) and uses twisted.names' message encoding.  Rspamd's
SPF and DKIM modules are on in that instance, so a test can see ``R_SPF_ALLOW`` and
``R_DKIM_ALLOW`` for records it publishes.
"""
from __future__ import annotations

import socket
import threading
from typing import Dict, List, Optional, Tuple

from twisted.names import dns

from tests.harness.base import ServiceUnavailable, at_exit
from tests.harness.rspamd import Rspamd

#: TXT character-strings hold at most 255 bytes (RFC 1035 §3.3); longer records are split
TXT_STRING = 255


def txt_strings(value: bytes) -> List[bytes]:
    """A record value as the character-strings a zone file would give (``"..." "..."``)."""
    return [value[i : i + TXT_STRING] for i in range(0, len(value), TXT_STRING)] or [b""]


class DnsResponder:
    """Answers UDP queries on 127.0.0.1:``port`` from ``records`` (lowercase names, no final dot)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.records: Dict[bytes, List[bytes]] = {}
        self.queries: List[Tuple[bytes, int]] = []
        self._lock = threading.Lock()
        self._socket: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    def publish(self, name: str, *values: bytes) -> None:
        """Set the TXT records of ``name`` (replacing what an earlier test published there)."""
        with self._lock:
            self.records[name.lower().rstrip(".").encode("ascii")] = list(values)

    def clear(self) -> None:
        with self._lock:
            self.records.clear()
            self.queries.clear()

    def start(self) -> "DnsResponder":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind(("127.0.0.1", self.port))
        except OSError as e:
            sock.close()
            raise ServiceUnavailable("DNS responder cannot bind 127.0.0.1:%d: %s" % (self.port, e))
        sock.settimeout(0.2)
        self._socket = sock
        self._thread = threading.Thread(target=self._serve, name="dns-responder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._thread is not None:
            self._thread.join(5)
        if self._socket is not None:
            self._socket.close()
        self._thread = self._socket = None

    def _serve(self) -> None:
        assert self._socket is not None
        while not self._stopping:
            try:
                data, peer = self._socket.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            answer = self.answer(data)
            if answer is not None:
                self._socket.sendto(answer, peer)

    def answer(self, data: bytes) -> Optional[bytes]:
        """The reply to one query packet (None for a packet that is not a query)."""
        query = dns.Message()
        try:
            query.fromStr(data)
        except Exception:  # not DNS: no answer, as a real server would drop it
            return None
        if query.answer or not query.queries:
            return None
        question = query.queries[0]
        name = question.name.name.lower().rstrip(b".")
        with self._lock:
            self.queries.append((name, question.type))
            values = list(self.records.get(name, ()))
            known = name in self.records
        reply = dns.Message(id=query.id, answer=1, opCode=query.opCode, recDes=query.recDes, recAv=1, auth=1,
                            rCode=dns.OK if known else dns.ENAME)
        reply.queries = [question]
        if question.type in (dns.TXT, dns.ALL_RECORDS):
            for value in values:
                reply.answers.append(dns.RRHeader(name=question.name.name, type=dns.TXT, cls=dns.IN, ttl=5,
                                                  payload=dns.Record_TXT(*txt_strings(value), ttl=5)))
        return reply.toStr()


#: local.d files of the DNS-backed Rspamd: SPF on, and its results not cached in Redis
_LOCAL_D = {
    "spf.conf": "enabled = true;\n",
    "dkim.conf": "check_local = true;\ncheck_authed = true;\n",
}

_lock = threading.Lock()
_shared: Optional[Tuple[Rspamd, DnsResponder]] = None


def dns_rspamd() -> Tuple[Rspamd, DnsResponder]:
    """The Rspamd of this test process that resolves through a ``DnsResponder`` (started once).

    Tests publish what they need (``dns.publish(name, value)`` replaces the records of a name).
    """
    global _shared
    with _lock:
        if _shared is not None and _shared[0].running():
            return _shared
        rspamd = Rspamd(extra_local_d=_LOCAL_D)
        responder = DnsResponder(rspamd.dns_port).start()
        at_exit(rspamd.stop)
        at_exit(responder.stop)
        rspamd.start()
        _shared = (rspamd, responder)
        return _shared
