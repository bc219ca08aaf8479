"""The milter session state machine, driven with decoded commands and a FakePipeline (no transport)."""
from __future__ import annotations

import struct
from typing import Any, List, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase

from rmilter import verdict as v
from rmilter.milter import codec
from rmilter.milter import constants as c
from rmilter.milter.codec import (
    Abort,
    Accept,
    AddHeaderReply,
    AddRecipientParReply,
    AddRecipientReply,
    Body,
    ChangeFromReply,
    ChangeHeaderReply,
    DeleteRecipientReply,
    InsertHeaderReply,
    QuarantineReply,
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
    Unknown,
)
from rmilter.milter.session import TRANSITIONS, MilterSession, State, VerdictPackets, client_address, verdict_packets
from rmilter.testing.fakepipeline import FakePipeline

POSTFIX = Negotiate(6, 0x1FF, 0x1FFFFF)
#: an MTA without no-reply steps: every step is answered
OLD_MTA = Negotiate(6, 0x1FF, c.SMFIP_NOUNKNOWN | c.SMFIP_SKIP)
CONTINUE = codec.CONTINUE_PACKET
ACCEPT = codec.ACCEPT_PACKET

ENVELOPE = [
    Macro("C", (("j", "mx.example.org"), ("{daemon_name}", "smtpd"))),
    Connect("mail.example.net", "4", 40000, "192.0.2.10"),
    Helo("mail.example.net"),
    Macro("M", (("{mail_addr}", "a@example.net"),)),
    Mail(("<a@example.net>", "SIZE=10")),
    Rcpt(("<b@example.org>",)),
]
CONTENT = [
    Macro("T", (("i", "4ABCDEF"),)),
    Data(),
    Header("Subject", "hello"),
    EndOfHeaders(),
    Body(b"Hello\r\n"),
    EndOfMessage(),
]


class Recorder:
    """Counts message_started / message_finished like the factory does."""

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0


def make_session(pipeline: Optional[FakePipeline] = None, offer: Negotiate = POSTFIX, **kwargs: Any) -> tuple:
    pipeline = pipeline if pipeline is not None else FakePipeline()
    recorder = Recorder()
    session = MilterSession(
        pipeline,
        message_started=lambda: setattr(recorder, "started", recorder.started + 1),
        message_finished=lambda: setattr(recorder, "finished", recorder.finished + 1),
        **kwargs,
    )
    reply = session.handle(offer)
    assert isinstance(reply, bytes), reply
    return session, pipeline, recorder


def feed(session: MilterSession, commands: List[Any]) -> List[Any]:
    return [session.handle(command) for command in commands]


class NegotiationTests(SynchronousTestCase):
    def test_reply_and_agreed_bits(self) -> None:
        """OPTNEG is answered with the codec's negotiation; the session keeps the agreed bits."""
        session = MilterSession(FakePipeline(needing=("eom", "rcpt")))
        reply = session.handle(POSTFIX)
        expected = codec.negotiate(POSTFIX, stages_needing_replies=("eom", "rcpt"))
        self.assertEqual(reply, codec.encode(expected.reply))
        self.assertEqual(session.actions, 0x1FF)
        self.assertEqual(session.silent_stages, expected.silent_stages)
        self.assertIs(session.state, State.CONNECTING)

    def test_no_reply_steps_off(self) -> None:
        """With no_reply_steps=False nothing is silent."""
        session, _, _ = make_session(no_reply_steps=False)
        self.assertEqual(session.silent_stages, frozenset())

    def test_refused_offer_closes_without_reply(self) -> None:
        """An MTA lacking a required action gets no reply and the connection closes (SPEC §3.4)."""
        session = MilterSession(FakePipeline())
        self.assertIsNone(session.handle(Negotiate(6, 0x0F, 0x1FFFFF)))
        self.assertTrue(session.close_requested)
        self.assertIs(session.state, State.CLOSED)

    def test_command_before_optneg_closes(self) -> None:
        """Nothing can be answered before OPTNEG: the session asks to close."""
        session = MilterSession(FakePipeline())
        self.assertIsNone(session.handle(Helo("x")))
        self.assertTrue(session.close_requested)

    def test_stages_needing_replies_failure_answers_everything(self) -> None:
        """If the pipeline cannot say which stages need replies, every step keeps its reply."""
        pipeline = FakePipeline()
        pipeline.stages_needing_replies = lambda: 1 / 0  # type: ignore[assignment]
        session, _, _ = make_session(pipeline)
        self.assertEqual(session.silent_stages, frozenset())
        self.flushLoggedErrors(ZeroDivisionError)


