"""Dates for test messages, made when the tests run.

A real Rspamd scores the Date header against its own clock (DATE_IN_PAST once a date is more
than a day old, DATE_IN_FUTURE ahead of it): a fixed date in a test message changes its score
as the calendar moves on.  Every test message takes its date from here instead.
"""
from __future__ import annotations

import datetime
import email.utils


def message_date() -> str:
    """Now, as an RFC 5322 Date header value in UTC (``Www, DD Mmm YYYY HH:MM:SS +0000``)."""
    return email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0))
