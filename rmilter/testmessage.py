"""``rmilter test-message``: one message through the real pipeline of a configuration (issue 16).

An administrator about to turn on greylisting, limits or spam rejection sees what rmilter would
answer the MTA, without an MTA: the same ``Pipeline``, ``Transaction`` and checks the milter runs,
driven stage by stage (CONNECT .. EOM) as the milter session drives them.  By default against the
configured Rspamd, clamd and Redis, with Redis writes held back (``ReadOnlyRedisRoles``) unless
``--write``; with ``--offline`` against the in-package fakes of ``rmilter.testing`` on a memory
reactor.  Exit status: see ``EXIT_STATUS``.
"""
from __future__ import annotations

import argparse
import email.utils
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from twisted.internet.defer import Deferred, inlineCallbacks, succeed

from rmilter import config as rconfig
from rmilter.context import ConnectionContext
from rmilter.deps import Deps
from rmilter.pipeline import Pipeline, Transaction
from rmilter.runtime import Runtime
from rmilter.summary import summary_event, summary_text
from rmilter.verdict import (
    Action,
    AddHeader,
    AddRecipient,
    ChangeFrom,
    ChangeHeader,
    CheckResult,
    DeleteRecipient,
    InsertHeader,
    Quarantine,
    ReplaceBody,
    Verdict,
    reply_line,
)

#: exit statuses: what the MTA would have done with the message (1 and 2: the command failed)
ACCEPT_STATUS = 0
ERROR_STATUS = 1
USAGE_STATUS = 2
REJECT_STATUS = 3
TEMPFAIL_STATUS = 4
DISCARD_STATUS = 5
EXIT_STATUS = {
    Action.ACCEPT: ACCEPT_STATUS,
    Action.CONTINUE: ACCEPT_STATUS,
    Action.REJECT: REJECT_STATUS,
    Action.TEMPFAIL: TEMPFAIL_STATUS,
    Action.DISCARD: DISCARD_STATUS,
}
#: the JSON document's version (bump when a field changes meaning)
JSON_VERSION = 1


# -- Redis without writes -------------------------------------------------------------------------
class _Overlay:
    """The keyspace a script sees in read-only mode: the values read first, writes kept here."""

    def __init__(self, values: Dict[bytes, Optional[bytes]], writes: List[str]) -> None:
        self.values = values
        self.writes = writes

    def get(self, key: bytes) -> Optional[bytes]:
        return self.values.get(key)

    def setex(self, key: bytes, ttl: int, value: bytes) -> None:
        self.values[key] = value
        self.writes.append("SETEX %s %d" % (key.decode("utf-8", "replace"), ttl))

    def delete(self, key: bytes) -> None:
        self.values[key] = None
        self.writes.append("DEL %s" % (key.decode("utf-8", "replace"),))


class ReadOnlyRole:
    """A Redis role that reads from the real server and only notes what it would have written.

    Scripts (greylisting's grey step, the rate buckets) read their KEYS with GET and run their
    Python reference (``LuaScript.reference``, the algorithm the fake Redis runs and the
    integration tests compare with the Lua) on those values: the answer is what the real script
    would have answered, and nothing is stored.
    """

    def __init__(self, role: Any, writes: List[str]) -> None:
        self._role = role
        self.writes = writes

    def __getattr__(self, name: str) -> Any:  # shard_of, sharded, stop, ...
        return getattr(self._role, name)

    def get(self, key: bytes, deadline: Optional[float] = None) -> "Deferred[Optional[bytes]]":
        return self._role.get(key, deadline=deadline)

    def setex(self, key: bytes, ttl: int, value: bytes, deadline: Optional[float] = None) -> "Deferred[bool]":
        self.writes.append("SETEX %s %d" % (key.decode("utf-8", "replace"), ttl))
        return succeed(True)

    def delete(self, key: bytes) -> "Deferred[bool]":
        self.writes.append("DEL %s" % (key.decode("utf-8", "replace"),))
        return succeed(True)

    def publish(self, channel: str, payload: bytes, deadline: Optional[float] = None) -> "Deferred[Optional[int]]":
        self.writes.append("PUBLISH %s (%d bytes)" % (channel, len(payload)))
        return succeed(0)

    @inlineCallbacks
    def eval_script(self, script: Any, keys: Sequence[bytes], args: Sequence[bytes],
                    deadline: Optional[float] = None):  # type: ignore[no-untyped-def]
        values: Dict[bytes, Optional[bytes]] = {}
        for key in keys:
            values[key] = yield self._role.get(key, deadline=deadline)
        if script.reference is None:
            self.writes.append("EVALSHA %s (not run: no reference)" % (script.name,))
            return None
        return script.reference(_Overlay(values, self.writes), list(keys), list(args))


