"""Spam scanning with Rspamd (SPEC §5.9 steps 4-5, §6.8). Placeholder until issue 4 lands."""
from __future__ import annotations

from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed

from rmilter.context import MessageContext
from rmilter.verdict import CheckResult


@dataclass(frozen=True)
class SpamOutcome:
    """An rspamd scan as the pipeline needs it.

    ``result.check`` is "spam" (or "spam_failure" when the scan failed and
    ``tempfail_on_error`` turns that into a TEMPFAIL); ``action`` is rspamd's action
    name; ``wants_greylist`` is True for greylist / add header / rewrite subject;
    ``rejected`` is True when rspamd said reject (before ``spamd_never_reject``).
    """

    result: CheckResult
    action: str = "no action"
    wants_greylist: bool = False
    rejected: bool = False


def scan(msg: MessageContext, dkim_only: bool) -> "Deferred[SpamOutcome]":
    return succeed(SpamOutcome(CheckResult("spam", "unknown")))
