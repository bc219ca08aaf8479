"""The language of SPEC §4.1-§4.4: comments, quoting, ';' rules, sections, lists, includes, leniencies."""
from __future__ import annotations

import os
from typing import Optional

from twisted.trial.unittest import SynchronousTestCase

from rmilter import config as rconfig
from rmilter.config import ConfigError, listen_endpoint, parse_text
from rmilter.config.schema import Config
from rmilter.dkim.keys import load_keyring
from rmilter.testing.config import StubResolver

PEM = b"-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAK\n-----END RSA PRIVATE KEY-----\n"


def parse(text: str, filename: str = "t.conf", resolver: Optional[StubResolver] = None) -> Config:
    return parse_text(text, filename, resolver=resolver or StubResolver())


class FileTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def load(self, path: str) -> Config:
        return rconfig.load(path, resolver=StubResolver())


class CommentTests(SynchronousTestCase):
    def test_line_comments_and_trailing_comments(self) -> None:
        """'#' starts a comment at line start and after a statement (SPEC §4.3 leniency)."""
        config = parse("# comment\n  # indented\nmax_size = 10M; # ten mebibytes\nspamd {\n"
                       "  reject_message = \"no # comment here\"; # but here\n}\n")
        self.assertEqual(config.main.max_size, 10 * 1024 * 1024)
        self.assertEqual(config.spamd.reject_message, "no # comment here")
        self.assertEqual(config.warnings, ())

    def test_commented_out_statement_after_a_statement_warns(self) -> None:
        """C read 'x; # y = z;' as two statements; we read a comment and say so with file:line."""
        config = parse("use_dcc = yes;\nstrict_auth = yes; # strict_auth = no;\n")
        self.assertTrue(config.main.strict_auth)
        (warning,) = config.warnings
        self.assertTrue(warning.startswith("t.conf:2: text after '#' is a comment here"), warning)


class QuotingTests(SynchronousTestCase):
    def test_quoted_string_may_span_lines_and_lines_stay_right(self) -> None:
        """QUOTED has no escapes and may span lines; later line numbers still count its newlines."""
        config = parse('spamd {\n  reject_message = "first\nsecond";\n  retry_count = 2;\n}\n')
        self.assertEqual(config.spamd.reject_message, "first\nsecond")
        self.assertEqual(config.origins["spamd.retry_count"].line, 4)

    def test_keyword_like_and_digit_values(self) -> None:
        """Leniencies: bare words with digits or '_', keyword-like host names (SPEC §4.3)."""
        config = parse("whitelist = user1@example.com, first_last;\n"
                       "bind_socket = unix:/var/run/rm_milter.sock;\n"
                       "redis { servers_grey = redis; servers_id = spamd; }\n")
        self.assertTrue(config.main.whitelist.matches("<User1@Example.com>"))
        self.assertTrue(config.main.whitelist.matches("<first_last@x.org>"))
        self.assertEqual(config.main.bind_socket, "unix:/var/run/rm_milter.sock")
        self.assertEqual(config.redis.servers_grey[0].host, "redis")
        self.assertEqual(config.redis.servers_id[0].host, "spamd")

    def test_unquoted_path_with_trailing_slash(self) -> None:
        """C lexed '/tmp/;' as a REGEXP and failed; the lenient lexer reads a path."""
        self.assertEqual(parse("tempdir = /tmp/;").main.tempdir, "/tmp/")


class SemicolonTests(SynchronousTestCase):
    def test_top_level_semicolon_optional(self) -> None:
        """At top level ';' after a statement or a section's '}' is optional (SPEC §4.3)."""
        config = parse("bind_socket = inet:9900\nmax_size = 1k\nspamd { retry_count = 1; }\n"
                       "clamav { maxerrors = 2; };\nuse_dcc = yes")
        self.assertEqual(config.main.bind_socket, "inet:9900")
        self.assertEqual(config.main.max_size, 1024)
        self.assertEqual((config.spamd.retry_count, config.clamav.maxerrors), (1, 2))
        self.assertTrue(config.main.use_dcc)

    def test_empty_sections(self) -> None:
        """'name { }' is valid."""
        config = parse("spamd { }\ngreylisting {\n};\n")
        self.assertEqual(config, parse(""))

    def test_stray_semicolons_are_accepted(self) -> None:
        """A stray ';' is harmless."""
        self.assertEqual(parse(";;max_size = 1k;;\nspamd { ; retry_count = 1;; }").main.max_size, 1024)


