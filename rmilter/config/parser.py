"""The grammar of rmilter.conf (SPEC §4.3) and the construction of the typed ``Config``.

Statements are ``directive = values``, ``directive += values`` and
``section { statements }``; inside a section every statement ends with
``;``, at top level the ``;`` is optional.  The parser recovers after each
problem (skipping to the next ``;``, the end of the section or the next
line that starts a statement), so one run reports every independent
mistake as ``FILE:LINE: reason``.
"""
from __future__ import annotations

import dataclasses
import os
from types import MappingProxyType
from typing import Any, Dict, List, Optional, Tuple

from rmilter.config import directives as dirs
from rmilter.config import values as v
from rmilter.config.directives import Context, Group, ValueToken
from rmilter.config.endpoints import endpoint_description
from rmilter.config.lexer import COMMA, EOF, EQ, LBRACE, PLUSEQ, QUOTED, RBRACE, SEMI, WORD, Token
from rmilter.config.schema import (
    DEFAULT_BIND_SOCKET,
    ClamavConfig,
    Config,
    DkimConfig,
    DkimDomain,
    GlobalConfig,
    GreylistingConfig,
    LimitsConfig,
    Origin,
    RedisConfig,
    SpamdConfig,
)

#: a DKIM key file larger than this is not a PEM key

SECTION_CLASSES = {
    "main": GlobalConfig,
    "clamav": ClamavConfig,
    "spamd": SpamdConfig,
    "redis": RedisConfig,
    "greylisting": GreylistingConfig,
    "limits": LimitsConfig,
    "dkim": DkimConfig,
}


class _Syntax(Exception):
    """A grammar problem at a token; the statement is abandoned and parsing resynchronises."""

    def __init__(self, token: Token, reason: str) -> None:
        super().__init__(reason)
        self.token = token
        self.reason = reason
        #: braces opened by the broken statement and not yet closed, for resynchronising
        self.depth = 0


