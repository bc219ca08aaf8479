"""Replies check (SPEC §6.4, B14): Message-ID keys, lookups once the headers are complete, the hit at EOM,
storing ids."""
from __future__ import annotations

import ipaddress
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from rmilter.checks import replies
from rmilter.config.schema import Config, GlobalConfig, RedisConfig, RedisServer, ServerSpec, SpamdConfig
from rmilter.context import ConnectionContext, MessageContext, Recipient
from rmilter.deps import Deps
from rmilter.netlist import NetList
from rmilter.pipeline import Checks, Pipeline, Transaction
from rmilter.runtime import Runtime
from rmilter.spool import run_inline
from rmilter.testing.fake_redis import FakeRedisRoles
from rmilter.verdict import Action, Check, CheckResult

#: SPEC §9 test vector
VECTOR_ID = "<orig@example.com>"
VECTOR_KEY = (
    b"message_id.ce44246793e991e02f16136aab0b47b99c3dbf057322061d8dc09898567f345e1f3cf7a7afdadd62498ffc5eab99"
    b"feeb8e609b1bf47f33695752365f76caa01e"
)
RSPAMD = ServerSpec(name="127.0.0.1:11333", host="127.0.0.1", port=11333)


def make_deps(
    clock: Clock,
    redis: Optional[FakeRedisRoles],
    strict_auth: bool = False,
    id_expire: float = 86400.0,
    connect_timeout: float = 1.0,
    cache_backend: str = "redis",
    spamd: bool = False,
) -> Deps:
    """servers_id with id_prefix "message_id."; ``spamd``: an Rspamd server is configured."""
    config = Config(
        main=GlobalConfig(strict_auth=strict_auth, our_networks=NetList([ipaddress.ip_network("10.0.0.0/8")])),
        spamd=SpamdConfig(servers=(RSPAMD,) if spamd else ()),
        redis=RedisConfig(
            servers_id=(RedisServer("127.0.0.1", "127.0.0.1"),),
            id_prefix="message_id.",
            id_expire=id_expire,
            connect_timeout=connect_timeout,
        ),
        cache_backend=cache_backend,
    )
    return Deps(config=config, clock=clock, run_blocking=run_inline, redis=redis)


def make_message(user: Optional[str] = None, sasl: bool = False, client_address: str = "192.0.2.10",
                 headers: Sequence[Tuple[str, str]] = ()) -> MessageContext:
    conn = ConnectionContext(client_address=client_address, family="4", hostname="client.example.org")
    msg = MessageContext(connection=conn)
    msg.envelope_from = "sender@example.org"
    msg.user = user
    msg.sasl_authenticated = sasl
    msg.recipients.append(Recipient("<alice@example.net>"))
    msg.headers.extend(headers)
    return msg


def looked_up(test: SynchronousTestCase, deps: Deps, *headers: Tuple[str, str]) -> CheckResult:
    """The replies check of a message with ``headers``, which must have ended."""
    result = test.successResultOf(replies.check(make_message(headers=headers), deps))
    test.assertIs(result.check, Check.REPLIES)
    test.assertIsNone(result.verdict)
    test.assertFalse(result.failed)
    return result


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

    def test_reply_ids(self) -> None:
        """In-Reply-To whole and trimmed, every References token (B14), header order, each id once."""
        headers = [("Subject", "<not@an.id>"), ("in-reply-to", " <b@x> "), ("REFERENCES", "<a@x>\n\t<b@x>  <c@x>"),
                   ("In-Reply-To", "")]
        self.assertEqual(replies.reply_ids(headers), ["<b@x>", "<a@x>", "<c@x>"])


class SpamRecorder:
    """The pipeline's spam check: records that it ran (strict checks applied) instead of calling Rspamd."""

    def __init__(self) -> None:
        self.calls: List[Dict[str, Any]] = []

    def __call__(self, message: MessageContext, deps: Deps, **options: Any) -> "Deferred[CheckResult]":
        self.calls.append(options)
        return succeed(CheckResult(Check.SPAM, "scanned"))


