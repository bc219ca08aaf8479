"""The sans-IO milter codec: frames, every command and reply, negotiation, verdict encoding."""
from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from rmilter.milter import codec
from rmilter.milter import constants as c
from rmilter.milter.codec import (
    Abort,
    Accept,
    AddHeaderReply,
    AddRecipientReply,
    AddRecipientParReply,
    Body,
    ChangeFromReply,
    ChangeHeaderReply,
    CommandReader,
    Connect,
    ConnectionFail,
    Continue,
    Data,
    DeleteRecipientReply,
    Discard,
    EndOfHeaders,
    EndOfMessage,
    FrameError,
    Header,
    Helo,
    InsertHeaderReply,
    Macro,
    Mail,
    MalformedPayloadError,
    Negotiate,
    NegotiateReply,
    NegotiationError,
    Progress,
    ProtocolError,
    QuarantineReply,
    Quit,
    QuitNoClose,
    Rcpt,
    Reject,
    ReplaceBodyReply,
    ReplyCode,
    ReplyReader,
    SetSymList,
    Shutdown,
    Skip,
    Tempfail,
    Unknown,
    UnknownCodeError,
)


def frame(code: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload) + 1) + code + payload


def decode_commands(data: bytes, **kwargs: object) -> list:
    reader = CommandReader(**kwargs)  # type: ignore[arg-type]
    reader.receive_data(data)
    return list(reader)


def decode_replies(data: bytes) -> list:
    reader = ReplyReader()
    reader.receive_data(data)
    return list(reader)


#: every command with its exact wire form (SPEC §3.2)
COMMANDS = [
    (Negotiate(6, 0x1FF, 0x1FFFFF), frame(b"O", b"\0\0\0\x06\0\0\x01\xff\0\x1f\xff\xff")),
    (Macro("C", (("j", "mx"), ("{daemon_name}", "smtpd"))), frame(b"D", b"Cj\0mx\0{daemon_name}\0smtpd\0")),
    (Macro("H"), frame(b"D", b"H")),
    (Connect("mail.example.net", "4", 40000, "192.0.2.10"),
     frame(b"C", b"mail.example.net\x004\x9c\x40192.0.2.10\0")),
    (Connect("[2001:db8::1]", "6", 25, "2001:db8::1"), frame(b"C", b"[2001:db8::1]\x006\x00\x192001:db8::1\0")),
    (Connect("localhost", "L", 0, "/var/run/sock"), frame(b"C", b"localhost\0L\0\0/var/run/sock\0")),
    (Connect("unknown", "U"), frame(b"C", b"unknown\0U")),
    (Helo("client.example.net"), frame(b"H", b"client.example.net\0")),
    (Mail(("<a@example.net>", "SIZE=1234", "BODY=8BITMIME")), frame(b"M", b"<a@example.net>\0SIZE=1234\0BODY=8BITMIME\0")),
    (Mail(("<>",)), frame(b"M", b"<>\0")),
    (Rcpt(("<B@Example.org>",)), frame(b"R", b"<B@Example.org>\0")),
    (Data(), frame(b"T")),
    (Header("Subject", "hello\n world"), frame(b"L", b"Subject\0hello\n world\0")),
    (Header("X-Empty", ""), frame(b"L", b"X-Empty\0\0")),
    (EndOfHeaders(), frame(b"N")),
    (Body(b"line\r\n"), frame(b"B", b"line\r\n")),
    (Body(b""), frame(b"B")),
    (EndOfMessage(), frame(b"E")),
    (EndOfMessage(b"last piece\r\n"), frame(b"E", b"last piece\r\n")),
    (Unknown("XYZZY arg"), frame(b"U", b"XYZZY arg\0")),
    (Abort(), frame(b"A")),
    (Quit(), frame(b"Q")),
    (QuitNoClose(), frame(b"K")),
]

