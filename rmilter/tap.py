"""``twistd rmilter``: command-line options and the service they build (SPEC §8.1).

    twistd -n --pidfile= rmilter --config /etc/rmilter.conf
    twistd -n --pidfile= rmilter --listen unix:/run/rmilter/rmilter.sock:mode=660 --listen tcp:11339
"""
from __future__ import annotations

import sys
from typing import Any, List, Optional

from twisted.application import service
from twisted.python import usage

from rmilter import __version__
from rmilter import config as rconfig
from rmilter.config.schema import DEFAULT_BIND_SOCKET
from rmilter.log import set_debug
from rmilter.logs import set_ident
from rmilter.startup import load_configuration

# rmilter.service and rmilter.workers are imported in makeService, once the configuration says
# whether the process needs TLS: they import the reactor (rmilter.tls_stack, issue 19)


#: exit status for a configuration that cannot be used (SPEC §8.1)
EX_CONFIG = 9


class Options(usage.Options):
    synopsis = "[--config FILE] [--listen ENDPOINT ...]"
    longdesc = (
        "Milter for Postfix and Sendmail: spam scanning with Rspamd, virus scanning with ClamAV, "
        "greylisting, rate limits, reply whitelisting and pub/sub copies with Redis, DKIM signing. "
        "Without --config the embedded default configuration is used: listen on %s, no backends, "
        "every message accepted. SIGHUP or SIGUSR1 reloads the configuration file; SIGTERM stops "
        "accepting connections and lets messages in flight finish." % (DEFAULT_BIND_SOCKET,)
    )
    optFlags = [
        ["debug", "d", "log debug events (connections, authentication, each backend exchange)"],
    ]
    optParameters = [
        ["config", "c", None, "rmilter.conf to read (default: the embedded default configuration)"],
        ["worker", None, None, "internal: run as worker process N of a main process (workers = N)", int],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        """Listen on ENDPOINT instead of bind_socket (repeatable): a bind_socket form
        (unix:/path, inet:PORT@HOST, inet6:PORT@[::1], fd:N) or a Twisted endpoint
        string (tcp:11339:interface=127.0.0.1, unix:/run/rmilter.sock:mode=660, systemd:domain=UNIX:index=0)."""
        try:
            rconfig.listen_endpoint(endpoint)
        except rconfig.ConfigError as e:
            raise usage.UsageError("--listen %s: %s" % (endpoint, "; ".join(e.errors)))
        self["listen"].append(endpoint)

    opt_l = opt_listen

    def opt_version(self) -> None:
        """Print the version and exit."""
        print("Rapid Milter Version %s" % (__version__,))
        sys.exit(0)

    def postOptions(self) -> None:
        """Flags only: the configuration is read when the service is assembled (``makeService``)."""
        if self["config"] is not None and not self["config"].strip():
            raise usage.UsageError("--config needs a file name")


def makeService(options: Any, reactor: Any = None) -> service.IService:
    """Read the configuration and its DKIM keys, then assemble the service.

    A configuration that cannot be used ends the process with C rmilter's status 9 and
    the same ``FILE:LINE: reason`` lines as ``rmilter check-config``, without a traceback.
    """
    path = options["config"]
    try:
        config, keyring = load_configuration(path)
    except rconfig.ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        print("rmilter: configuration %s is invalid; not starting" % (path,), file=sys.stderr)
        raise SystemExit(EX_CONFIG)
    set_debug(bool(options["debug"]))
    set_ident(config.main.syslog_name)  # the main process of workers = N logs under it too
    from rmilter import tls_stack

    tls_stack.load_reactor(with_tls=tls_stack.needs_tls(config), with_http=tls_stack.uses_http(config))
    from rmilter.service import RmilterService
    from rmilter.workers import WorkerChannel, WorkerSupervisor, worker_count

    if options["worker"] is None and worker_count(config.main.workers) > 1:
        return WorkerSupervisor(  # type: ignore[return-value]
            config, config_path=path, listen=options["listen"], reactor=reactor, debug=bool(options["debug"]),
        )
    set_ident(config.main.syslog_name)
    rmilter = RmilterService(
        config,
        keyring=keyring,
        config_path=path,
        listen=options["listen"],
        reactor=reactor,
        worker=options["worker"],
    )
    if options["worker"] is not None:  # its figures to the main process, and its death noticed
        WorkerChannel(rmilter, reactor).setServiceParent(rmilter)
    return rmilter  # type: ignore[return-value]


def make_application_service(config_path: Optional[str], listen: Optional[List[str]] = None) -> service.IService:
    """For rmilter.tac: the same service as ``twistd rmilter``, configured from arguments."""
    options = Options()
    args: List[str] = []
    if config_path:
        args += ["--config", config_path]
    for endpoint in listen or ():
        args += ["--listen", endpoint]
    options.parseOptions(args)
    return makeService(options)
