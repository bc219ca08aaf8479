"""Every rejection class reports ``FILE:LINE: reason`` with the right file and line (SPEC §4.3, §4.1)."""
from __future__ import annotations

import os
from typing import List

from twisted.trial.unittest import SynchronousTestCase

from rmilter import config as rconfig
from rmilter.config import ConfigError, parse_text
from rmilter.service import load_configuration
from rmilter.testing.config import StubResolver


class ErrorTestCase(SynchronousTestCase):
    def errors(self, text: str, filename: str = "bad.conf") -> List[str]:
        error = self.assertRaises(ConfigError, parse_text, text, filename, resolver=StubResolver())
        self.assertTrue(error.errors)
        return error.errors

    def assertOneError(self, text: str, prefix: str, *fragments: str) -> str:
        """Exactly one error, starting with FILE:LINE (prefix) and mentioning each fragment."""
        errors = self.errors(text)
        self.assertEqual(len(errors), 1, errors)
        (message,) = errors
        self.assertTrue(message.startswith(prefix), message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


class UnknownAndMisplacedTests(ErrorTestCase):
    def test_unknown_directive_at_top_level(self) -> None:
        """An unknown directive names itself."""
        self.assertOneError("max_size = 1k;\nmax_sise = 2k;\n", "bad.conf:2: ", "unknown directive max_sise")

    def test_unknown_directive_in_a_section(self) -> None:
        """The docs' spamd_temp_fail never existed (SPEC §4.7)."""
        self.assertOneError("spamd {\n  spamd_temp_fail = yes;\n}\n", "bad.conf:2: ",
                            "unknown directive spamd_temp_fail in spamd { }")

    def test_global_directive_in_a_section(self) -> None:
        """A directive in the wrong section says where it belongs."""
        self.assertOneError("spamd {\n\n  bind_socket = inet:1@127.0.0.1;\n}\n", "bad.conf:3: ",
                            "bind_socket is not allowed in spamd { }", "belongs in global")

    def test_section_directive_at_top_level(self) -> None:
        """timeout belongs in greylisting { }."""
        self.assertOneError("timeout = 5m;", "bad.conf:1: ", "timeout is not a global directive",
                            "greylisting { }")

    def test_unknown_section(self) -> None:
        """An unknown section is reported at its name; its contents are skipped."""
        self.assertOneError("\nrspamd {\n  servers = x;\n}\nmax_size = 1k;\n", "bad.conf:2: ", "unknown section rspamd")

    def test_nested_section(self) -> None:
        """Only dkim { } holds nested domain { } blocks."""
        self.assertOneError("spamd {\n  redis { servers_grey = x; };\n}\n", "bad.conf:2: ",
                            "redis { } cannot appear inside spamd { }")

    def test_section_name_used_as_directive(self) -> None:
        """'spamd = x' explains the section syntax."""
        self.assertOneError("spamd = x;", "bad.conf:1: ", "spamd is a section")


class ValueTypeTests(ErrorTestCase):
    CASES = [
        ("strict_auth = maybe;", "strict_auth: 'maybe' is not a flag"),
        ("spamd { retry_count = five; }", "spamd.retry_count: 'five' is not a whole number"),
        ("max_size = 10X;", "max_size: '10X' is not a size"),
        ("greylisting { timeout = 300; }", "greylisting.timeout: '300' has no unit"),
        ("greylisting { timeout = 5w; }", "greylisting.timeout: '5w' is not a time"),
        ("greylisting { expire = 3651d; }", "longer than ten years"),
        ("limits { limit_to = 20; }", "limits.limit_to: '20' is not a bucket"),
        ("tempfiles_mode = 0680;", "tempfiles_mode: '0680' is not an octal file mode"),
        ("redis { copy_probability = 150; }", "'150' is above 100"),
        ("redis { copy_probability = -1; }", "'-1' is not a number"),
        ("our_networks = 10.0.0.300;", "'10.0.0.300' is not an IP address, network or host name"),
        ("our_networks = 10.0.0.1/x;", "'x' is not a prefix length"),
        ("clamav { servers = host:99999; }", "'99999' is not a port number"),
        ("clamav { servers = r:clamd:3310; }", "the r: prefix marks rspamd servers"),
        ("redis { servers_grey = /run/redis.sock; }", "unix sockets are not supported for Redis"),
        ("spamd { spam_header = \"X Spam\"; }", "is not a header field name"),
        ("dkim { sign_alg = md5; }", "dkim.sign_alg: 'md5' is not sha1 or sha256"),
        ("spamd { protocol = http; }", "'http' is not checkv2 or legacy"),
        ("redis { dbname = \"one\"; }", "'one' is not a database number"),
        ("greylisting { whitelist = ; }", "greylisting.whitelist: needs at least one value"),
        ("redis { servers_white = ; }", "redis.servers_white: needs at least one value"),
        ("max_size += 1k;", "'+=' only applies to lists"),
        ("max_size = 1k, 2k;", "max_size: expects one size, found 2 values"),
        ("pidfile = ;", "pidfile: expects one path, found no value"),
        ("spamd { servers = {a, b}; }", "pairs are only allowed in servers_grey and servers_white"),
        ("tempdir = /nonexistent/dir;", "cannot use directory '/nonexistent/dir'"),
        ("tempdir = /etc/hostname;", "'/etc/hostname' is not a directory"),
        ("bind_socket = \"inet:port\";", "bind_socket: 'inet:port': 'port' is not a port number"),
        ('our_networks = "nowhere.test";', "cannot resolve host name 'nowhere.test'"),
    ]

    def test_each_wrong_value(self) -> None:
        """Each wrong value is reported at its line with the offending text."""
        for text, fragment in self.CASES:
            errors = self.errors("# header\n\n" + text)
            self.assertEqual(len(errors), 1, (text, errors))
            self.assertTrue(errors[0].startswith("bad.conf:3: "), (text, errors[0]))
            self.assertIn(fragment, errors[0], text)

    def test_too_many_servers(self) -> None:
        """At most 32 servers per list."""
        servers = ", ".join("s%d" % i for i in range(33))
        self.assertOneError("spamd {\n  servers = %s;\n}" % servers, "bad.conf:2: ", "more than 32 servers")


class PunctuationTests(ErrorTestCase):
    def test_missing_semicolon_in_section(self) -> None:
        """Inside a section ';' is required; the next statement is still read."""
        errors = self.errors("spamd {\n  retry_count = 2\n  maxerrors = x;\n}\n")
        self.assertEqual(len(errors), 2, errors)
        self.assertTrue(errors[0].startswith("bad.conf:2: missing ';' after 'retry_count = 2' (found 'maxerrors')"),
                        errors[0])
        self.assertTrue(errors[1].startswith("bad.conf:3: spamd.maxerrors: 'x' is not a whole number"), errors[1])

    def test_missing_semicolon_before_closing_brace(self) -> None:
        """'spamd { retry_count = 2 }' is an error at the value's line."""
        self.assertOneError("spamd {\n  retry_count = 2\n}\n", "bad.conf:2: ", "missing ';'", "found '}'")

    def test_missing_semicolon_after_domain_block(self) -> None:
        """The ';' after dkim's inner '}' is mandatory (SPEC §4.3)."""
        self.assertOneError('dkim {\n  domain { key = /k; domain = "d"; selector = "s"; }\n}\n',
                            "bad.conf:2: ", "missing ';' after the domain statement")

    def test_words_in_a_row(self) -> None:
        """Two words in a row (an unquoted message) point at the second one."""
        self.assertOneError("spamd {\n  reject_message = Go away;\n}\n", "bad.conf:2: ", "found 'away'")

    def test_unclosed_section(self) -> None:
        """A section never closed is reported at the line that opened it."""
        self.assertOneError("max_size = 1k;\nspamd {\n  retry_count = 2;\n", "bad.conf:2: ",
                            "spamd { is never closed")

    def test_extra_closing_brace(self) -> None:
        """A '}' with no open section is reported at its line."""
        self.assertOneError("spamd { retry_count = 2; }\n}\nmax_size = 1k;\n", "bad.conf:2: ",
                            "unexpected '}'")

    def test_unterminated_quote(self) -> None:
        """An unterminated quoted string is reported where it starts."""
        self.assertOneError('max_size = 1k;\nspamd { reject_message = "oops; }\n', "bad.conf:2: ",
                            "unterminated quoted string")

    def test_statement_without_equals(self) -> None:
        """'directive value' without '=' is a syntax error naming what was found."""
        self.assertOneError("max_size 10M;", "bad.conf:1: ", "expected '=' or '{' after 'max_size', found '10M'")


class DkimErrorTests(ErrorTestCase):
    def test_incomplete_definition(self) -> None:
        """domain { } needs key, domain and selector (C: 'incomplete dkim definition')."""
        self.assertOneError('dkim {\n\n  domain { key = /k; domain = "d"; };\n}\n', "bad.conf:3: ",
                            "incomplete dkim definition", "missing selector")

    def test_selector_outside_a_block(self) -> None:
        """SPEC §4.11: selector outside domain { } is an error."""
        self.assertOneError('dkim {\n  selector = "s";\n}\n', "bad.conf:2: ", "selector")

    def test_key_file_that_is_not_a_key(self) -> None:
        """A key naming a regular file that holds no PEM key is an error at the key line."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("not a key\n")
        conf = os.path.abspath(self.mktemp())
        with open(conf, "w") as f:
            f.write('dkim { domain {\n  key = "%s";\n  domain = "d"; selector = "s"; }; }' % path)
        parse_text(open(conf).read(), conf)  # the configuration itself is fine: keys are not config
        with self.assertRaises(ConfigError) as caught:
            load_configuration(conf)  # what the service and check-config load: config and keys
        self.assertEqual(len(caught.exception.errors), 1)
        self.assertTrue(caught.exception.errors[0].startswith("%s:2: " % conf), caught.exception.errors)
        self.assertIn("is not a private key (PEM, DER or base64)", caught.exception.errors[0])


class IncludeErrorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def load_errors(self, path: str) -> List[str]:
        return self.assertRaises(ConfigError, rconfig.load, path, resolver=StubResolver()).errors

    def test_missing_include_is_fatal(self) -> None:
        """B26: .include with no match is an error at the include line."""
        main = self.write("main.conf", "max_size = 1k;\n.include %s/missing.conf\n" % self.dir)
        (message,) = self.load_errors(main)
        self.assertEqual(message, "%s:2: .include %s/missing.conf: no file matches (B26: a missing include is fatal)"
                         % (main, self.dir))

    def test_errors_in_included_files_name_that_file(self) -> None:
        """An error in an included file carries the included file's name and line."""
        inner = self.write("inner.conf", "\n\nmax_size = lots;\n")
        main = self.write("main.conf", ".include %s\n" % inner)
        (message,) = self.load_errors(main)
        self.assertTrue(message.startswith("%s:3: max_size: 'lots'" % inner), message)

    def test_include_loop_is_a_cycle_error(self) -> None:
        """A file including itself is refused at once as an include cycle (issue 18)."""
        main = os.path.join(self.dir, "loop.conf")
        self.write("loop.conf", ".include %s\n" % main)
        errors = self.load_errors(main)
        self.assertEqual(len(errors), 1)
        self.assertTrue(errors[0].startswith("%s:1: .include %s: an include cycle" % (main, main)), errors[0])

    def test_include_chain_hits_the_nesting_limit(self) -> None:
        """Includes nest up to 100 levels: a chain of 102 distinct files stops there with an error."""
        for i in range(102):
            self.write("c%d.conf" % i, ".include %s\n" % os.path.join(self.dir, "c%d.conf" % (i + 1)))
        self.write("c102.conf", "max_size = 1;\n")
        errors = self.load_errors(os.path.join(self.dir, "c0.conf"))
        self.assertEqual(len(errors), 1)
        self.assertRegex(errors[0], r"c100\.conf:1: includes nested deeper than 100 levels")

    def test_include_of_a_directory(self) -> None:
        """A match that is not a regular file is an error at the include line."""
        os.makedirs(os.path.join(self.dir, "sub.conf"))
        main = self.write("main.conf", "\n.include %s/sub.conf\n" % self.dir)
        (message,) = self.load_errors(main)
        self.assertTrue(message.startswith("%s:2: cannot read %s/sub.conf: not a regular file" % (main, self.dir)))

    def test_missing_main_file(self) -> None:
        """load() of a missing file raises ConfigError naming the file."""
        (message,) = self.load_errors(os.path.join(self.dir, "absent.conf"))
        self.assertIn("absent.conf:0: cannot read", message)


class ManyErrorsTests(ErrorTestCase):
    def test_independent_errors_are_all_reported_in_order(self) -> None:
        """One run reports every independent mistake, in file order."""
        text = (
            "max_size = huge;\n"            # 1: wrong type
            "spamd {\n"
            "  nonsense = 1;\n"             # 3: unknown directive
            "  retry_count = 2\n"           # 4: missing ';'
            "  results_timeout = 20;\n"     # 5: time without unit
            "}\n"
            "clamav { servers = a:b:c:d; }\n"  # 7: bad server
            "}\n"                           # 8: extra brace
            "strict_auth = perhaps;\n"      # 9: wrong flag
        )
        errors = self.errors(text)
        self.assertEqual([int(e.split(":")[1]) for e in errors], [1, 3, 4, 5, 7, 8, 9], errors)


class HypothesisFoundTests(SynchronousTestCase):
    """Regressions found by the property tests."""

    def test_nul_byte_in_include_pattern_is_a_config_error(self) -> None:
        from rmilter.config import ConfigError, parse_text

        for text in ('.include "/tmp/a\x00b/*.conf"\n', ".try_include /tmp/a\x00b/*.conf\n"):
            with self.assertRaises(ConfigError) as caught:
                parse_text(text, "t.conf")
            self.assertIn("t.conf:1:", caught.exception.errors[0])
            self.assertIn("unusable pattern", caught.exception.errors[0])

    def test_r_prefix_in_spamd_and_clamav(self) -> None:
        """SPEC §4.4 and C's add_spamd_server: every spamd entry loses one leading ``r:``, whatever
        follows; clamav entries keep it, so ``r:1`` there is host ``r`` port 1 (C's HOSTPORT)."""
        from rmilter.config import parse_text

        config = parse_text("clamav { servers = r:1, \"r:1:7\"; };\n"
                            "spamd { servers = r:2, \"r:r:3:4\", r:rspamd:5; };\n", "t.conf")
        self.assertEqual([(s.host, s.port, s.priority) for s in config.clamav.servers], [("r", 1, 0), ("r", 1, 7)])
        self.assertEqual([(s.host, s.port, s.priority) for s in config.spamd.servers],
                         [("2", 11333, 0), ("r", 3, 4), ("rspamd", 5, 0)])

    def test_spamd_r_prefix_then_host_port_priority(self) -> None:
        """Found by the property tests: ``"r:1:0"`` in spamd is the prefix, then host ``1`` and port
        ``0``, which is refused (ports are 1-65535), not host ``r`` port 1 priority 0."""
        from rmilter.config import ConfigError, parse_text

        with self.assertRaises(ConfigError) as caught:
            parse_text('spamd { servers = "r:1:0"; };\n', "t.conf")
        self.assertEqual(len(caught.exception.errors), 1)
        self.assertIn("t.conf:1:", caught.exception.errors[0])
        self.assertIn("'0' is not a port number (1-65535)", caught.exception.errors[0])

    def test_spamd_host_named_r_round_trips(self) -> None:
        """The printer writes a spamd host named ``r`` with the prefix, so its output parses back."""
        from rmilter.config import format_config, parse_text

        config = parse_text('spamd { servers = "r:r:1:0", r:11333; };\n', "t.conf")
        again = parse_text(format_config(config), "printed.conf")
        self.assertEqual(again.spamd.servers, config.spamd.servers)
        self.assertEqual([(s.host, s.port) for s in again.spamd.servers], [("r", 1), ("11333", 11333)])

    def test_clamav_r_prefix_with_a_host_is_explained(self) -> None:
        from rmilter.config import ConfigError, parse_text

        with self.assertRaises(ConfigError) as caught:
            parse_text("clamav { servers = r:localhost:3310; };\n", "t.conf")
        self.assertIn("the r: prefix marks rspamd servers", caught.exception.errors[0])
