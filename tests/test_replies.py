"""Replies check (SPEC §6.4, B14): Message-ID keys, lookups at HEADER, settle at EOM, storing ids."""
from __future__ import annotations

import ipaddress
from typing import List, Optional, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rmilter.checks import replies
from rmilter.config.schema import Config, GlobalConfig, RedisConfig, RedisServer
from rmilter.context import ConnectionContext, MessageContext, Recipient
from rmilter.netlist import NetList
from rmilter.pipeline import Pipeline
from rmilter.runtime import Runtime
from rmilter.spool import run_inline
from rmilter.testing.fake_redis import FakeRedisRoles

#: SPEC §9 test vector
VECTOR_ID = "<orig@example.com>"
VECTOR_KEY = (
    b"message_id.ce44246793e991e02f16136aab0b47b99c3dbf057322061d8dc09898567f345e1f3cf7a7afdadd62498ffc5eab99"
    b"feeb8e609b1bf47f33695752365f76caa01e"
)


def make_runtime(
    clock: Clock,
    redis: Optional[FakeRedisRoles],
    strict_auth: bool = False,
    id_expire: float = 86400.0,
    connect_timeout: float = 1.0,
    cache_backend: str = "redis",
) -> Runtime:
    config = Config(
        main=GlobalConfig(strict_auth=strict_auth, our_networks=NetList([ipaddress.ip_network("10.0.0.0/8")])),
        redis=RedisConfig(
            servers_id=(RedisServer("127.0.0.1", "127.0.0.1"),),
            id_prefix="message_id.",
            id_expire=id_expire,
            connect_timeout=connect_timeout,
        ),
        cache_backend=cache_backend,
    )
    return Runtime(config=config, reactor=clock, run_blocking=run_inline, redis=redis)


def make_message(runtime: Runtime, user: Optional[str] = None, sasl: bool = False,
                 client_address: str = "192.0.2.10") -> MessageContext:
    conn = ConnectionContext(client_address=client_address, family="4", hostname="client.example.org")
    msg = MessageContext(connection=conn, runtime=runtime)
    msg.envelope_from = "sender@example.org"
    msg.user = user
    msg.sasl_authenticated = sasl
    msg.recipients.append(Recipient("<alice@example.net>"))
    return msg


class KeyTests(SynchronousTestCase):
    def test_spec_vector(self) -> None:
        """SPEC §9: In-Reply-To <orig@example.com> with id_prefix "message_id."."""
        self.assertEqual(replies.message_id_key("message_id.", VECTOR_ID), VECTOR_KEY)

    def test_default_prefix_and_exact_bytes(self) -> None:
        """The default prefix is "id"; brackets and case are part of the hashed bytes."""
        key = replies.message_id_key("id", VECTOR_ID)
        self.assertEqual(key, b"id" + VECTOR_KEY[len(b"message_id.") :])
        self.assertNotEqual(replies.message_id_key("id", "orig@example.com"), key)
        self.assertNotEqual(replies.message_id_key("id", "<ORIG@example.com>"), key)

    def test_long_prefix_truncated_to_249_bytes(self) -> None:
        """Like C's 250-byte key buffer: prefix + digest cut to 249 bytes."""
        key = replies.message_id_key("p" * 200, VECTOR_ID)
        self.assertEqual(len(key), 249)
        self.assertEqual(key, (b"p" * 200 + VECTOR_KEY[len(b"message_id.") :])[:249])


class LookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedisRoles(self.clock, roles=("id",))
        self.server = self.redis.servers["id"]
        self.runtime = make_runtime(self.clock, self.redis)
        self.pipeline = Pipeline(lambda: self.runtime)

    def test_in_reply_to_hit_turns_strict_off(self) -> None:
        """A stored In-Reply-To id: settle marks the message a reply and turns strict checks off."""
        self.server.setex(VECTOR_KEY, 0, b"1")
        msg = make_message(self.runtime)
        self.pipeline.header(msg, "In-Reply-To", " <orig@example.com> ")
        self.assertEqual([(c.name, c.args) for c in self.server.commands], [("GET", (VECTOR_KEY,))])
        self.assertIsNone(msg.reply_to_our_mail)  # decided only at EOM
        self.assertIsNone(self.successResultOf(replies.settle(msg)))
        self.assertEqual(msg.reply_to_our_mail, VECTOR_ID)
        self.assertFalse(msg.strict)
        self.assertEqual(self.pipeline._spam_mode(msg, oversized=False), "skipped, no spamd servers defined")

    def test_hit_logged_with_the_id(self) -> None:
        """The hit is logged as C does: "... is reply to our message <id>; skip dcc and spamd checks"."""
        events: List[dict] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.server.setex(VECTOR_KEY, 0, b"1")
        msg = make_message(self.runtime)
        replies.lookup(msg, [VECTOR_ID])
        self.successResultOf(replies.settle(msg))
        (event,) = [e for e in events if e.get("log_namespace") == "rmilter.replies"
                    and e["log_level"].name == "info"]
        self.assertIn("is reply to our message {message_id}; skip dcc and spamd checks", event["log_format"])
        self.assertEqual((event["tag"], event["message_id"]), (msg.tag, VECTOR_ID))

    def test_every_references_token_checked(self) -> None:
        """B14: the last References token is looked up too (C never checked it)."""
        last = "<last@y>"
        self.server.setex(replies.message_id_key("message_id.", last), 0, b"1")
        msg = make_message(self.runtime)
        self.pipeline.header(msg, "References", "<zzz@x>\n\t<orig@example.com> <last@y>")
        self.assertEqual(
            [c.args[0] for c in self.server.commands],
            [replies.message_id_key("message_id.", i) for i in ("<zzz@x>", VECTOR_ID, last)],
        )
        self.successResultOf(replies.settle(msg))
        self.assertEqual(msg.reply_to_our_mail, last)

    def test_miss_changes_nothing(self) -> None:
        msg = make_message(self.runtime)
        replies.lookup(msg, ["<unknown@example.com>"])
        self.successResultOf(replies.settle(msg))
        self.assertIsNone(msg.reply_to_our_mail)
        self.assertTrue(msg.strict)

    def test_empty_value_is_a_miss(self) -> None:
        """SPEC §6.1: only a non-empty value is a hit."""
        self.server.setex(VECTOR_KEY, 0, b"")
        msg = make_message(self.runtime)
        replies.lookup(msg, [VECTOR_ID])
        self.successResultOf(replies.settle(msg))
        self.assertIsNone(msg.reply_to_our_mail)

    def test_unreachable_redis_is_a_miss(self) -> None:
        """SPEC §6.10: Redis unreachable, the replies check misses at once."""
        self.server.setex(VECTOR_KEY, 0, b"1")
        self.redis.set_reachable(False)
        msg = make_message(self.runtime)
        replies.lookup(msg, [VECTOR_ID])
        self.successResultOf(replies.settle(msg))
        self.assertIsNone(msg.reply_to_our_mail)

    def test_hanging_redis_bounded_by_connect_timeout(self) -> None:
        """A lookup that never answers delays EOM by at most connect_timeout, then misses."""
        redis = FakeRedisRoles(self.clock, roles=("id",), timeout=30.0)
        runtime = make_runtime(self.clock, redis, connect_timeout=1.0)
        redis.servers["id"].setex(VECTOR_KEY, 0, b"1")
        redis.servers["id"].hang = True
        msg = make_message(runtime)
        replies.lookup(msg, [VECTOR_ID])
        settled = replies.settle(msg)
        self.clock.advance(0.9)
        self.assertNoResult(settled)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(settled))
        self.assertIsNone(msg.reply_to_our_mail)
        self.clock.advance(30)  # the late answer of the fake is ignored
        self.assertIsNone(msg.reply_to_our_mail)

    def test_lookups_started_early_finish_before_eom(self) -> None:
        """Lookups run while the rest of the message arrives: EOM waits only for what is left."""
        redis = FakeRedisRoles(self.clock, roles=("id",), timeout=0.5)
        runtime = make_runtime(self.clock, redis, connect_timeout=1.0)
        redis.servers["id"].hang = True
        msg = make_message(runtime)
        replies.lookup(msg, [VECTOR_ID])
        self.clock.advance(0.6)  # body transfer
        self.successResultOf(replies.settle(msg))

    def test_no_id_servers_no_lookup(self) -> None:
        """servers_id empty: the check is off, no command, settle fires at once."""
        runtime = make_runtime(self.clock, FakeRedisRoles(self.clock, roles=("grey",)))
        msg = make_message(runtime)
        replies.lookup(msg, [VECTOR_ID])
        self.successResultOf(replies.settle(msg))
        self.assertIsNone(msg.reply_to_our_mail)
        self.assertEqual(self.redis.all_commands(), [])

    def test_memcached_backend_disables_the_check(self) -> None:
        """B13: with a memcached backend the Redis features are off."""
        runtime = make_runtime(self.clock, self.redis, cache_backend="memcached")
        msg = make_message(runtime)
        replies.lookup(msg, [VECTOR_ID])
        self.successResultOf(replies.settle(msg))
        self.assertEqual(self.server.commands, [])

    def test_duplicates_looked_up_once_and_count_bounded(self) -> None:
        """A References header with hundreds of ids costs at most MAX_LOOKUPS GETs, root and parents kept."""
        ids = ["<%d@thread>" % i for i in range(500)]
        msg = make_message(self.runtime)
        replies.lookup(msg, [ids[0], ids[0]])
        replies.lookup(msg, ids)
        keys = [c.args[0] for c in self.server.commands]
        self.assertEqual(len(keys), replies.MAX_LOOKUPS)
        self.assertEqual(len(set(keys)), len(keys))
        self.assertIn(replies.message_id_key("message_id.", ids[0]), keys)
        self.assertIn(replies.message_id_key("message_id.", ids[-1]), keys)
        self.assertIn(replies.message_id_key("message_id.", ids[1]), keys)  # root of the References call
        self.assertFalse(replies.message_id_key("message_id.", ids[2]) in keys)


class RememberTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedisRoles(self.clock, roles=("id",))
        self.server = self.redis.servers["id"]

    def sent(self, runtime: Runtime, msg_id: Optional[str] = " <sent@example.org>", **kwargs: object) -> MessageContext:
        msg = make_message(runtime, **kwargs)  # type: ignore[arg-type]
        if msg_id is not None:
            msg.headers.append(("Message-ID", msg_id))
        replies.remember(msg)
        return msg

    def test_authenticated_message_stored_with_ttl(self) -> None:
        """SASL sender: SETEX id_prefix + hash, TTL id_expire (1 day), a non-empty value."""
        runtime = make_runtime(self.clock, self.redis)
        self.sent(runtime, user="alice", sasl=True)
        key = replies.message_id_key("message_id.", "<sent@example.org>")
        (command,) = self.server.commands
        self.assertEqual((command.name, command.args[:2]), ("SETEX", (key, b"86400")))
        self.assertTrue(command.args[2])
        self.assertEqual(self.server.ttl(key), 86400)

    def test_reply_to_remembered_message_is_recognised(self) -> None:
        """Round trip: a later message with In-Reply-To = the stored id is a reply; after the TTL it is not."""
        runtime = make_runtime(self.clock, self.redis, id_expire=3600)
        self.sent(runtime, msg_id="<sent@example.org>", user="alice", sasl=True)
        reply = make_message(runtime)
        Pipeline(lambda: runtime).header(reply, "In-Reply-To", "<sent@example.org>")
        self.successResultOf(replies.settle(reply))
        self.assertEqual(reply.reply_to_our_mail, "<sent@example.org>")
        self.clock.advance(3601)
        late = make_message(runtime)
        replies.lookup(late, ["<sent@example.org>"])
        self.successResultOf(replies.settle(late))
        self.assertIsNone(late.reply_to_our_mail)

    def test_our_networks_stored_unless_strict_auth(self) -> None:
        """our_networks clients count as our senders only without strict_auth."""
        self.sent(make_runtime(self.clock, self.redis), user="sender@example.org", client_address="10.1.2.3")
        self.assertEqual(self.server.command_names(), ["SETEX"])
        self.server.clear_log()
        self.sent(make_runtime(self.clock, self.redis, strict_auth=True), user="sender@example.org",
                  client_address="10.1.2.3")
        self.assertEqual(self.server.commands, [])

    def test_sasl_stored_even_with_strict_auth(self) -> None:
        self.sent(make_runtime(self.clock, self.redis, strict_auth=True), user="alice", sasl=True)
        self.assertEqual(self.server.command_names(), ["SETEX"])

    def test_unauthenticated_not_stored(self) -> None:
        self.sent(make_runtime(self.clock, self.redis))
        self.assertEqual(self.server.commands, [])

    def test_without_message_id_nothing_stored(self) -> None:
        self.sent(make_runtime(self.clock, self.redis), msg_id=None, user="alice", sasl=True)
        self.sent(make_runtime(self.clock, self.redis), msg_id="  ", user="alice", sasl=True)
        self.assertEqual(self.server.commands, [])

    def test_zero_expiry_stores_without_ttl(self) -> None:
        """id_expire = 0: SET without expiry (SPEC §6.1: SETEX with ttl 0 is SET)."""
        self.sent(make_runtime(self.clock, self.redis, id_expire=0), user="alice", sasl=True)
        self.assertEqual(self.server.command_names(), ["SET"])

    def test_redis_failure_only_logged(self) -> None:
        """Unreachable or hanging Redis: remember returns at once and only logs."""
        events: List[dict] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        runtime = make_runtime(self.clock, self.redis)
        self.redis.set_reachable(False)
        msg = self.sent(runtime, user="alice", sasl=True)
        self.server.reachable = True
        self.server.hang = True
        self.sent(runtime, user="alice", sasl=True)
        self.clock.advance(1.0)
        warnings = [e for e in events if e.get("log_namespace") == "rmilter.replies" and e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 2)
        self.assertEqual(warnings[0]["tag"], msg.tag)
        self.assertEqual(self.flushLoggedErrors(), [])