#: every reply with its exact wire form (SPEC §3.3)
REPLIES = [
    (Continue(), frame(b"c")),
    (Accept(), frame(b"a")),
    (Reject(), frame(b"r")),
    (Tempfail(), frame(b"t")),
    (Discard(), frame(b"d")),
    (Skip(), frame(b"s")),
    (Progress(), frame(b"p")),
    (Shutdown(), frame(b"4")),
    (ConnectionFail(), frame(b"f")),
    (ReplyCode("451 4.7.1 Rate limit exceeded"), frame(b"y", b"451 4.7.1 Rate limit exceeded\0")),
    (QuarantineReply("suspicious"), frame(b"q", b"suspicious\0")),
    (AddHeaderReply("X-Spam", "yes"), frame(b"h", b"X-Spam\0yes\0")),
    (InsertHeaderReply(0, "DKIM-Signature", "v=1;\n\ta=rsa"), frame(b"i", b"\0\0\0\0DKIM-Signature\0v=1;\n\ta=rsa\0")),
    (ChangeHeaderReply(1, "Subject", ""), frame(b"m", b"\0\0\0\x01Subject\0\0")),
    (AddRecipientReply("<trace@example.org>"), frame(b"+", b"<trace@example.org>\0")),
    (AddRecipientParReply("<x@example.org>", "NOTIFY=NEVER"), frame(b"2", b"<x@example.org>\0NOTIFY=NEVER\0")),
    (DeleteRecipientReply("<B@Example.org>"), frame(b"-", b"<B@Example.org>\0")),
    (ChangeFromReply("<new@example.org>"), frame(b"e", b"<new@example.org>\0")),
    (ChangeFromReply("<new@example.org>", "SIZE=10"), frame(b"e", b"<new@example.org>\0SIZE=10\0")),
    (ReplaceBodyReply(b"new body\r\n"), frame(b"b", b"new body\r\n")),
    (NegotiateReply(6, 0x1D, 0x100), frame(b"O", b"\0\0\0\x06\0\0\0\x1d\0\0\x01\0")),
    (NegotiateReply(6, 0x11D, 0, (SetSymList(0, "j {daemon_name}"), SetSymList(5, "i"))),
     frame(b"O", b"\0\0\0\x06\0\0\x01\x1d\0\0\0\0" + b"\0\0\0\0j {daemon_name}\0" + b"\0\0\0\x05i\0")),
]


class CommandCodingTests(SynchronousTestCase):
    def test_every_command_encodes_to_its_wire_form(self) -> None:
        """Each command class produces the exact SPEC §3.2 frame."""
        for command, wire in COMMANDS:
            self.assertEqual(codec.encode(command), wire, command)

    def test_every_command_decodes_from_its_wire_form(self) -> None:
        """Decoding the wire form gives back an equal command object."""
        for command, wire in COMMANDS:
            self.assertEqual(decode_commands(wire), [command])

    def test_commands_in_one_stream(self) -> None:
        """Back-to-back frames in one read decode in order."""
        stream = b"".join(wire for _, wire in COMMANDS)
        self.assertEqual(decode_commands(stream), [command for command, _ in COMMANDS])

    def test_split_at_every_byte(self) -> None:
        """Whatever the read boundaries, the same events come out (frames spanning reads)."""
        stream = b"".join(wire for _, wire in COMMANDS)
        expected = [command for command, _ in COMMANDS]
        for size in (1, 2, 3, 5, 7, 64):
            reader = CommandReader()
            got = []
            for i in range(0, len(stream), size):
                reader.receive_data(stream[i : i + size])
                got.extend(reader)
            self.assertEqual(got, expected, size)
            self.assertEqual(reader.buffered, 0)

    def test_large_body_frame_across_reads(self) -> None:
        """A 1 MiB body frame arriving in 64 KiB reads is one Body event with every byte."""
        body = bytes(range(256)) * 4096
        wire = codec.encode(Body(body)) + codec.encode(EndOfMessage())
        reader = CommandReader()
        events = []
        for i in range(0, len(wire), 65536):
            reader.receive_data(wire[i : i + 65536])
            events.extend(reader)
        self.assertEqual(events, [Body(body), EndOfMessage()])

    def test_eight_bit_strings_survive(self) -> None:
        """Non-UTF-8 bytes in strings decode (surrogateescape) and re-encode unchanged."""
        wire = frame(b"L", b"Subject\0caf\xe9 \xff\0")
        (header,) = decode_commands(wire)
        self.assertEqual(codec.encode(header), wire)

    def test_macro_stage_may_be_any_letter(self) -> None:
        """MACRO packets for L, B and unknown codes are accepted (SPEC §3.2)."""
        for stage in "LBEZ":
            self.assertEqual(decode_commands(frame(b"D", stage.encode() + b"i\0Q1\0")), [Macro(stage, (("i", "Q1"),))])

    def test_ignored_macro_stages_produce_no_event(self) -> None:
        """D L / D B can be consumed without an event; other MACRO packets still come out."""
        stream = frame(b"D", b"Li\0Q\0") + frame(b"L", b"A\0b\0") + frame(b"D", b"Bi\0Q\0") + frame(b"D", b"Ei\0Q\0")
        events = decode_commands(stream, ignored_macro_stages=b"LB")
        self.assertEqual(events, [Header("A", "b"), Macro("E", (("i", "Q"),))])

    def test_constructors_refuse_nul(self) -> None:
        """Strings travel NUL-terminated, so a NUL inside is refused when the event is built."""
        for make in (
            lambda: Header("A\0", "b"),
            lambda: Helo("x\0y"),
            lambda: Mail(("<a\0@b>",)),
            lambda: Macro("C", (("j", "a\0"),)),
            lambda: Connect("h", "4", 25, "1.2.3.4\0"),
            lambda: AddHeaderReply("X", "a\0"),
            lambda: ReplyCode("451 \0"),
        ):
            self.assertRaises(ValueError, make)

    def test_constructors_refuse_bad_shapes(self) -> None:
        """Families, ports, indexes, stage letters and body pieces are checked when built."""
        self.assertRaises(ValueError, Connect, "h", "X", 0, "a")
        self.assertRaises(ValueError, Connect, "h", "4", 70000, "1.2.3.4")
        self.assertRaises(ValueError, Connect, "h", "4", 25, None)
        self.assertRaises(ValueError, Connect, "h", "U", 25, None)
        self.assertRaises(ValueError, Macro, "CC")
        self.assertRaises(ValueError, InsertHeaderReply, -1, "a", "b")
        self.assertRaises(ValueError, ReplaceBodyReply, b"x" * 65536)
        self.assertRaises(ValueError, Mail, ["<a@b>"])


