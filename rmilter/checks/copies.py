"""Copies of messages published to Redis pub/sub channels (SPEC §6.5, B12, B23).

``spam``: messages Rspamd answered ``reject`` go to ``spam_channel`` on
``servers_spam``.  ``copy``: messages reaching EOM step 6 go to
``copy_channel`` on ``servers_copy`` with plain probability
``copy_probability`` (B12), and only when ``servers_copy`` is set (B23).  The
payload is the whole spool (§5.14).  Publishing never changes the verdict and
delays it by at most ``redis.connect_timeout``.
"""
from __future__ import annotations

import random
from typing import Any, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from rmilter.log import Logger
from twisted.python.failure import Failure

from rmilter.context import MessageContext

log = Logger(namespace="rmilter.copies")

#: the sampling source for copy_probability; tests replace it with a seeded ``random.Random``
sampler: random.Random = random.Random()

KINDS = ("spam", "copy")


def _target(msg: MessageContext, kind: str) -> Optional[Tuple[Any, str]]:
    """The Redis role and channel for ``kind``, or None when that kind of copy is off."""
    runtime = msg.runtime
    config = runtime.config
    if kind not in KINDS:
        raise ValueError("unknown copy kind %r" % (kind,))
    if not config.redis_enabled or runtime.redis is None:
        return None
    if kind == "spam":
        channel, role = config.redis.spam_channel, runtime.redis.spam
    else:
        channel, role = config.redis.copy_channel, runtime.redis.copy
    if not channel or role is None:
        return None
    return role, channel


def wanted(msg: MessageContext, kind: str) -> bool:
    """Spam copies always; message copies with probability ``copy_probability`` (B12: plain p)."""
    if kind == "spam":
        return True
    probability = msg.runtime.config.redis.copy_probability
    if probability >= 1.0:
        return True
    return sampler.random() < probability


def _note(msg: MessageContext, text: str) -> None:
    """Add ``published to ...`` to the summary line; a spam copy and a message copy both show."""
    previous = msg.log_fields.get("published")
    msg.log_fields["published"] = text if not previous else previous + "; " + text


def publish(msg: MessageContext, kind: str) -> "Deferred[None]":
    """PUBLISH the spool on the channel of ``kind``; never fails, bounded by connect_timeout."""
    try:
        target = _target(msg, kind)
        if target is None or msg.spool is None or not wanted(msg, kind):
            return succeed(None)
    except Exception:
        log.failure("{tag}; cannot publish a {kind} copy", tag=msg.tag, kind=kind)
        return succeed(None)
    role, channel = target
    spool = msg.spool
    runtime = msg.runtime

    def send(payload: bytes) -> "Deferred[Optional[int]]":
        return role.publish(channel, payload)

    def published(subscribers: Optional[int]) -> None:
        if subscribers is None:
            log.warn("{tag}; cannot publish message to channel {channel}", tag=msg.tag, channel=channel)
            return
        log.debug("{tag}; published message to {channel} ({n} clients)", tag=msg.tag, channel=channel,
                  n=subscribers)
        _note(msg, "published to %s (%d clients)" % (channel, subscribers))

    def failed(failure: Failure) -> None:
        log.warn("{tag}; cannot publish message to channel {channel}: {error}", tag=msg.tag, channel=channel,
                 error=failure.getErrorMessage() or failure.type.__name__)

    # the payload is the whole spool: the head, then the body (from memory or the spool file)
    payload: "Deferred[bytes]" = spool.read(0, spool.size)
    payload.addCallback(send)
    payload.addTimeout(runtime.config.redis.connect_timeout, runtime.clock)
    return payload.addCallbacks(published, failed)
