"""The shared corpus of real rmilter.conf files gives the outcome its SOURCES.md entry states.

Each file is copied into a temporary directory with its include paths
rewritten (``.include`` to the corpus file SOURCES.md names, ``.try_include``
to a path where nothing matches), then loaded.  Without RMILTER_TESTDATA these
tests fail, saying they were not run.
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

from twisted.trial.unittest import SynchronousTestCase

from rmilter import config as rconfig
from rmilter.config.schema import Config, ServerSpec
from rmilter.dkim.keys import build_keyring
from rmilter.testing.config import CorpusMissing, StubResolver, copy_with_includes, corpus_dir

COMMON = "vstakhov-debian-rmilter.conf.common"


class CorpusTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        try:
            self.corpus = corpus_dir()
        except CorpusMissing as e:
            self.fail(str(e))
        self.workdir = os.path.abspath(self.mktemp())
        os.makedirs(self.workdir)
        self.resolver = StubResolver()

    def load(self, name: str, include: Optional[str] = None) -> Config:
        return rconfig.load(copy_with_includes(name, self.workdir, include), resolver=self.resolver)

    def load_error(self, name: str, include: Optional[str] = None) -> List[str]:
        path = copy_with_includes(name, self.workdir, include)
        error = self.assertRaises(rconfig.ConfigError, rconfig.load, path, resolver=self.resolver)
        self.assertTrue(error.errors)
        return error.errors

    def warnings_matching(self, config: Config, pattern: str) -> List[str]:
        return [w for w in config.warnings if re.search(pattern, w)]


class EveryFileTests(CorpusTestCase):
    def test_every_corpus_file_is_covered_here(self) -> None:
        """A new file in the corpus must get its own test in this module."""
        covered = {
            "vstakhov-rmilter.conf.sample", "vstakhov-rmilter-grey.conf", "vstakhov-debian-rmilter.conf",
            "vstakhov-debian-rmilter.conf.sysvinit", COMMON, "vstakhov-1.6.0-rmilter.conf.sample",
            "mailu-rmilter-117e858d.conf", "mailu-rmilter-ccb37add.conf", "kvaps-docker-rmilter-aefeb50.conf",
            "openmandriva-rmilter.conf", "interlegis-alpine-rmilter.conf",
            "yefryf-docker-postfix-rmilter.conf.local", "jbonachera-docker-rmilter.conf.common.jinja",
            "jbonachera-docker-rmilter.conf.docker",
        }
        present = {f for f in os.listdir(self.corpus) if f != "SOURCES.md"}
        self.assertEqual(present, covered)

    def test_every_file_is_listed_in_sources(self) -> None:
        """Every corpus file has an entry in SOURCES.md (the source of the expected outcomes)."""
        with open(os.path.join(self.corpus, "SOURCES.md"), encoding="utf-8") as f:
            sources = f.read()
        for name in os.listdir(self.corpus):
            if name != "SOURCES.md":
                self.assertIn("### %s" % name, sources)


class UpstreamSampleTests(CorpusTestCase):
    def test_parses_without_warnings(self) -> None:
        """vstakhov-rmilter.conf.sample: parses, no warnings; the values SOURCES.md lists."""
        config = self.load("vstakhov-rmilter.conf.sample")
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.cache_backend, "redis")
        self.assertEqual(config.main.max_size, 10 * 1024 * 1024)
        self.assertEqual(config.main.bind_socket, "unix:/var/run/rmilter/rmilter.sock")
        redis = config.redis
        for servers in (redis.servers_grey, redis.servers_white, redis.servers_limits, redis.servers_id):
            self.assertEqual([(s.host, s.port) for s in servers], [("localhost", 6379)])
        self.assertEqual((redis.id_prefix, redis.grey_prefix, redis.white_prefix), ("message_id.", "grey.", "white."))
        limits = config.limits
        self.assertEqual((limits.limit_to.burst, limits.limit_to.rate), (20, 0.016666667))
        self.assertEqual((limits.limit_to_ip.burst, limits.limit_to_ip.rate), (30, 0.025))
        self.assertEqual((limits.limit_to_ip_from.burst, limits.limit_to_ip_from.rate), (100, 0.033333333))
        self.assertEqual(limits.limit_bounce_to, limits.limit_bounce_to_ip)
        self.assertEqual((limits.limit_bounce_to.burst, limits.limit_bounce_to.rate), (5, 0.000277778))
        self.assertIn("<>", limits.limit_bounce_addrs)
        self.assertIn("symantec_antivirus_for_smtp_gateways", limits.limit_bounce_addrs)
        (domain,) = config.dkim.domains
        self.assertEqual((domain.domain, domain.selector, domain.key), ("*", "dkim", "/usr/local/etc/dkim"))
        self.assertEqual(build_keyring(config.dkim)[0].wildcards[0].directory, "/usr/local/etc/dkim")
        self.assertEqual((config.dkim.header_canon, config.dkim.body_canon, config.dkim.sign_alg),
                         ("relaxed", "relaxed", "sha256"))
        (spamd,) = config.spamd.servers
        self.assertEqual((spamd.host, spamd.port), ("localhost", 11333))
        self.assertEqual(config.greylisting.expire, 3 * 86400.0)
        self.assertEqual(len(config.greylisting.whitelist), 3)
        self.assertIn("::1", config.greylisting.whitelist)
        self.assertTrue(config.greylisting_active)


class GreyOnlyTests(CorpusTestCase):
    def test_greylisting_only_file(self) -> None:
        """vstakhov-rmilter-grey.conf: parses; greylisting inactive without Redis servers."""
        config = self.load("vstakhov-rmilter-grey.conf")
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.greylisting.timeout, 300.0)
        self.assertEqual(
            sorted(str(n) for n in config.greylisting.whitelist.networks),
            ["127.0.0.1/32", "192.168.1.1/32", "192.168.2.0/24"],
        )
        self.assertIn("192.168.2.77", config.greylisting.whitelist)
        self.assertFalse(config.greylisting_active)
        self.assertEqual(config.origins["greylisting.whitelist"].line, 3)


class DebianTests(CorpusTestCase):
    def test_missing_include_is_fatal(self) -> None:
        """vstakhov-debian-rmilter.conf as shipped: the .include finds nothing, which is fatal (B26)."""
        errors = self.load_error("vstakhov-debian-rmilter.conf")
        self.assertEqual(len(errors), 1)
        self.assertTrue(errors[0].endswith(
            "vstakhov-debian-rmilter.conf:3: .include /etc/rmilter.conf.common: no file matches "
            "(B26: a missing include is fatal)"), errors[0])

    def test_with_include_rewritten(self) -> None:
        """With the include pointed at the common file it parses; bind_socket after it is effective."""
        config = self.load("vstakhov-debian-rmilter.conf", include=COMMON)
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.main.bind_socket, "unix:/run/rmilter/rmilter.sock")
        self.assertEqual(config.origins["main.bind_socket"].line, 5)
        self.assertTrue(config.origins["spamd.servers"].file.endswith(COMMON))
        self.assertEqual(len(config.files), 2)
        self.assertIsNone(config.main.pidfile)

    def test_sysvinit_variant(self) -> None:
        """vstakhov-debian-rmilter.conf.sysvinit: as the Debian file, plus a pidfile."""
        config = self.load("vstakhov-debian-rmilter.conf.sysvinit", include=COMMON)
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.main.pidfile, "/run/rmilter/rmilter.pid")
        self.assertEqual(config.main.bind_socket, "unix:/run/rmilter/rmilter.sock")

    def test_sysvinit_missing_include_is_fatal(self) -> None:
        """The sysvinit file as shipped fails on its .include line."""
        errors = self.load_error("vstakhov-debian-rmilter.conf.sysvinit")
        self.assertIn("vstakhov-debian-rmilter.conf.sysvinit:3: .include", errors[0])

    def test_common_file(self) -> None:
        """vstakhov-debian-rmilter.conf.common: no bind_socket/pidfile, clamav without servers."""
        config = self.load(COMMON)
        self.assertEqual(config.warnings, ())
        self.assertIsNone(config.main.bind_socket)
        self.assertIsNone(config.main.pidfile)
        self.assertEqual(config.clamav.servers, ())
        self.assertEqual(config.clamav.port_timeout, 4.0)
        self.assertEqual(config.redis.servers_white, ())
        self.assertEqual(config.redis.effective_servers_white, config.redis.servers_grey)
        self.assertEqual(config.main.tempfiles_mode, 0o600)
        self.assertFalse(config.main.use_dcc)
        (domain,) = config.dkim.domains
        self.assertEqual((domain.domain, domain.key), ("*", "/etc/dkim"))


class OldSampleTests(CorpusTestCase):
    def test_parses_with_warnings_and_memcached_backend(self) -> None:
        """vstakhov-1.6.0-rmilter.conf.sample: parses (lenient lexer) with warnings; memcached (B13)."""
        config = self.load("vstakhov-1.6.0-rmilter.conf.sample")
        self.assertEqual(config.cache_backend, "memcached")
        self.assertFalse(config.redis_enabled)
        self.assertFalse(config.greylisting_active)
        self.assertFalse(config.limits_active)
        self.assertEqual(len(self.warnings_matching(config, r":96: the cache backend is memcached")), 1)
        self.assertEqual(len(self.warnings_matching(config, r":100: mirrored servers are no longer supported")), 1)
        self.assertEqual(len(self.warnings_matching(config, r":165: spf support is removed")), 1)
        self.assertEqual(len(self.warnings_matching(config, r":203: beanstalk \{ \} ignored")), 1)
        for line, name in ((232, "awl_enable"), (233, "awl_pool"), (234, "awl_hits"), (235, "awl_ttl")):
            self.assertEqual(len(self.warnings_matching(config, r":%d: %s ignored" % (line, name))), 1)
        self.assertEqual(
            [(s.host, s.port) for s in config.redis.servers_grey],
            [("localhost", 6379), ("memc2.example.com", 6379)],
        )
        self.assertEqual(len(self.warnings_matching(config, r"port 11211 is the memcached port")), 3)
        self.assertEqual([(s.host, s.port) for s in config.clamav.servers],
                         [("clam1.example.com", 3310), ("clam2.example.com", 3310)])
        self.assertEqual([(s.host, s.port) for s in config.spamd.servers],
                         [("clam5.example.com", 11333), ("clam6.example.com", 11333), ("clam8.example.com", 11333)])
        self.assertEqual([d.domain for d in config.dkim.domains], ["example.com", "test.com"])
        self.assertEqual(config.dkim.domains[0].key, "/usr/local/etc/dkim_example.key")
        self.assertEqual(config.main.spf_domains, ("example.com", "mail.ru"))
        self.assertTrue(config.main.use_dcc)
        self.assertEqual(len(config.warnings), 11)


class MailuTests(CorpusTestCase):
    def test_mailu_2017(self) -> None:
        """mailu-rmilter-117e858d.conf: parses; inet:9900, Redis at redis:6379, bracketed IPv6 entries."""
        config = self.load("mailu-rmilter-117e858d.conf")
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.main.bind_socket, "inet:9900")
        self.assertEqual(rconfig.listen_endpoint(config.main.bind_socket or ""), "tcp:9900:interface=0.0.0.0")
        self.assertTrue(config.main.use_redis)
        self.assertEqual(config.cache_backend, "redis")
        for servers in (config.redis.servers_grey, config.redis.servers_white,
                        config.redis.servers_limits, config.redis.servers_id):
            self.assertEqual([(s.host, s.port) for s in servers], [("redis", 6379)])
        self.assertTrue(config.spamd.spamd_never_reject)
        self.assertTrue(config.spamd.extended_spam_headers)
        for netlist in (config.spamd.whitelist, config.limits.limit_whitelist,
                        config.greylisting.whitelist, config.dkim.sign_networks):
            self.assertIn("::1", netlist)
            self.assertNotIn("::2", netlist)
        self.assertIn("172.20.1.2", config.dkim.sign_networks)
        self.assertTrue(config.dkim.auth_only)
        self.assertEqual(config.dkim.domains[0].key, "/dkim")

    def test_mailu_2016_four_awl_warnings(self) -> None:
        """mailu-rmilter-ccb37add.conf: parses with exactly the four awl_* warnings."""
        config = self.load("mailu-rmilter-ccb37add.conf")
        self.assertEqual(len(config.warnings), 4)
        for line, name in ((114, "awl_enable"), (115, "awl_pool"), (116, "awl_hits"), (117, "awl_ttl")):
            self.assertEqual(len(self.warnings_matching(config, r":%d: %s ignored" % (line, name))), 1)
        self.assertEqual(config.clamav.servers, (ServerSpec("antivirus:3310", host="antivirus", port=3310),))
        self.assertEqual(config.spamd.servers, (ServerSpec("antispam:11333", host="antispam", port=11333),))
        self.assertTrue(config.spamd.spamd_never_reject)
        self.assertEqual([(s.host, s.port) for s in config.redis.servers_grey], [("redis", 6379)])


class KvapsTests(CorpusTestCase):
    def test_memcached_section_with_use_redis(self) -> None:
        """kvaps: memcached { } plus use_redis = true is Redis; awl_* warnings only."""
        config = self.load("kvaps-docker-rmilter-aefeb50.conf")
        self.assertEqual(config.cache_backend, "redis")
        self.assertTrue(config.greylisting_active)
        self.assertEqual([(s.host, s.port) for s in config.redis.servers_grey], [("redis", 6379)])
        self.assertEqual(len(config.warnings), 4)
        self.assertTrue(all("awl_" in w for w in config.warnings))
        self.assertEqual(config.main.bind_socket, "inet:11332@0.0.0.0")
        self.assertEqual(config.clamav.servers[0].port, 3310)
        self.assertEqual(config.dkim.domains, ())


class OpenMandrivaTests(CorpusTestCase):
    def test_unix_clamav_and_bind_socket_at_the_end(self) -> None:
        """openmandriva: clamav over a unix socket, bind_socket last, three rcpt whitelist entries."""
        config = self.load("openmandriva-rmilter.conf")
        self.assertEqual(config.warnings, ())
        (clamd,) = config.clamav.servers
        self.assertTrue(clamd.is_unix)
        self.assertEqual(clamd.path, "/run/clamav/clamd.socket")
        self.assertEqual(config.main.bind_socket, "inet:9900@127.0.0.1")
        self.assertIsNone(config.main.pidfile)
        self.assertEqual(config.limits.limit_whitelist_rcpt.entries, ("postmaster", "mailer-daemon", "abuse"))
        self.assertTrue(config.limits.limit_whitelist_rcpt.matches("<Abuse@example.org>"))


class InterlegisTests(CorpusTestCase):
    def test_top_level_statement_without_semicolon(self) -> None:
        """interlegis: 'bind_socket = inet:9900' without ';' at top level; nothing else active."""
        config = self.load("interlegis-alpine-rmilter.conf")
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.main.bind_socket, "inet:9900")
        self.assertEqual(config.main.tempdir, "/tmp")
        self.assertFalse(config.main.use_redis)
        self.assertEqual(config.cache_backend, "redis")
        self.assertFalse(config.greylisting_active or config.limits_active)
        self.assertEqual((config.spamd.servers, config.clamav.servers), ((), ()))


class YefryfTests(CorpusTestCase):
    def test_override_file(self) -> None:
        """yefryf: limits, greylisting and dkim disabled; quoted single-address whitelist."""
        config = self.load("yefryf-docker-postfix-rmilter.conf.local")
        self.assertEqual(config.warnings, ())
        self.assertFalse(config.limits.enable)
        self.assertFalse(config.greylisting.enable)
        self.assertFalse(config.dkim.enable)
        self.assertFalse(config.spamd.spamd_greylist)
        self.assertEqual([str(n) for n in config.spamd.whitelist.networks], ["127.0.0.1/32"])
        self.assertEqual(config.clamav.servers[0].path, "/var/run/clamav/clamd.ctl")
        self.assertEqual(config.main.bind_socket, "inet:9900@127.0.0.1")


class TemplateTests(CorpusTestCase):
    def test_unrendered_template_fails_at_line_59(self) -> None:
        """jbonachera .jinja: an unrendered template fails; the first error names line 59 and '{'."""
        errors = self.load_error("jbonachera-docker-rmilter.conf.common.jinja")
        self.assertRegex(errors[0], r"jbonachera-docker-rmilter\.conf\.common\.jinja:59: .*'\{'")
        lines = {int(e.split(":")[1]) for e in errors}
        self.assertIn(104, lines)  # {% if USE_REDIS %} is reported too


class DockerTests(CorpusTestCase):
    def test_missing_include_is_fatal(self) -> None:
        """jbonachera .docker: .include of a missing file (with a trailing space) is fatal at line 4."""
        errors = self.load_error("jbonachera-docker-rmilter.conf.docker")
        self.assertEqual(len(errors), 1)
        self.assertRegex(errors[0], r"jbonachera-docker-rmilter\.conf\.docker:4: \.include "
                                    r"/etc/rmilter/rmilter\.conf\.common: no file matches")

    def test_with_include_rewritten(self) -> None:
        """Rewritten to the common file it parses; bind_socket written before the include stays."""
        config = self.load("jbonachera-docker-rmilter.conf.docker", include=COMMON)
        self.assertEqual(config.main.bind_socket, "inet:11332@0.0.0.0")
        self.assertEqual(config.warnings, ())
        self.assertEqual(rconfig.listen_endpoint(config.main.bind_socket or ""), "tcp:11332:interface=0.0.0.0")
