"""Verdicts, edits, check results and the one place that orders them (SPEC §5.9, §5.13).

Checks never talk to the MTA: each returns a ``CheckResult`` (what it found, what
it would like to change, whether it demands a final answer).  ``decide`` turns
the results of one message into the single ``Verdict`` the milter sends, with
the precedence of SPEC §5.9 visible in ``precedence``.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, FrozenSet, Iterable, Mapping, Optional, Tuple, Union


class MessageAbandoned(Exception):
    """The MTA went away while the message waited for its checks: no further check starts.

    The failure a stage's Deferred ends with then; the milter session drops it quietly."""


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
# The domain's edits, keyword-only so that no caller can mix up the order of name and index;
# rmilter.milter.session turns them into milter packets.
@dataclass(frozen=True, kw_only=True)
class AddHeader:
    """Append a header after the last one."""

    name: str
    value: str


@dataclass(frozen=True, kw_only=True)
class InsertHeader:
    """Insert a header before the ``index``-th one (0 = at the top)."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, kw_only=True)
class ChangeHeader:
    """Change the ``index``-th (1-based) occurrence of ``name``; an empty value deletes it."""

    name: str
    index: int
    value: str


@dataclass(frozen=True, kw_only=True)
class AddRecipient:
    address: str
    esmtp_args: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class DeleteRecipient:
    address: str


@dataclass(frozen=True, kw_only=True)
class ChangeFrom:
    address: str
    esmtp_args: Optional[str] = None


@dataclass(frozen=True, kw_only=True)
class ReplaceBody:
    data: bytes


@dataclass(frozen=True, kw_only=True)
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


#: issue 18: the header section is above what one message may hold in memory
HEADERS_TOO_LARGE = Verdict(Action.REJECT, SmtpReply("552", "5.3.4", "Message header section too large"))

#: SPEC §5.13 fixed texts
SERVICE_FAILURE = "Temporary service failure."
RATE_LIMIT_EXCEEDED = "Rate limit exceeded"


# -- what a check found -------------------------------------------------------------------------
class Check(enum.Enum):
    """Every check of the pipeline, by the name logs and metrics use."""

    RATELIMIT = "ratelimit"
    GREYLIST = "greylist"
    REPLIES = "replies"
    SPAM = "spam"
    VIRUS = "virus"
    COPIES = "copies"
    DKIM = "dkim"
    TRACE = "trace"

    #: members are singletons: identity hashing is right, and much cheaper than Enum's own
    __hash__ = object.__hash__


@dataclass(frozen=True)
class CheckResult:
    """What one check found about one message: the one shape every check returns.

    ``summary`` is the check's value in the summary line (SPEC §8.4 S/V/D values).
    ``verdict`` is set when the check demands a final answer (reject, tempfail, discard);
    ``edits`` are applied only when the message ends accepted.  ``failed``: the check could
    not be carried out (a backend failure), whatever the configuration made of it;
    ``skipped``: the check did not run (``summary`` says why).  ``details`` are the
    structured fields of the summary event (server, score, virus name, ...).
    """

    check: Check
    summary: str
    verdict: Optional[Verdict] = None
    edits: Tuple[Edit, ...] = ()
    details: Mapping[str, object] = field(default_factory=dict)
    failed: bool = False
    skipped: bool = False
    #: dry run: what the check demanded and did not get, as "reject", "defer", "discard" or
    #: "quarantine" (``dry_run_result``); None when the check runs for real or wanted nothing
    would: Optional[str] = None
    #: dry run: the verdict it demanded (its reply text is what the MTA would have been told)
    would_verdict: Optional[Verdict] = None

    @property
    def demands_verdict(self) -> bool:
        return self.verdict is not None and self.verdict.ends_message


@functools.lru_cache(maxsize=256)
def skipped(check: Check, reason: str) -> CheckResult:
    """The result of a check the pipeline (or the check itself) decided not to run.

    The same few reasons come up for every message: each is made once (results are frozen).
    """
    return CheckResult(check, reason, skipped=True)


# -- dry run: a check runs and records as usual, the message goes on as if it had passed ---------
#: what the summary says a demanded verdict would have done
_WOULD = MappingProxyType({Action.REJECT: "reject", Action.TEMPFAIL: "defer", Action.DISCARD: "discard"})
#: the first part of a summary that names the action taken; "would ..." replaces it
_TAKEN = frozenset(("rejected", "delayed", "discarded", "quarantined"))


def dry_run_checks(config: Any) -> FrozenSet[Check]:
    """The checks of ``config`` whose demanded verdicts are only reported (``dry_run = yes``).

    The global ``dry_run`` covers every check that can end a message; each section's its own.
    Computed once per configuration generation (``rmilter.runtime.Runtime``).
    """
    if config.main.dry_run:
        return frozenset((Check.RATELIMIT, Check.GREYLIST, Check.SPAM, Check.VIRUS))
    chosen = set()
    if config.limits.dry_run:
        chosen.add(Check.RATELIMIT)
    if config.greylisting.dry_run:
        chosen.add(Check.GREYLIST)
    if config.spamd.dry_run:
        chosen.add(Check.SPAM)
    if config.clamav.dry_run:
        chosen.add(Check.VIRUS)
    return frozenset(chosen)


def dry_run_result(result: CheckResult) -> CheckResult:
    """The result of a check in dry run: what it would have done instead of doing it.

    A demanded reject/tempfail/discard (or a quarantine edit) is dropped and named in
    ``would``; the summary says ``would reject, action: reject`` where it said ``rejected,
    action: reject``.  Everything else (the note, the details, the other edits) stays, so the
    message goes on exactly as if the check had passed.  Results that want nothing pass as they are.
    """
    edits = result.edits
    quarantined = any(isinstance(e, Quarantine) for e in edits)
    if not result.demands_verdict and not quarantined:
        return result
    if result.demands_verdict:
        assert result.verdict is not None
        would = _WOULD[result.verdict.action]
        would_verdict: Optional[Verdict] = result.verdict
    else:
        would = "quarantine"
        edits = tuple(e for e in edits if not isinstance(e, Quarantine))
        would_verdict = Verdict(Action.ACCEPT, edits=tuple(e for e in result.edits if isinstance(e, Quarantine)))
    first, comma, rest = result.summary.partition(", ")
    summary = "would %s, %s" % (would, rest if comma and first in _TAKEN else result.summary)
    return dataclasses.replace(result, summary=summary, verdict=None, edits=edits, would=would,
                               would_verdict=would_verdict)


#: SPEC §5.9: the order in which a demanded final answer wins.  An Rspamd scan that failed with
#: tempfail_on_error (step 4a) comes first, then EOM greylisting (4b), Rspamd's action (4c), and
#: clamd (8: a virus, or clamd unusable with tempfail_on_error).  Other checks never demand one
#: at EOM; among equals the first result wins.
_RANK: Mapping[Check, int] = MappingProxyType({Check.GREYLIST: 1, Check.SPAM: 2, Check.VIRUS: 3})
_UNRANKED = len(_RANK) + 1


def precedence(result: CheckResult) -> int:
    """Lower wins (SPEC §5.9)."""
    if result.check is Check.SPAM and result.failed:
        return 0
    return _RANK.get(result.check, _UNRANKED)


def deciding_result(results: Iterable[CheckResult]) -> Optional[CheckResult]:
    """The result whose demanded verdict wins, in ``precedence`` order, or None."""
    demanding = [r for r in results if r.demands_verdict]
    if not demanding:
        return None
    return min(demanding, key=precedence)  # min keeps the first of equals


def decide(results: Iterable[CheckResult]) -> Verdict:
    """Turn the results of the EOM checks into the final verdict.

    The result that wins by ``precedence`` decides it; edits queued by the checks are
    dropped with it (SPEC §5.9 allows it, the MTA would discard them).  Otherwise the
    message is accepted with the edits of every check, in the order the checks ran.
    """
    ordered = list(results)
    winner = deciding_result(ordered)
    if winner is not None:
        assert winner.verdict is not None
        return winner.verdict
    edits: Tuple[Edit, ...] = ()
    for result in ordered:
        edits += result.edits
    return Verdict(Action.ACCEPT, edits=edits)


# -- reply text sanitising (SPEC §3.7, B34) --------------------------------------------------
_MAX_REPLY_TEXT = 980
#: C0/C1 controls and the Unicode line separators: none may reach a reply line or a header
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def encodable(text: str) -> str:
    """``text`` with lone surrogates (invalid UTF-8 from a backend, JSON ``\\ud800``) as U+FFFD,
    so that encoding it as UTF-8 cannot fail (issue 18)."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


def sanitise_reply_text(text: Optional[str]) -> Optional[str]:
    """Make text usable in a single-line ``y`` reply, or return None when it is not.

    CR, LF and other control characters become spaces; a lone ``%`` is doubled
    (Postfix drops single ``%`` and turns ``%%`` into ``%``); text longer than
    libmilter's limit is cut at a character boundary.
    """
    if text is None:
        return None
    text = _CONTROL.sub(" ", encodable(text)).strip()
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


_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u2028\u2029]")


def header_value_safe(value: str) -> str:
    """Header values from backends may not inject headers: CR/LF only as folding (SPEC §6.8.5).

    Lines of only blanks are dropped (a blank line would end the header section), other
    controls become spaces and lone surrogates U+FFFD, so every value can be encoded.
    """
    value = encodable(value.replace("\r", ""))
    lines = [_HEADER_CONTROL.sub(" ", line) for line in value.split("\n")]
    out = [lines[0]]
    for line in lines[1:]:
        if not line.strip():
            continue
        out.append(line if line[0] in " \t" else " " + line)
    return "\n".join(out)
