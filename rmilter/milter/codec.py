"""The milter wire format, sans-IO (SPEC §3): frames, commands, replies, negotiation.

Nothing here touches a socket, a clock or a logger (h11 / wsproto style):

- ``CommandReader`` (filter side) and ``ReplyReader`` (MTA side) are fed bytes with
  ``receive_data`` and hand back one typed event per frame from ``next_event``.
  The receive buffer is the bytes last received, or a ``bytearray`` plus an offset
  when a frame spans reads; a frame header announcing a length of 0 or above the
  limit raises ``FrameError`` before any of that frame's payload is stored.
- Every command (``Negotiate`` ... ``QuitNoClose``) and every reply (``Continue`` ...
  ``NegotiateReply``) is a small frozen class carrying its wire ``code``;
  ``encode(event)`` gives the frame.  Both directions exist so the test MTA in
  ``rmilter.testing.mta`` and the property tests share this code.
- ``negotiate`` is SPEC §3.4 as a pure function.

The codec imports nothing outside ``rmilter.milter``: turning the domain's verdicts and edits
into these packets is ``rmilter.milter.session``'s job.
"""
from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Collection, Deque, Dict, List, Mapping, Optional, Tuple, Union

from rmilter.milter import constants as c

# -- errors -------------------------------------------------------------------------------


class ProtocolError(Exception):
    """The peer broke the milter protocol; the connection cannot go on."""


class FrameError(ProtocolError):
    """A frame length of 0 or above the limit (SPEC §3.1, §3.8)."""


class UnknownCodeError(ProtocolError):
    """A command or reply code this side does not know (libmilter closes, SPEC §3.8)."""


class MalformedPayloadError(ProtocolError):
    """A payload that does not have the layout its code requires (missing NUL, short ints)."""


class NegotiationError(ProtocolError):
    """The MTA's OPTNEG offer is not enough for rmilter (SPEC §3.4): close without reply."""


# -- framing ------------------------------------------------------------------------------

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_OPTNEG = struct.Struct(">III")
_FRAME_HEADER = struct.Struct(">Ic")
_MACRO_CODE = c.SMFIC_MACRO[0]

#: the default limit for inbound frames (SPEC §3.8 asks for at least 1 MiB)
DEFAULT_MAX_FRAME_SIZE = 2 * 1024 * 1024
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"  # any byte string from the MTA survives decode + encode unchanged


def frame(code: bytes, payload: bytes = b"") -> bytes:
    """One packet: u32 length (code byte included), code, payload (SPEC §3.1)."""
    return _FRAME_HEADER.pack(len(payload) + 1, code) + payload


def _text(value: str) -> bytes:
    return value.encode(_ENCODING, _ERRORS)


def _cstr(value: str) -> bytes:
    return value.encode(_ENCODING, _ERRORS) + b"\0"


def _check_cstr(owner: object, *values: Optional[str]) -> None:
    """Strings travel NUL-terminated, so they cannot contain NUL (validated when built)."""
    for value in values:
        if value is not None and "\0" in value:
            raise ValueError("%s: NUL byte in %r" % (type(owner).__name__, value))


# -- commands (MTA to filter, SPEC §3.2) ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Negotiate:
    """OPTNEG: the MTA's protocol version and everything it can do."""

    code: ClassVar[bytes] = c.SMFIC_OPTNEG
    version: int
    actions: int
    protocol: int

    def payload(self) -> bytes:
        return _OPTNEG.pack(self.version, self.actions, self.protocol)