class MessageFlowTests(SynchronousTestCase):
    def test_full_message_with_no_reply_steps(self) -> None:
        """With Postfix's offer only EOM is answered; the pipeline sees every stage in order."""
        session, pipeline, recorder = make_session()
        replies = feed(session, ENVELOPE + CONTENT)
        self.assertEqual(replies, [None] * 11 + [ACCEPT])
        self.assertEqual(pipeline.stages(),
                         ["connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom", "finish"])
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], v.ACCEPT)])
        self.assertEqual((recorder.started, recorder.finished), (1, 1))
        self.assertIs(session.state, State.CONNECTED)
        self.assertIsNone(session.message)

    def test_every_step_answered_without_no_reply_steps(self) -> None:
        """An MTA without NR bits gets CONTINUE for every command that has a reply."""
        session, _, _ = make_session(offer=OLD_MTA)
        replies = feed(session, ENVELOPE + CONTENT)
        self.assertEqual(replies, [None, CONTINUE, CONTINUE, None, CONTINUE, CONTINUE,
                                   None, CONTINUE, CONTINUE, CONTINUE, CONTINUE, ACCEPT])

    def test_connect_details(self) -> None:
        """CONNECT fills the connection context; the macros of D C are visible at connect."""
        session, pipeline, _ = make_session()
        feed(session, ENVELOPE[:2])
        self.assertEqual(pipeline.calls[0], ("connect", "mail.example.net", "4", "192.0.2.10", 40000))
        self.assertEqual(session.connection.macros.get("{daemon_name}"), "smtpd")
        self.assertEqual(session.connection.macros.get("{j}"), "mx.example.org")

    def test_unix_and_unknown_families(self) -> None:
        """Family L is 127.0.0.1 (B20); family U has no address (SPEC §5.2)."""
        session, _, _ = make_session()
        session.handle(Connect("localhost", "L", 0, "/var/run/x"))
        self.assertEqual(session.connection.client_address, "127.0.0.1")
        session.handle(QuitNoClose())
        session.handle(Connect("unknown", "U"))
        self.assertIsNone(session.connection.client_address)
        self.assertEqual(session.connection.family, "U")

    def test_address_canonical_form(self) -> None:
        """IPv6 addresses are stored in canonical form; Sendmail's IPv6: prefix is removed."""
        self.assertEqual(client_address("6", "2001:DB8:0:0::25"), "2001:db8::25")
        self.assertEqual(client_address("6", "IPv6:2001:db8::1"), "2001:db8::1")
        self.assertEqual(client_address("4", "192.0.2.10"), "192.0.2.10")
        self.assertEqual(client_address("4", "not-an-ip"), "not-an-ip")
        self.assertIsNone(client_address("U", None))

    def test_several_messages_per_connection(self) -> None:
        """MAIL..EOM, ABORT, MAIL..EOM: two messages, each finished once, macros of the first gone."""
        session, pipeline, recorder = make_session()
        feed(session, ENVELOPE + CONTENT + [Abort()])
        replies = feed(session, [Macro("M", (("{mail_addr}", "c@example.net"),)), Mail(("<c@example.net>",)),
                                 Rcpt(("<d@example.org>",))] + CONTENT + [Abort()])
        self.assertEqual(replies[-2:], [ACCEPT, None])
        self.assertEqual(len(pipeline.finished), 2)
        self.assertEqual([m.envelope_from for m in pipeline.messages], ["a@example.net", "c@example.net"])
        self.assertEqual((recorder.started, recorder.finished), (2, 2))

    def test_abort_mid_message_resets(self) -> None:
        """ABORT during a message finishes it with None; the next MAIL starts fresh (B4)."""
        session, pipeline, _ = make_session()
        feed(session, ENVELOPE + [Data(), Header("Subject", "x"), Abort()])
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], None)])
        self.assertIs(session.state, State.CONNECTED)
        feed(session, [Mail(("<e@example.net>",))])
        self.assertEqual(pipeline.messages[1].headers, [])
        self.assertEqual(pipeline.messages[1].recipients, [])

    def test_abort_outside_transaction_is_ignored(self) -> None:
        """ABORT between messages (Postfix sends one after every EOM) gives no reply and no finish."""
        session, pipeline, _ = make_session()
        feed(session, ENVELOPE[:3])
        self.assertIsNone(session.handle(Abort()))
        self.assertIsNone(session.handle(Abort()))
        self.assertEqual(pipeline.finished, [])
        self.assertIs(session.state, State.CONNECTED)

    def test_new_mail_without_abort(self) -> None:
        """A second MAIL finishes the first message with None."""
        session, pipeline, _ = make_session()
        feed(session, ENVELOPE + [Mail(("<x@example.net>",))])
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], None)])
        self.assertIs(session.message, pipeline.messages[1])

    def test_quit_finishes_and_closes(self) -> None:
        """QUIT mid-message finishes it with None and asks to close; macros are cleared."""
        session, pipeline, recorder = make_session()
        feed(session, ENVELOPE)
        self.assertIsNone(session.handle(Quit()))
        self.assertTrue(session.close_requested)
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], None)])
        self.assertIsNone(session.connection.macros.get("j"))
        self.assertEqual(recorder.finished, 1)

    def test_quit_nc_expects_new_connect(self) -> None:
        """QUIT_NC keeps the socket, resets the connection and accepts a new CONNECT without OPTNEG."""
        session, pipeline, _ = make_session()
        feed(session, ENVELOPE)
        old = session.connection
        self.assertIsNone(session.handle(QuitNoClose()))
        self.assertFalse(session.close_requested)
        self.assertIs(session.state, State.CONNECTING)
        self.assertIsNot(session.connection, old)
        self.assertIsNone(session.connection.macros.get("j"))
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], None)])
        replies = feed(session, [Connect("other.example", "4", 1, "198.51.100.7")] + ENVELOPE[2:] + CONTENT)
        self.assertEqual(replies[-1], ACCEPT)
        self.assertEqual(pipeline.messages[1].connection.client_address, "198.51.100.7")

    def test_connection_lost_finishes_message(self) -> None:
        """A connection closed mid-message finishes it with None (SPEC §5.10)."""
        session, pipeline, _ = make_session()
        feed(session, ENVELOPE)
        session.connection_lost()
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], None)])

    def test_connection_lost_while_pipeline_works(self) -> None:
        """Lost during a pending EOM: finish(None) once the pipeline is done, and no reply."""
        pipeline = FakePipeline()
        pending: Deferred = Deferred()
        pipeline.answers["eom"] = pending
        session, _, recorder = make_session(pipeline)
        result = feed(session, ENVELOPE + CONTENT)[-1]
        self.assertIsInstance(result, Deferred)
        session.connection_lost()
        self.assertEqual(pipeline.abandoned, [pipeline.messages[0]])  # its scans are cancelled
        self.assertEqual(pipeline.finished, [])
        pending.callback(v.ACCEPT)
        self.assertIsNone(self.successResultOf(result))
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], None)])
        self.assertEqual(recorder.finished, 1)

    def test_abandoned_stage_ends_quietly(self) -> None:
        """The MessageAbandoned failure of an abandoned stage is no internal error; others still are."""
        for failure, logged in ((v.MessageAbandoned(), 0), (RuntimeError("bug"), 1)):
            pipeline = FakePipeline()
            pending: Deferred = Deferred()
            pipeline.answers["eom"] = pending
            session, _, _ = make_session(pipeline)
            result = feed(session, ENVELOPE + CONTENT)[-1]
            session.connection_lost()
            pending.errback(failure)
            self.assertIsNone(self.successResultOf(result))
            self.assertEqual(pipeline.finished, [(pipeline.messages[0], None)])
            self.assertEqual(len(self.flushLoggedErrors(type(failure))), logged)

    def test_connection_lost_between_stages_abandons_nothing(self) -> None:
        session, pipeline, _ = make_session()
        feed(session, ENVELOPE)
        session.connection_lost()
        self.assertEqual(pipeline.abandoned, [])

    def test_empty_body_chunk(self) -> None:
        """An empty BODY chunk is passed on and answered like any other (B35)."""
        session, pipeline, _ = make_session(offer=OLD_MTA)
        replies = feed(session, ENVELOPE + [Data(), EndOfHeaders(), Body(b""), EndOfMessage()])
        self.assertEqual(replies[-2:], [CONTINUE, ACCEPT])
        self.assertIn(("body", b""), pipeline.calls)

    def test_eob_with_data(self) -> None:
        """An EOB carrying a last piece is BODY then EOM (SPEC §3.2)."""
        session, pipeline, _ = make_session()
        replies = feed(session, ENVELOPE + [EndOfMessage(b"tail\r\n")])
        self.assertEqual(replies[-1], ACCEPT)
        self.assertEqual(pipeline.stages()[-3:], ["body", "eom", "finish"])
        self.assertIn(("body", b"tail\r\n"), pipeline.calls)

    def test_eob_with_data_body_failure(self) -> None:
        """If that last piece cannot be stored, EOM is not run and the answer is the body's verdict."""
        pipeline = FakePipeline()
        pipeline.answers["body"] = v.BARE_TEMPFAIL
        session, _, _ = make_session(pipeline)
        replies = feed(session, ENVELOPE + [EndOfMessage(b"tail")])
        self.assertEqual(replies[-1], codec.TEMPFAIL_PACKET)
        self.assertNotIn("eom", pipeline.stages())
        self.assertEqual(pipeline.finished[-1][1], v.BARE_TEMPFAIL)

    def test_message_without_data_headers_or_body(self) -> None:
        """MAIL, RCPT, EOM (an MTA with NODATA and no content) still ends in a verdict."""
        session, pipeline, _ = make_session()
        replies = feed(session, ENVELOPE + [EndOfMessage()])
        self.assertEqual(replies[-1], ACCEPT)


