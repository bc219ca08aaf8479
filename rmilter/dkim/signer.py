"""DKIM signatures as SPEC §6.7 makes them (RFC 6376), computed off the reactor thread.

The signature is computed with dkimpy's header canonicalisation and hashing
(the code its verifier runs), a body canonicalisation that works slice by
slice (tested to equal dkimpy's) and the RSA private-key operation of
``cryptography`` (OpenSSL).  dkimpy's own RSA code is pure Python: about 8 ms
per 2048-bit signature, all of it inside ``pow()`` calls that hold the GIL, so
running it in a thread would still stall the reactor for that long.  OpenSSL
signs in 0.4 ms and releases the GIL, and the remaining Python work
(canonicalising the body in line-aligned chunks, hashing) runs in the thread
pool; see bench/dkim_bench.py for figures.  Nothing here does I/O.

Ed25519 keys sign ``ed25519-sha256`` (RFC 8463): the same header hash, signed with
PureEdDSA by ``cryptography``.  Several signatures of one message (an RSA and an
Ed25519 key, several SigningTable entries) share one body hash per hash algorithm.
"""
from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, AbstractSet, Dict, Iterator, List, Optional, Sequence, Tuple

from rmilter.config.schema import DkimConfig

if TYPE_CHECKING:
    from rmilter.dkim.keys import SigningKey

#: SPEC §6.7: every occurrence of these headers is signed, in message order
SIGNED_HEADERS = frozenset(
    (
        "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc", "mime-version",
        "content-type", "content-transfer-encoding", "resent-to", "resent-cc", "resent-from",
        "resent-sender", "resent-message-id", "in-reply-to", "references", "list-id", "list-owner",
        "list-unsubscribe", "list-subscribe", "list-post",
    )
)

HEADER_NAME = "DKIM-Signature"
#: folded signatures (fold_header = yes) keep lines within this many characters
FOLD_WIDTH = 78
#: body canonicalisation works on line-aligned slices of about this size, so no single
#: regular-expression call (which holds the GIL) runs long on a big body: about 0.5 ms per
#: slice of whitespace-rich text
CANON_CHUNK = 16 * 1024

#: hashlib's constructor and the name of cryptography's hash class (cryptography is imported
#: only to sign: 6 MB of the idle floor when DKIM is off, issue 19)
_HASHES = {"sha1": (hashlib.sha1, "SHA1"), "sha256": (hashlib.sha256, "SHA256")}
_BARE_LF = re.compile(rb"(?<!\r)\n")
# RFC 6376 §3.4.4 relaxed body rules once tabs are spaces: trailing spaces go, runs of
# spaces become one.  dkimpy's regular expressions ([\t ]+) also "replace" every single
# space; these only match where something changes (3-5 times faster on real text).
_TRAILING_SPACES = re.compile(rb" +\r\n")
_SPACE_RUN = re.compile(rb"  +")


@dataclass(frozen=True)
class SigningOptions:
    """The dkim section's signing settings, checked once at load."""

    header_canon: str = "simple"
    body_canon: str = "simple"
    sign_alg: str = "sha1"
    fold_header: bool = False
    #: lowercase names signed once more than they occur (RFC 6376 §8.15), so none can be added
    oversign: Tuple[str, ...] = ()

    @classmethod
    def from_section(cls, section: DkimConfig) -> "SigningOptions":
        for name, value, allowed in (
            ("header_canon", section.header_canon, ("simple", "relaxed")),
            ("body_canon", section.body_canon, ("simple", "relaxed")),
            ("sign_alg", section.sign_alg, tuple(_HASHES)),
        ):
            if value not in allowed:
                raise ValueError("dkim %s must be one of %s, not %r" % (name, ", ".join(allowed), value))
        return cls(section.header_canon, section.body_canon, section.sign_alg, section.fold_header,
                   tuple(h.lower() for h in section.oversign_headers))

    @property
    def canonicalization(self) -> str:
        return "%s/%s" % (self.header_canon, self.body_canon)

    def hash_name(self, key: "SigningKey") -> str:
        """RSA keys hash with ``sign_alg``; Ed25519 is defined with sha256 only (RFC 8463)."""
        return "sha256" if key.key_type == "ed25519" else self.sign_alg

    def algorithm(self, key: "SigningKey") -> str:
        """The a= tag: ``rsa-sha1``, ``rsa-sha256`` or ``ed25519-sha256``."""
        return "%s-%s" % (key.key_type, self.hash_name(key))


