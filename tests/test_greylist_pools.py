"""Greylisting by netblock (ipv4_mask / ipv6_mask) and by SPF-authorised sender domain (issue 17).

The C-compatible records of SPEC §9 stay the default; a mask or the SPF mode changes the
envelope key only when configured.  In-memory Redis and a Clock.
"""
from __future__ import annotations

import ipaddress
from typing import Any, Optional

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rmilter import config as rconfig
from rmilter.checks import greylist
from rmilter.checks.greylist import (
    TYPE_ENVELOPE,
    TYPE_SPF_ENVELOPE,
    address_block,
    digest,
    envelope_data,
    record_key,
    spf_envelope_data,
)
from rmilter.config.schema import GreylistingConfig
from rmilter.testing.fake_redis import FakeRedisRoles
from rmilter.verdict import Action, CheckResult
from tests.redis_support import NOW, make_config, make_deps, make_message
from tests.test_greylist import ENVELOPE_KEY

ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: ipaddress.IPv6Address(n).compressed)


class AddressBlockTests(SynchronousTestCase):
    """What goes into the envelope hash for a client address."""

    def test_defaults_are_the_c_blocks(self) -> None:
        """Unset ipv4_mask and ipv6_mask 64 give SPEC §9's blocks and key."""
        self.assertEqual(address_block("203.0.113.200", None, 64).hex(), "cb000100" + "0" * 24)
        self.assertEqual(address_block("2001:db8::25", None, 64).hex(), "20010db800000000" + "0" * 16)
        data = envelope_data("sender@example.net", "192.0.2.10", ["<rcpt@example.org>"], None, 64)
        self.assertEqual(record_key("grey", digest(data)), ENVELOPE_KEY)

    def test_ipv4_masks(self) -> None:
        """ipv4_mask N keeps the first N bits, then 12 zero bytes; 32 is the whole address."""
        self.assertEqual(address_block("203.0.113.200", 24).hex(), "cb007100" + "0" * 24)
        self.assertEqual(address_block("203.0.113.200", 32).hex(), "cb0071c8" + "0" * 24)
        self.assertEqual(address_block("203.0.113.200", 19).hex(), "cb006000" + "0" * 24)
        self.assertEqual(address_block("203.0.113.200", 0), bytes(16))
        # a real /24: neighbours share it, the next /24 does not
        self.assertEqual(address_block("198.51.100.7", 24), address_block("198.51.100.250", 24))
        self.assertNotEqual(address_block("198.51.100.7", 24), address_block("198.51.101.7", 24))
        # C's block joins addresses a /24 keeps apart and vice versa
        self.assertEqual(address_block("203.0.9.1"), address_block("203.0.113.200"))
        self.assertNotEqual(address_block("203.0.9.1", 24), address_block("203.0.113.200", 24))

    def test_ipv6_masks(self) -> None:
        """ipv6_mask N keeps the first N bits of the 16 bytes."""
        self.assertEqual(address_block("2001:db8:1:2:3:4:5:6", ipv6_mask=48).hex(), "20010db80001" + "0" * 20)
        self.assertEqual(address_block("2001:db8:1:2:3:4:5:6", ipv6_mask=128).hex(),
                         "20010db8000100020003000400050006")
        self.assertEqual(address_block("2001:db8:1:2:3:4:5:6", ipv6_mask=56).hex(), "20010db800010000" + "0" * 16)

    @given(ipv4, st.integers(0, 32))
    def test_ipv4_mask_is_the_network(self, address: str, bits: int) -> None:
        """For any address and length, the block is the network address of that prefix."""
        network = ipaddress.ip_network("%s/%d" % (address, bits), strict=False)
        self.assertEqual(address_block(address, bits), network.network_address.packed + bytes(12))

    @given(ipv6, st.integers(0, 128))
    def test_ipv6_mask_is_the_network(self, address: str, bits: int) -> None:
        network = ipaddress.ip_network("%s/%d" % (address, bits), strict=False)
        self.assertEqual(address_block(address, ipv6_mask=bits), network.network_address.packed)

    @given(ipv4, ipv6)
    def test_spf_records_never_meet_address_records(self, v4: str, v6: str) -> None:
        """The SPF-keyed data differs from the address-keyed data of the same sender and recipients."""
        spf = spf_envelope_data("a@example.net", "example.net", ["<b@example.org>"])
        for address, masks in ((v4, (None, 24, 32)), (v6, (48, 64, 128))):
            for mask in masks:
                if ":" in address:
                    data = envelope_data("a@example.net", address, ["<b@example.org>"], ipv6_mask=mask or 64)
                else:
                    data = envelope_data("a@example.net", address, ["<b@example.org>"], ipv4_mask=mask)
                self.assertNotEqual(data, spf)


