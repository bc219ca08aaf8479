"""Every directive of rmilter.conf: its section, value type and list rules (SPEC §4.5-§4.12).

One table drives the parser (how to read a value, whether ``=`` resets a
list), the printer (how to write it back) and ``check-config`` (the order in
which directives are listed).  Attribute names are the schema's, which are
the directive names, except the ``check_auth`` synonym.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from rmilter.config import values as v
from rmilter.config.endpoints import endpoint_description
from rmilter.config.lexer import QUOTED, WORD, Token
from rmilter.config.schema import CLAMD_DEFAULT_PORT, RSPAMD_DEFAULT_PORT
from rmilter.netlist import NetList, RecipientList


@dataclass(frozen=True)
class Group:
    """``{a, b}``: a mirrored server pair, only meaningful in servers_grey/servers_white."""

    items: Tuple[Token, ...]
    file: str
    line: int
    kind: str = "group"

    @property
    def text(self) -> str:
        return "{%s}" % ", ".join(t.text for t in self.items)


ValueToken = Union[Token, Group]


class Context:
    """What a value conversion may need: name resolution (cached per load) and warnings."""

    def __init__(self, resolver: v.Resolver) -> None:
        self._resolver = resolver
        self._cache: Dict[str, Sequence[str]] = {}
        self._failed: Dict[str, OSError] = {}
        self.pending_warnings: List[str] = []

    def resolve(self, name: str) -> Sequence[str]:
        key = name.lower()
        if key in self._failed:
            raise self._failed[key]
        if key not in self._cache:
            try:
                self._cache[key] = tuple(self._resolver(name))
            except OSError as e:
                self._failed[key] = e
                raise
        return self._cache[key]

    def warn(self, message: str) -> None:
        self.pending_warnings.append(message)


def _text(token: ValueToken) -> str:
    if isinstance(token, Group):
        raise v.ValueProblem("'{...}' pairs are only allowed in servers_grey and servers_white")
    return token.text


# --- scalar kinds ---------------------------------------------------------------------------------


class Kind:
    """A scalar value type: read one value token, write one value back."""

    description = "value"

    def convert(self, token: ValueToken, ctx: Context) -> Any:
        raise NotImplementedError

    def format(self, value: Any) -> str:
        raise NotImplementedError


class _Simple(Kind):
    def __init__(self, description: str, parse: Callable[[str], Any], fmt: Callable[[Any], str]) -> None:
        self.description = description
        self._parse = parse
        self._format = fmt

    def convert(self, token: ValueToken, ctx: Context) -> Any:
        return self._parse(_text(token))

    def format(self, value: Any) -> str:
        return self._format(value)


FLAG = _Simple("flag", v.parse_flag, v.format_flag)
NUMBER = _Simple("number", v.parse_number, str)
SIZE = _Simple("size", v.parse_size, v.format_size)
TIME = _Simple("time", v.parse_time, v.format_time)
SECONDS = _Simple("number of seconds", v.parse_seconds, v.format_seconds)
BUCKET = _Simple("bucket", v.parse_bucket, v.format_bucket)
OCTAL = _Simple("octal mode", v.parse_octal_mode, v.format_octal_mode)
PROBABILITY = _Simple("probability", v.parse_probability, v.format_decimal)
HEADER_NAME = _Simple("header name", v.parse_header_name, v.quote)


def _nonempty(text: str) -> str:
    if not text:
        raise v.ValueProblem("an empty string is not allowed here")
    return text


TEXT = _Simple("string", lambda s: s, v.quote)
PATH = _Simple("path", _nonempty, v.quote)


def _digits(text: str) -> str:
    if not text.isdigit():
        raise v.ValueProblem("%r is not a database number" % text)
    return text


DBNAME = _Simple("database number", _digits, v.quote)


def _workers(text: str) -> int:
    """``auto`` (one per core, stored as 0) or a count of worker processes from 1 to 256."""
    if text.lower() == "auto":
        return 0
    count = v.parse_number(text)
    if not 1 <= count <= 256:
        raise v.ValueProblem("workers must be auto or 1..256, not %d" % count)
    return count


WORKERS = _Simple("worker count (auto or 1..256)", _workers, lambda n: "auto" if n == 0 else str(n))


def _directory(text: str) -> str:
    _nonempty(text)
    try:
        mode = os.stat(text).st_mode
    except OSError as e:
        raise v.ValueProblem("cannot use directory %r: %s" % (text, e.strerror or e)) from None
    if not stat.S_ISDIR(mode):
        raise v.ValueProblem("%r is not a directory" % text)
    return text


DIRECTORY = _Simple("directory", _directory, v.quote)


def _pem_file(text: str) -> str:
    """A PEM file read when the runtime is made: it must be readable now (issue 12)."""
    _nonempty(text)
    try:
        with open(text, "rb") as f:
            head = f.read(65536)
    except OSError as e:
        raise v.ValueProblem("cannot read %r: %s" % (text, e.strerror or e)) from None
    if b"-----BEGIN " not in head:
        raise v.ValueProblem("%r is not a PEM file" % text)
    return text


PEM_FILE = _Simple("PEM file", _pem_file, v.quote)


def _prefix_length(bits: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        length = v.parse_number(text)
        if length > bits:
            raise v.ValueProblem("%s is not a prefix length of %d bits or fewer" % (text, bits))
        return length

    return parse


IPV4_PREFIX = _Simple("IPv4 prefix length (0-32)", _prefix_length(32), str)
IPV6_PREFIX = _Simple("IPv6 prefix length (0-128)", _prefix_length(128), str)


def _dataset(types: Tuple[str, ...]) -> Callable[[str], str]:
    """An OpenDKIM data set naming a flat file: ``[type:]PATH`` with one of ``types`` (opendkim(8))."""

    def parse(text: str) -> str:
        kind, path = v.split_dataset(text)
        if kind not in types:
            raise v.ValueProblem(
                "OpenDKIM data sets of type %s: are not supported here; use %s" % (kind, " or ".join(
                    "%s:FILE" % t for t in types)))
        _nonempty(path)
        return text

    return parse


KEY_TABLE = _Simple("KeyTable file ([file:]PATH)", _dataset(("file",)), v.quote)
SIGNING_TABLE = _Simple("SigningTable file ([file:|refile:]PATH)", _dataset(("file", "refile")), v.quote)


def _socket(text: str) -> str:
    endpoint_description(text)
    return text


SOCKET = _Simple("socket spec", _socket, v.quote)


def _user(text: str) -> str:
    import pwd

    _nonempty(text)
    try:
        pwd.getpwnam(text) if not text.isdigit() else pwd.getpwuid(int(text))
    except KeyError:
        raise v.ValueProblem("user %r does not exist" % text) from None
    return text


def _group(text: str) -> str:
    import grp

    _nonempty(text)
    try:
        grp.getgrnam(text) if not text.isdigit() else grp.getgrgid(int(text))
    except KeyError:
        raise v.ValueProblem("group %r does not exist" % text) from None
    return text


#: a user or group name (or number) that exists on this host (checked when the file is read)
USER = _Simple("user name", _user, v.quote)
GROUP = _Simple("group name", _group, v.quote)


class Choice(Kind):
    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.description = " or ".join(choices)

    def convert(self, token: ValueToken, ctx: Context) -> str:
        text = _text(token).lower()
        if text not in self.choices:
            raise v.ValueProblem("%r is not %s" % (_text(token), self.description))
        return text

    def format(self, value: str) -> str:
        return value


# --- list kinds -----------------------------------------------------------------------------------


class ListKind:
    """A list value type: each comma-separated item gives zero or more entries."""

    description = "list"

    def convert_item(self, token: ValueToken, ctx: Context) -> List[Any]:
        raise NotImplementedError

    def format_item(self, entry: Any) -> str:
        raise NotImplementedError

    def finish(self, entries: List[Any]) -> Any:
        return tuple(entries)

    def entries(self, value: Any) -> List[Any]:
        return list(value)


class ServerList(ListKind):
    description = "server list"

    def __init__(self, default_port: int, rspamd: bool) -> None:
        self.default_port = default_port
        self.rspamd = rspamd

    def convert_item(self, token: ValueToken, ctx: Context) -> List[Any]:
        return [v.parse_server(_text(token), self.default_port, self.rspamd)]

    def format_item(self, entry: Any) -> str:
        return v.format_server(entry, self.rspamd)


class CacheServerList(ListKind):
    description = "Redis server list"

    def __init__(self, mirrored: bool) -> None:
        self.mirrored = mirrored

    def convert_item(self, token: ValueToken, ctx: Context) -> List[Any]:
        if isinstance(token, Group):
            if not self.mirrored:
                raise v.ValueProblem("'{...}' pairs are only allowed in servers_grey and servers_white")
            first = self._one(token.items[0], ctx)
            ctx.warn(
                "mirrored servers are no longer supported: %s ignored, %s used"
                % (", ".join(t.text for t in token.items[1:]), token.items[0].text)
            )
            return [first]
        return [self._one(token, ctx)]

    def _one(self, token: Token, ctx: Context) -> Any:
        server, rewritten = v.parse_cache_server(token.text)
        if rewritten:
            ctx.warn("%s: port 11211 is the memcached port; using the Redis port 6379 (as C rmilter did)"
                     % token.text)
        return server

    def format_item(self, entry: Any) -> str:
        return v.format_cache_server(entry)


class IPList(ListKind):
    description = "IP list"

    def convert_item(self, token: ValueToken, ctx: Context) -> List[Any]:
        text = _text(token)
        entries = v.split_ip_item(text) if token.kind == QUOTED else [text]
        if not entries:
            raise v.ValueProblem("empty IP list item %r" % text)
        networks: List[Any] = []
        problems: List[str] = []
        for entry in entries:
            try:
                networks.extend(v.parse_ip_entry(entry, ctx.resolve, ctx.pending_warnings))
            except v.ValueProblem as e:
                problems.append(str(e))
        if not networks:
            raise v.ValueProblem("; ".join(problems))
        for problem in problems:  # SPEC §4.4: unusable entries beside usable ones are only logged
            ctx.warn("%s (ignored; the rest of %r is used)" % (problem, text))
        return networks

    def format_item(self, entry: Any) -> str:
        return v.format_network(entry)

    def finish(self, entries: List[Any]) -> NetList:
        return NetList(entries)

    def entries(self, value: Any) -> List[Any]:
        return list(value.networks)


class WordList(ListKind):
    """Recipient lists and plain word lists: entries stored as written."""

    description = "list"

    def __init__(self, recipients: bool) -> None:
        self.recipients = recipients

    def convert_item(self, token: ValueToken, ctx: Context) -> List[Any]:
        text = _text(token)
        if not text:
            ctx.warn('empty entry "" ignored')
            return []
        if token.kind == WORD or not self.recipients:
            return [text]
        if any(c.isspace() for c in text):
            raise v.ValueProblem("%r: a recipient entry cannot contain spaces" % text)
        return [text]

    def format_item(self, entry: Any) -> str:
        return v.quote(entry)

    def finish(self, entries: List[Any]) -> Any:
        return RecipientList(entries) if self.recipients else tuple(dict.fromkeys(entries))

    def entries(self, value: Any) -> List[Any]:
        return list(value.entries) if self.recipients else list(value)


class HeaderNameList(ListKind):
    """Header field names, stored lowercase (DKIM compares them without case)."""

    description = "header name list"

    def convert_item(self, token: ValueToken, ctx: Context) -> List[Any]:
        return [v.parse_header_name(_text(token)).lower()]

    def format_item(self, entry: Any) -> str:
        return v.quote(entry)

    def finish(self, entries: List[Any]) -> Any:
        return tuple(dict.fromkeys(entries))


SERVER_LIMIT = 32


@dataclass(frozen=True)
class Directive:
    name: str
    kind: Union[Kind, ListKind]
    #: None: scalar; "reset": '=' empties the list first; "append": '=' appends too (SPEC §4.6)
    list_mode: Optional[str] = None
    allow_empty: bool = True
    max_items: Optional[int] = None
    #: schema attribute when it differs from the name (check_auth)
    attr: Optional[str] = None
    #: a warning given whenever the directive is used (accepted but without effect)
    ignored_note: Optional[str] = None

    @property
    def attribute(self) -> str:
        return self.attr or self.name

    @property
    def is_list(self) -> bool:
        return self.list_mode is not None


def _d(*args: Any, **kwargs: Any) -> Directive:
    return Directive(*args, **kwargs)


IP = IPList()
RECIPIENTS = WordList(recipients=True)
WORDS = WordList(recipients=False)
HEADER_NAMES = HeaderNameList()
CLAMD_SERVERS = ServerList(CLAMD_DEFAULT_PORT, rspamd=False)
RSPAMD_SERVERS = ServerList(RSPAMD_DEFAULT_PORT, rspamd=True)

SECTIONS: Dict[str, Tuple[Directive, ...]] = {
    "main": (
        _d("pidfile", PATH),
        _d("tempdir", DIRECTORY),
        _d("tempfiles_mode", OCTAL),
        _d("bind_socket", SOCKET),
        _d("listen_backlog", NUMBER),
        _d("max_size", SIZE),
        _d("strict_auth", FLAG),
        _d("check_auth", FLAG, attr="strict_auth"),
        _d("whitelist", RECIPIENTS, "reset"),
        _d("our_networks", IP, "reset"),
        _d("use_redis", FLAG),
        _d("syslog_name", TEXT),
        _d("use_dcc", FLAG),
        _d("spf_domains", WORDS, "reset", ignored_note="spf support is removed from rmilter; spf_domains ignored"),
        _d("max_frame_size", SIZE),
        _d("spool_memory_limit", SIZE),
        _d("spool_memory_total", SIZE),
        _d("workers", WORKERS),
        _d("idle_timeout", TIME),
        _d("progress_interval", TIME),
        _d("shutdown_timeout", TIME),
        _d("trace_header", HEADER_NAME),
        _d("dry_run", FLAG),
        _d("metrics_socket", SOCKET),
        _d("bind_socket_owner", USER),
        _d("bind_socket_group", GROUP),
        _d("bind_socket_mode", OCTAL),
        _d("user", USER),
        _d("group", GROUP),
    ),
    "clamav": (
        _d("servers", CLAMD_SERVERS, "reset", max_items=SERVER_LIMIT),
        _d("connect_timeout", TIME),
        _d("port_timeout", TIME),
        _d("results_timeout", TIME),
        _d("error_time", SECONDS),
        _d("dead_time", SECONDS),
        _d("maxerrors", NUMBER),
        _d("whitelist", IP, "append", allow_empty=False),
        _d("dry_run", FLAG),
    ),
    "spamd": (
        _d("servers", RSPAMD_SERVERS, "reset", max_items=SERVER_LIMIT),
        # C ignored also_check since 1.8.5; here the servers are scanned in parallel without
        # affecting the verdict, and differing results are written to diff_dir (issue 4)
        _d("also_check", RSPAMD_SERVERS, "append", allow_empty=False, max_items=SERVER_LIMIT),
        _d("diff_dir", DIRECTORY),
        _d("symbols_dir", DIRECTORY),
        _d("check_symbols", TEXT),
        _d("rspamd_metric", TEXT),
        _d("connect_timeout", TIME),
        _d("results_timeout", TIME),
        _d("error_time", SECONDS),
        _d("dead_time", SECONDS),
        _d("maxerrors", NUMBER),
        _d("retry_count", NUMBER),
        _d("retry_timeout", TIME),
        _d("tempfail_on_error", FLAG),
        _d("reject_message", TEXT),
        _d("whitelist", IP, "reset"),
        _d("spamd_soft_fail", FLAG),
        _d("spamd_greylist", FLAG),
        _d("spamd_never_reject", FLAG),
        _d("spamd_spam_add_header", FLAG),
        _d("spam_header", HEADER_NAME),
        _d("spam_header_value", TEXT),
        _d("spam_no_auth_header", FLAG),
        _d("extended_spam_headers", FLAG),
        _d("extended_headers_rcpt", RECIPIENTS, "reset"),
        _d("spamd_settings_id", TEXT),
        _d("trace_symbol", TEXT),
        _d("trace_addr", TEXT),
        _d("compression", FLAG),
        _d("spam_bar_char", TEXT),
        _d("protocol", Choice("checkv2", "legacy")),
        _d("dry_run", FLAG),
        # issue 12: TLS for "https://host[:port]" servers
        _d("tls_ca", PEM_FILE),
        _d("tls_cert", PEM_FILE),
        _d("tls_key", PEM_FILE),
        _d("tls_verify", FLAG),
    ),
    "redis": (
        _d("servers_grey", CacheServerList(mirrored=True), "reset", max_items=SERVER_LIMIT),
        _d("servers_white", CacheServerList(mirrored=True), "reset", allow_empty=False, max_items=SERVER_LIMIT),
        _d("servers_limits", CacheServerList(mirrored=False), "reset", max_items=SERVER_LIMIT),
        _d("servers_id", CacheServerList(mirrored=False), "reset", max_items=SERVER_LIMIT),
        _d("servers_spam", CacheServerList(mirrored=False), "reset", max_items=SERVER_LIMIT),
        _d("servers_copy", CacheServerList(mirrored=False), "reset", max_items=SERVER_LIMIT),
        _d("connect_timeout", TIME),
        _d("error_time", SECONDS),
        _d("dead_time", SECONDS),
        _d("maxerrors", NUMBER),
        _d("password", TEXT),
        _d("dbname", DBNAME),
        _d("grey_prefix", TEXT),
        _d("white_prefix", TEXT),
        _d("id_prefix", TEXT),
        _d("spam_channel", TEXT),
        _d("copy_channel", TEXT),
        _d("copy_probability", PROBABILITY),
        _d("protocol", TEXT),
        _d("id_expire", TIME),
    ),
    "greylisting": (
        _d("enable", FLAG),
        _d("timeout", TIME),
        _d("expire", TIME),
        _d("expire_white", TIME),
        _d("whitelist", IP, "reset", allow_empty=False),
        _d("greylisted_message", TEXT),
        _d("ipv4_mask", IPV4_PREFIX),
        _d("ipv6_mask", IPV6_PREFIX),
        _d("key_on_spf_domain", FLAG),
        _d("dry_run", FLAG),
    ),
    "limits": (
        _d("enable", FLAG),
        _d("limit_to", BUCKET),
        _d("limit_to_ip", BUCKET),
        _d("limit_to_ip_from", BUCKET),
        _d("limit_bounce_to", BUCKET),
        _d("limit_bounce_to_ip", BUCKET),
        _d("limit_whitelist", IP, "reset"),
        _d("limit_whitelist_rcpt", RECIPIENTS, "reset"),
        _d("limit_bounce_addrs", WORDS, "reset"),
        _d("dry_run", FLAG),
    ),
    "dkim": (
        _d("enable", FLAG),
        _d("header_canon", Choice("simple", "relaxed")),
        _d("body_canon", Choice("simple", "relaxed")),
        _d("sign_alg", Choice("sha1", "sha256")),
        _d("auth_only", FLAG),
        _d("sign_networks", IP, "reset"),
        _d("fold_header", FLAG),
        _d("rspamd_sign", FLAG),
        _d("key_table", KEY_TABLE),
        _d("signing_table", SIGNING_TABLE),
        _d("multiple_signatures", FLAG),
        _d("oversign_headers", HEADER_NAMES, "reset"),
    ),
    "dkim.domain": (
        _d("key", PATH),
        _d("domain", TEXT),
        _d("selector", TEXT),
    ),
}

#: section names as written in the file -> table name (both cache sections share one table)
SECTION_NAMES = {
    "clamav": "clamav",
    "spamd": "spamd",
    "redis": "redis",
    "memcached": "redis",
    "greylisting": "greylisting",
    "limits": "limits",
    "dkim": "dkim",
}

TABLES: Dict[str, Dict[str, Directive]] = {
    section: {d.name: d for d in directives} for section, directives in SECTIONS.items()
}

#: SPEC §4.12 (B27): accepted with a warning and ignored
REMOVED_SECTIONS = {
    "beanstalk": "the beanstalk section was removed in rmilter 1.9.0",
    "rule": "rule sections were removed in rmilter 1.9.2",
}
REMOVED_DIRECTIVES: Dict[Optional[str], Dict[str, str]] = {
    "greylisting": {
        name: "%s (greylisting auto-whitelist) was removed in rmilter 1.9.0" % name
        for name in ("awl_enable", "awl_pool", "awl_hits", "awl_ttl")
    },
    None: {  # anywhere
        "id_regexp": "id_regexp was removed in rmilter 1.9.0",
        "lifetime": "lifetime was removed in rmilter 1.9.0",
    },
}


def sections_with(name: str) -> List[str]:
    """Where a directive name is valid, for "wrong section" messages."""
    return [s for s, table in TABLES.items() if name in table and s != "dkim.domain"]