class ReplyCodingTests(SynchronousTestCase):
    def test_every_reply_encodes_to_its_wire_form(self) -> None:
        """Each reply class produces the exact SPEC §3.3 frame."""
        for reply, wire in REPLIES:
            self.assertEqual(codec.encode(reply), wire, reply)

    def test_every_reply_decodes_from_its_wire_form(self) -> None:
        """The MTA side decodes every reply back to an equal object."""
        for reply, wire in REPLIES:
            self.assertEqual(decode_replies(wire), [reply])

    def test_packet_constants(self) -> None:
        """The pre-framed packets are the encodings of their replies."""
        self.assertEqual(codec.CONTINUE_PACKET, frame(b"c"))
        self.assertEqual(codec.ACCEPT_PACKET, frame(b"a"))
        self.assertEqual(codec.PROGRESS_PACKET, frame(b"p"))
        self.assertEqual(codec.TEMPFAIL_PACKET, frame(b"t"))


class FramingErrorTests(SynchronousTestCase):
    def test_zero_length_frame(self) -> None:
        """L=0 is invalid (SPEC §3.1): FrameError."""
        reader = CommandReader()
        self.assertRaises(FrameError, reader.receive_data, b"\0\0\0\0")

    def test_oversized_frame_refused_before_buffering(self) -> None:
        """A header announcing more than the limit raises at once; no payload byte is stored."""
        reader = CommandReader(max_frame_size=1024)
        error = self.assertRaises(FrameError, reader.receive_data, struct.pack(">I", 1025) + b"B" + b"x" * 60000)
        self.assertIn("1025", str(error))
        self.assertEqual(reader.buffered, 0)
        # and it stays refused: nothing more is buffered
        self.assertRaises(FrameError, reader.receive_data, b"x" * 60000)
        self.assertEqual(reader.buffered, 0)

    def test_oversized_header_split_across_reads(self) -> None:
        """A length header arriving byte by byte is checked as soon as it is complete."""
        reader = CommandReader(max_frame_size=1024)
        reader.receive_data(codec.encode(Abort()) + b"\0\0")
        self.assertRaises(FrameError, reader.receive_data, b"\x10\0B" + b"x" * 5000)
        # the valid frame before it is still delivered, then the error
        self.assertEqual(reader.next_event(), Abort())
        self.assertRaises(FrameError, reader.next_event)
        self.assertEqual(reader.buffered, 0)

    def test_frames_before_the_bad_one_are_kept(self) -> None:
        """Commands before a bad frame in the same read come out before the error."""
        reader = CommandReader(max_frame_size=100)
        data = codec.encode(Helo("a")) + codec.encode(Data()) + struct.pack(">I", 101) + b"B" + b"x" * 100
        self.assertRaises(FrameError, reader.receive_data, data)
        self.assertEqual(reader.buffered, len(codec.encode(Helo("a")) + codec.encode(Data())))
        self.assertEqual(reader.next_event(), Helo("a"))
        self.assertEqual(reader.next_event(), Data())
        self.assertRaises(FrameError, reader.next_event)

    def test_limit_accepts_one_mebibyte(self) -> None:
        """The default limit lets a 1 MiB header through (SPEC §3.8)."""
        value = "x" * (1024 * 1024)
        self.assertEqual(decode_commands(codec.encode(Header("X-Big", value))), [Header("X-Big", value)])

    def test_truncated_frame_waits(self) -> None:
        """A partial frame produces no event until its last byte arrives."""
        wire = codec.encode(Header("Subject", "hello"))
        reader = CommandReader()
        reader.receive_data(wire[:-1])
        self.assertIsNone(reader.next_event())
        self.assertEqual(reader.buffered, len(wire) - 1)
        self.assertEqual(reader.queued_frames, 1)
        reader.receive_data(wire[-1:])
        self.assertEqual(reader.next_event(), Header("Subject", "hello"))
        self.assertEqual(reader.queued_frames, 0)

    def test_queued_frames_counts_waiting_input(self) -> None:
        """queued_frames tells how many frames wait behind the ones already taken."""
        reader = CommandReader()
        reader.receive_data(codec.encode(Data()) * 3 + codec.encode(Helo("x"))[:3])
        self.assertEqual(reader.queued_frames, 3)
        reader.next_event()
        self.assertEqual(reader.queued_frames, 2)

    def test_unknown_command_code(self) -> None:
        """An unknown code raises UnknownCodeError naming the code (SPEC §3.8)."""
        error = self.assertRaises(UnknownCodeError, decode_commands, frame(b"Z", b"junk"))
        self.assertIn("Z", str(error))

    def test_unknown_reply_code(self) -> None:
        self.assertRaises(UnknownCodeError, decode_replies, frame(b"Z"))

    def test_malformed_payloads(self) -> None:
        """Missing NULs, short integers and odd layouts raise MalformedPayloadError."""
        bad = [
            frame(b"O", b"\0\0\0\x06\0\0"),  # short OPTNEG
            frame(b"D"),  # no stage
            frame(b"D", b"Cj\0mx"),  # no final NUL
            frame(b"D", b"Cj\0"),  # name without value
            frame(b"C", b"host"),  # hostname without NUL
            frame(b"C", b"host\0"),  # no family
            frame(b"C", b"host\0X\0\0a\0"),  # bad family
            frame(b"C", b"host\x004\0"),  # short port
            frame(b"C", b"host\x004\0\x19addr"),  # address without NUL
            frame(b"H", b"helo"),
            frame(b"H", b"a\0b\0"),
            frame(b"M", b"<a@b>"),
            frame(b"L", b"Subject\0"),
            frame(b"L", b"Subject\0a\0b\0"),
            frame(b"U", b"cmd"),
        ]
        for wire in bad:
            self.assertRaises(MalformedPayloadError, decode_commands, wire)
        bad_replies = [
            frame(b"y", b"451 text"),
            frame(b"h", b"X-A\0"),
            frame(b"i", b"\0\0"),
            frame(b"m", b"\0\0\0\x01name\0"),
            frame(b"e", b"a\0b\0c\0"),
            frame(b"O", b"\0\0\0\x06"),
            frame(b"O", b"\0\0\0\x06\0\0\0\x1d\0\0\0\0\0\0"),  # macro list without stage
            frame(b"O", b"\0\0\0\x06\0\0\0\x1d\0\0\0\0\0\0\0\0i"),  # macro list without NUL
            frame(b"b", b"x" * 65536),
        ]
        for wire in bad_replies:
            self.assertRaises(MalformedPayloadError, decode_replies, wire)

    def test_extra_payload_is_ignored_where_libmilter_ignores_it(self) -> None:
        """Commands without payload ignore stray bytes; OPTNEG ignores bytes past its 12."""
        self.assertEqual(decode_commands(frame(b"T", b"junk") + frame(b"A", b"x")), [Data(), Abort()])
        self.assertEqual(decode_commands(frame(b"O", b"\0\0\0\x06\0\0\0\x1d\0\0\0\0extra")), [Negotiate(6, 0x1D, 0)])


