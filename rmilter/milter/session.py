"""One milter connection as a state machine: decoded commands in, reply bytes out (SPEC §3, §5).

``MilterSession`` owns the ``ConnectionContext`` and the message in flight (whatever ``pipeline.mail`` returned)
and calls the pipeline once per stage.  It knows nothing of sockets: ``handle``
returns the bytes answering a command (``None`` when nothing is due) or a
Deferred of them when the pipeline is still working, and sets
``close_requested`` when the connection must end.  The caller hands it one
command at a time and waits for a returned Deferred before the next one; that
keeps commands in order while the MTA streams no-reply steps.

States and the commands allowed in each are data (``TRANSITIONS``).  A command
that is not allowed in the current state is answered CONTINUE (when a reply is
due) and changes nothing (SPEC §3.8): the filter never crashes on a confused MTA.
"""
from __future__ import annotations

import enum
import socket
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

from twisted.internet.defer import Deferred
from rmilter.log import Logger
from twisted.python.failure import Failure

from rmilter.context import ConnectionContext
from rmilter.milter import codec
from rmilter.milter import constants as c
from rmilter.milter.budget import WarningBudget
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
    Unknown,
)
from rmilter import verdict as verdicts
from rmilter.verdict import BARE_TEMPFAIL, CONTINUE, Action, MessageAbandoned, Verdict

log = Logger(namespace="rmilter.milter")

#: what ``handle`` gives back: reply bytes, nothing, or a Deferred of either
Outcome = Union[bytes, None, "Deferred[Optional[bytes]]"]


class State(enum.Enum):
    NEGOTIATING = "negotiating"  # waiting for OPTNEG
    CONNECTING = "connecting"  # negotiated (or after QUIT_NC): waiting for CONNECT
    CONNECTED = "connected"  # between transactions: HELO and MAIL allowed
    ENVELOPE = "envelope"  # after MAIL: recipients
    HEADERS = "headers"  # after DATA or the first header
    BODY = "body"  # after EOH or the first body chunk
    CLOSED = "closed"


_IN_MESSAGE = (State.ENVELOPE, State.HEADERS, State.BODY)

#: (state, command) -> next state.  Missing pairs are "unexpected" (SPEC §3.8).
#: MACRO is accepted everywhere and never changes the state.
TRANSITIONS: Dict[State, Dict[type, State]] = {
    State.NEGOTIATING: {Negotiate: State.CONNECTING},
    State.CONNECTING: {Connect: State.CONNECTED},
    State.CONNECTED: {Helo: State.CONNECTED, Mail: State.ENVELOPE},
    State.ENVELOPE: {
        Mail: State.ENVELOPE,
        Rcpt: State.ENVELOPE,
        Data: State.HEADERS,
        Header: State.HEADERS,
        EndOfHeaders: State.BODY,
        Body: State.BODY,
        EndOfMessage: State.CONNECTED,
    },
    State.HEADERS: {
        Mail: State.ENVELOPE,
        Header: State.HEADERS,
        EndOfHeaders: State.BODY,
        Body: State.BODY,
        EndOfMessage: State.CONNECTED,
    },
    State.BODY: {Mail: State.ENVELOPE, Body: State.BODY, EndOfMessage: State.CONNECTED},
    State.CLOSED: {},
}
#: allowed in every state once negotiated: (command, next state or None for "unchanged")
_ANYWHERE: Dict[type, Optional[State]] = {
    Negotiate: State.CONNECTING,  # a second OPTNEG starts over
    Abort: None,  # a transaction (if any) ends: handled below
    Unknown: None,
    Quit: State.CLOSED,
    QuitNoClose: State.CONNECTING,
}
for _state, _allowed in TRANSITIONS.items():
    if _state not in (State.NEGOTIATING, State.CLOSED):
        for _kind, _target in _ANYWHERE.items():
            _allowed.setdefault(_kind, _state if _target is None else _target)
del _state, _allowed, _kind, _target

#: the same table for the hot path: (state, command) -> (next state, what that state allows),
#: so ``handle`` needs no Enum hashing
_STEPS: Dict[State, Dict[type, Tuple[State, Dict[type, Any]]]] = {
    state: {} for state in TRANSITIONS
}
for _state, _allowed in TRANSITIONS.items():
    for _kind, _target in _allowed.items():
        _STEPS[_state][_kind] = (_target, _STEPS[_target])
del _state, _allowed, _kind, _target