def read_only_roles(roles: Any, writes: List[str]) -> Any:
    """The runtime's ``RedisRoles`` with every role read-only (one wrapper per distinct role)."""
    from rmilter.backends.redis import RedisRoles

    wrapped: Dict[int, ReadOnlyRole] = {}

    def wrap(role: Any) -> Any:
        if role is None:
            return None
        if id(role) not in wrapped:
            wrapped[id(role)] = ReadOnlyRole(role, writes)
        return wrapped[id(role)]

    return RedisRoles(grey=wrap(roles.grey), white=wrap(roles.white), limits=wrap(roles.limits),
                      id=wrap(roles.id), spam=wrap(roles.spam), copy=wrap(roles.copy))


# -- the message ------------------------------------------------------------------------------------
@dataclass
class Envelope:
    sender: str = ""
    recipients: Tuple[str, ...] = ()
    ip: str = "192.0.2.1"
    helo: str = "test-message.invalid"
    hostname: str = "unknown"
    user: Optional[str] = None
    queue_id: str = "TESTMSG"


def split_message(data: bytes) -> Tuple[List[Tuple[str, str]], bytes]:
    """Headers (unfolded as the MTA sends them, value without the space after the colon) and body (CRLF)."""
    data = data.replace(b"\r\n", b"\n")
    head, sep, body = data.partition(b"\n\n")
    if not sep and not head.split(b"\n", 1)[0].count(b":"):
        head, body = b"", data
    headers: List[Tuple[str, str]] = []
    for line in head.decode("utf-8", "replace").split("\n"):
        if not line:
            continue
        if line[0] in " \t" and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + "\r\n" + line)
            continue
        name, _, value = line.partition(":")
        headers.append((name.strip(), value[1:] if value.startswith(" ") else value))
    return headers, body.replace(b"\n", b"\r\n")


def _addresses(headers: Sequence[Tuple[str, str]], names: Sequence[str]) -> List[str]:
    values = [v for n, v in headers if n.lower() in names]
    return [a for _, a in email.utils.getaddresses(values) if a]


# -- the run --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What rmilter answered, and the results that made the answer."""

    verdict: Verdict
    stage: str
    results: List[CheckResult]
    timings: List[float]
    summary: str
    refused: List[Tuple[str, Verdict]] = field(default_factory=list)
    writes: List[str] = field(default_factory=list)


def _bracket(address: str) -> str:
    return address if address.startswith("<") else "<%s>" % (address,)


@inlineCallbacks
def run_message(deps: Deps, envelope: Envelope, headers: Sequence[Tuple[str, str]], body: bytes,
                pump: Any = None):  # type: ignore[no-untyped-def]
    """Drive the real pipeline through one message as the milter session does; -> ``Outcome``.

    ``pump`` (offline) moves the fakes' bytes while a stage waits.
    """
    runtime = Runtime(deps)
    pipeline = Pipeline(lambda: runtime)
    timings: Dict[int, float] = {}
    pipeline.observers.append(lambda result, seconds: timings.__setitem__(id(result), seconds))

    def wait(d: "Deferred[Verdict]"):  # type: ignore[no-untyped-def]
        if pump is not None:
            pump(d)
        return d

    family = "6" if ":" in envelope.ip else "4"
    conn = ConnectionContext(hostname=envelope.hostname, family=family, client_address=envelope.ip,
                             client_port=25000)
    conn.macros.define("C", {"j": "test-message", "{daemon_name}": "test-message"})
    pipeline.connect(conn)
    pipeline.helo(conn, envelope.helo)
    mail_macros = {"{mail_addr}": envelope.sender}
    if envelope.user:
        mail_macros["{auth_authen}"] = envelope.user
        mail_macros["{auth_type}"] = "PLAIN"
    conn.macros.define("M", mail_macros)
    txn, verdict = pipeline.mail(conn, [_bracket(envelope.sender)])
    stage = "mail"
    refused: List[Tuple[str, Verdict]] = []
    final: Optional[Verdict] = None
    for rcpt in envelope.recipients:
        conn.macros.define("R", {"{rcpt_addr}": rcpt})
        answer = yield wait(pipeline.rcpt(txn, [_bracket(rcpt)]))
        if answer.ends_message:
            refused.append((rcpt, answer))
    if envelope.recipients and len(refused) == len(envelope.recipients):
        final, stage = refused[-1][1], "rcpt"  # no recipient left: the MTA ends the transaction
    if final is None:
        conn.macros.define("D", {"i": envelope.queue_id})
        answer = yield wait(pipeline.data(txn))
        stage = "data"
        if answer.ends_message:
            final = answer
    if final is None:
        for name, value in headers:
            pipeline.header(txn, name, value)
        pipeline.eoh(txn)
        stage = "body"
        answer = yield wait(pipeline.body(txn, body))
        if answer.ends_message:
            final = answer
    if final is None:
        conn.macros.define("E", {"i": envelope.queue_id})
        stage = "eom"
        final = yield wait(pipeline.eom(txn))
    text = summary_text(summary_event(txn.message, txn.results, final))
    pipeline.finish(txn, final)
    return Outcome(final, stage, list(txn.results), [timings.get(id(r), 0.0) for r in txn.results], text, refused)


