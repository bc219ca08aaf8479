"""A private Postfix instance relaying to smtp-sink, with SASL and XCLIENT (REAL-SERVICES §5, §6).

``Postfix`` accepts mail for example.org/example.net on 127.0.0.1:<port>; authenticated users
``alice`` and ``bob`` (password ``secret``, so ``{auth_authen}`` is the bare name); any loopback
client may claim another address with XCLIENT.  Everything is relayed to an ``SmtpSink``, which
keeps one file per delivered message.  ``set_milters()`` points ``smtpd_milters`` at the milter
under test and reloads.  ``swaks()`` sends a message and returns its exit status and transcript.
"""
from __future__ import annotations

import email
import functools
import email.message
import email.policy
import glob
import os
import re
import shutil
import signal
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from tests.harness.base import (
    ManagedProcess,
    ServiceUnavailable,
    find_program,
    free_port,
    read_banner,
    run,
    scratch_dir,
    scratch_root,
    tail,
    wait_until,
    write_file,
)

#: the SASL users every Postfix instance knows, with this password
SASL_USERS = ("alice", "bob")
SASL_PASSWORD = "secret"
MYHOSTNAME = "mx.harness.test"

#: the pseudo headers smtp-sink puts in front of each dump
_SINK_PSEUDO = re.compile(rb"^X-(Client|Helo|Mail|Rcpt)-[A-Za-z-]*:")


@dataclass(frozen=True)
class DeliveredMessage:
    """One message as smtp-sink received it from Postfix.

    ``raw`` is the message without smtp-sink's pseudo headers (so DKIM verifies on it), starting
    with smtp-sink's own ``Received:``; ``envelope`` keeps the pseudo headers' values by name
    (``X-Mail-Args``, ``X-Rcpt-Args`` (all of them), ``X-Client-Addr`` ...).
    """

    path: str
    raw: bytes
    envelope: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)

    @property
    def message(self) -> email.message.EmailMessage:
        parsed: email.message.EmailMessage = email.message_from_bytes(
            self.raw, policy=email.policy.compat32  # type: ignore[arg-type]
        )
        return parsed

    def headers(self, name: str) -> List[str]:
        """Every value of header ``name`` (unfolded), in order."""
        return [re.sub(r"\r?\n[ \t]+", " ", str(v)) for v in self.message.get_all(name, [])]

    def header(self, name: str) -> Optional[str]:
        values = self.headers(name)
        return values[0] if values else None

    @property
    def body(self) -> bytes:
        head, sep, body = self.raw.partition(b"\r\n\r\n")
        if not sep:
            head, sep, body = self.raw.partition(b"\n\n")
        return body


def parse_sink_dump(path: str) -> DeliveredMessage:
    with open(path, "rb") as f:
        data = f.read()
    lines = data.splitlines(keepends=True)
    envelope: Dict[str, List[str]] = {}
    start = 0
    for start, line in enumerate(lines):
        if not _SINK_PSEUDO.match(line):
            break
        name, _, value = line.decode("utf-8", "replace").partition(":")
        envelope.setdefault(name, []).append(value.strip())
    raw = b"".join(lines[start:])
    return DeliveredMessage(path, raw, {k: tuple(v) for k, v in envelope.items()})


