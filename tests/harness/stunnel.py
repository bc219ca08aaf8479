"""A TLS terminator (Debian's stunnel4) in front of a real Rspamd, with certificates made now.

One CA and three server certificates, all made at test time with ``cryptography``:
``good`` (for ``localhost``), ``wrong`` (for ``wrong.example``) and ``expired`` (for
``localhost``, validity ended yesterday); stunnel serves each on its own free port and
forwards to the Rspamd normal worker.  ``ca_path`` is what ``tls_ca`` points at.
"""
from __future__ import annotations

import datetime
import os
from typing import Dict, Optional, Tuple

from tests.harness.base import ManagedProcess, find_program, free_port, scratch_dir, tcp_accepts, wait_until, write_file

SERVICES = ("good", "wrong", "expired")


def _certificates(directory: str) -> Dict[str, Tuple[str, str]]:
    """Writes ca.pem and per service (cert, key) PEM files; returns the paths by service."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("rmilter test CA")).issuer_name(name("rmilter test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - day).not_valid_after(now + day)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write_file(os.path.join(directory, "ca.pem"), ca.public_bytes(serialization.Encoding.PEM).decode())
    paths: Dict[str, Tuple[str, str]] = {}
    for service, host, before, after in (("good", "localhost", now - day, now + day),
                                         ("wrong", "wrong.example", now - day, now + day),
                                         ("expired", "localhost", now - 3 * day, now - day)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(host)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(before).not_valid_after(after)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path = write_file(os.path.join(directory, service + ".pem"),
                               cert.public_bytes(serialization.Encoding.PEM).decode())
        key_path = write_file(os.path.join(directory, service + ".key"), key_pem(key).decode(), 0o600)
        paths[service] = (cert_path, key_path)
    return paths


class Stunnel:
    """stunnel4 serving ``good``, ``wrong`` and ``expired`` TLS in front of ``upstream`` (host:port)."""

    host = "127.0.0.1"

    def __init__(self, upstream: str) -> None:
        self.dir = scratch_dir("stunnel")
        self.upstream = upstream
        self.ports = {service: free_port() for service in SERVICES}
        self.ca_path = os.path.join(self.dir, "ca.pem")
        self.log_path = os.path.join(self.dir, "stunnel.log")
        self.process: Optional[ManagedProcess] = None

    def server(self, service: str) -> str:
        """The ``spamd { servers }`` entry reaching one service by the name ``localhost``."""
        return "https://localhost:%d" % (self.ports[service],)

    def start(self, timeout: float = 30.0) -> "Stunnel":
        program = find_program("stunnel4")
        paths = _certificates(self.dir)
        sections = "".join(
            "[%s]\naccept = %s:%d\nconnect = %s\ncert = %s\nkey = %s\n" % (
                service, self.host, self.ports[service], self.upstream, paths[service][0], paths[service][1])
            for service in SERVICES)
        config = write_file(os.path.join(self.dir, "stunnel.conf"),
                            "foreground = yes\npid =\ndebug = notice\n" + sections)
        self.process = ManagedProcess([program, config], self.log_path)
        wait_until(lambda: all(tcp_accepts(self.host, port) for port in self.ports.values()), timeout,
                   "stunnel listening", self.process.diagnostics)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