# -- offline: the in-package fakes ------------------------------------------------------------------
def offline_deps(config: Any, keyring: Any, rspamd_reply: Optional[Dict[str, Any]], virus: Optional[str]):  # type: ignore[no-untyped-def]
    """Deps whose Rspamd, clamd and Redis are the fakes, on a memory reactor; and the pump that runs them."""
    from twisted.internet.testing import MemoryReactorClock

    from rmilter.backends import clamd as clamd_backend
    from rmilter.backends.rspamd import RspamdClient
    from rmilter.spool import run_inline
    from rmilter.testing.fake_clamd import MemoryClamdNetwork, Script
    from rmilter.testing.fake_redis import FakeRedisRoles
    from rmilter.testing.fake_rspamd import FakeRspamd, checkv2_reply

    reactor = MemoryReactorClock()
    fake = FakeRspamd(rspamd_reply if rspamd_reply is not None else checkv2_reply(), clock=reactor)
    endpoint_for: Any = lambda server: fake.endpoint()  # a FakeEndpoint is an IStreamClientEndpoint
    rspamd = RspamdClient(config.spamd, reactor, endpoint_for=endpoint_for) if config.spamd.servers else None
    network = MemoryClamdNetwork(reactor)
    for server in config.clamav.servers:
        address = server.path if getattr(server, "path", None) else (server.host, server.port)
        network.add(address, Script.found(virus) if virus else Script.ok())
    clamd = clamd_backend.from_config(config, reactor)
    r = config.redis
    roles = [name for name, servers in (("grey", r.servers_grey), ("white", r.servers_white),
                                        ("limits", r.servers_limits), ("id", r.servers_id),
                                        ("spam", r.servers_spam), ("copy", r.servers_copy)) if servers]
    redis = FakeRedisRoles(reactor, roles=roles) if config.redis_enabled and roles else None
    deps = Deps(config=config, clock=reactor, run_blocking=run_inline, rspamd=rspamd, clamd=clamd,
                redis=redis, keyring=keyring)

    def pump(d: Deferred) -> None:
        for _ in range(10000):
            if d.called:
                return
            fake.flush()
            network.run()
            reactor.advance(0.01)

    return deps, pump


# -- output ---------------------------------------------------------------------------------------
_MILTER_REPLY = {
    Action.ACCEPT: "SMFIR_ACCEPT",
    Action.CONTINUE: "SMFIR_CONTINUE",
    Action.REJECT: "SMFIR_REJECT",
    Action.TEMPFAIL: "SMFIR_TEMPFAIL",
    Action.DISCARD: "SMFIR_DISCARD",
}