#: the stage (as in ``Pipeline.stages_needing_replies``) each replied-to command belongs to
STAGES: Dict[type, str] = {
    Connect: c.STAGE_CONNECT,
    Helo: c.STAGE_HELO,
    Mail: c.STAGE_MAIL,
    Rcpt: c.STAGE_RCPT,
    Data: c.STAGE_DATA,
    Header: c.STAGE_HEADER,
    EndOfHeaders: c.STAGE_EOH,
    Body: c.STAGE_BODY,
    EndOfMessage: c.STAGE_EOM,
    Unknown: c.STAGE_UNKNOWN,
}
#: commands the MTA never waits for
_NO_REPLY = (Macro, Abort, Quit, QuitNoClose)


#: negotiation results by (offer, stages needing replies, no_reply_steps): an MTA makes the
#: same offer on every connection, and Postfix opens one per SMTP session
_NEGOTIATIONS: Dict[Tuple[Any, ...], Tuple[codec.Negotiated, bytes]] = {}


def client_address(family: str, address: Optional[str]) -> Optional[str]:
    """The client IP as canonical text (SPEC §5.2); unix clients are 127.0.0.1 (B20)."""
    if family == c.SMFIA_UNIX:
        return "127.0.0.1"
    if address is None or family == c.SMFIA_UNKNOWN:
        return None
    text = address
    if text[:5].lower() == "ipv6:":  # Sendmail writes IPv6 clients as "IPv6:2001:db8::1"
        text = text[5:]
    af = socket.AF_INET6 if family == c.SMFIA_INET6 else socket.AF_INET
    try:
        return socket.inet_ntop(af, socket.inet_pton(af, text.split("%", 1)[0]))
    except (OSError, ValueError):
        return address  # keep what the MTA said; IP lists simply will not match it


