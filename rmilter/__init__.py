"""rmilter: a milter for Postfix and Sendmail that scans mail with Rspamd and ClamAV,
greylists and rate-limits with Redis, and DKIM-signs outgoing mail (Twisted)."""

__version__ = "3.0.0.dev0"
