"""DKIM signing of mail sent by our users (SPEC §6.7, B16).

Keys are read and parsed once, when the configuration is loaded (start and
reload): named entries from the bytes the config parser read, wildcard entries
from every ``<domain>.<selector>.key`` file of their key directory.  A message
never touches the file system for its key.

The signature is computed with dkimpy's header canonicalisation and hashing
(the code its verifier runs), a body canonicalisation that works slice by
slice (tested to equal dkimpy's) and the RSA private-key operation of
``cryptography`` (OpenSSL).  dkimpy's own RSA code is pure Python: about 8 ms
per 2048-bit signature, all of it inside ``pow()`` calls that hold the GIL, so
running it in a thread would still stall the reactor for that long.  OpenSSL
signs in 0.4 ms and releases the GIL, and the remaining Python work
(canonicalising the body in line-aligned chunks, hashing) runs in the thread
pool through ``runtime.run_blocking``; see bench/dkim_bench.py for figures.
"""
from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import dkim as dkimpy  # type: ignore[import-untyped]
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from dkim.canonicalization import CanonicalizationPolicy  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from rmilter.log import Logger
from twisted.python.failure import Failure

from rmilter.config.schema import Config, DkimConfig, DkimDomain
from rmilter.context import MessageContext
from rmilter.verdict import AddHeader, CheckResult

log = Logger(namespace="rmilter.dkim")

#: SPEC §6.7: every occurrence of these headers is signed, in message order
SIGNED_HEADERS = frozenset(
    (
        "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc", "mime-version",
        "content-type", "content-transfer-encoding", "resent-to", "resent-cc", "resent-from",
        "resent-sender", "resent-message-id", "in-reply-to", "references", "list-id", "list-owner",
        "list-unsubscribe", "list-subscribe", "list-post",
    )
)

#: SPEC §8.4 D values produced here
SIGNED = "signed"
NOT_SIGNED_IGNORED = "not signed, ignored"
NOT_SIGNED_DISABLED = "not signed, disabled"
NOT_SIGNED_FAILURE = "not signed, internal failure"

HEADER_NAME = "DKIM-Signature"
#: folded signatures (fold_header = yes) keep lines within this many characters
FOLD_WIDTH = 78
#: signatures computed at once in the thread pool (see Keyring.signing_slots): one per core,
#: at most 4 (4 x 2000 2048-bit signatures/s is more than one reactor can feed), so signing
#: never takes every thread of the pool that spool writes also use
SIGNING_THREADS = max(1, min(4, os.cpu_count() or 1))
#: body canonicalisation works on line-aligned slices of about this size, so no single
#: regular-expression call (which holds the GIL) runs long on a big body: about 0.5 ms per
#: slice of whitespace-rich text
CANON_CHUNK = 16 * 1024

_HASHES = {"sha1": (hashlib.sha1, hashes.SHA1), "sha256": (hashlib.sha256, hashes.SHA256)}
_BARE_LF = re.compile(rb"(?<!\r)\n")
# RFC 6376 §3.4.4 relaxed body rules once tabs are spaces: trailing spaces go, runs of
# spaces become one.  dkimpy's regular expressions ([\t ]+) also "replace" every single
# space; these only match where something changes (3-5 times faster on real text).
_TRAILING_SPACES = re.compile(rb" +\r\n")
_SPACE_RUN = re.compile(rb"  +")


# -- keys -------------------------------------------------------------------------------------
class KeyLoadError(Exception):
    """A key file that cannot be used; the text says why."""


@dataclass(frozen=True)
class SigningKey:
    """A parsed private key and the d=/s= it signs with."""

    domain: str
    selector: str
    path: str
    private_key: rsa.RSAPrivateKey = field(repr=False, compare=False)

    @property
    def signature_length(self) -> int:
        """Bytes of an RSA signature with this key."""
        return (self.private_key.key_size + 7) // 8


@dataclass(frozen=True)
class KeyProblem:
    """A key that exists but cannot be used: signing for its domain stops here (SPEC §6.7)."""

    domain: str
    selector: str
    path: str
    reason: str


