"""The ``rmilter`` console script: ``rmilter check-config FILE`` (and ``python -m rmilter``).

The daemon itself runs under twistd (``twistd rmilter --config FILE``); this
command is for administrators checking a file before a reload or a migration
from the C rmilter.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional, TextIO

from rmilter import __version__
from rmilter import config as rconfig
from rmilter.service import load_configuration

#: exit statuses
OK = 0
INVALID = 1
USAGE = 2


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
    return parser


def main(argv: Optional[List[str]] = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.file, out, err, args.show_secrets)
    _parser().print_usage(err)
    return USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
