"""Every directive of SPEC §4.5-§4.11 (and the extensions): its documented default and a set value.

One generated test per directive: an empty file gives the default (and no
origin); a file setting the directive gives the expected typed value, with
the origin at the line that set it.
"""
from __future__ import annotations

import ipaddress
import os
from typing import Any, Callable, Dict, List, Tuple

from twisted.trial.unittest import SynchronousTestCase

from rmilter.config import parse_text
from rmilter.config.directives import SECTIONS
from rmilter.config.parser import default_tempdir
from rmilter.config.schema import Bucket, Config, Origin, RedisServer, ServerSpec
from rmilter.netlist import NetList, RecipientList
from rmilter.testing.config import StubResolver


def nets(*texts: str) -> NetList:
    return NetList(ipaddress.ip_network(t) for t in texts)


MIB = 1024 * 1024

#: a PEM file for the tls_* directives (they read it when parsed)
PEM = os.path.join(__import__("tempfile").mkdtemp(prefix="rmilter-pem-"), "ca.pem")
with open(PEM, "w") as _f:
    _f.write("-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n")

#: (section, directive, value text, expected default, expected value); attribute = directive
#: except check_auth (strict_auth)
CASES: List[Tuple[str, str, str, Any, Any]] = [
    ("main", "pidfile", "/run/rmilter/rmilter.pid", None, "/run/rmilter/rmilter.pid"),
    ("main", "tempdir", "/", default_tempdir(), "/"),
    ("main", "tempfiles_mode", "640", 0o600, 0o640),
    ("main", "bind_socket", "unix:/run/rmilter/rmilter.sock", None, "unix:/run/rmilter/rmilter.sock"),
    ("main", "max_size", "5k", 0, 5120),
    ("main", "strict_auth", "yes", False, True),
    ("main", "check_auth", "on", False, True),
    ("main", "whitelist", 'postmaster, "@example.org"', RecipientList(), RecipientList(["postmaster", "@example.org"])),
    ("main", "our_networks", '10.0.0.0/8, "192.0.2.1 2001:db8::/32"', NetList(),
     nets("10.0.0.0/8", "192.0.2.1/32", "2001:db8::/32")),
    ("main", "use_redis", "yes", False, True),
    ("main", "syslog_name", '"rmilter-test"', "rmilter", "rmilter-test"),
    ("main", "use_dcc", "yes", False, True),
    ("main", "spf_domains", "example.com, mail.ru", (), ("example.com", "mail.ru")),
    ("main", "max_frame_size", "4M", 2 * MIB, 4 * MIB),
    ("main", "listen_backlog", "4096", 1024, 4096),
    ("main", "spool_memory_limit", "512k", MIB, 512 * 1024),
    ("main", "spool_memory_total", "64M", 4 * MIB, 64 * MIB),
    ("main", "workers", "auto", 1, 0),
    ("main", "idle_timeout", "10m", 900.0, 600.0),
    ("main", "progress_interval", "5s", 10.0, 5.0),
    ("main", "shutdown_timeout", "1m", 30.0, 60.0),
    ("main", "trace_header", '"X-Rmilter-Trace"', None, "X-Rmilter-Trace"),
    ("main", "dry_run", "yes", False, True),
    ("main", "metrics_socket", "inet:11340@127.0.0.1", None, "inet:11340@127.0.0.1"),
    ("main", "bind_socket_owner", "nobody", None, "nobody"),
    ("main", "bind_socket_group", "postfix", None, "postfix"),
    ("main", "bind_socket_mode", "0666", 0o660, 0o666),
    ("main", "user", "nobody", None, "nobody"),
    ("main", "group", "nogroup", None, "nogroup"),
    ("clamav", "servers", 'clamd, /var/run/clamav/clamd.ctl, 127.0.0.1:3311, "host:3310:5"', (), (
        ServerSpec("clamd", host="clamd", port=3310),
        ServerSpec("/var/run/clamav/clamd.ctl", path="/var/run/clamav/clamd.ctl"),
        ServerSpec("127.0.0.1:3311", host="127.0.0.1", port=3311),
        ServerSpec("host:3310:5", host="host", port=3310, priority=5),
    )),
    ("clamav", "connect_timeout", "2s", 1.0, 2.0),
    ("clamav", "port_timeout", "4s", 3.0, 4.0),
    ("clamav", "results_timeout", "30s", 20.0, 30.0),
    ("clamav", "error_time", "20", 10.0, 20.0),
    ("clamav", "dead_time", "60", 300.0, 60.0),
    ("clamav", "maxerrors", "3", 10, 3),
    ("clamav", "whitelist", "192.0.2.0/24", NetList(), nets("192.0.2.0/24")),
    ("clamav", "dry_run", "yes", False, True),
    ("spamd", "servers", 'r:localhost:11333, rspamd2, "10.0.0.2:11334:2"', (), (
        ServerSpec("localhost:11333", host="localhost", port=11333),
        ServerSpec("rspamd2", host="rspamd2", port=11333),
        ServerSpec("10.0.0.2:11334:2", host="10.0.0.2", port=11334, priority=2),
    )),
    ("spamd", "also_check", "r:other:11333", (), (ServerSpec("other:11333", host="other", port=11333),)),
    ("spamd", "diff_dir", "/", None, "/"),
    ("spamd", "symbols_dir", '"/"', None, "/"),
    ("spamd", "check_symbols", '"A,B"', None, "A,B"),
    ("spamd", "rspamd_metric", '"other"', "default", "other"),
    ("spamd", "connect_timeout", "500ms", 1.0, 0.5),
    ("spamd", "results_timeout", "1m", 20.0, 60.0),
    ("spamd", "error_time", "5", 10.0, 5.0),
    ("spamd", "dead_time", "30", 300.0, 30.0),
    ("spamd", "maxerrors", "2", 10, 2),
    ("spamd", "retry_count", "2", 5, 2),
    ("spamd", "retry_timeout", "250ms", 1.0, 0.25),
    ("spamd", "tempfail_on_error", "yes", False, True),
    ("spamd", "reject_message", '"Go away"', "Spam message rejected; If this is not spam contact abuse team", "Go away"),
    ("spamd", "whitelist", "[::1]/128, 127.0.0.1", NetList(), nets("::1/128", "127.0.0.1/32")),
    ("spamd", "spamd_soft_fail", "no", True, False),
    ("spamd", "spamd_greylist", "no", True, False),
    ("spamd", "spamd_never_reject", "yes", False, True),
    ("spamd", "spamd_spam_add_header", "no", True, False),
    ("spamd", "spam_header", '"X-Spam-Flag"', "X-Spam", "X-Spam-Flag"),
    ("spamd", "spam_header_value", '"YES"', "yes", "YES"),
    ("spamd", "spam_no_auth_header", "yes", False, True),
    ("spamd", "extended_spam_headers", "yes", False, True),
    ("spamd", "extended_headers_rcpt", "@example.org", RecipientList(), RecipientList(["@example.org"])),
    ("spamd", "spamd_settings_id", '"outbound"', None, "outbound"),
    ("spamd", "trace_symbol", '"SYM"', None, "SYM"),
    ("spamd", "trace_addr", '"trace@example.org"', None, "trace@example.org"),
    ("spamd", "compression", "yes", False, True),
    ("spamd", "spam_bar_char", '"*"', "x", "*"),
    ("spamd", "protocol", "legacy", "checkv2", "legacy"),
    ("spamd", "dry_run", "yes", False, True),
    ("spamd", "tls_ca", '"%s"' % PEM, None, PEM),
    ("spamd", "tls_cert", '"%s"' % PEM, None, PEM),
    ("spamd", "tls_key", '"%s"' % PEM, None, PEM),
    ("spamd", "tls_verify", "no", True, False),
    ("redis", "servers_grey", 'localhost, "10.0.0.5:6380"', (),
     (RedisServer("localhost", "localhost", 6379), RedisServer("10.0.0.5:6380", "10.0.0.5", 6380))),
    ("redis", "servers_white", "redis-white", (), (RedisServer("redis-white", "redis-white", 6379),)),
    ("redis", "servers_limits", "redis:6379", (), (RedisServer("redis:6379", "redis", 6379),)),
    ("redis", "servers_id", "[::1]:6390", (), (RedisServer("[::1]:6390", "::1", 6390),)),
    ("redis", "servers_spam", "spam-redis", (), (RedisServer("spam-redis", "spam-redis", 6379),)),
    ("redis", "servers_copy", "copy-redis:7000", (), (RedisServer("copy-redis:7000", "copy-redis", 7000),)),
    ("redis", "connect_timeout", "3s", 1.0, 3.0),
    ("redis", "error_time", "7", 10.0, 7.0),
    ("redis", "dead_time", "70", 300.0, 70.0),
    ("redis", "maxerrors", "1", 10, 1),
    ("redis", "password", '"secret"', None, "secret"),
    ("redis", "dbname", '"2"', None, "2"),
    ("redis", "grey_prefix", '"g."', "grey", "g."),
    ("redis", "white_prefix", '"w."', "white", "w."),
    ("redis", "id_prefix", '"message_id."', "id", "message_id."),
    ("redis", "spam_channel", '"spam"', None, "spam"),
    ("redis", "copy_channel", '"copy"', None, "copy"),
    ("redis", "copy_probability", "0.25", 1.0, 0.25),
    ("redis", "protocol", "tcp", None, "tcp"),
    ("redis", "id_expire", "2d", 86400.0, 2 * 86400.0),
    ("greylisting", "enable", "no", True, False),
    ("greylisting", "timeout", "10m", 300.0, 600.0),
    ("greylisting", "expire", "2d", 86400.0, 2 * 86400.0),
    ("greylisting", "expire_white", "7d", 3 * 86400.0, 7 * 86400.0),
    ("greylisting", "whitelist", "192.0.2.1", NetList(), nets("192.0.2.1/32")),
    ("greylisting", "greylisted_message", '"Later"', "Try again later", "Later"),
    ("greylisting", "ipv4_mask", "24", None, 24),
    ("greylisting", "ipv6_mask", "48", 64, 48),
    ("greylisting", "key_on_spf_domain", "yes", False, True),
    ("greylisting", "dry_run", "yes", False, True),
    ("limits", "enable", "no", True, False),
    ("limits", "limit_to", "3:0.5", Bucket(), Bucket(3, 0.5)),
    ("limits", "limit_to_ip", "4:1", Bucket(), Bucket(4, 1.0)),
    ("limits", "limit_to_ip_from", "5:0.000277778", Bucket(), Bucket(5, 0.000277778)),
    ("limits", "limit_bounce_to", "6:2.5", Bucket(), Bucket(6, 2.5)),
    ("limits", "limit_bounce_to_ip", "7:0.1", Bucket(), Bucket(7, 0.1)),
    ("limits", "limit_whitelist", '"10.1.0.0/16"', NetList(), nets("10.1.0.0/16")),
    ("limits", "limit_whitelist_rcpt", "postmaster, abuse", RecipientList(), RecipientList(["postmaster", "abuse"])),
    ("limits", "limit_bounce_addrs", "postmaster, <>", (), ("postmaster", "<>")),
    ("limits", "dry_run", "yes", False, True),
    ("dkim", "enable", "no", True, False),
    ("dkim", "header_canon", "relaxed", "simple", "relaxed"),
    ("dkim", "body_canon", "relaxed", "simple", "relaxed"),
    ("dkim", "sign_alg", "sha256", "sha1", "sha256"),
    ("dkim", "auth_only", "no", True, False),
    ("dkim", "sign_networks", "192.0.2.0/25", NetList(), nets("192.0.2.0/25")),
    ("dkim", "fold_header", "yes", False, True),
    ("dkim", "rspamd_sign", "yes", False, True),
    ("dkim", "key_table", "/etc/opendkim/KeyTable", None, "/etc/opendkim/KeyTable"),
    ("dkim", "signing_table", '"refile:/etc/opendkim/SigningTable"', None, "refile:/etc/opendkim/SigningTable"),
    ("dkim", "multiple_signatures", "yes", False, True),
    ("dkim", "oversign_headers", "From, Subject", (), ("from", "subject")),
]