# -- property tests --------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)
u32 = st.integers(0, 0xFFFFFFFF)
argv = st.lists(text, max_size=4).map(tuple)

commands = st.one_of(
    st.builds(Negotiate, u32, u32, u32),
    st.builds(Macro, st.characters(max_codepoint=255), st.lists(st.tuples(text, text), max_size=4).map(tuple)),
    st.builds(Connect, text, st.sampled_from("46L"), st.integers(0, 0xFFFF), text),
    st.builds(Connect, text),
    st.builds(Helo, text),
    st.builds(Mail, argv),
    st.builds(Rcpt, argv),
    st.just(Data()),
    st.builds(Header, text, text),
    st.just(EndOfHeaders()),
    st.builds(Body, st.binary(max_size=200)),
    st.builds(EndOfMessage, st.binary(max_size=50)),
    st.builds(Unknown, text),
    st.just(Abort()),
    st.just(Quit()),
    st.just(QuitNoClose()),
)

replies = st.one_of(
    st.sampled_from([Continue(), Accept(), Reject(), Tempfail(), Discard(), Skip(), Progress(), Shutdown(),
                     ConnectionFail()]),
    st.builds(ReplyCode, text),
    st.builds(QuarantineReply, text),
    st.builds(AddHeaderReply, text, text),
    st.builds(InsertHeaderReply, u32, text, text),
    st.builds(ChangeHeaderReply, u32, text, text),
    st.builds(AddRecipientReply, text),
    st.builds(AddRecipientParReply, text, text),
    st.builds(DeleteRecipientReply, text),
    st.builds(ChangeFromReply, text, st.none() | text),
    st.builds(ReplaceBodyReply, st.binary(max_size=200)),
    st.builds(NegotiateReply, u32, u32, u32,
              st.lists(st.builds(SetSymList, u32, text), max_size=3).map(tuple)),
)


