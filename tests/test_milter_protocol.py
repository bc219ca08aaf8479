"""MilterProtocol and MilterFactory over StringTransport and task.Clock (no sockets)."""
from __future__ import annotations

import socket
from typing import Any, List, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from rmilter import verdict as v
from rmilter.config.schema import Config, GlobalConfig
from rmilter.milter import codec
from rmilter.milter import constants as c
from rmilter.milter import protocol as protocol_module
from rmilter.milter import session as session_module
from rmilter.milter.codec import (
    Abort,
    Body,
    Connect,
    Data,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    Macro,
    Mail,
    Negotiate,
    Quit,
    QuitNoClose,
    Rcpt,
)
from rmilter.milter.protocol import MilterFactory, MilterProtocol
from rmilter.pipeline import Pipeline
from rmilter.deps import Deps
from rmilter.runtime import Runtime
from rmilter.spool import run_inline
from rmilter.testing.fakepipeline import FakePipeline

POSTFIX = Negotiate(6, 0x1FF, 0x1FFFFF)
OLD_MTA = Negotiate(6, 0x1FF, c.SMFIP_NOUNKNOWN)

ENVELOPE = [
    Macro("C", (("j", "mx.example.org"), ("{daemon_name}", "smtpd"))),
    Connect("mail.example.net", "4", 40000, "192.0.2.10"),
    Macro("H"),
    Helo("mail.example.net"),
    Macro("M", (("{mail_addr}", "a@example.net"),)),
    Mail(("<a@example.net>",)),
    Macro("R", (("{rcpt_addr}", "b@example.org"),)),
    Rcpt(("<b@example.org>",)),
]
CONTENT = [
    Macro("T", (("i", "4ABCDEF"),)),
    Data(),
    Macro("L", (("i", "4ABCDEF"),)),
    Header("Subject", "hello"),
    Macro("N", (("i", "4ABCDEF"),)),
    EndOfHeaders(),
    Macro("B", (("i", "4ABCDEF"),)),
    Body(b"Hello\r\n"),
    Macro("E", (("i", "4ABCDEF"),)),
    EndOfMessage(),
]


def wire(*commands: Any) -> bytes:
    return b"".join(codec.encode(command) for command in commands)


def replies(data: bytes) -> List[Any]:
    reader = codec.ReplyReader()
    reader.receive_data(data)
    return list(reader)


class FakeSocket:
    def __init__(self) -> None:
        self.options: List[tuple] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


class Transport(StringTransport):
    """A StringTransport that records writes and the TCP socket options set on it."""

    def __init__(self, tcp: bool = True) -> None:
        if tcp:
            super().__init__(IPv4Address("TCP", "127.0.0.1", 11339), IPv4Address("TCP", "192.0.2.1", 4711))
        else:
            super().__init__(UNIXAddress("/run/rmilter.sock"), UNIXAddress(None))
        self.writes: List[bytes] = []
        self.nodelay: Optional[bool] = None
        self.socket = FakeSocket()

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def getHandle(self) -> FakeSocket:
        return self.socket


def config(**main: Any) -> Config:
    return Config(main=GlobalConfig(**main))


class Harness:
    """One factory, one connection; ``send`` feeds commands as one read."""

    def __init__(self, pipeline: Any = None, *, tcp: bool = True, no_reply_steps: bool = True, **main: Any) -> None:
        self.pipeline = pipeline if pipeline is not None else FakePipeline(config=config(**main))
        self.clock = Clock()
        self.factory = MilterFactory(self.pipeline, self.clock, no_reply_steps=no_reply_steps)
        self.transport = Transport(tcp)
        self.protocol = self.connect(self.transport)

    def connect(self, transport: Transport) -> MilterProtocol:
        protocol = self.factory.buildProtocol(transport.getPeer())
        protocol.makeConnection(transport)
        return protocol

    def send(self, *commands: Any, protocol: Optional[MilterProtocol] = None) -> None:
        (protocol or self.protocol).dataReceived(wire(*commands))

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        self.transport.writes.clear()
        return data

    def lose(self, protocol: Optional[MilterProtocol] = None) -> None:
        (protocol or self.protocol).connectionLost(Failure(ConnectionDone()))


