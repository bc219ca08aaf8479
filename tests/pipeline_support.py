"""Driving one message through rmilter.pipeline.Pipeline stage by stage, for the unit tests."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from rmilter.context import ConnectionContext
from rmilter.pipeline import Pipeline, Transaction
from rmilter.verdict import Action, Verdict


def send_until_eom(
    test: SynchronousTestCase,
    pipeline: Pipeline,
    *,
    ip: Optional[str] = "192.0.2.10",
    auth: Optional[str] = None,
    rcpts: Sequence[str] = ("<bob@example.org>",),
    headers: Sequence[Tuple[str, str]] = (("Subject", "hi"),),
    body: bytes = b"Hello\r\n",
    helo: str = "mail.example.net",
    queue_id: str = "QID1",
) -> Tuple[Transaction, Verdict, "Optional[Deferred[Verdict]]"]:
    """CONNECT to EOM as Postfix sends them, sender alice@example.net.

    Returns the pipeline's transaction, the DATA verdict and the EOM Deferred (None when DATA ended the
    message).  Every stage before EOM must have answered at once; CONNECT and MAIL CONTINUE.
    """
    conn = ConnectionContext(hostname="mail.example.net", family="4" if ip else "U", client_address=ip)
    test.assertEqual(pipeline.connect(conn).action, Action.CONTINUE)
    pipeline.helo(conn, helo)
    macros = {"{mail_addr}": "alice@example.net"}
    if auth:
        macros["{auth_authen}"] = auth
    conn.macros.define("M", macros)
    msg, verdict = pipeline.mail(conn, ["<alice@example.net>", "SIZE=10"])
    test.assertEqual(verdict.action, Action.CONTINUE)
    for rcpt in rcpts:
        test.successResultOf(pipeline.rcpt(msg, [rcpt]))
    conn.macros.define("T", {"i": queue_id})
    data = test.successResultOf(pipeline.data(msg))
    if data.action is not Action.CONTINUE:
        return msg, data, None
    for name, value in headers:
        pipeline.header(msg, name, value)
    pipeline.eoh(msg)
    test.successResultOf(pipeline.body(msg, body))
    return msg, data, pipeline.eom(msg)
