"""Replies to mail our users sent skip the spam scan and EOM greylisting (SPEC §6.4).

Outbound: every accepted message of an authenticated sender (SASL, or an
``our_networks`` client without ``strict_auth``) has its Message-ID stored on
``servers_id`` under ``id_prefix`` + lowercase hex BLAKE2b-512 of the id, with
TTL ``id_expire``.  Inbound: In-Reply-To and every References token (B14) are
looked up the same way while the headers arrive; EOM waits for the answers
(each bounded by ``connect_timeout``) and a hit turns strict checks off.

Redis trouble is a miss on lookup and a log line on store: it never delays or
fails a message beyond ``connect_timeout`` (SPEC §6.10).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from twisted.internet.defer import Deferred, gatherResults, succeed
from rmilter.log import Logger
from twisted.python.failure import Failure

from rmilter.context import MessageContext

log = Logger(namespace="rmilter.replies")

#: C builds keys in a 250-byte buffer: longer keys are cut to 249 bytes (SPEC §6.4)
MAX_KEY_LENGTH = 249
#: the value stored for a Message-ID: any non-empty value marks it (SPEC §6.4)
STORED_VALUE = b"1"
#: lookups per message at most: a References header can list hundreds of ids, and each
#: is a Redis GET; past the limit the thread root and the nearest ancestors are kept
MAX_LOOKUPS = 100

def message_id_key(prefix: str, message_id: str) -> bytes:
    """``prefix`` + lowercase hex BLAKE2b-512 of the exact id bytes, at most 249 bytes (SPEC §6.4, §9)."""
    digest = hashlib.blake2b(message_id.encode("utf-8", "surrogateescape"), digest_size=64).hexdigest()
    return (prefix.encode("utf-8", "surrogateescape") + digest.encode("ascii"))[:MAX_KEY_LENGTH]


@dataclass(frozen=True)
class Lookup:
    """One In-Reply-To / References id being looked up; fires with the id on a hit, None otherwise."""

    message_id: str
    answer: "Deferred[Optional[str]]"


def _pending(msg: MessageContext) -> List[Lookup]:
    """The message's lookups: they live on the message, so they go with it (ABORT, a new MAIL)."""
    return msg.reply_lookups


def _id_role(msg: MessageContext) -> Optional[Any]:
    """The ``servers_id`` Redis role, or None when the replies check is off."""
    runtime = msg.runtime
    if not runtime.config.redis_enabled or runtime.redis is None:
        return None
    return runtime.redis.id


def lookup(msg: MessageContext, message_ids: List[str]) -> None:
    """Start GETs for In-Reply-To (whole value) and each References token; ``settle`` waits."""
    role = _id_role(msg)
    if role is None:
        return
    config = msg.runtime.config.redis
    lookups = _pending(msg)
    seen = {entry.message_id for entry in lookups}
    wanted = list(dict.fromkeys(i for i in message_ids if i and i not in seen))
    budget = max(0, MAX_LOOKUPS - len(lookups))
    if len(wanted) > budget:
        log.info("{tag}; {n} reply ids, only {budget} looked up", tag=msg.tag, n=len(wanted), budget=budget)
        wanted = (wanted[:1] + wanted[len(wanted) - budget + 1 :]) if budget > 1 else wanted[:budget]
    for message_id in wanted:
        key = message_id_key(config.id_prefix, message_id)
        log.debug("{tag}; looking up reply id {message_id} as {key}", tag=msg.tag, message_id=message_id,
                  key=key)
        answer: "Deferred[Optional[bytes]]" = role.get(key)
        answer.addTimeout(config.connect_timeout, msg.runtime.clock)
        lookups.append(Lookup(message_id, answer.addCallbacks(_hit(message_id), _miss(msg, message_id))))


def _hit(message_id: str) -> Callable[[Optional[bytes]], Optional[str]]:
    def found(value: Optional[bytes]) -> Optional[str]:
        return message_id if value else None

    return found


def _miss(msg: MessageContext, message_id: str) -> Callable[[Failure], None]:
    def failed(failure: Failure) -> None:
        # the role never fails; a timeout here is our own deadline
        log.info("{tag}; reply id {message_id} not looked up: {error}", tag=msg.tag, message_id=message_id,
                 error=failure.getErrorMessage() or failure.type.__name__)
        return None

    return failed


def settle(msg: MessageContext) -> "Deferred[None]":
    """Wait for the lookups (each bounded by connect_timeout); on a hit mark the message a reply."""
    lookups = _pending(msg)
    if not lookups:
        return succeed(None)

    def decided(answers: List[Optional[str]]) -> None:
        hit = next((a for a in answers if a is not None), None)
        if hit is None:
            return
        msg.reply_to_our_mail = hit
        msg.strict = False
        log.info(
            "{tag}; from {hostname}[{ip}] from=<{sender}> to=<{rcpt}> is reply to our message {message_id}; "
            "skip dcc and spamd checks",
            tag=msg.tag,
            hostname=msg.connection.client_hostname,
            ip=msg.client_address or "unknown",
            sender=msg.envelope_from,
            rcpt=msg.recipients[0].address if msg.recipients else "",
            message_id=hit,
        )

    return gatherResults([entry.answer for entry in lookups]).addCallback(decided)


def should_remember(msg: MessageContext) -> bool:
    """SPEC §6.4 decision: SASL-authenticated senders, and our_networks clients unless strict_auth."""
    if msg.sasl_authenticated:
        return True
    main = msg.runtime.config.main
    return not main.strict_auth and msg.client_address in main.our_networks


def remember(msg: MessageContext) -> None:
    """Store the Message-ID of an accepted message of one of our senders; fire and forget."""
    role = _id_role(msg)
    if role is None or not should_remember(msg):
        return
    values = msg.header_values("Message-ID")
    if not values or not values[0].strip():
        log.debug("{tag}; no Message-ID to remember for replies", tag=msg.tag)
        return
    message_id = values[0].strip()
    config = msg.runtime.config.redis
    key = message_id_key(config.id_prefix, message_id)
    ttl = max(0, int(round(config.id_expire)))

    def stored(ok: bool) -> None:
        if ok:
            log.debug("{tag}; remembered message id {message_id} for replies", tag=msg.tag,
                      message_id=message_id)
        else:
            log.warn("{tag}; cannot store message id {message_id} for replies on redis", tag=msg.tag,
                     message_id=message_id)

    def failed(failure: Failure) -> None:
        log.warn("{tag}; cannot store message id {message_id} for replies: {error}", tag=msg.tag,
                 message_id=message_id, error=failure.getErrorMessage() or failure.type.__name__)

    try:
        store: "Deferred[bool]" = role.setex(key, ttl, STORED_VALUE)
    except Exception:
        log.failure("{tag}; cannot store message id for replies", tag=msg.tag)
        return
    store.addTimeout(config.connect_timeout, msg.runtime.clock)
    store.addCallbacks(stored, failed)
