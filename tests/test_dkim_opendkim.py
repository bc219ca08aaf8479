"""Ed25519 keys, dual signatures, oversigning and OpenDKIM's KeyTable / SigningTable (issue 17).

Every signature made here is checked with dkimpy's verifier (Ed25519 through PyNaCl).
"""
from __future__ import annotations

import base64
import os
from typing import Dict, List, Optional, Sequence, Tuple

import dkim as dkimpy  # type: ignore[import-untyped]
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rmilter import config as rconfig
from rmilter.checks import dkim
from rmilter.config.schema import Config, DkimConfig, GlobalConfig, Origin
from rmilter.deps import Deps
from rmilter.dkim import keys, signer, tables
from rmilter.spool import run_inline
from rmilter.verdict import AddHeader, CheckResult
from tests.test_dkim import (
    BODY,
    HEADERS,
    KeyFiles,
    dns_record,
    dns_serving,
    make_message,
    named,
    pem,
    private_key,
    wildcard,
)

ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
OTHER_ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))


def ed_pem(key: ed25519.Ed25519PrivateKey = ED_KEY) -> bytes:
    """What OpenDKIM's opendkim-genkey --ed25519 writes (``openssl genpkey -algorithm ed25519``)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ed_raw(key: ed25519.Ed25519PrivateKey = ED_KEY) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def ed_public(key: ed25519.Ed25519PrivateKey = ED_KEY) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ed_record(key: ed25519.Ed25519PrivateKey = ED_KEY) -> bytes:
    """RFC 8463 §4: ``k=ed25519; p=`` base64 of the 32-byte public key."""
    return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(ed_public(key))


def delivered_with(headers: Sequence[Tuple[str, str]], signatures: Sequence[str], body: bytes) -> bytes:
    """The message after ADDHEADER of each signature (appended in order), as the MTA passes it on."""
    lines = [("%s: %s" % (n, v)).replace("\n", "\r\n").encode("utf-8", "surrogateescape") for n, v in headers]
    lines += [("DKIM-Signature: %s" % s).replace("\n", "\r\n").encode("ascii") for s in signatures]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def verify_each(message: bytes, records: Dict[bytes, bytes]) -> List[bool]:
    """dkimpy's verdict on every DKIM-Signature of ``message``, in header order."""
    count = sum(1 for line in message.split(b"\r\n") if line.lower().startswith(b"dkim-signature:"))
    verifier = dkimpy.DKIM(message)
    verdicts = []
    for i in range(count):
        try:
            verdicts.append(bool(verifier.verify(idx=i, dnsfunc=dns_serving(records))))
        except dkimpy.DKIMException:  # e.g. "body hash mismatch"
            verdicts.append(False)
    return verdicts


def tags(signature: str) -> Dict[str, str]:
    flat = "".join(signature.split())
    return dict(part.split("=", 1) for part in flat.split(";") if part)


