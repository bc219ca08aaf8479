"""Reading rmilter.conf (SPEC §4) into a typed, immutable ``Config``.

Public API (used by the service, the CLI and the tests):

- ``load(path) -> Config``: read a file (with its includes); raises ``ConfigError``.
- ``parse_text(text, filename="<string>") -> Config``.
- ``default() -> Config``: the embedded default configuration (``DEFAULT_CONFIG_TEXT``).
- ``ConfigError``: ``.errors`` is a list of ``"FILE:LINE: reason"`` strings.
- ``listen_endpoint(spec) -> str``: a ``bind_socket`` spec (or a Twisted endpoint
  string) as a Twisted server endpoint description.
- ``format_config(config)`` / ``format_effective(config)``: the printer.
- ``startup_notices(config)``: start-up remarks that are not file problems (SPEC §8.1).

Loading blocks (files, DNS for host names in IP lists, DKIM keys): call it at
start-up or from a thread on reload, never from the reactor per message.
All keyword arguments after the first are optional: ``resolver`` replaces
``socket.getaddrinfo`` (tests use it to stay off the network).
"""
from __future__ import annotations

from typing import List, Optional

from rmilter.config.endpoints import endpoint_description
from rmilter.config.lexer import Lexer
from rmilter.config.parser import default_tempdir, parse_tokens
from rmilter.config.schema import Config
from rmilter.config.values import Resolver, ValueProblem, resolve_host

__all__ = [
    "ConfigError",
    "DEFAULT_CONFIG_TEXT",
    "default",
    "format_config",
    "format_effective",
    "listen_endpoint",
    "load",
    "parse_text",
    "startup_notices",
]

DEFAULT_CONFIG_TEXT = """\
# rmilter embedded default (used when no --config is given): listen on the loopback
# interface, no rspamd, clamav or Redis servers, so every message passes unchanged.
bind_socket = inet:11339@127.0.0.1;
"""


class ConfigError(Exception):
    """The configuration cannot be used; ``errors`` lists every problem as ``FILE:LINE: reason``."""

    def __init__(self, errors: List[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _finish(lexer: Lexer, filename: str, resolver: Optional[Resolver]) -> Config:
    tokens = lexer.finish(filename)
    config, errors, _warnings = parse_tokens(tokens, lexer.files, resolver or resolve_host, lexer.truncated)
    errors = lexer.errors + errors
    if errors or config is None:
        raise ConfigError(errors)
    if lexer.warnings:
        from dataclasses import replace

        config = replace(config, warnings=tuple(lexer.warnings) + config.warnings)
    return config


def parse_text(text: str, filename: str = "<string>", *, resolver: Optional[Resolver] = None) -> Config:
    """Parse configuration text; includes are resolved relative to ``filename``'s directory."""
    lexer = Lexer()
    lexer.lex_text(text, filename)
    return _finish(lexer, filename, resolver)


def load(path: str, *, resolver: Optional[Resolver] = None) -> Config:
    """Read ``path`` and its includes; raises ``ConfigError`` (also when the file cannot be read)."""
    lexer = Lexer()
    lexer.lex_file(path)
    return _finish(lexer, path, resolver)


def default() -> Config:
    """The embedded default configuration (``DEFAULT_CONFIG_TEXT``)."""
    return parse_text(DEFAULT_CONFIG_TEXT, "<default>")


def listen_endpoint(spec: str) -> str:
    """A socket spec of SPEC §4.4/§8.3, or a Twisted endpoint string, as a Twisted description.

    See ``rmilter.config.endpoints`` for the mapping; raises ``ConfigError`` when unparsable.
    """
    try:
        return endpoint_description(spec)
    except ValueProblem as e:
        raise ConfigError([str(e)]) from None


def startup_notices(config: Config) -> List[str]:
    """Remarks rmilter logs at start (SPEC §8.1, §4.11) that are not mistakes in the file."""
    notices = []
    if config.origins.get("main.tempdir") is None:
        notices.append("tempdir is not set; spool files go to %s" % config.main.tempdir)
    if config.main.max_size == 0:
        notices.append("max_size is 0: messages of any size are scanned")
    if config.dkim.enable and config.dkim.domains and config.dkim.sign_alg == "sha1":
        notices.append("dkim sign_alg is sha1, which receivers may not trust; sha256 is recommended")
    from rmilter.config.effective import inactive_features

    notices.extend(inactive_features(config))
    return notices


def format_config(config: Config) -> str:
    """The configuration as an rmilter.conf that parses back to an equal ``Config``."""
    from rmilter.config.printer import format_config as _format

    return _format(config)


def format_effective(config: Config, show_secrets: bool = False) -> str:
    """``check-config`` output: every directive, its value and, if not default, where it was set;
    secrets (the Redis password) as ``"***"`` unless ``show_secrets``."""
    from rmilter.config.printer import format_effective as _format

    return _format(config, show_secrets)


# keep default_tempdir importable from here for the service (SPEC §4.5)
__all__.append("default_tempdir")