class MilterSession:
    """Drives the pipeline from the commands of one milter connection.

    ``no_reply_steps`` asks the MTA (SMFIP_NR_*) not to wait for the stages
    whose answer is always CONTINUE.  ``message_started`` is called when
    ``pipeline.mail`` made a message, ``message_finished`` after its
    ``pipeline.finish`` (the factory counts messages in flight with them).
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        no_reply_steps: bool = True,
        message_started: Callable[[], None] = lambda: None,
        message_finished: Callable[[], None] = lambda: None,
        peer: str = "",
    ) -> None:
        self.pipeline = pipeline
        self.no_reply_steps = no_reply_steps
        self.message_started = message_started
        self.message_finished = message_finished
        self.peer = peer
        self.state = State.NEGOTIATING
        self._allowed = _STEPS[State.NEGOTIATING]
        self.connection = ConnectionContext()
        #: what ``pipeline.mail`` returned for the message in flight (it has a ``tag``), handed
        #: back to every later stage; the session never looks inside
        self.message: Optional[Any] = None
        #: agreed at OPTNEG
        self.version = 0
        self.actions = 0
        self.protocol = 0
        self.silent_stages: FrozenSet[str] = frozenset()
        #: set when the caller must close the connection (after writing what was returned)
        self.close_requested = False
        #: the stage whose pipeline Deferred is pending, if any (for PROGRESS keep-alives)
        self.waiting_stage: Optional[str] = None
        self._lost = False
        #: protocol warnings of this connection, rate-limited (a hostile peer cannot flood the log)
        self.warnings = WarningBudget(peer)
        #: a verdict that ended the message at a stage where the MTA expects no reply:
        #: it is given at the next stage that has one (SPEC §3.4 NR_*)
        self._owed: Optional[Verdict] = None

    # -- entry points ------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A message is in flight or a pipeline call is pending."""
        return self.message is not None or self.waiting_stage is not None

    def handle(self, command: Any) -> Outcome:
        """Process one decoded command; see the module docstring for what comes back."""
        kind = type(command)
        if kind is Macro:
            if not self.connection.macros.define(command.stage, command.macros):
                self.warnings.warn("{tag}; macros for unknown stage {stage!r} from {peer} dropped",
                                   tag=self._tag(), stage=command.stage, peer=self.peer)
            return None
        step = self._allowed.get(kind)
        if step is None:
            return self._unexpected(command)
        self.state, self._allowed = step
        return _HANDLERS[kind](self, command)

    def _enter(self, state: State) -> None:
        self.state = state
        self._allowed = _STEPS[state]

    def connection_lost(self) -> None:
        """The MTA went away (SPEC §5.10: like QUIT).

        A pending pipeline call is told to give up (``abandon``: its scans cancelled, nothing more
        started) and the message ends when that call returns."""
        self._lost = True
        self.warnings.close()
        self._enter(State.CLOSED)
        if self.waiting_stage is None:
            self._end_message(None)
        elif self.message is not None:
            self.pipeline.abandon(self.message)

    # -- helpers -----------------------------------------------------------------------------
    def _tag(self) -> str:
        return self.message.tag if self.message is not None else "-"

    def _unexpected(self, command: Any) -> Outcome:
        self.warnings.warn(
            "{tag}; unexpected {command} in state {state} from {peer}; answered CONTINUE",
            tag=self._tag(),
            command=type(command).__name__,
            state=self.state.value,
            peer=self.peer,
        )
        if isinstance(command, _NO_REPLY) or self.state in (State.NEGOTIATING, State.CLOSED):
            if self.state is State.NEGOTIATING:
                self.close_requested = True  # nothing can be answered before OPTNEG
            return None
        if STAGES.get(type(command)) in self.silent_stages:
            return None
        return codec.CONTINUE_PACKET

    def _end_message(self, verdict: Optional[Verdict]) -> None:
        """``pipeline.finish`` exactly once per message."""
        msg = self.message
        if msg is None:
            return
        self.message = None
        self._owed = None
        try:
            self.pipeline.finish(msg, verdict)
        except Exception:
            log.failure("{tag}; error while finishing the message", tag=msg.tag)
        self.message_finished()

    def _call(self, stage: str, f: Callable[..., Any], *args: Any) -> Any:
        """A synchronous pipeline call that must not take the connection down."""
        try:
            return f(*args)
        except Exception:
            log.failure("{tag}; internal error at {stage}", tag=self._tag(), stage=stage)
            return BARE_TEMPFAIL

    def _checked(self, stage: str, verdict: Any) -> Verdict:
        """The pipeline promised a Verdict; anything else is an internal error (bare TEMPFAIL)."""
        if isinstance(verdict, Verdict):
            return verdict
        log.error("{tag}; internal error at {stage}: {verdict!r} is not a verdict", tag=self._tag(), stage=stage,
                  verdict=verdict)
        return BARE_TEMPFAIL

    def _reply(self, stage: str, verdict: Verdict) -> Optional[bytes]:
        """Bytes for a stage verdict, or None when the MTA does not wait for this stage."""
        verdict = self._checked(stage, verdict)
        if stage in self.silent_stages:
            if verdict.action is not Action.CONTINUE:
                log.warn(
                    "{tag}; cannot answer {action} at {stage}: the MTA does not wait for this step",
                    tag=self._tag(),
                    action=verdict.action.value,
                    stage=stage,
                )
            return None
        if verdict.action is Action.CONTINUE and not verdict.edits:
            return codec.CONTINUE_PACKET
        return self._packets(verdict, at_eom=(stage == c.STAGE_EOM))

    def _packets(self, verdict: Verdict, *, at_eom: bool) -> bytes:
        out = verdict_packets(verdict, at_eom=at_eom, actions=self.actions)
        for edit, reason in out.unsent:
            log.warn("{tag}; modification {edit!r} not sent: {reason}", tag=self._tag(), edit=edit, reason=reason)
        return out.data

    def _settle(self, stage: str, pending: "Deferred[Verdict]") -> Outcome:
        """Turn a pipeline Deferred into reply bytes, at once when it has already fired."""
        box: List[Any] = []
        pending.addBoth(box.append)
        if box:
            return self._answer(stage, box[0])
        self.waiting_stage = stage
        return pending.addCallback(lambda _: self._answer(stage, box[0]))

    def _answer(self, stage: str, result: Union[Verdict, Failure]) -> Optional[bytes]:
        """Reply bytes for the verdict of a (maybe asynchronous) message stage."""
        self.waiting_stage = None
        if isinstance(result, Failure):
            if not (self._lost and result.check(MessageAbandoned)):
                log.failure("{tag}; internal error at {stage}", result, tag=self._tag(), stage=stage)
            result = BARE_TEMPFAIL
        if self._lost:
            self._end_message(None)  # the connection went away while the pipeline worked
            return None
        return self._message_verdict(stage, result)

    def _message_verdict(self, stage: str, verdict: Verdict) -> Optional[bytes]:
        """Answer a message stage; a final verdict ends the message (SPEC §5.1)."""
        if verdict is CONTINUE and stage != c.STAGE_EOM:  # the shared constant: most answers
            return None if stage in self.silent_stages else codec.CONTINUE_PACKET
        verdict = self._checked(stage, verdict)
        if stage == c.STAGE_EOM:
            data = self._packets(verdict, at_eom=True)
            self._end_message(verdict)
            self._enter(State.CONNECTED)
            return data
        if verdict.action is Action.CONTINUE or stage == c.STAGE_RCPT:
            return self._reply(stage, verdict)  # a refused recipient does not end the message
        if stage in self.silent_stages:
            log.warn(
                "{tag}; {action} at {stage}, where the MTA does not wait: given at the next step",
                tag=self._tag(),
                action=verdict.action.value,
                stage=stage,
            )
            self._owed = verdict
            return None
        data = self._packets(verdict, at_eom=False)
        self._end_message(verdict)
        self._enter(State.CONNECTED)
        return data

    def _owed_verdict(self, stage: str) -> Outcome:
        """Give a verdict owed from a silent stage at the first stage the MTA waits for.

        The pipeline is not called any more for this message.  At RCPT the verdict
        refuses the recipient and stays owed (a RCPT reply cannot end a message).
        """
        verdict = self._owed
        assert verdict is not None
        if stage in self.silent_stages:
            return None
        if stage == c.STAGE_RCPT:
            return self._packets(verdict, at_eom=False)
        self._owed = None
        return self._message_verdict(stage, verdict)

    # -- command handlers --------------------------------------------------------------------
    def _negotiate(self, offer: Negotiate) -> Outcome:
        if self.message is not None:
            self._end_message(None)
        if self.version:  # a second OPTNEG starts over
            self.connection = ConnectionContext()
        needing: Sequence[str] = ()
        if self.no_reply_steps:
            try:
                needing = self.pipeline.stages_needing_replies()
            except Exception:
                log.failure("cannot tell which stages need replies; the MTA will wait for all")
                needing = tuple(c.NO_REPLY_BITS)
        key = (offer.version, offer.actions, offer.protocol, tuple(needing), self.no_reply_steps)
        cached = _NEGOTIATIONS.get(key)
        if cached is None:
            try:
                agreed = codec.negotiate(offer, stages_needing_replies=needing, no_reply_steps=self.no_reply_steps)
            except codec.NegotiationError as e:
                log.error("{peer}: {reason}; closing the connection", peer=self.peer, reason=str(e))
                self.close_requested = True
                self._enter(State.CLOSED)
                return None
            if len(_NEGOTIATIONS) >= 64:
                _NEGOTIATIONS.clear()
            cached = _NEGOTIATIONS[key] = (agreed, codec.encode(agreed.reply))
        agreed, reply = cached
        self.version, self.actions, self.protocol = agreed.version, agreed.actions, agreed.protocol
        self.silent_stages = agreed.silent_stages
        return reply

    def _connect(self, command: Connect) -> Outcome:
        conn = self.connection
        conn.hostname = command.hostname
        conn.family = command.family
        conn.client_address = client_address(command.family, command.address)
        conn.client_port = command.port
        return self._reply(c.STAGE_CONNECT, self._call(c.STAGE_CONNECT, self.pipeline.connect, conn))

    def _helo(self, command: Helo) -> Outcome:
        return self._reply(c.STAGE_HELO, self._call(c.STAGE_HELO, self.pipeline.helo, self.connection, command.helo))

    def _mail(self, command: Mail) -> Outcome:
        if self.message is not None:
            self._end_message(None)  # a new MAIL without ABORT (SPEC §5.1, B4)
        try:
            msg, verdict = self.pipeline.mail(self.connection, command.argv)
        except Exception:
            log.failure("internal error at MAIL from {peer}", peer=self.peer)
            self._enter(State.CONNECTED)
            return self._reply(c.STAGE_MAIL, BARE_TEMPFAIL)
        self.message = msg
        self.message_started()
        return self._message_verdict(c.STAGE_MAIL, verdict)

    def _rcpt(self, command: Rcpt) -> Outcome:
        if self._owed is not None:
            return self._owed_verdict(c.STAGE_RCPT)
        msg = self.message
        return self._settle(c.STAGE_RCPT, self._deferred(c.STAGE_RCPT, self.pipeline.rcpt, msg, command.argv))

    def _data(self, command: Data) -> Outcome:
        if self._owed is not None:
            return self._owed_verdict(c.STAGE_DATA)
        msg = self.message
        return self._settle(c.STAGE_DATA, self._deferred(c.STAGE_DATA, self.pipeline.data, msg))

    def _header(self, command: Header) -> Outcome:
        if self._owed is not None:
            return self._owed_verdict(c.STAGE_HEADER)
        verdict = self._call(c.STAGE_HEADER, self.pipeline.header, self.message, command.name, command.value)
        return self._message_verdict(c.STAGE_HEADER, verdict)

    def _eoh(self, command: EndOfHeaders) -> Outcome:
        if self._owed is not None:
            return self._owed_verdict(c.STAGE_EOH)
        return self._message_verdict(c.STAGE_EOH, self._call(c.STAGE_EOH, self.pipeline.eoh, self.message))

    def _body(self, command: Body) -> Outcome:
        if self._owed is not None:
            return self._owed_verdict(c.STAGE_BODY)
        msg = self.message
        return self._settle(c.STAGE_BODY, self._deferred(c.STAGE_BODY, self.pipeline.body, msg, command.chunk))

    def _eom(self, command: EndOfMessage) -> Outcome:
        if self._owed is not None:
            return self._owed_verdict(c.STAGE_EOM)
        msg = self.message
        if not command.chunk:
            return self._settle(c.STAGE_EOM, self._deferred(c.STAGE_EOM, self.pipeline.eom, msg))
        # Sendmail may attach the last body piece to EOB: BODY, then EOM (SPEC §3.2)
        pending = self._deferred(c.STAGE_BODY, self.pipeline.body, msg, command.chunk)

        def after_body(verdict: Verdict) -> Any:
            if verdict.action is not Action.CONTINUE:
                return verdict
            return self._deferred(c.STAGE_EOM, self.pipeline.eom, msg)

        return self._settle(c.STAGE_EOM, pending.addCallback(after_body))

    def _deferred(self, stage: str, f: Callable[..., "Deferred[Verdict]"], *args: Any) -> "Deferred[Verdict]":
        """A Deferred-returning pipeline call; an exception becomes a failed Deferred."""
        try:
            return f(*args)
        except Exception:
            d: "Deferred[Verdict]" = Deferred()
            d.errback(Failure())
            return d

    def _unknown(self, command: Unknown) -> Outcome:
        return self._reply(c.STAGE_UNKNOWN, CONTINUE)

    def _abort(self, command: Abort) -> Outcome:
        """End the transaction, if any; outside one ABORT is ignored (SPEC §3.6)."""
        if self.state in _IN_MESSAGE:
            self._end_message(None)
            self._enter(State.CONNECTED)
        return None

    def _quit(self, command: Quit) -> Outcome:
        self._end_message(None)
        self.connection.macros.clear()
        self.close_requested = True
        return None

    def _quit_nc(self, command: QuitNoClose) -> Outcome:
        """End the SMTP session, keep the socket: a new CONNECT follows, no new OPTNEG."""
        self._end_message(None)
        self.connection = ConnectionContext()
        return None


