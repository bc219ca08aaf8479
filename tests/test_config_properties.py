"""Property tests of the configuration parser (hypothesis).

- Generated valid configurations parse, print (``format_config``) and parse
  back to an equal ``Config``; printing is then a fixed point.
- Random mutations of real configuration files raise nothing but
  ``ConfigError``; a mutant that still parses also survives the round trip.
"""
from __future__ import annotations

import dataclasses
import os
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Tuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rmilter.config import ConfigError, format_config, parse_text
from rmilter.config import directives as dirs
from rmilter.config.schema import Config
from rmilter.testing.config import CorpusMissing, StubResolver, corpus_dir, rewrite_includes

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rmilter.conf.sample")


def comparable(config: Config) -> Config:
    """The configuration without where-it-came-from (origins, warnings, files)."""
    return dataclasses.replace(config, origins=MappingProxyType({}), warnings=(), files=())


def parse(text: str, name: str = "<generated>") -> Config:
    return parse_text(text, name, resolver=StubResolver())


#: a PEM file for the tls_* directives (read when parsed)
PEM = os.path.join(__import__("tempfile").mkdtemp(prefix="rmilter-pem-"), "ca.pem")
with open(PEM, "w") as _f:
    _f.write("-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n")

# --- value strategies, per kind of directive --------------------------------------------------

def cased(words: List[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(words).flatmap(lambda w: st.sampled_from([w, w.upper(), w.capitalize()]))


safe_text = st.text(st.characters(blacklist_characters='"\x00', blacklist_categories=("Cs",)), max_size=24)  # type: ignore[arg-type]
host = st.from_regex(r"[a-z]([a-z0-9-]{0,9}[a-z0-9])?(\.[a-z][a-z0-9]{0,6}){0,2}", fullmatch=True)
port = st.integers(1, 65535)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: "%d.%d.%d.%d" % (n >> 24, (n >> 16) & 255, (n >> 8) & 255, n & 255))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: __import__("ipaddress").IPv6Address(n).compressed)


def ip_entry(quoted: bool) -> st.SearchStrategy[str]:
    v4 = st.tuples(ipv4, st.one_of(st.just(""), st.integers(0, 32).map("/{}".format))).map("".join)
    v6 = st.tuples(ipv6, st.one_of(st.just(""), st.integers(0, 128).map("/{}".format))).map(
        lambda t: (t[0] + t[1]) if quoted else "[%s]%s" % t)
    return st.one_of(v4, v6, st.just("localhost"))


ip_item = st.one_of(
    ip_entry(False),
    st.lists(ip_entry(True), min_size=1, max_size=3).flatmap(
        lambda entries: st.sampled_from([", ", "; ", " "]).map(lambda sep: '"%s"' % sep.join(entries))),
)
recipient = st.from_regex(r"(@[a-z0-9.-]{1,10}|[a-z0-9._+-]{1,10}(@[a-z0-9.-]{1,10})?)", fullmatch=True)
word = st.from_regex(r"[a-z<>][a-z0-9._<>-]{0,12}", fullmatch=True)


def server(rspamd: bool) -> st.SearchStrategy[str]:
    tcp = st.tuples(host, st.one_of(st.just(""), port.map(":{}".format))).map("".join)
    with_priority = st.tuples(host, port, st.integers(0, 100)).map(lambda t: '"%s:%d:%d"' % t)
    unix = st.from_regex(r"/run/[a-z]{1,8}\.sock", fullmatch=True)
    if not rspamd:
        return st.one_of(tcp, with_priority, unix)
    # every spamd entry loses one leading "r:" (SPEC §4.4, C's add_spamd_server): a host named
    # "r" needs the prefix written out ("r:r:1:0"; "r:1:0" is host "1", port 0)
    prefixed = tcp.map(lambda s: "r:" + s)
    return st.one_of(tcp.map(_spamd_entry), with_priority.map(_spamd_entry), unix, prefixed)


def _spamd_entry(entry: str) -> str:
    """An entry without the prefix: one whose host is "r" gets it, so it means what it says."""
    quoted = entry.startswith('"')
    text = entry.strip('"')
    if text == "r" or text.startswith("r:"):
        text = "r:" + text
    return '"%s"' % text if quoted else text


cache_server = st.tuples(st.one_of(host, ipv4), st.one_of(st.just(""), port.map(":{}".format))).map("".join)

