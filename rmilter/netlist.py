"""IP network lists and recipient lists with fast membership (SPEC §4.4, §5.12).

Both are immutable values built once when the configuration is loaded; host
names are resolved by the config loader, never here and never per message.
"""
from __future__ import annotations

import ipaddress
from typing import Dict, FrozenSet, Iterable, Optional, Tuple, Union

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class NetList:
    """A set of IPv4/IPv6 networks.

    Membership masks the client address once per distinct prefix length in the
    list and looks the result up in a set, so a lookup costs a handful of integer
    operations whatever the list size.  IPv4 entries never match IPv6 clients
    (SPEC §4.4: no v4-mapped handling).
    """

    __slots__ = ("networks", "_v4", "_v6")

    def __init__(self, networks: Iterable[IPNetwork] = ()) -> None:
        nets = tuple(dict.fromkeys(networks))
        self.networks: Tuple[IPNetwork, ...] = nets
        self._v4: Tuple[Tuple[int, FrozenSet[int]], ...] = self._index(nets, 4)
        self._v6: Tuple[Tuple[int, FrozenSet[int]], ...] = self._index(nets, 6)

    @staticmethod
    def _index(nets: Tuple[IPNetwork, ...], version: int) -> Tuple[Tuple[int, FrozenSet[int]], ...]:
        by_mask: Dict[int, set] = {}
        for net in nets:
            if net.version == version:
                by_mask.setdefault(int(net.netmask), set()).add(int(net.network_address))
        # longest masks first: most specific entries are usually the common hits
        return tuple(sorted(((m, frozenset(s)) for m, s in by_mask.items()), reverse=True))

    def __contains__(self, address: object) -> bool:
        if address is None:
            return False
        if isinstance(address, str):
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return False
        elif isinstance(address, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            ip = address
        else:
            return False
        value = int(ip)
        for mask, nets in self._v4 if ip.version == 4 else self._v6:
            if value & mask in nets:
                return True
        return False

    def __len__(self) -> int:
        return len(self.networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __iter__(self):
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

    def __iter__(self):
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
