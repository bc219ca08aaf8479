"""A pipeline stand-in for tests of the milter engine: records every call, answers as told.

``FakePipeline`` has the methods ``rmilter.milter.session.MilterSession`` calls on
``rmilter.pipeline.Pipeline``.  Each stage answers CONTINUE (ACCEPT at EOM)
unless ``answers[stage]`` says otherwise: a ``Verdict``, a ``Deferred`` (the
test fires it later), an exception instance (raised), or a callable returning
any of those.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from rmilter.config.schema import Config
from rmilter.context import ConnectionContext, MessageContext
from rmilter.deps import Deps
from rmilter.runtime import Runtime
from rmilter.spool import run_inline
from rmilter.verdict import ACCEPT, CONTINUE, Verdict


class FakePipeline:
    def __init__(self, needing: Sequence[str] = ("eom",), config: Optional[Config] = None) -> None:
        self.needing = tuple(needing)
        self.runtime = Runtime(Deps(config=config or Config(), clock=Clock(), run_blocking=run_inline))
        self.answers: Dict[str, Any] = {}
        #: (stage, details...) for every call, in order
        self.calls: List[Tuple[Any, ...]] = []
        #: (message, verdict or None) for every pipeline.finish
        self.finished: List[Tuple[MessageContext, Optional[Verdict]]] = []
        #: messages whose MTA went away while a stage waited
        self.abandoned: List[MessageContext] = []
        self.messages: List[MessageContext] = []

    def current_runtime(self) -> Runtime:
        return self.runtime

    def stages_needing_replies(self) -> Tuple[str, ...]:
        return self.needing

    def _answer(self, stage: str, default: Verdict) -> Any:
        answer = self.answers.get(stage, default)
        if callable(answer) and not isinstance(answer, (Verdict, Deferred)):
            answer = answer()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _deferred(self, stage: str, default: Verdict) -> "Deferred[Verdict]":
        answer = self._answer(stage, default)
        return answer if isinstance(answer, Deferred) else succeed(answer)

    def connect(self, conn: ConnectionContext) -> Verdict:
        self.calls.append(("connect", conn.hostname, conn.family, conn.client_address, conn.client_port))
        return self._answer("connect", CONTINUE)

    def helo(self, conn: ConnectionContext, helo: str) -> Verdict:
        self.calls.append(("helo", helo))
        conn.helo = helo
        return self._answer("helo", CONTINUE)

    def mail(self, conn: ConnectionContext, argv: Sequence[str]) -> Tuple[MessageContext, Verdict]:
        self.calls.append(("mail", tuple(argv)))
        msg = MessageContext(connection=conn)
        msg.set_sender(argv[0] if argv else "", conn.macros.get("{mail_addr}"))
        self.messages.append(msg)
        return msg, self._answer("mail", CONTINUE)

    def rcpt(self, msg: MessageContext, argv: Sequence[str]) -> "Deferred[Verdict]":
        self.calls.append(("rcpt", tuple(argv)))
        return self._deferred("rcpt", CONTINUE)

    def data(self, msg: MessageContext) -> "Deferred[Verdict]":
        self.calls.append(("data",))
        return self._deferred("data", CONTINUE)

    def header(self, msg: MessageContext, name: str, value: str) -> Verdict:
        self.calls.append(("header", name, value))
        msg.headers.append((name, value))
        return self._answer("header", CONTINUE)

    def eoh(self, msg: MessageContext) -> Verdict:
        self.calls.append(("eoh",))
        return self._answer("eoh", CONTINUE)

    def body(self, msg: MessageContext, chunk: bytes) -> "Deferred[Verdict]":
        self.calls.append(("body", chunk))
        return self._deferred("body", CONTINUE)

    def eom(self, msg: MessageContext) -> "Deferred[Verdict]":
        self.calls.append(("eom",))
        return self._deferred("eom", ACCEPT)

    def finish(self, msg: MessageContext, verdict: Optional[Verdict]) -> None:
        self.calls.append(("finish", verdict))
        self.finished.append((msg, verdict))

    def abandon(self, msg: MessageContext) -> None:
        self.calls.append(("abandon",))
        self.abandoned.append(msg)

    def stages(self) -> List[str]:
        """The stage names called so far, in order."""
        return [call[0] for call in self.calls]