class PropertyTests(SynchronousTestCase):
    @given(st.lists(commands, max_size=8), st.integers(1, 50))
    @settings(max_examples=300, deadline=None)
    def test_command_round_trip(self, sent: list, read_size: int) -> None:
        """MTA side encodes, filter side decodes the same commands, whatever the read size."""
        stream = b"".join(codec.encode(command) for command in sent)
        reader = CommandReader()
        got = []
        for i in range(0, len(stream), read_size):
            reader.receive_data(stream[i : i + read_size])
            got.extend(reader)
        self.assertEqual(got, sent)

    @given(st.lists(st.one_of(commands, st.binary(min_size=1, max_size=3000).map(Body),
                              st.sampled_from(["L", "B"]).map(lambda stage: Macro(stage, (("i", "Q1"),)))),
                    max_size=10),
           st.lists(st.integers(1, 4000), max_size=30), st.integers(0, 2))
    @settings(max_examples=300, deadline=None)
    def test_any_split_decodes_the_same_and_a_bad_frame_ends_it(self, sent: list, cuts: list, bad: int) -> None:
        """Reads cut anywhere (frames spanning many pieces, headers split): the same events as
        one read, ignored MACRO stages dropped; a bad length after them (``bad``: 1 zero, 2 over
        the limit) raises once every earlier event is out, and nothing past it is buffered."""
        limit = 4096
        stream = b"".join(codec.encode(command) for command in sent)
        expected = [m for m in sent if not (isinstance(m, Macro) and m.stage in ("L", "B"))]
        tail = b""
        if bad:
            tail = struct.pack(">I", 0 if bad == 1 else limit + 1) + b"Bxyz"
        data = stream + tail
        reader = CommandReader(limit, ignored_macro_stages=b"LB")
        got: list = []
        offsets = sorted({min(cut, len(data)) for cut in cuts} | {len(data)})
        start = 0
        error = None
        for end in offsets:
            try:
                reader.receive_data(data[start:end])
                got.extend(reader)
            except FrameError as e:
                error = e
                break
            start = end
            self.assertLessEqual(reader.buffered, len(stream) + 3)  # at most a bad header's start
        if bad:
            self.assertIsNotNone(error, "the bad header was read but not refused")
            with self.assertRaises(FrameError):
                got.extend(reader)  # the same error again, after the events before it
            self.assertLessEqual(reader.buffered, len(stream))
        else:
            self.assertIsNone(error)
            self.assertEqual(reader.buffered, 0)
        self.assertEqual(got, expected)

    @given(st.lists(replies, max_size=8))
    @settings(max_examples=300, deadline=None)
    def test_reply_round_trip(self, sent: list) -> None:
        """Filter side encodes, MTA side decodes the same replies."""
        self.assertEqual(decode_replies(b"".join(codec.encode(r) for r in sent)), sent)

    @given(st.sampled_from(sorted(codec.COMMAND_DECODERS)), st.binary(max_size=60))
    @settings(max_examples=500, deadline=None)
    def test_any_command_payload_decodes_or_raises_protocol_error(self, code: int, payload: bytes) -> None:
        """No payload makes the decoder raise anything but a ProtocolError; what decodes re-encodes."""
        try:
            (event,) = decode_commands(frame(bytes((code,)), payload))
        except ProtocolError:
            return
        self.assertEqual(decode_commands(codec.encode(event)), [event])

    @given(st.sampled_from(sorted(codec.REPLY_DECODERS)), st.binary(max_size=60))
    @settings(max_examples=500, deadline=None)
    def test_any_reply_payload_decodes_or_raises_protocol_error(self, code: int, payload: bytes) -> None:
        try:
            (event,) = decode_replies(frame(bytes((code,)), payload))
        except ProtocolError:
            return
        self.assertEqual(decode_replies(codec.encode(event)), [event])

    @given(st.binary(max_size=300), st.integers(1, 64))
    @settings(max_examples=500, deadline=None)
    def test_garbage_raises_only_protocol_errors(self, data: bytes, limit: int) -> None:
        """Arbitrary bytes: events or ProtocolError, and the buffer never exceeds the input."""
        reader = CommandReader(max_frame_size=limit)
        try:
            reader.receive_data(data)
            list(reader)
        except ProtocolError:
            pass
        self.assertLessEqual(reader.buffered, len(data))