@dataclass(frozen=True)
class KeyNotFound:
    """No entry has a key for the sender domain; the message goes out unsigned."""

    domain: str
    reason: str


KeyChoice = Union[SigningKey, KeyProblem, KeyNotFound]


def load_private_key(data: bytes, path: str) -> rsa.RSAPrivateKey:
    """Parse a PEM RSA key (PKCS#1 as older tools write it, PKCS#8 as opendkim-genkey does)."""
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyLoadError("%s: the key is encrypted" % (path,))
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyLoadError("%s: not a PEM private key (%s)" % (path, e))
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyLoadError("%s: not an RSA key" % (path,))
    return key


def read_key_file(path: str) -> bytes:
    """Read a key file at load time (start or reload), never per message."""
    with open(path, "rb") as f:
        return f.read()


def domain_covers(pattern: str, domain: str) -> bool:
    """B16 fixed: ``*`` covers every domain, otherwise the domain itself and its subdomains only."""
    if pattern == "*":
        return True
    return domain == pattern or domain.endswith("." + pattern)


@dataclass(frozen=True)
class WildcardEntry:
    """A ``domain { }`` entry whose ``key`` is a directory of ``<domain>.<selector>.key`` files."""

    pattern: str  # lowercase domain or "*"
    selector: str
    directory: str
    keys: Mapping[str, Union[SigningKey, KeyProblem]] = field(default_factory=dict)

    def key_path(self, domain: str) -> str:
        return os.path.join(self.directory, "%s.%s.key" % (domain, self.selector))


@dataclass(frozen=True)
class SigningOptions:
    """The dkim section's signing settings, checked once at load."""

    header_canon: str = "simple"
    body_canon: str = "simple"
    sign_alg: str = "sha1"
    fold_header: bool = False

    @classmethod
    def from_section(cls, section: DkimConfig) -> "SigningOptions":
        for name, value, allowed in (
            ("header_canon", section.header_canon, ("simple", "relaxed")),
            ("body_canon", section.body_canon, ("simple", "relaxed")),
            ("sign_alg", section.sign_alg, tuple(_HASHES)),
        ):
            if value not in allowed:
                raise ValueError("dkim %s must be one of %s, not %r" % (name, ", ".join(allowed), value))
        return cls(section.header_canon, section.body_canon, section.sign_alg, section.fold_header)

    @property
    def canonicalization(self) -> str:
        return "%s/%s" % (self.header_canon, self.body_canon)

    @property
    def algorithm(self) -> str:
        return "rsa-" + self.sign_alg


class Keyring:
    """DKIM keys loaded at start and on reload, and the SPEC §6.7 key choice."""

    def __init__(
        self,
        named: Mapping[str, Union[SigningKey, KeyProblem]],
        wildcards: Sequence[WildcardEntry],
        options: SigningOptions,
        problems: Sequence[str] = (),
        signing_threads: Optional[int] = None,
    ) -> None:
        self.named = dict(named)
        self.wildcards = tuple(wildcards)
        self.options = options
        #: what was wrong at load time (also logged then), for check-config style reports
        self.problems = tuple(problems)
        #: signatures computed at the same time.  More threads than cores add no throughput
        #: (OpenSSL is CPU-bound) but more threads competing with the reactor for the GIL in
        #: their Python parts; bench/dkim_bench.py shows the reactor's lateness halving.
        self.signing_slots = DeferredSemaphore(signing_threads or SIGNING_THREADS)

    def find(self, domain: str) -> KeyChoice:
        """The key for sender domain ``domain``: named entry first, then wildcards in order."""
        named = self.named.get(domain)
        if named is not None:
            return named
        searched: List[str] = []
        for entry in self.wildcards:
            if not domain_covers(entry.pattern, domain):
                continue
            found = entry.keys.get(domain)
            if found is not None:
                return found
            searched.append(entry.key_path(domain))
        if searched:
            return KeyNotFound(domain, "no key file %s" % (", ".join(searched),))
        return KeyNotFound(domain, "no dkim domain entry for it")

    @property
    def key_count(self) -> int:
        usable = [k for k in self.named.values() if isinstance(k, SigningKey)]
        for entry in self.wildcards:
            usable.extend(k for k in entry.keys.values() if isinstance(k, SigningKey))
        return len(usable)


