"""Tokens of rmilter.conf, with ``.include`` / ``.try_include`` spliced in (SPEC §4.1, §4.2).

The lexer is the lenient one SPEC §4.3 allows: a bare word is any run of
characters other than blanks and ``{ } ; , = " #``, so values may hold
digits and ``_`` (``user1@example.com``, ``/run/rm_milter.sock``), and a
``#`` outside quotes starts a comment wherever it is.  The parser gives
words their meaning; the lexer only knows words, quoted strings and
punctuation, each with the file and line it came from.
"""
from __future__ import annotations

import glob
import os
import re
import stat
import unicodedata
from typing import List, NamedTuple, Optional

#: token kinds
WORD = "word"
QUOTED = "quoted"
LBRACE = "{"
RBRACE = "}"
SEMI = ";"
COMMA = ","
EQ = "="
PLUSEQ = "+="
EOF = "end of file"

#: SPEC §4.1: includes nest up to 100 levels
MAX_INCLUDE_DEPTH = 100
#: a configuration file larger than this is not a configuration file
MAX_FILE_SIZE = 16 * 1024 * 1024
#: all files read for one configuration, includes expanded, together: a file included many
#: times over (an "include bomb": each file including the next one twice) stops here, not at 2**100
MAX_EXPANDED_SIZE = 16 * 1024 * 1024
#: and at most this many file reads, for bombs of tiny files
MAX_INCLUDED_FILES = 1000


class Token(NamedTuple):
    """One token and where it stands (a NamedTuple: cheap to build, there are many)."""

    kind: str
    text: str
    file: str
    line: int

    def describe(self) -> str:
        """How an error message names this token."""
        if self.kind == EOF:
            return "end of file"
        if self.kind == QUOTED:
            text = self.text if len(self.text) <= 40 else self.text[:37] + "..."
            return '"%s"' % text
        return "'%s'" % self.text