class NegotiationTests(SynchronousTestCase):
    def test_vectors(self) -> None:
        """SPEC §9 offers, answered with what rmilter requests (SPEC §3.4), one write each."""
        for offer, version, actions, protocol in [
            (Negotiate(6, 0x1FF, 0x1FFFFF), 6, 0x1FF, 0xDF180),
            (Negotiate(2, 0x1F, 0x7F), 2, 0x1F, 0),
            (Negotiate(6, 0x1D, 0), 6, 0x1D, 0),
        ]:
            h = Harness()
            h.send(offer)
            (reply,) = replies(h.transport.value())
            self.assertEqual((reply.version, reply.actions, reply.protocol), (version, actions, protocol), offer)
            self.assertEqual(len(h.transport.writes), 1)

    def test_refused_offers_close_without_reply(self) -> None:
        """Actions 0x0F, 0x11, version 1: nothing is written, the connection closes after one error line."""
        for offer in (Negotiate(6, 0x0F, 0x1FFFFF), Negotiate(6, 0x11, 0x1FFFFF), Negotiate(1, 0x1FF, 0x1FFFFF)):
            events: List[dict] = []
            self.patch(session_module, "log", Logger(namespace="rmilter.milter", observer=events.append))
            h = Harness()
            h.send(offer)
            self.assertEqual(h.transport.value(), b"")
            self.assertTrue(h.transport.disconnecting)
            self.assertEqual([e["log_level"].name for e in events], ["error"])

    def test_no_reply_steps_switch(self) -> None:
        """MilterFactory(no_reply_steps=False) makes the MTA wait for every step."""
        h = Harness(no_reply_steps=False)
        h.send(POSTFIX)
        (reply,) = replies(h.transport.value())
        self.assertEqual(reply.protocol, c.SMFIP_NOUNKNOWN)


