"""Rspamd over HTTP (SPEC §6.6, §6.8, §7.1): what the spam check and the tests use.

- ``reply``: the reply model and its parsing (``ScanReply``, ``parse_scan_reply``, §6.8.2);
- ``request``: the request fields and the message body (``ScanRequest``, ``prepare_body``, §6.8.1);
- ``http``: the project's own HTTP/1.1 connections and keep-alive pool (``HTTPTransport``);
- ``client``: ``RspamdClient``, its scans through the shared retry loop, ``from_config``.
"""
from rmilter.backends.rspamd.client import RspamdClient, RspamdError, RspamdScan, ScanTransport, from_config
from rmilter.backends.rspamd.http import Connector, HTTPTransport, server_connector
from rmilter.backends.rspamd.reply import (
    ACTIONS, MAX_HEADER_EDITS, BadReply, HeaderAddition, ScanReply, Symbol, parse_scan_reply)
from rmilter.backends.rspamd.request import DKIM_ONLY_SETTINGS, MessageBody, ScanRequest, prepare_body

__all__ = [
    "ACTIONS",
    "BadReply",
    "MAX_HEADER_EDITS",
    "Connector",
    "DKIM_ONLY_SETTINGS",
    "HTTPTransport",
    "HeaderAddition",
    "MessageBody",
    "RspamdClient",
    "RspamdError",
    "RspamdScan",
    "ScanReply",
    "ScanRequest",
    "ScanTransport",
    "Symbol",
    "from_config",
    "parse_scan_reply",
    "prepare_body",
    "server_connector",
]
