"""DKIM keys, loaded once per configuration (start and reload), and the key choice of SPEC §6.7.

Named entries (``key`` is a file) and wildcard entries (``key`` is a directory of
``<domain>.<selector>.key`` files) are read and parsed here, when the configuration
is loaded, never per message: the service calls ``load_keyring`` at start and, on
reload, in a thread.  A key file that exists but cannot be read or is not a private
key is an error of the configuration (``KeyringError``, FILE:LINE of its
``domain { }`` block); a key that parses but cannot sign (encrypted, neither RSA nor
Ed25519, too short) is a ``KeyProblem``: signing for that domain fails, logged, the
rest works.

Keys are RSA (PEM, PKCS#1 or PKCS#8, or DER) or Ed25519 (RFC 8463): PKCS#8 PEM/DER as
``openssl genpkey -algorithm ed25519`` writes for OpenDKIM, or the base64 seed dkimpy's
``dknewkey --ktype ed25519`` writes (also the 64-byte seed + public key form of
libsodium).  The search of SPEC §6.7 runs for each key type, so a domain with an RSA
and an Ed25519 entry gets both signatures.

``key_table`` / ``signing_table`` are OpenDKIM's KeyTable and SigningTable
(``rmilter.dkim.tables``): looked up with the address of the ``From:`` header, as
OpenDKIM does; when no SigningTable entry matches, the ``domain { }`` entries decide.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import email.utils
import glob
import os
import re
import stat
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Dict, List, Set, Mapping, Optional, Sequence, Tuple, Union

from twisted.internet.defer import DeferredSemaphore

from rmilter.config.schema import DkimConfig, DkimDomain, Origin
from rmilter.config.values import split_dataset
from rmilter.dkim import tables
from rmilter.dkim.signer import SigningOptions

#: a key file larger than this is not a key
MAX_KEY_SIZE = 1024 * 1024
#: a KeyTable or SigningTable larger than this is refused
MAX_TABLE_SIZE = 64 * 1024 * 1024

#: signatures computed at once in the thread pool (see Keyring.signing_slots): one per core,
#: at most 4 (4 x 2000 2048-bit signatures/s is more than one reactor can feed), so signing
#: never takes every thread of the pool that spool writes also use
SIGNING_THREADS = max(1, min(4, os.cpu_count() or 1))


class KeyLoadError(Exception):
    """A key file that cannot be used; the text says why."""


if TYPE_CHECKING:
    # cryptography is imported where a key is parsed: loading it costs 6 MB of the idle floor,
    # for nothing when DKIM signing is off (issue 19)
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    PrivateKey = Union[rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey]


@dataclass(frozen=True)
class SigningKey:
    """A parsed private key and the d=/s= (and i=, from a SigningTable) it signs with."""

    domain: str
    selector: str
    path: str
    private_key: PrivateKey = field(repr=False, compare=False)
    #: the i= tag (SigningTable's signer field), only when it lies within ``domain``
    identity: Optional[str] = None

    @property
    def key_type(self) -> str:
        """The k= of its DNS record: ``rsa`` or ``ed25519``."""
        from cryptography.hazmat.primitives.asymmetric import ed25519

        return "ed25519" if isinstance(self.private_key, ed25519.Ed25519PrivateKey) else "rsa"

    @property
    def signature_length(self) -> int:
        """Bytes of a signature with this key."""
        from cryptography.hazmat.primitives.asymmetric import ed25519

        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return 64
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
#: what signs one message: its keys in order, a KeyProblem last when one stopped the search
Selection = Union[Tuple[Union[SigningKey, KeyProblem], ...], KeyNotFound]

def _base64_key_bytes(text: bytes) -> Optional[bytes]:
    """The decoded bytes when ``text`` is base64 of a raw Ed25519 key or of DER, else None."""
    try:
        raw = base64.b64decode(b"".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) in (32, 64) or raw[:1] == b"\x30" else None


def looks_like_key(data: bytes) -> bool:
    """PEM, DER (an ASN.1 SEQUENCE) or base64 of a key: worth parsing (else the file is no key at all)."""
    stripped = data.strip()
    if b"-----BEGIN" in data and b"PRIVATE KEY-----" in data:
        return True
    return stripped[:1] == b"\x30" or _base64_key_bytes(stripped) is not None


def load_private_key(data: bytes, path: str) -> PrivateKey:
    """Parse an RSA or Ed25519 private key in any of the formats OpenDKIM and dkimpy use."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_der_private_key, load_pem_private_key

    stripped = data.strip()
    try:
        if b"-----BEGIN" in stripped:
            key = load_pem_private_key(stripped, password=None)
        elif _base64_key_bytes(stripped) is not None:
            # before the DER test: base64 text may begin with "0", which is the byte 0x30 of an
            # ASN.1 SEQUENCE (one dknewkey seed in 64); binary DER is never valid base64 text
            key = _load_base64_key(stripped, path)
        elif stripped[:1] == b"\x30":
            key = load_der_private_key(stripped, password=None)
        else:
            key = _load_base64_key(stripped, path)
    except TypeError:
        raise KeyLoadError("%s: the key is encrypted" % (path,))
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyLoadError("%s: not a private key (%s)" % (path, e))
    if not isinstance(key, (rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise KeyLoadError("%s: not an RSA or Ed25519 key" % (path,))
    return key


def _load_base64_key(text: bytes, path: str) -> Any:
    """dkimpy's Ed25519 file (base64 of the 32-byte seed; libsodium's seed + public key is 64
    bytes), or OpenDKIM's "base64-encoded DER private key" (opendkim.conf(5) KeyTable)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives.serialization import load_der_private_key

    raw = _base64_key_bytes(text)
    if raw is None:
        raise KeyLoadError("%s: not a PEM, DER or base64 private key" % (path,))
    if len(raw) in (32, 64):
        key = ed25519.Ed25519PrivateKey.from_private_bytes(raw[:32])
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if len(raw) == 64 and raw[32:] != public:
            raise KeyLoadError("%s: a 64-byte Ed25519 key whose second half is not its public key" % (path,))
        return key
    return load_der_private_key(raw, password=None)


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


@dataclass(frozen=True)
class TableKey:
    """A KeyTable entry with its key loaded: one key, or (``%`` domain and ``%`` in the key
    path) one key per sender domain found at load time."""

    entry: tables.KeyTableEntry
    key: Union[SigningKey, KeyProblem, None] = None
    by_domain: Mapping[str, Union[SigningKey, KeyProblem]] = field(default_factory=dict)
    #: the key path with ``%`` for the domain (for "no key file" reasons)
    path_pattern: str = ""


@dataclass(frozen=True)
class OpenDkimTables:
    """A KeyTable and a SigningTable, loaded."""

    keys: Mapping[str, TableKey]
    signing: tables.SigningTable
    multiple_signatures: bool

    def select(self, user: str, domain: str) -> List[Union[SigningKey, KeyProblem]]:
        """What the SigningTable gives for ``user@domain`` (the From: address), in table order."""
        chosen: List[Union[SigningKey, KeyProblem]] = []
        for rule in self.signing.lookup(user, domain, self.multiple_signatures):
            chosen.append(self._resolve(rule, domain))
        return chosen

    def _resolve(self, rule: tables.SigningRule, domain: str) -> Union[SigningKey, KeyProblem]:
        name = domain if rule.key_name == "%" else rule.key_name
        table_key = self.keys.get(name)
        if table_key is None:
            return KeyProblem(domain, "", "", "%s: SigningTable entry '%s' names key '%s', which the KeyTable "
                              "does not define" % (rule.where, rule.pattern, name))
        entry = table_key.entry
        signing_domain = domain if entry.domain == "%" else entry.domain
        if table_key.key is not None:
            key = table_key.key
        else:
            found = table_key.by_domain.get(signing_domain)
            if found is None:
                return KeyProblem(signing_domain, entry.selector, table_key.path_pattern,
                                  "%s: no key file %s" % (entry.where,
                                                          tables.substitute(table_key.path_pattern, signing_domain)))
            key = found
        if isinstance(key, KeyProblem):
            return key
        identity = tables.substitute(rule.signer, domain) if rule.signer else None
        if identity is not None and not domain_covers(signing_domain, identity.rsplit("@", 1)[-1].lower()):
            identity = None  # opendkim.conf(5): i= is left out when it conflicts with d=
        return dataclasses.replace(key, domain=signing_domain, identity=identity)


class Keyring:
    """DKIM keys loaded at start and on reload, and the SPEC §6.7 key choice."""

    def __init__(
        self,
        named: Mapping[str, Sequence[Union[SigningKey, KeyProblem]]],
        wildcards: Sequence[WildcardEntry],
        options: SigningOptions,
        problems: Sequence[str] = (),
        signing_threads: Optional[int] = None,
        opendkim: Optional[OpenDkimTables] = None,
    ) -> None:
        #: named entries by domain: at most one per key type, in configuration order
        self.named = {domain: tuple(entries) for domain, entries in named.items()}
        self.wildcards = tuple(wildcards)
        self.options = options
        self.opendkim = opendkim
        #: what was wrong at load time (also logged then), for check-config style reports
        self.problems = tuple(problems)
        #: signatures computed at the same time.  More threads than cores add no throughput
        #: (OpenSSL is CPU-bound) but more threads competing with the reactor for the GIL in
        #: their Python parts; bench/dkim_bench.py shows the reactor's lateness halving.
        self.signing_slots = DeferredSemaphore(signing_threads or SIGNING_THREADS)

    def find_all(self, domain: str) -> Selection:
        """SPEC §6.7 for sender domain ``domain``, once per key type: named entries first, then
        wildcards in order; the first RSA and the first Ed25519 key found sign.  An unusable key
        ends the search (it is returned last, after the keys found before it)."""
        found: List[Union[SigningKey, KeyProblem]] = []
        types: Set[str] = set()
        searched: List[str] = []
        candidates: List[Union[SigningKey, KeyProblem]] = list(self.named.get(domain, ()))
        for candidate in candidates:
            if self._take(candidate, found, types):
                return tuple(found)
        for entry in self.wildcards:
            if len(types) == 2:
                break
            if not domain_covers(entry.pattern, domain):
                continue
            key = entry.keys.get(domain)
            if key is None:
                searched.append(entry.key_path(domain))
            elif self._take(key, found, types):
                return tuple(found)
        if found:
            return tuple(found)
        if searched:
            return KeyNotFound(domain, "no key file %s" % (", ".join(searched),))
        return KeyNotFound(domain, "no dkim domain entry for it")

    @staticmethod
    def _take(key: Union[SigningKey, KeyProblem], found: List[Union[SigningKey, KeyProblem]],
              types: Set[str]) -> bool:
        """Add ``key`` unless one of its type was found; True when the search ends (a problem)."""
        if isinstance(key, KeyProblem):
            found.append(key)
            return True
        if key.key_type not in types:
            types.add(key.key_type)
            found.append(key)
        return False

    def find(self, domain: str) -> KeyChoice:
        """The first key ``find_all`` gives (or why there is none)."""
        selection = self.find_all(domain)
        return selection if isinstance(selection, KeyNotFound) else selection[0]

    def select(self, envelope_domain: Optional[str], from_address: Optional[str]) -> Selection:
        """What signs a message: the SigningTable entries for the From: address, else the
        ``domain { }`` entries for the envelope sender's domain."""
        if self.opendkim is not None and from_address is not None and "@" in from_address:
            user, _, domain = from_address.rpartition("@")
            chosen = self.opendkim.select(user, domain.lower())
            if chosen:
                return tuple(chosen)
        if envelope_domain is None:
            return KeyNotFound("", "sender has no domain")
        if not self.named and not self.wildcards:
            return KeyNotFound(envelope_domain, "no SigningTable entry for %s" % (from_address or "the sender",))
        return self.find_all(envelope_domain)

    @property
    def key_count(self) -> int:
        usable = [k for keys in self.named.values() for k in keys if isinstance(k, SigningKey)]
        for entry in self.wildcards:
            usable.extend(k for k in entry.keys.values() if isinstance(k, SigningKey))
        if self.opendkim is not None:
            for table_key in self.opendkim.keys.values():
                if isinstance(table_key.key, SigningKey):
                    usable.append(table_key.key)
                usable.extend(k for k in table_key.by_domain.values() if isinstance(k, SigningKey))
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
    if len(data) > MAX_KEY_SIZE or not looks_like_key(data):
        raise KeyringError(["%sdkim key %r is not a private key (PEM, DER or base64)" % (_where(entry), path)])
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


def _too_short(key: SigningKey) -> Optional[str]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    if isinstance(key.private_key, rsa.RSAPrivateKey) and key.private_key.key_size < 1024:
        return "dkim key %s has %d bits: verifiers refuse keys under 1024 bits" % (key.path, key.private_key.key_size)
    return None


def build_keyring(section: DkimConfig,
                  origins: Mapping[str, Origin] = MappingProxyType({})) -> Tuple[Keyring, List[str]]:
    """Load every key of the dkim section; the keyring and the problems found (blocking).

    Raises ``KeyringError`` when a key file is unusable as a file (see ``_named_key_data``), or
    a KeyTable / SigningTable cannot be read or has a broken line.
    """
    problems: List[str] = []
    errors: List[str] = []
    options = SigningOptions.from_section(section)
    named: Dict[str, List[Union[SigningKey, KeyProblem]]] = {}
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
            loaded = _load_named(entry, data)
            entries = named.setdefault(entry.domain, [])
            if isinstance(loaded, KeyProblem):
                problems.append("dkim key for domain %s unusable: %s" % (entry.domain, loaded.reason))
            elif any(isinstance(k, SigningKey) and k.key_type == loaded.key_type for k in entries):
                problems.append("dkim domain %s has two %s keys; the first entry is used"
                                % (entry.domain, loaded.key_type))
                continue
            else:
                short = _too_short(loaded)
                if short:
                    problems.append(short)
            entries.append(loaded)
        elif os.path.isdir(entry.key):
            wildcards.append(_load_directory(entry, problems))
        else:
            problems.append(
                "dkim key %s for domain %s is neither a readable key file nor a directory; the entry never signs"
                % (entry.key, entry.domain)
            )
            wildcards.append(WildcardEntry(entry.domain, entry.selector, entry.key))
    opendkim = None
    try:
        opendkim = _load_tables(section, origins, problems)
    except KeyringError as e:
        errors.extend(e.errors)
    if errors:
        raise KeyringError(errors)
    return Keyring(named, wildcards, options, problems, opendkim=opendkim), problems


def _directive_where(origins: Mapping[str, Origin], name: str) -> str:
    origin = origins.get("dkim." + name)
    return "%s:%d: " % (origin.file, origin.line) if origin is not None else ""


def _read_table(origins: Mapping[str, Origin], name: str, path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TABLE_SIZE + 1)
    except OSError as e:
        raise KeyringError(["%sdkim %s %s cannot be read: %s"
                            % (_directive_where(origins, name), name, path, e.strerror or e)])
    if len(data) > MAX_TABLE_SIZE:
        raise KeyringError(["%sdkim %s %s is larger than %d bytes"
                            % (_directive_where(origins, name), name, path, MAX_TABLE_SIZE)])
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise KeyringError(["%s:%d: a non-ASCII byte (OpenDKIM tables are ASCII)" % (path, line)])


def _load_tables(section: DkimConfig, origins: Mapping[str, Origin], problems: List[str]) -> Optional[OpenDkimTables]:
    """The KeyTable and SigningTable of the section, keys loaded; None when neither is set."""
    if section.signing_table is not None and section.key_table is None:
        raise KeyringError(["%sdkim signing_table needs a key_table (as OpenDKIM's SigningTable needs a KeyTable)"
                            % (_directive_where(origins, "signing_table"),)])
    if section.key_table is None:
        return None
    _, key_path = split_dataset(section.key_table)
    try:
        entries = tables.parse_key_table(key_path, _read_table(origins, "key_table", key_path))
    except tables.TableError as e:
        raise KeyringError(e.errors)
    errors: List[str] = []
    loaded: Dict[str, TableKey] = {}
    base = os.path.dirname(os.path.abspath(key_path))
    for name, entry in entries.items():
        try:
            loaded[name] = _load_table_key(entry, base, problems)
        except KeyringError as e:
            errors.extend(e.errors)
    if section.signing_table is None:
        problems.append("dkim key_table %s is set without a signing_table: no message is signed with its keys"
                        % (key_path,))
        signing = tables.SigningTable(key_path, False, ())
    else:
        kind, signing_path = split_dataset(section.signing_table)
        try:
            signing = tables.parse_signing_table(signing_path, _read_table(origins, "signing_table", signing_path),
                                                 refile=kind == "refile")
        except tables.TableError as e:
            raise KeyringError(errors + e.errors)
        errors.extend(tables.unknown_key_names(signing, list(entries)))
    if errors:
        raise KeyringError(errors)
    return OpenDkimTables(loaded, signing, section.multiple_signatures)


def _load_table_key(entry: tables.KeyTableEntry, base: str, problems: List[str]) -> TableKey:
    """Load a KeyTable entry's key: one file, the files a ``%`` path matches, or inline data."""
    if not entry.key_is_file:
        return TableKey(entry, _parse_table_key(entry, entry.domain, entry.key.encode("ascii"), entry.where,
                                                problems))
    path = os.path.normpath(os.path.join(base, entry.key))
    if entry.domain != "%":
        path = tables.substitute(path, entry.domain)
        return TableKey(entry, _parse_table_key(entry, entry.domain, _table_key_file(entry, path), path, problems),
                        path_pattern=path)
    if "%" not in path:
        return TableKey(entry, _parse_table_key(entry, "%", _table_key_file(entry, path), path, problems),
                        path_pattern=path)
    # "%" domain and "%" in the path: one key per domain, found by listing the files now
    pattern = re.compile("(.+)".join(re.escape(part) for part in path.split("%")) + r"\Z")
    by_domain: Dict[str, Union[SigningKey, KeyProblem]] = {}
    for candidate in sorted(glob.glob(glob.escape(path).replace("%", "*"))):
        m = pattern.match(candidate)
        if m is None or len(set(m.groups())) != 1 or not os.path.isfile(candidate):
            continue
        domain = m.group(1).lower()
        if "/" in domain or domain in by_domain:
            continue
        by_domain[domain] = _parse_table_key(entry, domain, _table_key_file(entry, candidate), candidate, problems)
    if not by_domain:
        problems.append("%s: no key file matches %s; KeyTable entry '%s' never signs" % (entry.where, path, entry.name))
    return TableKey(entry, None, by_domain, path_pattern=path)


def _table_key_file(entry: tables.KeyTableEntry, path: str) -> bytes:
    try:
        data = read_key_file(path, MAX_KEY_SIZE + 1)
    except OSError as e:
        raise KeyringError(["%s: key file %s of KeyTable entry '%s' cannot be read: %s"
                            % (entry.where, path, entry.name, e.strerror or e)])
    if len(data) > MAX_KEY_SIZE or not looks_like_key(data):
        raise KeyringError(["%s: key file %s of KeyTable entry '%s' is not a private key (PEM, DER or base64)"
                            % (entry.where, path, entry.name)])
    return data


def _parse_table_key(entry: tables.KeyTableEntry, domain: str, data: bytes, path: str,
                     problems: List[str]) -> Union[SigningKey, KeyProblem]:
    try:
        key = SigningKey(domain, entry.selector, path, load_private_key(data, path))
    except KeyLoadError as e:
        problem = KeyProblem(domain, entry.selector, path, "%s: %s" % (entry.where, e))
        problems.append("dkim KeyTable entry '%s' unusable: %s" % (entry.name, problem.reason))
        return problem
    short = _too_short(key)
    if short:
        problems.append(short)
    return key


def load_keyring(section: DkimConfig, origins: Mapping[str, Origin] = MappingProxyType({})) -> Optional[Keyring]:
    """The keyring of a configuration, or None when DKIM signing is off (blocking: start, reload thread).

    The problems found are in ``Keyring.problems``, for the service to log; an unusable key
    file or table raises ``KeyringError``.
    """
    if not section.enable or not (section.domains or section.key_table or section.signing_table):
        return None
    keyring, _problems = build_keyring(section, origins)
    import dkim  # noqa: F401  # type: ignore[import-untyped]  # signing is on: load dkimpy now, not in the first signature
    return keyring


def sender_domain(envelope_from: str) -> Optional[str]:
    """SPEC §6.7: the text after ``@`` of the (normalised, lowercase) sender."""
    if "@" not in envelope_from:
        return None
    domain = envelope_from.rsplit("@", 1)[1].strip().lower()
    return domain or None
