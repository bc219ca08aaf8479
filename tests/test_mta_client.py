"""rmilter.testing.mta: the MTA-side client, against our MilterFactory and a scripted filter, in memory."""
from __future__ import annotations

from typing import Any, List, Optional

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from rmilter import verdict as v
from rmilter.milter import codec
from rmilter.milter import constants as c
from rmilter.milter.codec import CommandReader, Negotiate, NegotiateReply
from rmilter.milter.protocol import MilterFactory
from rmilter.testing.fakepipeline import FakePipeline
from rmilter.testing.mta import ClientSpec, MessageSpec, MilterClient, MilterClientError

NO_NR = Negotiate(6, 0x1FF, c.SMFIP_ALL_V6 & ~c.SMFIP_NR_ALL)


class LoopbackEndpoint:
    """An IStreamClientEndpoint connecting in memory to a server factory; ``pump`` moves the bytes."""

    def __init__(self, server_factory: Factory) -> None:
        self.server_factory = server_factory
        self.pump: Optional[iosim.IOPump] = None
        self.server: Any = None

    def connect(self, client_factory: Factory) -> "Deferred[Protocol]":
        self.server = self.server_factory.buildProtocol(None)
        client = client_factory.buildProtocol(None)
        self.pump = iosim.connect(
            self.server, iosim.FakeTransport(self.server, isServer=True),
            client, iosim.FakeTransport(client, isServer=False),
            greet=False,
        )
        return succeed(client)


class ScriptedFilter(Protocol):
    """A filter that negotiates ``reply`` and answers like libmilter: CONTINUE, ACCEPT at EOM,
    nothing for NR steps.  It records the commands it received."""

    def __init__(self, reply: NegotiateReply) -> None:
        self.reply = reply
        self.reader = CommandReader()
        self.commands: List[Any] = []

    def dataReceived(self, data: bytes) -> None:
        self.reader.receive_data(data)
        silent = {stage for stage, bit in c.NO_REPLY_BITS.items() if self.reply.protocol & bit}
        for command in self.reader:
            self.commands.append(command)
            kind = type(command)
            if kind is Negotiate:
                self.transport.write(codec.encode(self.reply))
            elif kind is codec.EndOfMessage:
                self.transport.write(codec.ACCEPT_PACKET)
            elif kind in (codec.Macro, codec.Abort, codec.Quit, codec.QuitNoClose):
                continue
            else:
                stage = {codec.Connect: "connect", codec.Helo: "helo", codec.Mail: "mail", codec.Rcpt: "rcpt",
                         codec.Data: "data", codec.Header: "header", codec.EndOfHeaders: "eoh",
                         codec.Body: "body"}[kind]
                if stage not in silent:
                    self.transport.write(codec.CONTINUE_PACKET)


class Setup:
    """A MilterClient connected in memory to ``server_factory``."""

    def __init__(self, server_factory: Factory, offer: Negotiate = Negotiate(6, 0x1FF, c.SMFIP_ALL_V6)) -> None:
        self.clock = Clock()
        self.endpoint = LoopbackEndpoint(server_factory)
        connecting = MilterClient.connect(self.clock, self.endpoint, offer=offer)
        self.flush()
        self.client: MilterClient = connecting.result

    def flush(self) -> None:
        assert self.endpoint.pump is not None
        self.endpoint.pump.flush()

    def run(self, d: Deferred) -> Any:
        self.flush()
        self.flush()
        return d.result


def rmilter_setup(pipeline: Optional[FakePipeline] = None, **kwargs: Any) -> tuple:
    pipeline = pipeline if pipeline is not None else FakePipeline()
    factory = MilterFactory(pipeline, Clock())
    return Setup(factory, **kwargs), pipeline


