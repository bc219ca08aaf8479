"""TLS for ``https://`` Rspamd servers (issue 12): verified with service-identity, built once.

The trust roots are the system store (``platformTrust``) or the CAs of
``tls_ca``; the host name checked is the configured one (``optionsForClientTLS``
verifies it with service-identity and sends it as SNI).  A client certificate is
optional (``tls_cert`` with ``tls_key``).  ``tls_verify = no`` skips the
verification - only when written, and the runtime warns about it at start.
"""
from __future__ import annotations

from typing import Any, Callable, Dict

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer  # type: ignore[import-untyped]

from rmilter.config.schema import ServerSpec, SpamdConfig
from rmilter.log import Logger

log = Logger(namespace="rmilter.backends.rspamd")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _pem_certificates(data: bytes) -> list:
    marker = b"-----END CERTIFICATE-----"
    return [ssl.Certificate.loadPEM(part + marker) for part in data.split(marker) if b"-----BEGIN" in part]


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """TLS without any certificate check (``tls_verify = no``): SNI still sent."""

    def __init__(self, hostname: str, options: ssl.CertificateOptions) -> None:
        self._hostname = hostname.encode("idna")
        self._context = options.getContext()

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._hostname)
        return connection


def client_tls(config: SpamdConfig) -> Callable[[ServerSpec], Any]:
    """For each ``https://`` server its connection creator (files read once, here)."""
    client_certificate = None
    if config.tls_cert:
        client_certificate = ssl.PrivateCertificate.loadPEM(
            _read(config.tls_cert) + b"\n" + _read(config.tls_key or config.tls_cert))
    if not config.tls_verify:
        log.warn("spamd: tls_verify = no: the certificates of https:// Rspamd servers are NOT verified")
        extra: Dict[str, Any] = {}
        if client_certificate is not None:
            extra = {"privateKey": client_certificate.privateKey.original,
                     "certificate": client_certificate.original}
        options = ssl.CertificateOptions(verify=False, **extra)
        return lambda server: _Unverified(server.host or "localhost", options)
    trust: Any = ssl.platformTrust()
    if config.tls_ca:
        trust = ssl.trustRootFromCertificates(_pem_certificates(_read(config.tls_ca)))

    def creator(server: ServerSpec) -> Any:
        return ssl.optionsForClientTLS(server.host or "localhost", trustRoot=trust,
                                       clientCertificate=client_certificate)

    return creator
