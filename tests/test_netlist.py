"""IP lists, recipient lists and sender normalisation (SPEC §4.4, §5.4, §5.12)."""
from __future__ import annotations

import ipaddress
from typing import List

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rmilter.netlist import NetList, RecipientList, normalise_sender


def netlist(*texts: str) -> NetList:
    return NetList(ipaddress.ip_network(t, strict=False) for t in texts)


class NetListTests(SynchronousTestCase):
    def test_network_boundaries(self) -> None:
        """The first and last address of a network match; their neighbours do not."""
        nets = netlist("192.0.2.0/24", "2001:db8::/126")
        for inside in ("192.0.2.0", "192.0.2.255", "2001:db8::", "2001:db8::3"):
            self.assertIn(inside, nets)
        for outside in ("192.0.1.255", "192.0.3.0", "2001:db8::4", "2001:db7:ffff:ffff:ffff:ffff:ffff:ffff"):
            self.assertNotIn(outside, nets)

    def test_overlapping_and_adjacent_networks(self) -> None:
        """Nested, overlapping and adjacent entries behave like their union."""
        nets = netlist("10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8", "12.0.0.5")
        for address, expected in (("10.255.255.255", True), ("11.0.0.0", True), ("11.255.255.255", True),
                                  ("12.0.0.5", True), ("12.0.0.4", False), ("12.0.0.6", False), ("9.255.255.255", False)):
            self.assertEqual(address in nets, expected, address)

    def test_families_do_not_mix(self) -> None:
        """IPv4 entries never match IPv6 clients, v4-mapped included (SPEC §4.4)."""
        nets = netlist("0.0.0.0/0")
        self.assertIn("8.8.8.8", nets)
        self.assertNotIn("::ffff:8.8.8.8", nets)
        self.assertNotIn("::1", nets)
        self.assertIn("::1", netlist("::/0"))

    def test_not_addresses(self) -> None:
        """None, garbage and non-strings are simply not members."""
        nets = netlist("0.0.0.0/0", "::/0")
        for value in (None, "", "localhost", "300.1.1.1", "1.2.3", "unix:/x", 12, b"1.2.3.4"):
            self.assertNotIn(value, nets)

    def test_address_objects_and_scoped_ipv6(self) -> None:
        """ipaddress objects work; a zone index on a link-local client is ignored."""
        nets = netlist("fe80::/10", "192.0.2.1")
        self.assertIn(ipaddress.ip_address("192.0.2.1"), nets)
        self.assertIn("fe80::1%eth0", nets)

    def test_empty_list(self) -> None:
        """An empty list is falsy and matches nothing."""
        nets = NetList()
        self.assertFalse(nets)
        self.assertEqual(len(nets), 0)
        self.assertNotIn("127.0.0.1", nets)

    def test_value_semantics(self) -> None:
        """Equality and hash ignore order and duplicates; iteration gives the networks."""
        a, b = netlist("10.0.0.0/8", "::1"), netlist("::1", "10.0.0.0/8", "::1")
        self.assertEqual(a, b)
        self.assertEqual(hash(a), hash(b))
        self.assertEqual(len(b), 2)
        self.assertEqual([str(n) for n in a], ["10.0.0.0/8", "::1/128"])
        self.assertNotEqual(a, netlist("10.0.0.0/8"))
        self.assertIn("10.0.0.0/8", repr(a))

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)), max_size=30),
        st.lists(st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)), max_size=10),
        st.lists(st.one_of(st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
                           st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)), max_size=30),
    )
    def test_membership_equals_brute_force(self, v4: List, v6: List, probes: List) -> None:
        """Membership is exactly 'some network contains the address' (ranges merged correctly)."""
        networks = [ipaddress.IPv4Network(t, strict=False) for t in v4] + \
                   [ipaddress.IPv6Network(t, strict=False) for t in v6]
        nets = NetList(networks)
        probes = probes + [n.network_address for n in networks] + [n.broadcast_address for n in networks]
        for probe in probes:
            expected = any(probe.version == n.version and probe in n for n in networks)
            self.assertEqual(str(probe) in nets, expected, probe)


class RecipientListTests(SynchronousTestCase):
    def test_matching_rules(self) -> None:
        """SPEC §5.12 (a) user@domain exact, (b)/(c) user local part, (d) @domain."""
        rcpts = RecipientList(["postmaster", "boss@example.org", "@lists.example.net"])
        self.assertTrue(rcpts.matches("<boss@example.org>"))
        self.assertTrue(rcpts.matches("<postmaster@anywhere.test>"))
        self.assertTrue(rcpts.matches("postmaster"))
        self.assertTrue(rcpts.matches("<x@lists.example.net>"))
        self.assertFalse(rcpts.matches("<boss@example.net>"))
        self.assertFalse(rcpts.matches("<x@sub.lists.example.net>"))
        self.assertFalse(rcpts.matches("<postmaster+tag@example.org>"))

    def test_case_insensitive(self) -> None:
        """B9: entries written with capitals match too."""
        rcpts = RecipientList(["PostMaster", "Boss@Example.ORG"])
        self.assertTrue(rcpts.matches("<postmaster@x>"))
        self.assertTrue(rcpts.matches("<BOSS@example.org>"))
        self.assertIn("<boss@example.org>", rcpts)

    def test_brackets(self) -> None:
        """One leading '<' is dropped and the address is cut at the first '>'."""
        rcpts = RecipientList(["a@b.c"])
        self.assertTrue(rcpts.matches("<a@b.c> NOTIFY=NEVER"))
        self.assertFalse(RecipientList().matches("<a@b.c>"))


class NormaliseSenderTests(SynchronousTestCase):
    def test_normalise_sender(self) -> None:
        """SPEC §5.4: drop one leading '<', lowercase, drop a final '>', at most 324 bytes."""
        self.assertEqual(normalise_sender("<User@Example.NET>"), "user@example.net")
        self.assertEqual(normalise_sender("<>"), "")
        self.assertEqual(normalise_sender(None), "")
        self.assertEqual(len(normalise_sender("<" + "a" * 400 + ">")), 324)