#: the handler of each command (MACRO is handled inline in ``handle``)
_HANDLERS: Dict[type, Callable[[MilterSession, Any], Outcome]] = {
    Negotiate: MilterSession._negotiate,
    Connect: MilterSession._connect,
    Helo: MilterSession._helo,
    Mail: MilterSession._mail,
    Rcpt: MilterSession._rcpt,
    Data: MilterSession._data,
    Header: MilterSession._header,
    EndOfHeaders: MilterSession._eoh,
    Body: MilterSession._body,
    EndOfMessage: MilterSession._eom,
    Unknown: MilterSession._unknown,
    Abort: MilterSession._abort,
    Quit: MilterSession._quit,
    QuitNoClose: MilterSession._quit_nc,
}


# -- the domain's verdicts and edits as milter packets -------------------------------------------


@dataclass(frozen=True)
class VerdictPackets:
    """The bytes answering one command, and the edits that could not be sent (with why)."""

    data: bytes
    unsent: Tuple[Tuple[verdicts.Edit, str], ...] = ()


_EDIT_ACTIONS: Dict[type, int] = {
    verdicts.AddHeader: c.SMFIF_ADDHDRS,
    verdicts.InsertHeader: c.SMFIF_ADDHDRS,
    verdicts.ChangeHeader: c.SMFIF_CHGHDRS,
    verdicts.DeleteRecipient: c.SMFIF_DELRCPT,
    verdicts.ChangeFrom: c.SMFIF_CHGFROM,
    verdicts.ReplaceBody: c.SMFIF_CHGBODY,
    verdicts.Quarantine: c.SMFIF_QUARANTINE,
}


