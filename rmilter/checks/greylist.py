"""Greylisting (SPEC §6.2) with records a site switching from the C rmilter keeps.

Keys, values and TTLs are the C ones: ``grey_prefix``/``white_prefix`` + base64
of a BLAKE2b-512 digest (the standard algorithm, B1), values 16 bytes (int64
seconds + int64 microseconds, little-endian), grey records live ``expire``,
white records ``expire_white``.  Two digests: the data hash (first 10240 body
bytes, EOM only) and the envelope hash (sender, the client's address block,
sorted raw recipients).

The address block is C's by default (B17); ``ipv4_mask`` / ``ipv6_mask`` key it on
a real netblock instead, so a retry from another host of the same pool passes.  With
``key_on_spf_domain``, a message Rspamd found SPF-authorised for its envelope
sender's domain (the pipeline hands in ``sender_spf_pass``) is keyed on that domain
instead of any address: a retry from any host the domain authorises passes.

Round trips per digest: GET white, then one script that reads the grey record
and writes it when missing (C sends GET and SETEX), then SETEX white once the
grey record is old enough.  Every command of a check has the check's deadline,
so a check waits at most ``redis.connect_timeout`` for Redis in total; an
unreachable Redis lets the message pass (SPEC §6.10).
"""
from __future__ import annotations

import base64
import hashlib
import math
import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from rmilter.backends.redis import LuaScript, ScriptStore
from rmilter.context import MessageContext
from rmilter.deps import Deps
from rmilter.log import Logger
from rmilter.verdict import AddHeader, Check, CheckResult, skipped, tempfail

log = Logger(namespace="rmilter.greylist")

#: body bytes that make up the data hash (SPEC §6.2; Spool.body_prefix keeps as many)
DATA_HASH_BYTES = 10240
HEADER_NAME = "X-Rmilter-Greylist"
TYPE_DATA = "data hash"
TYPE_ENVELOPE = "sender, IP, recipients"
TYPE_SPF_ENVELOPE = "sender, SPF domain, recipients"

_TIMEVAL = struct.Struct("<qq")  # struct timeval on x86-64: tv_sec, tv_usec


# -- record and key encodings -------------------------------------------------------------------
def encode_time(now: float) -> bytes:
    """The 16-byte record value: seconds and microseconds since the epoch, little-endian."""
    seconds = math.floor(now)
    micros = int((now - seconds) * 1e6)
    return _TIMEVAL.pack(int(seconds), min(micros, 999999))


def decode_time(value: bytes) -> Optional[float]:
    """The time in a 16-byte record; None for anything else."""
    if len(value) != _TIMEVAL.size:
        return None
    seconds, micros = _TIMEVAL.unpack(value)
    return seconds + micros / 1e6


def _prefix(packed: bytes, bits: int) -> bytes:
    """The first ``bits`` bits of ``packed``, the rest zeroed."""
    width = 8 * len(packed)
    mask = ((1 << width) - 1) ^ ((1 << (width - bits)) - 1)
    return (int.from_bytes(packed, "big") & mask).to_bytes(len(packed), "big")


def address_block(client_address: str, ipv4_mask: Optional[int] = None, ipv6_mask: int = 64) -> bytes:
    """The 16 bytes of the client address that go into the envelope hash (SPEC §6.2).

    IPv4 without ``ipv4_mask``: octets 1-2, the low 3 bits of octet 3, octet 4
    zeroed, then 12 zero bytes: what C's "/19" mask really keeps on little-endian
    hosts (B17, kept for record compatibility).  With ``ipv4_mask`` N: the first N
    bits of the address, then 12 zero bytes.  IPv6: the first ``ipv6_mask`` bits of
    the 16 address bytes (64, the default, is C's block: the /64 then 8 zero bytes).
    """
    if ":" in client_address:
        return _prefix(socket.inet_pton(socket.AF_INET6, client_address), ipv6_mask)
    packed = socket.inet_pton(socket.AF_INET, client_address)
    if ipv4_mask is not None:
        return _prefix(packed, ipv4_mask) + bytes(12)
    return bytes((packed[0], packed[1], packed[2] & 0x07, 0)) + bytes(12)


def _sender_and_recipients(envelope_from: str, recipients: Iterable[str]) -> Tuple[bytes, bytes]:
    sender = (envelope_from or "<>").encode("utf-8")
    return sender, b"".join(sorted(r.encode("utf-8") for r in recipients))


def envelope_data(envelope_from: str, client_address: str, recipients: Iterable[str],
                  ipv4_mask: Optional[int] = None, ipv6_mask: int = 64) -> bytes:
    """Normalised sender (``<>`` when null), address block, raw recipients sorted bytewise."""
    sender, rcpts = _sender_and_recipients(envelope_from, recipients)
    return sender + address_block(client_address, ipv4_mask, ipv6_mask) + rcpts


