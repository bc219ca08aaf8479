"""Virus scanning with clamd (SPEC §5.9 steps 7-8, §6.9). Placeholder until issue 5 lands."""
from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from rmilter.context import MessageContext
from rmilter.verdict import CheckResult


def scan(msg: MessageContext) -> "Deferred[CheckResult]":
    return succeed(CheckResult("virus", "unknown"))
