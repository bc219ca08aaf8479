"""DKIM signing of mail sent by our users (SPEC §6.7, B16): the check.

The key comes from the keyring loaded with the configuration (``rmilter.dkim.keys``);
the signature is computed in the thread pool (``rmilter.dkim.signer``), at most
``Keyring.signing_slots`` at a time.  A message never touches the file system for its key.
"""
from __future__ import annotations

from typing import Optional, Union

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from rmilter.context import MessageContext
from rmilter.deps import Deps
from rmilter.dkim.keys import KeyChoice, KeyNotFound, KeyProblem, SigningKey, sender_domain
from rmilter.dkim.signer import HEADER_NAME, SignatureRequest, compute_signature, signed_headers
from rmilter.log import Logger
from rmilter.verdict import AddHeader, Check, CheckResult

log = Logger(namespace="rmilter.dkim")

#: SPEC §8.4 D values produced here
SIGNED = "signed"
NOT_SIGNED_IGNORED = "not signed, ignored"
NOT_SIGNED_DISABLED = "not signed, disabled"
NOT_SIGNED_FAILURE = "not signed, internal failure"


def eligible(message: MessageContext, deps: Deps) -> bool:
    """``auth_only = no``, an authenticated sender (incl. our_networks) or a client in sign_networks."""
    section = deps.config.dkim
    return not section.auth_only or message.authenticated or message.client_address in section.sign_networks


def _unsigned(summary: str, reason: Optional[str] = None) -> CheckResult:
    return CheckResult(Check.DKIM, summary, details={"dkim_reason": reason} if reason else {})


def choose_key(message: MessageContext, deps: Deps) -> Union[KeyChoice, CheckResult]:
    """The key to sign with, or the final CheckResult when the message is not signed."""
    keyring = deps.keyring
    if keyring is None:
        return _unsigned(NOT_SIGNED_DISABLED)
    if not eligible(message, deps):
        log.debug("{tag}; do not add dkim signature for unauthorized user", tag=message.tag)
        return _unsigned(NOT_SIGNED_IGNORED)
    domain = sender_domain(message.envelope_from)
    if domain is None:
        return _unsigned(NOT_SIGNED_IGNORED, "sender has no domain")
    choice = keyring.find(domain)
    if isinstance(choice, KeyNotFound):
        log.info("{tag}; cannot add signature for domain {domain}: {reason}", tag=message.tag, domain=domain,
                 reason=choice.reason)
        return _unsigned(NOT_SIGNED_IGNORED, choice.reason)
    if isinstance(choice, KeyProblem):
        log.error("{tag}; cannot add signature for domain {domain}: {reason}", tag=message.tag, domain=domain,
                  reason=choice.reason)
        return _unsigned(NOT_SIGNED_FAILURE, choice.reason)
    return choice


def check(message: MessageContext, deps: Deps) -> "Deferred[CheckResult]":
    """Sign an accepted message (SPEC §5.9 step 10); never fails, the signature is computed off-thread."""
    try:
        choice = choose_key(message, deps)
        if isinstance(choice, CheckResult):
            return succeed(choice)
        assert isinstance(choice, SigningKey)
        key = choice
        headers = signed_headers(message.headers)
        if not any(name.lower() == "from" for name, _ in headers):
            log.error("{tag}; cannot add signature for domain {domain}: the message has no From header",
                      tag=message.tag, domain=key.domain)
            return succeed(_unsigned(NOT_SIGNED_FAILURE, "no From header"))
        spool = message.spool
        if spool is None:
            log.error("{tag}; cannot add dkim signature: no spool", tag=message.tag)
            return succeed(_unsigned(NOT_SIGNED_FAILURE))
        keyring = deps.keyring
        assert keyring is not None
        request = SignatureRequest(key, keyring.options, headers, int(deps.clock.seconds()))
    except Exception:
        log.failure("{tag}; cannot add dkim signature", tag=message.tag)
        return succeed(_unsigned(NOT_SIGNED_FAILURE))

    def body_read(body: bytes) -> "Deferred[str]":
        return keyring.signing_slots.run(deps.run_blocking, compute_signature, request, body)

    def signed(value: str) -> CheckResult:
        log.info("{tag}; d={domain}, s={selector}, added DKIM signature", tag=message.tag, domain=key.domain,
                 selector=key.selector)
        return CheckResult(
            Check.DKIM,
            SIGNED,
            edits=(AddHeader(name=HEADER_NAME, value=value),),
            details={"dkim_domain": key.domain, "dkim_selector": key.selector},
        )

    def failed(failure: Failure) -> CheckResult:
        log.failure("{tag}; d={domain}, s={selector}, sign failed", failure, tag=message.tag, domain=key.domain,
                    selector=key.selector)
        return _unsigned(NOT_SIGNED_FAILURE)

    body: "Deferred[bytes]" = spool.read(len(spool.head), spool.body_size)
    return body.addCallback(body_read).addCallbacks(signed, failed)