class SectionAndListTests(SynchronousTestCase):
    def test_sections_repeat_and_later_scalars_win(self) -> None:
        """Sections may repeat; the later scalar value overrides with its own origin."""
        config = parse("spamd { retry_count = 1; }\nspamd { retry_count = 3; }\n")
        self.assertEqual(config.spamd.retry_count, 3)
        self.assertEqual(config.origins["spamd.retry_count"].line, 2)

    def test_equals_resets_and_plus_equals_appends(self) -> None:
        """For lists '=' empties first and '+=' appends, also across repeated sections."""
        config = parse("spamd { whitelist = 10.0.0.1; whitelist += 10.0.0.2; }\n"
                       "spamd { whitelist += 10.0.0.3; }\n"
                       "limits { limit_bounce_addrs = a, b; limit_bounce_addrs = c; }\n")
        self.assertEqual([str(n) for n in config.spamd.whitelist],
                         ["10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32"])
        self.assertEqual(config.limits.limit_bounce_addrs, ("c",))
        self.assertEqual(config.origins["spamd.whitelist"].line, 2)

    def test_empty_list_resets(self) -> None:
        """'x = ;' empties a list where an empty list is allowed."""
        config = parse("our_networks = 10.0.0.0/8;\nour_networks = ;\n")
        self.assertEqual(len(config.main.our_networks), 0)

    def test_clamav_whitelist_equals_appends(self) -> None:
        """SPEC §4.6: clamav whitelist '=' appends (no reset)."""
        config = parse("clamav { whitelist = 10.0.0.1; whitelist = 10.0.0.2; }")
        self.assertEqual(len(config.clamav.whitelist), 2)

    def test_flags_in_any_case(self) -> None:
        """Flags: yes/no/true/false/on/off in any letter case (C rejected 'Yes')."""
        for text, expected in (("Yes", True), ("TRUE", True), ("on", True), ("No", False), ("oFf", False)):
            self.assertEqual(parse("strict_auth = %s;" % text).main.strict_auth, expected, text)


class TimeTests(SynchronousTestCase):
    def test_units(self) -> None:
        """Times: s, m (minutes), h, d and ms (milliseconds) with their natural meaning (B2)."""
        for text, seconds in (("300s", 300.0), ("5m", 300.0), ("2h", 7200.0), ("1d", 86400.0),
                              ("500ms", 0.5), ("1500MS", 1.5), ("10S", 10.0), ("0s", 0.0)):
            config = parse("greylisting { timeout = %s; }" % text)
            self.assertEqual(config.greylisting.timeout, seconds, text)

    def test_long_times_do_not_wrap(self) -> None:
        """B36: 60d is 60 days (C wrapped it to 889032 s)."""
        self.assertEqual(parse("greylisting { expire_white = 60d; }").greylisting.expire_white, 60 * 86400.0)

    def test_m_is_mebibytes_for_sizes(self) -> None:
        """For sizes 'm' stays the binary mega suffix."""
        self.assertEqual(parse("max_size = 10m;").main.max_size, 10 * 1024 * 1024)


