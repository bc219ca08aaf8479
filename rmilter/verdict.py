"""Verdicts, header edits and the one place that orders check results (SPEC §5.9, §5.13).

Checks never talk to the MTA: each returns a ``CheckResult`` (what it found, what
it would like to change, whether it demands a final answer).  ``decide`` turns
the results of one message into the single ``Verdict`` the milter sends, with
the precedence of SPEC §5.9 visible in one list.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple, Union


class Action(enum.Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"


@dataclass(frozen=True)
class SmtpReply:
    """A single-line SMTP reply ``code ecode text`` (SPEC §3.7)."""

    code: str  # "451", "554"
    ecode: str  # "4.7.1"
    text: str


# -- message modifications (EOM only) ------------------------------------------------------
@dataclass(frozen=True)
class AddHeader:
    name: str
    value: str


@dataclass(frozen=True)
class InsertHeader:
    index: int  # 0 = top
    name: str
    value: str


@dataclass(frozen=True)
class ChangeHeader:
    """Change the ``index``-th (1-based) occurrence of ``name``; empty value deletes it."""

    name: str
    index: int
    value: str


@dataclass(frozen=True)
class AddRecipient:
    address: str
    esmtp_args: Optional[str] = None


@dataclass(frozen=True)
class DeleteRecipient:
    address: str


@dataclass(frozen=True)
class ChangeFrom:
    address: str
    esmtp_args: Optional[str] = None


@dataclass(frozen=True)
class ReplaceBody:
    data: bytes


@dataclass(frozen=True)
class Quarantine:
    reason: str


Edit = Union[
    AddHeader, InsertHeader, ChangeHeader, AddRecipient, DeleteRecipient, ChangeFrom, ReplaceBody, Quarantine
]


@dataclass(frozen=True)
class Verdict:
    """The answer to one milter command: an action, maybe a reply text, and (at EOM) edits."""

    action: Action
    reply: Optional[SmtpReply] = None
    edits: Tuple[Edit, ...] = ()

    @property
    def ends_message(self) -> bool:
        return self.action is not Action.CONTINUE


CONTINUE = Verdict(Action.CONTINUE)
ACCEPT = Verdict(Action.ACCEPT)
#: internal errors: a bare TEMPFAIL, the MTA uses its own text (SPEC §5.13)
BARE_TEMPFAIL = Verdict(Action.TEMPFAIL)


def tempfail(text: str) -> Verdict:
    return Verdict(Action.TEMPFAIL, SmtpReply("451", "4.7.1", text))


def reject(text: str) -> Verdict:
    return Verdict(Action.REJECT, SmtpReply("554", "5.7.1", text))


#: SPEC §5.13 fixed texts
SERVICE_FAILURE = "Temporary service failure."
RATE_LIMIT_EXCEEDED = "Rate limit exceeded"


@dataclass(frozen=True)
class CheckResult:
    """What one check found about one message.

    ``log`` is the check's value in the summary line (SPEC §8.4 S/V/D values).
    ``verdict`` is set when the check demands a final answer (reject, tempfail);
    ``edits`` are applied only when the message ends accepted.
    """

    check: str
    log: str
    verdict: Optional[Verdict] = None
    edits: Tuple[Edit, ...] = ()
    #: extra structured fields for the summary event (server, score, virus name, ...)
    details: Tuple[Tuple[str, object], ...] = ()
    #: True when the check could not be carried out (backend failure)
    failed: bool = False


#: SPEC §5.9: the order in which a demanded final answer wins.
#: spam_failure: rspamd unusable with tempfail_on_error (step 4a)
#: greylist: EOM greylisting after rspamd's verdict (4b)
#: spam: rspamd's reject / soft reject (4c)
#: virus: a virus found, or clamd unusable with tempfail_on_error (8)
PRECEDENCE = ("spam_failure", "greylist", "spam", "virus")


def deciding_result(results: Iterable[CheckResult]) -> Optional[CheckResult]:
    """The result whose demanded verdict wins, in ``PRECEDENCE`` order, or None."""
    rank = {name: i for i, name in enumerate(PRECEDENCE)}
    demanding = [r for r in results if r.verdict is not None and r.verdict.ends_message]
    if not demanding:
        return None
    return min(demanding, key=lambda r: rank.get(r.check, len(PRECEDENCE)))  # first of equals wins


def decide(results: Iterable[CheckResult]) -> Verdict:
    """Turn the results of the EOM checks into the final verdict.

    The first result, in ``PRECEDENCE`` order, that demands a verdict decides it;
    modifications queued by the checks are dropped with it (SPEC §5.9 allows it,
    the MTA would discard them).  Otherwise the message is accepted with the
    edits of every check, in the order the checks ran.
    """
    ordered = list(results)
    winner = deciding_result(ordered)
    if winner is not None:
        return winner.verdict  # type: ignore[return-value]
    edits: Tuple[Edit, ...] = ()
    for result in ordered:
        edits += result.edits
    return Verdict(Action.ACCEPT, edits=edits)


# -- reply text sanitising (SPEC §3.7, B34) --------------------------------------------------
_MAX_REPLY_TEXT = 980
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def sanitise_reply_text(text: Optional[str]) -> Optional[str]:
    """Make text usable in a single-line ``y`` reply, or return None when it is not.

    CR, LF and other control characters become spaces; a lone ``%`` is doubled
    (Postfix drops single ``%`` and turns ``%%`` into ``%``); text longer than
    libmilter's limit is cut at a character boundary.
    """
    if text is None:
        return None
    text = _CONTROL.sub(" ", text).strip()
    if not text:
        return None
    text = text.replace("%", "%%")
    encoded = text.encode("utf-8")
    if len(encoded) > _MAX_REPLY_TEXT:
        text = encoded[:_MAX_REPLY_TEXT].decode("utf-8", "ignore")
        if text.endswith("%") and not text.endswith("%%"):
            text = text[:-1]
    return text


_CODE = re.compile(r"^[245][0-9][0-9]$")
_ECODE = re.compile(r"^[245]\.[0-9]{1,3}\.[0-9]{1,3}$")


def reply_line(action: Action, reply: Optional[SmtpReply]) -> Optional[str]:
    """The ``y`` payload for a verdict, or None to send the bare verdict (SPEC §3.7).

    The first digit must agree with the action (4 = TEMPFAIL, 5 = REJECT) and the
    enhanced code's class must equal it, else the bare verdict is used.
    """
    if reply is None or action not in (Action.REJECT, Action.TEMPFAIL):
        return None
    digit = "4" if action is Action.TEMPFAIL else "5"
    if not _CODE.match(reply.code) or reply.code[0] != digit:
        return None
    if not _ECODE.match(reply.ecode) or reply.ecode[0] != digit:
        return None
    text = sanitise_reply_text(reply.text)
    if text is None:
        return None
    return "%s %s %s" % (reply.code, reply.ecode, text)


def header_value_safe(value: str) -> str:
    """Header values from backends may not inject headers: CR/LF only as folding (SPEC §6.8.5)."""
    value = value.replace("\r", "")
    lines = value.split("\n")
    out = [lines[0]]
    for line in lines[1:]:
        if not line:
            continue
        out.append(line if line[0] in " \t" else " " + line)
    return "\n".join(out)


def merge_edits(*groups: Sequence[Edit]) -> Tuple[Edit, ...]:
    result: Tuple[Edit, ...] = ()
    for g in groups:
        result += tuple(g)
    return result
