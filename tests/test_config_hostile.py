"""Hostile configuration files (issue 18, items 1-3): every character is a token or a
``FILE:LINE: reason``; no NUL byte reaches a path; include cycles and include bombs are refused."""
from __future__ import annotations

import os
import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rmilter.config import ConfigError, load, parse_text
from rmilter.config import lexer as lx
from rmilter.testing.config import StubResolver
from tests.harness.base import scratch_dir, write_file

_WHERE = re.compile(r"^[^\n:]+:\d+: ")
#: characters that legitimately start no token: blanks, line ends, and what opens a comment/quote
_SEPARATORS = set(" \t\r\f\v\ufeff\n")


def lex(text: str) -> lx.Lexer:
    lexer = lx.Lexer()
    lexer.lex_text(text, "t.conf")
    return lexer


class LexerEveryCharacter(SynchronousTestCase):
    @given(st.characters())
    @settings(max_examples=3000)
    def test_every_character_is_tokenised_or_a_file_line_error(self, ch: str) -> None:
        """``a<ch>b``: ``ch`` is inside a token, a separator, or an error naming t.conf:1."""
        lexer = lex("a%sb" % ch)
        in_token = any(ch in t.text for t in lexer.tokens)
        errors = [e for e in lexer.errors if e.startswith("t.conf:1: ")]
        if ch in _SEPARATORS or ch in '#"':
            return
        self.assertTrue(in_token or errors, (ch, lexer.tokens, lexer.errors))
        if errors:
            self.assertFalse(in_token)

    @given(st.text(max_size=200))
    @settings(max_examples=500)
    def test_any_text_lexes_or_gives_file_line_errors(self, text: str) -> None:
        lexer = lex(text)
        for error in lexer.errors:
            self.assertRegex(error, _WHERE)

    def test_unicode_whitespace_is_a_file_line_error(self) -> None:
        for ch in "\u00a0\u2028\u2003\x1c\x85\u3000":
            with self.assertRaises(ConfigError) as caught:
                parse_text("tempdir = /tmp;\nmax_size%s= 10M;\n" % ch, "x.conf", resolver=StubResolver())
            self.assertIn("x.conf:2: character U+%04X" % ord(ch), "\n".join(caught.exception.errors))

    def test_runs_under_python_O_too(self) -> None:
        """No assert decides anything: the old code ended in AttributeError under -O."""
        source = open(lx.__file__, encoding="utf-8").read()
        self.assertNotRegex(source, r"\n\s+assert ")


class NulBytes(SynchronousTestCase):
    def errors(self, text: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            parse_text(text, "n.conf", resolver=StubResolver())
        return "\n".join(caught.exception.errors)

    def test_nul_in_any_quoted_value_is_a_config_error(self) -> None:
        for text, name in [
            ('tempdir = "/tmp/a\x00b";', "tempdir"),
            ('pidfile = "/run/a\x00b";', "pidfile"),
            ('spamd { servers = r:localhost; symbols_dir = "/tmp/a\x00b"; }', "spamd.symbols_dir"),
            ('spamd { servers = r:localhost; diff_dir = "/tmp/a\x00b"; }', "spamd.diff_dir"),
            ('whitelist = "a\x00b";', "whitelist"),
        ]:
            self.assertIn("n.conf:1: %s: a NUL byte is not allowed in a value" % name, self.errors(text + "\n"))

    def test_nul_outside_quotes_is_a_config_error(self) -> None:
        self.assertIn("n.conf:1: a NUL byte is not allowed", self.errors("tempdir = /tmp/a\x00b;\n"))

    def test_dkim_key_with_nul_is_a_config_error(self) -> None:
        path = write_file(os.path.join(scratch_dir("nul"), "d.conf"),
                          'dkim { domain { key = "/tmp/a\x00b"; domain = "*"; selector = "x"; }; }\n')
        from rmilter.service import load_configuration
        with self.assertRaises(ConfigError) as caught:
            load_configuration(path)
        self.assertRegex("\n".join(caught.exception.errors), r"d\.conf:1: .*(NUL|null)")


class Includes(SynchronousTestCase):
    def test_a_file_including_itself_twice_is_two_cycle_errors(self) -> None:
        directory = scratch_dir("bomb")
        path = write_file(os.path.join(directory, "bomb.conf"),
                          '.include "bomb.conf"\n.include "bomb.conf"\nmax_size = 1;\n')
        with self.assertRaises(ConfigError) as caught:
            load(path, resolver=StubResolver())
        errors = caught.exception.errors
        self.assertEqual(len([e for e in errors if "an include cycle" in e]), 2, errors)
        self.assertTrue(errors[0].startswith(path + ":1: "))

    def test_indirect_cycle(self) -> None:
        directory = scratch_dir("cycle")
        write_file(os.path.join(directory, "b.conf"), '.include "a.conf"\n')
        a = write_file(os.path.join(directory, "a.conf"), '.include "b.conf"\n')
        with self.assertRaises(ConfigError) as caught:
            load(a, resolver=StubResolver())
        self.assertRegex("\n".join(caught.exception.errors), r"b\.conf:1: .*include cycle .*a\.conf -> .*b\.conf -> .*a\.conf")

    def test_the_same_file_twice_without_a_cycle_is_fine(self) -> None:
        directory = scratch_dir("twice")
        write_file(os.path.join(directory, "part.conf"), "max_size = 5;\n")
        top = write_file(os.path.join(directory, "top.conf"), '.include "part.conf"\n.include "part.conf"\n')
        self.assertEqual(load(top, resolver=StubResolver()).main.max_size, 5)

    def test_an_acyclic_bomb_stops_at_the_expansion_cap(self) -> None:
        """b0 includes b1 twice, ... b40: 2**40 reads without the cap."""
        directory = scratch_dir("acyclic")
        for i in range(40):
            write_file(os.path.join(directory, "b%d.conf" % i), '.include "b%d.conf"\n.include "b%d.conf"\n' % (i + 1, i + 1))
        write_file(os.path.join(directory, "b40.conf"), "max_size = 1;\n")
        with self.assertRaises(ConfigError) as caught:
            load(os.path.join(directory, "b0.conf"), resolver=StubResolver())
        errors = caught.exception.errors
        self.assertEqual(len(errors), 1, errors)
        self.assertRegex(errors[0], r"b\d+\.conf:\d+: the configuration with its includes expanded exceeds")