def spf_envelope_data(envelope_from: str, domain: str, recipients: Iterable[str]) -> bytes:
    """The envelope data keyed on the SPF-authorised sender domain instead of an address block.

    ``NUL "SPF:" domain NUL`` stands where the 16-byte block would be: no address block of
    a real client reads the same (IPv4 blocks end in 12 zero bytes; an IPv6 block would have to
    lie in the reserved ::/8), so these records never meet address-keyed ones.
    """
    sender, rcpts = _sender_and_recipients(envelope_from, recipients)
    return sender + b"\0SPF:" + domain.encode("utf-8") + b"\0" + rcpts


def spf_domain(envelope_from: str) -> Optional[str]:
    """The domain Rspamd's SPF check judged: the envelope sender's (lowercase); None for ``<>``."""
    if "@" not in envelope_from:
        return None
    domain = envelope_from.rsplit("@", 1)[1].strip().lower()
    return domain or None


def digest(data: bytes) -> bytes:
    """Standard BLAKE2b-512 (B1: the C build's digest was miscompiled)."""
    return hashlib.blake2b(data, digest_size=64).digest()


def record_key(prefix: str, digest_bytes: bytes) -> bytes:
    """Prefix (verbatim, no separator) + standard base64 with padding."""
    return prefix.encode("utf-8") + base64.b64encode(digest_bytes)


def local_time(t: float) -> str:
    """Times in notes: local time ``YYYY-MM-DD HH:MM:SS`` (SPEC §6.2)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


# -- the grey record step as one atomic script ------------------------------------------------------
_GREY_STEP_LUA = """\
local v = redis.call('GET', KEYS[1])
if v and #v == 16 then
  return v
