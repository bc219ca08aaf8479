"""An MTA for tests and benchmarks: the client side of the milter protocol, on Twisted.

It speaks to any milter (ours under ``twistd rmilter``, or another one) the way
Postfix does, following the sequence of milterload, the C milter load generator
the project's speed is measured with ("What is sent" in its README): OPTNEG, then per message ``D``+command pairs written together,
``SMFIP_NO*`` steps skipped, ``SMFIP_NR_*`` steps sent without waiting, ABORT
between messages of one connection.  Example::

    from twisted.internet.endpoints import clientFromString
    from rmilter.testing.mta import MessageSpec, MilterClient

    client = yield MilterClient.connect(reactor, clientFromString(reactor, "tcp:127.0.0.1:11339"))
    result = yield client.send_message(MessageSpec(sender="a@example.net", recipients=("<b@example.org>",)))
    assert result.action == "accept", result
    print(result.added_headers)        # [("X-Spamd-Result", "..."), ...]
    yield client.close()               # ABORT + QUIT

``MessageResult`` has the reply of every step the filter answered, the final
action and REPLYCODE text, and every modification it asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from rmilter.milter import codec
from rmilter.milter import constants as c
from rmilter.milter.codec import (
    Abort,
    AddHeaderReply,
    AddRecipientReply,
    AddRecipientParReply,
    Body,
    ChangeFromReply,
    ChangeHeaderReply,
    Command,
    Connect,
    Data,
    DeleteRecipientReply,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    InsertHeaderReply,
    Macro,
    Mail,
    Negotiate,
    NegotiateReply,
    Progress,
    QuarantineReply,
    Quit,
    QuitNoClose,
    Rcpt,
    ReplaceBodyReply,
    Reply,
    ReplyCode,
    ReplyReader,
)

#: what Postfix 2.6+ offers (SPEC §3.4)
POSTFIX_OFFER = Negotiate(6, 0x1FF, c.SMFIP_ALL_V6)


class MilterClientError(Exception):
    """The filter broke the protocol (an unexpected reply, an unacceptable OPTNEG reply)."""


@dataclass(frozen=True)
class ClientSpec:
    """The SMTP client as the MTA describes it at CONNECT and HELO (once per connection)."""

    hostname: str = "mail.example.net"
    family: str = c.SMFIA_INET  # "4", "6", "L" (unix) or "U" (unknown: no address)
    address: Optional[str] = "192.0.2.10"
    port: int = 40000
    helo: str = "mail.example.net"
    mta_hostname: str = "mx.example.org"  # macro j
    daemon_name: str = "smtpd"  # macro {daemon_name}


@dataclass(frozen=True)
class MessageSpec:
    """One SMTP transaction.  Addresses may be given with or without angle brackets."""

    sender: str = "sender@example.net"
    recipients: Tuple[str, ...] = ("rcpt@example.org",)
    headers: Tuple[Tuple[str, str], ...] = (
        ("From", "<sender@example.net>"),
        ("To", "<rcpt@example.org>"),
        ("Subject", "test message"),
        ("Message-ID", "<test.1@example.net>"),
    )
    body: bytes = b"Hello\r\nThis is a test\r\n"
    queue_id: str = "4ABCDEF"
    mail_args: Tuple[str, ...] = ()
    auth_authen: Optional[str] = None  # SASL login: sends {auth_type} and {auth_authen}
    chunk_size: int = c.MILTER_CHUNK_SIZE
    #: used for CONNECT/HELO when this is the first message of the connection
    client: ClientSpec = ClientSpec()


def _bracket(address: str) -> str:
    return address if address.startswith("<") else "<%s>" % (address,)


def _bare(address: str) -> str:
    return address[1:-1] if address.startswith("<") and address.endswith(">") else address


def action_of(reply: Reply) -> str:
    """A final reply as a word: accept, continue, reject, tempfail, discard, skip, connfail, shutdown."""
    if isinstance(reply, ReplyCode):
        return "tempfail" if reply.text.startswith("4") else "reject"
    return {
        codec.Continue: "continue",
        codec.Accept: "accept",
        codec.Reject: "reject",
        codec.Tempfail: "tempfail",
        codec.Discard: "discard",
        codec.Skip: "skip",
        codec.ConnectionFail: "connfail",
        codec.Shutdown: "shutdown",
    }.get(type(reply), type(reply).__name__)


@dataclass
class StepReply:
    """The filter's answer to one command: its final reply and what came before it."""

    stage: str
    reply: Reply
    modifications: Tuple[Reply, ...] = ()
    progress: int = 0


