"""What the MTA said about an SMTP session and the message in it (SPEC §2, §5.1).

The milter session and the pipeline fill these from decoded commands; the checks
read them.  They are data only: nothing here knows the wire format, a backend or
the configuration, and no check writes into them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from rmilter.netlist import normalise_sender

if TYPE_CHECKING:
    from rmilter.spool import Spool

#: macro stages in protocol order; a command of an earlier stage drops the later ones (SPEC §3.5)
MACRO_STAGES = "CHMRTLNBE"


def _macro_key(name: str) -> str:
    """``i`` and ``{i}`` are the same macro (SPEC §3.5)."""
    if name.startswith("{") and name.endswith("}"):
        return name[1:-1]
    return name


#: for each stage, the stages after it (their macros are dropped when it arrives)
_LATER_STAGES = {stage: MACRO_STAGES[i + 1 :] for i, stage in enumerate(MACRO_STAGES)}


class MacroStore:
    """Macros sent by the MTA, per stage, searched newest stage first."""

    __slots__ = ("_stages",)

    def __init__(self) -> None:
        self._stages: Dict[str, Dict[str, str]] = {}

    def define(self, stage: str, pairs: Union[Mapping[str, str], Iterable[Tuple[str, str]]]) -> bool:
        """Store the macros of one MACRO packet, dropping the sets of all later stages.

        Macros of a stage code outside ``MACRO_STAGES`` are dropped (False): nothing reads
        them, and keeping them let one connection hold a frame per byte value (issue 18).
        """
        if stage not in _LATER_STAGES:
            return False
        stages = self._stages
        for later in _LATER_STAGES.get(stage, ""):
            if later in stages:
                del stages[later]
        items = pairs.items() if isinstance(pairs, Mapping) else pairs
        stages[stage] = {(k[1:-1] if k[:1] == "{" and k[-1:] == "}" else k): v for k, v in items}
        return True

    def get(self, name: str) -> Optional[str]:
        key = _macro_key(name)
        stages = self._stages
        for stage in reversed(MACRO_STAGES):
            values = stages.get(stage)
            if values is not None and key in values:
                return values[key]
        return None

    def clear(self) -> None:
        self._stages.clear()


@dataclass
class ConnectionContext:
    """One SMTP client session as the MTA described it at CONNECT and HELO (SPEC §5.2, §5.3)."""

    macros: MacroStore = field(default_factory=MacroStore)
    hostname: str = ""
    family: str = "U"  # "4", "6", "L" (unix, treated as 127.0.0.1: B20) or "U" (unknown)
    client_address: Optional[str] = None  # canonical text; None for family U
    client_port: int = 0
    helo: str = ""
    daemon_name: Optional[str] = None  # {daemon_name}: sent to rspamd as MTA-Tag
    mta_hostname: Optional[str] = None  # j macro, logged only
    messages: int = 0  # transactions started on this connection

    @property
    def client_hostname(self) -> str:
        """The hostname to report: CONNECT's argument, else ``{client_name}``, else ``unknown``."""
        if self.hostname:
            return self.hostname
        return self.macros.get("{client_name}") or "unknown"


def new_message_tag() -> str:
    """10 random lowercase hex digits: prefixes every log line of a message (SPEC §2)."""
    return os.urandom(5).hex()


@dataclass
class Recipient:
    address: str  # raw, as the client wrote it, brackets and case kept (SPEC §5.5)
    whitelisted: bool = False


@dataclass
class MessageContext:
    """One transaction as the MTA described it: envelope, headers and the body spool."""

    connection: ConnectionContext
    tag: str = field(default_factory=new_message_tag)
    queue_id: Optional[str] = None
    raw_sender: str = ""  # argv[0] of MAIL
    envelope_from: str = ""  # normalised sender (SPEC §5.4); "" = null sender
    esmtp_args: Tuple[str, ...] = ()
    user: Optional[str] = None  # SASL login, or the sender for our_networks clients
    sasl_authenticated: bool = False
    recipients: List[Recipient] = field(default_factory=list)
    headers: List[Tuple[str, str]] = field(default_factory=list)
    has_return_path: bool = False
    subject: Optional[str] = None  # value of the last Subject header
    spool: Optional["Spool"] = None
    started: float = 0.0  # wall-clock time of MAIL, for the summary's duration

    @property
    def authenticated(self) -> bool:
        """SPEC §5.11 "Auth": SASL login or a client in ``our_networks``."""
        return self.user is not None

    @property
    def client_address(self) -> Optional[str]:
        return self.connection.client_address

    @property
    def recipient_addresses(self) -> List[str]:
        return [r.address for r in self.recipients]

    @property
    def recipient_whitelisted(self) -> bool:
        """All accepted recipients are in the global whitelist (B3)."""
        return bool(self.recipients) and all(r.whitelisted for r in self.recipients)

    @property
    def queue_id_or_noqueue(self) -> str:
        return self.queue_id or "NOQUEUE"

    def header_values(self, name: str) -> List[str]:
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def set_sender(self, argv0: str, mail_addr_macro: Optional[str]) -> None:
        """SPEC §5.4 step 1 with B19: fall back to argv[0] when ``{mail_addr}`` is absent."""
        self.raw_sender = argv0
        value = mail_addr_macro
        if value is None or "@" not in value:
            value = argv0
        self.envelope_from = normalise_sender(value)