class Ed25519KeyFormatTests(SynchronousTestCase):
    """Every Ed25519 key format OpenDKIM and dkimpy write loads to the same key."""

    def test_formats(self) -> None:
        der = ED_KEY.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
        forms = {
            "PKCS#8 PEM (openssl genpkey, OpenDKIM)": ed_pem(),
            "PKCS#8 DER": der,
            "base64 DER (OpenDKIM inline KeyTable key)": base64.b64encode(der),
            "base64 seed (dkimpy dknewkey)": base64.b64encode(ed_raw()),
            "base64 seed + public key (libsodium)": base64.b64encode(ed_raw() + ed_public()) + b"\n",
        }
        for what, data in forms.items():
            key = keys.load_private_key(data, "k")
            assert isinstance(key, ed25519.Ed25519PrivateKey), what
            self.assertEqual(ed_raw(key), ed_raw(), what)
            self.assertTrue(keys.looks_like_key(data), what)

    def test_dkimpy_dknewkey_file(self) -> None:
        """A key file written by dkimpy's own generator (dknewkey's GenEd25519Keys) loads and signs."""
        from dkim import dknewkey  # type: ignore[import-untyped]

        files = KeyFiles(self)
        path = os.path.join(files.root, "ed.key")
        dknewkey.GenEd25519Keys(path, verbose=False)
        with open(path, "rb") as f:
            key = keys.load_private_key(f.read(), path)
        assert isinstance(key, ed25519.Ed25519PrivateKey)

    def test_base64_seed_beginning_with_zero_is_not_taken_for_der(self) -> None:
        """One dknewkey seed in 64 encodes to text beginning with "0", the byte 0x30 that starts
        DER: it must still load as the base64 seed it is (found by a random run of the suite)."""
        seed = b"\xd3" + bytes(range(1, 32))  # 0xd3 >> 2 = 52: base64 "0"
        text = base64.b64encode(seed)
        self.assertEqual(text[:1], b"0")
        key = keys.load_private_key(text, "zero.key")
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        self.assertEqual(ed_raw(key), seed)
        der = ed25519.Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        self.assertEqual(ed_raw(keys.load_private_key(der, "k.der")), seed)  # binary DER still DER

    def test_mismatched_libsodium_key_refused(self) -> None:
        data = base64.b64encode(ed_raw() + ed_public(OTHER_ED_KEY))
        e = self.assertRaises(keys.KeyLoadError, keys.load_private_key, data, "bad.key")
        self.assertIn("second half is not its public key", str(e))

    def test_base64_of_nothing_useful_is_no_key(self) -> None:
        self.assertFalse(keys.looks_like_key(base64.b64encode(b"twelve bytes")))
        self.assertFalse(keys.looks_like_key(b"garbage"))


class Ed25519SignatureTests(SynchronousTestCase):
    def request(self, key: keys.PrivateKey, **options: object) -> signer.SignatureRequest:
        signing = keys.SigningKey("example.net", "ed", "k", key)
        return signer.SignatureRequest(signing, signer.SigningOptions(**options),  # type: ignore[arg-type]
                                       signer.signed_headers(HEADERS), 1764151200)

    def test_every_option_verifies(self) -> None:
        """ed25519-sha256 (sha256 whatever sign_alg says) verifies in dkimpy, folded or not."""
        records = {b"ed._domainkey.example.net": ed_record()}
        for header_canon in ("simple", "relaxed"):
            for body_canon in ("simple", "relaxed"):
                for sign_alg in ("sha1", "sha256"):
                    for fold in (False, True):
                        value = signer.compute_signature(
                            self.request(ED_KEY, header_canon=header_canon, body_canon=body_canon,
                                         sign_alg=sign_alg, fold_header=fold), BODY)
                        self.assertEqual(tags(value)["a"], "ed25519-sha256")
                        self.assertEqual(len(tags(value)["b"]), 88)
                        message = delivered_with(HEADERS, [value], BODY)
                        self.assertEqual(verify_each(message, records), [True], value)
                        # the test can fail: a changed body breaks it
                        self.assertEqual(verify_each(message + b"x\r\n", records), [False])

    def test_wrong_public_key_fails(self) -> None:
        value = signer.compute_signature(self.request(ED_KEY), BODY)
        message = delivered_with(HEADERS, [value], BODY)
        self.assertEqual(verify_each(message, {b"ed._domainkey.example.net": ed_record(OTHER_ED_KEY)}), [False])


