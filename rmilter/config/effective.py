"""What the configuration will really do, for ``check-config`` and the start-up log (issue 13 item 5).

- the servers with the port that will be used (``clamd`` -> ``clamd:3310``);
- a note for every feature that is enabled but cannot act (greylisting without Redis servers ...);
- secrets (the Redis password) masked unless asked for (issue 18 item 10).
"""
from __future__ import annotations

from typing import Iterable, List

from rmilter.config.schema import Config, RedisServer, ServerSpec

#: ``section.attribute`` of values check-config shows as "***"
SECRETS = frozenset({"redis.password"})
MASK = '"***"'


def _server(spec: ServerSpec) -> str:
    if spec.is_unix:
        return "%s (unix socket)" % spec.path
    text = "%s:%d" % (spec.host, spec.port) if spec.port is not None else str(spec.host)
    return text + (" (priority %d)" % spec.priority if spec.priority else "")


def _redis(server: RedisServer) -> str:
    if server.is_sentinel:
        return "sentinel master %s via %s" % (server.master, ", ".join("%s:%d" % s for s in server.sentinels))
    return "%s:%d" % (server.host, server.port)


def _join(items: Iterable[str]) -> str:
    return ", ".join(items) or "(none)"


def effective_servers(config: Config) -> List[str]:
    """``clamav servers: clamd:3310`` ... for every configured server list."""
    lines = []
    if config.clamav.servers:
        lines.append("clamav servers: %s" % _join(_server(s) for s in config.clamav.servers))
    if config.spamd.servers:
        lines.append("spamd servers: %s" % _join(_server(s) for s in config.spamd.servers))
    if config.spamd.also_check:
        lines.append("spamd also_check: %s" % _join(_server(s) for s in config.spamd.also_check))
    redis = config.redis
    for role in ("servers_grey", "servers_white", "servers_limits", "servers_id", "servers_spam", "servers_copy"):
        servers = getattr(redis, role)
        if servers:
            lines.append("redis %s: %s" % (role, _join(_redis(s) for s in servers)))
    return lines


def _configured(config: Config, section: str) -> bool:
    """The file says something in this section (the defaults alone enable greylisting and dkim,
    and a note for every file without them would be noise)."""
    prefix = section + "."
    return any(key.startswith(prefix) for key in config.origins)


def has_secrets(config: Config) -> bool:
    return any(getattr(getattr(config, key.split(".")[0]), key.split(".")[1]) is not None for key in SECRETS)


def inactive_features(config: Config) -> List[str]:
    """Features switched on that will not act, and why; logged at start too."""
    notes = []
    redis_off = "" if config.redis_enabled else " (the cache backend is memcached, which is not supported)"
    g = config.greylisting
    if g.enable and _configured(config, "greylisting") and not config.greylisting_active:
        if not config.redis.servers_grey or not config.redis_enabled:
            notes.append("greylisting is enabled but inactive: no Redis servers_grey%s" % redis_off)
        else:
            notes.append("greylisting is enabled but inactive: timeout or expire is 0")
    lim = config.limits
    buckets = [name for name in ("limit_to", "limit_to_ip", "limit_to_ip_from", "limit_bounce_to",
                                 "limit_bounce_to_ip") if getattr(lim, name).enabled]
    if lim.enable and buckets and not config.limits_active:
        notes.append("limits (%s) are set but inactive: no Redis servers_limits%s" % (", ".join(buckets), redis_off))
    d = config.dkim
    if d.enable and _configured(config, "dkim") and not d.domains and not d.key_table and not d.rspamd_sign:
        notes.append("dkim is enabled but inactive: no domain { } block and no key_table, nothing is signed")
    if not config.redis_enabled:
        used = [role for role in ("servers_grey", "servers_white", "servers_limits", "servers_id",
                                  "servers_spam", "servers_copy") if getattr(config.redis, role)]
        if used:
            notes.append("Redis servers are configured (%s) but unused: the cache backend is memcached; "
                         "write redis { } or use_redis = yes" % ", ".join(used))
    return notes
