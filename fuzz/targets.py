"""The fuzz targets and their seed corpora, built from the project's own test inputs."""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Sequence, Tuple

from twisted.internet.defer import succeed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- codec + session ------------------------------------------------------------------------------
class _Message:
    tag = "FUZZ"


class _Pipeline:
    """Every stage answers CONTINUE at once: the target is the codec and the state machine."""

    def stages_needing_replies(self) -> Sequence[str]:
        return ()

    def connect(self, conn: Any) -> Any:
        from rmilter.verdict import CONTINUE
        return CONTINUE

    def helo(self, conn: Any, helo: str) -> Any:
        return self.connect(conn)

    def mail(self, conn: Any, argv: Any) -> Tuple[Any, Any]:
        from rmilter.verdict import CONTINUE
        return _Message(), CONTINUE

    def rcpt(self, msg: Any, argv: Any) -> Any:
        from rmilter.verdict import CONTINUE
        return succeed(CONTINUE)

    def data(self, msg: Any) -> Any:
        return self.rcpt(msg, ())

    def header(self, msg: Any, name: str, value: str) -> Any:
        from rmilter.verdict import CONTINUE
        return CONTINUE

    def eoh(self, msg: Any) -> Any:
        return self.header(msg, "", "")

    def body(self, msg: Any, chunk: bytes) -> Any:
        return self.rcpt(msg, ())

    def eom(self, msg: Any) -> Any:
        from rmilter.verdict import ACCEPT
        return succeed(ACCEPT)

    def finish(self, msg: Any, verdict: Any) -> None:
        pass


_failures: List[Any] = []


def _watch_failures() -> None:
    """The session logs internal errors instead of raising them: a logged failure is a finding."""
    if _failures:
        return
    from twisted.logger import globalLogPublisher
    _failures.append(None)
    globalLogPublisher.addObserver(lambda event: _failures.append(event) if "log_failure" in event else None)


def codec_session(data: bytes) -> None:
    """Bytes from an MTA through the CommandReader into a MilterSession; only ProtocolError may end it,
    and nothing may be logged as an internal error."""
    _watch_failures()
    del _failures[1:]
    from rmilter.milter.codec import CommandReader, ProtocolError
    from rmilter.milter.session import MilterSession

    reader = CommandReader(64 * 1024, ignored_macro_stages=b"LB")
    session = MilterSession(_Pipeline(), peer="fuzz")
    try:
        # in two pieces, so frames straddling reads are exercised too
        cut = len(data) // 3
        for piece in (data[:cut], data[cut:]):
            reader.receive_data(piece)
            while not session.close_requested:
                command = reader.next_event()
                if command is None:
                    break
                out = session.handle(command)
                if out is not None and not isinstance(out, bytes):
                    out.addErrback(lambda f: f.raiseException())
    except ProtocolError:
        pass
    session.connection_lost()
    if len(_failures) > 1:
        failure = _failures[1]["log_failure"]
        del _failures[1:]
        failure.raiseException()


def codec_seeds() -> List[bytes]:
    from rmilter.milter import codec
    from rmilter.milter import constants as c

    conversation = [
        codec.Negotiate(6, 0x1FF, 0x1FFFFF),
        codec.Macro("C", (("j", "mx.example.com"), ("{daemon_name}", "smtpd"))),
        codec.Connect("client.example.net", c.SMFIA_INET, 4711, "192.0.2.1"),
        codec.Helo("client.example.net"),
        codec.Macro("M", (("i", "4ABCDE"), ("{mail_addr}", "a@example.net"))),
        codec.Mail(("<a@example.net>", "SIZE=100")),
        codec.Rcpt(("<b@example.com>",)),
        codec.Data(),
        codec.Header("Subject", "hello"),
        codec.Header("From", "a@example.net"),
        codec.EndOfHeaders(),
        codec.Body(b"line 1\r\nline 2\r\n"),
        codec.EndOfMessage(),
        codec.Quit(),
    ]
    frames = [codec.encode(event) for event in conversation]
    return [b"".join(frames), b"".join(frames[:4]), frames[0] + frames[3] * 3, b"".join(frames[:8]) + frames[5]]


# -- config lexer + parser ------------------------------------------------------------------------
def config(data: bytes) -> None:
    """Text of a configuration file (included files are not followed): only ConfigError may come out."""
    from rmilter.config import ConfigError, parse_text
    from rmilter.testing.config import StubResolver

    text = data.decode("utf-8", "surrogateescape").replace(".include", ".inc").replace(".try_include", ".inc")
    try:
        parse_text(text, "fuzz.conf", resolver=StubResolver())
    except ConfigError as e:
        for line in e.errors:
            if not line.startswith("fuzz.conf:"):
                raise AssertionError("an error without FILE:LINE: %r" % (line,))


def config_seeds() -> List[bytes]:
    seeds = []
    with open(os.path.join(REPO, "rmilter.conf.sample"), "rb") as f:
        seeds.append(f.read())
    seeds += [
        b"bind_socket = inet:11339@127.0.0.1;\nmax_size = 10M;\n",
        b'spamd { servers = r:localhost:11333; timeout = 5s; }\nredis { servers_grey = 127.0.0.1; }\n',
        b'greylisting { timeout = 300s; expire = 1d; }\nlimits { enable = true; bounce_to = 5:0.000277778; }\n',
        b'dkim { domain { key = /etc/dkim; domain = "*"; selector = "dkim"; }; sign_alg = sha256; }\n',
    ]
    return seeds


# -- Rspamd reply parser --------------------------------------------------------------------------
def rspamd_reply(data: bytes) -> None:
    """A reply body: a ScanReply or BadReply, nothing else."""
    from rmilter.backends.rspamd.reply import BadReply, parse_scan_reply

    try:
        parse_scan_reply(data, 200)
    except BadReply:
        pass


def rspamd_seeds() -> List[bytes]:
    from rmilter.testing.fake_rspamd import checkv2_reply, legacy_reply

    docs = [
        checkv2_reply(),
        checkv2_reply("reject", 20.0, symbols={"R_SPAM": 10.0}, smtp_message="go away",
                      milter={"add_headers": {"X-A": "1", "X-B": [{"value": "2", "order": 1}]},
                              "remove_headers": {"X-C": 0}, "add_rcpt": ["x@example.com"]}),
        checkv2_reply("add header", 7.0, subject="[SPAM] x", message_id="<m@x>", dkim_signature=["v=1"]),
        legacy_reply("rewrite subject", 6.0, symbols={"A": 1.0}, rmilter={"spam_header": {"X-Spam": "yes"}}),
        {"error": "bad request"},
    ]
    return [json.dumps(d).encode("utf-8") for d in docs]


# -- clamd reply parser ---------------------------------------------------------------------------
def clamd_reply(data: bytes) -> None:
    """What clamd sends back for INSTREAM: a verdict or AttemptFailed."""
    from rmilter.backends.clamd import _verdict
    from rmilter.backends.upstream import AttemptFailed

    try:
        _verdict(data)
    except AttemptFailed:
        pass


def clamd_seeds() -> List[bytes]:
    return [b"stream: OK\0", b"stream: Eicar-Test-Signature FOUND\0", b"INSTREAM size limit exceeded. ERROR\0",
            b"stream: Suspected.Zip FOUND\n", b"garbage"]


TARGETS: Dict[str, Tuple[Callable[[bytes], None], Callable[[], List[bytes]]]] = {
    "codec": (codec_session, codec_seeds),
    "config": (config, config_seeds),
    "rspamd": (rspamd_reply, rspamd_seeds),
    "clamd": (clamd_reply, clamd_seeds),
}
