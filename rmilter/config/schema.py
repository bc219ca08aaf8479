"""Typed, immutable configuration: one frozen class per section (SPEC §4.5-§4.11).

Every attribute is named exactly like its directive in ``rmilter.conf``, so
``config.spamd.results_timeout`` is the value of ``results_timeout`` inside
``spamd { }``.  Times are float seconds (SPEC stores milliseconds; B2, B36),
sizes are int bytes.  The defaults here are the documented defaults, including
the deliberate changes of SPEC §10.  The parser (``rmilter.config.parser``) is
the only producer of these objects; everything else only reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

from rmilter.netlist import NetList, RecipientList

#: default TCP ports when a server spec has none (B6)
CLAMD_DEFAULT_PORT = 3310
RSPAMD_DEFAULT_PORT = 11333
REDIS_DEFAULT_PORT = 6379
SENTINEL_DEFAULT_PORT = 26379

#: the listener used when no bind_socket is configured (documented in README)
DEFAULT_BIND_SOCKET = "inet:11339@127.0.0.1"


@dataclass(frozen=True)
class ServerSpec:
    """A clamd or rspamd server: TCP ``host:port[:priority]`` or a unix socket path."""

    name: str  # as configured (minus any ``r:`` prefix); shown in logs and X-Rspamd-Server
    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None  # unix socket
    priority: int = 0
    #: rspamd only: ``https://host[:port]``, reached over verified TLS (issue 12)
    tls: bool = False

    @property
    def is_unix(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class RedisServer:
    """One Redis server of a role list: ``host[:port]`` (unix sockets unsupported), or the master
    of a Redis Sentinel group, ``sentinel:MASTER@host:port,host:port`` (SPEC §11).

    For a Sentinel entry ``host``/``port`` are those of the first Sentinel (for logs); the
    master's address is asked from the Sentinels before every connection.
    """

    name: str
    host: str
    port: int = REDIS_DEFAULT_PORT
    #: the Sentinels' master name; None for a plain server
    master: Optional[str] = None
    #: (host, port) of every Sentinel of the group
    sentinels: Tuple[Tuple[str, int], ...] = ()

    @property
    def is_sentinel(self) -> bool:
        return self.master is not None


@dataclass(frozen=True)
class Bucket:
    """A leaky bucket ``burst:rate``; disabled when either is 0 (SPEC §4.4)."""

    burst: int = 0
    rate: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.burst > 0 and self.rate > 0


@dataclass(frozen=True)
class DkimDomain:
    """One ``domain { }`` block of the dkim section (SPEC §4.11)."""

    domain: str  # lowercased; ``*`` matches every sender domain
    selector: str
    #: path as configured: a key file (signs exactly ``domain``) or a directory of
    #: ``<domain>.<selector>.key`` files; which one is decided when the keys are loaded
    key: str
    #: where the ``domain { }`` block starts (for check-config); not part of equality
    origin: Optional["Origin"] = field(default=None, compare=False)
    #: where ``key`` was set (for errors about the key file)
    key_origin: Optional["Origin"] = field(default=None, compare=False)


@dataclass(frozen=True)
class GlobalConfig:
    pidfile: Optional[str] = None
    tempdir: str = "/tmp"
    tempfiles_mode: int = 0o600
    bind_socket: Optional[str] = None  # socket spec as written (SPEC §4.4)
    #: listen(2) backlog of every listener (Twisted's default of 50 made a burst of MTA
    #: connections wait for SYN retries); Linux caps it at net.core.somaxconn
    listen_backlog: int = 1024
    max_size: int = 0
    strict_auth: bool = False
    whitelist: RecipientList = field(default_factory=RecipientList)
    our_networks: NetList = field(default_factory=NetList)
    use_redis: bool = False
    syslog_name: str = "rmilter"
    use_dcc: bool = False
    spf_domains: Tuple[str, ...] = ()
    # --- extensions of this implementation (not in C rmilter) ---
    #: largest milter frame accepted from the MTA before the connection is closed
    max_frame_size: int = 2 * 1024 * 1024
    #: message bytes kept in memory before the spool moves to a file in tempdir
    spool_memory_limit: int = 1024 * 1024
    #: message bytes all in-memory spools may hold together; a message that does not fit goes
    #: to tempdir at once (0: no limit across messages)
    spool_memory_total: int = 4 * 1024 * 1024
    #: worker processes sharing the listeners (0: one per core; 1: this process serves alone)
    workers: int = 1
    #: a milter connection silent for this long is closed
    idle_timeout: float = 900.0
    #: PROGRESS keep-alive period while a check is still working
    progress_interval: float = 10.0
    #: on SIGTERM, how long messages in flight may take before the process exits
    shutdown_timeout: float = 30.0
    #: when set, accepted messages get this header naming rmilter, the message tag, the client
    #: address and the authenticated user: a trace for administrators (off by default)
    trace_header: Optional[str] = None
    #: every check that can end a message runs in dry run (see ``dry_run`` of the sections)
    dry_run: bool = False
    #: where /metrics, /health and the status page are served (a bind_socket form); off when unset
    metrics_socket: Optional[str] = None
    #: owner, group and mode of the unix sockets rmilter creates (issue 13): Postfix's smtpd runs
    #: as user postfix and must be able to connect; owner/group default to ``user``/``group``
    bind_socket_owner: Optional[str] = None
    bind_socket_group: Optional[str] = None
    bind_socket_mode: int = 0o660
    #: after the listeners, the pid file and the log are open, run as this user and group
    user: Optional[str] = None
    group: Optional[str] = None


@dataclass(frozen=True)
class ClamavConfig:
    servers: Tuple[ServerSpec, ...] = ()
    connect_timeout: float = 1.0
    port_timeout: float = 3.0  # accepted, unused (SPEC §4.6)
    results_timeout: float = 20.0
    error_time: float = 10.0
    dead_time: float = 300.0
    maxerrors: int = 10
    whitelist: NetList = field(default_factory=NetList)
    #: extension: a virus is logged as "would reject" and the message goes on
    dry_run: bool = False


@dataclass(frozen=True)
class SpamdConfig:
    servers: Tuple[ServerSpec, ...] = ()
    also_check: Tuple[ServerSpec, ...] = ()
    diff_dir: Optional[str] = None
    symbols_dir: Optional[str] = None
    check_symbols: Optional[str] = None
    rspamd_metric: str = "default"
    connect_timeout: float = 1.0
    results_timeout: float = 20.0
    error_time: float = 10.0
    dead_time: float = 300.0
    maxerrors: int = 10
    retry_count: int = 5
    retry_timeout: float = 1.0
    tempfail_on_error: bool = False
    reject_message: str = "Spam message rejected; If this is not spam contact abuse team"
    whitelist: NetList = field(default_factory=NetList)
    spamd_soft_fail: bool = True
    spamd_greylist: bool = True
    spamd_never_reject: bool = False
    spamd_spam_add_header: bool = True
    spam_header: str = "X-Spam"
    spam_header_value: str = "yes"
    spam_no_auth_header: bool = False
    extended_spam_headers: bool = False
    extended_headers_rcpt: RecipientList = field(default_factory=RecipientList)
    spamd_settings_id: Optional[str] = None
    trace_symbol: Optional[str] = None
    trace_addr: Optional[str] = None
    compression: bool = False
    spam_bar_char: str = "x"
    # --- extension: "checkv2" (POST /checkv2, default) or "legacy" (POST /symbols) ---
    protocol: str = "checkv2"
    #: extension: Rspamd's reject/soft reject/discard/quarantine is logged as "would ..." only
    dry_run: bool = False
    # --- extension (issue 12): TLS for ``https://`` servers ---
    tls_ca: Optional[str] = None  # PEM file of trusted CAs; None: the system trust store
    tls_cert: Optional[str] = None  # PEM client certificate (with tls_key)
    tls_key: Optional[str] = None
    tls_verify: bool = True  # "no" only explicitly, with a warning at start


@dataclass(frozen=True)
class RedisConfig:
    servers_grey: Tuple[RedisServer, ...] = ()
    servers_white: Tuple[RedisServer, ...] = ()  # empty: falls back to servers_grey
    servers_limits: Tuple[RedisServer, ...] = ()
    servers_id: Tuple[RedisServer, ...] = ()
    servers_spam: Tuple[RedisServer, ...] = ()
    servers_copy: Tuple[RedisServer, ...] = ()
    connect_timeout: float = 1.0
    error_time: float = 10.0
    dead_time: float = 300.0
    maxerrors: int = 10
    password: Optional[str] = None
    dbname: Optional[str] = None
    grey_prefix: str = "grey"
    white_prefix: str = "white"
    id_prefix: str = "id"
    spam_channel: Optional[str] = None
    copy_channel: Optional[str] = None
    copy_probability: float = 1.0  # plain probability 0..1 (B12)
    protocol: Optional[str] = None  # accepted, ignored
    # --- extension: TTL of Message-ID records written for replies (SPEC §6.4) ---
    id_expire: float = 86400.0

    @property
    def effective_servers_white(self) -> Tuple[RedisServer, ...]:
        return self.servers_white or self.servers_grey


@dataclass(frozen=True)
class GreylistingConfig:
    enable: bool = True
    timeout: float = 300.0
    expire: float = 86400.0
    expire_white: float = 3 * 86400.0  # B32: does not follow expire
    whitelist: NetList = field(default_factory=NetList)
    greylisted_message: str = "Try again later"
    # --- extensions of this implementation (SPEC §11) ---
    #: unset: the C rmilter's IPv4 address block (B17: what its "/19" really kept), so existing
    #: records stay valid; N: the first N bits of the IPv4 client address (N = 32: the address)
    ipv4_mask: Optional[int] = None
    #: the first N bits of the IPv6 client address; 64 is exactly the C block
    ipv6_mask: int = 64
    #: at EOM greylisting, when Rspamd reports SPF pass (R_SPF_ALLOW) for the envelope sender's
    #: domain, key the triplet on that domain instead of the client address
    key_on_spf_domain: bool = False
    #: records are kept as usual, but a message that would be deferred goes on
    dry_run: bool = False


@dataclass(frozen=True)
class LimitsConfig:
    enable: bool = True
    limit_to: Bucket = Bucket()
    limit_to_ip: Bucket = Bucket()
    limit_to_ip_from: Bucket = Bucket()
    limit_bounce_to: Bucket = Bucket()
    limit_bounce_to_ip: Bucket = Bucket()
    limit_whitelist: NetList = field(default_factory=NetList)
    limit_whitelist_rcpt: RecipientList = field(default_factory=RecipientList)
    limit_bounce_addrs: Tuple[str, ...] = ()
    #: extension: a recipient over its limit is logged as "would defer" and accepted
    dry_run: bool = False


@dataclass(frozen=True)
class DkimConfig:
    enable: bool = True
    domains: Tuple[DkimDomain, ...] = ()
    header_canon: str = "simple"
    body_canon: str = "simple"
    sign_alg: str = "sha1"
    auth_only: bool = True
    sign_networks: NetList = field(default_factory=NetList)
    fold_header: bool = False
    rspamd_sign: bool = False
    # --- extensions of this implementation (SPEC §11) ---
    #: OpenDKIM KeyTable (``[file:]PATH``): key name -> domain:selector:key
    key_table: Optional[str] = None
    #: OpenDKIM SigningTable (``[file:|refile:]PATH``): From address -> key name[:signer]
    signing_table: Optional[str] = None
    #: OpenDKIM's MultipleSignatures: every matching SigningTable entry signs, not only the first
    multiple_signatures: bool = False
    #: headers signed once more than they occur (RFC 6376 §8.15 "oversigning"), lowercase
    oversign_headers: Tuple[str, ...] = ()


@dataclass(frozen=True)
class Origin:
    """Where a directive's value came from, for check-config and error messages."""

    file: str
    line: int