@dataclass
class MessageResult:
    """Everything the filter said about one message."""

    steps: List[StepReply] = field(default_factory=list)
    #: the stage whose reply decided the message ("eom" normally)
    final_stage: str = ""
    final_reply: Optional[Reply] = None
    rejected_recipients: List[str] = field(default_factory=list)

    @property
    def action(self) -> str:
        """``accept``, ``continue``, ``reject``, ``tempfail``, ``discard``, ... (REPLYCODE by its digit)."""
        return action_of(self.final_reply) if self.final_reply is not None else "none"

    @property
    def reply_text(self) -> Optional[str]:
        """The REPLYCODE line (``451 4.7.1 ...``), if the final reply was one."""
        return self.final_reply.text if isinstance(self.final_reply, ReplyCode) else None

    @property
    def modifications(self) -> List[Reply]:
        return [m for step in self.steps for m in step.modifications]

    @property
    def progress(self) -> int:
        return sum(step.progress for step in self.steps)

    def replies(self, stage: str) -> List[Reply]:
        """The replies to every command of a stage (several for rcpt, header and body)."""
        return [step.reply for step in self.steps if step.stage == stage]

    def reply(self, stage: str) -> Optional[Reply]:
        """The reply to the first command of a stage, None when it was not answered."""
        found = self.replies(stage)
        return found[0] if found else None

    @property
    def added_headers(self) -> List[Tuple[str, str]]:
        return [(m.name, m.value) for m in self.modifications if isinstance(m, AddHeaderReply)]

    @property
    def inserted_headers(self) -> List[Tuple[int, str, str]]:
        return [(m.index, m.name, m.value) for m in self.modifications if isinstance(m, InsertHeaderReply)]

    @property
    def changed_headers(self) -> List[Tuple[int, str, str]]:
        return [(m.index, m.name, m.value) for m in self.modifications if isinstance(m, ChangeHeaderReply)]

    @property
    def added_recipients(self) -> List[str]:
        return [m.recipient for m in self.modifications if isinstance(m, (AddRecipientReply, AddRecipientParReply))]

    @property
    def deleted_recipients(self) -> List[str]:
        return [m.recipient for m in self.modifications if isinstance(m, DeleteRecipientReply)]

    @property
    def new_sender(self) -> Optional[str]:
        changes = [m.sender for m in self.modifications if isinstance(m, ChangeFromReply)]
        return changes[-1] if changes else None

    @property
    def replaced_body(self) -> Optional[bytes]:
        pieces = [m.chunk for m in self.modifications if isinstance(m, ReplaceBodyReply)]
        return b"".join(pieces) if pieces else None

    @property
    def quarantine_reason(self) -> Optional[str]:
        reasons = [m.reason for m in self.modifications if isinstance(m, QuarantineReply)]
        return reasons[-1] if reasons else None


@dataclass
class _Waiter:
    deferred: Deferred
    modifications: List[Reply] = field(default_factory=list)
    progress: int = 0


class MtaProtocol(Protocol):
    """Bytes to replies; every final reply fires the oldest waiting ``expect_reply``."""

    transport: Any

    def __init__(self, max_frame_size: int = codec.DEFAULT_MAX_FRAME_SIZE) -> None:
        self.reader = ReplyReader(max_frame_size)
        self.waiters: List[_Waiter] = []
        #: final replies that arrived while nothing waited (a filter answering a no-reply step)
        self.unsolicited: List[Reply] = []
        self.lost: Optional[Failure] = None
        self._lost_waiters: List[Deferred] = []

    def dataReceived(self, data: bytes) -> None:
        try:
            self.reader.receive_data(data)
            for reply in self.reader:
                self._dispatch(reply)
        except codec.ProtocolError:
            failure = Failure()
            for waiter in self._take_waiters():
                waiter.deferred.errback(failure)
            self.transport.loseConnection()

    def _dispatch(self, reply: Reply) -> None:
        if not self.waiters:
            self.unsolicited.append(reply)
            return
        waiter = self.waiters[0]
        if isinstance(reply, Progress):
            waiter.progress += 1
        elif isinstance(reply, codec.MODIFICATION_REPLIES):
            waiter.modifications.append(reply)
        else:
            self.waiters.pop(0)
            waiter.deferred.callback((reply, tuple(waiter.modifications), waiter.progress))

    def _take_waiters(self) -> List[_Waiter]:
        waiters, self.waiters = self.waiters, []
        return waiters

    def expect(self) -> "Deferred[Tuple[Reply, Tuple[Reply, ...], int]]":
        """The next final reply, with the modifications and PROGRESS count before it.

        Cancelling (e.g. by a timeout) forgets the wait, so a late reply is not taken
        for the answer to a later command.
        """

        def forget(d: Deferred) -> None:
            self.waiters = [w for w in self.waiters if w.deferred is not d]

        d: Deferred = Deferred(forget)
        if self.lost is not None:
            d.errback(self.lost)
        else:
            self.waiters.append(_Waiter(d))
        return d

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # type: ignore[assignment]
        self.lost = reason
        for waiter in self._take_waiters():
            waiter.deferred.errback(reason)
        lost_waiters, self._lost_waiters = self._lost_waiters, []
        for d in lost_waiters:
            d.callback(None)

    def when_lost(self) -> "Deferred[None]":
        """Fires when the connection is closed."""
        d: "Deferred[None]" = Deferred()
        if self.lost is not None:
            d.callback(None)
        else:
            self._lost_waiters.append(d)
        return d


