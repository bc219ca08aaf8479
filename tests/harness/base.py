"""Shared machinery of the real-service fixtures: scratch space, ports, processes, waiting.

Everything here is blocking and thread-safe enough for one test at a time per process; see the
package docstring (``tests/harness/__init__.py``) for how tests are meant to use it.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, IO, List, Optional, Sequence, TypeVar

from twisted.trial.unittest import FailTest

#: extra directories searched for programs: Debian puts postfix, clamd and smtp-sink in sbin
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")

#: environment variable that keeps the scratch directory after the run (for debugging)
KEEP_SCRATCH_ENV = "RMILTER_KEEP_SCRATCH"

T = TypeVar("T")


class ServiceUnavailable(FailTest):
    """A real service the test needs is missing or did not start in time.

    A subclass of trial's ``FailTest`` (an ``AssertionError``) so that trial reports the test as
    FAILED, never skipped, with this message: every machine that runs the suite is expected to
    have every service (scripts/install-deps.sh).
    """


def find_program(name: str) -> str:
    """Absolute path of ``name`` on PATH or in the sbin directories, else ServiceUnavailable."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(_SBIN_DIRS)
    found = shutil.which(name, path=path)
    if found is None:
        raise ServiceUnavailable(
            "program %r not found (PATH and %s); install the test dependencies with "
            "'sudo scripts/install-deps.sh'" % (name, ", ".join(_SBIN_DIRS))
        )
    return found


# --- scratch space ----------------------------------------------------------------------------

_scratch_lock = threading.Lock()
_scratch_root: Optional[str] = None
_scratch_counter = 0


def scratch_root() -> str:
    """The per-run scratch directory (``/tmp/rmt-XXXXXX``), created on first use.

    Short on purpose: unix socket paths live under it and must stay below 108 bytes.  Removed at
    interpreter exit unless ``RMILTER_KEEP_SCRATCH=1``.  World-traversable because Postfix's
    ``postfix`` user must reach the sink directory and the milter socket under it.
    """
    global _scratch_root
    with _scratch_lock:
        if _scratch_root is None:
            _scratch_root = tempfile.mkdtemp(prefix="rmt-", dir="/tmp")
            os.chmod(_scratch_root, 0o755)
            atexit.register(_remove_scratch_root)
        return _scratch_root


def _remove_scratch_root() -> None:
    if _scratch_root is not None and os.environ.get(KEEP_SCRATCH_ENV) != "1":
        shutil.rmtree(_scratch_root, ignore_errors=True)


def scratch_dir(name: str) -> str:
    """A new, empty, uniquely numbered directory ``<root>/<name><n>`` (mode 0755)."""
    global _scratch_counter
    root = scratch_root()
    with _scratch_lock:
        _scratch_counter += 1
        path = os.path.join(root, "%s%d" % (name, _scratch_counter))
    os.makedirs(path, mode=0o755)
    os.chmod(path, 0o755)
    return path


# --- fresh interpreters ----------------------------------------------------------------------

#: the repository, put first on a probe's PYTHONPATH
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def probe_config(config: str, prefix: str = "rmilter-probe-") -> "tuple[str, str]":
    """A scratch folder holding ``rmilter.conf``: CONFIG, then ``tempdir`` = the folder.

    Returns (folder, path) for a probe's working directory and ``--config``."""
    folder = tempfile.mkdtemp(prefix=prefix)
    path = os.path.join(folder, "rmilter.conf")
    with open(path, "w") as f:
        f.write(config + "tempdir = %s;\n" % folder)
    return folder, path


