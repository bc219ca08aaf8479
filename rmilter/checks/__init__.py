"""One module per feature; each exposes the entry points the pipeline calls.

Every entry point returns a Deferred that never fails: backend trouble becomes a
result (``CheckResult.failed``, a log value) handled as SPEC §6.10 says.
"""