class OversignTests(SynchronousTestCase):
    def request(self, oversign: Tuple[str, ...]) -> signer.SignatureRequest:
        key = keys.SigningKey("example.net", "dkim", "k", private_key())
        options = signer.SigningOptions("relaxed", "relaxed", "sha256", False, oversign)
        return signer.SignatureRequest(key, options, signer.signed_headers(HEADERS, frozenset(oversign)), 1764151200)

    def test_oversigned_from_stops_a_second_from(self) -> None:
        """h= lists From once more than it occurs: a From added later breaks the signature; an
        oversigned header that was absent cannot be added either, which without oversigning
        still verifies (the test can fail)."""
        records = {b"dkim._domainkey.example.net": dns_record(private_key())}
        forged = [("From", "Mallory <mallory@example.org>")] + HEADERS
        added = HEADERS + [("Reply-To", "mallory@example.org")]
        plain = signer.compute_signature(self.request(()), BODY)
        self.assertEqual(verify_each(delivered_with(added, [plain], BODY), records), [True])
        over = signer.compute_signature(self.request(("from", "reply-to", "x-extra")), BODY)
        self.assertTrue(tags(over)["h"].endswith(":Message-ID:Date:MIME-Version:Content-Type:From:Reply-To:X-Extra"),
                        over)
        self.assertEqual(verify_each(delivered_with(HEADERS, [over], BODY), records), [True])
        self.assertEqual(verify_each(delivered_with(forged, [over], BODY), records), [False])
        self.assertEqual(verify_each(delivered_with(added, [over], BODY), records), [False])

    def test_oversign_headers_directive(self) -> None:
        config = rconfig.parse_text("dkim { oversign_headers = From, \"List-Id\"; };\n")
        self.assertEqual(config.dkim.oversign_headers, ("from", "list-id"))
        self.assertEqual(signer.SigningOptions.from_section(config.dkim).oversign, ("from", "list-id"))


class SignWithDeps(SynchronousTestCase):
    """Helpers: a keyring from a DkimConfig, the check run on a message."""

    def setUp(self) -> None:
        self.files = KeyFiles(self)
        self.clock = Clock()
        self.clock.advance(1764151200)

    def deps(self, section: DkimConfig, origins: Optional[Dict[str, Origin]] = None) -> Deps:
        config = Config(main=GlobalConfig(), dkim=section)
        return Deps(config=config, clock=self.clock, run_blocking=run_inline,
                    keyring=keys.load_keyring(section, origins or {}))

    def sign(self, deps: Deps, sender: str = "alice@example.net", from_header: Optional[str] = None,
             headers: Sequence[Tuple[str, str]] = HEADERS) -> Tuple[CheckResult, List[str]]:
        if from_header is not None:
            headers = [("From", from_header) if n == "From" else (n, v) for n, v in headers]
        msg = make_message(self, sender=sender, headers=headers)
        result: CheckResult = self.successResultOf(dkim.check(msg, deps))
        values = [e.value for e in result.edits if isinstance(e, AddHeader) and e.name == "DKIM-Signature"]
        self.headers = list(headers)
        return result, values


class DualSigningTests(SignWithDeps):
    def test_rsa_and_ed25519_entries_both_sign(self) -> None:
        """Two domain { } entries of one domain, an RSA and an Ed25519 key: two signatures, both verify."""
        rsa_entry = named(self.files, "example.net", "rsa", pem(private_key()))
        ed_entry = named(self.files, "example.net", "ed", ed_pem())
        deps = self.deps(DkimConfig(domains=(rsa_entry, ed_entry), sign_alg="sha256"))
        result, values = self.sign(deps)
        self.assertEqual(result.summary, "signed")
        self.assertEqual([tags(v)["a"] for v in values], ["rsa-sha256", "ed25519-sha256"])
        self.assertEqual(result.details["dkim_signatures"],
                         ["d=example.net s=rsa a=rsa-sha256", "d=example.net s=ed a=ed25519-sha256"])
        records = {b"rsa._domainkey.example.net": dns_record(private_key()),
                   b"ed._domainkey.example.net": ed_record()}
        self.assertEqual(verify_each(delivered_with(HEADERS, values, BODY), records), [True, True])

    def test_second_key_of_one_type_is_not_used(self) -> None:
        first = named(self.files, "example.net", "one", pem(private_key()))
        second = named(self.files, "example.net", "two", pem(private_key(2048)))
        keyring, problems = keys.build_keyring(DkimConfig(domains=(first, second)))
        self.assertEqual([k.selector for k in keyring.find_all("example.net")], ["one"])  # type: ignore[union-attr]
        self.assertIn("dkim domain example.net has two rsa keys; the first entry is used", problems)

    def test_wildcard_directories_per_type(self) -> None:
        """A named RSA key and an Ed25519 key in a "*" directory: both sign; another domain only Ed25519."""
        self.files.write("ed/example.net.ed.key", base64.b64encode(ed_raw()))
        self.files.write("ed/example.org.ed.key", base64.b64encode(ed_raw()))
        entries = (named(self.files, "example.net", "rsa", pem(private_key())),
                   wildcard("*", "ed", os.path.join(self.files.root, "ed")))
        keyring = keys.load_keyring(DkimConfig(domains=entries))
        assert keyring is not None
        net = keyring.find_all("example.net")
        org = keyring.find_all("example.org")
        assert not isinstance(net, keys.KeyNotFound) and not isinstance(org, keys.KeyNotFound)
        self.assertEqual([(k.selector, k.key_type) for k in net], [("rsa", "rsa"), ("ed", "ed25519")])  # type: ignore
        self.assertEqual([(k.selector, k.key_type) for k in org], [("ed", "ed25519")])  # type: ignore