@dataclass(frozen=True)
class Config:
    """The whole effective configuration; replaced as a unit on reload."""

    main: GlobalConfig = field(default_factory=GlobalConfig)
    clamav: ClamavConfig = field(default_factory=ClamavConfig)
    spamd: SpamdConfig = field(default_factory=SpamdConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    greylisting: GreylistingConfig = field(default_factory=GreylistingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    #: "redis", or "memcached" when the effective cache backend is memcached (B13: features off)
    cache_backend: str = "redis"
    #: "section.directive" -> where it was last set; absent = default
    origins: Mapping[str, Origin] = field(default_factory=lambda: MappingProxyType({}))
    #: warnings produced while parsing (removed directives, mirrored servers, ...)
    warnings: Tuple[str, ...] = ()
    #: the files read, in order (for reload and check-config)
    files: Tuple[str, ...] = ()

    @property
    def redis_enabled(self) -> bool:
        """Redis features may run: the cache backend is Redis (not memcached, B13)."""
        return self.cache_backend == "redis"

    @property
    def greylisting_active(self) -> bool:
        """SPEC §4.9: enabled, grey servers exist, timeout and expire non-zero."""
        g = self.greylisting
        return (
            self.redis_enabled
            and g.enable
            and bool(self.redis.servers_grey)
            and g.timeout > 0
            and g.expire > 0
        )

    @property
    def limits_active(self) -> bool:
        return self.redis_enabled and self.limits.enable and bool(self.redis.servers_limits)