ATTRIBUTE = {"check_auth": "strict_auth"}


def snippet(section: str, directive: str, value: str) -> str:
    statement = "%s = %s;" % (directive, value)
    if section == "main":
        return "# line 1\n%s\n" % statement
    return "# line 1\n%s {\n    %s\n}\n" % (section, statement)


def get(config: Config, section: str, attribute: str) -> Any:
    return getattr(getattr(config, section), attribute)


class DirectiveTests(SynchronousTestCase):
    """Generated below: test_<section>_<directive> for every row of CASES."""

    def check(self, section: str, directive: str, value: str, default: Any, expected: Any) -> None:
        attribute = ATTRIBUTE.get(directive, directive)
        origin_key = "%s.%s" % (section, attribute)
        empty = parse_text("", "empty.conf", resolver=StubResolver())
        self.assertEqual(get(empty, section, attribute), default)
        self.assertNotIn(origin_key, empty.origins)
        config = parse_text(snippet(section, directive, value), "set.conf", resolver=StubResolver())
        self.assertEqual(get(config, section, attribute), expected)
        self.assertNotEqual(expected, default)
        origin = config.origins[origin_key]
        self.assertEqual((origin.file, origin.line), ("set.conf", 2 if section == "main" else 3))

    def test_every_directive_has_a_case(self) -> None:
        """The table above covers every directive the parser knows (except DKIM block fields)."""
        known = {(s, d.name) for s, directives in SECTIONS.items() for d in directives if s != "dkim.domain"}
        self.assertEqual(known, {(s, d) for s, d, _, _, _ in CASES})


