"""DKIM signing end to end: keys made by opendkim-genkey, mail through Postfix with SASL AUTH,
signatures checked on what smtp-sink received with dkim.verify (SPEC §6.7, seed recipe)."""
from __future__ import annotations

import os
import re
import shutil
from typing import Any, Dict, Optional, Tuple

import dkim as dkimpy  # type: ignore[import-untyped]
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from rmilter.testing.mta import MessageSpec
from tests import harness
from tests.dates import message_date
from tests.harness.base import find_program, run
from tests.redis_support import send_message
from tests.test_dkim import dns_serving

MESSAGE = (
    "From: %(sender)s\r\nTo: Bob <bob@example.org>\r\nSubject: quarterly   report\r\n"
    "  (folded subject line)\r\nDate: %(date)s\r\nMessage-ID: <%(msgid)s>\r\n"
    "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
    "Hi Bob,\r\n\r\nthe  numbers   are\tattached.  \r\n\r\n\r\n"
)


def opendkim_genkey(directory: str, domain: str, selector: str, bits: int = 2048) -> Tuple[str, bytes]:
    """Make a key pair as the seed's recipe says; the private key path and the TXT record."""
    os.makedirs(directory, exist_ok=True)
    result = run([find_program("opendkim-genkey"), "--domain=" + domain, "--selector=" + selector,
                  "--bits=%d" % bits, "--directory=" + directory], timeout=120)
    assert result.returncode == 0, result.stdout
    with open(os.path.join(directory, selector + ".txt")) as f:
        zone = f.read()
    record = "".join(re.findall(r'"([^"]*)"', zone)).encode("ascii")
    assert b"p=" in record, zone
    return os.path.join(directory, selector + ".private"), record


class PostfixDkimTests(SynchronousTestCase):
    """rmilter signs mail of authenticated senders only; the signature survives Postfix."""

    def setUp(self) -> None:
        root = harness.scratch_dir("dkimkeys")
        self.dns: Dict[bytes, bytes] = {}
        # the recipe: <keydir>/<domain>.<selector>.key for a domain = "*" entry
        self.keydir = os.path.join(root, "keys")
        private, record = opendkim_genkey(os.path.join(root, "gen-example.com"), "example.com", "dkim")
        os.makedirs(self.keydir, exist_ok=True)
        shutil.copy(private, os.path.join(self.keydir, "example.com.dkim.key"))
        self.dns[b"dkim._domainkey.example.com"] = record
        # a named key file for one domain, 1024 bits, another selector
        self.named_key, record = opendkim_genkey(os.path.join(root, "gen-example.net"), "example.net", "mail",
                                                 bits=1024)
        self.dns[b"mail._domainkey.example.net"] = record

    def start(self, options: str) -> None:
        config = (
            "dkim {\n"
            '  domain { key = "%s"; domain = "example.net"; selector = "mail"; };\n'
            '  domain { key = "%s"; domain = "*"; selector = "dkim"; };\n'
            "  sign_alg = sha256;\n%s"
            "};\n" % (self.named_key, self.keydir, options)
        )
        self.milter = harness.start_rmilter(self, config)
        self.postfix = harness.start_postfix(self, milters=self.milter.milter_inet)

    def send(self, sender: str, msgid: str, auth_user: Optional[str] = None,
             xclient_addr: Optional[str] = None) -> harness.DeliveredMessage:
        data = (MESSAGE % {"sender": sender, "msgid": msgid, "date": message_date()}).encode("ascii")
        before = len(self.postfix.sink.messages())
        result = self.postfix.swaks(data, sender=sender, auth_user=auth_user, xclient_addr=xclient_addr)
        self.assertEqual(result.status, 0, result.transcript)
        delivered = self.postfix.wait_delivered(before + 1)
        (message,) = [m for m in delivered if m.header("Message-ID") == "<%s>" % msgid]
        return message

    def verify(self, message: harness.DeliveredMessage) -> bool:
        return bool(dkimpy.verify(message.raw, dnsfunc=dns_serving(self.dns)))

    def test_authenticated_signed_unauthenticated_not(self) -> None:
        """relaxed/relaxed: alice (SASL) gets a verifying signature, a stranger's mail none."""
        self.start("  header_canon = relaxed;\n  body_canon = relaxed;\n")
        signed = self.send("alice@example.com", "signed.1@example.com", auth_user="alice")
        (value,) = signed.headers("DKIM-Signature")
        self.assertIn("a=rsa-sha256; c=relaxed/relaxed; d=example.com; s=dkim;", value)
        self.assertIn("h=From:To:Subject:Date:Message-ID:MIME-Version:Content-Type;", value)
        self.assertTrue(self.verify(signed), signed.raw.decode("ascii", "replace"))

        unsigned = self.send("carol@example.com", "unsigned.1@example.com", xclient_addr="192.0.2.77")
        self.assertEqual(unsigned.headers("DKIM-Signature"), [])

        lines = [line for line in self.milter.log_text().splitlines() if "msg done:" in line]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("user: alice;", lines[0])
        self.assertIn("dkim: signed;", lines[0])
        self.assertIn("user: unauthorized;", lines[1])
        self.assertIn("dkim: not signed, ignored;", lines[1])
        self.milter.wait_for_log(r"d=example\.com, s=dkim, added DKIM signature")

    def test_named_key_and_folded_simple_signature(self) -> None:
        """simple/simple with fold_header = yes: the named key signs example.net; the folded value
        passes Postfix unchanged and verifies; tampering is detected."""
        self.start("  fold_header = yes;\n")
        signed = self.send("bob@example.net", "signed.2@example.net", auth_user="bob")
        # (smtp-sink stores lines with LF)
        raw_header = re.search(rb"\nDKIM-Signature: (.*?)\r?\n(?![ \t])", signed.raw, re.S)
        assert raw_header is not None, signed.raw
        self.assertRegex(raw_header.group(1), rb"\n\tb=")  # folded as rmilter folded it
        self.assertIn("c=simple/simple; d=example.net; s=mail;", " ".join(signed.headers("DKIM-Signature")))
        self.assertTrue(self.verify(signed), signed.raw.decode("ascii", "replace"))
        tampered = signed.raw.replace(b"quarterly   report", b"quarterly report")
        self.assertFalse(bool(dkimpy.verify(tampered, dnsfunc=dns_serving(self.dns))))

    def test_domain_without_key_unsigned_and_logged(self) -> None:
        """An authenticated sender of a domain without key file: unsigned, the log says which file was missing."""
        self.start("  header_canon = relaxed;\n")
        message = self.send("alice@nokey.example.org", "nokey.1@example.org", auth_user="alice")
        self.assertEqual(message.headers("DKIM-Signature"), [])
        self.milter.wait_for_log(r"cannot add signature for domain nokey\.example\.org: no key file .*"
                                 r"nokey\.example\.org\.dkim\.key")
        self.milter.wait_for_log(r"dkim: not signed, ignored;")


