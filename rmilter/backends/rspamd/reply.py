"""Rspamd's reply, as SPEC §6.8.2 and §7.1 describe it: the model and its parsing.

Both shapes are read whichever endpoint was asked: the legacy ``/symbols`` one
(the scan inside ``default``, changes in an ``rmilter`` block) and the /checkv2
one (metric fields at the top level, ``symbols``, a ``milter`` block).  Unknown
keys are ignored; a value of the wrong type counts as absent, so no reply a
server can send raises anything but ``BadReply``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

ACTIONS = ("reject", "soft reject", "rewrite subject", "add header", "greylist", "no action")
#: at most this many edits of each kind (add_headers, remove_headers, spam_header, add_rcpt,
#: del_rcpt) are taken from one reply; a reply asking for 20,000 is not forwarded whole (issue 18)
MAX_HEADER_EDITS = 100
#: the first bytes of a zstd frame: a compressed reply even without a Compression header
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class BadReply(Exception):
    """Rspamd answered, but not with a usable scan result (SPEC §6.8.2)."""

    def __init__(self, reason: str, status: int = 0) -> None:
        super().__init__(reason if not status else "%s (HTTP %d)" % (reason, status))
        self.status = status


@dataclass(frozen=True)
class Symbol:
    """One rule that matched: its name, its score and the options it reported (SPEC §6.8.2)."""

    name: str
    score: float
    options: Tuple[str, ...] = ()


@dataclass(frozen=True)
class HeaderAddition:
    """A header Rspamd wants added: appended, or inserted at ``order`` (SPEC §6.8.5)."""

    name: str
    value: str
    order: Optional[int] = None


@dataclass(frozen=True)
class ScanReply:
    """A parsed reply, the same for the legacy and the /checkv2 shape (SPEC §6.8.2)."""

    action: str = "no action"
    score: float = 0.0
    required_score: float = 0.0
    subject: Optional[str] = None
    symbols: Tuple[Symbol, ...] = ()
    message_id: Optional[str] = None
    smtp_message: Optional[str] = None
    dkim_signatures: Tuple[str, ...] = ()
    #: "milter" (checkv2), "rmilter" (legacy) or None: which header block was given
    header_block: Optional[str] = None
    remove_headers: Tuple[Tuple[str, int], ...] = ()
    add_headers: Tuple[HeaderAddition, ...] = ()
    change_from: Optional[str] = None
    add_rcpt: Tuple[str, ...] = ()
    del_rcpt: Tuple[str, ...] = ()
    #: milter.reject: "discard" or "quarantine" instead of rejecting
    reject_mode: Optional[str] = None
    #: milter.no_action: do not apply the action
    no_action: bool = False
    #: milter.spam_header for "add header": (name or None for the configured one, value)
    spam_headers: Tuple[Tuple[Optional[str], str], ...] = ()
    #: the action as Rspamd wrote it when it is not one of ACTIONS (logged)
    unknown_action: Optional[str] = None
    #: edits beyond MAX_HEADER_EDITS per kind that were dropped, e.g. "19900 add_headers" (logged)
    dropped_edits: Optional[str] = None

    def has_symbol(self, name: str) -> bool:
        """SPEC §6.8.7: symbol names compared up to a ``(``."""
        return any(s.name.split("(", 1)[0] == name for s in self.symbols)



class _JsonObject(dict):  # type: ignore[type-arg]
    """A JSON object that also remembers repeated keys (UCL allows them, SPEC §6.8.5)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: List[Tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.pairs = pairs


def _json_object(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """A plain dict, unless a key repeats: then the pairs are kept too."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        return _JsonObject(pairs)
    return obj


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    try:
        return float(value)
    except OverflowError:  # an integer beyond any double
        return 0.0


def _string(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _integer(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _symbols(obj: Any) -> Tuple[Symbol, ...]:
    """Every ``{name: {"score":.., "options": [..]}}`` entry of ``obj`` (others are skipped)."""
    out: List[Symbol] = []
    append = out.append
    for name, value in _pairs(obj):
        if not isinstance(value, dict):
            continue
        options = value.get("options")
        opts: Tuple[str, ...] = ()
        if options and isinstance(options, list):
            opts = tuple([o for o in options if isinstance(o, str)])
        given = value.get("name")
        score = value.get("score")
        append(Symbol(given if given and isinstance(given, str) else name,
                      score if type(score) is float else _number(score), opts))
    return tuple(out)


def _strings(value: Any) -> Tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()


def _pairs(obj: Any) -> List[Tuple[str, Any]]:
    if isinstance(obj, _JsonObject):
        return obj.pairs
    if isinstance(obj, dict):
        return list(obj.items())
    return []


def _header_additions(block: Any) -> Tuple[HeaderAddition, ...]:
    """add_headers: ``{name: "v"}``, ``{name: ["v", ...]}``, ``{name: {"value":.., "order":..}}``."""
    out: List[HeaderAddition] = []

    def one(name: str, item: Any) -> None:
        if isinstance(item, str):
            out.append(HeaderAddition(name, item))
        elif isinstance(item, dict):
            value = item.get("value")
            if isinstance(value, str):
                order = item.get("order", item.get("index"))
                out.append(HeaderAddition(name, value, _integer(order)))

    for name, item in _pairs(block):
        if isinstance(item, list):
            for element in item:
                one(name, element)
        else:
            one(name, item)
    return tuple(out)



def _header_removals(block: Any) -> Tuple[Tuple[str, int], ...]:
    """remove_headers: ``{name: n}`` with an integer n (the meaning of n is the check's business)."""
    out: List[Tuple[str, int]] = []
    for name, index in _pairs(block):
        n = _integer(index)
        if n is not None:
            out.append((name, n))
    return tuple(out)


def _spam_headers(value: Any) -> Tuple[Tuple[Optional[str], str], ...]:
    """milter.spam_header: a value for the configured header, or ``{name: value}`` headers."""
    if isinstance(value, str):
        return ((None, value),)
    return tuple((name, v) for name, v in _pairs(value) if isinstance(v, str))


def _reject_mode(value: Any) -> Optional[str]:
    """milter.reject: ``discard`` or ``quarantine`` instead of rejecting; anything else: reject."""
    mode = _string(value)
    return mode if mode in ("discard", "quarantine") else None


def _http_status(status: int) -> int:
    """The status worth naming in a ``BadReply``: 200 goes without saying."""
    return status if status != 200 else 0


def _document(body: bytes, status: int) -> Dict[str, Any]:
    """The reply's top-level JSON object."""
    try:
        top = json.loads(body.decode("utf-8", "replace"), object_pairs_hook=_json_object)
    except ValueError as e:
        raise BadReply("unparsable reply: %s" % (e,), _http_status(status))
    if not isinstance(top, dict):
        raise BadReply("reply is not an object", _http_status(status))
    return top


def _metric(top: Dict[str, Any], status: int) -> Tuple[Dict[str, Any], Tuple[Symbol, ...]]:
    """Where the scan's fields are, and its symbols: ``default`` (legacy) or the top level (/checkv2)."""
    metric = top.get("default")
    if isinstance(metric, dict):
        return metric, _symbols(metric)  # legacy: symbols are the metric's object members
    if "action" in top or "score" in top or isinstance(top.get("symbols"), dict):
        return top, _symbols(top.get("symbols"))
    error = _string(top.get("error"))
    raise BadReply("no scan result" + (": %s" % error if error else ""), _http_status(status))


def _action(value: Any) -> Tuple[str, Optional[str]]:
    """The action, and what Rspamd wrote when it is none of ``ACTIONS`` ("" when it wrote nothing)."""
    action = _string(value)
    if action is None or action not in ACTIONS:
        return "no action", action if action is not None else ""
    return action, None


def _smtp_message(top: Dict[str, Any]) -> Optional[str]:
    messages = top.get("messages")
    return _string(messages.get("smtp_message")) if isinstance(messages, dict) else None


def _header_block(top: Dict[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
    """The block of requested changes and its name: ``milter`` (checkv2) before ``rmilter`` (legacy)."""
    for name in ("milter", "rmilter"):
        block = top.get(name)
        if isinstance(block, dict):
            return name, block
    return None, {}


def parse_scan_reply(body: bytes, status: int = 200) -> ScanReply:
    """Both reply shapes (SPEC §6.8.2); raises ``BadReply`` when there is no scan result.

    The HTTP status only matters when the body is not a scan result.  Whatever goes wrong
    while reading the body (JSON nested 100,000 deep is a RecursionError, not a ValueError)
    is a ``BadReply``: a failed attempt at once, never an unhandled error (issue 18).
    """
    try:
        return _parse_scan_reply(body, status)
    except BadReply:
        raise
    except Exception as e:
        raise BadReply("unparsable reply: %s" % (type(e).__name__,), _http_status(status)) from None


def _capped(edits: Tuple[Any, ...], what: str, dropped: List[str]) -> Tuple[Any, ...]:
    if len(edits) <= MAX_HEADER_EDITS:
        return edits
    dropped.append("%d %s" % (len(edits) - MAX_HEADER_EDITS, what))
    return edits[:MAX_HEADER_EDITS]


def _parse_scan_reply(body: bytes, status: int) -> ScanReply:
    top = _document(body, status)
    fields, symbols = _metric(top, status)
    action, unknown_action = _action(fields.get("action"))
    block_name, block = _header_block(top)
    dropped: List[str] = []
    return ScanReply(
        action=action,
        score=_number(fields.get("score")),
        required_score=_number(fields.get("required_score")),
        subject=_string(fields.get("subject")),
        symbols=symbols,
        message_id=_string(top.get("message-id")),
        smtp_message=_smtp_message(top),
        dkim_signatures=_strings(top.get("dkim-signature")),
        header_block=block_name,
        remove_headers=_capped(_header_removals(block.get("remove_headers")), "remove_headers", dropped),
        add_headers=_capped(_header_additions(block.get("add_headers")), "add_headers", dropped),
        change_from=_string(block.get("change_from")),
        add_rcpt=_capped(_strings(block.get("add_rcpt")), "add_rcpt", dropped),
        del_rcpt=_capped(_strings(block.get("del_rcpt")), "del_rcpt", dropped),
        reject_mode=_reject_mode(block.get("reject")),
        no_action=block.get("no_action") is True,
        spam_headers=_capped(_spam_headers(block.get("spam_header")), "spam_header", dropped),
        unknown_action=unknown_action,
        dropped_edits=", ".join(dropped) or None,
    )


def decompress_reply(body: bytes) -> bytes:
    """A zstd reply (``Compression: zstd`` requests, SPEC §6.8.2) as plain bytes."""
    import zstandard

    try:
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    except zstandard.ZstdError as e:
        raise BadReply("cannot decompress reply: %s" % (e,))
    except Exception as e:  # e.g. MemoryError: still a failed attempt, never an unhandled error
        raise BadReply("cannot decompress reply: %s" % (type(e).__name__,)) from None