class MessageTests(SynchronousTestCase):
    def test_no_reply_steps_are_not_answered(self) -> None:
        """With Postfix's offer, nothing is written between OPTNEG and EOM."""
        h = Harness()
        h.send(POSTFIX)
        h.take()
        h.send(*ENVELOPE, *CONTENT[:-2])
        self.assertEqual(h.transport.value(), b"")
        h.send(*CONTENT[-2:])
        self.assertEqual(h.transport.writes, [codec.ACCEPT_PACKET])

    def test_one_write_per_answered_command(self) -> None:
        """Every answered command gets exactly one write, even when many arrive in one read."""
        h = Harness()
        h.send(OLD_MTA)
        h.take()
        h.send(*ENVELOPE, *CONTENT)
        self.assertEqual(h.transport.writes, [codec.CONTINUE_PACKET] * 8 + [codec.ACCEPT_PACKET])

    def test_eom_edits_and_verdict_in_one_write(self) -> None:
        """Modifications and the final verdict answering EOM are a single write."""
        pipeline = FakePipeline()
        pipeline.answers["eom"] = v.Verdict(v.Action.ACCEPT, edits=(v.AddHeader(name="X-A", value="1"), v.AddHeader(name="X-B", value="2")))
        h = Harness(pipeline)
        h.send(POSTFIX)
        h.take()
        h.send(*ENVELOPE, *CONTENT)
        self.assertEqual(len(h.transport.writes), 1)
        self.assertEqual(replies(h.transport.value()),
                         [codec.AddHeaderReply("X-A", "1"), codec.AddHeaderReply("X-B", "2"), codec.Accept()])

    def test_modifications_only_when_negotiated(self) -> None:
        """An MTA offering 0x15 gets no CHGFROM/DELRCPT packets, only what it can do."""
        pipeline = FakePipeline()
        pipeline.answers["eom"] = v.Verdict(v.Action.ACCEPT, edits=(
            v.AddHeader(name="X-A", value="1"), v.ChangeFrom(address="<n@x>"), v.DeleteRecipient(address="<b@example.org>"),
            v.ChangeHeader(name="Subject", index=1, value="new")))
        h = Harness(pipeline)
        h.send(Negotiate(6, 0x15, 0))
        h.take()
        h.send(*ENVELOPE, *CONTENT)
        self.assertEqual(replies(h.transport.writes[-1]), [
            codec.AddHeaderReply("X-A", "1"), codec.ChangeHeaderReply(1, "Subject", "new"), codec.Accept()])

    def test_several_messages_per_connection(self) -> None:
        """Two messages with ABORT between: two ACCEPTs, two finishes, QUIT closes."""
        h = Harness()
        h.send(POSTFIX)
        h.take()
        h.send(*ENVELOPE, *CONTENT)
        h.send(Abort(), Macro("M", (("{mail_addr}", "c@example.net"),)), Mail(("<c@example.net>",)),
               Rcpt(("<d@example.org>",)), *CONTENT)
        self.assertEqual(h.transport.writes, [codec.ACCEPT_PACKET, codec.ACCEPT_PACKET])
        self.assertEqual([m.envelope_from for m, _ in h.pipeline.finished], ["a@example.net", "c@example.net"])
        self.assertEqual(h.factory.messages_in_flight, 0)
        h.send(Abort(), Quit())
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(len(h.pipeline.finished), 2)

    def test_abort_resets(self) -> None:
        """ABORT mid-message finishes it with None; the next message starts clean."""
        h = Harness()
        h.send(POSTFIX, *ENVELOPE, *CONTENT[:4], Abort())
        self.assertEqual(h.pipeline.finished[0][1], None)
        self.assertEqual(h.factory.messages_in_flight, 0)
        h.send(Mail(("<x@example.net>",)), *CONTENT)
        self.assertEqual(h.pipeline.messages[1].recipients, [])
        self.assertTrue(h.transport.value().endswith(codec.ACCEPT_PACKET))

    def test_quit_nc(self) -> None:
        """QUIT_NC keeps the connection; a new CONNECT and message follow without OPTNEG."""
        h = Harness()
        h.send(POSTFIX, *ENVELOPE, *CONTENT, Abort(), QuitNoClose())
        self.assertFalse(h.transport.disconnecting)
        h.take()
        h.send(Connect("other.example", "6", 25, "2001:db8::7"), Helo("other"), Mail(("<z@x>",)), Rcpt(("<y@x>",)),
               *CONTENT)
        self.assertEqual(h.transport.writes, [codec.ACCEPT_PACKET])
        self.assertEqual(h.pipeline.messages[1].connection.client_address, "2001:db8::7")

    def test_header_and_body_macros_are_ignored(self) -> None:
        """D L and D B (sent by Postfix before every header and body chunk) are dropped, as
        libmilter does; other MACRO stages are stored (SPEC §3.2)."""
        h = Harness()
        h.send(POSTFIX, *ENVELOPE, Data(), Macro("L", (("{x}", "header-stage"),)), Header("A", "b"),
               Macro("B", (("{y}", "body-stage"),)), Body(b"x"), Macro("E", (("{z}", "eom-stage"),)))
        macros = h.protocol.session.connection.macros  # type: ignore[union-attr]
        self.assertIsNone(macros.get("{x}"))
        self.assertIsNone(macros.get("{y}"))
        self.assertEqual(macros.get("{z}"), "eom-stage")
        self.assertEqual(macros.get("{rcpt_addr}"), "b@example.org")

    def test_out_of_order_commands_answered_continue(self) -> None:
        """A HEADER before MAIL is answered CONTINUE; the connection stays usable."""
        h = Harness()
        h.send(OLD_MTA, *ENVELOPE[:4])
        h.take()
        h.send(Header("Subject", "early"), EndOfHeaders())
        self.assertEqual(h.transport.writes, [codec.CONTINUE_PACKET, codec.CONTINUE_PACKET])
        self.assertFalse(h.transport.disconnecting)
        self.assertNotIn("header", h.pipeline.stages())

    def test_pipeline_failure_is_tempfail_and_connection_stays(self) -> None:
        """A failing EOM check: bare TEMPFAIL, logged, and the next message works."""
        pipeline = FakePipeline()
        answers = [lambda: fail(RuntimeError("scanner bug")), lambda: Deferred()]
        pipeline.answers["eom"] = lambda: answers.pop(0)()
        h = Harness(pipeline)
        h.send(POSTFIX, *ENVELOPE, *CONTENT)
        self.assertTrue(h.transport.value().endswith(codec.TEMPFAIL_PACKET))
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_internal_error_closes_connection(self) -> None:
        """If the session itself raised, only this connection is closed, with a logged failure."""
        h = Harness()
        h.send(POSTFIX)

        def broken(command: Any) -> Any:
            raise KeyError("bug")

        h.protocol.session.handle = broken  # type: ignore[union-attr]
        h.send(*ENVELOPE)
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)