SCALAR_TEXT: Dict[Any, st.SearchStrategy[str]] = {
    dirs.FLAG: cased(["yes", "no", "on", "off", "true", "false"]),
    dirs.NUMBER: st.integers(0, 10**6).map(str),
    dirs.SIZE: st.tuples(st.integers(0, 10**5), st.sampled_from(["", "k", "K", "m", "M", "g"])).map(
        lambda t: "%d%s" % t),
    dirs.TIME: st.one_of(
        st.tuples(st.integers(0, 3650), st.sampled_from(["s", "m", "h", "d", "ms", "S", "MS"])).map(
            lambda t: "%d%s" % t),
        st.tuples(st.integers(0, 10**5), st.integers(0, 999)).map(lambda t: "%d.%03ds" % t),
    ),
    dirs.SECONDS: st.integers(0, 10**6).map(str),
    dirs.BUCKET: st.tuples(st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 10**6)).map(
        lambda t: "%d:%d.%06d" % t),
    dirs.OCTAL: st.integers(0, 0o7777).map("0{:o}".format),
    dirs.PROBABILITY: st.integers(0, 100000).map(lambda n: "%d.%03d" % divmod(n, 1000)),
    dirs.HEADER_NAME: st.from_regex(r"X-[A-Za-z0-9-]{1,12}", fullmatch=True).map('"{}"'.format),
    dirs.TEXT: safe_text.map('"{}"'.format),
    dirs.PATH: safe_text.filter(bool).map('"{}"'.format),
    dirs.DIRECTORY: st.sampled_from(["/", "/tmp", '"/"']),
    dirs.PEM_FILE: st.just('"%s"' % PEM),
    dirs.SOCKET: st.sampled_from(["unix:/run/rmilter/rmilter.sock", "inet:11332@127.0.0.1", "inet:9900",
                                  '"inet6:11332@[::1]"', "fd:3", "/run/rmilter.sock"]),
    dirs.DBNAME: st.integers(0, 15).map('"{}"'.format),
    dirs.WORKERS: st.one_of(st.integers(1, 256).map(str), cased(["auto"])),
    dirs.IPV4_PREFIX: st.integers(0, 32).map(str),
    dirs.IPV6_PREFIX: st.integers(0, 128).map(str),
    dirs.KEY_TABLE: st.sampled_from(["/etc/opendkim/KeyTable", '"file:/etc/opendkim/key table"']),
    dirs.USER: st.sampled_from(["root", "nobody", '"postfix"', "0"]),
    dirs.GROUP: st.sampled_from(["root", "nogroup", '"postfix"', "0"]),
    dirs.SIGNING_TABLE: st.sampled_from(["/etc/opendkim/SigningTable", '"refile:/etc/opendkim/SigningTable"',
                                         '"file:/etc/opendkim/signing"']),
}


def value_text(directive: dirs.Directive) -> st.SearchStrategy[str]:
    kind = directive.kind
    if directive.name == "metrics_socket":  # never a milter socket (refused: tests/test_metrics.py)
        return st.sampled_from(["inet:11340@127.0.0.1", "unix:/run/rmilter/metrics.sock", '"inet6:11340@[::1]"'])
    if isinstance(kind, dirs.Choice):
        return cased(list(kind.choices))
    if kind in SCALAR_TEXT:
        return SCALAR_TEXT[kind]
    assert isinstance(kind, dirs.ListKind), directive
    if isinstance(kind, dirs.IPList):
        item = ip_item
    elif isinstance(kind, dirs.ServerList):
        item = server(kind.rspamd)
    elif isinstance(kind, dirs.CacheServerList):
        item = cache_server
    elif isinstance(kind, dirs.HeaderNameList):
        item = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,12}", fullmatch=True)
    elif kind.recipients:  # type: ignore[attr-defined]
        item = st.one_of(recipient, recipient.map('"{}"'.format))
    else:
        item = st.one_of(word, word.map('"{}"'.format))
    min_size = 0 if directive.allow_empty else 1
    return st.lists(item, min_size=min_size, max_size=4).map(", ".join)


def statements(table: str) -> st.SearchStrategy[List[Tuple[str, str, str]]]:
    choices = [d for d in dirs.SECTIONS[table]]
    one = st.sampled_from(choices).flatmap(
        lambda d: st.tuples(st.just(d.name), st.sampled_from(["=", "+="] if d.is_list else ["="]), value_text(d)))
    return st.lists(one, max_size=6)


