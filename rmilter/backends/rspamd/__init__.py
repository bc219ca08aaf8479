"""Rspamd over HTTP (SPEC §6.6, §6.8, §7.1): what the spam check and the tests use.

- ``reply``: the reply model and its parsing (``ScanReply``, ``parse_scan_reply``, §6.8.2);
- ``request``: the request fields and the message body (``ScanRequest``, ``prepare_body``, §6.8.1);
- ``transport``: treq over endpoints built once per runtime (``TreqTransport``), plain or TLS;
- ``client``: ``RspamdClient``, its scans through the shared retry loop, ``from_config``.
"""
from rmilter.backends.rspamd.client import RspamdClient, RspamdError, RspamdScan, ScanTransport, from_config
from rmilter.backends.rspamd.transport import EndpointFor, TreqTransport, server_endpoint
from rmilter.backends.rspamd.reply import (
    ACTIONS, MAX_HEADER_EDITS, BadReply, HeaderAddition, ScanReply, Symbol, parse_scan_reply)
from rmilter.backends.rspamd.request import DKIM_ONLY_SETTINGS, MessageBody, ScanRequest, prepare_body

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