class PendingTests(SynchronousTestCase):
    def pending_eom(self, **main: Any) -> tuple:
        pipeline = FakePipeline(config=config(**main))
        pending: Deferred = Deferred()
        pipeline.answers["eom"] = pending
        h = Harness(pipeline)
        h.send(POSTFIX, *ENVELOPE, *CONTENT)
        h.take()
        return h, pending

    def test_progress_while_eom_pending(self) -> None:
        """PROGRESS every progress_interval while EOM runs; none after the verdict."""
        h, pending = self.pending_eom(progress_interval=10.0)
        h.clock.advance(9.9)
        self.assertEqual(h.transport.value(), b"")
        h.clock.advance(0.1)
        self.assertEqual(h.transport.writes, [codec.PROGRESS_PACKET])
        h.clock.advance(10)
        self.assertEqual(h.transport.writes, [codec.PROGRESS_PACKET] * 2)
        pending.callback(v.ACCEPT)
        self.assertEqual(h.transport.writes[-1], codec.ACCEPT_PACKET)
        h.clock.advance(100)
        self.assertEqual(h.transport.writes.count(codec.PROGRESS_PACKET), 2)
        self.assertEqual(h.clock.getDelayedCalls()[0].func, h.protocol._check_idle)
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)

    def test_no_progress_for_other_stages(self) -> None:
        """A pending RCPT check is not kept alive with PROGRESS (libmilter only allows it at EOM)."""
        pipeline = FakePipeline(needing=("eom", "rcpt"))
        pipeline.answers["rcpt"] = Deferred()
        h = Harness(pipeline, progress_interval=1.0)
        h.send(POSTFIX, *ENVELOPE)
        h.take()
        h.clock.advance(5)
        self.assertEqual(h.transport.value(), b"")

    def test_commands_wait_in_order_and_input_is_paused(self) -> None:
        """Commands behind a pending RCPT wait; past 2 queued frames reading pauses, then resumes."""
        pipeline = FakePipeline(needing=("eom", "rcpt"))
        pending: Deferred = Deferred()
        pipeline.answers["rcpt"] = pending
        h = Harness(pipeline)
        h.send(POSTFIX, *ENVELOPE)
        h.take()
        h.send(*CONTENT[:2])
        self.assertEqual(h.transport.producerState, "producing")
        h.send(*CONTENT[2:6])
        self.assertEqual(h.transport.producerState, "paused")
        self.assertNotIn("data", h.pipeline.stages())
        h.send(*CONTENT[6:])
        pending.callback(v.CONTINUE)
        self.assertEqual(h.transport.producerState, "producing")
        self.assertEqual(h.transport.writes, [codec.CONTINUE_PACKET, codec.ACCEPT_PACKET])
        self.assertEqual(h.pipeline.stages()[-6:], ["data", "header", "eoh", "body", "eom", "finish"])

    def test_connection_lost_while_pending(self) -> None:
        """Lost during EOM: nothing is written later, the message finishes once the checks end."""
        h, pending = self.pending_eom()
        waiting = h.factory.wait_for_messages()
        self.assertNoResult(waiting)
        h.lose()
        self.assertEqual(h.pipeline.finished, [])
        pending.callback(v.ACCEPT)
        self.assertEqual(h.transport.value(), b"")
        self.assertEqual(h.pipeline.finished, [(h.pipeline.messages[0], None)])
        h.clock.advance(0)
        self.successResultOf(waiting)
        self.assertEqual(h.clock.getDelayedCalls(), [])


