"""DKIM signing of mail sent by our users (SPEC §6.7, B16): the check.

The keys come from the keyring loaded with the configuration (``rmilter.dkim.keys``):
the OpenDKIM SigningTable entries for the From: address, else the ``domain { }``
entries for the envelope sender's domain (one key per type, so RSA and Ed25519 both
sign).  The signatures are computed in the thread pool (``rmilter.dkim.signer``), one
pool job per message, at most ``Keyring.signing_slots`` at a time.  A message never
touches the file system for its keys.
"""
from __future__ import annotations

import email.utils
from typing import List, Optional, Sequence, Tuple, Union

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from rmilter.context import MessageContext
from rmilter.deps import Deps
from rmilter.dkim.keys import KeyNotFound, KeyProblem, SigningKey, sender_domain
from rmilter.dkim.signer import HEADER_NAME, SignatureRequest, compute_signatures, signed_headers
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


def from_address(headers: Sequence[Tuple[str, str]]) -> Optional[str]:
    """The address of the first ``From:`` header: what OpenDKIM's SigningTable is keyed on."""
    for name, value in headers:
        if name.lower() == "from":
            for _, address in email.utils.getaddresses([value]):
                if "@" in address:
                    return address
            return None
    return None


def choose_keys(message: MessageContext, deps: Deps) -> Union[Tuple[SigningKey, ...], CheckResult]:
    """The keys to sign with, or the final CheckResult when the message is not signed.

    Keys that cannot be used are logged; the message is signed with the others, if any.
    """
    keyring = deps.keyring
    if keyring is None:
        return _unsigned(NOT_SIGNED_DISABLED)
    if not eligible(message, deps):
        log.debug("{tag}; do not add dkim signature for unauthorized user", tag=message.tag)
        return _unsigned(NOT_SIGNED_IGNORED)
    domain = sender_domain(message.envelope_from)
    selection = keyring.select(domain, from_address(message.headers))
    if isinstance(selection, KeyNotFound):
        if domain is None and selection.reason == "sender has no domain":
            return _unsigned(NOT_SIGNED_IGNORED, "sender has no domain")
        log.info("{tag}; cannot add signature for domain {domain}: {reason}", tag=message.tag,
                 domain=selection.domain, reason=selection.reason)
        return _unsigned(NOT_SIGNED_IGNORED, selection.reason)
    usable: List[SigningKey] = []
    reasons: List[str] = []
    for choice in selection:
        if isinstance(choice, KeyProblem):
            log.error("{tag}; cannot add signature for domain {domain}: {reason}", tag=message.tag,
                      domain=choice.domain, reason=choice.reason)
            reasons.append(choice.reason)
        else:
            usable.append(choice)
    if not usable:
        return _unsigned(NOT_SIGNED_FAILURE, "; ".join(reasons))
    return tuple(usable)


def check(message: MessageContext, deps: Deps) -> "Deferred[CheckResult]":
    """Sign an accepted message (SPEC §5.9 step 10); never fails, the signatures are computed off-thread."""
    try:
        chosen = choose_keys(message, deps)
        if isinstance(chosen, CheckResult):
            return succeed(chosen)
        signing = chosen
        keyring = deps.keyring
        assert keyring is not None
        options = keyring.options
        headers = signed_headers(message.headers, frozenset(options.oversign))
        if not any(name.lower() == "from" for name, _ in headers):
            log.error("{tag}; cannot add signature for domain {domain}: the message has no From header",
                      tag=message.tag, domain=signing[0].domain)
            return succeed(_unsigned(NOT_SIGNED_FAILURE, "no From header"))
        spool = message.spool
        if spool is None:
            log.error("{tag}; cannot add dkim signature: no spool", tag=message.tag)
            return succeed(_unsigned(NOT_SIGNED_FAILURE))
        timestamp = int(deps.clock.seconds())
        requests = [SignatureRequest(key, options, headers, timestamp) for key in signing]
    except Exception:
        log.failure("{tag}; cannot add dkim signature", tag=message.tag)
        return succeed(_unsigned(NOT_SIGNED_FAILURE))

    def body_read(body: bytes) -> "Deferred[List[str]]":
        return keyring.signing_slots.run(deps.run_blocking, compute_signatures, requests, body)

    def signed(values: List[str]) -> CheckResult:
        for key in signing:
            log.info("{tag}; d={domain}, s={selector}, added DKIM signature ({algorithm})", tag=message.tag,
                     domain=key.domain, selector=key.selector, algorithm=options.algorithm(key))
        return CheckResult(
            Check.DKIM,
            SIGNED,
            edits=tuple(AddHeader(name=HEADER_NAME, value=value) for value in values),
            details={
                "dkim_domain": signing[0].domain,
                "dkim_selector": signing[0].selector,
                "dkim_signatures": ["d=%s s=%s a=%s" % (k.domain, k.selector, options.algorithm(k))
                                    for k in signing],
            },
        )

    def failed(failure: Failure) -> CheckResult:
        log.failure("{tag}; d={domain}, s={selector}, sign failed", failure, tag=message.tag,
                    domain=signing[0].domain, selector=signing[0].selector)
        return _unsigned(NOT_SIGNED_FAILURE)

    body: "Deferred[bytes]" = spool.read(len(spool.head), spool.body_size)
    return body.addCallback(body_read).addCallbacks(signed, failed)
