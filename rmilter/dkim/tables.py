"""OpenDKIM's KeyTable and SigningTable, read unchanged (opendkim(8) DATA SETS, opendkim.conf(5)).

Both are flat files: ``#`` starts a comment, blank lines are skipped, the key runs to the
first white space and the value is the rest of the line; several fields of a value are
separated by colons.

- KeyTable: ``NAME DOMAIN:SELECTOR:KEY``.  ``DOMAIN`` ``%`` is the domain of the sender's
  address; ``KEY`` starting with ``/``, ``./`` or ``../`` is a key file (``%`` in it is the
  signing domain; relative paths are taken from the KeyTable's directory), anything else
  is the key itself (base64 DER, or a base64 Ed25519 key).
- SigningTable: ``PATTERN NAME[:SIGNER]``.  ``NAME`` ``%`` is the sender's domain, ``%`` in
  ``SIGNER`` (the i= tag) too.  A ``refile:`` table holds wildcard patterns (``*`` matches
  anything) tried in file order against ``user@domain``; a plain file is looked up with
  ``user@domain``, ``domain``, then ``user@.sub`` and ``.sub`` for each parent domain,
  ``user@*`` and ``*``, in that order (opendkim's ``dkimf_apply_signtable``).  Keys compare
  without case; an address with non-ASCII characters matches nothing (OpenDKIM's
  ``DKIMF_DB_FLAG_ASCIIONLY``).  Only the first match signs unless ``multiple_signatures``.

Parsing is pure; reading the files happens in ``rmilter.dkim.keys`` at load time.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Pattern, Sequence, Tuple

KEY_FILE_PREFIXES = ("/", "./", "../")


class TableError(Exception):
    """Lines of a table that cannot be used; ``errors`` are ``FILE:LINE: reason``."""

    def __init__(self, errors: List[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Line:
    """One data line of a flat file: its number, key and value (None when the line has only a key)."""

    number: int
    key: str
    value: Optional[str]


def data_lines(text: str) -> Iterator[Line]:
    """The key/value lines of an OpenDKIM flat file (comments and blank lines dropped)."""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        yield Line(number, parts[0], parts[1].strip() if len(parts) > 1 else None)


@dataclass(frozen=True)
class KeyTableEntry:
    """``NAME DOMAIN:SELECTOR:KEY`` of a KeyTable."""

    name: str
    domain: str  # lowercase, or "%"
    selector: str
    key: str  # a key file path (see ``key_is_file``) or the key data itself
    where: str  # "FILE:LINE"

    @property
    def key_is_file(self) -> bool:
        return self.key.startswith(KEY_FILE_PREFIXES)


def parse_key_table(path: str, text: str) -> Dict[str, KeyTableEntry]:
    """The entries by name (the first of two with one name is used, as OpenDKIM's lookup does)."""
    entries: Dict[str, KeyTableEntry] = {}
    errors: List[str] = []
    for line in data_lines(text):
        where = "%s:%d" % (path, line.number)
        fields = line.value.split(":", 2) if line.value is not None else []
        if len(fields) != 3 or not all(f.strip() for f in fields):
            errors.append("%s: KeyTable entry for '%s' needs DOMAIN:SELECTOR:KEY, found %r"
                          % (where, line.key, line.value or ""))
            continue
        domain, selector, key = (f.strip() for f in fields)
        entries.setdefault(line.key, KeyTableEntry(line.key, domain.lower(), selector, key, where))
    if errors:
        raise TableError(errors)
    return entries


@dataclass(frozen=True)
class SigningRule:
    """``PATTERN NAME[:SIGNER]`` of a SigningTable."""

    pattern: str
    key_name: str
    signer: Optional[str]
    where: str  # "FILE:LINE"
    regex: Optional[Pattern[str]] = field(default=None, compare=False)


def wildcard_regex(pattern: str) -> Pattern[str]:
    """A refile pattern: ``*`` matches any text, every other character itself, case-insensitively.

    (OpenDKIM's dkimf_mkregexp escapes only ``.`` and ``+`` and hands the rest to regcomp;
    its documentation promises plain wildcards, which is what this gives.)
    """
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class SigningTable:
    """The rules of one SigningTable file; ``lookup`` gives the matches in OpenDKIM's order."""

    path: str
    refile: bool
    rules: Tuple[SigningRule, ...]
    #: plain files: the first rule of each lowercase key
    exact: Dict[str, SigningRule] = field(default_factory=dict, compare=False)

    def lookup(self, user: str, domain: str, multiple: bool) -> List[SigningRule]:
        """The rules that apply to ``user@domain``: the first, or every one when ``multiple``."""
        address = "%s@%s" % (user, domain)
        if not address.isascii():
            return []
        if self.refile:
            matched = (rule for rule in self.rules if rule.regex is not None and rule.regex.fullmatch(address))
        else:
            matched = (self.exact[k] for k in _exact_keys(user, domain.lower()) if k in self.exact)
        found: List[SigningRule] = []
        for rule in matched:
            found.append(rule)
            if not multiple:
                break
        return found


def _exact_keys(user: str, domain: str) -> Iterator[str]:
    """The keys opendkim tries in a plain-file SigningTable, lowercase, in its order."""
    user = user.lower()
    yield "%s@%s" % (user, domain)
    yield domain
    start = domain.find(".")
    while start >= 0:
        parent = domain[start:]
        yield "%s@%s" % (user, parent)
        yield parent
        start = domain.find(".", start + 1)
    yield "%s@*" % (user,)
    yield "*"


def parse_signing_table(path: str, text: str, refile: bool) -> SigningTable:
    """A SigningTable; every line needs a key name (``TableError`` otherwise)."""
    rules: List[SigningRule] = []
    errors: List[str] = []
    for line in data_lines(text):
        where = "%s:%d" % (path, line.number)
        if line.value is None:
            errors.append("%s: SigningTable entry '%s' names no key" % (where, line.key))
            continue
        name, _, signer = line.value.partition(":")
        name = name.strip()
        if not name:
            errors.append("%s: SigningTable entry '%s' names no key" % (where, line.key))
            continue
        regex = wildcard_regex(line.key) if refile else None
        rules.append(SigningRule(line.key, name, signer.strip() or None, where, regex))
    if errors:
        raise TableError(errors)
    exact: Dict[str, SigningRule] = {}
    if not refile:
        for rule in rules:
            exact.setdefault(rule.pattern.lower(), rule)
    return SigningTable(path, refile, tuple(rules), exact)


def substitute(text: str, domain: str) -> str:
    """OpenDKIM's ``%`` token: the sender's domain."""
    return text.replace("%", domain)


def unknown_key_names(table: SigningTable, keys: Sequence[str]) -> List[str]:
    """``FILE:LINE: reason`` for rules naming a key the KeyTable lacks (``%`` is checked per message)."""
    known = set(keys)
    return ["%s: SigningTable entry '%s' names key '%s', which the KeyTable does not define"
            % (rule.where, rule.pattern, rule.key_name)
            for rule in table.rules if rule.key_name != "%" and rule.key_name not in known]