dkim_block = st.tuples(
    st.from_regex(r"/nonexistent/[a-z]{1,6}", fullmatch=True),
    st.one_of(st.just("*"), host),
    st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
).map(lambda t: '    domain { key = %s; domain = "%s"; selector = "%s"; };' % t)


@st.composite
def config_texts(draw: Callable[..., Any]) -> str:
    lines = ["%s %s %s;" % s for s in draw(statements("main"))]
    for section in ("clamav", "spamd", "redis", "greylisting", "limits", "dkim"):
        body = draw(statements(section))
        if not body and not draw(st.booleans()):
            continue
        name = section
        if section == "redis":
            name = draw(st.sampled_from(["redis", "memcached"]))
        lines.append("%s {" % name)
        lines.extend("    %s %s %s;" % s for s in body)
        if section == "dkim":
            lines.extend(draw(st.lists(dkim_block, max_size=3)))
        lines.append("}")
    return "\n".join(lines) + "\n"


class RoundTripTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(config_texts())
    def test_generated_configurations_round_trip(self, text: str) -> None:
        """parse -> format_config -> parse gives an equal Config, and printing is a fixed point."""
        first = parse(text)
        printed = format_config(first)
        second = parse(printed, "<printed>")
        self.assertEqual(comparable(second), comparable(first), printed)
        self.assertEqual(format_config(second), printed)

    def test_sample_round_trips(self) -> None:
        """The shipped sample configuration survives the round trip too."""
        with open(SAMPLE, encoding="utf-8") as f:
            first = parse(f.read(), SAMPLE)
        self.assertEqual(comparable(parse(format_config(first))), comparable(first))


# --- mutations of real files -------------------------------------------------------------------

VOCABULARY = ["{", "}", ";", ",", "=", "+=", '"', "#", "\n", " ", "domain {", "spamd {", "}", "yes", "10M",
              "5m", "300", "r:", ".include", ".try_include", "/tmp", "127.0.0.1/33", "[::1]", "localhost",
              "servers_grey", "whitelist", "{a, b}", "key = /nonexistent;", "\x00", "\u00e9", "0:0"]


def corpus_texts() -> List[Tuple[str, str]]:
    texts = []
    try:
        directory = corpus_dir()
    except CorpusMissing:
        directory = None
    names = sorted(os.listdir(directory)) if directory else []
    for name in names:
        if name != "SOURCES.md":
            with open(os.path.join(directory, name), encoding="utf-8") as f:  # type: ignore[arg-type]
                texts.append((name, f.read()))
    with open(SAMPLE, encoding="utf-8") as f:
        texts.append(("rmilter.conf.sample", f.read()))
    return texts


CORPUS = corpus_texts()

mutation = st.tuples(
    st.sampled_from(["delete", "insert", "duplicate", "replace"]),
    st.floats(0, 1),
    st.integers(1, 40),
    st.sampled_from(VOCABULARY),
)


class MutationTests(SynchronousTestCase):
    def setUp(self) -> None:
        if len(CORPUS) == 1:
            try:
                corpus_dir()
            except CorpusMissing as e:
                self.fail(str(e))
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)

    def mutate(self, text: str, mutations: List[Tuple[str, float, int, str]]) -> str:
        for op, where, length, token in mutations:
            at = int(where * len(text))
            if op == "delete":
                text = text[:at] + text[at + length:]
            elif op == "insert":
                text = text[:at] + token + text[at:]
            elif op == "duplicate":
                text = text[:at] + text[at:at + length] + text[at:]
            else:
                text = text[:at] + token + text[at + len(token):]
        return text

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.sampled_from(range(len(CORPUS))), st.lists(mutation, min_size=1, max_size=4))
    def test_mutants_raise_only_config_errors(self, index: int, mutations: List[Tuple[str, float, int, str]]) -> None:
        """A mutated file either parses or raises ConfigError with FILE:LINE messages; nothing else."""
        name, text = CORPUS[index]
        text = rewrite_includes(text, self.workdir, os.path.join(self.workdir, "absent.conf"))
        mutant = self.mutate(text, mutations)
        try:
            config = parse(mutant, name)
        except ConfigError as e:
            self.assertTrue(e.errors)
            for message in e.errors:
                self.assertRegex(message, r"^[^\n]*:\d+: ")
            return
        self.assertEqual(comparable(parse(format_config(config))), comparable(config))