# -- signature computation (runs in the thread pool) ------------------------------------------
@dataclass(frozen=True)
class SignatureRequest:
    """Everything the signer needs except the body; built on the reactor thread."""

    key: "SigningKey"
    options: SigningOptions
    #: the signed headers in message order: (name as received, value as received)
    headers: Tuple[Tuple[str, str], ...]
    timestamp: int


def signed_headers(headers: Sequence[Tuple[str, str]],
                   also: AbstractSet[str] = frozenset()) -> Tuple[Tuple[str, str], ...]:
    """SPEC §6.7: every occurrence, in message order, of the headers in ``SIGNED_HEADERS`` (and ``also``)."""
    return tuple((name, value) for name, value in headers
                 if name.lower() in SIGNED_HEADERS or name.lower() in also)


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


def compute_signature(request: SignatureRequest, body: bytes,
                      body_hashes: Optional[Dict[Tuple[str, str], bytes]] = None) -> str:
    """The DKIM-Signature header value, "\r" removed (SPEC §6.7).  Blocking: thread pool only.

    ``body_hashes`` caches body hashes by (canonicalisation, hash) across the signatures of
    one message.
    """
    options = request.options
    key = request.key
    hash_name = options.hash_name(key)
    # dkimpy (and the dnspython it pulls in, ~5 MB) is loaded by the first signature, so a
    # configuration without DKIM never pays for it
    import dkim as dkimpy  # type: ignore[import-untyped]
    from dkim.canonicalization import CanonicalizationPolicy  # type: ignore[import-untyped]

    policy = CanonicalizationPolicy.from_c_value(options.canonicalization.encode("ascii"))
    cache = body_hashes if body_hashes is not None else {}
    cached = (options.body_canon, hash_name)
    if cached not in cache:
        cache[cached] = body_hash(body, options.body_canon, hash_name)
    bh = base64.b64encode(cache[cached]).decode("ascii")
    names = [name for name, _ in request.headers]
    # oversigning: each listed name once more than it occurs (an absent one once), so a header
    # added later breaks the signature; dkimpy's select_headers hashes nothing for the extra name
    extra = list(options.oversign)
    include = [_wire(name.lower()) for name in names] + [_wire(name) for name in extra]
    tags: List[Tuple[str, str]] = [
        ("v", "1"),
        ("a", options.algorithm(key)),
        ("c", options.canonicalization),
        ("d", key.domain),
        ("s", key.selector),
    ]
    if key.identity is not None:
        tags.append(("i", key.identity))
    tags += [
        ("t", str(request.timestamp)),
        ("bh", bh),
        ("h", ":".join(names + [_header_spelling(name) for name in extra])),
    ]
    # The layout (and so the hashed value) must not depend on the signature bytes: lay it out
    # with a placeholder of the signature's exact base64 length, then put the signature in.
    placeholder_length = 4 * ((key.signature_length + 2) // 3)
    draft = signature_value(tags + [("b", "A" * placeholder_length)], options.fold_header)

    hash_factory, crypto_hash = _HASHES[hash_name]
    hasher = hash_factory()
    fields = header_fields(request.headers)
    # dkimpy's hash_headers strips the b= value itself (RE_BTAG), as its verifier does
    dkimpy.hash_headers(
        hasher,
        policy,
        policy.canonicalize_headers(fields),
        include,
        (HEADER_NAME.encode("ascii"), b" " + draft.encode("ascii")),
        None,
    )
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, utils

    private_key = key.private_key
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        # RFC 8463 §3: PureEdDSA over the SHA-256 hash of the header data (what RSA signs too)
        signature = private_key.sign(hasher.digest())
    else:
        signature = private_key.sign(hasher.digest(), padding.PKCS1v15(), utils.Prehashed(getattr(hashes, crypto_hash)()))
    encoded = base64.b64encode(signature).decode("ascii")
    assert len(encoded) == placeholder_length
    b_start = draft.rindex("b=") + 2
    lines: List[str] = []
    used = 0
    for line in draft[b_start:].split("\r\n\t"):  # the placeholder, maybe folded
        lines.append(encoded[used : used + len(line)])
        used += len(line)
    return (draft[:b_start] + "\r\n\t".join(lines)).replace("\r", "")


def compute_signatures(requests: Sequence[SignatureRequest], body: bytes) -> List[str]:
    """One DKIM-Signature value per request, in order, sharing body hashes.  Thread pool only."""
    body_hashes: Dict[Tuple[str, str], bytes] = {}
    return [compute_signature(request, body, body_hashes) for request in requests]


def _header_spelling(lowercase: str) -> str:
    """How an oversigned name is written in h=: ``from`` -> ``From``, ``message-id`` -> ``Message-Id``."""
    return "-".join(part.capitalize() for part in lowercase.split("-"))