class MaskConfigTests(SynchronousTestCase):
    """The directives, as rmilter.conf spells them."""

    def test_parsed_and_defaults(self) -> None:
        default = rconfig.parse_text("").greylisting
        self.assertEqual((default.ipv4_mask, default.ipv6_mask, default.key_on_spf_domain), (None, 64, False))
        config = rconfig.parse_text("greylisting { ipv4_mask = 24; ipv6_mask = 48; key_on_spf_domain = yes; };\n")
        g = config.greylisting
        self.assertEqual((g.ipv4_mask, g.ipv6_mask, g.key_on_spf_domain), (24, 48, True))
        listing = rconfig.format_effective(config)
        self.assertIn("greylisting.ipv4_mask = 24  # ", listing)
        self.assertIn("greylisting.ipv6_mask = 48  # ", listing)
        self.assertIn("greylisting.ipv4_mask = (unset)", rconfig.format_effective(rconfig.parse_text("")))
        self.assertEqual(rconfig.parse_text(rconfig.format_config(config)).greylisting, g)

    def test_out_of_range_refused_with_line(self) -> None:
        for text, reason in (("ipv4_mask = 33;", "greylisting.ipv4_mask: 33 is not a prefix length of 32 bits"),
                             ("ipv6_mask = 129;", "greylisting.ipv6_mask: 129 is not a prefix length of 128 bits"),
                             ("ipv4_mask = /24;", "greylisting.ipv4_mask: '/24' is not a whole number")):
            with self.assertRaises(rconfig.ConfigError) as caught:
                rconfig.parse_text("greylisting {\n  %s\n};\n" % text)
            self.assertIn(":2: " + reason, "\n".join(caught.exception.errors))