class ReloadTests(TestCase):
    """Keys are read at start and again on reload, never per message."""

    @inlineCallbacks
    def test_key_added_then_reload(self) -> Any:
        """A key file dropped into the directory is used only after SIGHUP; a message before
        that stays unsigned."""
        root = harness.scratch_dir("dkimreload")
        keydir = os.path.join(root, "keys")
        os.makedirs(keydir)
        private, record = opendkim_genkey(os.path.join(root, "gen"), "example.org", "dkim", bits=1024)
        milter = harness.start_rmilter(
            self, 'dkim { domain { key = "%s"; domain = "*"; selector = "dkim"; }; sign_alg = sha256; };\n' % keydir)
        spec = MessageSpec(sender="carol@example.org", auth_authen="carol",
                           headers=(("From", "carol@example.org"), ("To", "dave@example.net"), ("Subject", "hi")))

        def send() -> "Deferred[Any]":
            return send_message(reactor, milter.port or 0, spec)

        before = yield send()
        self.assertEqual(before.action, "accept")
        self.assertNotIn("DKIM-Signature", dict(before.added_headers))
        shutil.copy(private, os.path.join(keydir, "example.org.dkim.key"))
        still = yield send()
        self.assertNotIn("DKIM-Signature", dict(still.added_headers))
        milter.reload(wait_for="configuration reloaded")
        after = yield send()
        signature = dict(after.added_headers)["DKIM-Signature"]
        self.assertIn("d=example.org; s=dkim;", signature)
        message = (
            b"From: carol@example.org\r\nTo: dave@example.net\r\nSubject: hi\r\n"
            + b"DKIM-Signature: " + signature.replace("\n", "\r\n").encode() + b"\r\n\r\n" + spec.body
        )
        self.assertTrue(dkimpy.verify(message, dnsfunc=dns_serving({b"dkim._domainkey.example.org": record})))
