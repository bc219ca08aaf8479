"""Greylisting (SPEC §6.2). Placeholder until issue 6 lands."""
from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from rmilter.context import MessageContext
from rmilter.verdict import CheckResult


def check(msg: MessageContext, with_data_hash: bool) -> "Deferred[CheckResult]":
    return succeed(CheckResult("greylist", "not checked"))
