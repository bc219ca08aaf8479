"""Rate limits (SPEC §6.3): leaky buckets per recipient, shared with the C rmilter.

Keys are the C keys (lowercased, no prefix), values the C value (16 bytes: two
little-endian doubles, last update time and count) with a one-day TTL.  Unlike
C, which read a bucket with GET and wrote it back with SETEX (losing updates
when several rmilter processes share one Redis), every bucket step runs inside
one Lua script (EVALSHA): all buckets of a recipient at RCPT, all buckets of all
recipients at EOM, in one call per Redis server.  The time is rmilter's clock
(B7), passed to the script so that tests with a ``Clock`` and all hosts agree.
"""
from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.python.failure import Failure

from rmilter.backends.redis import LuaScript, ScriptStore, encode_arg
from rmilter.config.schema import Bucket, Config
from rmilter.context import MessageContext
from rmilter.deps import Deps
from rmilter.log import Logger
from rmilter.verdict import RATE_LIMIT_EXCEEDED, Check, CheckResult, skipped, tempfail

log = Logger(namespace="rmilter.ratelimit")

#: TTL of every bucket record (C: fixed one day)
BUCKET_TTL = 86400

_BUCKET = struct.Struct("<dd")  # last update (seconds with fraction), count


@dataclass(frozen=True)
class BucketState:
    last: float = 0.0
    count: float = 0.0

    def encode(self) -> bytes:
        return _BUCKET.pack(self.last, self.count)

    @classmethod
    def decode(cls, value: Optional[bytes]) -> "BucketState":
        """A stored bucket; a miss (or anything that is not a bucket) is {0, 0}."""
        if value is None or len(value) != _BUCKET.size:
            return cls()
        last, count = _BUCKET.unpack(value)
        return cls(last, count)


def leak(state: BucketState, now: float, rate: float, increment: int) -> BucketState:
    """One bucket step, in C's order of operations (SPEC §6.3) so the doubles agree."""
    count = state.count
    if count > 0:
        count -= (now - state.last) * rate
    count += increment
    if count < 0:
        count = 0.0
    return BucketState(now, count)


# -- the script -----------------------------------------------------------------------------------
_BUCKETS_LUA = """\
-- KEYS: bucket keys in order; ARGV: now, increment (0 check, 1 update), ttl,
-- then burst and rate of each key.  Replies the 1-based index of the first
-- exceeded bucket when checking (the rest are left alone), else 0.
local now = tonumber(ARGV[1])
local inc = tonumber(ARGV[2])
local ttl = tonumber(ARGV[3])
for i = 1, #KEYS do
  local burst = tonumber(ARGV[2 + 2 * i])
  local rate = tonumber(ARGV[3 + 2 * i])
  local last, count = 0, 0
  local v = redis.call('GET', KEYS[i])
  if v and #v == 16 then
    last, count = struct.unpack('<dd', v)
  end
  if count > 0 then
    count = count - (now - last) * rate
  end
  count = count + inc
  last = now
  if count < 0 then
    count = 0
  end
  if inc == 1 and count == 0 then
    redis.call('DEL', KEYS[i])
  else
    redis.call('SETEX', KEYS[i], ttl, struct.pack('<dd', last, count))
  end
  if inc == 0 and count > burst then
    return i
  end
end
return 0
"""


def _buckets_reference(store: ScriptStore, keys: Sequence[bytes], args: Sequence[bytes]) -> int:
    now, increment, ttl = float(args[0]), int(args[1]), int(args[2])
    for i, key in enumerate(keys, 1):
        burst, rate = float(args[1 + 2 * i]), float(args[2 + 2 * i])
        state = leak(BucketState.decode(store.get(key)), now, rate, increment)
        if increment == 1 and state.count == 0:
            store.delete(key)
        else:
            store.setex(key, ttl, state.encode())
        if increment == 0 and state.count > burst:
            return i
    return 0


BUCKETS = LuaScript("ratelimit_buckets", _BUCKETS_LUA, _buckets_reference)


# -- which buckets apply ----------------------------------------------------------------------------
class BucketKey(NamedTuple):
    name: str  # the directive: limit_to, limit_to_ip, ...
    key: bytes
    bucket: Bucket