def _edit_action(edit: verdicts.Edit) -> int:
    if isinstance(edit, verdicts.AddRecipient):
        return c.SMFIF_ADDRCPT if edit.esmtp_args is None else c.SMFIF_ADDRCPT_PAR
    return _EDIT_ACTIONS[type(edit)]


def edit_replies(edit: verdicts.Edit) -> Tuple[codec.Reply, ...]:
    """The modification replies carrying one edit (a body replacement may need several)."""
    if isinstance(edit, verdicts.AddHeader):
        return (codec.AddHeaderReply(edit.name, edit.value),)
    if isinstance(edit, verdicts.InsertHeader):
        return (codec.InsertHeaderReply(edit.index, edit.name, edit.value),)
    if isinstance(edit, verdicts.ChangeHeader):
        return (codec.ChangeHeaderReply(edit.index, edit.name, edit.value),)
    if isinstance(edit, verdicts.AddRecipient):
        if edit.esmtp_args is None:
            return (codec.AddRecipientReply(edit.address),)
        return (codec.AddRecipientParReply(edit.address, edit.esmtp_args),)
    if isinstance(edit, verdicts.DeleteRecipient):
        return (codec.DeleteRecipientReply(edit.address),)
    if isinstance(edit, verdicts.ChangeFrom):
        return (codec.ChangeFromReply(edit.address, edit.esmtp_args),)
    if isinstance(edit, verdicts.ReplaceBody):
        size = c.MILTER_CHUNK_SIZE
        data = edit.data
        return tuple(codec.ReplaceBodyReply(data[i : i + size]) for i in range(0, len(data), size)) or (codec.ReplaceBodyReply(b""),)
    if isinstance(edit, verdicts.Quarantine):
        return (codec.QuarantineReply(edit.reason),)
    raise TypeError("not an edit: %r" % (edit,))


