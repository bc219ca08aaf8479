"""The ``rmilter`` console script: ``rmilter check-config FILE``, ``rmilter status`` (and ``python -m rmilter``).

The daemon itself runs under twistd (``twistd rmilter --config FILE``); this
command is for administrators checking a file before a reload or a migration
from the C rmilter.
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
from typing import Any, Dict, List, Optional, TextIO, Tuple

from rmilter import __version__
from rmilter import config as rconfig
from rmilter import testmessage
from rmilter.service import load_configuration

#: exit statuses
OK = 0
INVALID = 1
USAGE = 2
#: ``rmilter status``: the instance answered 503 (shutting down, no listener) / could not be asked
UNHEALTHY = 1
UNREACHABLE = 69


def check_config(path: str, out: TextIO, err: TextIO, show_secrets: bool = False) -> int:
    """Print the effective configuration and exit 0, or print every error to ``err`` and exit 1."""
    try:
        config, keyring = load_configuration(path)
    except rconfig.ConfigError as e:
        for line in e.errors:
            err.write(line + "\n")
        err.write("%s: configuration is invalid (%d error%s)\n"
                  % (path, len(e.errors), "" if len(e.errors) == 1 else "s"))
        return INVALID
    out.write(rconfig.format_effective(config, show_secrets))
    for warning in config.warnings:
        out.write("# warning: %s\n" % warning)
    for problem in keyring.problems if keyring is not None else ():
        out.write("# dkim: %s\n" % problem)
    for notice in rconfig.startup_notices(config):
        out.write("# note: %s\n" % notice)
    out.write("# %s: configuration is valid (%d warning%s)\n"
              % (path, len(config.warnings), "" if len(config.warnings) == 1 else "s"))
    return OK


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix socket (``metrics_socket = unix:/path``)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


def health_connection(spec: str, timeout: float = 5.0) -> http.client.HTTPConnection:
    """A connection to the ``metrics_socket`` ``spec`` (bind_socket forms or a tcp:/unix: endpoint)."""
    endpoint = rconfig.listen_endpoint(spec)
    kind, _, rest = endpoint.partition(":")
    fields = rest.replace("\\:", "\0").split(":")
    options = dict(f.split("=", 1) for f in fields[1:] if "=" in f)
    if kind == "unix":
        return _UnixHTTPConnection(fields[0].replace("\0", ":").replace("\\\\", "\\"), timeout)
    if kind in ("tcp", "tcp6"):
        host = options.get("interface", "").replace("\0", ":") or "127.0.0.1"
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return http.client.HTTPConnection(host, int(fields[0]), timeout=timeout)
    raise ValueError("metrics_socket %s cannot be reached from here (use --socket inet:PORT@HOST or unix:PATH)"
                     % (spec,))


def fetch_health(spec: str, timeout: float = 5.0) -> Tuple[int, Dict[str, Any]]:
    """GET /health from a running instance: (HTTP status, document)."""
    connection = health_connection(spec, timeout)
    try:
        connection.request("GET", "/health")
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


def status(config_path: Optional[str], spec: Optional[str], out: TextIO, err: TextIO) -> int:
    """Print the health of the running instance; 0 healthy, 1 unhealthy (503), 69 unreachable."""
    if spec is None:
        try:
            config = rconfig.load(config_path) if config_path else rconfig.default()
        except rconfig.ConfigError as e:
            for line in e.errors:
                err.write(line + "\n")
            return INVALID
        spec = config.main.metrics_socket
        if spec is None:
            err.write("rmilter status: %s sets no metrics_socket; nothing to ask (or use --socket)\n"
                      % (config_path or "the embedded default configuration",))
            return UNREACHABLE
    try:
        code, document = fetch_health(spec)
    except (OSError, ValueError, http.client.HTTPException, rconfig.ConfigError) as e:
        err.write("rmilter status: cannot ask %s: %s\n" % (spec, e))
        return UNREACHABLE
    out.write("status: %s\n" % (document.get("status"),))
    for key in ("version", "pid", "config_file", "config_generation", "connections", "messages_in_flight"):
        if key in document:
            out.write("%s: %s\n" % (key, document[key]))
    for listener in document.get("listeners", ()):
        out.write("listener: %s\n" % (listener,))
    if document.get("metrics_listener"):
        out.write("metrics listener: %s\n" % (document["metrics_listener"],))
    return OK if code == 200 else UNHEALTHY


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rmilter",
        description="rmilter administration. The daemon runs under twistd: twistd rmilter --config FILE.",
    )
    parser.add_argument("-v", "--version", action="version", version="Rapid Milter Version %s" % __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser(
        "check-config",
        help="check a configuration file and print the effective configuration",
        description="Read FILE with its includes. Valid: print every directive with its value (and, "
        "when not the default, the FILE:LINE that set it), then warnings; exit 0. Invalid: print "
        "every error as FILE:LINE: reason to stderr; exit 1.",
    )
    check.add_argument("file", metavar="FILE")
    check.add_argument("--show-secrets", action="store_true",
                       help='print secrets such as the Redis password instead of "***"')
    testmessage.add_parser(commands)
    state = commands.add_parser(
        "status",
        help="print the health of a running rmilter (GET /health on its metrics_socket)",
        description="Ask the running instance for its health on the metrics_socket of FILE (or "
        "--socket): status, configuration generation, listeners. Exit 0 when healthy, 1 while it "
        "shuts down or has no listener, 69 when it cannot be reached.",
    )
    state.add_argument("-c", "--config", metavar="FILE", help="rmilter.conf naming the metrics_socket")
    state.add_argument("--socket", metavar="SPEC", help="the metrics_socket itself (inet:PORT@HOST, unix:PATH)")
    return parser


def main(argv: Optional[List[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file, out, err, args.show_secrets)
    if args.command == "test-message":
        return testmessage.main(args, out, err)
    if args.command == "status":
        return status(args.config, args.socket, out, err)
    _parser().print_usage(err)
    return USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
