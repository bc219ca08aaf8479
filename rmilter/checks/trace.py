"""The administrator's trace header (extension directive ``trace_header``, off by default).

Accepted messages get one header naming rmilter, the message tag, the queue id, the client
address and the user: what rmilter saw of the message, readable at the recipient's end.
"""
from __future__ import annotations

from twisted.internet.defer import Deferred, succeed

from rmilter import __version__
from rmilter.context import MessageContext
from rmilter.deps import Deps
from rmilter.verdict import AddHeader, Check, CheckResult, skipped


def check(message: MessageContext, deps: Deps) -> "Deferred[CheckResult]":
    """``<trace_header>: rmilter <version>; tag=...; queue_id=...; client=...; user=...``."""
    header = deps.config.main.trace_header
    if not header:
        return succeed(skipped(Check.TRACE, "no trace_header"))
    value = "rmilter %s; tag=%s; queue_id=%s; client=%s; user=%s" % (
        __version__,
        message.tag,
        message.queue_id_or_noqueue,
        message.client_address or "unknown",
        message.user or "unauthorized",
    )
    return succeed(CheckResult(Check.TRACE, "added", edits=(AddHeader(name=header, value=value),)))