def _load_named(entry: DkimDomain) -> Union[SigningKey, KeyProblem]:
    assert entry.key_data is not None
    try:
        key = load_private_key(entry.key_data, entry.key)
    except KeyLoadError as e:
        return KeyProblem(entry.domain, entry.selector, entry.key, str(e))
    return SigningKey(entry.domain, entry.selector, entry.key, key)


def _load_directory(entry: DkimDomain, problems: List[str]) -> WildcardEntry:
    """Load every ``<domain>.<selector>.key`` file the entry can use from its key directory."""
    directory = entry.key
    keys: Dict[str, Union[SigningKey, KeyProblem]] = {}
    suffix = ".%s.key" % (entry.selector,)
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        problems.append(
            "dkim key directory %s (domain %s, selector %s) cannot be listed: %s; the entry never signs"
            % (directory, entry.domain, entry.selector, e.strerror or e)
        )
        return WildcardEntry(entry.domain, entry.selector, directory, keys)
    for name in names:
        if not name.endswith(suffix) or len(name) == len(suffix):
            continue
        domain = name[: -len(suffix)].lower()
        if domain in keys or not domain_covers(entry.domain, domain):
            continue
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            key = load_private_key(read_key_file(path), path)
        except OSError as e:
            problem = KeyProblem(domain, entry.selector, path, "%s: %s" % (path, e.strerror or e))
        except KeyLoadError as e:
            problem = KeyProblem(domain, entry.selector, path, str(e))
        else:
            keys[domain] = SigningKey(domain, entry.selector, path, key)
            continue
        keys[domain] = problem
        problems.append("dkim key for domain %s unusable: %s" % (domain, problem.reason))
    return WildcardEntry(entry.domain, entry.selector, directory, keys)


def build_keyring(section: DkimConfig) -> Tuple[Keyring, List[str]]:
    """Load every key of the dkim section; returns the keyring and the problems found."""
    problems: List[str] = []
    options = SigningOptions.from_section(section)
    named: Dict[str, Union[SigningKey, KeyProblem]] = {}
    wildcards: List[WildcardEntry] = []
    for entry in section.domains:
        if not entry.is_wildcard:
            if entry.domain == "*":
                problems.append(
                    'dkim key file %s is given for domain "*": a key file signs exactly its domain, '
                    "use a key directory for \"*\"; the entry never signs" % (entry.key,)
                )
                continue
            if entry.domain in named:
                problems.append("dkim domain %s is defined twice; the first entry is used" % (entry.domain,))
                continue
            loaded = _load_named(entry)
            if isinstance(loaded, KeyProblem):
                problems.append("dkim key for domain %s unusable: %s" % (entry.domain, loaded.reason))
            elif loaded.private_key.key_size < 1024:
                problems.append(
                    "dkim key %s has %d bits: verifiers refuse keys under 1024 bits"
                    % (entry.key, loaded.private_key.key_size)
                )
            named[entry.domain] = loaded
        elif os.path.isdir(entry.key):
            wildcards.append(_load_directory(entry, problems))
        else:
            problems.append(
                "dkim key %s for domain %s is neither a readable key file nor a directory; the entry never signs"
                % (entry.key, entry.domain)
            )
            wildcards.append(WildcardEntry(entry.domain, entry.selector, entry.key))
    return Keyring(named, wildcards, options, problems), problems


def from_config(config: Config) -> Optional[Keyring]:
    """Load the keys at start and on reload (blocking file reads, outside any message)."""
    section = config.dkim
    if not section.enable or not section.domains:
        return None
    keyring, problems = build_keyring(section)
    for problem in problems:
        log.error("{problem}", problem=problem)
    # (sign_alg = sha1 is reported once, with the other start-up notices: config.startup_notices)
    log.info(
        "dkim: {count} signing keys loaded for {entries} domain entries",
        count=keyring.key_count,
        entries=len(section.domains),
    )
    return keyring