class TimeoutTests(SynchronousTestCase):
    def test_idle_connection_closed(self) -> None:
        """No command for idle_timeout seconds: the connection closes with an info line."""
        events: List[dict] = []
        self.patch(protocol_module, "log", Logger(namespace="rmilter.milter", observer=events.append))
        h = Harness(idle_timeout=60.0)
        h.send(POSTFIX)
        h.clock.advance(59)
        h.send(*ENVELOPE[:4])
        h.clock.advance(59)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(1)
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual([e["log_level"].name for e in events], ["info"])
        h.lose()
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_idle_timer_waits_while_the_pipeline_works(self) -> None:
        """A slow EOM check is not an idle MTA."""
        pipeline = FakePipeline(config=config(idle_timeout=60.0, progress_interval=0.0))
        pending: Deferred = Deferred()
        pipeline.answers["eom"] = pending
        h = Harness(pipeline)
        h.send(POSTFIX, *ENVELOPE, *CONTENT)
        h.clock.advance(200)
        self.assertFalse(h.transport.disconnecting)
        pending.callback(v.ACCEPT)
        h.clock.advance(59)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(61)
        self.assertTrue(h.transport.disconnecting)


class BadInputTests(SynchronousTestCase):
    def check_closed_with_one_line(self, data: bytes, **main: Any) -> Harness:
        events: List[dict] = []
        self.patch(protocol_module, "log", Logger(namespace="rmilter.milter", observer=events.append))
        h = Harness(**main)
        h.send(POSTFIX)
        h.take()
        h.protocol.dataReceived(data)
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(len(events), 1, events)
        self.assertEqual(events[0]["log_level"].name, "error")
        # later bytes are ignored
        h.protocol.dataReceived(wire(Helo("x")))
        self.assertEqual(h.transport.value(), b"")
        return h

    def test_oversized_frame(self) -> None:
        """A frame above max_frame_size closes this connection, before its payload is read."""
        h = self.check_closed_with_one_line(b"\x00\x10\x00\x01B" + b"x" * 1000, max_frame_size=65536)
        self.assertEqual(h.protocol.reader.buffered, 0)  # type: ignore[union-attr]

    def test_zero_length_frame(self) -> None:
        self.check_closed_with_one_line(b"\0\0\0\0")

    def test_unknown_command(self) -> None:
        self.check_closed_with_one_line(b"\0\0\0\x01Z")

    def test_malformed_payload(self) -> None:
        self.check_closed_with_one_line(b"\0\0\0\x05Hhelo")

    def test_other_connections_unaffected(self) -> None:
        """A bad frame on one connection leaves the others working."""
        h = Harness()
        other_transport = Transport()
        other = h.connect(other_transport)
        h.send(POSTFIX)
        h.protocol.dataReceived(b"\0\0\0\0")
        h.send(POSTFIX, *ENVELOPE, *CONTENT, protocol=other)
        self.assertTrue(other_transport.value().endswith(codec.ACCEPT_PACKET))
        self.assertFalse(other_transport.disconnecting)


class FuzzTests(SynchronousTestCase):
    @given(st.lists(st.one_of(st.binary(max_size=40),
                              st.sampled_from([wire(x) for x in ENVELOPE + CONTENT + [Abort(), QuitNoClose()]])),
                    max_size=30))
    @settings(max_examples=200, deadline=None)
    def test_any_bytes_after_negotiation(self, chunks: List[bytes]) -> None:
        """Valid and random frames mixed: dataReceived never raises, and every message is finished
        exactly once when the connection goes away."""
        h = Harness()
        h.send(POSTFIX)
        for chunk in chunks:
            h.protocol.dataReceived(chunk)
        h.lose()
        self.assertEqual(len(h.pipeline.finished), len(h.pipeline.messages))
        self.assertEqual(h.factory.messages_in_flight, 0)


class SocketOptionTests(SynchronousTestCase):
    def test_tcp_nodelay_and_quickack(self) -> None:
        """TCP: TCP_NODELAY at connect; with no-reply steps TCP_QUICKACK after every read."""
        if protocol_module._TCP_QUICKACK is None:
            self.fail("TCP_QUICKACK is Linux-only; this test suite runs on Linux")
        h = Harness()
        self.assertTrue(h.transport.nodelay)
        h.send(POSTFIX)
        quickack = (socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)  # type: ignore[attr-defined]
        self.assertEqual(h.transport.socket.options, [quickack])
        h.send(*ENVELOPE)
        h.send(*CONTENT)
        self.assertEqual(h.transport.socket.options, [quickack] * 3)

    def test_no_quickack_without_no_reply_steps(self) -> None:
        h = Harness()
        h.send(OLD_MTA, *ENVELOPE)
        self.assertEqual(h.transport.socket.options, [])

    def test_unix_socket_gets_no_tcp_options(self) -> None:
        h = Harness(tcp=False)
        h.send(POSTFIX, *ENVELOPE)
        self.assertIsNone(h.transport.nodelay)
        self.assertEqual(h.transport.socket.options, [])
        self.assertEqual(h.protocol.peer, "unix")