class VerdictTests(SynchronousTestCase):
    def test_rcpt_tempfail_keeps_the_message(self) -> None:
        """A refused recipient is answered, the message goes on (SPEC §5.5)."""
        pipeline = FakePipeline(needing=("eom", "rcpt"))
        answers = [v.tempfail("Rate limit exceeded"), v.CONTINUE]
        pipeline.answers["rcpt"] = lambda: answers.pop(0)
        session, _, _ = make_session(pipeline)
        replies = feed(session, ENVELOPE + [Rcpt(("<c@example.org>",))] + CONTENT)
        self.assertEqual(replies[5], codec.encode(codec.ReplyCode("451 4.7.1 Rate limit exceeded")))
        self.assertEqual(replies[6], CONTINUE)
        self.assertEqual(replies[-1], ACCEPT)
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], v.ACCEPT)])

    def test_data_tempfail_ends_the_message(self) -> None:
        """A non-CONTINUE at DATA is sent and finishes the message with that verdict."""
        pipeline = FakePipeline(needing=("eom", "data"))
        greylisted = v.tempfail("Try again later")
        pipeline.answers["data"] = greylisted
        session, _, recorder = make_session(pipeline)
        replies = feed(session, ENVELOPE + CONTENT[:2])
        self.assertEqual(replies[-1], codec.encode(codec.ReplyCode("451 4.7.1 Try again later")))
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], greylisted)])
        self.assertIs(session.state, State.CONNECTED)
        # Postfix then sends ABORT: ignored, nothing finished twice
        session.handle(Abort())
        self.assertEqual(len(pipeline.finished), 1)
        self.assertEqual(recorder.finished, 1)

    def test_verdict_at_silent_stage_is_given_at_the_next_answered_step(self) -> None:
        """A BODY failure under NR_BODY is owed: EOM answers it without calling pipeline.eom."""
        pipeline = FakePipeline()
        pipeline.answers["body"] = v.BARE_TEMPFAIL
        session, _, _ = make_session(pipeline)
        replies = feed(session, ENVELOPE + CONTENT[:-1] + [Body(b"more"), EndOfMessage()])
        self.assertEqual(replies[-3:], [None, None, codec.TEMPFAIL_PACKET])
        self.assertEqual(pipeline.stages().count("body"), 1)
        self.assertNotIn("eom", pipeline.stages())
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], v.BARE_TEMPFAIL)])

    def test_owed_verdict_refuses_each_answered_recipient(self) -> None:
        """Owed from a silent MAIL, the verdict refuses every answered RCPT and ends the message at DATA."""
        pipeline = FakePipeline(needing=("eom", "rcpt", "data"))
        pipeline.answers["mail"] = v.BARE_TEMPFAIL
        session, _, _ = make_session(pipeline)
        replies = feed(session, ENVELOPE + [Rcpt(("<x@y>",)), Data()])
        self.assertEqual(replies[-3:], [codec.TEMPFAIL_PACKET, codec.TEMPFAIL_PACKET, codec.TEMPFAIL_PACKET])
        self.assertNotIn("rcpt", pipeline.stages())
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], v.BARE_TEMPFAIL)])

    def test_mail_reject_when_answered(self) -> None:
        """With MAIL answered, a MAIL verdict ends the message at once."""
        pipeline = FakePipeline()
        pipeline.answers["mail"] = v.Verdict(v.Action.REJECT)
        session, _, _ = make_session(pipeline, offer=OLD_MTA)
        replies = feed(session, ENVELOPE[:5])
        self.assertEqual(replies[-1], codec.REJECT_PACKET)
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], v.Verdict(v.Action.REJECT))])

    def test_connect_reject(self) -> None:
        """A CONNECT verdict other than CONTINUE is sent when CONNECT is answered."""
        pipeline = FakePipeline()
        pipeline.answers["connect"] = v.Verdict(v.Action.REJECT)
        session, _, _ = make_session(pipeline, offer=OLD_MTA)
        self.assertEqual(feed(session, ENVELOPE[:2])[-1], codec.REJECT_PACKET)

    def test_silent_connect_verdict_is_not_sent(self) -> None:
        """Under NR_CONN nothing may be sent for CONNECT, whatever the pipeline says."""
        pipeline = FakePipeline()
        pipeline.answers["connect"] = v.Verdict(v.Action.REJECT)
        session, _, _ = make_session(pipeline)
        self.assertIsNone(feed(session, ENVELOPE[:2])[-1])

    def test_modifications_sent_only_when_negotiated(self) -> None:
        """EOM edits go out for negotiated actions only; the verdict comes last, in the same bytes."""
        pipeline = FakePipeline()
        pipeline.answers["eom"] = v.Verdict(v.Action.ACCEPT, edits=(v.AddHeader(name="X-A", value="1"), v.ChangeFrom(address="<n@x>")))
        session, _, _ = make_session(pipeline, offer=Negotiate(6, 0x1D, 0))
        data = feed(session, ENVELOPE + CONTENT)[-1]
        reader = codec.ReplyReader()
        reader.receive_data(data)
        self.assertEqual(list(reader), [codec.AddHeaderReply("X-A", "1"), codec.Accept()])

    def test_pipeline_exception_is_bare_tempfail(self) -> None:
        """A synchronous pipeline error is logged and answered with a bare TEMPFAIL."""
        pipeline = FakePipeline()
        pipeline.answers["header"] = RuntimeError("boom")
        session, _, _ = make_session(pipeline, offer=OLD_MTA)
        replies = feed(session, ENVELOPE + CONTENT[:3])
        self.assertEqual(replies[-1], codec.TEMPFAIL_PACKET)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_pipeline_deferred_failure_is_bare_tempfail(self) -> None:
        """A failed pipeline Deferred at EOM gives a bare TEMPFAIL and finishes the message."""
        pipeline = FakePipeline()
        pipeline.answers["eom"] = lambda: fail(ValueError("backend exploded"))
        session, _, _ = make_session(pipeline)
        replies = feed(session, ENVELOPE + CONTENT)
        self.assertEqual(replies[-1], codec.TEMPFAIL_PACKET)
        self.assertEqual(pipeline.finished[-1][1], v.BARE_TEMPFAIL)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_pipeline_returning_no_verdict_is_bare_tempfail(self) -> None:
        """A pipeline bug returning None instead of a Verdict is answered with a bare TEMPFAIL."""
        pipeline = FakePipeline(needing=("eom", "rcpt"))
        pipeline.answers["rcpt"] = lambda: None
        pipeline.answers["eom"] = lambda: "accept"
        session, _, _ = make_session(pipeline)
        replies = feed(session, ENVELOPE + CONTENT)
        self.assertEqual(replies[5], codec.TEMPFAIL_PACKET)
        self.assertEqual(replies[-1], codec.TEMPFAIL_PACKET)
        self.assertEqual(pipeline.finished[-1][1], v.BARE_TEMPFAIL)

    def test_mail_exception(self) -> None:
        """pipeline.mail raising: bare TEMPFAIL, no message in flight, the session goes on."""
        pipeline = FakePipeline()
        pipeline.answers["mail"] = RuntimeError("no")
        session, _, recorder = make_session(pipeline, offer=OLD_MTA)
        self.assertEqual(feed(session, ENVELOPE[:5])[-1], codec.TEMPFAIL_PACKET)
        self.assertIsNone(session.message)
        self.assertEqual(recorder.started, 0)
        self.flushLoggedErrors(RuntimeError)

    def test_pending_deferred(self) -> None:
        """A pipeline Deferred that has not fired is returned; it fires with the reply bytes."""
        pipeline = FakePipeline(needing=("eom", "rcpt"))
        pending: Deferred = Deferred()
        pipeline.answers["rcpt"] = pending
        session, _, _ = make_session(pipeline)
        result = feed(session, ENVELOPE)[-1]
        self.assertEqual(session.waiting_stage, "rcpt")
        self.assertTrue(session.busy)
        self.assertNoResult(result)
        pending.callback(v.CONTINUE)
        self.assertEqual(self.successResultOf(result), CONTINUE)
        self.assertIsNone(session.waiting_stage)