def report(outcome: Outcome) -> Dict[str, Any]:
    """The JSON document (``--json``); the text output prints the same fields."""
    verdict = outcome.verdict
    line = reply_line(verdict.action, verdict.reply)
    headers: Dict[str, List[Dict[str, Any]]] = {"added": [], "inserted": [], "changed": [], "removed": []}
    recipients: Dict[str, List[Any]] = {"added": [], "removed": [], "refused": []}
    sender: Optional[str] = None
    body_replaced = False
    quarantine: Optional[str] = None
    signatures: List[str] = []
    for edit in verdict.edits:
        if isinstance(edit, AddHeader):
            headers["added"].append({"name": edit.name, "value": edit.value})
        elif isinstance(edit, InsertHeader):
            headers["inserted"].append({"index": edit.index, "name": edit.name, "value": edit.value})
        elif isinstance(edit, ChangeHeader):
            if edit.value:
                headers["changed"].append({"name": edit.name, "index": edit.index, "value": edit.value})
            else:
                headers["removed"].append({"name": edit.name, "index": edit.index})
        elif isinstance(edit, AddRecipient):
            recipients["added"].append(edit.address)
        elif isinstance(edit, DeleteRecipient):
            recipients["removed"].append(edit.address)
        elif isinstance(edit, ChangeFrom):
            sender = edit.address
        elif isinstance(edit, ReplaceBody):
            body_replaced = True
        elif isinstance(edit, Quarantine):
            quarantine = edit.reason
        if isinstance(edit, (AddHeader, InsertHeader)) and edit.name.lower() == "dkim-signature":
            signatures.append(edit.value)
    for address, refusal in outcome.refused:
        recipients["refused"].append({"address": address, "reply": reply_line(refusal.action, refusal.reply)})
    checks = []
    for result, seconds in zip(outcome.results, outcome.timings):
        checks.append({
            "check": result.check.value,
            "result": result.summary,
            "failed": result.failed,
            "skipped": result.skipped,
            "would": result.would,
            "would_reply": None if result.would_verdict is None else
            reply_line(result.would_verdict.action, result.would_verdict.reply),
            "demanded": None if result.verdict is None else result.verdict.action.value,
            "time": round(seconds, 6),
            "details": {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v))
                        for k, v in result.details.items()},
        })
    return {
        "version": JSON_VERSION,
        "action": Action.ACCEPT.value if verdict.action is Action.CONTINUE else verdict.action.value,
        "stage": outcome.stage,
        "milter_reply": "SMFIR_REPLYCODE" if line is not None else _MILTER_REPLY[verdict.action],
        "smtp_reply": None if verdict.reply is None or line is None else
        {"code": verdict.reply.code, "ecode": verdict.reply.ecode, "text": verdict.reply.text, "line": line},
        "headers": headers,
        "recipients": recipients,
        "sender": sender,
        "body_replaced": body_replaced,
        "quarantine": quarantine,
        "dkim_signatures": signatures,
        "checks": checks,
        "summary": outcome.summary,
        "redis_writes_held_back": outcome.writes,
        "exit_status": EXIT_STATUS[verdict.action],
    }


def print_text(doc: Dict[str, Any], out: TextIO) -> None:
    out.write("milter reply: %s (%s, at %s)\n" % (doc["milter_reply"], doc["action"], doc["stage"]))
    if doc["smtp_reply"]:
        out.write("smtp reply: %s\n" % doc["smtp_reply"]["line"])
    for h in doc["headers"]["added"]:
        out.write("header added: %s: %s\n" % (h["name"], h["value"]))
    for h in doc["headers"]["inserted"]:
        out.write("header inserted at %d: %s: %s\n" % (h["index"], h["name"], h["value"]))
    for h in doc["headers"]["changed"]:
        out.write("header changed: %s[%d]: %s\n" % (h["name"], h["index"], h["value"]))
    for h in doc["headers"]["removed"]:
        out.write("header removed: %s[%d]\n" % (h["name"], h["index"]))
    for a in doc["recipients"]["added"]:
        out.write("recipient added: %s\n" % a)
    for a in doc["recipients"]["removed"]:
        out.write("recipient removed: %s\n" % a)
    for r in doc["recipients"]["refused"]:
        out.write("recipient refused: %s (%s)\n" % (r["address"], r["reply"]))
    if doc["sender"]:
        out.write("sender changed: %s\n" % doc["sender"])
    if doc["body_replaced"]:
        out.write("body replaced\n")
    if doc["quarantine"]:
        out.write("quarantined: %s\n" % doc["quarantine"])
    for s in doc["dkim_signatures"]:
        out.write("dkim signature: %s\n" % s)
    for c in doc["checks"]:
        out.write("check %s: %s (%.3f s)\n" % (c["check"], c["result"], c["time"]))
        if c["would_reply"]:
            out.write("  would have answered: %s\n" % c["would_reply"])
    for w in doc["redis_writes_held_back"]:
        out.write("redis write held back (no --write): %s\n" % w)
    out.write("summary: %s\n" % doc["summary"])