class SmtpSink:
    """smtp-sink on 127.0.0.1:<free port>, one dump file per message in ``msgs/``."""

    host = "127.0.0.1"

    def __init__(self, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.dir = scratch_dir("sink")
        self.msgs_dir = os.path.join(self.dir, "msgs")
        os.makedirs(self.msgs_dir)
        # as root smtp-sink insists on -u USER and writes the dumps as that user
        shutil.chown(self.msgs_dir, user="postfix")
        self.process: Optional[ManagedProcess] = None

    @property
    def address(self) -> str:
        return "%s:%d" % (self.host, self.port)

    def start(self, timeout: float = 20.0) -> "SmtpSink":
        if self.process is not None and self.process.running():
            return self
        self.process = ManagedProcess(
            [find_program("smtp-sink"), "-u", "postfix", "-d", "msgs/%Y%m%d%H%M%S.",
             self.address, "1000"],
            os.path.join(self.dir, "sink.log"),
            cwd=self.dir,
        )
        process = self.process
        wait_until(self._answers, timeout, "smtp-sink on %s" % self.address, process.diagnostics)
        return self

    def _answers(self) -> bool:
        if self.process is not None and not self.process.running():
            raise ServiceUnavailable("smtp-sink exited\n" + self.process.diagnostics())
        return read_banner(self.host, self.port).startswith(b"220")

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def dump_paths(self) -> List[str]:
        return sorted(glob.glob(os.path.join(self.msgs_dir, "*")), key=os.path.getmtime)

    def messages(self) -> List[DeliveredMessage]:
        """Every delivered message so far, oldest first."""
        return [parse_sink_dump(p) for p in self.dump_paths()]

    def clear(self) -> None:
        for path in self.dump_paths():
            os.unlink(path)


@dataclass(frozen=True)
class SwaksResult:
    """What swaks did: exit status (0 = accepted) and the SMTP transcript."""

    status: int
    transcript: str

    @property
    def server_replies(self) -> List[str]:
        """The server's error replies, e.g. ``554 5.7.1 Gtube pattern`` (lines swaks marks ``<**``)."""
        return [line[4:].strip() for line in self.transcript.splitlines() if line.startswith("<**")]

    @property
    def queue_id(self) -> Optional[str]:
        match = re.search(r"250 2\.0\.0 Ok: queued as (\S+)", self.transcript)
        return match.group(1) if match else None


def _main_cf(p: "Postfix") -> str:
    """main.cf text: the defaults below, with ``extra_main_cf`` replacing or adding settings."""
    lines = (
            "compatibility_level = 3.6",
            "queue_directory = %s/spool" % p.dir,
            "data_directory = %s/data" % p.dir,
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "syslog_name = postfix-%s" % os.path.basename(p.dir),
            "maillog_file_prefixes = %s" % scratch_root(),
            "maillog_file = %s" % p.maillog_path,
            "myhostname = %s" % MYHOSTNAME,
            "mydomain = harness.test",
            "myorigin = $myhostname",
            "inet_interfaces = loopback-only",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "mydestination =",
            "local_recipient_maps =",
            "alias_maps =",
            "alias_database =",
            "relay_domains = example.org example.net",
            "default_transport = smtp:[%s]:%d" % (p.sink.host, p.sink.port),
            "relay_transport = relay:[%s]:%d" % (p.sink.host, p.sink.port),
            "smtp_dns_support_level = disabled",
            "smtpd_relay_restrictions = permit_mynetworks, permit_sasl_authenticated, "
            "reject_unauth_destination",
            "smtpd_authorized_xclient_hosts = 127.0.0.0/8",
            "message_size_limit = 52428800",
            "biff = no",
            "smtpd_sasl_auth_enable = yes",
            "smtpd_sasl_type = cyrus",
            "smtpd_sasl_path = smtpd",
            "smtpd_sasl_local_domain =",
            "smtpd_sasl_security_options = noanonymous",
            "smtpd_milters = %s" % p.milters,
            "non_smtpd_milters =",
            "milter_protocol = 6",
            "milter_mail_macros = i {mail_addr} {client_addr} {client_name} {auth_authen}",
            "milter_default_action = %s" % p.milter_default_action,
            # one session per smtpd process: an idle smtpd started before a reload would
            # otherwise serve the next session with the old settings (smtpd_milters ...)
            "max_use = 1",
    )
    settings = dict(line.split(" = ", 1) if " = " in line else (line.rstrip(" ="), "") for line in lines)
    settings.update(p.extra_main_cf)
    return "".join(("%s = %s" % kv).rstrip() + "\n" for kv in settings.items())


_MASTER_CF = """\
127.0.0.1:%(port)d inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

def postfix_milter_spec(specs: str) -> str:
    """Milter addresses in Postfix's syntax: sendmail's ``inet:PORT@HOST`` becomes
    ``inet:HOST:PORT`` (Postfix reads the former as a host named PORT@HOST and its smtpd dies
    with "garbage after numerical service"); other forms pass unchanged."""
    return re.sub(r"\binet:(\d+)@([^\s,]+)", r"inet:\2:\1", specs)


_template_lock = threading.Lock()
#: a queue tree made by ``postfix check``, copied for every instance of this process
_queue_template: Optional[str] = None


def _copy_tree(source: str, destination: str) -> None:
    """Copy a directory tree keeping owners and modes (the queue belongs to postfix/postdrop)."""
    os.makedirs(destination, exist_ok=True)
    result = run(["cp", "-a", source + "/.", destination])
    if result.returncode != 0:
        raise ServiceUnavailable("copying %s failed:\n%s" % (source, result.stdout.decode()))


@functools.lru_cache(maxsize=None)
def _daemon_directory() -> str:
    result = run([find_program("postconf"), "-d", "-h", "daemon_directory"])
    if result.returncode != 0:
        raise ServiceUnavailable("postconf failed:\n" + result.stdout.decode())
    return result.stdout.decode().strip()


#: the queues a message passes through before delivery (hold is never used here)
_QUEUES = ("maildrop", "incoming", "active", "deferred")


class Postfix:
    """A private Postfix (``postfix -c DIR``) relaying to ``sink``.

    ``milters`` is ``smtpd_milters`` (``inet:127.0.0.1:PORT`` or ``unix:/path``; the sendmail
    form ``inet:PORT@HOST`` of ``Rmilter.milter_inet`` is converted), ``milter_default_action`` what Postfix does
    when the milter is unreachable; ``extra_main_cf`` adds or overrides main.cf settings.
    """

    host = "127.0.0.1"

    def __init__(
        self,
        sink: SmtpSink,
        milters: str = "",
        milter_default_action: str = "tempfail",
        extra_main_cf: Optional[Mapping[str, str]] = None,
        port: Optional[int] = None,
    ) -> None:
        self.sink = sink
        self.port = port or free_port()
        self.dir = scratch_dir("pf")
        self.etc = os.path.join(self.dir, "etc")
        self.maillog_path = os.path.join(self.dir, "maillog")
        self.milters = postfix_milter_spec(milters)
        self.milter_default_action = milter_default_action
        self.extra_main_cf: Dict[str, str] = dict(extra_main_cf or {})
        self.process: Optional[ManagedProcess] = None
        for sub in ("etc/sasl", "spool", "data"):
            os.makedirs(os.path.join(self.dir, sub))
        shutil.chown(os.path.join(self.dir, "data"), user="postfix")

    @property
    def address(self) -> str:
        return "%s:%d" % (self.host, self.port)

    # --- configuration -------------------------------------------------------------------------

    def _write_config(self) -> None:
        write_file(os.path.join(self.etc, "main.cf"), _main_cf(self))
        write_file(os.path.join(self.etc, "master.cf"), _MASTER_CF % {"port": self.port})
        sasldb = os.path.join(self.dir, "sasldb2")
        write_file(
            os.path.join(self.etc, "sasl", "smtpd.conf"),
            "pwcheck_method: auxprop\nauxprop_plugin: sasldb\nmech_list: PLAIN LOGIN\n"
            "sasldb_path: %s\n" % sasldb,
        )
        if not os.path.exists(sasldb):
            for user in SASL_USERS:
                result = run(
                    [find_program("saslpasswd2"), "-p", "-c", "-f", sasldb, "-u", MYHOSTNAME, user],
                    input=SASL_PASSWORD.encode(),
                )
                if result.returncode != 0:
                    raise ServiceUnavailable("saslpasswd2 failed:\n" + result.stdout.decode())
            shutil.chown(sasldb, user="root", group="postfix")
            os.chmod(sasldb, 0o640)

    def postconf(self, settings: Mapping[str, str]) -> None:
        """Change main.cf settings (``postconf -e``); call ``reload()`` to apply them."""
        settings = dict(settings)
        if "smtpd_milters" in settings:
            settings["smtpd_milters"] = postfix_milter_spec(settings["smtpd_milters"])
        self.extra_main_cf.update(settings)
        if "smtpd_milters" in settings:
            self.milters = settings["smtpd_milters"]
        if "milter_default_action" in settings:
            self.milter_default_action = settings["milter_default_action"]
        self._postfix_cmd(
            [find_program("postconf"), "-c", self.etc, "-e"]
            + ["%s = %s" % kv for kv in settings.items()]
        )

    def set_milters(self, milters: str, default_action: Optional[str] = None) -> None:
        """Point ``smtpd_milters`` at ``milters`` (and maybe change the default action); reload."""
        settings = {"smtpd_milters": milters}
        if default_action is not None:
            settings["milter_default_action"] = default_action
        self.postconf(settings)
        self.reload()

    # --- life cycle ----------------------------------------------------------------------------

    def _postfix_cmd(self, argv: Sequence[str], timeout: float = 60.0) -> str:
        result = run(argv, timeout=timeout)
        output = result.stdout.decode("utf-8", "replace")
        if result.returncode != 0:
            # the postfix command prints its reason only to a terminal (or syslog): ask again
            # under script(1) so that the failure message says why
            again = run(["script", "-qc", " ".join(argv), "/dev/null"], timeout=timeout)
            raise ServiceUnavailable(
                "%s failed (status %d):\n%s\n%s\n%s"
                % (" ".join(argv), result.returncode, output,
                   again.stdout.decode("utf-8", "replace"), tail(self.maillog_path))
            )
        return output

    def start(self, timeout: float = 30.0) -> "Postfix":
        """Start the master in the foreground as our child; wait for smtpd's 220 greeting.

        ``postfix start`` would spend seconds in postfix-script's checks on every start: the
        queue tree is instead made once per process by ``postfix check`` and copied, and the
        master runs as ``master -d`` (what ``postfix start`` ends up running, minus detaching).
        """
        if self.process is not None and self.process.running():
            return self
        self._write_config()
        self._make_queue()
        self.process = ManagedProcess(
            [os.path.join(_daemon_directory(), "master"), "-c", self.etc, "-d"],
            os.path.join(self.dir, "master.log"),
        )
        wait_until(self._answers, timeout, "postfix smtpd on %s" % self.address, self.diagnostics)
        return self

    def _make_queue(self) -> None:
        global _queue_template
        spool = os.path.join(self.dir, "spool")
        with _template_lock:
            if _queue_template is None:
                self._postfix_cmd([find_program("postfix"), "-c", self.etc, "check"])
                template = os.path.join(scratch_dir("pfq"), "spool")
                _copy_tree(spool, template)
                _queue_template = template
            else:
                _copy_tree(_queue_template, spool)

    def _answers(self) -> bool:
        if self.process is not None and not self.process.running():
            raise ServiceUnavailable("postfix master exited\n" + self.diagnostics())
        return read_banner(self.host, self.port).startswith(b"220")

    def reload(self, timeout: float = 10.0) -> None:
        """Make the master re-read main.cf (SIGHUP, what ``postfix reload`` sends) and wait for
        its log line; idle smtpd processes exit, new sessions see the new settings."""
        if self.process is None:
            raise AssertionError("postfix is not running")
        before = self._maillog().count("reload -- version")
        self.process.signal(signal.SIGHUP)
        wait_until(lambda: self._maillog().count("reload -- version") > before, timeout,
                   "postfix reload", self.diagnostics)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the master, which stops its children first."""
        if self.process is not None:
            self.process.stop(timeout)
            self.process = None

    def _maillog(self) -> str:
        try:
            with open(self.maillog_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def maillog(self) -> str:
        """Everything Postfix logged (its maillog_file)."""
        return self._maillog()

    def diagnostics(self) -> str:
        parts = [self.process.diagnostics()] if self.process is not None else []
        parts.append(tail(self.maillog_path, 40))
        return "\n".join(p for p in parts if p)

    # --- the queue -----------------------------------------------------------------------------

    def queued_files(self) -> List[str]:
        files: List[str] = []
        for queue in _QUEUES:
            for root, _, names in os.walk(os.path.join(self.dir, "spool", queue)):
                files.extend(os.path.join(root, n) for n in names)
        return files

    def wait_queue_empty(self, timeout: float = 30.0) -> None:
        """Wait until every accepted message has left the queue (delivered to the sink).

        A deferred message fails at once: Postfix would retry only minutes later.
        """
        def empty() -> bool:
            deferred = [f for f in self.queued_files() if "/deferred/" in f]
            if deferred:
                raise AssertionError(
                    "postfix deferred %d message(s)\n%s" % (len(deferred), self.diagnostics())
                )
            return not self.queued_files()

        wait_until(empty, timeout, "postfix queue to drain", self.diagnostics)

    def wait_delivered(self, count: int, timeout: float = 30.0) -> List[DeliveredMessage]:
        """Wait for the queue to drain and ``count`` messages in the sink; all of them."""
        self.wait_queue_empty(timeout)
        wait_until(lambda: len(self.sink.dump_paths()) >= count, timeout,
                   "%d message(s) in the sink" % count, self.diagnostics)
        return self.sink.messages()

    # --- sending -------------------------------------------------------------------------------

    def swaks(
        self,
        data: bytes,
        sender: str = "alice@example.com",
        recipients: Sequence[str] = ("bob@example.org",),
        auth_user: Optional[str] = None,
        auth_password: str = SASL_PASSWORD,
        auth_mechanism: str = "PLAIN",
        xclient_addr: Optional[str] = None,
        xclient_name: Optional[str] = None,
        helo: Optional[str] = None,
        extra_args: Sequence[str] = (),
        timeout: float = 120.0,
    ) -> SwaksResult:
        """Send one message through this Postfix with swaks; exit status and transcript.

        ``xclient_addr``/``xclient_name`` make Postfix see that client (XCLIENT; the milter
        session restarts with it).  ``helo`` defaults to the XCLIENT name when one is given.
        """
        path = os.path.join(scratch_dir("swaks"), "message.eml")
        with open(path, "wb") as f:
            f.write(data)
        argv = [
            find_program("swaks"), "--server", self.address,
            "--from", sender, "--to", ",".join(recipients),
            "--data", "@" + path, "--timeout", str(int(timeout)),
        ]
        if auth_user is not None:
            argv += ["--auth", auth_mechanism, "--auth-user", auth_user,
                     "--auth-password", auth_password]
        if xclient_addr is not None:
            argv += ["--xclient-addr", xclient_addr]
        if xclient_name is not None:
            argv += ["--xclient-name", xclient_name]
        if helo is not None or xclient_name is not None:
            argv += ["--helo", helo or xclient_name or ""]
        argv += list(extra_args)
        result = run(argv, timeout=timeout + 10)
        return SwaksResult(result.returncode, result.stdout.decode("utf-8", "replace"))