def run_python_probe(script: str, args: Sequence[str], cwd: Optional[str] = None, timeout: float = 60) -> Any:
    """Run ``script`` in a fresh interpreter (``python -c``) and return the JSON of its last line.

    For what an import-time decision does (the test process has imported everything long
    ago); a non-zero exit fails with the probe's standard error.
    """
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd or tempfile.mkdtemp(prefix="rmilter-probe-"),
                          env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise FailTest("the probe exited with %d:\n%s" % (done.returncode, done.stderr[-3000:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- ports ------------------------------------------------------------------------------------


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that nothing listens on right now (the kernel's choice).

    There is a small window before the service binds it, in which another process could take
    it; the kernel picks from the whole ephemeral range, so a collision is unlikely.
    """
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def tcp_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    """True when a TCP connection to host:port succeeds (it is closed at once)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def unix_accepts(path: str, timeout: float = 1.0) -> bool:
    """True when a unix-socket connection to ``path`` succeeds (it is closed at once)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            return True
    except OSError:
        return False


def read_banner(host: str, port: int, timeout: float = 2.0) -> bytes:
    """The first bytes a server sends after accept (b"" when it sends nothing or refuses)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return s.recv(512)
    except OSError:
        return b""


# --- waiting ----------------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], Optional[T]],
    timeout: float,
    what: str,
    diagnostics: Callable[[], str] = lambda: "",
    interval: float = 0.05,
) -> T:
    """Poll ``predicate`` until it returns something true; return that value.

    Raises ServiceUnavailable naming ``what`` (and whatever ``diagnostics`` tells, e.g. the tail
    of a log file) when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = diagnostics()
            raise ServiceUnavailable(
                "%s: not done after %.1f s%s" % (what, timeout, ("\n" + extra) if extra else "")
            )
        time.sleep(interval)


def tail(path: str, lines: int = 30) -> str:
    """The last lines of a text file, for failure messages ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    return "--- %s (last %d lines) ---\n%s" % (path, len(text), "\n".join(text))


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (PID 1 here reaps orphans slowly)."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            stat = f.read()
    except OSError:
        return False
    # the state letter follows the parenthesised command name, which may itself contain spaces
    state = stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"")


# --- processes --------------------------------------------------------------------------------

_registry_lock = threading.Lock()
_registry: Dict[int, "ManagedProcess"] = {}


class ManagedProcess:
    """A daemon run in the foreground as our child, in its own session, output to a log file.

    Registered so that whatever is still running at interpreter exit is stopped (by its pid only).
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_path: str,
        cwd: Optional[str] = None,
        env: Optional[Dict[str, str]] = None,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.stop_signal = stop_signal
        log: IO[bytes] = open(log_path, "ab")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                start_new_session=True,
            )
        finally:
            log.close()
        self.pid = self.popen.pid
        with _registry_lock:
            _registry[self.pid] = self

    def running(self) -> bool:
        return self.popen.poll() is None

    def returncode(self) -> Optional[int]:
        return self.popen.poll()

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process (not its group) if it still runs."""
        if self.popen.poll() is None:
            os.kill(self.pid, signum)

    def wait(self, timeout: float) -> Optional[int]:
        """Wait up to ``timeout`` seconds for the exit; the exit status or None."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """Ask it to stop (stop_signal), SIGKILL after ``timeout``; return the exit status."""
        try:
            if self.popen.poll() is None:
                self.signal(self.stop_signal)
                if self.wait(timeout) is None:
                    self.signal(signal.SIGKILL)
                    self.wait(5.0)
            return self.popen.poll()
        finally:
            with _registry_lock:
                _registry.pop(self.pid, None)

    def diagnostics(self) -> str:
        status = self.popen.poll()
        head = "%s: %s" % (
            " ".join(self.argv[:3]),
            "running" if status is None else "exited with status %s" % status,
        )
        return head + "\n" + tail(self.log_path)


_exit_hooks: List[Callable[[], None]] = []


def at_exit(hook: Callable[[], None]) -> None:
    """Run ``hook`` at interpreter exit before the leftover processes are killed."""
    _exit_hooks.append(hook)


def _stop_everything() -> None:
    for hook in reversed(_exit_hooks):
        try:
            hook()
        except Exception as e:  # interpreter exit: report and go on stopping the others
            print("harness exit hook %r failed: %r" % (hook, e))
    with _registry_lock:
        leftovers = list(_registry.values())
    for proc in leftovers:
        proc.stop(timeout=5.0)


atexit.register(_stop_everything)


def run(
    argv: Sequence[str],
    timeout: float = 60.0,
    input: Optional[bytes] = None,
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[str] = None,
) -> "subprocess.CompletedProcess[bytes]":
    """Run a command to completion, output captured (stderr merged into stdout)."""
    try:
        return subprocess.run(
            list(argv),
            input=input,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            env=env,
            cwd=cwd,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.output or b"").decode("utf-8", "replace")
        raise ServiceUnavailable("%s: no exit after %.0f s\n%s" % (" ".join(argv), timeout, out))


def write_file(path: str, text: str, mode: int = 0o644) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)
    return path
