"""Ed25519, dual signatures and OpenDKIM tables end to end (issue 17).

Mail goes through a real Postfix (SASL AUTH) to rmilter, which signs; what smtp-sink received
is checked by two independent verifiers: dkimpy, and the real Rspamd's DKIM module
(``R_DKIM_ALLOW``) resolving the public keys through the harness DNS responder.  Keys are
made by the tools sites use: opendkim-genkey (RSA), ``openssl genpkey -algorithm ed25519``
(what OpenDKIM's opendkim-genkey --ed25519 runs) and dkimpy's dknewkey (Ed25519).
"""
from __future__ import annotations

import base64
import itertools
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import dkim as dkimpy  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from rmilter.dkim import keys
from tests import harness
from tests.dates import message_date
from tests.harness.base import find_program, run
from tests.harness.dns import dns_rspamd
from tests.test_dkim_integration import opendkim_genkey
from tests.test_dkim_opendkim import README_KEYTABLE, README_SIGNINGTABLE

MESSAGE = (
    "From: %(sender)s\r\nTo: Bob <bob@example.org>\r\nSubject: signed  twice\r\n"
    "Date: %(date)s\r\nMessage-ID: <%(msgid)s>\r\nMIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=us-ascii\r\n\r\nHi Bob,\r\n\r\nthe  numbers\tare attached.\r\n"
)

_unique = itertools.count(1)


def openssl_ed25519(path: str) -> bytes:
    """An Ed25519 key as OpenDKIM makes it; the DNS record of RFC 8463."""
    result = run([find_program("openssl"), "genpkey", "-algorithm", "ed25519", "-outform", "PEM", "-out", path],
                 timeout=60)
    assert result.returncode == 0, result.stdout
    return ed25519_record(path)


def dknewkey_ed25519(path: str) -> bytes:
    """An Ed25519 key as dkimpy's dknewkey writes it (base64 seed); the record dknewkey prints."""
    from dkim import dknewkey  # type: ignore[import-untyped]

    dknewkey.GenEd25519Keys(path, verbose=False)
    return ed25519_record(path)


def ed25519_record(path: str) -> bytes:
    with open(path, "rb") as f:
        key = keys.load_private_key(f.read(), path)
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(public)


class TwoVerifiers(SynchronousTestCase):
    """Start Postfix + rmilter with a dkim section; send; verify with dkimpy and Rspamd."""

    def setUp(self) -> None:
        self.rspamd, self.dns = dns_rspamd()
        self.root = harness.scratch_dir("dkim17")
        self.records: Dict[bytes, bytes] = {}
        self.tag = "t%d" % next(_unique)  # selectors unique per test: Rspamd caches keys

    def publish(self, selector: str, domain: str, record: bytes) -> None:
        name = "%s._domainkey.%s" % (selector, domain)
        self.dns.publish(name, record)
        self.records[name.encode("ascii")] = record

    def start(self, dkim_section: str) -> None:
        self.milter = harness.start_rmilter(self, "dkim {\n%s  sign_alg = sha256;\n  header_canon = relaxed;\n"
                                                  "  body_canon = relaxed;\n};\n" % dkim_section)
        self.postfix = harness.start_postfix(self, milters=self.milter.milter_inet)

    def send(self, sender: str) -> harness.DeliveredMessage:
        msgid = "%s.%s" % (self.tag, sender)
        data = (MESSAGE % {"sender": sender, "msgid": msgid, "date": message_date()}).encode("ascii")
        before = len(self.postfix.sink.messages())
        result = self.postfix.swaks(data, sender=sender, auth_user="alice")
        self.assertEqual(result.status, 0, result.transcript)
        delivered = self.postfix.wait_delivered(before + 1)
        (message,) = [m for m in delivered if m.header("Message-ID") == "<%s>" % msgid]
        return message

    def dkimpy_verdicts(self, message: harness.DeliveredMessage) -> List[Tuple[str, bool]]:
        """(a=, dkimpy's verdict) for every DKIM-Signature, in header order."""
        verifier = dkimpy.DKIM(message.raw)
        out = []
        for index, value in enumerate(message.headers("DKIM-Signature")):
            algorithm = re.search(r"a=([a-z0-9-]+);", value)
            assert algorithm is not None, value
            try:
                ok = bool(verifier.verify(idx=index, dnsfunc=lambda name, timeout=5: self.records.get(name.rstrip(b"."))))
            except dkimpy.DKIMException:
                ok = False
            out.append((algorithm.group(1), ok))
        return out

    def rspamd_allowed(self, message: harness.DeliveredMessage, sender: str) -> List[str]:
        """Rspamd's R_DKIM_ALLOW options (``domain:s=selector`` per valid signature); none rejected."""
        result = self.rspamd.checkv2(message.raw, {"IP": "192.0.2.1", "From": sender, "Helo": "mx.example.net"})
        symbols = result["symbols"]
        self.assertNotIn("R_DKIM_REJECT", symbols, symbols.get("R_DKIM_REJECT"))
        self.assertNotIn("R_DKIM_PERMFAIL", symbols)
        return sorted(symbols.get("R_DKIM_ALLOW", {}).get("options", []))