def is_bounce(envelope_from: str, bounce_addrs: Sequence[str]) -> bool:
    """SPEC §5.12 intended rule (B10): ``<>`` for the null sender, else the local part."""
    if not envelope_from:
        candidate = "<>"
    elif "@" in envelope_from:
        candidate = envelope_from.rpartition("@")[0].lower()
    else:
        candidate = envelope_from.lower()
    return any(candidate == entry.lower() for entry in bounce_addrs)


def exempt(config: Config, client_address: Optional[str], recipient: str) -> bool:
    """Whitelisted recipient or client address: no bucket (for IPv6 clients too, B8)."""
    limits = config.limits
    return (
        limits.limit_whitelist_rcpt.matches(recipient)
        or config.main.whitelist.matches(recipient)
        or client_address in limits.limit_whitelist
    )


def bucket_keys(config: Config, msg: MessageContext, recipient: str) -> List[BucketKey]:
    """The enabled buckets of one recipient, in C's order: bounce_to, bounce_to_ip, to_ip_from, to_ip, to.

    Keys are lowercased as a whole (SPEC §6.3); the parts are lowercased one by one.
    """
    limits = config.limits
    rcpt = recipient.lower()
    ip = (msg.client_address or "").lower()
    sender = msg.envelope_from.lower()
    keys: List[BucketKey] = []
    if is_bounce(sender, limits.limit_bounce_addrs):
        if limits.limit_bounce_to.enabled:
            keys.append(BucketKey("limit_bounce_to", (rcpt + ":<>").encode("utf-8"), limits.limit_bounce_to))
        if limits.limit_bounce_to_ip.enabled:
            keys.append(BucketKey("limit_bounce_to_ip", (rcpt + ":" + ip + ":<>").encode("utf-8"),
                                  limits.limit_bounce_to_ip))
    if limits.limit_to_ip_from.enabled:
        keys.append(BucketKey("limit_to_ip_from", (rcpt + ":" + ip + ":" + sender).encode("utf-8"),
                              limits.limit_to_ip_from))
    if limits.limit_to_ip.enabled:
        keys.append(BucketKey("limit_to_ip", (rcpt + ":" + ip).encode("utf-8"), limits.limit_to_ip))
    if limits.limit_to.enabled:
        keys.append(BucketKey("limit_to", rcpt.encode("utf-8"), limits.limit_to))
    return keys


@functools.lru_cache(maxsize=64)
def _bucket_args(bucket: Bucket) -> Tuple[bytes, bytes]:
    """burst and rate as the script reads them (exact doubles), encoded once per bucket."""
    return encode_arg(int(bucket.burst)), encode_arg(float(bucket.rate))


_TTL_ARG = encode_arg(BUCKET_TTL)
_INCREMENT_ARG = {0: b"0", 1: b"1"}


def _script_args(now: float, increment: int, keys: Sequence[BucketKey]) -> List[bytes]:
    args: List[bytes] = [encode_arg(float(now)), _INCREMENT_ARG[increment], _TTL_ARG]
    for k in keys:
        args.extend(_bucket_args(k.bucket))
    return args


def _runs(role: Any, keys: List[BucketKey]) -> List[List[BucketKey]]:
    """Consecutive keys on the same server: one script call each, order kept."""
    if not getattr(role, "sharded", True):
        return [keys]
    runs: List[List[BucketKey]] = []
    last_shard: Any = None
    for k in keys:
        shard = role.shard_of(k.key)
        if runs and shard is last_shard:
            runs[-1].append(k)
        else:
            runs.append([k])
            last_shard = shard
    return runs


# -- the entry points -----------------------------------------------------------------------------
#: summary values of the results (the summary line has no rate-limit field; logs and metrics use them)
PASSED = "within limits"
EXCEEDED = "rate limit exceeded"
COUNTED = "counted"


def check(message: MessageContext, deps: Deps, *, recipient: str) -> "Deferred[CheckResult]":
    """RCPT: may ``recipient`` be accepted?  A refusal is TEMPFAIL ``Rate limit exceeded``.

    Redis being unreachable lets the recipient pass (SPEC §6.10); the check waits
    at most ``redis.connect_timeout``.
    """
    config = deps.config
    role = deps.redis.limits if deps.redis is not None else None
    if not config.limits_active or role is None:
        return succeed(skipped(Check.RATELIMIT, "limits inactive"))
    if exempt(config, message.client_address, recipient):
        return succeed(skipped(Check.RATELIMIT, "whitelisted"))
    keys = bucket_keys(config, message, recipient)
    if not keys:
        return succeed(skipped(Check.RATELIMIT, "no bucket enabled"))
    runs = _runs(role, keys)
    now = deps.clock.seconds()
    # the calls of several shards share one deadline: together they wait at most connect_timeout
    deadline = now + config.redis.connect_timeout
    return _check_run(role, message, recipient, runs, 0, now, deadline, False).addErrback(
        _broken, message, _UNANSWERED
    )