def _make_test(case: Tuple[str, str, str, Any, Any]) -> Callable[[DirectiveTests], None]:
    section, directive, value, default, expected = case

    def test(self: DirectiveTests) -> None:
        self.check(section, directive, value, default, expected)

    test.__doc__ = "%s.%s: default %r; '%s' gives %r" % (section, directive, default, value, expected)
    return test


for _case in CASES:
    setattr(DirectiveTests, "test_%s_%s" % (_case[0], _case[1]), _make_test(_case))


class DkimDomainTests(SynchronousTestCase):
    def test_no_domains_by_default(self) -> None:
        """dkim.domain: no signing domains unless a domain { } block is written."""
        self.assertEqual(parse_text("", resolver=StubResolver()).dkim.domains, ())

    def test_domain_block(self) -> None:
        """dkim.domain { key; domain; selector; }: one entry, domain lowercased, origin at the block."""
        keydir = self.mktemp()
        text = 'dkim {\n  domain {\n    key = %s;\n    domain = "Example.COM";\n    selector = "s1";\n  };\n}\n' % keydir
        config = parse_text(text, "d.conf", resolver=StubResolver())
        (domain,) = config.dkim.domains
        self.assertEqual((domain.domain, domain.selector, domain.key), ("example.com", "s1", keydir))
        self.assertEqual(domain.key_origin, Origin("d.conf", 3))
        self.assertEqual((config.origins["dkim.domain"].line, getattr(domain.origin, "line", None)), (2, 2))


