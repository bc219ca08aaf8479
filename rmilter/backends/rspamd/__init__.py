"""Rspamd over HTTP (SPEC §6.6, §6.8, §7.1): what the spam check and the tests use.

- ``reply``: the reply model and its parsing (``ScanReply``, ``parse_scan_reply``, §6.8.2);
- ``request``: the request fields and the message body (``ScanRequest``, ``prepare_body``, §6.8.1);
- ``transport``: treq over endpoints built once per runtime (``TreqTransport``), plain or TLS;
- ``client``: ``RspamdClient``, its scans through the shared retry loop, ``from_config``.
"""
from typing import TYPE_CHECKING, Any, Optional

from rmilter.backends.rspamd.reply import (
    ACTIONS, MAX_HEADER_EDITS, BadReply, HeaderAddition, ScanReply, Symbol, parse_scan_reply)
from rmilter.backends.rspamd.request import DKIM_ONLY_SETTINGS, MessageBody, ScanRequest, prepare_body

if TYPE_CHECKING:
    from rmilter.config.schema import Config
    from rmilter.backends.rspamd.client import RspamdClient, RspamdError, RspamdScan, ScanTransport
    from rmilter.backends.rspamd.transport import EndpointFor, TreqTransport, server_endpoint

#: issue 19: the client and its transport (treq, twisted.web) are imported when first used, so a
#: configuration without spamd servers does not carry them (start-up weight)
_LAZY = {"RspamdClient": "client", "RspamdError": "client", "RspamdScan": "client", "ScanTransport": "client",
         "EndpointFor": "transport", "TreqTransport": "transport",
         "server_endpoint": "transport"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError("module %r has no attribute %r" % (__name__, name))
    import importlib

    value = getattr(importlib.import_module("rmilter.backends.rspamd." + module), name)
    globals()[name] = value
    return value


def from_config(config: "Config", reactor: Any) -> "Optional[RspamdClient]":
    """The rspamd client of a configuration, or None (and no treq loaded) without spamd servers."""
    if not config.spamd.servers:
        return None
    from rmilter.backends.rspamd import client

    return client.from_config(config, reactor)


__all__ = [
    "ACTIONS",
    "BadReply",
    "MAX_HEADER_EDITS",
    "DKIM_ONLY_SETTINGS",
    "EndpointFor",
    "HeaderAddition",
    "MessageBody",
    "RspamdClient",
    "RspamdError",
    "RspamdScan",
    "ScanReply",
    "ScanRequest",
    "ScanTransport",
    "Symbol",
    "TreqTransport",
    "from_config",
    "parse_scan_reply",
    "prepare_body",
    "server_endpoint",
]