# -- signature computation (runs in the thread pool) ------------------------------------------
@dataclass(frozen=True)
class SignatureRequest:
    """Everything the signer needs except the body; built on the reactor thread."""

    key: SigningKey
    options: SigningOptions
    #: the signed headers in message order: (name as received, value as received)
    headers: Tuple[Tuple[str, str], ...]
    timestamp: int


def signed_headers(headers: Sequence[Tuple[str, str]]) -> Tuple[Tuple[str, str], ...]:
    """SPEC §6.7: every occurrence, in message order, of the headers in ``SIGNED_HEADERS``."""
    return tuple((name, value) for name, value in headers if name.lower() in SIGNED_HEADERS)


def _wire(text: str) -> bytes:
    """Header text back to the bytes the MTA passed (the spool uses the same encoding)."""
    return text.encode("utf-8", "surrogateescape")


def header_fields(headers: Sequence[Tuple[str, str]]) -> List[Tuple[bytes, bytes]]:
    """Headers as dkimpy's parser would give them: ``name``, `` value\\r\\n`` with CRLF folds."""
    fields = []
    for name, value in headers:
        raw = _wire(value)
        if b"\n" in raw:
            raw = _BARE_LF.sub(b"\r\n", raw)
        fields.append((_wire(name), b" " + raw + b"\r\n"))
    return fields


def _line_slices(body: bytes, size: int) -> Iterator[bytes]:
    """The body in slices of about ``size`` bytes, each ending just after a newline."""
    start, end = 0, len(body)
    while start < end:
        cut = body.find(b"\n", start + size - 1) if start + size < end else -1
        if cut < 0:
            yield body[start:]
            return
        yield body[start : cut + 1]
        start = cut + 1


def _trailing_crlfs(chunk: bytes) -> int:
    """How many CRLF pairs end ``chunk`` (after LF normalisation, so no bare LF remains)."""
    tail = chunk[len(chunk.rstrip(b"\r\n")) :]
    if tail.count(b"\r\n") * 2 == len(tail):
        return len(tail) // 2
    count = 0
    while tail.endswith(b"\r\n"):
        tail = tail[:-2]
        count += 1
    return count


def body_hash(body: bytes, canon: str, sign_alg: str, chunk_size: int = CANON_CHUNK) -> bytes:
    """RFC 6376 §3.4 body hash, equal to dkimpy's, computed slice by slice.

    Bare LF becomes CRLF (as dkimpy's parser does); ``relaxed`` strips and
    compresses whitespace within lines; trailing empty lines are dropped and
    the last line gets its CRLF.  Slices end at line ends, so the per-line rules
    see whole lines, and trailing CRLFs are held back until content follows.
    """
    hasher = _HASHES[sign_alg][0]()
    relaxed = canon == "relaxed"
    pending = 0  # CRLFs held back: they may be the trailing empty lines
    seen_content = False
    for chunk in _line_slices(body, chunk_size):
        if chunk.count(b"\n") != chunk.count(b"\r\n"):
            chunk = _BARE_LF.sub(b"\r\n", chunk)
        if relaxed:
            chunk = chunk.replace(b"\t", b" ")
            if b" \r\n" in chunk:
                chunk = _TRAILING_SPACES.sub(b"\r\n", chunk)
            if b"  " in chunk:
                chunk = _SPACE_RUN.sub(b" ", chunk)
        crlfs = _trailing_crlfs(chunk)
        content = chunk[: len(chunk) - 2 * crlfs]
        if content:
            if pending:
                hasher.update(b"\r\n" * pending)
            hasher.update(content)
            seen_content = True
            pending = crlfs
        else:
            pending += crlfs
    if seen_content or not relaxed:
        # a non-empty body ends with exactly one CRLF; an empty one is CRLF (simple) or nothing (relaxed)
        hasher.update(b"\r\n")
    return hasher.digest()