class FactoryTests(SynchronousTestCase):
    def test_wait_for_messages(self) -> None:
        """wait_for_messages fires at once when idle, else when the last message finishes."""
        h = Harness()
        self.successResultOf(h.factory.wait_for_messages())
        h.send(POSTFIX, *ENVELOPE)
        self.assertEqual(h.factory.messages_in_flight, 1)
        waiting = h.factory.wait_for_messages()
        self.assertNoResult(waiting)
        h.send(*CONTENT)
        self.assertNoResult(waiting)  # not before the verdict is written (next reactor turn)
        self.assertTrue(h.transport.value())
        h.clock.advance(0)
        self.successResultOf(waiting)

    def test_wait_for_messages_cancel(self) -> None:
        """A cancelled wait (e.g. a shutdown timeout) is forgotten."""
        h = Harness()
        h.send(POSTFIX, *ENVELOPE)
        waiting = h.factory.wait_for_messages()
        waiting.cancel()
        self.failureResultOf(waiting)
        h.send(*CONTENT)  # finishing the message must not fire the cancelled Deferred again

    def test_close_idle_connections(self) -> None:
        """Only connections without a message in flight are closed."""
        h = Harness()
        busy_transport = Transport()
        busy = h.connect(busy_transport)
        h.send(POSTFIX, *ENVELOPE[:4])
        h.send(POSTFIX, *ENVELOPE, protocol=busy)
        self.assertEqual(len(h.factory.connections), 2)
        self.assertEqual(h.factory.close_idle_connections(), 1)
        self.assertTrue(h.transport.disconnecting)
        self.assertFalse(busy_transport.disconnecting)
        h.lose()
        self.assertEqual(h.factory.connections, {busy})

    def test_settings_default_to_pipeline_runtime(self) -> None:
        """Without settings, limits come from pipeline.current_runtime()."""
        pipeline = FakePipeline(config=config(max_frame_size=4096))
        factory = MilterFactory(pipeline, Clock())
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(Transport())
        self.assertEqual(protocol.reader.max_frame_size, 4096)  # type: ignore[union-attr]


class RealPipelineTests(SynchronousTestCase):
    def test_full_message_accepted(self) -> None:
        """The real Pipeline with the default Config: a whole message ends in ACCEPT, logged once."""
        clock = Clock()
        runtime = Runtime(Deps(config=Config(), clock=clock, run_blocking=run_inline))
        pipeline = Pipeline(lambda: runtime)
        h = Harness(pipeline)
        h.send(POSTFIX)
        (negotiated,) = replies(h.take())
        self.assertEqual(negotiated.protocol & c.SMFIP_NR_HDR, c.SMFIP_NR_HDR)
        h.send(*ENVELOPE, *CONTENT)
        self.assertEqual(h.transport.writes, [codec.ACCEPT_PACKET])
        self.assertEqual(runtime.in_flight, 0)
        h.send(Abort(), Macro("M", (("{mail_addr}", "c@example.net"),)), Mail(("<c@example.net>",)),
               Rcpt(("<d@example.org>",)), *CONTENT, Abort(), Quit())
        self.assertEqual(h.transport.writes, [codec.ACCEPT_PACKET] * 2)
        self.assertTrue(h.transport.disconnecting)
        self.assertEqual(runtime.in_flight, 0)
        self.assertEqual(h.factory.messages_in_flight, 0)

    def test_full_message_every_step_answered(self) -> None:
        """The same with an MTA that offers no NR steps: CONTINUE for each step, ACCEPT at EOM."""
        runtime = Runtime(Deps(config=Config(), clock=Clock(), run_blocking=run_inline))
        h = Harness(Pipeline(lambda: runtime))
        h.send(OLD_MTA)
        h.take()
        h.send(*ENVELOPE, *CONTENT)
        self.assertEqual(h.transport.writes, [codec.CONTINUE_PACKET] * 8 + [codec.ACCEPT_PACKET])