class CopyProbabilityTests(SynchronousTestCase):
    def test_percentages_and_fractions(self) -> None:
        """copy_probability: up to 1 is a fraction, above 1 up to 100 a percentage (SPEC §4.8)."""
        for text, expected in (("0", 0.0), ("1", 1.0), ("0.5", 0.5), ("50", 0.5), ("100", 1.0), ("2.5", 0.025)):
            config = parse_text("redis { copy_probability = %s; }" % text, resolver=StubResolver())
            self.assertAlmostEqual(config.redis.copy_probability, expected, msg=text)


class ExtendedDefaultsTests(SynchronousTestCase):
    def test_https_servers(self) -> None:
        """issue 12: ``https://host[:port[:priority]]`` is TLS, default port 443; plain entries stay plain."""
        config = parse_text('spamd { servers = "https://rspamd.example.org", "https://[2001:db8::1]:8443:2", '
                            '"http://r.example:11334", "127.0.0.1"; };')
        self.assertEqual([(s.host, s.port, s.priority, s.tls) for s in config.spamd.servers], [
            ("rspamd.example.org", 443, 0, True), ("2001:db8::1", 8443, 2, True),
            ("r.example", 11334, 0, False), ("127.0.0.1", 11333, 0, False)])
        self.assertEqual(config.spamd.servers[0].name, "https://rspamd.example.org")

    def test_tls_files_must_be_readable_pem(self) -> None:
        from rmilter.config import ConfigError

        for text, reason in (('"/nonexistent/ca.pem"', "cannot read"), ('"%s"' % os.devnull, "not a PEM file")):
            with self.assertRaises(ConfigError) as caught:
                parse_text("spamd {\n tls_ca = %s;\n};" % text)
            self.assertIn("<string>:2:", str(caught.exception))
            self.assertIn(reason, str(caught.exception))

    def test_tls_verify_no_is_warned(self) -> None:
        config = parse_text("spamd {\n tls_verify = no;\n};")
        self.assertEqual([w for w in config.warnings if "tls_verify" in w],
                         ["<string>:2: spamd tls_verify = no: the certificates of https:// Rspamd servers "
                          "are not verified"])

    def test_default_ports(self) -> None:
        """B6: clamav and rspamd servers without a port get 3310 and 11333; Redis 6379."""
        config = parse_text("clamav { servers = c; } spamd { servers = s; } redis { servers_grey = r; }",
                            resolver=StubResolver())
        self.assertEqual((config.clamav.servers[0].port, config.spamd.servers[0].port,
                          config.redis.servers_grey[0].port), (3310, 11333, 6379))

    def test_tempdir_follows_tmpdir(self) -> None:
        """SPEC §4.5: without tempdir the default is $TMPDIR, else /tmp."""
        old = os.environ.get("TMPDIR")
        try:
            os.environ["TMPDIR"] = "/var/tmp"
            self.assertEqual(parse_text("", resolver=StubResolver()).main.tempdir, "/var/tmp")
            del os.environ["TMPDIR"]
            self.assertEqual(parse_text("", resolver=StubResolver()).main.tempdir, "/tmp")
        finally:
            if old is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = old

    def test_directives_table_only_names_schema_attributes(self) -> None:
        """Every directive maps onto an attribute of its schema section (no typo can hide a value)."""
        config = Config()
        for section, directives in SECTIONS.items():
            if section == "dkim.domain":
                continue
            for directive in directives:
                self.assertTrue(hasattr(getattr(config, section), directive.attribute), directive.name)

    def test_memcached_section_shares_the_redis_directives(self) -> None:
        """SPEC §4.8: memcached { } takes the same directives; with use_redis = yes it is Redis."""
        config = parse_text("use_redis = yes; memcached { servers_grey = r:6380; grey_prefix = \"g\"; }",
                            resolver=StubResolver())
        self.assertEqual(config.cache_backend, "redis")
        self.assertEqual(config.redis.grey_prefix, "g")
        self.assertEqual(config.origins["redis.grey_prefix"].line, 1)

    def test_origin_dictionary(self) -> None:
        """Dict-typed helper kept honest: origins only hold directives that were written."""
        config = parse_text("max_size = 1k;\nspamd { retry_count = 1; }\n", resolver=StubResolver())
        keys: Dict[str, int] = {k: o.line for k, o in config.origins.items()}
        self.assertEqual(keys, {"main.max_size": 1, "spamd.retry_count": 2})


class UserGroupDirectiveTests(SynchronousTestCase):
    def test_unknown_group_is_a_file_line_error(self) -> None:
        """Issue 13: a group that does not exist is refused when the file is read, with FILE:LINE."""
        from rmilter.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            parse_text("user = nobody;\nbind_socket_group = no-such-group-13;\n", "x.conf", resolver=StubResolver())
        self.assertEqual(caught.exception.errors,
                         ["x.conf:2: bind_socket_group: group 'no-such-group-13' does not exist"])