class MilterClient:
    """The MTA side of one milter connection (see the module docstring)."""

    def __init__(self, protocol: MtaProtocol, clock: Any, timeout: float = 30.0) -> None:
        self.protocol = protocol
        self.clock = clock
        self.timeout = timeout
        self.negotiated: Optional[NegotiateReply] = None
        self.offer: Optional[Negotiate] = None
        #: messages sent on this connection (ABORT goes before the next one)
        self.messages = 0
        self.connected = False  # CONNECT/HELO sent for the current SMTP session
        #: the filter refused the SMTP session at CONNECT or HELO (an MTA would close)
        self.session_refused = False

    # -- set-up --------------------------------------------------------------------------------
    @classmethod
    @inlineCallbacks
    def connect(
        cls,
        reactor: Any,
        endpoint: Any,
        *,
        offer: Negotiate = POSTFIX_OFFER,
        timeout: float = 30.0,
    ):  # type: ignore[no-untyped-def]
        """Connect to ``endpoint`` and negotiate; fires with a ready ``MilterClient``."""
        protocol = MtaProtocol()
        yield connectProtocol(endpoint, protocol).addTimeout(timeout, reactor)
        client = cls(protocol, reactor, timeout)
        yield client.negotiate(offer)
        return client

    @classmethod
    @inlineCallbacks
    def send_one(cls, reactor: Any, endpoint: Any, spec: "MessageSpec"):  # type: ignore[no-untyped-def]
        """Connect, send one message, close: fires with its ``MessageResult``."""
        client = yield cls.connect(reactor, endpoint)
        try:
            result = yield client.send_message(spec)
        finally:
            yield client.close()
        return result

    @inlineCallbacks
    def negotiate(self, offer: Negotiate = POSTFIX_OFFER):  # type: ignore[no-untyped-def]
        """Send OPTNEG; fires with the filter's ``NegotiateReply`` (checked like milterload)."""
        self.offer = offer
        self.send(offer)
        reply, _, _ = yield self._expect()
        if not isinstance(reply, NegotiateReply):
            raise MilterClientError("OPTNEG answered with %r" % (reply,))
        offered = offer.protocol or c.SMFIP_V1_DEFAULT
        if reply.version < 2 or reply.version > offer.version or reply.protocol & ~offered & c.SMFIP_ALL_V6:
            raise MilterClientError("unacceptable OPTNEG reply %r to %r" % (reply, offer))
        if reply.actions & ~(offer.actions or c.SMFIF_V1_DEFAULT):
            raise MilterClientError("filter asks for actions not offered: %r" % (reply,))
        self.negotiated = reply
        return reply

    # -- low level -----------------------------------------------------------------------------
    def send(self, *commands: Command) -> None:
        """Write commands in one write (a macro packet and its command go together)."""
        self.protocol.transport.write(b"".join(codec.encode(command) for command in commands))

    def _expect(self) -> Deferred:
        return self.protocol.expect().addTimeout(self.timeout, self.clock)

    def expect_reply(self) -> "Deferred[Reply]":
        """The next final reply (modifications and progress before it are dropped)."""
        return self._expect().addCallback(lambda r: r[0])

    def _flag(self, bit: int) -> bool:
        return self.negotiated is not None and bool(self.negotiated.protocol & bit)

    def _macros(self, stage_code: bytes, smfim: Optional[int], available: Sequence[Tuple[str, Optional[str]]]) -> Macro:
        """A MACRO packet as Postfix sends it: the filter's requested list (SETSYMLIST) or
        the default list, only macros that have a value."""
        values: List[Tuple[str, str]] = [(name, value) for name, value in available if value is not None]
        if smfim is not None and self.negotiated is not None:
            for symlist in self.negotiated.macro_lists:
                if symlist.stage == smfim:
                    wanted = symlist.macros.split()
                    known = dict(values)
                    values = [(name, known[name]) for name in wanted if name in known]
                    break
        return Macro(stage_code.decode("ascii"), tuple(values))

    @inlineCallbacks
    def _step(self, result: MessageResult, stage: str, nr_bit: int, *commands: Command):  # type: ignore[no-untyped-def]
        """Send one step; wait for its reply unless the step is no-reply; fires with the reply."""
        if nr_bit and self._flag(nr_bit):
            self.send(*commands)
            return None
        waiting = self._expect()
        self.send(*commands)
        reply, modifications, progress = yield waiting
        result.steps.append(StepReply(stage, reply, modifications, progress))
        return reply

    @staticmethod
    def _continues(reply: Optional[Reply]) -> bool:
        return reply is None or isinstance(reply, codec.Continue)

    # -- the SMTP session ----------------------------------------------------------------------
    @inlineCallbacks
    def send_connect(self, client: ClientSpec, result: Optional[MessageResult] = None):  # type: ignore[no-untyped-def]
        """CONNECT and HELO (each with its macros); fires with the reply that ended them, or None."""
        result = result if result is not None else MessageResult()
        self.connected = True
        if not self._flag(c.SMFIP_NOCONNECT):
            macros = self._macros(c.SMFIC_CONNECT, c.SMFIM_CONNECT, (
                ("j", client.mta_hostname),
                ("{daemon_name}", client.daemon_name),
                ("{daemon_addr}", "127.0.0.1"),
                ("v", "Postfix 3.7 (rmilter.testing.mta)"),
                ("_", "%s [%s]" % (client.hostname, client.address or "")),
                ("{client_addr}", client.address),
                ("{client_name}", client.hostname),
            ))
            if client.family == c.SMFIA_UNKNOWN:
                connect = Connect(client.hostname)
            else:
                connect = Connect(client.hostname, client.family, client.port, client.address or "")
            reply = yield self._step(result, c.STAGE_CONNECT, c.SMFIP_NR_CONN, macros, connect)
            if not self._continues(reply):
                self.session_refused = True
                result.final_stage, result.final_reply = c.STAGE_CONNECT, reply
                return reply
        if not self._flag(c.SMFIP_NOHELO):
            # Postfix sends an empty HELO macro list
            macros = self._macros(c.SMFIC_HELO, c.SMFIM_HELO, ())
            reply = yield self._step(result, c.STAGE_HELO, c.SMFIP_NR_HELO, macros, Helo(client.helo))
            if not self._continues(reply):
                self.session_refused = True
                result.final_stage, result.final_reply = c.STAGE_HELO, reply
                return reply
        return None

    @inlineCallbacks
    def send_message(self, spec: MessageSpec = MessageSpec()):  # type: ignore[no-untyped-def]
        """One transaction, as Postfix sends it; fires with a ``MessageResult``."""
        result = MessageResult()
        if self.negotiated is None:
            raise MilterClientError("send_message before negotiation")
        if self.messages:
            self.send(Abort())  # Postfix ends every transaction with ABORT
        self.messages += 1
        if not self.connected:
            ended = yield self.send_connect(spec.client, result)
            if ended is not None:
                return result
        reply = yield self._envelope(spec, result)
        if not self._continues(reply):
            return result
        yield self._content(spec, result)
        return result

    def _end(self, result: MessageResult, stage: str, reply: Reply) -> Reply:
        result.final_stage, result.final_reply = stage, reply
        return reply

    @inlineCallbacks
    def _envelope(self, spec: MessageSpec, result: MessageResult):  # type: ignore[no-untyped-def]
        client = spec.client
        if not self._flag(c.SMFIP_NOMAIL):
            auth = (("{auth_type}", "PLAIN"), ("{auth_authen}", spec.auth_authen)) if spec.auth_authen else ()
            macros = self._macros(c.SMFIC_MAIL, c.SMFIM_ENVFROM, (
                ("{mail_addr}", _bare(spec.sender)),
                ("{mail_host}", "[127.0.0.1]:25"),
                ("{mail_mailer}", "smtp"),
                ("{client_addr}", client.address),
                ("{client_name}", client.hostname),
            ) + auth)
            mail = Mail((_bracket(spec.sender),) + tuple(spec.mail_args))
            reply = yield self._step(result, c.STAGE_MAIL, c.SMFIP_NR_MAIL, macros, mail)
            if not self._continues(reply):
                return self._end(result, c.STAGE_MAIL, reply)
        accepted = 0
        refusal: Optional[Reply] = None
        for recipient in spec.recipients:
            if self._flag(c.SMFIP_NORCPT):
                accepted += 1
                continue
            macros = self._macros(c.SMFIC_RCPT, c.SMFIM_ENVRCPT, (
                ("{rcpt_addr}", _bare(recipient)),
                ("{rcpt_host}", "[127.0.0.1]:25"),
                ("{rcpt_mailer}", "smtp"),
            ))
            reply = yield self._step(result, c.STAGE_RCPT, c.SMFIP_NR_RCPT, macros, Rcpt((_bracket(recipient),)))
            if self._continues(reply):
                accepted += 1
            elif action_of(reply) in ("reject", "tempfail"):
                result.rejected_recipients.append(recipient)
                refusal = reply
            else:
                return self._end(result, c.STAGE_RCPT, reply)
        if not accepted:
            return self._end(result, c.STAGE_RCPT, refusal if refusal is not None else codec.Reject())
        return None

    @inlineCallbacks
    def _content(self, spec: MessageSpec, result: MessageResult):  # type: ignore[no-untyped-def]
        qid = (("i", spec.queue_id),)
        assert self.negotiated is not None
        if self.negotiated.version >= 4 and not self._flag(c.SMFIP_NODATA):
            macros = self._macros(c.SMFIC_DATA, c.SMFIM_DATA, qid)
            reply = yield self._step(result, c.STAGE_DATA, c.SMFIP_NR_DATA, macros, Data())
            if not self._continues(reply):
                return self._end(result, c.STAGE_DATA, reply)
        if not self._flag(c.SMFIP_NOHDRS):
            lead = " " if self._flag(c.SMFIP_HDR_LEADSPC) else ""
            for name, value in spec.headers:
                macros = self._macros(c.SMFIC_HEADER, None, qid)  # Postfix: "D L i=QID" before every header
                reply = yield self._step(result, c.STAGE_HEADER, c.SMFIP_NR_HDR, macros, Header(name, lead + value))
                if not self._continues(reply):
                    return self._end(result, c.STAGE_HEADER, reply)
        if not self._flag(c.SMFIP_NOEOH):
            macros = self._macros(c.SMFIC_EOH, c.SMFIM_EOH, qid)
            reply = yield self._step(result, c.STAGE_EOH, c.SMFIP_NR_EOH, macros, EndOfHeaders())
            if not self._continues(reply):
                return self._end(result, c.STAGE_EOH, reply)
        if not self._flag(c.SMFIP_NOBODY):
            body, size = spec.body, max(1, spec.chunk_size)
            for offset in range(0, len(body), size):
                macros = self._macros(c.SMFIC_BODY, None, qid)
                reply = yield self._step(result, c.STAGE_BODY, c.SMFIP_NR_BODY, macros, Body(body[offset : offset + size]))
                if isinstance(reply, codec.Skip):
                    break
                if not self._continues(reply):
                    return self._end(result, c.STAGE_BODY, reply)
        macros = self._macros(c.SMFIC_BODYEOB, c.SMFIM_EOM, qid)
        reply = yield self._step(result, c.STAGE_EOM, 0, macros, EndOfMessage())
        return self._end(result, c.STAGE_EOM, reply)

    # -- ending --------------------------------------------------------------------------------
    def abort(self) -> None:
        """ABORT: end the current transaction (no reply)."""
        self.send(Abort())

    def quit_nc(self) -> None:
        """QUIT_NC: end the SMTP session but keep the connection; the next message sends CONNECT again."""
        self.send(QuitNoClose())
        self.connected = False
        self.session_refused = False
        self.messages = 0

    def close(self) -> "Deferred[None]":
        """ABORT (after a message) + QUIT, then close; fires when the connection is gone."""
        if self.protocol.lost is None:
            commands: List[Command] = [Abort()] if self.messages else []
            self.send(*commands, Quit())
            self.protocol.transport.loseConnection()
        return self.protocol.when_lost()