_PASSED = CheckResult(Check.RATELIMIT, PASSED)
_UNANSWERED = CheckResult(Check.RATELIMIT, "Redis unavailable, accepted (fail open)", failed=True)


def _check_run(
    role: Any, msg: MessageContext, recipient: str, runs: List[List[BucketKey]], index: int, now: float,
    deadline: float, unanswered: bool,
) -> "Deferred[CheckResult]":
    """One script call for the ``index``-th run of buckets; the next run only if none was exceeded.

    Plain functions, not closures calling each other, so that no reference cycle is
    left for the garbage collector at every RCPT.
    """
    run = runs[index]
    d = role.eval_script(BUCKETS, [k.key for k in run], _script_args(now, 0, run), deadline=deadline)
    return d.addCallback(_run_checked, role, msg, recipient, runs, index, now, deadline, unanswered)


def _run_checked(
    reply: Any, role: Any, msg: MessageContext, recipient: str, runs: List[List[BucketKey]], index: int, now: float,
    deadline: float, unanswered: bool,
) -> Any:
    if isinstance(reply, int) and 1 <= reply <= len(runs[index]):
        exceeded = runs[index][reply - 1]
        log.info(
            "{tag}; rate limit exceeded for {rcpt}: bucket {bucket} ({key})",
            tag=msg.tag, rcpt=recipient, bucket=exceeded.name, key=exceeded.key.decode("utf-8", "replace"),
        )
        return CheckResult(Check.RATELIMIT, EXCEEDED, verdict=tempfail(RATE_LIMIT_EXCEEDED),
                           details={"ratelimit_bucket": exceeded.name})
    # a shard that did not answer passes (fail open); the next one is still asked, and the
    # result says that the check was not carried out in full
    unanswered = unanswered or reply is None
    if index + 1 < len(runs):
        return _check_run(role, msg, recipient, runs, index + 1, now, deadline, unanswered)
    return _UNANSWERED if unanswered else _PASSED


def record(message: MessageContext, deps: Deps) -> "Deferred[CheckResult]":
    """EOM of an accepted message: add it to every bucket of every recipient.

    One script call per Redis server for all recipients; never fails, waits at
    most ``redis.connect_timeout``.
    """
    config = deps.config
    role = deps.redis.limits if deps.redis is not None else None
    if not config.limits_active or role is None:
        return succeed(skipped(Check.RATELIMIT, "limits inactive"))
    keys: List[BucketKey] = []
    for rcpt in message.recipient_addresses:
        if not exempt(config, message.client_address, rcpt):
            keys.extend(bucket_keys(config, message, rcpt))
    if not keys:
        return succeed(skipped(Check.RATELIMIT, "no bucket to count"))
    now = deps.clock.seconds()
    deadline = now + config.redis.connect_timeout
    groups: Dict[int, List[BucketKey]] = {}
    if not getattr(role, "sharded", True):
        groups[0] = keys
    else:
        for k in keys:
            groups.setdefault(id(role.shard_of(k.key)), []).append(k)
    calls = [
        role.eval_script(BUCKETS, [k.key for k in group], _script_args(now, 1, group), deadline=deadline)
        for group in groups.values()
    ]

    def done(replies: Any) -> CheckResult:
        if any(reply is None for reply in replies):
            log.debug("{tag}; rate limit update incomplete: Redis unavailable", tag=message.tag)
            return _NOT_COUNTED
        return _COUNTED

    return gatherResults(calls).addCallback(done).addErrback(_broken, message, _NOT_COUNTED)


_COUNTED = CheckResult(Check.RATELIMIT, COUNTED)
_NOT_COUNTED = CheckResult(Check.RATELIMIT, "not counted, Redis unavailable", failed=True)


def _broken(failure: Failure, msg: MessageContext, value: Any) -> Any:
    log.failure("{tag}; rate limit failed, message passes", failure, tag=msg.tag)
    return value