class UnexpectedCommandTests(SynchronousTestCase):
    def test_header_before_mail(self) -> None:
        """HEADER outside a message is answered CONTINUE, the pipeline is not called (SPEC §3.8)."""
        session, pipeline, _ = make_session(offer=OLD_MTA)
        feed(session, ENVELOPE[:3])
        self.assertEqual(session.handle(Header("Subject", "x")), CONTINUE)
        self.assertEqual(session.handle(EndOfMessage()), CONTINUE)
        self.assertNotIn("header", pipeline.stages())
        self.assertIs(session.state, State.CONNECTED)

    def test_unexpected_silent_step_stays_silent(self) -> None:
        """An unexpected command of a no-reply stage gets no answer."""
        session, _, _ = make_session()
        feed(session, ENVELOPE[:3])
        self.assertIsNone(session.handle(Header("Subject", "x")))

    def test_rcpt_after_data(self) -> None:
        """RCPT after DATA is unexpected: CONTINUE, the message goes on."""
        session, pipeline, _ = make_session(offer=OLD_MTA)
        feed(session, ENVELOPE + [Data()])
        self.assertEqual(session.handle(Rcpt(("<late@x>",))), CONTINUE)
        self.assertEqual(pipeline.stages().count("rcpt"), 1)
        self.assertEqual(feed(session, CONTENT[2:])[-1], ACCEPT)

    def test_unknown_command(self) -> None:
        """UNKNOWN is answered CONTINUE unless silenced."""
        session, _, _ = make_session(offer=OLD_MTA)
        feed(session, ENVELOPE[:3])
        self.assertEqual(session.handle(Unknown("XYZ")), CONTINUE)

    def test_second_optneg_starts_over(self) -> None:
        """A new OPTNEG mid-message finishes the message and negotiates again."""
        session, pipeline, _ = make_session()
        feed(session, ENVELOPE)
        self.assertIsInstance(session.handle(POSTFIX), bytes)
        self.assertEqual(pipeline.finished, [(pipeline.messages[0], None)])
        self.assertIs(session.state, State.CONNECTING)

    def test_transition_table_is_data(self) -> None:
        """Every state lists its allowed commands; message commands only in message states."""
        self.assertEqual(set(TRANSITIONS), set(State))
        self.assertNotIn(Rcpt, TRANSITIONS[State.CONNECTED])
        self.assertIn(Rcpt, TRANSITIONS[State.ENVELOPE])
        self.assertEqual(TRANSITIONS[State.BODY][EndOfMessage], State.CONNECTED)
        self.assertEqual(TRANSITIONS[State.CLOSED], {})

    @given(st.lists(st.sampled_from(ENVELOPE + CONTENT + [Abort(), QuitNoClose(), Quit(), Unknown("x"),
                                                          Header("A", "b"), Body(b"x"), POSTFIX, OLD_MTA]),
                    max_size=40),
           st.sampled_from([POSTFIX, OLD_MTA]))
    @settings(max_examples=300, deadline=None)
    def test_any_command_order(self, commands: list, offer: Negotiate) -> None:
        """Commands in any order never raise, and every message is finished exactly once."""
        session, pipeline, recorder = make_session(offer=offer)
        for command in commands:
            out = session.handle(command)
            self.assertTrue(out is None or isinstance(out, bytes), out)
        session.connection_lost()
        finished = [id(msg) for msg, _ in pipeline.finished]
        self.assertEqual(sorted(finished), sorted(id(m) for m in pipeline.messages))
        self.assertEqual(recorder.started, recorder.finished)