@dataclass(frozen=True, slots=True)
class Macro:
    """MACRO: ``name=value`` pairs for the command with code ``stage`` that follows."""

    code: ClassVar[bytes] = c.SMFIC_MACRO
    stage: str  # one character: the command code the macros belong to ("C", "M", "L", ...)
    macros: Tuple[Tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if len(self.stage) != 1 or ord(self.stage) > 0xFF:
            raise ValueError("Macro: stage must be one byte, not %r" % (self.stage,))
        for name, value in self.macros:
            _check_cstr(self, name, value)

    def payload(self) -> bytes:
        return self.stage.encode("latin-1") + b"".join(_cstr(name) + _cstr(value) for name, value in self.macros)


@dataclass(frozen=True, slots=True)
class Connect:
    """CONNECT: the SMTP client (family ``U`` carries no port and no address)."""

    code: ClassVar[bytes] = c.SMFIC_CONNECT
    hostname: str
    family: str = c.SMFIA_UNKNOWN
    port: int = 0
    address: Optional[str] = None

    def __post_init__(self) -> None:
        if self.family not in c.FAMILIES:
            raise ValueError("Connect: unknown family %r" % (self.family,))
        if (self.family == c.SMFIA_UNKNOWN) != (self.address is None):
            raise ValueError("Connect: family %r with address %r" % (self.family, self.address))
        if self.family == c.SMFIA_UNKNOWN and self.port:
            raise ValueError("Connect: family U carries no port")
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError("Connect: port %r out of range" % (self.port,))
        _check_cstr(self, self.hostname, self.address)

    def payload(self) -> bytes:
        head = _cstr(self.hostname) + self.family.encode("ascii")
        if self.family == c.SMFIA_UNKNOWN:
            return head
        assert self.address is not None
        return head + _U16.pack(self.port) + _cstr(self.address)


@dataclass(frozen=True, slots=True)
class Helo:
    code: ClassVar[bytes] = c.SMFIC_HELO
    helo: str

    def __post_init__(self) -> None:
        _check_cstr(self, self.helo)

    def payload(self) -> bytes:
        return _cstr(self.helo)


def _check_argv(owner: object, argv: Tuple[str, ...]) -> None:
    if type(argv) is not tuple:
        raise ValueError("%s: argv must be a tuple" % (type(owner).__name__,))
    _check_cstr(owner, *argv)


@dataclass(frozen=True, slots=True)
class Mail:
    """MAIL: argv[0] is the sender as the client wrote it, then ESMTP parameters."""

    code: ClassVar[bytes] = c.SMFIC_MAIL
    argv: Tuple[str, ...]

    def __post_init__(self) -> None:
        _check_argv(self, self.argv)

    def payload(self) -> bytes:
        return b"".join(_cstr(arg) for arg in self.argv)


@dataclass(frozen=True, slots=True)
class Rcpt:
    """RCPT: argv[0] is the recipient as the client wrote it, then ESMTP parameters."""

    code: ClassVar[bytes] = c.SMFIC_RCPT
    argv: Tuple[str, ...]

    def __post_init__(self) -> None:
        _check_argv(self, self.argv)

    def payload(self) -> bytes:
        return b"".join(_cstr(arg) for arg in self.argv)


@dataclass(frozen=True, slots=True)
class Data:
    code: ClassVar[bytes] = c.SMFIC_DATA

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Header:
    """HEADER: one header; the value lost one leading space unless HDR_LEADSPC (SPEC §3.6)."""

    code: ClassVar[bytes] = c.SMFIC_HEADER
    name: str
    value: str

    def __post_init__(self) -> None:
        _check_cstr(self, self.name, self.value)

    def payload(self) -> bytes:
        return _cstr(self.name) + _cstr(self.value)


@dataclass(frozen=True, slots=True)
class EndOfHeaders:
    code: ClassVar[bytes] = c.SMFIC_EOH

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Body:
    """BODY: a piece of the body, CRLF line ends; may be empty (B35)."""

    code: ClassVar[bytes] = c.SMFIC_BODY
    chunk: bytes

    def payload(self) -> bytes:
        return self.chunk


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """BODYEOB: the end of the message; Sendmail may attach a last body piece (SPEC §3.2)."""

    code: ClassVar[bytes] = c.SMFIC_BODYEOB
    chunk: bytes = b""

    def payload(self) -> bytes:
        return self.chunk


@dataclass(frozen=True, slots=True)
class Unknown:
    """UNKNOWN: an SMTP command the MTA did not recognise."""

    code: ClassVar[bytes] = c.SMFIC_UNKNOWN
    command: str

    def __post_init__(self) -> None:
        _check_cstr(self, self.command)

    def payload(self) -> bytes:
        return _cstr(self.command)


@dataclass(frozen=True, slots=True)
class Abort:
    """ABORT: the transaction is over (RSET, rejection, or after every EOM with Postfix)."""

    code: ClassVar[bytes] = c.SMFIC_ABORT

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Quit:
    code: ClassVar[bytes] = c.SMFIC_QUIT

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class QuitNoClose:
    """QUIT_NC: the SMTP session is over, the socket stays; a new CONNECT follows."""

    code: ClassVar[bytes] = c.SMFIC_QUIT_NC

    def payload(self) -> bytes:
        return b""


Command = Union[
    Negotiate, Macro, Connect, Helo, Mail, Rcpt, Data, Header, EndOfHeaders, Body, EndOfMessage, Unknown, Abort,
    Quit, QuitNoClose,
]

# -- replies (filter to MTA, SPEC §3.3) -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Continue:
    code: ClassVar[bytes] = c.SMFIR_CONTINUE

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Accept:
    code: ClassVar[bytes] = c.SMFIR_ACCEPT

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Reject:
    code: ClassVar[bytes] = c.SMFIR_REJECT

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Tempfail:
    code: ClassVar[bytes] = c.SMFIR_TEMPFAIL

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Discard:
    code: ClassVar[bytes] = c.SMFIR_DISCARD

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class ReplyCode:
    """REPLYCODE: a final verdict with its SMTP reply line (SPEC §3.7)."""

    code: ClassVar[bytes] = c.SMFIR_REPLYCODE
    text: str  # "451 4.7.1 Rate limit exceeded"

    def __post_init__(self) -> None:
        _check_cstr(self, self.text)

    def payload(self) -> bytes:
        return _cstr(self.text)


@dataclass(frozen=True, slots=True)
class Skip:
    """SKIP: no more body chunks, please (only if the MTA offered SMFIP_SKIP)."""

    code: ClassVar[bytes] = c.SMFIR_SKIP

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Progress:
    """PROGRESS: still working; resets the MTA's timeout for the pending command."""

    code: ClassVar[bytes] = c.SMFIR_PROGRESS

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class Shutdown:
    code: ClassVar[bytes] = c.SMFIR_SHUTDOWN

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class ConnectionFail:
    code: ClassVar[bytes] = c.SMFIR_CONN_FAIL

    def payload(self) -> bytes:
        return b""


@dataclass(frozen=True, slots=True)
class QuarantineReply:
    code: ClassVar[bytes] = c.SMFIR_QUARANTINE
    reason: str

    def __post_init__(self) -> None:
        _check_cstr(self, self.reason)

    def payload(self) -> bytes:
        return _cstr(self.reason)


@dataclass(frozen=True, slots=True)
class AddHeaderReply:
    """ADDHEADER: append a header at the end of the header block."""

    code: ClassVar[bytes] = c.SMFIR_ADDHEADER
    name: str
    value: str

    def __post_init__(self) -> None:
        _check_cstr(self, self.name, self.value)

    def payload(self) -> bytes:
        return _cstr(self.name) + _cstr(self.value)


def _check_index(owner: object, index: int) -> None:
    if not 0 <= index <= 0xFFFFFFFF:
        raise ValueError("%s: index %r out of range" % (type(owner).__name__, index))


@dataclass(frozen=True, slots=True)
class InsertHeaderReply:
    """INSHEADER: insert a header at position ``index`` (0 = top)."""

    code: ClassVar[bytes] = c.SMFIR_INSHEADER
    index: int
    name: str
    value: str

    def __post_init__(self) -> None:
        _check_index(self, self.index)
        _check_cstr(self, self.name, self.value)

    def payload(self) -> bytes:
        return _U32.pack(self.index) + _cstr(self.name) + _cstr(self.value)


@dataclass(frozen=True, slots=True)
class ChangeHeaderReply:
    """CHGHEADER: change the ``index``-th (1-based) ``name`` header; an empty value deletes it."""

    code: ClassVar[bytes] = c.SMFIR_CHGHEADER
    index: int
    name: str
    value: str

    def __post_init__(self) -> None:
        _check_index(self, self.index)
        _check_cstr(self, self.name, self.value)

    def payload(self) -> bytes:
        return _U32.pack(self.index) + _cstr(self.name) + _cstr(self.value)


@dataclass(frozen=True, slots=True)
class AddRecipientReply:
    code: ClassVar[bytes] = c.SMFIR_ADDRCPT
    recipient: str

    def __post_init__(self) -> None:
        _check_cstr(self, self.recipient)

    def payload(self) -> bytes:
        return _cstr(self.recipient)


@dataclass(frozen=True, slots=True)
class AddRecipientParReply:
    """ADDRCPT_PAR: add a recipient with ESMTP arguments."""

    code: ClassVar[bytes] = c.SMFIR_ADDRCPT_PAR
    recipient: str
    args: str

    def __post_init__(self) -> None:
        _check_cstr(self, self.recipient, self.args)

    def payload(self) -> bytes:
        return _cstr(self.recipient) + _cstr(self.args)


@dataclass(frozen=True, slots=True)
class DeleteRecipientReply:
    """DELRCPT: remove a recipient, spelled as the MTA sent it."""

    code: ClassVar[bytes] = c.SMFIR_DELRCPT
    recipient: str

    def __post_init__(self) -> None:
        _check_cstr(self, self.recipient)

    def payload(self) -> bytes:
        return _cstr(self.recipient)


@dataclass(frozen=True, slots=True)
class ChangeFromReply:
    """CHGFROM: replace the envelope sender, optionally with ESMTP arguments."""

    code: ClassVar[bytes] = c.SMFIR_CHGFROM
    sender: str
    args: Optional[str] = None

    def __post_init__(self) -> None:
        _check_cstr(self, self.sender, self.args)

    def payload(self) -> bytes:
        if self.args is None:
            return _cstr(self.sender)
        return _cstr(self.sender) + _cstr(self.args)


@dataclass(frozen=True, slots=True)
class ReplaceBodyReply:
    """REPLBODY: one piece (at most 65535 bytes) of the new body."""

    code: ClassVar[bytes] = c.SMFIR_REPLBODY
    chunk: bytes

    def __post_init__(self) -> None:
        if len(self.chunk) > c.MILTER_CHUNK_SIZE:
            raise ValueError("ReplaceBodyReply: piece of %d bytes, at most %d" % (len(self.chunk), c.MILTER_CHUNK_SIZE))

    def payload(self) -> bytes:
        return self.chunk


@dataclass(frozen=True, slots=True)
class SetSymList:
    """One macro list of the OPTNEG reply: the macros the filter wants at stage ``stage`` (SMFIM_*)."""

    stage: int
    macros: str  # space-separated names, as on the wire: "i {mail_addr}"

    def __post_init__(self) -> None:
        _check_index(self, self.stage)
        _check_cstr(self, self.macros)

    def payload(self) -> bytes:
        return _U32.pack(self.stage) + _cstr(self.macros)


@dataclass(frozen=True, slots=True)
class NegotiateReply:
    """The filter's OPTNEG reply: version, actions, protocol bits, macro lists."""

    code: ClassVar[bytes] = c.SMFIR_OPTNEG
    version: int
    actions: int
    protocol: int
    macro_lists: Tuple[SetSymList, ...] = ()

    def payload(self) -> bytes:
        return _OPTNEG.pack(self.version, self.actions, self.protocol) + b"".join(
            m.payload() for m in self.macro_lists
        )


Reply = Union[
    Continue, Accept, Reject, Tempfail, Discard, ReplyCode, Skip, Progress, Shutdown, ConnectionFail, QuarantineReply,
    AddHeaderReply, InsertHeaderReply, ChangeHeaderReply, AddRecipientReply, AddRecipientParReply, DeleteRecipientReply, ChangeFromReply,
    ReplaceBodyReply, NegotiateReply,
]
#: replies that end the MTA's wait for one command (everything else may come before them)
FINAL_REPLIES = (Continue, Accept, Reject, Tempfail, Discard, ReplyCode, Skip, Shutdown, ConnectionFail,
                 NegotiateReply)
#: replies that change the message (EOM only)
MODIFICATION_REPLIES = (QuarantineReply, AddHeaderReply, InsertHeaderReply, ChangeHeaderReply, AddRecipientReply, AddRecipientParReply,
                        DeleteRecipientReply, ChangeFromReply, ReplaceBodyReply)


def encode(event: Union[Command, Reply]) -> bytes:
    """The frame for one command or reply."""
    return frame(event.code, event.payload())


# the replies sent on every message, framed once
CONTINUE_PACKET = encode(Continue())
ACCEPT_PACKET = encode(Accept())
REJECT_PACKET = encode(Reject())
TEMPFAIL_PACKET = encode(Tempfail())
DISCARD_PACKET = encode(Discard())
PROGRESS_PACKET = encode(Progress())

# -- payload parsing ------------------------------------------------------------------------

_new = object.__new__
_set = object.__setattr__


def _trusted_header(name: str, value: str) -> Header:
    """A Header from decoded strings: split at NUL, so they cannot contain one (no re-check)."""
    header = _new(Header)
    _set(header, "name", name)
    _set(header, "value", value)
    return header


def _trusted_macro(stage: str, macros: Tuple[Tuple[str, str], ...]) -> Macro:
    """A Macro from decoded strings (hot path: Postfix sends several per message)."""
    macro = _new(Macro)
    _set(macro, "stage", stage)
    _set(macro, "macros", macros)
    return macro



def _strings(payload: bytes, what: str) -> List[str]:
    """NUL-terminated strings, decoded; the payload must end with a NUL."""
    if not payload or payload[-1] != 0:
        raise MalformedPayloadError("%s: string not NUL-terminated (%d bytes)" % (what, len(payload)))
    return payload[:-1].decode(_ENCODING, _ERRORS).split("\0")


def _exactly(payload: bytes, count: int, what: str) -> List[str]:
    parts = _strings(payload, what)
    if len(parts) != count:
        raise MalformedPayloadError("%s: %d strings, expected %d" % (what, len(parts), count))
    return parts


def _u32_then(payload: bytes, count: int, what: str) -> Tuple[int, List[str]]:
    if len(payload) < 4:
        raise MalformedPayloadError("%s: %d bytes, too short for its index" % (what, len(payload)))
    return _U32.unpack_from(payload)[0], _exactly(payload[4:], count, what)


def _decode_optneg(payload: bytes, what: str) -> Tuple[int, int, int]:
    if len(payload) < _OPTNEG.size:
        raise MalformedPayloadError("%s: %d bytes, expected 12" % (what, len(payload)))
    return _OPTNEG.unpack_from(payload)  # type: ignore[return-value]


def _decode_negotiate(payload: bytes) -> Negotiate:
    version, actions, protocol = _decode_optneg(payload, "OPTNEG")
    return Negotiate(version, actions, protocol)


def _decode_macro(payload: bytes) -> Macro:
    if not payload:
        raise MalformedPayloadError("MACRO: no stage code")
    stage = chr(payload[0])
    if len(payload) == 1:
        return _trusted_macro(stage, ())
    if payload[-1] != 0:
        raise MalformedPayloadError("MACRO: string not NUL-terminated")
    parts = payload[1:-1].decode(_ENCODING, _ERRORS).split("\0")
    if len(parts) & 1:
        raise MalformedPayloadError("MACRO: name %r without value" % (parts[-1],))
    pairs = iter(parts)
    return _trusted_macro(stage, tuple(zip(pairs, pairs)))


def _decode_connect(payload: bytes) -> Connect:
    end = payload.find(b"\0")
    if end < 0:
        raise MalformedPayloadError("CONNECT: hostname not NUL-terminated")
    hostname = payload[:end].decode(_ENCODING, _ERRORS)
    family = chr(payload[end + 1]) if len(payload) > end + 1 else ""
    if family not in c.FAMILIES or not family:
        raise MalformedPayloadError("CONNECT: unknown address family %r" % (family,))
    if family == c.SMFIA_UNKNOWN:
        return Connect(hostname, family)
    rest = payload[end + 2 :]
    if len(rest) < 2:
        raise MalformedPayloadError("CONNECT: no port")
    (port,) = _U16.unpack_from(rest)
    (address,) = _exactly(rest[2:], 1, "CONNECT address")
    return Connect(hostname, family, port, address)


def _decode_helo(payload: bytes) -> Helo:
    return Helo(_exactly(payload, 1, "HELO")[0])


def _decode_argv(payload: bytes, what: str) -> Tuple[str, ...]:
    return tuple(_strings(payload, what)) if payload else ()


def _decode_header(payload: bytes) -> Header:
    if not payload or payload[-1] != 0:
        raise MalformedPayloadError("HEADER: string not NUL-terminated")
    parts = payload[:-1].decode(_ENCODING, _ERRORS).split("\0")
    if len(parts) != 2:
        raise MalformedPayloadError("HEADER: %d strings, expected 2" % (len(parts),))
    return _trusted_header(parts[0], parts[1])


def _decode_unknown(payload: bytes) -> Unknown:
    return Unknown(_exactly(payload, 1, "UNKNOWN")[0])


# commands without payload are singletons; libmilter ignores a stray payload, so do we
_DATA, _EOH, _ABORT, _QUIT, _QUIT_NC = Data(), EndOfHeaders(), Abort(), Quit(), QuitNoClose()
_NO_CHUNK_EOM = EndOfMessage()

Decoder = Callable[[bytes], object]

COMMAND_DECODERS: Dict[int, Decoder] = {
    c.SMFIC_OPTNEG[0]: _decode_negotiate,
    c.SMFIC_MACRO[0]: _decode_macro,
    c.SMFIC_CONNECT[0]: _decode_connect,
    c.SMFIC_HELO[0]: _decode_helo,
    c.SMFIC_MAIL[0]: lambda p: Mail(_decode_argv(p, "MAIL")),
    c.SMFIC_RCPT[0]: lambda p: Rcpt(_decode_argv(p, "RCPT")),
    c.SMFIC_DATA[0]: lambda p: _DATA,
    c.SMFIC_HEADER[0]: _decode_header,
    c.SMFIC_EOH[0]: lambda p: _EOH,
    c.SMFIC_BODY[0]: Body,
    c.SMFIC_BODYEOB[0]: lambda p: EndOfMessage(p) if p else _NO_CHUNK_EOM,
    c.SMFIC_UNKNOWN[0]: _decode_unknown,
    c.SMFIC_ABORT[0]: lambda p: _ABORT,
    c.SMFIC_QUIT[0]: lambda p: _QUIT,
    c.SMFIC_QUIT_NC[0]: lambda p: _QUIT_NC,
}


def _decode_negotiate_reply(payload: bytes) -> NegotiateReply:
    version, actions, protocol = _decode_optneg(payload, "OPTNEG reply")
    lists: List[SetSymList] = []
    rest = payload[_OPTNEG.size :]
    while rest:
        if len(rest) < 4:
            raise MalformedPayloadError("OPTNEG reply: macro list without stage")
        (stage,) = _U32.unpack_from(rest)
        end = rest.find(b"\0", 4)
        if end < 0:
            raise MalformedPayloadError("OPTNEG reply: macro list not NUL-terminated")
        lists.append(SetSymList(stage, rest[4:end].decode(_ENCODING, _ERRORS)))
        rest = rest[end + 1 :]
    return NegotiateReply(version, actions, protocol, tuple(lists))


def _decode_chgfrom(payload: bytes) -> ChangeFromReply:
    parts = _strings(payload, "CHGFROM")
    if len(parts) > 2:
        raise MalformedPayloadError("CHGFROM: %d strings, expected 1 or 2" % (len(parts),))
    return ChangeFromReply(parts[0], parts[1] if len(parts) == 2 else None)


def _decode_header_reply(kind: type, what: str) -> Decoder:
    def decode(payload: bytes) -> object:
        index, (name, value) = _u32_then(payload, 2, what)
        return kind(index, name, value)

    return decode


_CONTINUE, _ACCEPT, _REJECT, _TEMPFAIL, _DISCARD = Continue(), Accept(), Reject(), Tempfail(), Discard()
_SKIP, _PROGRESS, _SHUTDOWN, _CONN_FAIL = Skip(), Progress(), Shutdown(), ConnectionFail()

REPLY_DECODERS: Dict[int, Decoder] = {
    c.SMFIR_CONTINUE[0]: lambda p: _CONTINUE,
    c.SMFIR_ACCEPT[0]: lambda p: _ACCEPT,
    c.SMFIR_REJECT[0]: lambda p: _REJECT,
    c.SMFIR_TEMPFAIL[0]: lambda p: _TEMPFAIL,
    c.SMFIR_DISCARD[0]: lambda p: _DISCARD,
    c.SMFIR_SKIP[0]: lambda p: _SKIP,
    c.SMFIR_PROGRESS[0]: lambda p: _PROGRESS,
    c.SMFIR_SHUTDOWN[0]: lambda p: _SHUTDOWN,
    c.SMFIR_CONN_FAIL[0]: lambda p: _CONN_FAIL,
    c.SMFIR_REPLYCODE[0]: lambda p: ReplyCode(_exactly(p, 1, "REPLYCODE")[0]),
    c.SMFIR_QUARANTINE[0]: lambda p: QuarantineReply(_exactly(p, 1, "QUARANTINE")[0]),
    c.SMFIR_ADDHEADER[0]: lambda p: AddHeaderReply(*_exactly(p, 2, "ADDHEADER")),
    c.SMFIR_INSHEADER[0]: _decode_header_reply(InsertHeaderReply, "INSHEADER"),
    c.SMFIR_CHGHEADER[0]: _decode_header_reply(ChangeHeaderReply, "CHGHEADER"),
    c.SMFIR_ADDRCPT[0]: lambda p: AddRecipientReply(_exactly(p, 1, "ADDRCPT")[0]),
    c.SMFIR_ADDRCPT_PAR[0]: lambda p: AddRecipientParReply(*_exactly(p, 2, "ADDRCPT_PAR")),
    c.SMFIR_DELRCPT[0]: lambda p: DeleteRecipientReply(_exactly(p, 1, "DELRCPT")[0]),
    c.SMFIR_CHGFROM[0]: _decode_chgfrom,
    c.SMFIR_REPLBODY[0]: ReplaceBodyReply,
    c.SMFIR_OPTNEG[0]: _decode_negotiate_reply,
}


# -- the receive buffer ---------------------------------------------------------------------


class FrameReader:
    """Splits a byte stream into frames and decodes each with ``decoders``.

    The bytes received and not yet handed out are kept as the pieces they came in (no
    growing buffer, which held a spare copy's worth of capacity per connection: 6.5 MB
    at 64 connections streaming BODY frames, issue 19).  A frame inside one piece costs
    one copy of its payload; a frame spanning pieces is joined once from views of them.
    A piece is let go as soon as its last byte is handed out.  Frame headers are checked
    in ``receive_data`` as soon as their 4 bytes are there: a bad length raises
    ``FrameError`` and nothing from that frame on is stored, so hostile input cannot make
    the buffer grow past the limit.
    """

    def __init__(
        self,
        decoders: Mapping[int, Decoder],
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        ignored_macro_stages: bytes = b"",
    ) -> None:
        if max_frame_size < 1:
            raise ValueError("max_frame_size must be positive")
        self.max_frame_size = max_frame_size
        self._decoders = decoders
        self._ignored_macros = frozenset(ignored_macro_stages)
        self._parts: Deque[bytes] = deque()  # received pieces; the first is unread from _pos on
        self._pos = 0
        self._size = 0  # unread bytes in _parts
        self._scan = 0  # next frame header not yet checked, as an offset from the first unread byte
        self._headers_seen = 0
        self._frames_read = 0
        self._error: Optional[FrameError] = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as events."""
        return self._size

    @property
    def queued_frames(self) -> int:
        """Frames (whole or begun) received and not yet handed out as events."""
        return self._headers_seen - self._frames_read

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; raises FrameError on a bad frame length."""
        if self._error is not None:
            raise self._error
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # a caller's buffer could change under us
        old = self._size
        total = old + len(data)
        limit = self.max_frame_size
        scan = self._scan
        seen = 0
        while scan + 4 <= total:
            if scan >= old:
                (length,) = _U32.unpack_from(data, scan - old)
            else:  # the header straddles the stored bytes and the new ones
                (length,) = _U32.unpack(self._peek(scan, old - scan) + data[: scan + 4 - old])
            if length == 0 or length > limit:
                self._headers_seen += seen
                if scan >= old:
                    if scan > old:
                        self._store(data[: scan - old])
                else:
                    self._truncate(scan)  # drop the straddling header's first bytes
                self._scan = scan
                self._error = FrameError(
                    "frame length %d %s" % (length, "is invalid" if length == 0 else "above the limit of %d" % limit)
                )
                raise self._error
            scan += 4 + length
            seen += 1
        self._scan = scan
        self._headers_seen += seen
        self._store(data)

    def _store(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)

    def _truncate(self, keep: int) -> None:
        """Keep only the first ``keep`` unread bytes."""
        drop = self._size - keep
        while drop:
            last = self._parts[-1]
            unread = len(last) - (self._pos if len(self._parts) == 1 else 0)
            if unread <= drop:
                self._parts.pop()
                drop -= unread
                self._size -= unread
                if not self._parts:
                    self._pos = 0
            else:
                self._parts[-1] = last[: len(last) - drop]
                self._size -= drop
                drop = 0

    def _peek(self, offset: int, n: int) -> bytes:
        """``n`` unread bytes from ``offset`` (all of them must be stored), not consumed."""
        out = []
        start = offset + self._pos
        for part in self._parts:
            if start >= len(part):
                start -= len(part)
                continue
            piece = part[start : start + n]
            out.append(piece)
            n -= len(piece)
            start = 0
            if n <= 0:
                break
        return b"".join(out)

    def _take(self, n: int, skip: int) -> bytes:
        """Consume ``n`` unread bytes; return those after the first ``skip``."""
        parts = self._parts
        first = parts[0]
        pos = self._pos
        self._size -= n
        self._scan -= n
        if len(first) - pos >= n:  # the frame lies in one piece
            out = first[pos + skip : pos + n]
            if len(first) - pos == n:
                parts.popleft()  # let the piece go now, not when the next bytes arrive
                self._pos = 0
            else:
                self._pos = pos + n
            return out
        views = []
        start = pos + skip
        end = pos + n  # relative to the first piece's start
        while end > 0:
            part = parts[0]
            if start < len(part):
                views.append(memoryview(part)[start : min(end, len(part))])
            if end >= len(part):
                parts.popleft()
                start = max(0, start - len(part))
                end -= len(part)
                self._pos = 0
            else:
                self._pos = end
                end = 0
        out = b"".join(views)
        for view in views:
            view.release()
        return out

    def next_event(self) -> Optional[object]:
        """The next decoded frame, or None until more bytes arrive."""
        while True:
            if self._size < 5:
                if self._error is not None and self._size == 0:
                    raise self._error
                return None
            first, pos = self._parts[0], self._pos
            if len(first) - pos >= 6:
                (length,) = _U32.unpack_from(first, pos)
                code, stage = first[pos + 4], first[pos + 5]
            else:
                head = self._peek(0, 6 if self._size >= 6 else 5)
                (length,) = _U32.unpack_from(head, 0)
                code, stage = head[4], head[5] if len(head) > 5 else -1
            if 4 + length > self._size:
                return None
            if code != _MACRO_CODE or length < 2 or stage not in self._ignored_macros:
                break
            # a MACRO packet for a stage nobody reads: consumed without decoding it
            self._take(4 + length, 4 + length)
            self._frames_read += 1
        payload = self._take(4 + length, 5)
        self._frames_read += 1
        decoder = self._decoders.get(code)
        if decoder is None:
            raise UnknownCodeError("unknown code %r in a %d-byte frame" % (bytes((code,)), length))
        try:
            return decoder(payload)
        except ValueError as e:  # a value the event class refuses (e.g. an oversized REPLBODY)
            raise MalformedPayloadError(str(e)) from e

    def __iter__(self):  # type: ignore[no-untyped-def]
        """Every complete event buffered now."""
        while True:
            event = self.next_event()
            if event is None:
                return
            yield event


class CommandReader(FrameReader):
    """The filter's side: bytes from the MTA in, commands (``Command``) out.

    ``ignored_macro_stages`` names MACRO stages to consume without an event:
    Postfix sends ``D L`` before every header and ``D B`` before every body
    chunk, which libmilter (and so C rmilter) silently ignores (SPEC §3.2).
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, ignored_macro_stages: bytes = b"") -> None:
        super().__init__(COMMAND_DECODERS, max_frame_size, ignored_macro_stages)


class ReplyReader(FrameReader):
    """The MTA's side: bytes from the filter in, replies (``Reply``) out."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        super().__init__(REPLY_DECODERS, max_frame_size)


# -- option negotiation (SPEC §3.4) ------------------------------------------------------------


@dataclass(frozen=True)
class Negotiated:
    """What both sides agreed on, and the reply that says so."""

    version: int
    actions: int
    protocol: int
    reply: NegotiateReply
    #: stages the MTA will not wait for (SMFIP_NR_*): the filter must stay silent there
    silent_stages: frozenset = field(default_factory=frozenset)


def negotiate(
    offer: Negotiate,
    *,
    stages_needing_replies: Collection[str] = (),
    no_reply_steps: bool = True,
    optional_actions: int = c.OPTIONAL_ACTIONS,
    macros: Mapping[int, str] = c.REQUESTED_MACROS,
) -> Negotiated:
    """Answer the MTA's OPTNEG (SPEC §3.4), or raise NegotiationError (then close, no reply).

    Version min(6, MTA); an action field of 0 means 0x0F and a protocol field of 0
    means 0x3F (v1 defaults).  ADDHDRS, CHGHDRS and ADDRCPT are required; the
    ``optional_actions`` the MTA offers are requested too.  No protocol bit the MTA
    did not offer is ever set: NOUNKNOWN when offered, and with ``no_reply_steps``
    the NR bit of every stage not in ``stages_needing_replies`` (EOM always answers).
    With SETSYMLIST offered, ``macros`` are requested per SMFIM stage.
    """
    if offer.version < c.MILTER_MIN_VERSION:
        raise NegotiationError("MTA speaks milter protocol version %d, at least %d is needed"
                               % (offer.version, c.MILTER_MIN_VERSION))
    version = min(c.MILTER_VERSION, offer.version)
    offered_actions = offer.actions or c.SMFIF_V1_DEFAULT
    offered_protocol = offer.protocol or c.SMFIP_V1_DEFAULT
    missing = c.REQUIRED_ACTIONS & ~offered_actions
    if missing:
        raise NegotiationError("MTA does not fulfill action requirements: offers 0x%x, lacks 0x%x"
                               % (offered_actions, missing))
    actions = c.REQUIRED_ACTIONS | (optional_actions & offered_actions)
    protocol = 0
    if offered_protocol & c.SMFIP_NOUNKNOWN:
        protocol |= c.SMFIP_NOUNKNOWN
    if no_reply_steps:
        needing = set(stages_needing_replies)
        for stage, bit in c.NO_REPLY_BITS.items():
            if stage in needing or not offered_protocol & bit:
                continue
            if stage == c.STAGE_UNKNOWN and protocol & c.SMFIP_NOUNKNOWN:
                continue  # no UNKNOWN command will come at all
            protocol |= bit
    macro_lists: Tuple[SetSymList, ...] = ()
    if actions & c.SMFIF_SETSYMLIST:
        macro_lists = tuple(SetSymList(stage, names) for stage, names in sorted(macros.items()))
        if not macro_lists:
            actions &= ~c.SMFIF_SETSYMLIST
    silent = frozenset(stage for stage, bit in c.NO_REPLY_BITS.items() if protocol & bit)
    return Negotiated(
        version=version,
        actions=actions,
        protocol=protocol,
        reply=NegotiateReply(version, actions, protocol, macro_lists),
        silent_stages=silent,
    )
