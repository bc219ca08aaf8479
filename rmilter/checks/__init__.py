"""One module per feature; each has one entry point of one shape, which the pipeline calls.

Every check is ``check(message, deps, **stage options) -> Deferred[CheckResult]``: the
message (``rmilter.context.MessageContext``, what the MTA said) and the dependencies of
its configuration generation (``rmilter.deps.Deps``) are handed in, never fetched, and
the result says everything (``rmilter.verdict.CheckResult``: the verdict it demands, its
edits, its summary value, its details).  A feature that also records something once the
message is accepted has ``record(message, deps)`` of the same shape (ratelimit, replies).
No check writes into the message, talks to the MTA or knows the wire format.

The Deferred never fails: backend trouble becomes a result (``failed=True``, the summary
value) handled as SPEC §6.10 says.
"""
