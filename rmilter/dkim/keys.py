"""DKIM keys, loaded once per configuration (start and reload), and the key choice of SPEC §6.7.

Named entries (``key`` is a file) and wildcard entries (``key`` is a directory of
``<domain>.<selector>.key`` files) are read and parsed here, when the configuration
is loaded, never per message: the service calls ``load_keyring`` at start and, on
reload, in a thread.  A key file that exists but cannot be read or is not a PEM
private key is an error of the configuration (``KeyringError``, FILE:LINE of its
``domain { }`` block); a key that parses but cannot sign (encrypted, not RSA, too
short) is a ``KeyProblem``: signing for that domain fails, logged, the rest works.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from twisted.internet.defer import DeferredSemaphore

from rmilter.config.schema import DkimConfig, DkimDomain
from rmilter.dkim.signer import SigningOptions

#: a key file larger than this is not a key
MAX_KEY_SIZE = 1024 * 1024

#: signatures computed at once in the thread pool (see Keyring.signing_slots): one per core,
#: at most 4 (4 x 2000 2048-bit signatures/s is more than one reactor can feed), so signing
#: never takes every thread of the pool that spool writes also use
SIGNING_THREADS = max(1, min(4, os.cpu_count() or 1))


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


def read_key_file(path: str, limit: int = -1) -> bytes:
    """Read a key file at load time (start or reload), never per message."""
    with open(path, "rb") as f:
        return f.read(limit)


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


class KeyringError(Exception):
    """Key files the configuration names that cannot be used at all; ``errors`` are ``FILE:LINE: reason``."""

    def __init__(self, errors: List[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _where(entry: DkimDomain) -> str:
    """``FILE:LINE: `` of the entry's ``key`` (else its block), for errors that refuse the configuration."""
    origin = entry.key_origin or entry.origin
    return "%s:%d: " % (origin.file, origin.line) if origin is not None else ""


def _named_key_data(entry: DkimDomain) -> Optional[bytes]:
    """The PEM bytes when ``key`` is a regular file; None for a directory or a missing path.

    Raises ``KeyringError`` for a file that cannot be read or is not a PEM private key (SPEC §4.11:
    the configuration is refused, as a broken config line is).
    """
    path = entry.key
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise KeyringError(["%sdkim key %r: %s" % (_where(entry), path, getattr(e, "strerror", None) or e)])
    if not stat.S_ISREG(mode):
        return None
    try:
        data = read_key_file(path, MAX_KEY_SIZE + 1)
    except OSError as e:
        raise KeyringError(["%sdkim key %r cannot be read: %s" % (_where(entry), path, e.strerror or e)])
    if len(data) > MAX_KEY_SIZE or b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise KeyringError(["%sdkim key %r is not a PEM private key" % (_where(entry), path)])
    return data


def _load_named(entry: DkimDomain, data: bytes) -> Union[SigningKey, KeyProblem]:
    try:
        key = load_private_key(data, entry.key)
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
    """Load every key of the dkim section; the keyring and the problems found (blocking).

    Raises ``KeyringError`` when a key file is unusable as a file (see ``_named_key_data``).
    """
    problems: List[str] = []
    errors: List[str] = []
    options = SigningOptions.from_section(section)
    named: Dict[str, Union[SigningKey, KeyProblem]] = {}
    wildcards: List[WildcardEntry] = []
    for entry in section.domains:
        try:
            data = _named_key_data(entry)
        except KeyringError as e:
            errors.extend(e.errors)
            continue
        if data is not None:
            if entry.domain == "*":
                problems.append(
                    'dkim key file %s is given for domain "*": a key file signs exactly its domain, '
                    "use a key directory for \"*\"; the entry never signs" % (entry.key,)
                )
                continue
            if entry.domain in named:
                problems.append("dkim domain %s is defined twice; the first entry is used" % (entry.domain,))
                continue
            loaded = _load_named(entry, data)
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
    if errors:
        raise KeyringError(errors)
    return Keyring(named, wildcards, options, problems), problems


def load_keyring(section: DkimConfig) -> Optional[Keyring]:
    """The keyring of a configuration, or None when DKIM signing is off (blocking: start, reload thread).

    The problems found are in ``Keyring.problems``, for the service to log; an unusable key
    file raises ``KeyringError``.
    """
    if not section.enable or not section.domains:
        return None
    keyring, _problems = build_keyring(section)
    return keyring


def sender_domain(envelope_from: str) -> Optional[str]:
    """SPEC §6.7: the text after ``@`` of the (normalised, lowercase) sender."""
    if "@" not in envelope_from:
        return None
    domain = envelope_from.rsplit("@", 1)[1].strip().lower()
    return domain or None
