"""Value types of rmilter.conf (SPEC §4.4): text in, typed value out, and back.

Every function here is pure apart from host name resolution, which goes
through a ``Resolver`` the caller passes in (the loader resolves names once,
at load time, never per message).  Problems raise ``ValueProblem`` with a
message meant for an administrator; the parser adds file, line and directive.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from decimal import Decimal
from typing import Callable, List, Optional, Sequence, Tuple, Union

from rmilter.config.schema import REDIS_DEFAULT_PORT, SENTINEL_DEFAULT_PORT, Bucket, RedisServer, ServerSpec
from rmilter.netlist import IPNetwork

#: resolves a host name to its addresses (text); raises OSError when it cannot
Resolver = Callable[[str], Sequence[str]]

#: B36: times are 64-bit now, but anything above ten years is a typo, not a setting
MAX_TIME_SECONDS = 3650 * 86400.0

#: the memcached port that C silently rewrote to the Redis port (B28)
MEMCACHED_PORT = 11211


class ValueProblem(ValueError):
    """A value that does not fit its directive; the text says why, for the administrator."""


def resolve_host(name: str) -> List[str]:
    """All A and AAAA addresses of ``name`` (blocking: call at load time only)."""
    infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    found = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            found.append(str(sockaddr[0]).split("%", 1)[0])
    if not found:
        raise OSError("no address")
    return list(dict.fromkeys(found))


# --- flags, numbers, sizes, times, buckets ----------------------------------------------------

_FLAGS = {"yes": True, "true": True, "on": True, "no": False, "false": False, "off": False}


def parse_flag(text: str) -> bool:
    """yes/no, true/false, on/off in any letter case (SPEC §4.4 allows any case)."""
    try:
        return _FLAGS[text.lower()]
    except KeyError:
        raise ValueProblem("%r is not a flag (use yes or no)" % text) from None


def format_flag(value: bool) -> str:
    return "yes" if value else "no"


_NUMBER = re.compile(r"[0-9]+\Z")


def parse_number(text: str) -> int:
    if not _NUMBER.match(text):
        raise ValueProblem("%r is not a whole number" % text)
    return int(text)


_SIZE = re.compile(r"([0-9]+)([kKmMgG]?)\Z")
_SIZE_FACTORS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """Bytes, or a binary k/m/g suffix: ``10M`` is 10 MiB (SPEC §4.4)."""
    m = _SIZE.match(text)
    if not m:
        raise ValueProblem("%r is not a size (a number of bytes, or with a k, m or g suffix)" % text)
    return int(m.group(1)) * _SIZE_FACTORS[m.group(2).lower()]


def format_size(value: int) -> str:
    for suffix, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if value and value % factor == 0:
            return "%d%s" % (value // factor, suffix)
    return str(value)


_TIME = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)\Z", re.IGNORECASE)
_TIME_MS = {"ms": 1, "s": 1000, "m": 60000, "h": 3600000, "d": 86400000}


def parse_time(text: str) -> float:
    """A time with a unit, in seconds: s, m (minutes), h, d, ms (milliseconds) (B2, B36).

    Stored with millisecond resolution; a bare number is an error, as in C,
    because nobody can tell whether ``300`` meant seconds or milliseconds.
    """
    m = _TIME.match(text)
    if not m:
        if _NUMBER.match(text):
            raise ValueProblem("%r has no unit (write e.g. %ss, or use m, h, d or ms)" % (text, text))
        raise ValueProblem("%r is not a time (a number with a unit: s, m, h, d or ms)" % text)
    ms = round(Decimal(m.group(1)) * _TIME_MS[m.group(2).lower()])
    seconds = ms / 1000.0
    if seconds > MAX_TIME_SECONDS:
        raise ValueProblem("%r is longer than ten years (3650d)" % text)
    return seconds


def format_time(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    for suffix, factor in (("d", 86400000), ("h", 3600000), ("m", 60000), ("s", 1000)):
        if ms and ms % factor == 0:
            return "%d%s" % (ms // factor, suffix)
    if ms == 0:
        return "0s"
    return "%dms" % ms


def parse_seconds(text: str) -> float:
    """error_time / dead_time: a plain number of seconds (SPEC §4.6)."""
    if not _NUMBER.match(text):
        raise ValueProblem("%r is not a number of seconds" % text)
    value = float(int(text))
    if value > MAX_TIME_SECONDS:
        raise ValueProblem("%r seconds is longer than ten years" % text)
    return value


def format_seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")


def format_decimal(value: float) -> str:
    """Positional notation (no exponent), exact enough to parse back to the same float."""
    text = repr(float(value))
    if "e" in text or "E" in text:
        text = format(Decimal(text), "f")
    return text


_BUCKET = re.compile(r"([0-9]+):([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\Z")


def parse_bucket(text: str) -> Bucket:
    """``burst:rate``: rate in messages per second; 0 in either disables (SPEC §4.4)."""
    m = _BUCKET.match(text)
    if not m:
        raise ValueProblem("%r is not a bucket (burst:rate, e.g. 20:0.016666667)" % text)
    return Bucket(burst=int(m.group(1)), rate=float(m.group(2)))


def format_bucket(bucket: Bucket) -> str:
    return "%d:%s" % (bucket.burst, format_decimal(bucket.rate))


def parse_octal_mode(text: str) -> int:
    """tempfiles_mode: the digits are octal whether written ``00600``, ``640`` or ``"0640"``."""
    if not re.match(r"[0-7]+\Z", text):
        raise ValueProblem("%r is not an octal file mode (e.g. 0600)" % text)
    mode = int(text, 8)
    if mode > 0o7777:
        raise ValueProblem("%r is larger than 07777" % text)
    return mode


def format_octal_mode(mode: int) -> str:
    return "0%o" % mode


def parse_probability(text: str) -> float:
    """copy_probability: a fraction up to 1, a percentage above 1 up to 100 (SPEC §4.8, B12)."""
    if not _DECIMAL.match(text):
        raise ValueProblem("%r is not a number (a fraction 0..1 or a percentage up to 100)" % text)
    value = float(text)
    if value > 100.0:
        raise ValueProblem("%r is above 100 (a fraction 0..1 or a percentage up to 100)" % text)
    if value > 1.0:
        value = value / 100.0
    return value


# --- host names, servers ------------------------------------------------------------------------

_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?\Z")


def _check_host(host: str, spec: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueProblem("%r: %r is not an IPv6 address" % (spec, host)) from None
    if not _HOSTNAME.match(host):
        raise ValueProblem("%r: %r is not a host name or address" % (spec, host))
    return host


def _parse_port(text: str, spec: str) -> int:
    if not _NUMBER.match(text) or not 0 < int(text) < 65536:
        raise ValueProblem("%r: %r is not a port number (1-65535)" % (spec, text))
    return int(text)


def _split_host(spec: str) -> Tuple[str, List[str]]:
    """``host:a:b`` -> ("host", ["a", "b"]); ``[v6]:a`` keeps the brackets on the host."""
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise ValueProblem("%r: missing ']' after the IPv6 address" % spec)
        host, tail = spec[: end + 1], spec[end + 1 :]
        if tail and not tail.startswith(":"):
            raise ValueProblem("%r: expected ':' after ']'" % spec)
        return host, (tail[1:].split(":") if tail else [])
    parts = spec.split(":")
    return parts[0], parts[1:]


#: the port of an ``https://host`` spamd server without one: what every https URL means (issue 12)
HTTPS_DEFAULT_PORT = 443


def parse_server(text: str, default_port: int, allow_rspamd_prefix: bool) -> ServerSpec:
    """A clamav/spamd server: ``host``, ``host:port``, ``host:port:priority``, ``/path``, ``./path``.

    A TCP server without a port gets the default port (B6); ``r:`` is stripped
    for spamd (it only ever meant "rspamd").
    """
    spec = text
    # C's add_spamd_server strips a leading "r:" from every spamd entry, whatever follows
    # (SPEC §4.4): "r:1:0" is host "1" port 0, never host "r"; a spamd host really named
    # "r" is written "r:r:PORT".  clamav entries keep it (host "r").
    if allow_rspamd_prefix and spec.startswith("r:"):
        spec = spec[2:]
        if not spec:
            raise ValueProblem("%r: no server after the r: prefix" % text)
    elif spec.startswith("r:") and not re.fullmatch(r"r:[0-9]{1,5}(:[0-9]+)?", spec):
        # clamav: "r:PORT" is host "r" (C); anything else after "r:" is a spamd habit
        raise ValueProblem("%r: the r: prefix marks rspamd servers; clamav servers take host:port" % text)
    if not spec:
        raise ValueProblem("empty server name")
    scheme = ""
    if allow_rspamd_prefix and spec.lower().startswith(("https://", "http://")):
        # issue 12: "https://host[:port[:priority]]" is reached over TLS (default port 443)
        scheme, _, spec = spec.partition("://")
        scheme = scheme.lower()
        if not spec or spec[0] in "/.":
            raise ValueProblem("%r: a URL names a host (unix sockets are written as a path)" % text)
        if scheme == "https":
            default_port = HTTPS_DEFAULT_PORT
    if spec[0] in "/.":
        path, _, priority_text = spec.partition(":")
        priority = _parse_priority(priority_text, text) if priority_text else 0
        return ServerSpec(name=spec, path=path, priority=priority)
    host, rest = _split_host(spec)
    if len(rest) > 2:
        raise ValueProblem("%r is not host, host:port or host:port:priority" % text)
    host = _check_host(host, text)
    port = _parse_port(rest[0], text) if rest else default_port
    priority = _parse_priority(rest[1], text) if len(rest) > 1 else 0
    name = "%s://%s" % (scheme, spec) if scheme else spec
    return ServerSpec(name=name, host=host, port=port, priority=priority, tls=scheme == "https")


def _parse_priority(text: str, spec: str) -> int:
    if not _NUMBER.match(text):
        raise ValueProblem("%r: priority %r is not a whole number" % (spec, text))
    return int(text)


def format_server(server: ServerSpec, rspamd: bool = False) -> str:
    """The server as configured (minus ``r:``), which parses back to the same ServerSpec.

    A spamd entry whose own text starts with ``r:`` (a host named ``r``) gets the prefix
    back, since the parser strips one ``r:`` from every spamd entry.
    """
    if rspamd and server.name.startswith("r:"):
        return quote("r:" + server.name)
    return quote(server.name)


def parse_cache_server(text: str) -> Tuple[RedisServer, bool]:
    """A Redis server ``host`` or ``host:port`` (SPEC §4.4).

    Returns the server and whether an explicit memcached port 11211 was
    rewritten to 6379 (B28: kept for migrated configs, but worth a warning).
    """
    if not text:
        raise ValueProblem("empty server name")
    if text.startswith(SENTINEL_PREFIX):
        return parse_sentinel_group(text), False
    if text[0] in "/.":
        raise ValueProblem("%r: unix sockets are not supported for Redis (use host:port)" % text)
    host, rest = _split_host(text)
    if len(rest) > 1:
        raise ValueProblem("%r is not host or host:port" % text)
    host = _check_host(host, text)
    port = _parse_port(rest[0], text) if rest else REDIS_DEFAULT_PORT
    rewritten = port == MEMCACHED_PORT
    if rewritten:
        port = REDIS_DEFAULT_PORT
    return RedisServer(name=text, host=host, port=port), rewritten


SENTINEL_PREFIX = "sentinel:"
_MASTER_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")


def parse_sentinel_group(text: str) -> RedisServer:
    """``sentinel:MASTER@host[:port],host[:port]...``: the master of a Redis Sentinel group (SPEC §11).

    Sentinels without a port are on 26379.  The group is one entry of the role's server list,
    so client-side sharding over several entries works as with plain servers.
    """
    master, at, addresses = text[len(SENTINEL_PREFIX):].partition("@")
    if not at or not master:
        raise ValueProblem("%r: expected sentinel:MASTER@host:port[,host:port...]" % text)
    if not _MASTER_NAME.match(master):
        raise ValueProblem("%r: %r is not a Sentinel master name" % (text, master))
    sentinels: List[Tuple[str, int]] = []
    for item in addresses.split(","):
        item = item.strip()
        if not item:
            raise ValueProblem("%r: an empty Sentinel address" % text)
        host, rest = _split_host(item)
        if len(rest) > 1:
            raise ValueProblem("%r: %r is not host or host:port" % (text, item))
        host = _check_host(host, text).strip("[]")
        port = _parse_port(rest[0], text) if rest else SENTINEL_DEFAULT_PORT
        if (host, port) not in sentinels:
            sentinels.append((host, port))
    first_host, first_port = sentinels[0]
    return RedisServer(name=text, host=first_host, port=first_port, master=master, sentinels=tuple(sentinels))


def format_cache_server(server: RedisServer) -> str:
    """The server as configured, which parses back to the same RedisServer."""
    return quote(server.name)


# --- IP lists -------------------------------------------------------------------------------------

_IP_SPLIT = re.compile(r"[,;\s]+")


def split_ip_item(text: str) -> List[str]:
    """A quoted IP-list item may hold several entries separated by ``,`` ``;`` or space."""
    return [e for e in _IP_SPLIT.split(text) if e]


def parse_ip_entry(entry: str, resolver: Resolver, warnings: List[str]) -> List[IPNetwork]:
    """One entry: address, ``address/len``, ``[v6]``, ``[v6]/len`` or a host name (``name/len``).

    Host names are resolved now (all A and AAAA records, each with the given
    prefix length).  Prefix lengths are clamped to /32 and /128 (SPEC §4.4).
    """
    address, slash, mask_text = entry.rpartition("/") if "/" in entry else (entry, "", "")
    mask: Optional[int] = None
    if slash:
        if not _NUMBER.match(mask_text) or len(mask_text) > 3:
            raise ValueProblem("%r: %r is not a prefix length" % (entry, mask_text))
        mask = int(mask_text)
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if not address:
        raise ValueProblem("%r is not an address or network" % entry)
    try:
        addresses = [_literal(address)]
    except ValueError:
        if not _HOSTNAME.match(address) or address.replace(".", "").isdigit():
            raise ValueProblem("%r is not an IP address, network or host name" % entry) from None
        try:
            addresses = [ipaddress.ip_address(a) for a in resolver(address)]
        except (OSError, UnicodeError, ValueError) as e:
            reason = getattr(e, "strerror", None) or str(e) or "no address"
            raise ValueProblem("cannot resolve host name %r: %s" % (address, reason)) from None
        if not addresses:
            raise ValueProblem("cannot resolve host name %r: no address" % address)
    networks: List[IPNetwork] = []
    for ip in addresses:
        maxlen = ip.max_prefixlen
        length = maxlen if mask is None else mask
        if length > maxlen:
            warnings.append("prefix length /%d of %r clamped to /%d" % (length, entry, maxlen))
            length = maxlen
        host_bits = maxlen - length
        value = (int(ip) >> host_bits) << host_bits  # the network address: host bits cleared
        cls = ipaddress.IPv4Network if ip.version == 4 else ipaddress.IPv6Network
        networks.append(cls((value, length)))
    return networks


def _literal(text: str) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """An IP address literal; inet_pton first because ipaddress parses text slowly (5,000-entry lists)."""
    try:
        if ":" in text:
            return ipaddress.IPv6Address(int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big"))
        return ipaddress.IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big"))
    except OSError:
        return ipaddress.ip_address(text)  # scoped IPv6 and the like; raises ValueError when not an address


def format_network(net: IPNetwork) -> str:
    if net.version == 6:
        text = "[%s]" % net.network_address
    else:
        text = str(net.network_address)
    if net.prefixlen != net.max_prefixlen:
        text += "/%d" % net.prefixlen
    return text


def quote(text: str) -> str:
    """Config syntax has no escapes: a value holding ``"`` cannot be written back."""
    if '"' in text:
        raise ValueProblem("%r contains a double quote, which rmilter.conf cannot express" % text)
    return '"%s"' % text


_HEADER_NAME = re.compile(r"[!-9;-~]+\Z")  # RFC 5322 ftext: printable ASCII except ':'


def parse_header_name(text: str) -> str:
    if not _HEADER_NAME.match(text):
        raise ValueProblem("%r is not a header field name (printable ASCII, no spaces or ':')" % text)
    return text


_DATASET_TYPE = re.compile(r"([a-z]+):(.*)\Z", re.S)


def split_dataset(text: str) -> Tuple[str, str]:
    """An OpenDKIM data set name -> (type, rest): ``refile:/x`` -> ("refile", "/x").

    As opendkim(8) reads them: a leading ``type:`` names the type; a name without one (or one
    starting with ``/`` or ``.``) is a flat file.
    """
    if not text.startswith(("/", ".")):
        m = _DATASET_TYPE.match(text)
        if m:
            return m.group(1), m.group(2)
    return "file", text