def _fold(tags: Sequence[Tuple[str, str]], first_column: int) -> str:
    """Fold ``tag=value; ...`` at tag boundaries, after ``:`` in h= and anywhere in base64 values."""
    out: List[str] = []
    column = first_column
    for index, (tag, value) in enumerate(tags):
        last = index == len(tags) - 1
        token = "%s=%s%s" % (tag, value, "" if last else ";")
        if index:
            if column + 1 + len(token) <= FOLD_WIDTH:
                out.append(" ")
                column += 1
            else:
                out.append("\r\n\t")
                column = 1
        if column + len(token) <= FOLD_WIDTH:
            out.append(token)
            column += len(token)
            continue
        # still too long on a line of its own: break inside the value where FWS is allowed
        if tag == "h":
            pieces = [p + ":" for p in value.split(":")]
            pieces[-1] = pieces[-1][:-1]
        else:
            pieces = list(value)  # b= and bh= allow FWS between any two base64 characters
        pieces[0] = tag + "=" + pieces[0]
        if not last:
            pieces[-1] += ";"
        for piece in pieces:
            if column + len(piece) > FOLD_WIDTH and column > 1:
                out.append("\r\n\t")
                column = 1
            out.append(piece)
            column += len(piece)
    return "".join(out)


def signature_value(tags: Sequence[Tuple[str, str]], fold: bool) -> str:
    """The DKIM-Signature value (CRLF folds when folded) for the tag list."""
    if not fold:
        return "; ".join("%s=%s" % tv for tv in tags)
    return _fold(tags, len(HEADER_NAME) + 2)