# -- the domain's verdicts as milter packets ---------------------------------------------------

EVERY_ACTION = 0x1FF


def frame(code: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload) + 1) + code + payload


def decode_replies(data: bytes) -> list:
    reader = codec.ReplyReader()
    reader.receive_data(data)
    return list(reader)


class VerdictPacketTests(SynchronousTestCase):
    def packets(self, verdict: v.Verdict, *, at_eom: bool = True, actions: int = EVERY_ACTION) -> VerdictPackets:
        return verdict_packets(verdict, at_eom=at_eom, actions=actions)

    def test_plain_verdicts(self) -> None:
        """CONTINUE, ACCEPT, DISCARD and bare REJECT/TEMPFAIL are one packet each."""
        self.assertEqual(self.packets(v.CONTINUE).data, frame(b"c"))
        self.assertEqual(self.packets(v.ACCEPT).data, frame(b"a"))
        self.assertEqual(self.packets(v.Verdict(v.Action.DISCARD)).data, frame(b"d"))
        self.assertEqual(self.packets(v.BARE_TEMPFAIL).data, frame(b"t"))
        self.assertEqual(self.packets(v.Verdict(v.Action.REJECT)).data, frame(b"r"))

    def test_reply_code(self) -> None:
        """A verdict with a usable reply becomes REPLYCODE with the single line (SPEC §3.7)."""
        self.assertEqual(self.packets(v.tempfail("Rate limit exceeded")).data,
                         frame(b"y", b"451 4.7.1 Rate limit exceeded\0"))
        self.assertEqual(self.packets(v.reject("Infected: Eicar")).data, frame(b"y", b"554 5.7.1 Infected: Eicar\0"))

    def test_reply_text_sanitised(self) -> None:
        """CR/LF from rspamd become spaces: the reply stays one line."""
        data = self.packets(v.reject("bad\r\nInjected: header")).data
        self.assertEqual(data, frame(b"y", b"554 5.7.1 bad  Injected: header\0"))

    def test_unusable_reply_falls_back_to_bare_verdict(self) -> None:
        """A reply whose class disagrees with the verdict, or empty text, gives bare r/t."""
        wrong_class = v.Verdict(v.Action.REJECT, v.SmtpReply("451", "4.7.1", "x"))
        self.assertEqual(self.packets(wrong_class).data, frame(b"r"))
        empty = v.Verdict(v.Action.TEMPFAIL, v.SmtpReply("451", "4.7.1", "\r\n"))
        self.assertEqual(self.packets(empty).data, frame(b"t"))

    def test_edits_at_eom_before_the_verdict(self) -> None:
        """Negotiated edits become modification packets, in order, then the verdict; one bytes object."""
        verdict = v.Verdict(v.Action.ACCEPT, edits=(
            v.AddHeader(name="X-Spam", value="yes"),
            v.InsertHeader(index=0, name="DKIM-Signature", value="v=1"),
            v.ChangeHeader(name="Subject", index=1, value="***SPAM*** hi"),
            v.AddRecipient(address="<trace@example.org>"),
            v.AddRecipient(address="<x@example.org>", esmtp_args="NOTIFY=NEVER"),
            v.DeleteRecipient(address="<b@example.org>"),
            v.ChangeFrom(address="<new@example.org>"),
            v.Quarantine(reason="held"),
        ))
        out = self.packets(verdict)
        self.assertEqual(out.unsent, ())
        self.assertEqual(decode_replies(out.data), [
            AddHeaderReply("X-Spam", "yes"),
            InsertHeaderReply(0, "DKIM-Signature", "v=1"),
            ChangeHeaderReply(1, "Subject", "***SPAM*** hi"),
            AddRecipientReply("<trace@example.org>"),
            AddRecipientParReply("<x@example.org>", "NOTIFY=NEVER"),
            DeleteRecipientReply("<b@example.org>"),
            ChangeFromReply("<new@example.org>"),
            QuarantineReply("held"),
            Accept(),
        ])

    def test_body_replacement_in_pieces(self) -> None:
        """A new body goes out in REPLBODY pieces of at most 65535 bytes."""
        body = b"x" * 150000
        out = self.packets(v.Verdict(v.Action.ACCEPT, edits=(v.ReplaceBody(data=body),)))
        replies = decode_replies(out.data)
        self.assertEqual([len(r.chunk) for r in replies[:-1]], [65535, 65535, 18930])
        self.assertEqual(b"".join(r.chunk for r in replies[:-1]), body)

    def test_edits_not_negotiated_are_dropped(self) -> None:
        """Only negotiated actions are sent; the rest come back as unsent with the reason."""
        verdict = v.Verdict(v.Action.ACCEPT, edits=(
            v.AddHeader(name="X-A", value="1"), v.ChangeFrom(address="<n@x>"), v.AddRecipient(address="<r@x>", esmtp_args="A=B"), v.ReplaceBody(data=b"b"),
        ))
        out = self.packets(verdict, actions=c.SMFIF_ADDHDRS | c.SMFIF_CHGHDRS | c.SMFIF_ADDRCPT)
        self.assertEqual(decode_replies(out.data), [AddHeaderReply("X-A", "1"), Accept()])
        self.assertEqual([type(e) for e, _ in out.unsent], [v.ChangeFrom, v.AddRecipient, v.ReplaceBody])
        self.assertIn("not negotiated", out.unsent[0][1])

    def test_edits_outside_eom_are_dropped(self) -> None:
        """Modification packets are only legal in reply to EOB (SPEC §3.8)."""
        out = self.packets(v.Verdict(v.Action.CONTINUE, edits=(v.AddHeader(name="X-A", value="1"),)), at_eom=False)
        self.assertEqual(out.data, frame(b"c"))
        self.assertEqual(len(out.unsent), 1)

    def test_edits_dropped_when_not_delivered(self) -> None:
        """A REJECT is followed by nothing: its queued edits are not sent (SPEC §5.9 allows it)."""
        out = self.packets(v.Verdict(v.Action.REJECT, v.SmtpReply("554", "5.7.1", "no"), (v.AddHeader(name="X", value="1"),)))
        self.assertEqual(out.data, frame(b"y", b"554 5.7.1 no\0"))
        self.assertEqual(len(out.unsent), 1)

    def test_unencodable_edit_is_dropped(self) -> None:
        """A header value with NUL cannot travel; it is reported, the verdict still goes out."""
        out = self.packets(v.Verdict(v.Action.ACCEPT, edits=(v.AddHeader(name="X", value="a\0b"), v.AddHeader(name="Y", value="ok"))))
        self.assertEqual(decode_replies(out.data), [AddHeaderReply("Y", "ok"), Accept()])
        self.assertEqual(len(out.unsent), 1)