# -- the command ----------------------------------------------------------------------------------
def add_parser(commands: Any) -> None:
    """The ``test-message`` subcommand (cli.py adds it and calls ``main``)."""
    p = commands.add_parser(
        "test-message",
        help="run one message through the pipeline of a configuration and print rmilter's answer",
        description="Run MESSAGE (a file, or - for standard input) through the checks of the "
        "configuration as the milter would, and print the milter reply and SMTP reply, every header "
        "added, changed or removed, recipient and sender changes, the DKIM signature, each check's "
        "result and time, and the summary line. Exit status: 0 accept, 3 reject, 4 tempfail, "
        "5 discard; 1 error, 2 usage. Redis is read, never written, unless --write.",
    )
    p.add_argument("message", metavar="MESSAGE.eml|-")
    p.add_argument("--config", metavar="FILE", help="configuration file (default: the embedded default)")
    p.add_argument("--from", dest="sender", metavar="ADDR", help="envelope sender (default: the From: address)")
    p.add_argument("--rcpt", action="append", default=[], metavar="ADDR",
                   help="envelope recipient, repeatable (default: the To: and Cc: addresses)")
    p.add_argument("--ip", default="192.0.2.1", help="client address (default 192.0.2.1)")
    p.add_argument("--helo", default="test-message.invalid", help="HELO name")
    p.add_argument("--hostname", default="unknown", help="client host name")
    p.add_argument("--auth", metavar="USER", help="the client authenticated as USER")
    p.add_argument("--queue-id", default="TESTMSG", help="queue id (default TESTMSG)")
    p.add_argument("--offline", action="store_true",
                   help="use in-memory fakes: Rspamd answers --rspamd-reply, clamd is clean or finds "
                   "--virus, Redis is empty and in memory")
    p.add_argument("--rspamd-reply", metavar="FILE.json", help="offline: Rspamd's /checkv2 reply")
    p.add_argument("--virus", metavar="NAME", help="offline: clamd finds this virus")
    p.add_argument("--write", action="store_true", help="let greylisting, limits and replies write to Redis")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def main(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    from rmilter.service import load_configuration

    if (args.rspamd_reply or args.virus) and not args.offline:
        err.write("test-message: --rspamd-reply and --virus need --offline\n")
        return USAGE_STATUS
    try:
        config, keyring = load_configuration(args.config)
    except rconfig.ConfigError as e:
        for line in e.errors:
            err.write(line + "\n")
        return ERROR_STATUS
    try:
        if args.message == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.message, "rb") as f:
                data = f.read()
        reply_doc = None
        if args.rspamd_reply:
            with open(args.rspamd_reply, encoding="utf-8") as f:
                reply_doc = json.load(f)
    except (OSError, ValueError) as e:
        err.write("test-message: %s\n" % (e,))
        return ERROR_STATUS
    headers, body = split_message(data)
    sender = args.sender if args.sender is not None else next(iter(_addresses(headers, ("from",))), "")
    recipients = tuple(args.rcpt) or tuple(_addresses(headers, ("to", "cc")))
    envelope = Envelope(sender=sender, recipients=recipients, ip=args.ip, helo=args.helo,
                        hostname=args.hostname, user=args.auth, queue_id=args.queue_id)
    if args.offline:
        deps, pump = offline_deps(config, keyring, reply_doc, args.virus)
        d = run_message(deps, envelope, headers, body, pump)
        pump(d)
        if not d.called:
            err.write("test-message: the pipeline did not finish\n")
            return ERROR_STATUS
        outcome: Outcome = _result_of(d)
    else:
        outcome = _run_online(config, keyring, envelope, headers, body, args.write)
    doc = report(outcome)
    if args.json:
        out.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    else:
        print_text(doc, out)
    return doc["exit_status"]


def _result_of(d: Deferred) -> Any:
    box: List[Any] = []
    d.addBoth(box.append)
    result = box[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def _run_online(config: Any, keyring: Any, envelope: Envelope, headers: Any, body: bytes, write: bool) -> Outcome:
    """The configured backends on the real reactor (a process of its own: the command)."""
    from twisted.internet import reactor, threads

    def run_blocking(f: Any, *a: Any) -> Deferred:
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a)  # type: ignore[attr-defined]

    built = Runtime.build(config, reactor, run_blocking, keyring)
    writes: List[str] = []
    deps = built.deps
    if deps.redis is not None and not write:
        import dataclasses

        deps = dataclasses.replace(deps, redis=read_only_roles(deps.redis, writes))
    box: List[Any] = []

    @inlineCallbacks
    def go():  # type: ignore[no-untyped-def]
        try:
            box.append((yield run_message(deps, envelope, headers, body)))
        except Exception:
            from twisted.python.failure import Failure

            box.append(Failure())
        finally:
            yield built.stop()
            reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(go)  # type: ignore[attr-defined]
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined,misc,call-arg]
    result = box[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    result.writes = writes
    return result
