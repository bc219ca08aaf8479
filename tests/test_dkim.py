"""DKIM signing (SPEC §6.7, B16): key loading and choice, signed headers, canonicalisation, output."""
from __future__ import annotations

import base64
import ipaddress
import os
import re
import shutil
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple, cast

import dkim as dkimpy  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import CanonicalizationPolicy  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rmilter.checks import dkim
from rmilter.dkim import keys, signer
from rmilter.config.schema import Config, DkimConfig, DkimDomain, GlobalConfig, Origin
from rmilter.context import ConnectionContext, MessageContext
from rmilter.netlist import NetList
from rmilter.deps import Deps
from rmilter.spool import Spool, run_inline, spool_head
from rmilter.verdict import AddHeader, Check
from tests.dates import message_date

# -- keys and DNS for the tests ---------------------------------------------------------------
_KEYS: Dict[int, rsa.RSAPrivateKey] = {}


def private_key(bits: int = 1024) -> rsa.RSAPrivateKey:
    """One RSA key per size for the whole run (key generation is slow)."""
    if bits not in _KEYS:
        _KEYS[bits] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _KEYS[bits]


def pem(key: rsa.RSAPrivateKey, pkcs8: bool = False) -> bytes:
    """PEM as older tools (PKCS#1) or opendkim-genkey with OpenSSL 3 (PKCS#8) write it."""
    fmt = serialization.PrivateFormat.PKCS8 if pkcs8 else serialization.PrivateFormat.TraditionalOpenSSL
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def dns_record(key: rsa.RSAPrivateKey) -> bytes:
    """The TXT record publishing ``key``'s public half."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def dns_serving(records: Dict[bytes, bytes]) -> Callable[..., Optional[bytes]]:
    """A dkimpy ``dnsfunc`` answering TXT queries from ``records`` (name without the final dot)."""

    def dnsfunc(name: bytes, timeout: int = 5) -> Optional[bytes]:
        return records.get(name.rstrip(b"."))

    return dnsfunc


def delivered(headers: Sequence[Tuple[str, str]], signature: str, body: bytes) -> bytes:
    """The message as the MTA delivers it after ADDHEADER: LF folds become CRLF, signature last."""
    lines = [("%s: %s" % (n, v)).replace("\n", "\r\n").encode("utf-8", "surrogateescape") for n, v in headers]
    lines.append(("%s: %s" % (signer.HEADER_NAME, signature)).replace("\n", "\r\n").encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def verify(message: bytes, domain: str, selector: str, key: rsa.RSAPrivateKey) -> bool:
    name = ("%s._domainkey.%s" % (selector, domain)).encode("ascii")
    return bool(dkimpy.verify(message, dnsfunc=dns_serving({name: dns_record(key)})))


HEADERS: List[Tuple[str, str]] = [
    ("Received", "from client.example.net (client [192.0.2.10])\n\tby mx.example.net"),
    ("From", "Alice <alice@example.net>"),
    ("To", "bob@example.org"),
    ("Subject", "a  folded\n   subject"),
    ("X-Mailer", "not signed"),
    ("Message-ID", "<m1@example.net>"),
    ("Date", message_date()),
    ("MIME-Version", "1.0"),
    ("Content-Type", "text/plain; charset=utf-8"),
]
BODY = b"Hello Bob,\r\n\r\nsome  text\twith   spaces  \r\nlast line\r\n\r\n\r\n"


# -- configuration and messages ---------------------------------------------------------------
class KeyFiles:
    """A temporary directory of key files, removed after the test."""

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.root = tempfile.mkdtemp(prefix="dkimtest.")
        testcase.addCleanup(shutil.rmtree, self.root, True)

    def write(self, relative: str, data: bytes) -> str:
        path = os.path.join(self.root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def directory(self, relative: str) -> str:
        path = os.path.join(self.root, relative)
        os.makedirs(path, exist_ok=True)
        return path


def named(files: "KeyFiles", domain: str, selector: str, key_pem: bytes) -> DkimDomain:
    """A ``domain { key = <file>; }`` entry, its key file written to ``files``."""
    path = files.write("named/%s.%s.pem" % (domain, selector), key_pem)
    return DkimDomain(domain=domain, selector=selector, key=path, origin=Origin("rmilter.conf", 7))


def wildcard(domain: str, selector: str, directory: str) -> DkimDomain:
    return DkimDomain(domain=domain, selector=selector, key=directory)


def make_config(domains: Sequence[DkimDomain], **dkim_options: object) -> Config:
    our_networks = NetList([ipaddress.ip_network("10.0.0.0/8")])
    return Config(
        main=GlobalConfig(our_networks=our_networks),
        dkim=DkimConfig(domains=tuple(domains), **dkim_options),  # type: ignore[arg-type]
    )


def make_deps(
    config: Config, clock: Optional[Clock] = None, run_blocking: Callable[..., Deferred] = run_inline
) -> Deps:
    return Deps(config=config, clock=clock or Clock(), run_blocking=run_blocking,
                keyring=keys.load_keyring(config.dkim))


def make_message(
    testcase: SynchronousTestCase,
    sender: str = "alice@example.net",
    user: Optional[str] = "alice",
    client_address: str = "192.0.2.10",
    headers: Sequence[Tuple[str, str]] = HEADERS,
    body: bytes = BODY,
    memory_limit: int = 1024 * 1024,
) -> MessageContext:
    """A message at EOM: headers recorded, spool filled and finished."""
    conn = ConnectionContext(client_address=client_address, family="4", helo="client.example.net")
    msg = MessageContext(connection=conn)
    msg.envelope_from = sender
    msg.user = user
    msg.sasl_authenticated = user is not None
    msg.headers = list(headers)
    tempdir = tempfile.mkdtemp(prefix="dkimspool.")
    testcase.addCleanup(shutil.rmtree, tempdir, True)
    spool = Spool(tempdir, 0o600, memory_limit, run_inline)
    testcase.addCleanup(spool.close)
    spool.set_head(
        spool_head(helo=conn.helo, hostname="client", client_address=client_address, tag=msg.tag,
                   headers=list(headers), has_return_path=False, envelope_from=sender,
                   recipients=["<bob@example.org>"])
    )
    for start in range(0, len(body), 1000):
        spool.append(body[start : start + 1000])
    testcase.successResultOf(spool.finish())
    msg.spool = spool
    return msg


# -- key loading and choice ---------------------------------------------------------------------
class KeyringTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.files = KeyFiles(self)
        self.key_pem = pem(private_key(), pkcs8=True)

    def keyring(self, *entries: DkimDomain) -> keys.Keyring:
        keyring, _ = keys.build_keyring(make_config(entries).dkim)
        return keyring

    def test_named_key_signs_exactly_its_domain(self) -> None:
        """A key-file entry signs its own domain, not subdomains or look-alikes."""
        keyring = self.keyring(named(self.files, "example.net", "mail", pem(private_key())))
        found = keyring.find("example.net")
        assert isinstance(found, keys.SigningKey)
        self.assertEqual((found.domain, found.selector), ("example.net", "mail"))
        self.assertIsInstance(keyring.find("sub.example.net"), keys.KeyNotFound)
        self.assertIsInstance(keyring.find("notexample.net"), keys.KeyNotFound)

    def test_star_directory_signs_every_domain_with_a_key_file(self) -> None:
        """domain = "*" with a key directory: <domain>.<selector>.key gives d=<sender domain>."""
        keydir = self.files.directory("keys")
        self.files.write("keys/example.net.dkim.key", self.key_pem)
        self.files.write("keys/other.org.dkim.key", self.key_pem)
        self.files.write("keys/other.org.old.key", self.key_pem)  # another selector: not loaded
        keyring = self.keyring(wildcard("*", "dkim", keydir))
        for domain in ("example.net", "other.org"):
            found = keyring.find(domain)
            assert isinstance(found, keys.SigningKey)
            self.assertEqual((found.domain, found.selector), (domain, "dkim"))
            self.assertEqual(found.path, os.path.join(keydir, domain + ".dkim.key"))
        missing = keyring.find("nokey.org")
        assert isinstance(missing, keys.KeyNotFound)
        self.assertIn(os.path.join(keydir, "nokey.org.dkim.key"), missing.reason)
        self.assertEqual(keyring.key_count, 2)

    def test_wildcard_domain_matches_itself_and_subdomains_only(self) -> None:
        """B16: an entry for example.com covers mail.example.com but not notexample.com."""
        keydir = self.files.directory("keys")
        for domain in ("example.com", "mail.example.com", "notexample.com", "example.com.evil.org"):
            self.files.write("keys/%s.s1.key" % domain, self.key_pem)
        keyring = self.keyring(wildcard("example.com", "s1", keydir))
        self.assertIsInstance(keyring.find("example.com"), keys.SigningKey)
        sub = keyring.find("mail.example.com")
        assert isinstance(sub, keys.SigningKey)
        self.assertEqual(sub.domain, "mail.example.com")
        self.assertIsInstance(keyring.find("notexample.com"), keys.KeyNotFound)
        self.assertIsInstance(keyring.find("example.com.evil.org"), keys.KeyNotFound)
        # keys the entry can never use are not even loaded
        self.assertEqual(sorted(keyring.wildcards[0].keys), ["example.com", "mail.example.com"])

    def test_named_entry_before_wildcards_and_wildcards_in_order(self) -> None:
        """The named entry wins; a wildcard without the file passes to the next wildcard."""
        first = self.files.directory("first")
        second = self.files.directory("second")
        self.files.write("second/example.org.s2.key", self.key_pem)
        self.files.write("second/example.net.s2.key", self.key_pem)
        keyring = self.keyring(
            wildcard("*", "s1", first),
            wildcard("*", "s2", second),
            named(self.files, "example.net", "named", pem(private_key())),
        )
        net = keyring.find("example.net")
        assert isinstance(net, keys.SigningKey)
        self.assertEqual(net.selector, "named")
        org = keyring.find("example.org")
        assert isinstance(org, keys.SigningKey)
        self.assertEqual(org.selector, "s2")

    def test_unusable_wildcard_key_stops_the_search(self) -> None:
        """A key file that does not parse is reported at load and ends the search (SPEC §6.7)."""
        first = self.files.directory("first")
        second = self.files.directory("second")
        self.files.write("first/example.org.s1.key", b"-----BEGIN PRIVATE KEY-----\nnot base64\n")
        self.files.write("second/example.org.s2.key", self.key_pem)
        keyring, problems = keys.build_keyring(
            make_config([wildcard("*", "s1", first), wildcard("*", "s2", second)]).dkim
        )
        found = keyring.find("example.org")
        assert isinstance(found, keys.KeyProblem)
        self.assertIn("example.org.s1.key", found.reason)
        self.assertEqual(len(problems), 1)
        self.assertIn("example.org", problems[0])

    def test_unreadable_wildcard_key(self) -> None:
        """A key file that cannot be read is a KeyProblem carrying the OS error."""
        keydir = self.files.directory("keys")
        self.files.write("keys/example.org.dkim.key", self.key_pem)

        def refuse(path: str) -> bytes:
            raise PermissionError(13, "Permission denied", path)

        self.patch(keys, "read_key_file", refuse)
        keyring, problems = keys.build_keyring(make_config([wildcard("*", "dkim", keydir)]).dkim)
        found = keyring.find("example.org")
        assert isinstance(found, keys.KeyProblem)
        self.assertIn("Permission denied", found.reason)
        self.assertEqual(len(problems), 1)

    def test_named_key_that_does_not_parse_is_reported_at_load(self) -> None:
        """A named key file that looks like PEM but does not parse: a problem at load, KeyProblem for
        its domain; the other entries still sign."""
        broken = b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n"
        keyring, problems = keys.build_keyring(make_config([named(self.files, "example.net", "s", broken),
                                                            named(self.files, "example.org", "s", self.key_pem)]).dkim)
        self.assertEqual(len(problems), 1)
        self.assertIn("example.net", problems[0])
        self.assertIsInstance(keyring.find("example.net"), keys.KeyProblem)
        self.assertIsInstance(keyring.find("example.org"), keys.SigningKey)

    def test_named_key_that_is_no_pem_refuses_the_configuration(self) -> None:
        """A key file that is no key at all (not PEM, DER or base64) is a configuration error with the
        FILE:LINE of its ``domain { }`` block (as the parser reported it before keys left the config)."""
        entry = named(self.files, "example.net", "s", b"garbage")
        e = self.assertRaises(keys.KeyringError, keys.build_keyring, make_config([entry]).dkim)
        self.assertEqual(e.errors, ["rmilter.conf:7: dkim key %r is not a private key (PEM, DER or base64)"
                                    % (entry.key,)])

    def test_missing_key_directory_is_reported_at_load(self) -> None:
        """A wildcard entry whose key path does not exist never signs and says so at load."""
        missing = os.path.join(self.files.root, "nowhere")
        keyring, problems = keys.build_keyring(make_config([wildcard("example.net", "s", missing)]).dkim)
        self.assertEqual(len(problems), 1)
        self.assertIn(missing, problems[0])
        self.assertIsInstance(keyring.find("example.net"), keys.KeyNotFound)

    def test_pkcs1_and_pkcs8_keys_load(self) -> None:
        """Both PEM layouts parse (older tools write PKCS#1, opendkim-genkey with OpenSSL 3 PKCS#8)."""
        for data in (pem(private_key()), pem(private_key(), pkcs8=True)):
            key = keys.load_private_key(data, "k")
            self.assertEqual(key.private_numbers(), private_key().private_numbers())

    def test_key_neither_rsa_nor_ed25519_refused(self) -> None:
        """An EC (P-256) key parses but cannot sign DKIM: a KeyLoadError saying why."""
        from cryptography.hazmat.primitives.asymmetric import ec

        data = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        e = self.assertRaises(keys.KeyLoadError, keys.load_private_key, data, "ec.key")
        self.assertIn("not an RSA or Ed25519 key", str(e))

    def test_no_keyring_when_disabled_or_empty(self) -> None:
        """No keyring (so "not signed, disabled") with enable = no or without domain entries."""
        self.assertIsNone(keys.load_keyring(make_config([]).dkim))
        entry = named(self.files, "a.org", "s", self.key_pem)
        self.assertIsNone(keys.load_keyring(make_config([entry], enable=False).dkim))
        self.assertIsNotNone(keys.load_keyring(make_config([entry]).dkim))

    def test_keys_are_parsed_once_at_load(self) -> None:
        """Signing messages never reads or parses a key again."""
        keydir = self.files.directory("keys")
        self.files.write("keys/example.net.dkim.key", self.key_pem)
        config = make_config([wildcard("*", "dkim", keydir)], sign_alg="sha256")
        deps = make_deps(config)
        calls: List[str] = []

        def record(*args: str) -> None:
            calls.append(args[-1])

        self.patch(keys, "read_key_file", record)
        self.patch(keys, "load_private_key", record)
        for _ in range(3):
            result = self.successResultOf(dkim.check(make_message(self), deps))
            self.assertEqual(result.summary, dkim.SIGNED)
        self.assertEqual(calls, [])


# -- headers and canonicalisation ---------------------------------------------------------------
class SignedHeaderTests(SynchronousTestCase):
    def test_signed_header_list(self) -> None:
        """Every occurrence of the SPEC §6.7 headers, in message order, original spelling kept."""
        headers = [
            ("Received", "x"), ("FROM", "a@b"), ("To", "c@d"), ("X-Spam", "no"), ("to", "e@f"),
            ("Return-Path", "<a@b>"), ("List-Unsubscribe", "<mailto:u@l>"), ("Resent-Message-ID", "<r@b>"),
            ("In-Reply-To", "<o@x>"), ("Bcc", "secret@x"), ("DKIM-Signature", "v=1"), ("Content-ID", "<c>"),
        ]
        self.assertEqual(
            [name for name, _ in signer.signed_headers(headers)],
            ["FROM", "To", "to", "List-Unsubscribe", "Resent-Message-ID", "In-Reply-To"],
        )
        self.assertEqual(len(signer.SIGNED_HEADERS), 23)

    def test_header_fields_turn_bare_lf_into_crlf(self) -> None:
        """Values as the MTA passed them (LF folds) become what the receiver sees (CRLF folds)."""
        self.assertEqual(
            signer.header_fields([("Subject", "a\n b"), ("To", "x\r\n\ty")]),
            [(b"Subject", b" a\r\n b\r\n"), (b"To", b" x\r\n\ty\r\n")],
        )


def _dkimpy_body(body: bytes, canon: str) -> bytes:
    """What dkimpy hashes: its parser's CRLF body, then its canonicalisation."""
    _, parsed = dkimpy.rfc822_parse(b"X: y\r\n\r\n" + body)
    return CanonicalizationPolicy.from_c_value(("simple/" + canon).encode()).canonicalize_body(parsed)


class BodyHashTests(SynchronousTestCase):
    CASES = [
        b"", b"\r\n", b"\r\n\r\n", b"abc", b"abc\r\n", b"abc\r\n\r\n\r\n", b"  \r\n \t \r\n",
        b"a  b\t\tc  \r\n\r\n d \r\n", b"bare\nlf\n\n", b"cr\r", b"cr\r\r\n", b"x\r\n   \r\n\r\n",
        b"\t\r\n", b"a\t \tb\r\n", b" \t\r\n\t\r\n", b"\tlead\r\n", b"x \t", b"x\t\n \n",
    ]

    def test_equals_dkimpy_for_edge_cases(self) -> None:
        """Empty bodies, trailing empty lines, whitespace, bare LF and lone CR as dkimpy hashes them."""
        import hashlib

        for body in self.CASES:
            for canon in ("simple", "relaxed"):
                for chunk in (1, 2, 3, 64 * 1024):
                    self.assertEqual(
                        signer.body_hash(body, canon, "sha256", chunk_size=chunk),
                        hashlib.sha256(_dkimpy_body(body, canon)).digest(),
                        (body, canon, chunk),
                    )

    @settings(max_examples=300, deadline=None)
    @given(
        body=st.lists(st.sampled_from([b"a", b"b c", b" ", b"\t", b"\r\n", b"\n", b"\r", b"  x  "]), max_size=40)
        .map(b"".join),
        canon=st.sampled_from(["simple", "relaxed"]),
        chunk=st.integers(min_value=1, max_value=16),
    )
    def test_equals_dkimpy_for_any_body_and_slice_size(self, body: bytes, canon: str, chunk: int) -> None:
        """Slicing the body at line ends never changes the hash."""
        import hashlib

        self.assertEqual(
            signer.body_hash(body, canon, "sha1", chunk_size=chunk), hashlib.sha1(_dkimpy_body(body, canon)).digest()
        )


# -- signatures -------------------------------------------------------------------------------
class ComputeSignatureTests(SynchronousTestCase):
    def request(self, bits: int = 1024, headers: Sequence[Tuple[str, str]] = HEADERS,
                **options: object) -> signer.SignatureRequest:
        key = keys.SigningKey("example.net", "dkim", "k", private_key(bits))
        return signer.SignatureRequest(
            key, signer.SigningOptions(**options), signer.signed_headers(headers), 1764151200  # type: ignore[arg-type]
        )

    def test_every_option_combination_verifies(self) -> None:
        """simple/relaxed header and body canonicalisation, sha1/sha256, folded or not: dkim.verify passes."""
        for header_canon in ("simple", "relaxed"):
            for body_canon in ("simple", "relaxed"):
                for alg in ("sha1", "sha256"):
                    for fold in (False, True):
                        request = self.request(header_canon=header_canon, body_canon=body_canon,
                                               sign_alg=alg, fold_header=fold)
                        value = signer.compute_signature(request, BODY)
                        self.assertIn("a=rsa-%s; c=%s/%s;" % (alg, header_canon, body_canon),
                                      value.replace("\n\t", " "))
                        self.assertTrue(
                            verify(delivered(HEADERS, value, BODY), "example.net", "dkim", private_key()),
                            (header_canon, body_canon, alg, fold, value),
                        )

    def test_single_line_format(self) -> None:
        """fold_header = no: the verified C layout on one line, h= with the original names."""
        value = signer.compute_signature(self.request(sign_alg="sha256", header_canon="relaxed",
                                                    body_canon="relaxed"), BODY)
        self.assertNotIn("\n", value)
        self.assertNotIn("\r", value)
        self.assertRegex(
            value,
            r"^v=1; a=rsa-sha256; c=relaxed/relaxed; d=example\.net; s=dkim; t=1764151200; bh=[A-Za-z0-9+/=]{44}; "
            r"h=From:To:Subject:Message-ID:Date:MIME-Version:Content-Type; b=[A-Za-z0-9+/=]{172}$",
        )

    def test_folded_format(self) -> None:
        """fold_header = yes: LF + TAB folds, no CR, no line longer than 78 characters."""
        headers = HEADERS + [("References", "<%d@example.net>" % i) for i in range(10)]
        value = signer.compute_signature(self.request(bits=2048, headers=headers, fold_header=True), BODY)
        self.assertNotIn("\r", value)
        lines = ("%s: %s" % (signer.HEADER_NAME, value)).split("\n")
        self.assertGreater(len(lines), 5)
        self.assertTrue(all(len(line) <= signer.FOLD_WIDTH for line in lines), lines)
        self.assertTrue(all(line.startswith("\t") for line in lines[1:]))
        self.assertTrue(verify(delivered(headers, value, BODY), "example.net", "dkim", private_key(2048)))

    def test_tampering_is_detected(self) -> None:
        """A changed signed header or body breaks the signature (the test can fail)."""
        value = signer.compute_signature(self.request(header_canon="relaxed", body_canon="relaxed"), BODY)
        changed = [("Subject", "other") if n == "Subject" else (n, v) for n, v in HEADERS]
        self.assertFalse(verify(delivered(changed, value, BODY), "example.net", "dkim", private_key()))
        self.assertFalse(verify(delivered(HEADERS, value, BODY + b"more\r\n"), "example.net", "dkim",
                                private_key()))
        # an unsigned header may change
        changed = [("X-Mailer", "other") if n == "X-Mailer" else (n, v) for n, v in HEADERS]
        self.assertTrue(verify(delivered(changed, value, BODY), "example.net", "dkim", private_key()))

    def test_repeated_headers_and_non_ascii_values(self) -> None:
        """Two To headers are both signed; 8-bit header bytes survive the round trip."""
        headers = HEADERS + [("To", "second@example.org"), ("Subject", "gr\udcc3\udcbc\udcc3\udc9fe")]
        value = signer.compute_signature(self.request(), BODY)
        self.assertIn("h=From:To:Subject:", value)
        value = signer.compute_signature(self.request(headers=headers), BODY)
        self.assertIn(":To:Subject;", value.replace(" b=", ";"))
        self.assertTrue(verify(delivered(headers, value, BODY), "example.net", "dkim", private_key()))


class SignTests(SynchronousTestCase):
    """The check: eligibility, D values, the AddHeader edit, work handed to run_blocking."""

    def setUp(self) -> None:
        self.files = KeyFiles(self)
        self.keydir = self.files.directory("keys")
        self.files.write("keys/example.net.dkim.key", pem(private_key(), pkcs8=True))
        self.clock = Clock()
        self.clock.advance(1764151200)

    def deps(self, run_blocking: Callable[..., Deferred] = run_inline, **options: object) -> Deps:
        options.setdefault("sign_alg", "sha256")
        config = make_config([wildcard("*", "dkim", self.keydir)], **options)
        return make_deps(config, self.clock, run_blocking)

    def test_authenticated_sender_signed(self) -> None:
        """An authenticated sender's message gets a DKIM-Signature AddHeader that verifies."""
        msg = make_message(self)
        result = self.successResultOf(dkim.check(msg, self.deps()))
        self.assertEqual(result.check, Check.DKIM)
        self.assertEqual(result.summary, "signed")
        self.assertIsNone(result.verdict)
        (edit,) = result.edits
        assert isinstance(edit, AddHeader)
        self.assertEqual(edit.name, "DKIM-Signature")
        self.assertIn("d=example.net; s=dkim; t=1764151200;", edit.value)
        self.assertTrue(verify(delivered(HEADERS, edit.value, BODY), "example.net", "dkim", private_key()))

    def test_unauthenticated_sender_not_signed(self) -> None:
        """auth_only (default): no user, not in sign_networks: "not signed, ignored", no edit."""
        result = self.successResultOf(dkim.check(make_message(self, user=None), self.deps()))
        self.assertEqual((result.summary, result.edits), ("not signed, ignored", ()))

    def test_auth_only_off_signs_everyone(self) -> None:
        result = self.successResultOf(dkim.check(make_message(self, user=None), self.deps(auth_only=False)))
        self.assertEqual(result.summary, "signed")

    def test_sign_networks_client_signed(self) -> None:
        """A client in sign_networks is signed without authentication."""
        networks = NetList([ipaddress.ip_network("192.0.2.0/24")])
        deps = self.deps(sign_networks=networks)
        self.assertEqual(self.successResultOf(dkim.check(make_message(self, user=None), deps)).summary, "signed")
        other = make_message(self, user=None, client_address="198.51.100.1")
        self.assertEqual(self.successResultOf(dkim.check(other, deps)).summary, "not signed, ignored")

    def test_no_keyring_is_disabled(self) -> None:
        deps = Deps(config=make_config([]), clock=self.clock, run_blocking=run_inline)
        self.assertEqual(self.successResultOf(dkim.check(make_message(self), deps)).summary, "not signed, disabled")

    def test_domain_without_key_logged_and_unsigned(self) -> None:
        """A wildcard entry without a key file for the domain: the message's log names the path."""
        events: List[dict] = []
        from twisted.logger import ILogObserver, globalLogPublisher

        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        msg = make_message(self, sender="carol@nokey.org")
        result = self.successResultOf(dkim.check(msg, self.deps()))
        self.assertEqual(result.summary, "not signed, ignored")
        texts = [e for e in events if e.get("log_namespace") == "rmilter.dkim" and e.get("tag") == msg.tag]
        self.assertEqual(len(texts), 1)
        self.assertIn("nokey.org.dkim.key", texts[0]["reason"])

    def test_null_sender_not_signed(self) -> None:
        result = self.successResultOf(dkim.check(make_message(self, sender=""), self.deps()))
        self.assertEqual(result.summary, "not signed, ignored")

    def test_unusable_key_is_internal_failure(self) -> None:
        self.files.write("keys/broken.org.dkim.key", b"not a key")
        msg = make_message(self, sender="x@broken.org")
        self.assertEqual(self.successResultOf(dkim.check(msg, self.deps())).summary, "not signed, internal failure")

    def test_message_without_from_not_signed(self) -> None:
        """RFC 6376 §5.4: From must be signed; without one the message stays unsigned."""
        headers = [(n, v) for n, v in HEADERS if n != "From"]
        msg = make_message(self, headers=headers)
        self.assertEqual(self.successResultOf(dkim.check(msg, self.deps())).summary, "not signed, internal failure")

    def test_signature_computed_through_run_blocking(self) -> None:
        """The RSA work is handed to the thread pool: no result until that call finishes."""
        calls: List[Tuple[Callable, tuple, Deferred]] = []

        def pool(f: Callable, *args: object) -> Deferred:
            d: Deferred = Deferred()
            calls.append((f, args, d))
            return d

        msg = make_message(self)
        signing = dkim.check(msg, self.deps(run_blocking=pool))
        self.assertNoResult(signing)
        (f, args, d), = calls
        self.assertIs(f, signer.compute_signatures)
        d.callback(f(*args))
        self.assertEqual(self.successResultOf(signing).summary, "signed")

    def test_signatures_at_once_limited_to_signing_slots(self) -> None:
        """At most signing_threads signatures run in the pool; the others wait their turn."""
        from twisted.internet.defer import DeferredSemaphore

        calls: List[Tuple[Callable, tuple, Deferred]] = []
        most_running = [0]

        def pool(f: Callable, *args: object) -> Deferred:
            d: Deferred = Deferred()
            calls.append((f, args, d))
            most_running[0] = max(most_running[0], sum(1 for _, _, c in calls if not c.called))
            return d

        deps = self.deps(run_blocking=pool)
        assert deps.keyring is not None
        deps.keyring.signing_slots = DeferredSemaphore(2)
        signing = [dkim.check(make_message(self), deps) for _ in range(5)]
        self.assertEqual(len(calls), 2)
        while any(not d.called for _, _, d in calls):
            f, args, d = next(c for c in calls if not c[2].called)
            d.callback(f(*args))
        self.assertEqual((len(calls), most_running[0]), (5, 2))
        self.assertEqual([self.successResultOf(s).summary for s in signing], ["signed"] * 5)

    def test_failure_in_the_pool_is_internal_failure(self) -> None:
        """A signing error never fails the message: "not signed, internal failure"."""
        from twisted.internet.defer import fail

        msg = make_message(self)
        result = self.successResultOf(dkim.check(msg, self.deps(run_blocking=lambda f, *a: fail(RuntimeError("boom")))))
        self.assertEqual((result.summary, result.edits), ("not signed, internal failure", ()))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_body_spooled_to_disk_signed(self) -> None:
        """A body that went to the spool file is read back whole and signs correctly."""
        body = b"".join(b"line %d   with  spaces\r\n" % i for i in range(5000))
        msg = make_message(self, body=body, memory_limit=1000)
        assert msg.spool is not None
        self.assertFalse(msg.spool.in_memory)
        result = self.successResultOf(dkim.check(msg, self.deps()))
        (edit,) = result.edits
        assert isinstance(edit, AddHeader)
        self.assertTrue(verify(delivered(HEADERS, edit.value, body), "example.net", "dkim", private_key()))

    def test_relaxed_canonicalisation_tolerates_refolding(self) -> None:
        """With header_canon = relaxed a receiver refolding headers still verifies; simple does not."""
        relaxed = self.successResultOf(dkim.check(make_message(self), self.deps(header_canon="relaxed")))
        simple = self.successResultOf(dkim.check(make_message(self), self.deps()))
        refolded = [(n, re.sub(r"\s+", " ", v)) for n, v in HEADERS]
        for result, expected in ((relaxed, True), (simple, False)):
            (edit,) = result.edits
            assert isinstance(edit, AddHeader)
            self.assertEqual(
                verify(delivered(refolded, edit.value, BODY), "example.net", "dkim", private_key()), expected
            )