class PipelineTests(SynchronousTestCase):
    """The pipeline starts the lookups at the end of the headers and turns strict checks off on a hit."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedisRoles(self.clock, roles=("id",))
        self.server = self.redis.servers["id"]
        self.use(make_deps(self.clock, self.redis, spamd=True))

    def use(self, deps: Deps) -> None:
        self.spam = SpamRecorder()
        runtime = Runtime(deps)
        self.pipeline = Pipeline(lambda: runtime, Checks(spam=self.spam))

    def until_headers(self, *headers: Tuple[str, str]) -> Transaction:
        """MAIL, RCPT, DATA and the headers of a message from an outside client."""
        conn = ConnectionContext(hostname="client.example.org", family="4", client_address="192.0.2.10")
        txn, _ = self.pipeline.mail(conn, ["<sender@example.org>"])
        self.successResultOf(self.pipeline.rcpt(txn, ["<alice@example.net>"]))
        self.assertIs(self.successResultOf(self.pipeline.data(txn)).action, Action.CONTINUE)
        for name, value in headers:
            self.pipeline.header(txn, name, value)
        return txn

    def eom(self, txn: Transaction) -> "Deferred[Any]":
        self.successResultOf(self.pipeline.body(txn, b"Sure.\r\n"))
        return self.pipeline.eom(txn)

    def result(self, txn: Transaction, check: Check) -> CheckResult:
        """The first result of ``check`` the message got."""
        return next(r for r in txn.results if r.check is check)

    def test_in_reply_to_hit_turns_strict_off(self) -> None:
        """A stored In-Reply-To id, looked up at the end of the headers: at EOM the message is a reply,
        strict checks are off and the spam scan is skipped (SPEC §6.4)."""
        self.server.setex(VECTOR_KEY, 0, b"1")
        txn = self.until_headers(("In-Reply-To", " <orig@example.com> "))
        self.assertEqual(self.server.commands, [])  # not before the headers are complete
        self.pipeline.eoh(txn)
        self.assertEqual([(c.name, c.args) for c in self.server.commands], [("GET", (VECTOR_KEY,))])
        self.assertTrue(txn.strict)  # decided only at EOM
        verdict = self.successResultOf(self.eom(txn))
        self.assertIs(verdict.action, Action.ACCEPT)
        self.assertEqual(replies.hit(self.result(txn, Check.REPLIES)), VECTOR_ID)
        self.assertFalse(txn.strict)
        self.assertEqual(self.spam.calls, [])
        self.assertEqual(self.result(txn, Check.SPAM).summary, "skipped, reply to our message")
        self.pipeline.finish(txn, verdict)

    def test_miss_changes_nothing(self) -> None:
        """An unknown id: strict checks stay on and the message is scanned."""
        txn = self.until_headers(("In-Reply-To", "<unknown@example.com>"))
        self.pipeline.eoh(txn)
        verdict = self.successResultOf(self.eom(txn))
        self.assertIs(verdict.action, Action.ACCEPT)
        result = self.result(txn, Check.REPLIES)
        self.assertEqual((result.summary, replies.hit(result)), (replies.NOT_A_REPLY, None))
        self.assertTrue(txn.strict)
        self.assertEqual(self.spam.calls, [{"dkim_only": False}])
        self.pipeline.finish(txn, verdict)

    def test_lookups_started_early_finish_before_eom(self) -> None:
        """Lookups run while the body arrives: EOM waits only for what is left."""
        redis = FakeRedisRoles(self.clock, roles=("id",), timeout=0.5)
        self.use(make_deps(self.clock, redis, connect_timeout=1.0, spamd=True))
        redis.servers["id"].hang = True
        txn = self.until_headers(("In-Reply-To", VECTOR_ID))
        self.pipeline.eoh(txn)
        self.clock.advance(0.6)  # body transfer
        verdict = self.successResultOf(self.eom(txn))
        self.assertIs(verdict.action, Action.ACCEPT)
        self.assertEqual(len(self.spam.calls), 1)
        self.pipeline.finish(txn, verdict)

    def test_eom_waits_for_the_lookups(self) -> None:
        """Lookups still running at EOM delay it until they end (connect_timeout at most)."""
        redis = FakeRedisRoles(self.clock, roles=("id",), timeout=30.0)
        self.use(make_deps(self.clock, redis, connect_timeout=1.0, spamd=True))
        redis.servers["id"].hang = True
        txn = self.until_headers(("In-Reply-To", VECTOR_ID))
        self.pipeline.eoh(txn)
        self.clock.advance(0.5)
        eom = self.eom(txn)
        self.assertNoResult(eom)
        self.clock.advance(0.5)
        self.assertIs(self.successResultOf(eom).action, Action.ACCEPT)
        self.pipeline.finish(txn, self.successResultOf(eom))


class LookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedisRoles(self.clock, roles=("id",))
        self.server = self.redis.servers["id"]
        self.deps = make_deps(self.clock, self.redis)

    def test_hit_logged_with_the_id(self) -> None:
        """The hit is logged as C does: "... is reply to our message <id>; skip dcc and spamd checks"."""
        events: List[dict] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.server.setex(VECTOR_KEY, 0, b"1")
        msg = make_message(headers=[("In-Reply-To", VECTOR_ID)])
        result = self.successResultOf(replies.check(msg, self.deps))
        self.assertEqual(result.summary, "reply to our message %s" % (VECTOR_ID,))
        self.assertEqual(result.details, {"reply_to": VECTOR_ID})
        (event,) = [e for e in events if e.get("log_namespace") == "rmilter.replies"
                    and e["log_level"].name == "info"]
        self.assertIn("is reply to our message {message_id}; skip dcc and spamd checks", event["log_format"])
        self.assertEqual((event["tag"], event["message_id"]), (msg.tag, VECTOR_ID))

    def test_every_references_token_checked(self) -> None:
        """B14: the last References token is looked up too (C never checked it)."""
        last = "<last@y>"
        self.server.setex(replies.message_id_key("message_id.", last), 0, b"1")
        result = looked_up(self, self.deps, ("References", "<zzz@x>\n\t<orig@example.com> <last@y>"))
        self.assertEqual(
            [c.args[0] for c in self.server.commands],
            [replies.message_id_key("message_id.", i) for i in ("<zzz@x>", VECTOR_ID, last)],
        )
        self.assertEqual(replies.hit(result), last)

    def test_miss(self) -> None:
        """An unknown id: not a reply."""
        result = looked_up(self, self.deps, ("In-Reply-To", "<unknown@example.com>"))
        self.assertEqual((result.summary, replies.hit(result), result.skipped), (replies.NOT_A_REPLY, None, False))

    def test_empty_value_is_a_miss(self) -> None:
        """SPEC §6.1: only a non-empty value is a hit."""
        self.server.setex(VECTOR_KEY, 0, b"")
        self.assertIsNone(replies.hit(looked_up(self, self.deps, ("In-Reply-To", VECTOR_ID))))

    def test_unreachable_redis_is_a_miss(self) -> None:
        """SPEC §6.10: Redis unreachable, the replies check misses at once."""
        self.server.setex(VECTOR_KEY, 0, b"1")
        self.redis.set_reachable(False)
        self.assertIsNone(replies.hit(looked_up(self, self.deps, ("In-Reply-To", VECTOR_ID))))

    def test_hanging_redis_bounded_by_connect_timeout(self) -> None:
        """A lookup that never answers delays the check by at most connect_timeout, then misses."""
        redis = FakeRedisRoles(self.clock, roles=("id",), timeout=30.0)
        deps = make_deps(self.clock, redis, connect_timeout=1.0)
        redis.servers["id"].setex(VECTOR_KEY, 0, b"1")
        redis.servers["id"].hang = True
        checking = replies.check(make_message(headers=[("In-Reply-To", VECTOR_ID)]), deps)
        self.clock.advance(0.9)
        self.assertNoResult(checking)
        self.clock.advance(0.1)
        self.assertIsNone(replies.hit(self.successResultOf(checking)))
        self.clock.advance(30)  # nothing is left waiting
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lookups_of_one_message_share_a_deadline(self) -> None:
        """All GETs of a message are bounded by one deadline: connect_timeout after the check began."""
        redis = FakeRedisRoles(self.clock, roles=("id",), timeout=30.0)
        deps = make_deps(self.clock, redis, connect_timeout=1.0)
        redis.servers["id"].hang = True
        checking = replies.check(make_message(headers=[("References", "<a@x> <b@x> <c@x>")]), deps)
        self.assertEqual(len(redis.servers["id"].commands), 3)
        self.clock.advance(1.0)
        self.assertEqual(self.successResultOf(checking).summary, replies.NOT_A_REPLY)

    def test_no_id_servers_no_lookup(self) -> None:
        """servers_id empty (or no Redis at all): the check is off, no command, the result at once."""
        for redis in (FakeRedisRoles(self.clock, roles=("grey",)), None):
            result = looked_up(self, make_deps(self.clock, redis), ("In-Reply-To", VECTOR_ID))
            self.assertEqual((result.skipped, result.summary), (True, "replies check inactive"))
        self.assertEqual(self.redis.all_commands(), [])

    def test_memcached_backend_disables_the_check(self) -> None:
        """B13: with a memcached backend the Redis features are off."""
        deps = make_deps(self.clock, self.redis, cache_backend="memcached")
        result = looked_up(self, deps, ("In-Reply-To", VECTOR_ID))
        self.assertEqual((result.skipped, result.summary), (True, "replies check inactive"))
        self.assertEqual(self.server.commands, [])

    def test_not_a_reply_no_lookup(self) -> None:
        """No In-Reply-To or References (or only empty ones): nothing to look up."""
        result = looked_up(self, self.deps, ("Subject", "hi"), ("In-Reply-To", " "), ("References", ""))
        self.assertEqual((result.skipped, result.summary), (True, "no In-Reply-To or References"))
        self.assertEqual(self.server.commands, [])

    def test_duplicates_looked_up_once_and_count_bounded(self) -> None:
        """A References header with hundreds of ids costs at most MAX_LOOKUPS GETs, root and parents kept."""
        ids = ["<%d@thread>" % i for i in range(500)]
        looked_up(self, self.deps, ("In-Reply-To", ids[0]), ("In-Reply-To", ids[0]), ("References", " ".join(ids)))
        keys = [c.args[0] for c in self.server.commands]
        self.assertEqual(len(keys), replies.MAX_LOOKUPS)
        self.assertEqual(len(set(keys)), len(keys))
        self.assertIn(replies.message_id_key("message_id.", ids[0]), keys)
        self.assertIn(replies.message_id_key("message_id.", ids[-1]), keys)
        self.assertIn(replies.message_id_key("message_id.", ids[1]), keys)  # root of the References header
        self.assertFalse(replies.message_id_key("message_id.", ids[2]) in keys)

    def test_thread_root_kept_after_in_reply_to(self) -> None:
        """In-Reply-To (the parent) before a References header of 500 ids: the parent, the thread root
        and the nearest ancestors are looked up, MAX_LOOKUPS in all."""
        ids = ["<%d@thread>" % i for i in range(500)]  # root first, parent last
        looked_up(self, self.deps, ("In-Reply-To", ids[-1]), ("References", " ".join(ids)))
        keys = [c.args[0] for c in self.server.commands]
        expected = [ids[-1], ids[0]] + ids[len(ids) - replies.MAX_LOOKUPS + 1 : -1]
        self.assertEqual(keys, [replies.message_id_key("message_id.", i) for i in expected])


class RecordTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = FakeRedisRoles(self.clock, roles=("id",))
        self.server = self.redis.servers["id"]

    def sent(self, deps: Deps, msg_id: Optional[str] = " <sent@example.org>",
             **kwargs: Any) -> Tuple[MessageContext, CheckResult]:
        """An accepted message with ``msg_id`` recorded; the record's result, which never waits for Redis."""
        msg = make_message(**kwargs)
        if msg_id is not None:
            msg.headers.append(("Message-ID", msg_id))
        result = self.successResultOf(replies.record(msg, deps))
        self.assertIs(result.check, Check.REPLIES)
        self.assertIsNone(result.verdict)
        self.assertFalse(result.failed)
        return msg, result

    def assertNotStored(self, result: CheckResult, reason: str) -> None:
        self.assertEqual((result.skipped, result.summary), (True, reason))

    def test_authenticated_message_stored_with_ttl(self) -> None:
        """SASL sender: SETEX id_prefix + hash, TTL id_expire (1 day), a non-empty value."""
        _, result = self.sent(make_deps(self.clock, self.redis), user="alice", sasl=True)
        self.assertEqual((result.summary, result.skipped), (replies.STORED, False))
        self.assertEqual(result.details, {"stored_message_id": "<sent@example.org>"})
        key = replies.message_id_key("message_id.", "<sent@example.org>")
        (command,) = self.server.commands
        self.assertEqual((command.name, command.args[:2]), ("SETEX", (key, b"86400")))
        self.assertTrue(command.args[2])
        self.assertEqual(self.server.ttl(key), 86400)

    def test_reply_to_remembered_message_is_recognised(self) -> None:
        """Round trip: a later message with In-Reply-To = the stored id is a reply; after the TTL it is not."""
        deps = make_deps(self.clock, self.redis, id_expire=3600)
        self.sent(deps, msg_id="<sent@example.org>", user="alice", sasl=True)
        self.assertEqual(replies.hit(looked_up(self, deps, ("In-Reply-To", "<sent@example.org>"))),
                         "<sent@example.org>")
        self.clock.advance(3601)
        self.assertIsNone(replies.hit(looked_up(self, deps, ("In-Reply-To", "<sent@example.org>"))))

    def test_our_networks_stored_unless_strict_auth(self) -> None:
        """our_networks clients count as our senders only without strict_auth."""
        _, result = self.sent(make_deps(self.clock, self.redis), user="sender@example.org", client_address="10.1.2.3")
        self.assertEqual(result.summary, replies.STORED)
        self.assertEqual(self.server.command_names(), ["SETEX"])
        self.server.clear_log()
        _, result = self.sent(make_deps(self.clock, self.redis, strict_auth=True), user="sender@example.org",
                              client_address="10.1.2.3")
        self.assertNotStored(result, "not one of our senders")
        self.assertEqual(self.server.commands, [])

    def test_sasl_stored_even_with_strict_auth(self) -> None:
        self.sent(make_deps(self.clock, self.redis, strict_auth=True), user="alice", sasl=True)
        self.assertEqual(self.server.command_names(), ["SETEX"])

    def test_unauthenticated_not_stored(self) -> None:
        _, result = self.sent(make_deps(self.clock, self.redis))
        self.assertNotStored(result, "not one of our senders")
        self.assertEqual(self.server.commands, [])

    def test_without_message_id_nothing_stored(self) -> None:
        for msg_id in (None, "  "):
            _, result = self.sent(make_deps(self.clock, self.redis), msg_id=msg_id, user="alice", sasl=True)
            self.assertNotStored(result, "no Message-ID")
        self.assertEqual(self.server.commands, [])

    def test_check_off_nothing_stored(self) -> None:
        """No servers_id, no Redis or a memcached backend: nothing stored."""
        for deps in (make_deps(self.clock, FakeRedisRoles(self.clock, roles=("grey",))), make_deps(self.clock, None),
                     make_deps(self.clock, self.redis, cache_backend="memcached")):
            _, result = self.sent(deps, user="alice", sasl=True)
            self.assertNotStored(result, "replies check inactive")
        self.assertEqual(self.server.commands, [])

    def test_zero_expiry_stores_without_ttl(self) -> None:
        """id_expire = 0: SET without expiry (SPEC §6.1: SETEX with ttl 0 is SET)."""
        self.sent(make_deps(self.clock, self.redis, id_expire=0), user="alice", sasl=True)
        self.assertEqual(self.server.command_names(), ["SET"])

    def test_redis_failure_only_logged(self) -> None:
        """Unreachable or hanging Redis: record returns at once and only logs."""
        events: List[dict] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        deps = make_deps(self.clock, self.redis)
        self.redis.set_reachable(False)
        msg, _ = self.sent(deps, user="alice", sasl=True)
        self.server.reachable = True
        self.server.hang = True
        self.sent(deps, user="alice", sasl=True)  # its result came at once although Redis hangs
        self.clock.advance(1.0)
        warnings = [e for e in events if e.get("log_namespace") == "rmilter.replies" and e["log_level"].name == "warn"]
        self.assertEqual(len(warnings), 2)
        self.assertEqual(warnings[0]["tag"], msg.tag)
        self.assertEqual(self.flushLoggedErrors(), [])