class SpecVectorTests(SynchronousTestCase):
    """SPEC §9 'Config parsing (C)', with the §10 changes and the §4.3 leniencies applied."""

    def test_accepted_vectors(self) -> None:
        """5m, 500ms, 60d, max_size values, flags, quoted socket and recipient forms."""
        self.assertEqual(parse("greylisting { timeout = 5m; }").greylisting.timeout, 300.0)
        self.assertEqual(parse("greylisting { timeout = 500ms; }").greylisting.timeout, 0.5)
        self.assertEqual(parse("max_size = 10M; # x").main.max_size, 10 * 1024 * 1024)
        self.assertEqual(parse("max_size = 1000;").main.max_size, 1000)
        self.assertEqual(parse("max_size = 5k;").main.max_size, 5120)
        self.assertTrue(parse("strict_auth = on;").main.strict_auth)
        self.assertEqual(parse('bind_socket = "unix:/var/run/rm_milter.sock";').main.bind_socket,
                         "unix:/var/run/rm_milter.sock")
        self.assertTrue(parse('whitelist = "user1@example.com";').main.whitelist.matches("<user1@example.com>"))

    def test_server_vector(self) -> None:
        """servers = clamd, /var/run/clamav/clamd.ctl, 127.0.0.1:3310, "host:3310:5" (B6 ports)."""
        config = parse('clamav { servers = clamd, /var/run/clamav/clamd.ctl, 127.0.0.1:3310, "host:3310:5"; }')
        self.assertEqual([(s.host, s.port, s.path, s.priority) for s in config.clamav.servers], [
            ("clamd", 3310, None, 0),
            (None, None, "/var/run/clamav/clamd.ctl", 0),
            ("127.0.0.1", 3310, None, 0),
            ("host", 3310, None, 5),
        ])

    def test_rejected_vectors(self) -> None:
        """timeout = 300 (no unit) and copy_probability = 150 stay errors."""
        for text in ("greylisting { timeout = 300; }", "redis { copy_probability = 150; }"):
            error = self.assertRaises(ConfigError, parse, text)
            self.assertTrue(error.errors[0].startswith("t.conf:1: "), error.errors)

    def test_unresolvable_host_is_fatal_with_the_real_resolver(self) -> None:
        """our_networks = "nonexistent.invalid": a fatal error (names resolve at load time)."""
        error = self.assertRaises(ConfigError, parse_text, 'our_networks = "nonexistent.invalid";', "r.conf")
        (message,) = error.errors
        self.assertTrue(message.startswith("r.conf:1: our_networks: cannot resolve host name 'nonexistent.invalid'"),
                        message)

    def test_localhost_resolves_with_the_real_resolver(self) -> None:
        """A host name in an IP list is replaced by its addresses when the file is loaded."""
        config = parse_text('our_networks = "localhost";', "r.conf")
        self.assertIn("127.0.0.1", config.main.our_networks)


class IncludeTests(FileTestCase):
    def test_include_is_spliced_even_inside_a_section(self) -> None:
        """.include splices tokens where it stands; origins name the included file and line."""
        self.write("part.conf", "# part\n  retry_count = 4;\n")
        main = self.write("main.conf", "spamd {\n .include %s\n}\n" % os.path.join(self.dir, "part.conf"))
        config = self.load(main)
        self.assertEqual(config.spamd.retry_count, 4)
        origin = config.origins["spamd.retry_count"]
        self.assertEqual((os.path.basename(origin.file), origin.line), ("part.conf", 2))
        self.assertEqual([os.path.basename(f) for f in config.files], ["main.conf", "part.conf"])

    def test_try_include_without_match_is_silent(self) -> None:
        """.try_include of a missing file or an empty glob is skipped without a warning."""
        main = self.write("main.conf", ".try_include %s/nothing.conf\n.try_include %s/conf.d/*.conf\nmax_size = 1k;\n"
                          % (self.dir, self.dir))
        config = self.load(main)
        self.assertEqual((config.main.max_size, config.warnings), (1024, ()))

    def test_glob_is_read_in_ascending_order(self) -> None:
        """B29: glob matches are read in ascending order, so the last name wins."""
        self.write("conf.d/10-a.conf", "max_size = 1k;\n")
        self.write("conf.d/20-b.conf", "max_size = 2k;\n")
        main = self.write("main.conf", "max_size = 9k;\n.include %s/conf.d/*.conf\n" % self.dir)
        config = self.load(main)
        self.assertEqual(config.main.max_size, 2048)
        self.assertTrue(config.origins["main.max_size"].file.endswith("20-b.conf"))

    def test_relative_include_is_relative_to_the_including_file(self) -> None:
        """A relative pattern is looked up beside the file that includes it."""
        self.write("sub/inner.conf", "max_size = 3k;\n")
        main = self.write("main.conf", ".include sub/inner.conf\n")
        self.assertEqual(self.load(main).main.max_size, 3072)

    def test_quoted_include_pattern(self) -> None:
        """The pattern may be quoted."""
        self.write("with space.conf", "max_size = 4k;\n")
        main = self.write("main.conf", '.include "%s/with space.conf"\n' % self.dir)
        self.assertEqual(self.load(main).main.max_size, 4096)