class AgainstRmilterTests(SynchronousTestCase):
    def test_negotiation(self) -> None:
        """connect() negotiates; the filter's reply is kept (NR bits, macro lists)."""
        setup, _ = rmilter_setup()
        reply = setup.client.negotiated
        self.assertIsInstance(reply, NegotiateReply)
        self.assertTrue(reply.protocol & c.SMFIP_NR_HDR)
        self.assertEqual(reply.macro_lists[0], codec.SetSymList(0, "j {daemon_name}"))

    def test_message_accepted(self) -> None:
        """A default message ends in ACCEPT at EOM; NR steps have no recorded reply."""
        setup, pipeline = rmilter_setup()
        result = setup.run(setup.client.send_message(MessageSpec()))
        self.assertEqual(result.action, "accept")
        self.assertEqual(result.final_stage, "eom")
        self.assertEqual([step.stage for step in result.steps], ["eom"])
        self.assertEqual(pipeline.stages(),
                         ["connect", "helo", "mail", "rcpt", "data"] + ["header"] * 4 + ["eoh", "body", "eom", "finish"])

    def test_envelope_and_macros_as_postfix_sends_them(self) -> None:
        """Sender/recipients bracketed, requested macro lists honoured (SETSYMLIST), queue id at DATA."""
        setup, pipeline = rmilter_setup()
        spec = MessageSpec(sender="a@example.net", recipients=("b@example.org", "<C@Example.org>"),
                           auth_authen="alice", mail_args=("SIZE=100",))
        setup.run(setup.client.send_message(spec))
        self.assertIn(("mail", ("<a@example.net>", "SIZE=100")), pipeline.calls)
        self.assertIn(("rcpt", ("<b@example.org>",)), pipeline.calls)
        self.assertIn(("rcpt", ("<C@Example.org>",)), pipeline.calls)
        macros = pipeline.messages[0].connection.macros
        self.assertEqual(macros.get("{daemon_name}"), "smtpd")
        self.assertIsNone(macros.get("v"))  # not in the list rmilter asked for
        self.assertEqual(macros.get("{auth_authen}"), "alice")
        self.assertEqual(macros.get("i"), "4ABCDEF")
        self.assertEqual(pipeline.messages[0].envelope_from, "a@example.net")

    def test_every_step_answered_without_nr(self) -> None:
        """Offering no NR bits, every step's reply is recorded."""
        setup, _ = rmilter_setup(offer=NO_NR)
        result = setup.run(setup.client.send_message(MessageSpec()))
        self.assertEqual([s.stage for s in result.steps],
                         ["connect", "helo", "mail", "rcpt", "data"] + ["header"] * 4 + ["eoh", "body", "eom"])
        self.assertIsInstance(result.reply("data"), codec.Continue)
        self.assertEqual(len(result.replies("header")), 4)

    def test_modifications_collected(self) -> None:
        """Every modification before the final reply is in the result, by kind."""
        pipeline = FakePipeline()
        pipeline.answers["eom"] = v.Verdict(v.Action.ACCEPT, edits=(
            v.AddHeader(name="X-Spam", value="yes"), v.InsertHeader(index=0, name="DKIM-Signature", value="v=1"),
            v.ChangeHeader(name="Subject", index=1, value="new"), v.AddRecipient(address="<t@x>"), v.DeleteRecipient(address="<b@x>"),
            v.ChangeFrom(address="<n@x>"), v.ReplaceBody(data=b"new body"), v.Quarantine(reason="held")))
        setup, _ = rmilter_setup(pipeline)
        result = setup.run(setup.client.send_message())
        self.assertEqual(result.added_headers, [("X-Spam", "yes")])
        self.assertEqual(result.inserted_headers, [(0, "DKIM-Signature", "v=1")])
        self.assertEqual(result.changed_headers, [(1, "Subject", "new")])
        self.assertEqual(result.added_recipients, ["<t@x>"])
        self.assertEqual(result.deleted_recipients, ["<b@x>"])
        self.assertEqual(result.new_sender, "<n@x>")
        self.assertEqual(result.replaced_body, b"new body")
        self.assertEqual(result.quarantine_reason, "held")
        self.assertEqual(result.action, "accept")

    def test_reply_code(self) -> None:
        """A REPLYCODE verdict: action by its first digit, the line in reply_text."""
        pipeline = FakePipeline()
        pipeline.answers["eom"] = v.reject("Infected: Eicar-Test-Signature")
        setup, _ = rmilter_setup(pipeline)
        result = setup.run(setup.client.send_message())
        self.assertEqual(result.action, "reject")
        self.assertEqual(result.reply_text, "554 5.7.1 Infected: Eicar-Test-Signature")

    def test_refused_recipient(self) -> None:
        """A tempfailed RCPT is listed; the message goes on with the other recipient."""
        pipeline = FakePipeline(needing=("eom", "rcpt"))
        answers = [v.tempfail("Rate limit exceeded"), v.CONTINUE]
        pipeline.answers["rcpt"] = lambda: answers.pop(0)
        setup, _ = rmilter_setup(pipeline)
        result = setup.run(setup.client.send_message(MessageSpec(recipients=("a@x", "b@x"))))
        self.assertEqual(result.rejected_recipients, ["a@x"])
        self.assertEqual(result.replies("rcpt")[0], codec.ReplyCode("451 4.7.1 Rate limit exceeded"))
        self.assertEqual(result.action, "accept")

    def test_every_recipient_refused(self) -> None:
        """When no recipient is left the message ends at RCPT; no DATA is sent."""
        pipeline = FakePipeline(needing=("eom", "rcpt"))
        pipeline.answers["rcpt"] = v.tempfail("Rate limit exceeded")
        setup, _ = rmilter_setup(pipeline)
        result = setup.run(setup.client.send_message())
        self.assertEqual((result.final_stage, result.action), ("rcpt", "tempfail"))
        self.assertNotIn("data", pipeline.stages())

    def test_several_messages_per_connection(self) -> None:
        """The second message sends ABORT first and no new CONNECT."""
        setup, pipeline = rmilter_setup()
        first = setup.run(setup.client.send_message())
        second = setup.run(setup.client.send_message(MessageSpec(sender="z@example.net")))
        self.assertEqual((first.action, second.action), ("accept", "accept"))
        self.assertEqual(pipeline.stages().count("connect"), 1)
        self.assertEqual([m.envelope_from for m, _ in pipeline.finished], ["sender@example.net", "z@example.net"])

    def test_quit_nc_starts_a_new_session(self) -> None:
        """After quit_nc() the next message sends CONNECT and HELO again, with the new client."""
        setup, pipeline = rmilter_setup()
        setup.run(setup.client.send_message())
        setup.client.quit_nc()
        result = setup.run(setup.client.send_message(MessageSpec(client=ClientSpec(address="198.51.100.1"))))
        self.assertEqual(result.action, "accept")
        self.assertEqual(pipeline.stages().count("connect"), 2)
        self.assertEqual(pipeline.messages[1].connection.client_address, "198.51.100.1")

    def test_close(self) -> None:
        """close() sends ABORT + QUIT and fires when the connection is gone."""
        setup, pipeline = rmilter_setup()
        setup.run(setup.client.send_message())
        closed = setup.client.close()
        setup.flush()
        self.successResultOf(closed)
        self.assertTrue(setup.endpoint.server.transport.disconnecting)

    def test_progress_counted(self) -> None:
        """PROGRESS packets before the verdict are counted, not taken as the answer."""
        pipeline = FakePipeline()
        pending: Deferred = Deferred()
        pipeline.answers["eom"] = pending
        factory = MilterFactory(pipeline, Clock())
        setup = Setup(factory)
        sending = setup.client.send_message()
        setup.flush()
        server = setup.endpoint.server
        server.clock.advance(10)
        server.clock.advance(10)
        setup.flush()
        self.assertNoResult(sending)
        pending.callback(v.ACCEPT)
        setup.flush()
        result = self.successResultOf(sending)
        self.assertEqual((result.action, result.progress), ("accept", 2))

    def test_reply_timeout(self) -> None:
        """A filter that never answers EOM makes send_message fail after the timeout."""
        pipeline = FakePipeline(config=None)
        pipeline.answers["eom"] = Deferred()
        setup, _ = rmilter_setup(pipeline)
        sending = setup.client.send_message()
        setup.flush()
        setup.clock.advance(setup.client.timeout)
        self.failureResultOf(sending, TimeoutError)
        self.assertEqual(setup.client.protocol.waiters, [])