class Parser:
    """Consumes the token list of one load and builds a ``Config`` (or collects errors)."""

    def __init__(self, tokens: List[Token], resolver: v.Resolver, truncated: bool = False) -> None:
        self.tokens = tokens
        self.truncated = truncated
        self.pos = 0
        self.errors: List[str] = []
        self.warnings: List[str] = []
        self.ctx = Context(resolver)
        self.values: Dict[str, Dict[str, Any]] = {name: {} for name in SECTION_CLASSES}
        self.origins: Dict[str, Origin] = {}
        self.dkim_domains: List[DkimDomain] = []
        self.dkim_pending: Dict[str, Token] = {}  # key / domain written outside a block (SPEC §4.11)
        self._current_block: Dict[str, Token] = {}
        self.use_redis_seen = False
        self.memcached_section_seen = False
        self.memcached_token: Optional[Token] = None

    # -- reporting ---------------------------------------------------------------------------
    def error(self, at: Any, reason: str, structural: bool = False) -> None:
        """Record an error; structural ones at the end of a token stream the lexer cut short
        (an unterminated quote) are consequences of that error and are not repeated."""
        if structural and self.truncated and self.peek().kind == EOF:
            return
        self.errors.append("%s:%d: %s" % (at.file, at.line, reason))

    def warn(self, at: Any, reason: str) -> None:
        self.warnings.append("%s:%d: %s" % (at.file, at.line, reason))

    def _flush_ctx_warnings(self, at: Any) -> None:
        for message in self.ctx.pending_warnings:
            self.warn(at, message)
        del self.ctx.pending_warnings[:]

    # -- token helpers -------------------------------------------------------------------------
    def peek(self, offset: int = 0) -> Token:
        index = min(self.pos + offset, len(self.tokens) - 1)
        return self.tokens[index]

    def take(self) -> Token:
        token = self.peek()
        if token.kind != EOF:
            self.pos += 1
        return token

    def _starts_statement(self, offset: int = 0) -> bool:
        return self.peek(offset).kind == WORD and self.peek(offset + 1).kind in (EQ, PLUSEQ, LBRACE)

    def _first_on_line(self) -> bool:
        if self.pos == 0:
            return True
        before, here = self.tokens[self.pos - 1], self.peek()
        return before.line != here.line or before.file != here.file

    def _recover(self, in_section: bool, depth: int = 0) -> None:
        """Skip the rest of a broken statement: to ';', the section's '}' or a new statement line."""
        while True:
            token = self.peek()
            if token.kind == EOF:
                return
            if depth == 0:
                if token.kind == SEMI:
                    self.take()
                    return
                if token.kind == RBRACE and in_section:
                    return
                if self._starts_statement() and self._first_on_line():
                    return
            if token.kind == LBRACE:
                depth += 1
            elif token.kind == RBRACE:
                depth = max(0, depth - 1)
            self.take()

    def _skip_block(self) -> Optional[Token]:
        """After '{': skip to the matching '}' (consumed). Returns it, or None at end of file."""
        depth = 1
        while True:
            token = self.take()
            if token.kind == EOF:
                return None
            if token.kind == LBRACE:
                depth += 1
            elif token.kind == RBRACE:
                depth -= 1
                if depth == 0:
                    return token

    # -- grammar -------------------------------------------------------------------------------
    def parse(self) -> None:
        while self.peek().kind != EOF:
            self.statement(None)
        if self.dkim_pending:
            token = next(iter(self.dkim_pending.values()))
            self.warn(token, "dkim: key/domain written outside a domain { } block with no block after it; ignored")

    def statement(self, section: Optional[str]) -> None:
        """One statement in ``section`` (None: top level; "dkim.domain": inside a DKIM block)."""
        token = self.peek()
        try:
            if token.kind == SEMI:  # a stray ';' (also the optional one after a top-level '}')
                self.take()
                return
            if token.kind == RBRACE:
                if section is None:
                    self.take()
                    raise _Syntax(token, "unexpected '}': no section is open")
                return  # the caller closes the section
            if token.kind != WORD:
                raise _Syntax(token, "expected a directive or section name, found %s" % token.describe())
            following = self.peek(1)
            if following.kind == LBRACE:
                self.block(section)
            elif following.kind in (EQ, PLUSEQ):
                self.assignment(section)
            else:
                raise _Syntax(following, "expected '=' or '{' after %s, found %s"
                              % (token.describe(), following.describe()))
        except _Syntax as problem:
            self.error(problem.token, problem.reason, structural=problem.token.kind == EOF)
            self._recover(section is not None, problem.depth)

    def block(self, section: Optional[str]) -> None:
        name_token = self.take()
        self.take()  # '{'
        name = name_token.text
        if section is None and name in dirs.SECTION_NAMES:
            table = dirs.SECTION_NAMES[name]
            if name == "redis":
                self._set_use_redis(True, name_token)
            elif name == "memcached":
                self.memcached_section_seen = True
                self.memcached_token = name_token
            self.section_body(table, name_token)
            if self.peek().kind == SEMI:
                self.take()
            return
        if section == "dkim" and name == "domain":
            self.dkim_block(name_token)
            return
        if name in dirs.REMOVED_SECTIONS:
            self.warn(name_token, "%s { } ignored: %s (B27)" % (name, dirs.REMOVED_SECTIONS[name]))
        elif section is not None:
            self.error(name_token, "%s { } cannot appear inside %s { }" % (name, _shown(section)))
        else:
            self.error(name_token, "unknown section %s { }" % name)
        if self._skip_block() is None:
            self.error(name_token, "%s { is never closed (missing '}')" % name, structural=True)
        elif section is not None:
            self._end_statement(section, name_token)
        elif self.peek().kind == SEMI:
            self.take()

    def section_body(self, section: str, opened: Token) -> None:
        while True:
            token = self.peek()
            if token.kind == EOF:
                self.error(opened, "%s { is never closed (missing '}')" % opened.text, structural=True)
                return
            if token.kind == RBRACE:
                self.take()
                return
            self.statement(section)

    def dkim_block(self, opened: Token) -> None:
        fields: Dict[str, Token] = dict(self.dkim_pending)
        self.dkim_pending = {}
        self._current_block = fields
        self.section_body("dkim.domain", opened)
        self._end_statement("dkim", opened)
        self._finish_dkim_domain(fields, opened)

    def _end_statement(self, section: str, after: Token) -> None:
        """Inside a section a statement must end with ';' (SPEC §4.3)."""
        if self.peek().kind == SEMI:
            self.take()
            return
        token = self.peek()
        self.error(after, "missing ';' after the %s statement (found %s)"
                   % (after.text if after.kind == WORD else "previous", token.describe()), structural=True)
        if token.kind == RBRACE or self._starts_statement():
            return
        self._recover(True)

    def assignment(self, section: Optional[str]) -> None:
        name_token = self.take()
        op = self.take()
        values = self.values_list()
        if section is not None:
            terminator = self.peek()
            if terminator.kind == SEMI:
                self.take()
            else:
                last = values[-1] if values else op
                shown = "%s %s %s" % (name_token.text, op.text, ", ".join(t.text for t in values))
                if len(shown) > 60:
                    shown = shown[:57] + "..."
                self.error(last, "missing ';' after '%s' (found %s)" % (shown.strip(), terminator.describe()),
                           structural=True)
                if not (terminator.kind == RBRACE or self._starts_statement()):
                    self._recover(True)
        elif self.peek().kind == SEMI:
            self.take()
        elif self.peek().kind not in (EOF, RBRACE) and not self._starts_statement():
            raise _Syntax(self.peek(), "expected ';' or a new statement after %s = ..., found %s"
                          % (name_token.text, self.peek().describe()))
        self.apply(section, name_token, op, values)

    def values_list(self) -> List[ValueToken]:
        values: List[ValueToken] = []
        if self.peek().kind in (SEMI, RBRACE, EOF):
            return values
        while True:
            values.append(self.value())
            if self.peek().kind != COMMA:
                return values
            self.take()

    def value(self) -> ValueToken:
        token = self.peek()
        if token.kind in (WORD, QUOTED):
            return self.take()
        if token.kind == LBRACE:
            self.take()
            try:
                items = [self._plain_value()]
                while self.peek().kind == COMMA:
                    self.take()
                    items.append(self._plain_value())
                closing = self.peek()
                if closing.kind != RBRACE:
                    raise _Syntax(closing, "expected ',' or '}' in a {a, b} pair, found %s" % closing.describe())
            except _Syntax as problem:
                problem.depth += 1  # the pair's '{' is still open
                raise
            self.take()
            return Group(tuple(items), token.file, token.line)
        raise _Syntax(token, "expected a value, found %s" % token.describe())

    def _plain_value(self) -> Token:
        token = self.peek()
        if token.kind not in (WORD, QUOTED):
            raise _Syntax(token, "expected a value, found %s" % token.describe())
        return self.take()

    # -- meaning -------------------------------------------------------------------------------
    def apply(self, section: Optional[str], name_token: Token, op: Token, values: List[ValueToken]) -> None:
        name = name_token.text
        table_name = section or "main"
        removed = dirs.REMOVED_DIRECTIVES.get(section, {}).get(name) or dirs.REMOVED_DIRECTIVES[None].get(name)
        if removed:
            self.warn(name_token, "%s ignored: %s (B27)" % (name, removed))
            return
        if section == "dkim" and name in ("key", "domain"):
            self._dkim_field(self.dkim_pending, name_token, op, values)
            return
        if section == "dkim.domain":
            self._dkim_field(self._current_block, name_token, op, values)
            return
        directive = dirs.TABLES[table_name].get(name)
        if directive is None:
            self.error(name_token, self._unknown(name, table_name))
            return
        shown = name if table_name == "main" else "%s.%s" % (table_name, name)
        if op.kind == PLUSEQ and not directive.is_list:
            self.error(op, "%s: '+=' only applies to lists; use '='" % shown)
            return
        origin_key = "%s.%s" % (table_name, directive.attribute)
        store = self.values[table_name]
        if directive.is_list:
            if not values and not directive.allow_empty:
                self.error(name_token, "%s: needs at least one value (an empty list is not allowed here)" % shown,
                           structural=True)
                return
            entries: List[Any] = []
            ok = True
            for token in values:
                if not self._usable(token, shown):  # type: ignore[arg-type]
                    ok = False
                    continue
                try:
                    entries.extend(directive.kind.convert_item(token, self.ctx))  # type: ignore[union-attr]
                except v.ValueProblem as e:
                    self.error(token, "%s: %s" % (shown, e))
                    ok = False
                except ValueError as e:
                    self.error(token, "%s: unusable value (%s)" % (shown, e))
                    ok = False
            self._flush_ctx_warnings(name_token)
            if not ok:
                return
            if op.kind == EQ and directive.list_mode == "reset":
                current: List[Any] = []
            else:
                current = list(store.get(directive.attribute, []))
            current.extend(entries)
            if directive.max_items is not None and len(current) > directive.max_items:
                self.error(name_token, "%s: more than %d servers" % (shown, directive.max_items))
                return
            store[directive.attribute] = current
        else:
            if len(values) != 1:
                what = "no value" if not values else "%d values" % len(values)
                self.error(name_token, "%s: expects one %s, found %s"
                           % (shown, directive.kind.description, what), structural=not values)
                return
            if not self._usable(values[0], shown):  # type: ignore[arg-type]
                self._flush_ctx_warnings(name_token)
                return
            try:
                store[directive.attribute] = directive.kind.convert(values[0], self.ctx)  # type: ignore[union-attr]
            except v.ValueProblem as e:
                self.error(values[0], "%s: %s" % (shown, e))
                return
            except ValueError as e:  # e.g. from os.* on an odd path: still FILE:LINE, never a traceback
                self.error(values[0], "%s: unusable value (%s)" % (shown, e))
                return
            finally:
                self._flush_ctx_warnings(name_token)
            if table_name == "main" and directive.attribute == "use_redis":
                self._set_use_redis(store["use_redis"], name_token)
        if directive.ignored_note:
            self.warn(name_token, directive.ignored_note)
        self.origins[origin_key] = Origin(name_token.file, name_token.line)

    def _usable(self, token: Token, shown: str) -> bool:
        """No value may hold a NUL byte: no path, address or text can carry one (issue 18)."""
        if "\x00" in token.text:
            self.error(token, "%s: a NUL byte is not allowed in a value" % shown)
            return False
        return True

    def _unknown(self, name: str, table_name: str) -> str:
        elsewhere = dirs.sections_with(name)
        if name in dirs.SECTION_NAMES and table_name == "main":
            return "%s is a section: write %s { ... }" % (name, name)
        if elsewhere:
            where = " or ".join("global" if s == "main" else "%s { }" % s for s in elsewhere)
            if table_name == "main":
                return "%s is not a global directive; it belongs in %s" % (name, where)
            return "%s is not allowed in %s { }; it belongs in %s" % (name, _shown(table_name), where)
        if table_name == "main":
            return "unknown directive %s" % name
        return "unknown directive %s in %s { }" % (name, _shown(table_name))

    def _set_use_redis(self, value: bool, at: Token) -> None:
        """SPEC §4.5: use_redis and a redis { } section both set the flag; the last one wins."""
        self.values["main"]["use_redis"] = value
        self.origins["main.use_redis"] = Origin(at.file, at.line)
        self.use_redis_seen = True

    # -- DKIM ----------------------------------------------------------------------------------
    def _dkim_field(self, fields: Dict[str, Token], name_token: Token, op: Token, values: List[ValueToken]) -> None:
        name = name_token.text
        if name not in ("key", "domain", "selector"):
            self.error(name_token, self._unknown(name, "dkim.domain"))
            return
        if op.kind == PLUSEQ:
            self.error(op, "dkim.%s: '+=' only applies to lists; use '='" % name)
            return
        if len(values) != 1 or isinstance(values[0], Group):
            self.error(name_token, "dkim.%s: expects one value" % name)
            return
        token = values[0]
        assert isinstance(token, Token)
        if not token.text:
            self.error(token, "dkim.%s: an empty string is not allowed here" % name)
            return
        fields[name] = token

    def _finish_dkim_domain(self, fields: Dict[str, Token], opened: Token) -> None:
        missing = [f for f in ("key", "domain", "selector") if f not in fields]
        if missing:
            self.error(opened, "incomplete dkim definition: domain { } needs key, domain and selector "
                       "(missing %s)" % ", ".join(missing))
            return
        domain = DkimDomain(
            domain=fields["domain"].text.lower(),
            selector=fields["selector"].text,
            key=fields["key"].text,
            origin=Origin(opened.file, opened.line),
            key_origin=Origin(fields["key"].file, fields["key"].line),
        )
        self.dkim_domains.append(domain)
        self.origins["dkim.domain"] = Origin(opened.file, opened.line)

    # -- result --------------------------------------------------------------------------------
    def build(self, files: List[str]) -> Config:
        sections: Dict[str, Any] = {}
        for table_name, cls in SECTION_CLASSES.items():
            kwargs: Dict[str, Any] = {}
            for directive in dirs.SECTIONS[table_name]:
                attr = directive.attribute
                if attr not in self.values[table_name] or attr in kwargs:
                    continue
                value = self.values[table_name][attr]
                if directive.is_list:
                    value = directive.kind.finish(value)  # type: ignore[union-attr]
                kwargs[attr] = value
            if table_name == "main" and "tempdir" not in kwargs:
                kwargs["tempdir"] = default_tempdir()
            if table_name == "dkim":
                kwargs["domains"] = tuple(self.dkim_domains)
            sections[table_name] = cls(**kwargs)
        self._check_metrics_socket(sections["main"])
        redis: RedisConfig = sections["redis"]
        use_redis = sections["main"].use_redis
        has_servers = any(
            getattr(redis, f.name) for f in dataclasses.fields(RedisConfig) if f.name.startswith("servers_")
        )
        backend = "redis"
        if not use_redis and (self.memcached_section_seen or has_servers):
            backend = "memcached"
            origin: Any = self.origins.get("main.use_redis") or self.memcached_token
            if origin is None:  # servers in a redis { } section, then use_redis = no
                origin = Origin(files[0] if files else "<string>", 1)
            where = "%s:%d" % (origin.file, origin.line)
            self.warnings.append(
                "%s: the cache backend is memcached (a memcached { } section without use_redis = yes), "
                "which this rmilter does not support: greylisting, rate limits, replies check and pub/sub "
                "copies are disabled; write redis { } or use_redis = yes (B13)" % where
            )
        if not sections["spamd"].tls_verify:  # issue 12: only ever explicit, and said at every start
            origin = self.origins.get("spamd.tls_verify") or Origin(files[0] if files else "<string>", 1)
            self.warnings.append(
                "%s:%d: spamd tls_verify = no: the certificates of https:// Rspamd servers are not verified"
                % (origin.file, origin.line))
        return Config(
            main=sections["main"],
            clamav=sections["clamav"],
            spamd=sections["spamd"],
            redis=redis,
            greylisting=sections["greylisting"],
            limits=sections["limits"],
            dkim=sections["dkim"],
            cache_backend=backend,
            origins=MappingProxyType(dict(self.origins)),
            warnings=tuple(self.warnings),
            files=tuple(files),
        )


    def _check_metrics_socket(self, main: Any) -> None:
        """The metrics listener is never the milter's socket (issue 14)."""
        if main.metrics_socket is None:
            return
        milter = main.bind_socket or DEFAULT_BIND_SOCKET
        if endpoint_description(main.metrics_socket) == endpoint_description(milter):
            at = self.origins["main.metrics_socket"]
            self.errors.append("%s:%d: metrics_socket: %s is the milter socket (bind_socket); give the "
                               "metrics a listener of their own" % (at.file, at.line, main.metrics_socket))


def default_tempdir() -> str:
    """SPEC §4.5: $TMPDIR, else /tmp."""
    return os.environ.get("TMPDIR") or "/tmp"


def _shown(table_name: str) -> str:
    return "global" if table_name == "main" else table_name


def parse_tokens(
    tokens: List[Token], files: List[str], resolver: v.Resolver, truncated: bool = False
) -> Tuple[Optional[Config], List[str], List[str]]:
    """Parse a token list: (config or None, errors, warnings).

    ``truncated``: the lexer stopped early (unterminated quote); errors that
    only say "the file ended here" are then left out.
    """
    parser = Parser(tokens, resolver, truncated)
    parser.parse()
    if parser.errors:
        return None, parser.errors, parser.warnings
    config = parser.build(files)
    return config, parser.errors, list(config.warnings)