_TOKEN = re.compile(
    r"""
    (?P<nl>\n)
  | (?P<ws>[ \t\r\f\v\ufeff]+)
  | (?P<comment>\#[^\n]*)
  | (?P<quoted>"[^"]*")
  | (?P<open>")
  | (?P<pluseq>\+=)
  | (?P<punct>[{};,=])
  | (?P<word>(?:[^\s{};,="\#+\x00]|\+(?!=))+)
  | (?P<bad>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_INCLUDE_ARG = re.compile(r'[ \t]+("[^"\n]*"|[^\s]+)')
# C treats a '#' that is not first on its line as a skipped character and reads on (SPEC §4.2);
# we read it as a comment, and say so when the comment text looks like a statement.
_LOOKS_LIKE_STATEMENT = re.compile(r"#\s*[A-Za-z_][A-Za-z0-9_]*\s*(\+?=|\{)")


def _bad_character(ch: str) -> str:
    """Why a character that starts no token is refused (Unicode blanks, NUL)."""
    if ch == "\x00":
        return "a NUL byte is not allowed in a configuration file"
    name = unicodedata.name(ch, "") if not 0xD800 <= ord(ch) <= 0xDFFF else ""
    return "character U+%04X%s is not allowed here (only space, tab and line ends separate words)" % (
        ord(ch), " (%s)" % name if name else "")


class Lexer:
    """Tokenizes a file and everything it includes into one list, collecting problems."""

    def __init__(self) -> None:
        self.tokens: List[Token] = []
        self.errors: List[str] = []
        self.warnings: List[str] = []
        self.files: List[str] = []
        #: lexing stopped early (an unterminated quoted string swallowed the rest)
        self.truncated = False
        #: real paths of the files being read, outermost first: an include of one of them is a cycle
        self._stack: List[str] = []
        self._expanded = 0
        self._reads = 0
        #: the expansion limits were hit: every file still being read stops at once
        self._over_limit = False

    # -- entry points ------------------------------------------------------------------------
    def lex_file(self, path: str) -> None:
        text = self._read(path, where=None)
        if text is not None:
            self.files.append(path)
            self._stack.append(os.path.realpath(path))
            self._lex(text, path, depth=0)
            self._stack.pop()

    def lex_text(self, text: str, filename: str) -> None:
        self.files.append(filename)
        self._lex(text, filename, depth=0)

    def finish(self, filename: str) -> List[Token]:
        last_line = self.tokens[-1].line if self.tokens else 1
        last_file = self.tokens[-1].file if self.tokens else filename
        self.tokens.append(Token(EOF, "", last_file, last_line))
        return self.tokens

    # -- internals ---------------------------------------------------------------------------
    def _read(self, path: str, where: Optional[str]) -> Optional[str]:
        prefix = where or "%s:0" % path
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                self.errors.append("%s: cannot read %s: not a regular file" % (prefix, path))
                return None
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_SIZE + 1)
        except OSError as e:
            self.errors.append("%s: cannot read %s: %s" % (prefix, path, e.strerror or e))
            return None
        if len(data) > MAX_FILE_SIZE:
            self.errors.append("%s: %s is larger than %d bytes" % (prefix, path, MAX_FILE_SIZE))
            return None
        self._reads += 1
        self._expanded += len(data)
        if self._expanded > MAX_EXPANDED_SIZE or self._reads > MAX_INCLUDED_FILES:
            self.errors.append(
                "%s: the configuration with its includes expanded exceeds %d bytes or %d files; "
                "stopped reading (is a file included many times over?)" % (prefix, MAX_EXPANDED_SIZE, MAX_INCLUDED_FILES))
            self._over_limit = self.truncated = True
            return None
        return data.decode("utf-8", errors="surrogateescape")

    def _lex(self, text: str, filename: str, depth: int) -> None:
        line = 1
        pos = 0
        line_has_token = False
        append = self.tokens.append
        match = _TOKEN.match
        end = len(text)
        while pos < end and not self._over_limit:
            m = match(text, pos)
            if m is None:  # cannot happen: ``bad`` takes any character; never an assert (-O)
                self.errors.append("%s:%d: cannot read the text from here on" % (filename, line))
                self.truncated = True
                return
            kind = m.lastgroup
            pos = m.end()
            if kind == "word":
                word = m.group()
                if word in (".include", ".try_include"):
                    pos = self._include(text, pos, word, filename, line, depth)
                    continue
                append(Token(WORD, word, filename, line))
                line_has_token = True
            elif kind == "nl":
                line += 1
                line_has_token = False
            elif kind == "ws":
                pass
            elif kind == "punct":
                append(Token(m.group(), m.group(), filename, line))
                line_has_token = True
            elif kind == "quoted":
                body = m.group()[1:-1]
                append(Token(QUOTED, body, filename, line))
                line += body.count("\n")
                line_has_token = True
            elif kind == "comment":
                if line_has_token and _LOOKS_LIKE_STATEMENT.match(m.group()):
                    self.warnings.append(
                        "%s:%d: text after '#' is a comment here (%s); C rmilter 1.x skipped only "
                        "the '#' and read the rest as configuration" % (filename, line, m.group().strip())
                    )
            elif kind == "pluseq":
                append(Token(PLUSEQ, "+=", filename, line))
                line_has_token = True
            elif kind == "bad":
                self.errors.append("%s:%d: %s" % (filename, line, _bad_character(m.group())))
            else:  # an opening quote without a closing one
                self.errors.append("%s:%d: unterminated quoted string (no closing '\"')" % (filename, line))
                self.truncated = True
                return

    def _include(self, text: str, pos: int, word: str, filename: str, line: int, depth: int) -> int:
        where = "%s:%d" % (filename, line)
        m = _INCLUDE_ARG.match(text, pos)
        if not m:
            self.errors.append("%s: %s needs a file name or pattern on the same line" % (where, word))
            return pos
        pattern = m.group(1)
        if pattern.startswith('"'):
            pattern = pattern[1:-1]
        elif pattern.endswith(";"):
            pattern = pattern[:-1]
        pos = m.end()
        if not pattern:
            self.errors.append("%s: %s needs a file name or pattern" % (where, word))
            return pos
        if not os.path.isabs(pattern) and os.path.isfile(filename):
            # relative to the including file, so a config tree can be moved as a whole
            pattern = os.path.join(os.path.dirname(os.path.abspath(filename)), pattern)
        try:
            matches = sorted(glob.glob(pattern))  # B29: ascending order, the last file read wins
        except (ValueError, OSError) as e:  # e.g. a NUL byte in the pattern
            self.errors.append("%s: %s %r: unusable pattern (%s)" % (where, word, m.group(1), e))
            return pos
        if not matches:
            if word == ".include":
                self.errors.append("%s: .include %s: no file matches (B26: a missing include is fatal)"
                                   % (where, m.group(1)))
            return pos
        if depth + 1 > MAX_INCLUDE_DEPTH:
            self.errors.append("%s: includes nested deeper than %d levels (an include loop?)"
                               % (where, MAX_INCLUDE_DEPTH))
            return pos
        for path in matches:
            real = os.path.realpath(path)
            if real in self._stack:
                chain = " -> ".join(self._stack[self._stack.index(real):] + [real])
                self.errors.append("%s: %s %s: an include cycle (%s)" % (where, word, m.group(1), chain))
                continue
            included = self._read(path, where)
            if self._over_limit:
                return len(text)
            if included is not None:
                self.files.append(path)
                self._stack.append(real)
                self._lex(included, path, depth + 1)
                self._stack.pop()
        return pos
