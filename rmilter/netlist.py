"""IP network lists and recipient lists with fast membership (SPEC §4.4, §5.12).

Both are immutable values built once when the configuration is loaded; host
names are resolved by the config loader, never here and never per message.
"""
from __future__ import annotations

import ipaddress
import socket
from bisect import bisect_right
from typing import Dict, FrozenSet, Iterable, Iterator, List, Optional, Tuple, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def _address_value(address: object) -> Tuple[int, int]:
    """(version, integer) of a client address; (0, 0) when it is not an IP address.

    ``socket.inet_pton`` is several times faster than ``ipaddress.ip_address``
    and this runs for every message on every list check.
    """
    if isinstance(address, str):
        try:
            if ":" in address:
                return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, address.split("%", 1)[0]), "big")
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, address), "big")
        except OSError:
            return 0, 0
    if isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return address.version, int(address)
    return 0, 0


class NetList:
    """A set of IPv4/IPv6 networks.

    The networks of each family are merged into sorted, disjoint address
    ranges once, when the list is built; a lookup is one binary search, so it
    costs the same for 5 or 5,000 entries and whatever their prefix lengths.
    IPv4 entries never match IPv6 clients (SPEC §4.4: no v4-mapped handling).
    """

    __slots__ = ("networks", "_starts", "_ends")

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        nets = tuple(dict.fromkeys(networks))
        self.networks: Tuple[IPNetwork, ...] = nets
        self._starts: Dict[int, List[int]] = {}
        self._ends: Dict[int, List[int]] = {}
        for version in (4, 6):
            ranges = self._ranges(nets, version)
            self._starts[version] = [first for first, _ in ranges]
            self._ends[version] = [last for _, last in ranges]

    @staticmethod
    def _ranges(nets: Tuple[IPNetwork, ...], version: int) -> List[Tuple[int, int]]:
        """Sorted, merged [first, last] integer ranges of one address family."""
        spans = sorted(
            (int(net.network_address), int(net.broadcast_address)) for net in nets if net.version == version
        )
        merged: List[Tuple[int, int]] = []
        for first, last in spans:
            if merged and first <= merged[-1][1] + 1:
                if last > merged[-1][1]:
                    merged[-1] = (merged[-1][0], last)
            else:
                merged.append((first, last))
        return merged

    def __contains__(self, address: object) -> bool:
        version, value = _address_value(address)
        if not version:
            return False
        starts = self._starts[version]
        index = bisect_right(starts, value) - 1
        return index >= 0 and value <= self._ends[version][index]

    def __len__(self) -> int:
        return len(self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __iter__(self) -> Iterator[IPNetwork]:
        return iter(self.networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NetList) and set(self.networks) == set(other.networks)

    def __hash__(self) -> int:
        return hash(frozenset(self.networks))

    def __repr__(self) -> str:
        return "NetList([%s])" % ", ".join(str(n) for n in self.networks)


def _bare_address(address: str) -> str:
    """Drop one leading ``<``, cut at the first ``>``, lowercase (SPEC §5.12)."""
    if address.startswith("<"):
        address = address[1:]
    cut = address.find(">")
    if cut >= 0:
        address = address[:cut]
    return address.lower()


class RecipientList:
    """``user``, ``user@domain`` and ``@domain`` entries, matched case-insensitively (B9)."""

    __slots__ = ("entries", "_addresses", "_users", "_domains")

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.entries: Tuple[str, ...] = tuple(dict.fromkeys(entries))
        addresses, users, domains = set(), set(), set()
        for entry in self.entries:
            e = entry.lower()
            if e.startswith("@"):
                domains.add(e[1:])
            elif "@" in e:
                addresses.add(e)
            else:
                users.add(e)
        self._addresses: FrozenSet[str] = frozenset(addresses)
        self._users: FrozenSet[str] = frozenset(users)
        self._domains: FrozenSet[str] = frozenset(domains)

    def matches(self, recipient: str) -> bool:
        """True if the raw recipient (``<User@Example.org>``) matches an entry."""
        if not self.entries:
            return False
        addr = _bare_address(recipient)
        if addr in self._addresses:
            return True
        local, at, domain = addr.partition("@")
        if local in self._users:
            return True  # covers both "no @" (b) and local-part match (c)
        return bool(at) and domain in self._domains

    def __contains__(self, recipient: object) -> bool:
        return isinstance(recipient, str) and self.matches(recipient)

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecipientList) and set(self.entries) == set(other.entries)

    def __hash__(self) -> int:
        return hash(frozenset(self.entries))

    def __repr__(self) -> str:
        return "RecipientList(%r)" % (list(self.entries),)


def normalise_sender(value: Optional[str]) -> str:
    """SPEC §5.4: remove one leading ``<``, lowercase, remove a final ``>``; at most 324 bytes."""
    if not value:
        return ""
    if value.startswith("<"):
        value = value[1:]
    value = value.lower()
    if value.endswith(">"):
        value = value[:-1]
    return value[:324]