class RemovedDirectiveTests(SynchronousTestCase):
    def test_removed_directives_warn_and_are_ignored(self) -> None:
        """B27: beanstalk/rule sections, awl_*, id_regexp, lifetime: one warning each, with file:line."""
        text = (
            "beanstalk {\n  servers = localhost:11300;\n  id_regexp = \"/^SomeID.*$/\";\n  lifetime = 172800;\n};\n"
            "rule {\n  accept;\n  header \"Subject\" /spam {2}/;\n};\n"
            "greylisting {\n  awl_enable = yes;\n  awl_pool = 10M;\n  awl_hits = 10;\n  awl_ttl = 3600s;\n"
            "  timeout = 1m;\n};\n"
            "id_regexp = \"x\";\nlifetime = 10;\nmax_size = 1k;\n"
        )
        config = parse(text, "old.conf")
        self.assertEqual(config.greylisting.timeout, 60.0)
        self.assertEqual(config.main.max_size, 1024)
        lines = [w.split(":")[1] for w in config.warnings]
        self.assertEqual(lines, ["1", "6", "11", "12", "13", "14", "17", "18"])
        self.assertIn("beanstalk { } ignored", config.warnings[0])
        self.assertIn("rule { } ignored", config.warnings[1])
        self.assertIn("awl_pool ignored", config.warnings[3])
        self.assertIn("lifetime ignored", config.warnings[7])

    def test_ignored_but_accepted_directives(self) -> None:
        """spf_domains warns; use_dcc, port_timeout and spamd_soft_fail are silent; also_check
        is used (scanned in parallel, issue 4), so it does not warn."""
        config = parse("use_dcc = yes;\nspf_domains = example.com;\nclamav { port_timeout = 4s; }\n"
                       "spamd { spamd_soft_fail = no; also_check = r:x:11333; }\n")
        self.assertEqual(len(config.warnings), 1)
        self.assertTrue(config.warnings[0].startswith("t.conf:2: spf support is removed"))
        self.assertEqual(config.spamd.also_check[0].name, "x:11333")


class CacheServerTests(SynchronousTestCase):
    def test_mirrored_pair_keeps_the_first(self) -> None:
        """{a, b} in servers_grey: b is dropped with a warning (SPEC §4.4)."""
        config = parse("redis {\n  servers_grey = {a, b:6380}, c;\n}")
        self.assertEqual([s.host for s in config.redis.servers_grey], ["a", "c"])
        (warning,) = config.warnings
        self.assertTrue(warning.startswith("t.conf:2: mirrored servers are no longer supported: b:6380 ignored"))

    def test_explicit_memcached_port_is_rewritten_with_a_warning(self) -> None:
        """B28: an explicit :11211 becomes 6379, with a warning."""
        config = parse("redis { servers_limits = r1:11211; }")
        self.assertEqual(config.redis.servers_limits[0].port, 6379)
        self.assertIn("port 11211 is the memcached port", config.warnings[0])


class BackendTests(SynchronousTestCase):
    def test_memcached_section_alone(self) -> None:
        """B13: memcached { } without use_redis is the memcached backend, with a warning."""
        config = parse("\nmemcached {\n  servers_grey = localhost;\n}\ngreylisting { }\n")
        self.assertEqual(config.cache_backend, "memcached")
        self.assertFalse(config.greylisting_active)
        self.assertTrue(config.warnings[0].startswith("t.conf:2: the cache backend is memcached"))

    def test_last_of_use_redis_and_redis_section_wins(self) -> None:
        """SPEC §4.5: redis { } sets use_redis; a later use_redis = no turns it off again."""
        config = parse("redis { servers_grey = localhost; }\nuse_redis = no;\n")
        self.assertFalse(config.main.use_redis)
        self.assertEqual(config.cache_backend, "memcached")
        config = parse("use_redis = no;\nredis { servers_grey = localhost; }\n")
        self.assertEqual((config.main.use_redis, config.cache_backend), (True, "redis"))

    def test_no_cache_section_is_redis_without_warning(self) -> None:
        """Without any cache section there is nothing to refuse."""
        config = parse("use_redis = no;")
        self.assertEqual((config.cache_backend, config.warnings), ("redis", ()))