def compute_signature(request: SignatureRequest, body: bytes) -> str:
    """The DKIM-Signature header value, "\\r" removed (SPEC §6.7).  Blocking: thread pool only."""
    options = request.options
    key = request.key
    policy = CanonicalizationPolicy.from_c_value(options.canonicalization.encode("ascii"))
    bh = base64.b64encode(body_hash(body, options.body_canon, options.sign_alg)).decode("ascii")
    names = [name for name, _ in request.headers]
    tags: List[Tuple[str, str]] = [
        ("v", "1"),
        ("a", options.algorithm),
        ("c", options.canonicalization),
        ("d", key.domain),
        ("s", key.selector),
        ("t", str(request.timestamp)),
        ("bh", bh),
        ("h", ":".join(names)),
    ]
    # The layout (and so the hashed value) must not depend on the signature bytes: lay it out
    # with a placeholder of the signature's exact base64 length, then put the signature in.
    placeholder_length = 4 * ((key.signature_length + 2) // 3)
    draft = signature_value(tags + [("b", "A" * placeholder_length)], options.fold_header)

    hash_factory, crypto_hash = _HASHES[options.sign_alg]
    hasher = hash_factory()
    fields = header_fields(request.headers)
    # dkimpy's hash_headers strips the b= value itself (RE_BTAG), as its verifier does
    dkimpy.hash_headers(
        hasher,
        policy,
        policy.canonicalize_headers(fields),
        [name.lower() for name, _ in fields],
        (HEADER_NAME.encode("ascii"), b" " + draft.encode("ascii")),
        None,
    )
    signature = key.private_key.sign(hasher.digest(), padding.PKCS1v15(), utils.Prehashed(crypto_hash()))
    encoded = base64.b64encode(signature).decode("ascii")
    assert len(encoded) == placeholder_length
    b_start = draft.rindex("b=") + 2
    lines: List[str] = []
    used = 0
    for line in draft[b_start:].split("\r\n\t"):  # the placeholder, maybe folded
        lines.append(encoded[used : used + len(line)])
        used += len(line)
    return (draft[:b_start] + "\r\n\t".join(lines)).replace("\r", "")


# -- the check ---------------------------------------------------------------------------------
def sender_domain(envelope_from: str) -> Optional[str]:
    """SPEC §6.7: the text after ``@`` of the (normalised, lowercase) sender."""
    if "@" not in envelope_from:
        return None
    domain = envelope_from.rsplit("@", 1)[1].strip().lower()
    return domain or None


def eligible(msg: MessageContext) -> bool:
    """``auth_only = no``, an authenticated sender (incl. our_networks) or a client in sign_networks."""
    section = msg.runtime.config.dkim
    return not section.auth_only or msg.authenticated or msg.client_address in section.sign_networks


def choose_key(msg: MessageContext) -> Union[KeyChoice, CheckResult]:
    """The key to sign with, or the final CheckResult when the message is not signed."""
    keyring = msg.runtime.dkim
    if keyring is None:
        return CheckResult("dkim", NOT_SIGNED_DISABLED)
    if not eligible(msg):
        log.debug("{tag}; do not add dkim signature for unauthorized user", tag=msg.tag)
        return CheckResult("dkim", NOT_SIGNED_IGNORED)
    domain = sender_domain(msg.envelope_from)
    if domain is None:
        return CheckResult("dkim", NOT_SIGNED_IGNORED, details=(("dkim_reason", "sender has no domain"),))
    choice = keyring.find(domain)
    if isinstance(choice, KeyNotFound):
        log.info("{tag}; cannot add signature for domain {domain}: {reason}", tag=msg.tag, domain=domain,
                 reason=choice.reason)
        return CheckResult("dkim", NOT_SIGNED_IGNORED, details=(("dkim_reason", choice.reason),))
    if isinstance(choice, KeyProblem):
        log.error("{tag}; cannot add signature for domain {domain}: {reason}", tag=msg.tag, domain=domain,
                  reason=choice.reason)
        return CheckResult("dkim", NOT_SIGNED_FAILURE, details=(("dkim_reason", choice.reason),))
    return choice


def sign(msg: MessageContext) -> "Deferred[CheckResult]":
    """Sign an accepted message (SPEC §5.9 step 10); never fails, the signature is computed off-thread."""
    try:
        choice = choose_key(msg)
        if isinstance(choice, CheckResult):
            return succeed(choice)
        assert isinstance(choice, SigningKey)
        key = choice
        headers = signed_headers(msg.headers)
        if not any(name.lower() == "from" for name, _ in headers):
            log.error("{tag}; cannot add signature for domain {domain}: the message has no From header",
                      tag=msg.tag, domain=key.domain)
            return succeed(CheckResult("dkim", NOT_SIGNED_FAILURE, details=(("dkim_reason", "no From header"),)))
        spool = msg.spool
        if spool is None:
            log.error("{tag}; cannot add dkim signature: no spool", tag=msg.tag)
            return succeed(CheckResult("dkim", NOT_SIGNED_FAILURE))
        runtime = msg.runtime
        keyring = runtime.dkim
        assert keyring is not None
        request = SignatureRequest(key, keyring.options, headers, int(runtime.reactor.seconds()))
    except Exception:
        log.failure("{tag}; cannot add dkim signature", tag=msg.tag)
        return succeed(CheckResult("dkim", NOT_SIGNED_FAILURE))

    def body_read(body: bytes) -> "Deferred[str]":
        return keyring.signing_slots.run(runtime.run_blocking, compute_signature, request, body)

    def signed(value: str) -> CheckResult:
        log.info("{tag}; d={domain}, s={selector}, added DKIM signature", tag=msg.tag, domain=key.domain,
                 selector=key.selector)
        return CheckResult(
            "dkim",
            SIGNED,
            edits=(AddHeader(HEADER_NAME, value),),
            details=(("dkim_domain", key.domain), ("dkim_selector", key.selector)),
        )

    def failed(failure: Failure) -> CheckResult:
        log.failure("{tag}; d={domain}, s={selector}, sign failed", failure, tag=msg.tag, domain=key.domain,
                    selector=key.selector)
        return CheckResult("dkim", NOT_SIGNED_FAILURE)

    body: "Deferred[bytes]" = spool.read(len(spool.head), spool.body_size)
    return body.addCallback(body_read).addCallbacks(signed, failed)