# OpenDKIM's README, "COMPLEX SIGNING CONFIGURATIONS" (the key paths point into the test's directory)
README_KEYTABLE = """\
preskey	example.com:foo:%(keys)s/president
comkey	example.com:bar:%(keys)s/excom
netkey	example.net:baz:%(keys)s/exnet
"""
README_SIGNINGTABLE = """\
president@example.com	preskey
*@example.com		comkey
*@example.net		netkey
"""


class OpenDkimTableTests(SignWithDeps):
    def setUp(self) -> None:
        super().setUp()
        keydir = self.files.directory("keys")
        self.files.write("keys/president", pem(private_key()))
        self.files.write("keys/excom", pem(private_key(2048), pkcs8=True))
        self.files.write("keys/exnet", ed_pem())
        self.key_table = self.files.write("keytable", (README_KEYTABLE % {"keys": keydir}).encode())
        self.signing_table = self.files.write("signingtable", README_SIGNINGTABLE.encode())
        self.records = {b"foo._domainkey.example.com": dns_record(private_key()),
                        b"bar._domainkey.example.com": dns_record(private_key(2048)),
                        b"baz._domainkey.example.net": ed_record()}

    def section(self, **options: object) -> DkimConfig:
        options.setdefault("key_table", self.key_table)
        options.setdefault("signing_table", "refile:" + self.signing_table)
        return DkimConfig(sign_alg="sha256", **options)  # type: ignore[arg-type]

    def test_readme_tables_sign_their_domains_only(self) -> None:
        """The README's pair: president gets foo, other example.com senders bar, example.net baz
        (Ed25519 here); example.org is listed nowhere and stays unsigned."""
        deps = self.deps(self.section())
        for sender, selector, domain in (("president@example.com", "foo", "example.com"),
                                         ("alice@example.com", "bar", "example.com"),
                                         ("bob@example.net", "baz", "example.net")):
            result, values = self.sign(deps, sender=sender, from_header="Someone <%s>" % sender)
            self.assertEqual(result.summary, "signed", sender)
            (value,) = values  # the first match only (MultipleSignatures off)
            self.assertEqual((tags(value)["s"], tags(value)["d"]), (selector, domain))
            self.assertEqual(verify_each(delivered_with(self.headers, values, BODY), self.records), [True])
        result, values = self.sign(deps, sender="carol@example.org", from_header="carol@example.org")
        self.assertEqual((result.summary, values), ("not signed, ignored", []))
        self.assertIn("no SigningTable entry for carol@example.org", result.details["dkim_reason"])

    def test_the_from_header_decides(self) -> None:
        """As in OpenDKIM, the From: address selects the entry, not the envelope sender."""
        deps = self.deps(self.section())
        _, values = self.sign(deps, sender="bounces@lists.example.org", from_header="President <President@Example.COM>")
        self.assertEqual([tags(v)["s"] for v in values], ["foo"])

    def test_multiple_signatures(self) -> None:
        """multiple_signatures = yes: every matching line signs, in table order."""
        deps = self.deps(self.section(multiple_signatures=True))
        result, values = self.sign(deps, sender="president@example.com", from_header="president@example.com")
        self.assertEqual([tags(v)["s"] for v in values], ["foo", "bar"])
        self.assertEqual(verify_each(delivered_with(self.headers, values, BODY), self.records), [True, True])

    def test_domain_entries_when_no_table_entry_matches(self) -> None:
        entry = named(self.files, "example.org", "legacy", pem(private_key()))
        deps = self.deps(self.section(domains=(entry,)))
        _, values = self.sign(deps, sender="carol@example.org", from_header="carol@example.org")
        self.assertEqual([tags(v)["s"] for v in values], ["legacy"])

    def test_plain_file_lookup_order(self) -> None:
        """Without refile: user@host, host, user@.parent, .parent, user@*, * (opendkim.conf(5))."""
        table = tables.parse_signing_table("st", "*\tnetkey\nuser@*\tcomkey\n.example.com\tpreskey\n"
                                                 "alice@.example.com\tcomkey\nsub.example.com\tnetkey\n", False)
        def first(address: str) -> List[str]:
            user, domain = address.split("@")
            return [r.key_name for r in table.lookup(user, domain, multiple=False)]
        self.assertEqual(first("bob@sub.example.com"), ["netkey"])  # host
        self.assertEqual(first("alice@deep.example.com"), ["comkey"])  # user@.parent before .parent
        self.assertEqual(first("bob@deep.example.com"), ["preskey"])  # .parent
        self.assertEqual(first("user@other.org"), ["comkey"])  # user@*
        self.assertEqual(first("bob@other.org"), ["netkey"])  # *
        self.assertEqual(first("bob@exämple.org"), [])  # non-ASCII matches nothing
        every = [r.key_name for r in table.lookup("alice", "sub.example.com", multiple=True)]
        self.assertEqual(every, ["netkey", "comkey", "preskey", "netkey"])
        # refile patterns: anchored, * only, case-insensitive, other characters literal
        refile = tables.parse_signing_table("st", "*@ex?mple.com\tk1\n*@Example.com\tk2\n", True)
        self.assertEqual([r.key_name for r in refile.lookup("a", "exxmple.com", True)], [])
        self.assertEqual([r.key_name for r in refile.lookup("a", "EXAMPLE.com", True)], ["k2"])
        self.assertEqual([r.key_name for r in refile.lookup("a", "example.com.evil", True)], [])

    def test_percent_domain_key_files_and_signer(self) -> None:
        """KeyTable ``%:sel:/dir/%.key`` signs every domain with a key file, d= the From domain;
        SigningTable ``%`` in the signer gives i= (left out when outside d=)."""
        self.files.write("perdomain/example.org.key", ed_pem())
        self.files.write("perdomain/example.info.key", ed_pem(OTHER_ED_KEY))
        key_table = self.files.write("kt2", b"wild %:s2025:" + os.path.join(self.files.root, "perdomain").encode()
                                     + b"/%.key\n")
        signing = self.files.write("st2", b"*@example.org wild:@%\n*@example.info wild:x@elsewhere.net\n"
                                   b"*@nokey.org wild\n")
        deps = self.deps(DkimConfig(key_table=key_table, signing_table="refile:" + signing))
        result, values = self.sign(deps, from_header="carol@example.org")
        (value,) = values
        self.assertEqual((tags(value)["d"], tags(value)["s"], tags(value).get("i")), ("example.org", "s2025", "@example.org"))
        self.assertEqual(verify_each(delivered_with(self.headers, values, BODY),
                                     {b"s2025._domainkey.example.org": ed_record()}), [True])
        _, values = self.sign(deps, from_header="dave@example.info")
        self.assertNotIn("i", tags(values[0]))
        result, values = self.sign(deps, from_header="erin@nokey.org")
        self.assertEqual((result.summary, values), ("not signed, internal failure", []))
        self.assertIn("no key file %s/nokey.org.key" % os.path.join(self.files.root, "perdomain"),
                      result.details["dkim_reason"])
        assert deps.keyring is not None
        self.assertEqual(deps.keyring.key_count, 2)