class DkimTests(FileTestCase):
    def test_key_file_is_read_with_the_keys_not_the_config(self) -> None:
        """A key naming a regular file: the configuration keeps the path (pure data), the keyring
        loaded from it signs for that domain only."""
        key = os.path.join(self.dir, "example.key")
        with open(key, "wb") as f:
            f.write(PEM)
        config = parse('dkim {\n domain {\n  key = "%s";\n  domain = "example.com";\n  selector = "s";\n };\n}' % key)
        (domain,) = config.dkim.domains
        self.assertEqual((domain.key, domain.key_origin.line), (key, 3))  # type: ignore[union-attr]
        keyring = load_keyring(config.dkim)
        assert keyring is not None
        self.assertEqual(list(keyring.named), ["example.com"])
        self.assertEqual(keyring.wildcards, ())

    def test_key_directory_is_a_wildcard_entry(self) -> None:
        """A directory (or a missing path) makes a key-directory entry, without error."""
        config = parse('dkim { domain { key = %s; domain = "*"; selector = "s"; }; '
                       'domain { key = /nonexistent/keys; domain = "x.org"; selector = "s"; }; }' % self.dir)
        keyring = load_keyring(config.dkim)
        assert keyring is not None
        self.assertEqual(keyring.named, {})
        self.assertEqual([w.pattern for w in keyring.wildcards], ["*", "x.org"])

    def test_key_and_domain_outside_a_block_prefill_the_next_block(self) -> None:
        """SPEC §4.11: key and domain written in dkim { } pre-fill the next domain { } block."""
        config = parse('dkim {\n key = /nonexistent;\n domain = "pre.example";\n domain { selector = "s"; };\n'
                       ' domain { key = /k; domain = "other"; selector = "t"; };\n}')
        self.assertEqual([(d.domain, d.key, d.selector) for d in config.dkim.domains],
                         [("pre.example", "/nonexistent", "s"), ("other", "/k", "t")])


class IPListTests(SynchronousTestCase):
    def test_quoted_item_holds_several_entries_and_host_names(self) -> None:
        """A quoted item splits on ',' ';' and blanks; names resolve to all addresses, with the mask."""
        resolver = StubResolver()
        config = parse('our_networks = "10.0.0.1; 2001:db8::/48 mx.example.test/24", [::1];', resolver=resolver)
        self.assertEqual(sorted(str(n) for n in config.main.our_networks), sorted([
            "10.0.0.1/32", "2001:db8::/48", "192.0.2.0/24", "2001:d00::/24", "::1/128"]))
        self.assertEqual(resolver.asked, ["mx.example.test"])

    def test_names_are_resolved_once_per_load(self) -> None:
        """The same name in several lists costs one lookup."""
        resolver = StubResolver()
        parse('our_networks = "localhost"; spamd { whitelist = "localhost"; }', resolver=resolver)
        self.assertEqual(resolver.asked, ["localhost"])

    def test_prefix_is_clamped(self) -> None:
        """Prefix lengths above /32 (/128) are clamped, with a warning."""
        config = parse("our_networks = 10.0.0.1/40;")
        self.assertEqual([str(n) for n in config.main.our_networks], ["10.0.0.1/32"])
        self.assertIn("clamped", config.warnings[0])

    def test_unusable_entry_beside_usable_ones_is_a_warning(self) -> None:
        """SPEC §4.4: in a quoted item, bad entries next to good ones are only logged."""
        config = parse('our_networks = "10.0.0.1, nowhere.test";')
        self.assertEqual(len(config.main.our_networks), 1)
        self.assertIn("cannot resolve host name 'nowhere.test'", config.warnings[0])

    def test_ipv4_entries_do_not_match_ipv6_clients(self) -> None:
        """No v4-mapped handling (SPEC §4.4)."""
        config = parse("our_networks = 0.0.0.0/0;")
        self.assertIn("203.0.113.9", config.main.our_networks)
        self.assertNotIn("::ffff:203.0.113.9", config.main.our_networks)


