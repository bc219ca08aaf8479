"""Pub/sub copies (SPEC §6.5). Placeholder until issue 7 lands."""
from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from rmilter.context import MessageContext


def publish(msg: MessageContext, kind: str) -> "Deferred[None]":
    return succeed(None)
