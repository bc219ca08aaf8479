"""The in-memory Redis of rmilter.testing.fake_redis behaves like the RedisRole API promises."""
from __future__ import annotations

from typing import Sequence

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from rmilter.backends.redis import LuaScript, ScriptStore
from rmilter.testing.fake_redis import FakeCommand, FakeRedisRoles


def _increment(store: ScriptStore, keys: Sequence[bytes], args: Sequence[bytes]) -> int:
    value = int(store.get(keys[0]) or b"0") + 1
    store.setex(keys[0], 0, b"%d" % value)
    return value


COUNTER = LuaScript("counter", "return redis.call('INCR', KEYS[1])", _increment)


class FakeRedisTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.roles = FakeRedisRoles(self.clock)
        assert self.roles.grey is not None
        self.grey = self.roles.grey

    def test_ttl_on_the_clock(self) -> None:
        """SETEX values vanish when the Clock passes their TTL; SET values stay."""
        self.assertTrue(self.successResultOf(self.grey.setex(b"k", 10, b"v")))
        self.assertTrue(self.successResultOf(self.grey.setex(b"p", 0, b"w")))
        self.clock.advance(9.9)
        self.assertEqual(self.successResultOf(self.grey.get(b"k")), b"v")
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(self.grey.get(b"k")))
        self.assertEqual(self.successResultOf(self.grey.get(b"p")), b"w")
        self.assertEqual(self.roles.server.ttl(b"p"), -1)

    def test_command_log(self) -> None:
        """Every command is recorded as Redis would receive it."""
        self.grey.setex(b"k", 5, b"v")
        self.grey.setex(b"k", 0, b"v")
        self.grey.delete(b"k")
        self.grey.get(b"k")
        self.assertEqual(
            self.roles.server.commands,
            [FakeCommand("SETEX", (b"k", b"5", b"v")), FakeCommand("SET", (b"k", b"v")),
             FakeCommand("DEL", (b"k",)), FakeCommand("GET", (b"k",))],
        )

    def test_unreachable(self) -> None:
        """An unreachable server: misses, False, None; commands still logged."""
        self.roles.set_reachable(False)
        self.assertIsNone(self.successResultOf(self.grey.get(b"k")))
        self.assertFalse(self.successResultOf(self.grey.setex(b"k", 1, b"v")))
        self.assertIsNone(self.successResultOf(self.grey.publish("c", b"x")))
        self.assertIsNone(self.successResultOf(self.grey.eval_script(COUNTER, [b"n"], [])))
        self.assertEqual(len(self.roles.server.commands), 4)

    def test_hang(self) -> None:
        """A hanging server answers like a failure after the role's timeout."""
        self.roles.server.hang = True
        d = self.grey.get(b"k")
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.assertIsNone(self.successResultOf(d))

    def test_publish_and_scripts(self) -> None:
        """PUBLISH reports the configured subscriber count; scripts run their Python reference."""
        self.roles.server.subscribers["copies"] = 2
        self.assertEqual(self.successResultOf(self.grey.publish("copies", b"msg")), 2)
        self.assertEqual(self.roles.server.published[0].payload, b"msg")
        self.assertEqual(self.successResultOf(self.grey.eval_script(COUNTER, [b"n"], [])), 1)
        self.assertEqual(self.successResultOf(self.grey.eval_script(COUNTER, [b"n"], [])), 2)

    def test_roles(self) -> None:
        """Roles not asked for are None; white falls back to grey; separate servers on request."""
        roles = FakeRedisRoles(self.clock, roles=("grey", "limits"))
        self.assertIs(roles.white, roles.grey)
        self.assertIsNone(roles.id)
        separate = FakeRedisRoles(self.clock, separate=True)
        self.assertIsNot(separate.servers["grey"], separate.servers["limits"])

    def test_deadline(self) -> None:
        """A hanging fake answers at the sooner of its timeout and the command's deadline; a command
        whose deadline has passed answers at once and is not recorded (a real role sends nothing)."""
        self.roles.server.hang = True
        soon = self.grey.get(b"k", deadline=self.clock.seconds() + 0.25)
        late = self.grey.setex(b"k", 5, b"v", deadline=self.clock.seconds() + 30)
        self.clock.advance(0.25)
        self.assertIsNone(self.successResultOf(soon))
        self.assertNoResult(late)
        self.clock.advance(0.75)  # the role's timeout (1 s) comes first
        self.assertFalse(self.successResultOf(late))
        self.roles.server.clear_log()
        now = self.clock.seconds()
        self.assertIsNone(self.successResultOf(self.grey.get(b"k", deadline=now)))
        self.assertFalse(self.successResultOf(self.grey.setex(b"k", 5, b"v", deadline=now)))
        self.assertIsNone(self.successResultOf(self.grey.eval_script(COUNTER, [b"n"], [], deadline=now - 1)))
        self.assertIsNone(self.successResultOf(self.grey.publish("copies", b"msg", deadline=now)))
        self.assertEqual(self.roles.server.commands, [])