class TableErrorTests(SignWithDeps):
    """Broken tables refuse the configuration with FILE:LINE (as a broken rmilter.conf line)."""

    def refused(self, section: DkimConfig, origins: Optional[Dict[str, Origin]] = None) -> List[str]:
        e = self.assertRaises(keys.KeyringError, keys.load_keyring, section, origins or {})
        return e.errors

    def test_key_table_lines(self) -> None:
        good = self.files.write("k.pem", pem(private_key()))
        kt = self.files.write("kt", ("# comment\n\nok example.com:s:%s  # trailing comment\nbroken example.com\n"
                                     "nokey example.com:s:/nonexistent/key\nbad example.com:s:./notakey\n" % good).encode())
        self.files.write("notakey", b"hello")
        st = self.files.write("st", b"*@example.com ok\n*@example.org missing\nnovalue\n")
        errors = self.refused(DkimConfig(key_table=kt, signing_table="refile:" + st))
        self.assertEqual(errors, [
            "%s:4: KeyTable entry for 'broken' needs DOMAIN:SELECTOR:KEY, found 'example.com'" % kt,
        ])
        kt2 = self.files.write("kt2", ("ok example.com:s:%s\nnokey example.com:s:/nonexistent/key\n"
                                       "bad example.com:s:./notakey\n" % good).encode())
        errors = self.refused(DkimConfig(key_table=kt2, signing_table="refile:" + st))
        self.assertEqual(errors[0], "%s:2: key file /nonexistent/key of KeyTable entry 'nokey' cannot be read: "
                                    "No such file or directory" % kt2)
        self.assertEqual(errors[1], "%s:3: key file %s of KeyTable entry 'bad' is not a private key "
                                    "(PEM, DER or base64)" % (kt2, os.path.join(self.files.root, "notakey")))
        self.assertEqual(errors[2], "%s:3: SigningTable entry 'novalue' names no key" % st)

    def test_unknown_key_name(self) -> None:
        good = self.files.write("k.pem", pem(private_key()))
        kt = self.files.write("kt", ("ok example.com:s:%s\n" % good).encode())
        st = self.files.write("st", b"*@example.com ok\n*@example.org missing\n")
        self.assertEqual(self.refused(DkimConfig(key_table=kt, signing_table=st)),
                         ["%s:2: SigningTable entry '*@example.org' names key 'missing', which the KeyTable does "
                          "not define" % st])

    def test_missing_files_name_the_directive(self) -> None:
        origins = {"dkim.key_table": Origin("/etc/rmilter.conf", 40), "dkim.signing_table": Origin("/etc/rmilter.conf", 41)}
        self.assertEqual(self.refused(DkimConfig(key_table="/nonexistent/kt", signing_table="/x"), origins),
                         ["/etc/rmilter.conf:40: dkim key_table /nonexistent/kt cannot be read: "
                          "No such file or directory"])
        self.assertEqual(self.refused(DkimConfig(signing_table="refile:/x"), origins),
                         ["/etc/rmilter.conf:41: dkim signing_table needs a key_table (as OpenDKIM's "
                          "SigningTable needs a KeyTable)"])

    def test_through_load_configuration(self) -> None:
        """rmilter.conf naming a broken table: load_configuration raises ConfigError with the lines."""
        from rmilter.service import load_configuration

        kt = self.files.write("kt", b"k1 example.com\n")
        conf = self.files.write("rmilter.conf", ('dkim {\n  key_table = "%s";\n  signing_table = "refile:%s";\n};\n'
                                                 % (kt, kt)).encode())
        e = self.assertRaises(rconfig.ConfigError, load_configuration, conf)
        self.assertEqual(e.errors, ["%s:1: KeyTable entry for 'k1' needs DOMAIN:SELECTOR:KEY, found 'example.com'" % kt])

    def test_unsupported_dataset_types(self) -> None:
        for text in ('key_table = "db:/etc/kt.db";', 'signing_table = "dsn:mysql://x";', 'key_table = "refile:/x";'):
            e = self.assertRaises(rconfig.ConfigError, rconfig.parse_text, "dkim {\n %s\n};\n" % text)
            self.assertIn("<string>:2: ", e.errors[0])
            self.assertIn("are not supported here", e.errors[0])