class AgainstScriptedFilterTests(SynchronousTestCase):
    def setup(self, reply: NegotiateReply) -> tuple:
        filt = ScriptedFilter(reply)
        setup = Setup(Factory.forProtocol(lambda: filt))
        return setup, filt

    def kinds(self, filt: ScriptedFilter) -> List[str]:
        return [type(cmd).__name__ for cmd in filt.commands if not isinstance(cmd, codec.Macro)]

    def test_no_steps_are_skipped(self) -> None:
        """NOHDRS, NOBODY, NOEOH, NODATA: those commands are not sent (milterload behaviour)."""
        flags = c.SMFIP_NOHDRS | c.SMFIP_NOBODY | c.SMFIP_NOEOH | c.SMFIP_NODATA
        setup, filt = self.setup(NegotiateReply(6, 0x1D, flags))
        result = setup.run(setup.client.send_message())
        self.assertEqual(result.action, "accept")
        self.assertEqual(self.kinds(filt), ["Negotiate", "Connect", "Helo", "Mail", "Rcpt", "EndOfMessage"])

    def test_no_connect_and_no_helo(self) -> None:
        setup, filt = self.setup(NegotiateReply(6, 0x1D, c.SMFIP_NOCONNECT | c.SMFIP_NOHELO))
        setup.run(setup.client.send_message())
        self.assertEqual(self.kinds(filt)[:3], ["Negotiate", "Mail", "Rcpt"])

    def test_header_leading_space(self) -> None:
        """With HDR_LEADSPC header values keep their leading space."""
        setup, filt = self.setup(NegotiateReply(6, 0x1D, c.SMFIP_HDR_LEADSPC))
        setup.run(setup.client.send_message(MessageSpec(headers=(("Subject", "hi"),))))
        self.assertIn(codec.Header("Subject", " hi"), filt.commands)

    def test_version_2_filter_gets_no_data(self) -> None:
        """DATA exists from protocol version 4 on."""
        setup, filt = self.setup(NegotiateReply(2, 0x1D, 0))
        setup.run(setup.client.send_message())
        self.assertNotIn("Data", self.kinds(filt))

    def test_body_chunks(self) -> None:
        """The body goes in chunks of at most chunk_size bytes, each after its D B macro."""
        setup, filt = self.setup(NegotiateReply(6, 0x1D, 0))
        setup.run(setup.client.send_message(MessageSpec(body=b"x" * 250, chunk_size=100)))
        bodies = [cmd.chunk for cmd in filt.commands if isinstance(cmd, codec.Body)]
        self.assertEqual([len(b) for b in bodies], [100, 100, 50])
        macros = [cmd.stage for cmd in filt.commands if isinstance(cmd, codec.Macro)]
        self.assertEqual(macros.count("B"), 3)

    def test_filter_asking_unoffered_bits_is_refused(self) -> None:
        """A negotiation reply with protocol bits the MTA did not offer fails connect()."""
        filt = ScriptedFilter(NegotiateReply(6, 0x1D, c.SMFIP_NR_HDR))
        clock = Clock()
        endpoint = LoopbackEndpoint(Factory.forProtocol(lambda: filt))
        connecting = MilterClient.connect(clock, endpoint, offer=Negotiate(6, 0x1FF, 0x3F))
        endpoint.pump.flush()  # type: ignore[union-attr]
        self.failureResultOf(connecting, MilterClientError)
