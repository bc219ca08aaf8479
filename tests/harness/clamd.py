"""A private clamd with a tiny signature database of its own (REAL-SERVICES §3).

clamd 1.4 needs at least one signature file and has no built-in EICAR signature, so the
database is an ``.ndb`` of body patterns: the EICAR test string and a harness string.  Names from
such files are reported with the suffix ``.UNOFFICIAL``.
"""
from __future__ import annotations

import os
import socket
import struct
from typing import Optional, Sequence, Tuple, Union

from tests.harness.base import (
    ManagedProcess,
    ServiceUnavailable,
    find_program,
    free_port,
    scratch_dir,
    tail,
    wait_until,
    write_file,
)

#: the EICAR anti-virus test file (68 bytes)
EICAR = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
#: a body string only this harness's database knows
HARNESS_VIRUS_STRING = b"HARNESS-VIRUS-TEST-STRING-7f3a"
#: what clamd reports for them
EICAR_NAME = "Harness.Eicar.Body.UNOFFICIAL"
HARNESS_VIRUS_NAME = "Harness.Test.String.UNOFFICIAL"

#: (name, body pattern) pairs written to harness.ndb
DEFAULT_SIGNATURES: Tuple[Tuple[str, bytes], ...] = (
    ("Harness.Eicar.Body", EICAR),
    ("Harness.Test.String", HARNESS_VIRUS_STRING),
)


class Clamd:
    """clamd on 127.0.0.1:<free port> and ``<scratch>/clamd.sock``.

    ``address`` (``127.0.0.1:PORT``) and ``socket_path`` are the two forms of an rmilter
    ``clamav { servers = ...; }`` entry.  ``stream_max_length`` is clamd's StreamMaxLength
    (``"1M"``, ``"100K"`` or bytes): bigger INSTREAM uploads get ``INSTREAM size limit exceeded``.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        stream_max_length: Union[int, str] = "1M",
        signatures: Sequence[Tuple[str, bytes]] = DEFAULT_SIGNATURES,
        port: Optional[int] = None,
    ) -> None:
        self.port = port or free_port()
        self.dir = scratch_dir("clamd")
        self.socket_path = os.path.join(self.dir, "clamd.sock")
        self.conf_path = os.path.join(self.dir, "clamd.conf")
        self.log_path = os.path.join(self.dir, "clamd.log")
        self.stream_max_length = stream_max_length
        self.process: Optional[ManagedProcess] = None
        os.makedirs(os.path.join(self.dir, "db"))
        os.makedirs(os.path.join(self.dir, "tmp"))
        write_file(
            os.path.join(self.dir, "db", "harness.ndb"),
            "".join("%s:0:*:%s\n" % (name, pattern.hex()) for name, pattern in signatures),
        )
        self._write_conf()

    @property
    def address(self) -> str:
        return "%s:%d" % (self.host, self.port)

    def _write_conf(self) -> None:
        write_file(
            self.conf_path,
            "\n".join(
                [
                    "Foreground yes",
                    "TCPSocket %d" % self.port,
                    "TCPAddr %s" % self.host,
                    "LocalSocket %s" % self.socket_path,
                    "LocalSocketMode 666",
                    "DatabaseDirectory %s/db" % self.dir,
                    "TemporaryDirectory %s/tmp" % self.dir,
                    "LogFile %s" % self.log_path,
                    "LogTime yes",
                    "StreamMaxLength %s" % self.stream_max_length,
                    "MaxThreads 4",
                    "ScanMail yes",
                    "SelfCheck 0",
                ]
            )
            + "\n",
        )

    def start(self, timeout: float = 30.0) -> "Clamd":
        if self.process is not None and self.process.running():
            return self
        self.process = ManagedProcess(
            [find_program("clamd"), "-c", self.conf_path], os.path.join(self.dir, "stdout.log")
        )
        wait_until(self._answers, timeout, "clamd on %s" % self.address, self.diagnostics)
        return self

    def _answers(self) -> bool:
        if self.process is not None and not self.process.running():
            raise ServiceUnavailable("clamd exited during start-up\n" + self.diagnostics())
        try:
            return self.command(b"zPING\0", unix=False) == "PONG" and self.command(
                b"zPING\0", unix=True
            ) == "PONG"
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def diagnostics(self) -> str:
        parts = [self.process.diagnostics()] if self.process is not None else []
        parts.append(tail(self.log_path))
        return "\n".join(p for p in parts if p)

    # --- the clamd protocol (what rmilter speaks too; SPEC §7.2) --------------------------------

    def _connect(self, unix: bool, timeout: float = 10.0) -> socket.socket:
        if unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(self.socket_path)
            return s
        return socket.create_connection((self.host, self.port), timeout=timeout)

    @staticmethod
    def _read_reply(s: socket.socket) -> str:
        reply = b""
        while not reply.endswith(b"\0"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        return reply.rstrip(b"\0").decode("utf-8", "replace")

    def command(self, command: bytes, unix: bool = False) -> str:
        """Send one z-command (``b"zPING\\0"``, ``b"zVERSION\\0"``) and return the reply text."""
        with self._connect(unix) as s:
            s.sendall(command)
            return self._read_reply(s)

    def ping(self) -> bool:
        return self.command(b"zPING\0") == "PONG"

    def scan(self, data: bytes, unix: bool = False, chunk_size: int = 65536) -> str:
        """INSTREAM ``data``; the reply, e.g. ``stream: OK`` or ``stream: <name> FOUND``."""
        with self._connect(unix) as s:
            s.sendall(b"zINSTREAM\0")
            try:
                for i in range(0, len(data), chunk_size):
                    chunk = data[i : i + chunk_size]
                    s.sendall(struct.pack("!I", len(chunk)) + chunk)
                s.sendall(struct.pack("!I", 0))
            except (BrokenPipeError, ConnectionResetError):
                # clamd answers "INSTREAM size limit exceeded" and closes while we still send
                pass
            return self._read_reply(s)

    def reload_database(self) -> str:
        """zRELOAD: clamd answers RELOADING and re-reads the database in the background."""
        return self.command(b"zRELOAD\0")
