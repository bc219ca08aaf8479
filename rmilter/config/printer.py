"""Writing a ``Config`` back as text: a full rmilter.conf, or the ``check-config`` listing.

``format_config`` produces a file that parses back to an equal ``Config``
(the property tests check this); ``format_effective`` lists every directive
as ``section.directive = value``, with ``# FILE:LINE`` for values that are
not the default.
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional, Tuple

from rmilter.config import directives as dirs
from rmilter.config.parser import SECTION_CLASSES, default_tempdir
from rmilter.config.schema import Config, DkimDomain, Origin
from rmilter.config.values import quote

#: list values are wrapped after this many entries per line in format_config
ENTRIES_PER_LINE = 8


def _directives(table_name: str) -> Iterator[dirs.Directive]:
    """The directives of a section, once per schema attribute (check_auth is strict_auth)."""
    for directive in dirs.SECTIONS[table_name]:
        if directive.attr is None:
            yield directive


def _format_value(directive: dirs.Directive, value: Any, wrap: bool = False) -> Optional[str]:
    """Config syntax for a value; None when there is nothing to write (unset, empty list)."""
    if value is None:
        return None
    if directive.is_list:
        kind = directive.kind
        assert isinstance(kind, dirs.ListKind)
        items = [kind.format_item(entry) for entry in kind.entries(value)]
        if not items:
            return None
        if wrap and len(items) > ENTRIES_PER_LINE:
            lines = [
                ", ".join(items[i : i + ENTRIES_PER_LINE]) for i in range(0, len(items), ENTRIES_PER_LINE)
            ]
            return (",\n" + " " * 8).join(lines)
        return ", ".join(items)
    kind = directive.kind
    assert isinstance(kind, dirs.Kind)
    return kind.format(value)


def _section_of(config: Config, table_name: str) -> Any:
    return getattr(config, table_name)


def _changed(config: Config, table_name: str) -> List[Tuple[dirs.Directive, str]]:
    """(directive, text) for every value that differs from the schema default."""
    section = _section_of(config, table_name)
    default = SECTION_CLASSES[table_name]()
    out = []
    for directive in _directives(table_name):
        if table_name == "main" and directive.name == "use_redis":
            continue  # written after the cache section, see format_config
        value = getattr(section, directive.attribute)
        if value == getattr(default, directive.attribute) and directive.name != "tempdir":
            continue
        text = _format_value(directive, value, wrap=True)
        if text is not None:
            out.append((directive, text))
    return out


def _domain_block(domain: DkimDomain, indent: str) -> str:
    return "%sdomain {\n%s    key = %s;\n%s    domain = %s;\n%s    selector = %s;\n%s};" % (
        indent, indent, quote(domain.key), indent, quote(domain.domain), indent, quote(domain.selector), indent,
    )


def format_config(config: Config) -> str:
    """A complete rmilter.conf for ``config``: values that differ from the defaults, per section."""
    out = ["# rmilter configuration written by rmilter.config.format_config"]
    for directive, text in _changed(config, "main"):
        out.append("%s = %s;" % (directive.name, text))
    for table_name in ("clamav", "spamd", "redis", "greylisting", "limits", "dkim"):
        changed = _changed(config, table_name)
        if table_name == "redis":
            # SPEC §4.5/§4.8: a redis { } section sets use_redis; a memcached { } one does not.
            redis_named = config.main.use_redis or config.cache_backend == "redis"
            if changed or config.cache_backend == "memcached":
                out.append("%s {" % ("redis" if redis_named else "memcached"))
                out.extend("    %s = %s;" % (d.name, text) for d, text in changed)
                out.append("}")
            out.append("use_redis = %s;" % ("yes" if config.main.use_redis else "no"))
            continue
        domains = config.dkim.domains if table_name == "dkim" else ()
        if not changed and not domains:
            continue
        out.append("%s {" % table_name)
        out.extend("    %s = %s;" % (d.name, text) for d, text in changed)
        out.extend(_domain_block(domain, "    ") for domain in domains)
        out.append("}")
    return "\n".join(out) + "\n"


def _origin_comment(origin: Optional[Origin]) -> str:
    return "  # %s:%d" % (origin.file, origin.line) if origin else ""


def format_effective(config: Config, show_secrets: bool = False) -> str:
    """One line per directive, ``section.directive = value``; ``# FILE:LINE`` for non-defaults.

    Secrets (``effective.SECRETS``) are ``"***"`` unless ``show_secrets``: the output is pasted
    into tickets and mailing lists.
    """
    from rmilter.config.effective import MASK, SECRETS, effective_servers, has_secrets

    out = []
    for table_name in SECTION_CLASSES:
        section = _section_of(config, table_name)
        default = SECTION_CLASSES[table_name]()
        for directive in _directives(table_name):
            key = "%s.%s" % (table_name, directive.attribute)
            value = getattr(section, directive.attribute)
            text = _format_value(directive, value)
            if text is None:
                text = "(empty)" if directive.is_list else "(unset)"
            elif key in SECRETS and not show_secrets:
                text = MASK
            if key == "main.tempdir":
                at_default = value == default_tempdir()
            else:
                at_default = value == getattr(default, directive.attribute)
            origin = None if at_default else config.origins.get(key)
            out.append("%s = %s%s" % (key, text, _origin_comment(origin)))
        if table_name == "dkim":
            if not config.dkim.domains:
                out.append("dkim.domain = (none)")
            for domain in config.dkim.domains:
                out.append(
                    "dkim.domain = { key = %s; domain = %s; selector = %s; }%s"
                    % (quote(domain.key), quote(domain.domain), quote(domain.selector),
                       _origin_comment(domain.origin))
                )
    out.append("# cache backend: %s" % config.cache_backend)
    out.extend("# effective %s" % line for line in effective_servers(config))
    if has_secrets(config):
        out.append('# secrets are shown as "***"; rmilter check-config --show-secrets FILE prints them'
                   if not show_secrets else "# secrets are shown in clear (--show-secrets)")
    if config.files:
        out.append("# files read: %s" % ", ".join(config.files))
    return "\n".join(out) + "\n"
