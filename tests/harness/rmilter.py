"""The service under test: ``twistd -n rmilter --config FILE --listen ...`` as a subprocess."""
from __future__ import annotations

import os
import re
import signal
import sys
from typing import Dict, List, Optional, Pattern, Sequence, Union

from tests.harness.base import (
    ManagedProcess,
    ServiceUnavailable,
    free_port,
    scratch_dir,
    tail,
    tcp_accepts,
    unix_accepts,
    wait_until,
    write_file,
)

#: the repository root (tests/harness/rmilter.py -> ../..): put on PYTHONPATH of the daemon
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: runs twistd with the interpreter running the tests (no dependence on a twistd script on PATH)
_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


class Rmilter:
    """One rmilter daemon: config written from the test's text, inet and/or unix listener.

    Listeners are given with ``--listen`` (so the config text needs no ``bind_socket``):
    ``inet:PORT@127.0.0.1`` and ``unix:<scratch>/rmilter.sock``.  ``milter_inet`` and
    ``milter_unix`` are the same addresses in the sendmail syntax Postfix and miltertest use.
    The twistd log (``log_path``) is where tests read the per-message summary lines.

    rmilter creates unix sockets with mode 0660 owned by root: Postfix's smtpd (user postfix)
    can connect only with ``unix_mode="666"`` or ``bind_socket_group = postfix`` in the config.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        config_text: str = "",
        inet: bool = True,
        unix: bool = True,
        unix_mode: Optional[str] = None,
        extra_args: Sequence[str] = (),
        env: Optional[Dict[str, str]] = None,
    ) -> None:
        self.dir = scratch_dir("rmilter")
        self.port: Optional[int] = free_port() if inet else None
        self.socket_path: Optional[str] = os.path.join(self.dir, "rmilter.sock") if unix else None
        self.unix_mode = unix_mode
        self.config_path = os.path.join(self.dir, "rmilter.conf")
        self.log_path = os.path.join(self.dir, "rmilter.log")
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.process: Optional[ManagedProcess] = None
        self.write_config(config_text)

    # --- addresses ---------------------------------------------------------------------------

    @property
    def inet_port(self) -> int:
        """The TCP port (fails when created with ``inet=False``)."""
        if self.port is None:
            raise AssertionError("this Rmilter was created with inet=False")
        return self.port

    @property
    def milter_inet(self) -> str:
        """``inet:PORT@127.0.0.1`` (Postfix smtpd_milters, miltertest -D sock=...)."""
        return "inet:%d@%s" % (self.inet_port, self.host)

    @property
    def milter_unix(self) -> str:
        """``unix:/path/rmilter.sock``."""
        if self.socket_path is None:
            raise AssertionError("this Rmilter was created with unix=False")
        return "unix:" + self.socket_path

    def listen_args(self) -> List[str]:
        args = []
        if self.port is not None:
            args += ["--listen", "inet:%d@%s" % (self.port, self.host)]
        if self.socket_path is not None:
            if self.unix_mode is None:
                args += ["--listen", "unix:" + self.socket_path]
            else:  # a Twisted endpoint string: rmilter's own default mode is 0660
                args += ["--listen", "unix:%s:mode=%s" % (self.socket_path, self.unix_mode)]
        return args

    # --- life cycle ----------------------------------------------------------------------------

    def write_config(self, config_text: str) -> None:
        """(Re)write the config file; a running daemon sees it after ``reload()``."""
        write_file(self.config_path, config_text)

    def command_line(self) -> List[str]:
        return [
            sys.executable, "-c", _TWISTD,
            "-n", "--pidfile=", "--logfile=" + self.log_path,
            "rmilter", "--config", self.config_path,
        ] + self.listen_args() + self.extra_args

    def start(self, timeout: float = 30.0) -> "Rmilter":
        """Start and wait until every listener accepts connections (fails the test otherwise)."""
        if self.process is not None and self.process.running():
            return self
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO_ROOT + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        env.update(self.extra_env)
        self.process = ManagedProcess(
            self.command_line(), os.path.join(self.dir, "stdout.log"), cwd=self.dir, env=env
        )
        wait_until(self._listening, timeout, "rmilter listening on %s" % " ".join(self.listen_args()),
                   self.diagnostics)
        return self

    def _listening(self) -> bool:
        if self.process is not None and not self.process.running():
            raise ServiceUnavailable("rmilter exited during start-up\n" + self.diagnostics())
        if self.port is not None and not tcp_accepts(self.host, self.port):
            return False
        if self.socket_path is not None and not unix_accepts(self.socket_path):
            return False
        # sockets accept as soon as they are bound, before the reactor runs and handles SIGTERM;
        # the "listening on" line comes once it does (a test that stops rmilter right after
        # start would otherwise kill it before its shutdown). Other loggers are waited for by
        # their own tests.
        if not any(arg.startswith(("--logger", "--syslog")) for arg in self.command_line()):
            return "listening on" in self.log_text()
        return True

    def running(self) -> bool:
        return self.process is not None and self.process.running()

    def signal(self, signum: int) -> None:
        if self.process is None:
            raise AssertionError("rmilter is not running")
        self.process.signal(signum)

    def reload(self, wait_for: Union[None, str, Pattern[str]] = None, timeout: float = 10.0) -> None:
        """SIGHUP; with ``wait_for``, wait until a new log line matches it."""
        offset = self.log_size()
        self.signal(signal.SIGHUP)
        if wait_for is not None:
            self.wait_for_log(wait_for, timeout, offset=offset)

    def stop(self, timeout: float = 30.0) -> Optional[int]:
        """SIGTERM (graceful stop) and wait; the exit status (SIGKILL after ``timeout``)."""
        if self.process is None:
            return None
        status = self.process.stop(timeout)
        return status

    def wait_exit(self, timeout: float) -> Optional[int]:
        """Wait for the process to exit by itself; its status or None."""
        if self.process is None:
            return None
        return self.process.wait(timeout)

    # --- the log -----------------------------------------------------------------------------

    def log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_text(self, offset: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_for_log(
        self, pattern: Union[str, Pattern[str]], timeout: float = 10.0, offset: int = 0
    ) -> "re.Match[str]":
        """Wait until the log (from byte ``offset``) matches ``pattern``; the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        def search() -> "Optional[re.Match[str]]":
            return regex.search(self.log_text(offset))

        match: "re.Match[str]" = wait_until(
            search, timeout, "rmilter log line matching %r" % regex.pattern, self.diagnostics
        )
        return match

    def diagnostics(self) -> str:
        parts = []
        if self.process is not None:
            parts.append(self.process.diagnostics())
        parts.append(tail(self.log_path, 40))
        return "\n".join(p for p in parts if p)

