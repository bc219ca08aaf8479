"""Rate limits (SPEC §6.3). Placeholder until issue 6 lands."""
from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred, succeed

from rmilter.context import MessageContext
from rmilter.verdict import Verdict


def check(msg: MessageContext, recipient: str) -> "Deferred[Optional[Verdict]]":
    return succeed(None)


def update(msg: MessageContext) -> "Deferred[None]":
    return succeed(None)