class PoolGreylistingTests(SynchronousTestCase):
    """The check keys the triplet on the configured netblock or the SPF-authorised domain."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.roles = FakeRedisRoles(self.clock)

    def deps(self, **greylisting: Any) -> Any:
        config = make_config(greylisting=GreylistingConfig(timeout=300, **greylisting))
        return make_deps(config, self.clock, self.roles)

    def attempt(self, deps: Any, ip: str, spf: bool = False, data_hash: bool = False,
                sender: str = "bounce@mail.example.net", body: Optional[bytes] = None) -> CheckResult:
        msg = make_message(sender=sender, ip=ip, body=body if data_hash else None)
        result: CheckResult = self.successResultOf(
            greylist.check(msg, deps, data_hash=data_hash, sender_spf_pass=spf))
        return result

    def passed(self, result: CheckResult) -> bool:
        if result.verdict is None:
            return True
        self.assertEqual(result.verdict.action, Action.TEMPFAIL)
        return False

    def test_ipv4_mask_24_passes_a_neighbour_defers_another_24(self) -> None:
        """ipv4_mask = 24: after timeout, a retry from the same /24 passes; one from the next /24 is new."""
        deps = self.deps(ipv4_mask=24)
        self.assertFalse(self.passed(self.attempt(deps, "198.51.100.7")))
        self.clock.advance(301)
        self.assertTrue(self.passed(self.attempt(deps, "198.51.100.200")))
        self.assertFalse(self.passed(self.attempt(deps, "198.51.101.7")))

    def test_default_mask_defers_a_neighbour_c_block_apart(self) -> None:
        """Unset ipv4_mask (C's block): 198.51.100.7 and 198.51.101.7 differ in the low bits of octet 3."""
        deps = self.deps()
        self.assertFalse(self.passed(self.attempt(deps, "198.51.100.7")))
        self.clock.advance(301)
        self.assertTrue(self.passed(self.attempt(deps, "198.51.100.200")))
        self.assertFalse(self.passed(self.attempt(deps, "198.51.101.7")))
        # and joins 198.51.108.x, which a /24 would not
        self.assertTrue(self.passed(self.attempt(deps, "198.51.108.9")))

    def test_ipv6_mask_48(self) -> None:
        deps = self.deps(ipv6_mask=48)
        self.assertFalse(self.passed(self.attempt(deps, "2001:db8:5:1::25")))
        self.clock.advance(301)
        self.assertTrue(self.passed(self.attempt(deps, "2001:db8:5:ff00::1")))
        self.assertFalse(self.passed(self.attempt(deps, "2001:db8:6::25")))

    def test_spf_pass_keys_on_the_sender_domain(self) -> None:
        """key_on_spf_domain and SPF pass: a retry from an unrelated address passes; the note says so."""
        deps = self.deps(key_on_spf_domain=True)
        first = self.attempt(deps, "192.0.2.10", spf=True)
        self.assertFalse(self.passed(first))
        self.assertIn("type: " + TYPE_SPF_ENVELOPE, first.summary)
        key = record_key("grey", digest(spf_envelope_data("bounce@mail.example.net", "mail.example.net",
                                                          ["<rcpt@example.org>"])))
        self.assertEqual(self.roles.server.keys(), [key])
        self.clock.advance(301)
        retry = self.attempt(deps, "203.0.113.99", spf=True)
        self.assertTrue(self.passed(retry))
        self.assertIn("type: " + TYPE_SPF_ENVELOPE, retry.summary)

    def test_without_spf_pass_the_address_counts(self) -> None:
        """key_on_spf_domain, but no SPF pass (or the option off): the address block keys the triplet."""
        deps = self.deps(key_on_spf_domain=True)
        self.assertFalse(self.passed(self.attempt(deps, "192.0.2.10", spf=False)))
        self.clock.advance(301)
        retry = self.attempt(deps, "203.0.113.99", spf=False)
        self.assertFalse(self.passed(retry))
        self.assertIn("type: " + TYPE_ENVELOPE, retry.summary)
        off = self.deps()
        self.assertFalse(self.passed(self.attempt(off, "192.0.2.77", spf=True, sender="x@example.com")))
        self.clock.advance(301)
        self.assertFalse(self.passed(self.attempt(off, "203.0.113.77", spf=True, sender="x@example.com")))

    def test_null_sender_keeps_the_address(self) -> None:
        """SPF pass for a null sender judges the HELO name, not a sender domain: the address counts."""
        deps = self.deps(key_on_spf_domain=True)
        result = self.attempt(deps, "192.0.2.10", spf=True, sender="")
        self.assertIn("type: " + TYPE_ENVELOPE, result.summary)

    def test_data_hash_still_first_at_eom(self) -> None:
        """At EOM the data hash decides a retry of the same body, whatever the keying."""
        deps = self.deps(key_on_spf_domain=True)
        body = b"Same body\r\n"
        self.assertFalse(self.passed(self.attempt(deps, "192.0.2.10", spf=True, data_hash=True, body=body)))
        self.clock.advance(301)
        retry = self.attempt(deps, "203.0.113.5", spf=False, data_hash=True, body=body)
        self.assertTrue(self.passed(retry))
        self.assertIn("type: data hash", retry.summary)
        # another body (a regenerated message) is decided by the SPF-keyed envelope
        other = self.attempt(deps, "203.0.113.5", spf=True, data_hash=True, body=b"Regenerated\r\n")
        self.assertTrue(self.passed(other))
        self.assertIn("type: " + TYPE_SPF_ENVELOPE, other.summary)
        unkeyed = self.attempt(deps, "203.0.113.5", spf=False, data_hash=True, body=b"Regenerated again\r\n")
        self.assertFalse(self.passed(unkeyed))