def final_packet(action: verdicts.Action, reply: Optional[verdicts.SmtpReply]) -> bytes:
    """The one verdict packet: ``c a d``, or ``y`` with a usable reply line, else bare ``r``/``t``."""
    if action is verdicts.Action.CONTINUE:
        return codec.CONTINUE_PACKET
    if action is verdicts.Action.ACCEPT:
        return codec.ACCEPT_PACKET
    if action is verdicts.Action.DISCARD:
        return codec.DISCARD_PACKET
    line = verdicts.reply_line(action, reply)
    if line is not None:
        return codec.encode(codec.ReplyCode(line))
    return codec.REJECT_PACKET if action is verdicts.Action.REJECT else codec.TEMPFAIL_PACKET


def verdict_packets(verdict: verdicts.Verdict, *, at_eom: bool, actions: int) -> VerdictPackets:
    """Everything that answers one command with ``verdict``, as one bytes object.

    Edits are sent only at end of message, only when the message is delivered
    (ACCEPT/CONTINUE: the MTA would discard them otherwise, SPEC §5.9) and only for
    negotiated actions; the others come back in ``unsent`` for the caller to log.
    """
    edits = verdict.edits
    if not edits:
        return VerdictPackets(final_packet(verdict.action, verdict.reply))
    packets: List[bytes] = []
    unsent: List[Tuple[verdicts.Edit, str]] = []
    delivered = verdict.action in (verdicts.Action.ACCEPT, verdicts.Action.CONTINUE)
    for edit in edits:
        if not at_eom:
            unsent.append((edit, "modifications are only allowed at end of message"))
        elif not delivered:
            unsent.append((edit, "message not delivered (%s)" % (verdict.action.value,)))
        elif not actions & _edit_action(edit):
            unsent.append((edit, "action 0x%x not negotiated with the MTA" % (_edit_action(edit),)))
        else:
            try:
                packets.extend(codec.encode(r) for r in edit_replies(edit))
            except ValueError as e:
                unsent.append((edit, str(e)))
    packets.append(final_packet(verdict.action, verdict.reply))
    return VerdictPackets(b"".join(packets), tuple(unsent))