# -- negotiation (SPEC §3.4, §9 vectors adapted to the bits rmilter requests) -------------------

ALL_NR = c.SMFIP_NR_CONN | c.SMFIP_NR_HELO | c.SMFIP_NR_MAIL | c.SMFIP_NR_RCPT | c.SMFIP_NR_DATA | c.SMFIP_NR_HDR \
    | c.SMFIP_NR_EOH | c.SMFIP_NR_BODY


class NegotiationTests(SynchronousTestCase):
    def test_postfix_offer(self) -> None:
        """v6/0x1FF/0x1FFFFF: every action, NOUNKNOWN, every NR step except EOM, and the macro lists."""
        agreed = codec.negotiate(Negotiate(6, 0x1FF, 0x1FFFFF), stages_needing_replies=("eom",))
        self.assertEqual((agreed.version, agreed.actions, agreed.protocol), (6, 0x1FF, c.SMFIP_NOUNKNOWN | ALL_NR))
        self.assertEqual(
            agreed.reply.macro_lists,
            (
                SetSymList(c.SMFIM_CONNECT, "j {daemon_name}"),
                SetSymList(c.SMFIM_ENVFROM, "i {mail_addr} {client_addr} {client_name} {auth_authen}"),
                SetSymList(c.SMFIM_DATA, "i"),
                SetSymList(c.SMFIM_EOM, "i"),
            ),
        )
        self.assertEqual(agreed.silent_stages, {"connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body"})

    def test_stages_needing_replies_are_not_silenced(self) -> None:
        """With rate limits and DATA greylisting, RCPT and DATA keep their replies."""
        agreed = codec.negotiate(Negotiate(6, 0x1FF, 0x1FFFFF), stages_needing_replies=("eom", "rcpt", "data"))
        self.assertFalse(agreed.protocol & (c.SMFIP_NR_RCPT | c.SMFIP_NR_DATA))
        self.assertTrue(agreed.protocol & c.SMFIP_NR_HDR)
        self.assertNotIn("rcpt", agreed.silent_stages)

    def test_no_reply_steps_switched_off(self) -> None:
        """no_reply_steps=False requests only NOUNKNOWN (the C behaviour)."""
        agreed = codec.negotiate(Negotiate(6, 0x1FF, 0x1FFFFF), no_reply_steps=False)
        self.assertEqual(agreed.protocol, c.SMFIP_NOUNKNOWN)
        self.assertEqual(agreed.silent_stages, frozenset())

    def test_version_2_mta(self) -> None:
        """C vector v2/0x1F/0x7F -> v2, the required and offered actions, no protocol bits."""
        agreed = codec.negotiate(Negotiate(2, 0x1F, 0x7F), stages_needing_replies=("eom",))
        self.assertEqual((agreed.version, agreed.actions, agreed.protocol), (2, 0x1F, 0))
        self.assertEqual(agreed.reply.macro_lists, ())

    def test_minimal_mta(self) -> None:
        """C vector v6/0x1D/0: protocol 0 means 0x3F (v1 defaults) and nothing from it is requested."""
        agreed = codec.negotiate(Negotiate(6, 0x1D, 0), stages_needing_replies=("eom",))
        self.assertEqual((agreed.version, agreed.actions, agreed.protocol), (6, 0x1D, 0))

    def test_newer_mta_gets_version_6(self) -> None:
        self.assertEqual(codec.negotiate(Negotiate(7, 0x1FF, 0x1FFFFF)).version, 6)

    def test_refusals(self) -> None:
        """Version < 2, and actions 0x0F / 0x11 / 0 (read as 0x0F) are refused (SPEC §9)."""
        for offer in (Negotiate(1, 0x1FF, 0x1FFFFF), Negotiate(6, 0x0F, 0x1FFFFF), Negotiate(6, 0x11, 0x1FFFFF),
                      Negotiate(6, 0, 0x1FFFFF)):
            self.assertRaises(NegotiationError, codec.negotiate, offer)

    def test_delrcpt_is_optional(self) -> None:
        """An MTA without DELRCPT is served; DELRCPT is then not requested."""
        agreed = codec.negotiate(Negotiate(6, 0x15, 0))
        self.assertEqual(agreed.actions, 0x15)

    def test_nr_unknown_when_nounknown_is_not_offered(self) -> None:
        """Without NOUNKNOWN the UNKNOWN step becomes silent instead."""
        agreed = codec.negotiate(Negotiate(6, 0x1FF, 0x1FFFFF & ~c.SMFIP_NOUNKNOWN))
        self.assertTrue(agreed.protocol & c.SMFIP_NR_UNKN)
        self.assertFalse(agreed.protocol & c.SMFIP_NOUNKNOWN)

    @given(st.integers(2, 10), u32, u32, st.sets(st.sampled_from(sorted(c.NO_REPLY_BITS) + ["eom"])))
    @settings(max_examples=300, deadline=None)
    def test_never_more_than_offered(self, version: int, actions: int, protocol: int, needing: set) -> None:
        """Whatever the offer: no unoffered action or protocol bit, version <= 6, silent stages only
        outside ``stages_needing_replies``, and refusal exactly when a required action is missing."""
        offered_actions = actions or 0x0F
        offered_protocol = protocol or 0x3F
        try:
            agreed = codec.negotiate(Negotiate(version, actions, protocol), stages_needing_replies=needing)
        except NegotiationError:
            self.assertNotEqual(offered_actions & c.REQUIRED_ACTIONS, c.REQUIRED_ACTIONS)
            return
        self.assertEqual(agreed.actions & ~offered_actions, 0)
        self.assertEqual(agreed.protocol & ~offered_protocol, 0)
        self.assertEqual(agreed.actions & c.REQUIRED_ACTIONS, c.REQUIRED_ACTIONS)
        self.assertEqual(agreed.version, min(6, version))
        self.assertFalse(agreed.silent_stages & needing)
        self.assertFalse(agreed.protocol & (c.SMFIP_SKIP | c.SMFIP_RCPT_REJ | c.SMFIP_HDR_LEADSPC | 0x7F | 0x200))
        self.assertEqual(bool(agreed.reply.macro_lists), bool(offered_actions & c.SMFIF_SETSYMLIST))