class ListenEndpointTests(SynchronousTestCase):
    def test_socket_spec_forms(self) -> None:
        """Every bind_socket form of SPEC §4.4/§8.3 maps to a Twisted description (B25 mode 0660)."""
        cases = {
            "unix:/run/rmilter/rmilter.sock": "unix:/run/rmilter/rmilter.sock:mode=660:lockfile=0",
            "local:/run/r.sock": "unix:/run/r.sock:mode=660:lockfile=0",
            "/run/r.sock": "unix:/run/r.sock:mode=660:lockfile=0",
            "inet:11332@127.0.0.1": "tcp:11332:interface=127.0.0.1",
            "inet:11332@[127.0.0.1]": "tcp:11332:interface=127.0.0.1",
            "inet:11332@localhost": "tcp:11332:interface=localhost",
            "inet:9900": "tcp:9900:interface=0.0.0.0",
            "inet6:11332@[::1]": "tcp6:11332:interface=\\:\\:1",
            "inet6:11332": "tcp6:11332:interface=\\:\\:",
            "fd:3": "adopted-fd:3",
            "tcp:11332:interface=127.0.0.1": "tcp:11332:interface=127.0.0.1",
            "unix:/run/r.sock:mode=600": "unix:/run/r.sock:mode=600",
            "systemd:domain=UNIX:index=0": "systemd:domain=UNIX:index=0",
        }
        for spec, expected in cases.items():
            self.assertEqual(listen_endpoint(spec), expected, spec)

    def test_unparsable_specs(self) -> None:
        """Nonsense raises ConfigError (and is refused as bind_socket at load time)."""
        for spec in ("inet:", "inet:70000", "inet:x@host", "fd:x", "bogus", "nosuch:1", "inet6:1@127.0.0.1", ""):
            self.assertRaises(ConfigError, listen_endpoint, spec)
        error = self.assertRaises(ConfigError, parse, 'max_size = 1k;\nbind_socket = "inet:70000";')
        self.assertTrue(error.errors[0].startswith("t.conf:2: bind_socket: 'inet:70000'"), error.errors)

    def test_adopted_fd_endpoint_reads_the_family(self) -> None:
        """adopted-fd:N becomes an AdoptedStreamServerEndpoint with the socket's own family."""
        import socket

        from twisted.internet import endpoints
        from twisted.internet.testing import MemoryReactor

        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        endpoint = endpoints.serverFromString(MemoryReactor(), listen_endpoint("fd:%d" % left.fileno()))
        self.assertIsInstance(endpoint, endpoints.AdoptedStreamServerEndpoint)
        self.assertEqual((endpoint.fileno, endpoint.addressFamily), (left.fileno(), socket.AF_UNIX))


class DefaultConfigTests(SynchronousTestCase):
    def test_embedded_default(self) -> None:
        """default(): listen on inet:11339@127.0.0.1, nothing else, no warnings."""
        config = rconfig.default()
        self.assertEqual(config.main.bind_socket, "inet:11339@127.0.0.1")
        self.assertEqual(config.warnings, ())
        self.assertEqual(listen_endpoint(config.main.bind_socket or ""), "tcp:11339:interface=127.0.0.1")
        self.assertEqual(config.spamd, Config().spamd)

    def test_config_error_lists_every_error(self) -> None:
        """ConfigError.errors holds 'FILE:LINE: reason' strings; str() joins them."""
        error = self.assertRaises(ConfigError, parse, "nosuch = 1;\nalso_nosuch = 2;\n")
        self.assertEqual(error.errors, ["t.conf:1: unknown directive nosuch", "t.conf:2: unknown directive also_nosuch"])
        self.assertEqual(str(error), "\n".join(error.errors))