class DualSigningTests(TwoVerifiers):
    def test_rsa_ed25519_and_both(self) -> None:
        """example.com: RSA-2048 only; example.net: Ed25519 only (dkimpy's format); example.org: RSA
        and Ed25519 (OpenDKIM's format) with From oversigned.  Both verifiers accept every signature."""
        t = self.tag
        rsa_com, record = opendkim_genkey(os.path.join(self.root, "com"), "example.com", "rsa" + t)
        self.publish("rsa" + t, "example.com", record)
        ed_net = os.path.join(self.root, "net.ed.key")
        self.publish("ed" + t, "example.net", dknewkey_ed25519(ed_net))
        rsa_org, record = opendkim_genkey(os.path.join(self.root, "org"), "example.org", "rsa" + t)
        self.publish("rsa" + t, "example.org", record)
        ed_org = os.path.join(self.root, "org.ed.pem")
        self.publish("ed" + t, "example.org", openssl_ed25519(ed_org))
        blocks = "".join('  domain { key = "%s"; domain = "%s"; selector = "%s"; };\n' % entry for entry in (
            (rsa_com, "example.com", "rsa" + t), (ed_net, "example.net", "ed" + t),
            (rsa_org, "example.org", "rsa" + t), (ed_org, "example.org", "ed" + t)))
        self.start(blocks + "  oversign_headers = From;\n")

        com = self.send("alice@example.com")
        self.assertEqual(self.dkimpy_verdicts(com), [("rsa-sha256", True)])
        self.assertEqual(self.rspamd_allowed(com, "alice@example.com"), ["example.com:s=rsa" + t])

        net = self.send("alice@example.net")
        self.assertEqual(self.dkimpy_verdicts(net), [("ed25519-sha256", True)])
        self.assertEqual(self.rspamd_allowed(net, "alice@example.net"), ["example.net:s=ed" + t])

        org = self.send("alice@example.org")
        self.assertEqual(self.dkimpy_verdicts(org), [("rsa-sha256", True), ("ed25519-sha256", True)])
        self.assertEqual(self.rspamd_allowed(org, "alice@example.org"),
                         ["example.org:s=ed" + t, "example.org:s=rsa" + t])
        for value in org.headers("DKIM-Signature"):
            self.assertRegex(value, r"h=From:To:Subject:Date:Message-ID:MIME-Version:Content-Type:From;")

        # the verifiers can fail: a changed body is refused by both
        tampered = harness.DeliveredMessage(org.path, org.raw.replace(b"attached", b"enclosed"))
        self.assertEqual(self.dkimpy_verdicts(tampered), [("rsa-sha256", False), ("ed25519-sha256", False)])
        result = self.rspamd.checkv2(tampered.raw, {"IP": "192.0.2.1", "From": "alice@example.org"})
        self.assertIn("R_DKIM_REJECT", result["symbols"])
        self.assertNotIn("R_DKIM_ALLOW", result["symbols"])

        lines = [line for line in self.milter.log_text().splitlines() if "added DKIM signature" in line]
        self.assertEqual(len(lines), 4, lines)


class OpenDkimTablesTests(TwoVerifiers):
    def test_readme_tables_through_postfix(self) -> None:
        """OpenDKIM's README KeyTable/SigningTable pair, read unchanged: president@example.com,
        other example.com senders and example.net are signed with their keys; example.org,
        listed nowhere, is not."""
        t = self.tag
        keydir = os.path.join(self.root, "keys")
        os.makedirs(keydir)
        for name, domain, selector in (("president", "example.com", "foo"), ("excom", "example.com", "bar"),
                                       ("exnet", "example.net", "baz")):
            private, record = opendkim_genkey(os.path.join(self.root, name), domain, selector + t, bits=1024)
            os.rename(private, os.path.join(keydir, name))
            self.publish(selector + t, domain, record)
        key_table = os.path.join(self.root, "keytable")
        with open(key_table, "w") as f:
            f.write(re.sub(r":(foo|bar|baz):", r":\1%s:" % t, README_KEYTABLE % {"keys": keydir}))
        signing_table = os.path.join(self.root, "signingtable")
        with open(signing_table, "w") as f:
            f.write(README_SIGNINGTABLE)
        self.start('  key_table = "%s";\n  signing_table = "refile:%s";\n' % (key_table, signing_table))

        expected: Sequence[Tuple[str, Optional[str]]] = (
            ("president@example.com", "example.com:s=foo" + t),
            ("alice@example.com", "example.com:s=bar" + t),
            ("bob@example.net", "example.net:s=baz" + t),
            ("carol@example.org", None),
        )
        for sender, allowed in expected:
            message = self.send(sender)
            if allowed is None:
                self.assertEqual(message.headers("DKIM-Signature"), [])
                self.assertEqual(self.rspamd_allowed(message, sender), [])
                continue
            self.assertEqual(self.dkimpy_verdicts(message), [("rsa-sha256", True)], sender)
            self.assertEqual(self.rspamd_allowed(message, sender), [allowed])
        self.milter.wait_for_log(r"cannot add signature for domain example\.org: no SigningTable entry for "
                                 r"carol@example\.org")
