"""Copies of messages published to Redis pub/sub channels (SPEC §6.5, B12, B23).

``spam``: messages Rspamd answered ``reject`` go to ``spam_channel`` on
``servers_spam``.  ``copy``: messages reaching EOM step 6 go to
``copy_channel`` on ``servers_copy`` with plain probability
``copy_probability`` (B12), and only when ``servers_copy`` is set (B23).  The
payload is the whole spool (§5.14).  Publishing never changes the verdict and
delays it by at most ``redis.connect_timeout``.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from rmilter.context import MessageContext
from rmilter.deps import Deps
from rmilter.log import Logger
from rmilter.verdict import Check, CheckResult, skipped

log = Logger(namespace="rmilter.copies")

SPAM = "spam"
COPY = "copy"
KINDS = (SPAM, COPY)


def _target(deps: Deps, kind: str) -> Optional[Tuple[Any, str]]:
    """The Redis role and channel for ``kind``, or None when that kind of copy is off."""
    config = deps.config
    if kind not in KINDS:
        raise ValueError("unknown copy kind %r" % (kind,))
    if not config.redis_enabled or deps.redis is None:
        return None
    if kind == SPAM:
        channel, role = config.redis.spam_channel, deps.redis.spam
    else:
        channel, role = config.redis.copy_channel, deps.redis.copy
    if not channel or role is None:
        return None
    return role, channel


def wanted(deps: Deps, kind: str) -> bool:
    """Spam copies always; message copies with probability ``copy_probability`` (B12: plain p)."""
    if kind == SPAM:
        return True
    probability = deps.config.redis.copy_probability
    if probability >= 1.0:
        return True
    return deps.rng.random() < probability


def check(message: MessageContext, deps: Deps, *, kind: str) -> "Deferred[CheckResult]":
    """PUBLISH the spool on the channel of ``kind``; never fails, bounded by connect_timeout.

    The result's summary is what the summary line shows (``published to <channel> (<n> clients)``),
    or why nothing was published.
    """
    try:
        target = _target(deps, kind)
        if target is None:
            return succeed(skipped(Check.COPIES, "no %s channel" % (kind,)))
        if message.spool is None:
            return succeed(skipped(Check.COPIES, "no spool"))
        if not wanted(deps, kind):
            return succeed(skipped(Check.COPIES, "not sampled"))
    except Exception:
        log.failure("{tag}; cannot publish a {kind} copy", tag=message.tag, kind=kind)
        return succeed(CheckResult(Check.COPIES, "not published, internal error", failed=True))
    role, channel = target
    spool = message.spool
    # reading the spool and the PUBLISH together wait at most connect_timeout (SPEC §6.10)
    deadline = deps.clock.seconds() + deps.config.redis.connect_timeout

    def send(payload: bytes) -> "Deferred[Optional[int]]":
        return role.publish(channel, payload, deadline=deadline)

    def published(subscribers: Optional[int]) -> CheckResult:
        if subscribers is None:
            log.warn("{tag}; cannot publish message to channel {channel}", tag=message.tag, channel=channel)
            return CheckResult(Check.COPIES, "not published to %s" % (channel,), failed=True)
        log.debug("{tag}; published message to {channel} ({n} clients)", tag=message.tag, channel=channel,
                  n=subscribers)
        return CheckResult(Check.COPIES, "published to %s (%d clients)" % (channel, subscribers),
                           details={"channel": channel, "subscribers": subscribers})

    def failed(failure: Failure) -> CheckResult:
        log.warn("{tag}; cannot publish message to channel {channel}: {error}", tag=message.tag, channel=channel,
                 error=failure.getErrorMessage() or failure.type.__name__)
        return CheckResult(Check.COPIES, "not published to %s" % (channel,), failed=True)

    # the payload is the whole spool: the head, then the body (from memory or the spool file)
    payload: "Deferred[bytes]" = spool.read(0, spool.size)
    payload.addCallback(send)
    return payload.addCallbacks(published, failed)


def published(result: CheckResult) -> bool:
    """A copy went out: the summary line names it."""
    return result.check is Check.COPIES and "subscribers" in result.details