end
local ttl = tonumber(ARGV[1])
if ttl > 0 then
  redis.call('SETEX', KEYS[1], ttl, ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 0
"""


def _grey_step_reference(store: ScriptStore, keys: Sequence[bytes], args: Sequence[bytes]) -> Any:
    value = store.get(keys[0])
    if value is not None and len(value) == 16:
        return value
    store.setex(keys[0], int(args[0]), bytes(args[1]))
    return 0


#: GET grey+H; on a miss (or a value that is not a record) SETEX grey+H expire <now>.
#: Replies the existing record, or 0 when it stored a new one.
GREY_STEP = LuaScript("greylist_grey_step", _GREY_STEP_LUA, _grey_step_reference)


# -- the check ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class HashOutcome:
    """The result of checking one digest."""

    greylisted: bool
    grey_record_existed: bool  # step 3 of SPEC §6.2: decides the overall result for the data hash
    note: str
    failed: bool = False  # Redis could not be used: the message passes (SPEC §6.10)


class _Settings:
    """What one check needs from the runtime, looked up once."""

    def __init__(self, deps: Deps) -> None:
        config = deps.config
        self.clock = deps.clock
        self.grey = deps.redis.grey if deps.redis is not None else None
        self.white = (deps.redis.white if deps.redis is not None else None) or self.grey
        self.grey_prefix = config.redis.grey_prefix
        self.white_prefix = config.redis.white_prefix
        g = config.greylisting
        self.timeout = g.timeout
        self.expire = g.expire
        self.expire_white = g.expire_white
        self.expire_arg = b"%d" % int(g.expire)
        self.ipv4_mask = g.ipv4_mask
        self.ipv6_mask = g.ipv6_mask
        self.key_on_spf_domain = g.key_on_spf_domain
        self.timeout_seconds = config.redis.connect_timeout
        #: every command of the check shares this deadline: the whole check waits at most
        #: connect_timeout for Redis (SPEC §6.10)
        self.deadline = self.clock.seconds() + self.timeout_seconds

    def timed_out(self) -> bool:
        return self.clock.seconds() >= self.deadline


def check_hash(settings: _Settings, digest_bytes: bytes, kind: str) -> "Deferred[HashOutcome]":
    """SPEC §6.2 "Checking one hash H": GET white, then the grey step, then maybe SETEX white.

    Written with callbacks rather than inlineCallbacks: this runs for every message.
    """
    grey, white = settings.grey, settings.white
    assert grey is not None and white is not None
    white_key = record_key(settings.white_prefix, digest_bytes)

    def white_checked(stored_white: Optional[bytes]) -> Any:
        if stored_white is not None:  # 1. a white record
            white_time = decode_time(stored_white)
            till = local_time((white_time or 0.0) + settings.expire_white)
            return HashOutcome(False, False, "Whitelisted till %s, type: %s" % (till, kind))
        now = settings.clock.seconds()
        grey_key = record_key(settings.grey_prefix, digest_bytes)
        d = grey.eval_script(GREY_STEP, [grey_key], [settings.expire_arg, encode_time(now)],
                             deadline=settings.deadline)
        return d.addCallback(grey_checked, now, grey_key)

    def grey_checked(reply: Any, now: float, grey_key: bytes) -> Any:
        if reply is None and settings.timed_out():
            log.warn("greylisting: no answer from Redis within {timeout}s, message passes",
                     timeout=settings.timeout_seconds)
            return HashOutcome(False, False, "Redis timeout, not greylisted (fail open)", failed=True)
        if reply is None:
            # Redis unreachable (or the script failed): nothing stored, fail open
            log.warn("greylisting ({kind}): Redis unavailable, message passes", kind=kind)
            return HashOutcome(False, False, "Redis unavailable, not greylisted (fail open), type: %s" % (kind,),
                               failed=True)
        stored = decode_time(reply) if isinstance(reply, bytes) else None
        if stored is None:  # 2. no grey record: the step stored one
            return HashOutcome(
                True,
                False,
                "0 seconds passed (new record), greylisted till %s, expire at %s, type: %s"
                % (local_time(now + settings.timeout), local_time(now + settings.expire), kind),
            )
        # 3. the grey record exists
        if stored > now:
            log.info("greylisting ({kind}): record {key} is in the future, ignored", kind=kind, key=grey_key)
            return HashOutcome(False, True, "Record time is in the future, ignored, type: %s" % (kind,))
        elapsed = int(math.floor(now)) - int(math.floor(stored))
        if elapsed < settings.timeout:
            return HashOutcome(
                True,
                True,
                "%d seconds passed, greylisted till %s, expire at %s, type: %s"
                % (elapsed, local_time(stored + settings.timeout), local_time(now + settings.expire), kind),
            )
        outcome = HashOutcome(
            False,
            True,
            "Greylisted for %d seconds, whitelisted till %s, type: %s"
            % (elapsed, local_time(stored + settings.expire_white), kind),
        )
        stored = white.setex(white_key, int(settings.expire_white), encode_time(now), deadline=settings.deadline)
        return stored.addCallback(white_stored, outcome)

    def white_stored(stored_ok: bool, outcome: HashOutcome) -> HashOutcome:
        if not stored_ok:
            log.warn("greylisting ({kind}): cannot store white record {key}", kind=kind, key=white_key)
        return outcome

    return white.get(white_key, deadline=settings.deadline).addCallback(white_checked)


def _run(msg: MessageContext, settings: _Settings, with_data_hash: bool,
         sender_spf_pass: bool) -> "Deferred[HashOutcome]":
    """SPEC §6.2 "Overall": the data hash decides when its grey record existed."""
    spf_keyed = spf_domain(msg.envelope_from) if settings.key_on_spf_domain and sender_spf_pass else None

    def envelope_check(_: Any = None) -> "Deferred[HashOutcome]":
        if spf_keyed is not None:
            envelope = spf_envelope_data(msg.envelope_from, spf_keyed, msg.recipient_addresses)
            return check_hash(settings, digest(envelope), TYPE_SPF_ENVELOPE)
        assert msg.client_address is not None
        envelope = envelope_data(msg.envelope_from, msg.client_address, msg.recipient_addresses,
                                 settings.ipv4_mask, settings.ipv6_mask)
        return check_hash(settings, digest(envelope), TYPE_ENVELOPE)

    def data_checked(outcome: HashOutcome) -> Any:
        return outcome if outcome.grey_record_existed else envelope_check()

    if with_data_hash and msg.spool is not None:
        body = bytes(msg.spool.body_prefix[:DATA_HASH_BYTES])
        return check_hash(settings, digest(body), TYPE_DATA).addCallback(data_checked)
    return envelope_check()


def check(message: MessageContext, deps: Deps, *, data_hash: bool = False,
          sender_spf_pass: bool = False) -> "Deferred[CheckResult]":
    """Greylist the message (DATA: envelope hash only; EOM, ``data_hash``: the data hash too).

    The pipeline decides the stage and the authentication rule; this checks that
    greylisting is active, that the client address is known and not in
    ``greylisting.whitelist``.  At EOM the last note is added as the
    ``X-Rmilter-Greylist`` header whatever the result.  ``sender_spf_pass``: Rspamd
    scanned the message and reports SPF pass for the envelope sender (``R_SPF_ALLOW``);
    with ``key_on_spf_domain`` the envelope hash is then keyed on the sender's domain.
    """
    config = deps.config
    ip = message.client_address
    if not config.greylisting_active or deps.redis is None or deps.redis.grey is None:
        return succeed(skipped(Check.GREYLIST, "not checked, greylisting inactive"))
    if ip is None:
        return succeed(skipped(Check.GREYLIST, "not checked, unknown client address"))

    def result(outcome: HashOutcome) -> CheckResult:
        edits = (AddHeader(name=HEADER_NAME, value=outcome.note),) if data_hash else ()
        verdict = tempfail(config.greylisting.greylisted_message) if outcome.greylisted else None
        return CheckResult(Check.GREYLIST, outcome.note, verdict=verdict, edits=edits, failed=outcome.failed)

    if ip in config.greylisting.whitelist:
        return succeed(result(HashOutcome(False, False, "Sender IP %s is whitelisted by configuration" % (ip,))))

    settings = _Settings(deps)

    def broken(failure: Failure) -> HashOutcome:
        log.failure("greylisting failed, message passes", failure)
        return HashOutcome(False, False, "internal error, not greylisted (fail open)", failed=True)

    return _run(message, settings, data_hash, sender_spf_pass).addErrback(broken).addCallback(result)
