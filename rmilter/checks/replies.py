"""Replies to mail our users sent skip the spam scan and EOM greylisting (SPEC §6.4).

Outbound: every accepted message of an authenticated sender (SASL, or an
``our_networks`` client without ``strict_auth``) has its Message-ID stored on
``servers_id`` under ``id_prefix`` + lowercase hex BLAKE2b-512 of the id, with
TTL ``id_expire``.  Inbound: In-Reply-To and every References token (B14) are
looked up the same way once the headers are complete, while the body arrives;
EOM waits for the answers (all of them bounded by one ``connect_timeout``) and a
hit turns strict checks off.

Redis trouble is a miss on lookup and a log line on store: it never delays or
fails a message beyond ``connect_timeout`` (SPEC §6.10).
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.python.failure import Failure

from rmilter.context import MessageContext
from rmilter.deps import Deps
from rmilter.log import Logger
from rmilter.verdict import Check, CheckResult, skipped

log = Logger(namespace="rmilter.replies")

#: C builds keys in a 250-byte buffer: longer keys are cut to 249 bytes (SPEC §6.4)
MAX_KEY_LENGTH = 249
#: the value stored for a Message-ID: any non-empty value marks it (SPEC §6.4)
STORED_VALUE = b"1"
#: lookups per message at most: a References header can list hundreds of ids, and each
#: is a Redis GET; past the limit the thread root and the nearest ancestors are kept
MAX_LOOKUPS = 100
#: summary values
NOT_A_REPLY = "not a reply to our mail"
STORED = "message id stored"


def message_id_key(prefix: str, message_id: str) -> bytes:
    """``prefix`` + lowercase hex BLAKE2b-512 of the exact id bytes, at most 249 bytes (SPEC §6.4, §9)."""
    digest = hashlib.blake2b(message_id.encode("utf-8", "surrogateescape"), digest_size=64).hexdigest()
    return (prefix.encode("utf-8", "surrogateescape") + digest.encode("ascii"))[:MAX_KEY_LENGTH]


def reply_ids(headers: List[Tuple[str, str]]) -> List[str]:
    """In-Reply-To (the whole value) and every References token, in header order, each once (B14)."""
    ids: List[str] = []
    for name, value in headers:
        lname = name.lower()
        if lname == "in-reply-to":
            ids.append(value.strip())
        elif lname == "references":
            ids.extend(value.split())
    return list(dict.fromkeys(i for i in ids if i))


def _lookup_ids(tag: str, headers: List[Tuple[str, str]]) -> List[str]:
    """``reply_ids(headers)``, at most MAX_LOOKUPS of them.

    The budget is shared header by header, in header order: a header with more new ids than
    are left keeps its first (In-Reply-To's parent, the thread root of References) and its
    last ones (the nearest ancestors), so an In-Reply-To before a long References does not
    cost the thread root its lookup.
    """
    ids: List[str] = []
    seen: Set[str] = set()
    for name, value in headers:
        wanted = [i for i in reply_ids([(name, value)]) if i not in seen]
        if not wanted:
            continue
        budget = MAX_LOOKUPS - len(ids)
        if len(wanted) > budget:
            log.info("{tag}; {n} reply ids, only {budget} looked up", tag=tag, n=len(wanted), budget=budget)
            wanted = (wanted[:1] + wanted[len(wanted) - budget + 1 :]) if budget > 1 else wanted[:budget]
        ids.extend(wanted)
        seen.update(wanted)
    return ids


def hit(result: CheckResult) -> Optional[str]:
    """The Message-ID of ours that the message replies to, if the check found one."""
    found = result.details.get("reply_to") if result.check is Check.REPLIES else None
    return found if isinstance(found, str) else None


def _id_role(deps: Deps) -> Optional[Any]:
    """The ``servers_id`` Redis role, or None when the replies check is off."""
    if not deps.config.redis_enabled or deps.redis is None:
        return None
    return deps.redis.id


def check(message: MessageContext, deps: Deps) -> "Deferred[CheckResult]":
    """Look up In-Reply-To and References ids (all GETs bounded by one connect_timeout); never fails.

    The pipeline starts it once the headers are complete, so the lookups run while the
    body arrives, and waits for it at EOM.
    """
    role = _id_role(deps)
    if role is None:
        return succeed(skipped(Check.REPLIES, "replies check inactive"))
    ids = _lookup_ids(message.tag, message.headers)
    if not ids:
        return succeed(skipped(Check.REPLIES, "no In-Reply-To or References"))
    prefix = deps.config.redis.id_prefix
    # the GETs of one message share one deadline: together they wait at most connect_timeout
    deadline = deps.clock.seconds() + deps.config.redis.connect_timeout
    lookups = []
    for message_id in ids:
        key = message_id_key(prefix, message_id)
        log.debug("{tag}; looking up reply id {message_id} as {key}", tag=message.tag, message_id=message_id,
                  key=key)
        answer: "Deferred[Optional[bytes]]" = role.get(key, deadline=deadline)
        lookups.append(answer.addCallbacks(_hit(message_id), _miss(message, message_id)))

    def decided(answers: List[Optional[str]]) -> CheckResult:
        found = next((a for a in answers if a is not None), None)
        if found is None:
            return CheckResult(Check.REPLIES, NOT_A_REPLY)
        log.info(
            "{tag}; from {hostname}[{ip}] from=<{sender}> to=<{rcpt}> is reply to our message {message_id}; "
            "skip dcc and spamd checks",
            tag=message.tag,
            hostname=message.connection.client_hostname,
            ip=message.client_address or "unknown",
            sender=message.envelope_from,
            rcpt=message.recipients[0].address if message.recipients else "",
            message_id=found,
        )
        return CheckResult(Check.REPLIES, "reply to our message %s" % (found,), details={"reply_to": found})

    return gatherResults(lookups).addCallback(decided)


def _hit(message_id: str) -> Callable[[Optional[bytes]], Optional[str]]:
    def found(value: Optional[bytes]) -> Optional[str]:
        return message_id if value else None

    return found


def _miss(msg: MessageContext, message_id: str) -> Callable[[Failure], None]:
    def failed(failure: Failure) -> None:
        # the role never fails (a Redis problem is a miss); this is a bug, logged once
        log.info("{tag}; reply id {message_id} not looked up: {error}", tag=msg.tag, message_id=message_id,
                 error=failure.getErrorMessage() or failure.type.__name__)
        return None

    return failed


def should_remember(message: MessageContext, deps: Deps) -> bool:
    """SPEC §6.4 decision: SASL-authenticated senders, and our_networks clients unless strict_auth."""
    if message.sasl_authenticated:
        return True
    main = deps.config.main
    return not main.strict_auth and message.client_address in main.our_networks


def record(message: MessageContext, deps: Deps) -> "Deferred[CheckResult]":
    """Store the Message-ID of an accepted message of one of our senders.

    The result does not wait for Redis: storing is fire and forget (SPEC §6.10).
    """
    role = _id_role(deps)
    if role is None:
        return succeed(skipped(Check.REPLIES, "replies check inactive"))
    if not should_remember(message, deps):
        return succeed(skipped(Check.REPLIES, "not one of our senders"))
    values = message.header_values("Message-ID")
    if not values or not values[0].strip():
        log.debug("{tag}; no Message-ID to remember for replies", tag=message.tag)
        return succeed(skipped(Check.REPLIES, "no Message-ID"))
    message_id = values[0].strip()
    config = deps.config.redis
    key = message_id_key(config.id_prefix, message_id)
    ttl = max(0, int(round(config.id_expire)))

    def stored(ok: bool) -> None:
        if ok:
            log.debug("{tag}; remembered message id {message_id} for replies", tag=message.tag,
                      message_id=message_id)
        else:
            log.warn("{tag}; cannot store message id {message_id} for replies on redis", tag=message.tag,
                     message_id=message_id)

    def failed(failure: Failure) -> None:
        log.warn("{tag}; cannot store message id {message_id} for replies: {error}", tag=message.tag,
                 message_id=message_id, error=failure.getErrorMessage() or failure.type.__name__)

    try:
        store: "Deferred[bool]" = role.setex(key, ttl, STORED_VALUE)
    except Exception:
        log.failure("{tag}; cannot store message id for replies", tag=message.tag)
        return succeed(CheckResult(Check.REPLIES, "message id not stored", failed=True))
    store.addCallbacks(stored, failed)
    return succeed(CheckResult(Check.REPLIES, STORED, details={"stored_message_id": message_id}))
