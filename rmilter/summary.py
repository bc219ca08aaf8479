"""The one line per message of SPEC §8.4, built from the checks' results in one place.

``summary_event`` gathers the fields (the S/V/D values are the ``summary`` of the
SPAM, VIRUS and DKIM results; copies and the replies check add their notes);
``log_summary`` writes the text once with ``%`` and the whole event as
structured fields, so text and JSON observers see the same message.
"""
from __future__ import annotations

import time
from typing import Any, Dict, Iterable, List, Optional

from rmilter.checks import copies, replies
from rmilter.context import MessageContext
from rmilter.log import Logger
from rmilter.verdict import Check, CheckResult, Verdict

log = Logger(namespace="rmilter.pipeline")

#: what the line shows for a check of which no result exists (it was never reached)
_UNKNOWN = {Check.SPAM: "unknown", Check.VIRUS: "unknown", Check.DKIM: "unsigned"}
#: dry run: checks with no field of their own in the line get a "<label>: would ..." part
_WOULD_LABEL = {Check.GREYLIST: "greylist", Check.RATELIMIT: "rate limit"}


def summary_event(message: MessageContext, results: Iterable[CheckResult], verdict: Verdict) -> Dict[str, Any]:
    """Every field of the summary event, in the order of the text line."""
    last: Dict[Check, CheckResult] = {}
    published: List[str] = []
    reply_to: Optional[str] = None
    details: Dict[str, object] = {}
    would: List[str] = []
    for result in results:
        check = result.check
        last[check] = result
        if result.would is not None and check in _WOULD_LABEL:
            part = "%s: would %s" % (_WOULD_LABEL[check], result.would)
            if part not in would:
                would.append(part)
        if result.details:
            details.update(result.details)
            if check is Check.COPIES and copies.published(result):
                published.append(result.summary)
            elif check is Check.REPLIES and reply_to is None:
                reply_to = replies.hit(result)
    spam = last.get(Check.SPAM)
    grey = last.get(Check.GREYLIST)
    message_id = spam.details.get("message_id") if spam is not None else None
    first = message.recipients[0].address if message.recipients else "<>"  # B35: no recipients is fine
    event: Dict[str, Any] = dict(
        tag=message.tag,
        queue_id=message.queue_id_or_noqueue,
        message_id=message_id or "undef",
        ip=message.client_address or "unknown",
        sender=message.envelope_from,
        rcpt=first,
        rcpt_count=len(message.recipients),
        user=message.user or "unauthorized",
        spam=_value(last, Check.SPAM),
        virus=_value(last, Check.VIRUS),
        dkim=_value(last, Check.DKIM),
        published="; ".join(published) or None,
        verdict=verdict.action.value,
        reply=(None if verdict.reply is None else "%s %s %s" % (verdict.reply.code, verdict.reply.ecode,
                                                                verdict.reply.text)),
        greylist=grey.summary if grey is not None and not grey.skipped else None,
        reply_to=reply_to,
        would="; ".join(would) or None,
        duration=round(time.time() - message.started, 6),
    )
    for name, value in details.items():
        event.setdefault(name, value)
    return event


def _value(last: Dict[Check, CheckResult], check: Check) -> str:
    result = last.get(check)
    return result.summary if result is not None else _UNKNOWN[check]


def summary_text(event: Dict[str, Any]) -> str:
    """SPEC §8.4 byte for byte (the C format's angle brackets are literal), then this
    implementation's fields: ``<tag>; msg done: queue_id: <QID>; message id: <ID>; ...``."""
    text = (
        "<%(tag)s>; msg done: queue_id: <%(queue_id)s>; message id: <%(message_id)s>; ip: %(ip)s; "
        "from: <%(sender)s>; rcpt: %(rcpt)s (%(rcpt_count)d total); user: %(user)s; "
        "spam scan: %(spam)s; virus scan: %(virus)s; dkim: %(dkim)s" % event
    )
    if event["published"]:
        text += "; " + event["published"]
    if event["reply_to"]:
        text += "; reply to our message " + event["reply_to"]
    if event.get("would"):
        text += "; " + event["would"]
    text += "; verdict: " + event["verdict"]
    if event["reply"]:
        text += " (%s)" % event["reply"]
    if event.get("spam_score") is not None:  # a scan ran and Rspamd answered
        text += "; rspamd score: %s / %s; rspamd action: %s" % (
            _number(event["spam_score"]), _number(event.get("spam_required")), event.get("spam_action"))
    return text


def _number(value: Any) -> str:
    """3.5 -> ``3.50``; what Rspamd's own log shows (no float noise such as 3.4999999)."""
    try:
        return "%.2f" % float(value)
    except (TypeError, ValueError):
        return str(value)


def log_summary(message: MessageContext, results: Iterable[CheckResult], verdict: Verdict) -> Optional[str]:
    """One line per message, also a structured event with every field; returns the text.

    The text is formatted here with ``%`` once: a ``{}`` format of twenty fields parsed again by
    the log observer for every message costs more than a milter step.
    """
    event = summary_event(message, results, verdict)
    text = summary_text(event)
    log.info("{summary_text}", summary_text=text, summary=True, **event)
    return text
