"""Replies to our own mail (SPEC §6.4). Placeholder until issue 7 lands."""
from __future__ import annotations

from typing import List

from twisted.internet.defer import Deferred, succeed

from rmilter.context import MessageContext


def lookup(msg: MessageContext, message_ids: List[str]) -> None:
    """Start looking up In-Reply-To / References ids; ``settle`` waits for them."""


def settle(msg: MessageContext) -> "Deferred[None]":
    return succeed(None)


def remember(msg: MessageContext) -> None:
    """Store the Message-ID of an accepted message of an authenticated sender."""
