"""Wire codes of the milter protocol, version 6 (SPEC §3.2-§3.4).

Names follow libmilter's ``mfdef.h`` so they can be grepped for in libmilter,
Postfix (``src/milter/milter8.c``) and Sendmail sources.  Command and reply
codes are one-byte ``bytes``; flags are plain ints (they are combined and
tested on every connection, an ``IntFlag`` would only be slower).
"""
from __future__ import annotations

from typing import Dict, Mapping

#: the protocol version this implementation speaks (SPEC §3.4)
MILTER_VERSION = 6
#: an MTA older than this is refused
MILTER_MIN_VERSION = 2
#: largest body piece in one BODY command / REPLBODY reply (libmilter MILTER_CHUNK_SIZE)
MILTER_CHUNK_SIZE = 65535

# -- commands, MTA to filter (SMFIC_*, SPEC §3.2) ------------------------------------------
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# -- replies, filter to MTA (SMFIR_*, SPEC §3.3) -------------------------------------------
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_SETSYMLIST = b"l"  # libmilter's name; the lists travel inside the OPTNEG reply
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"
SMFIR_OPTNEG = b"O"

# -- connect address families (SMFIA_*) ----------------------------------------------------
SMFIA_UNKNOWN = "U"
SMFIA_UNIX = "L"
SMFIA_INET = "4"
SMFIA_INET6 = "6"
FAMILIES = (SMFIA_UNKNOWN, SMFIA_UNIX, SMFIA_INET, SMFIA_INET6)

# -- actions the filter may take (SMFIF_*, SPEC §3.4) ---------------------------------------
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
#: an MTA that sends 0 in the action field means the protocol v1 defaults
SMFIF_V1_DEFAULT = 0x0F

#: rmilter cannot work without these (SPEC §3.4: header edits and the trace recipient)
REQUIRED_ACTIONS = SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_ADDRCPT
#: requested whenever the MTA offers them (DELRCPT for parity with C, the rest for the edits
#: a Verdict may carry)
OPTIONAL_ACTIONS = (
    SMFIF_DELRCPT | SMFIF_CHGFROM | SMFIF_ADDRCPT_PAR | SMFIF_QUARANTINE | SMFIF_CHGBODY | SMFIF_SETSYMLIST
)

# -- protocol flags (SMFIP_*, SPEC §3.4) ---------------------------------------------------
SMFIP_NOCONNECT = 0x1
SMFIP_NOHELO = 0x2
SMFIP_NOMAIL = 0x4
SMFIP_NORCPT = 0x8
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
SMFIP_MDS_256K = 0x10000000
SMFIP_MDS_1M = 0x20000000
#: an MTA that sends 0 in the protocol field means the protocol v1 defaults
SMFIP_V1_DEFAULT = 0x3F
#: every bit a v6 MTA may offer (Postfix 2.6+ offers exactly this)
SMFIP_ALL_V6 = 0x1FFFFF

# -- pipeline stages and their no-reply bits -----------------------------------------------
#: stage names as ``Pipeline.stages_needing_replies()`` spells them
STAGE_CONNECT = "connect"
STAGE_HELO = "helo"
STAGE_MAIL = "mail"
STAGE_RCPT = "rcpt"
STAGE_DATA = "data"
STAGE_HEADER = "header"
STAGE_EOH = "eoh"
STAGE_BODY = "body"
STAGE_EOM = "eom"
STAGE_UNKNOWN = "unknown"

#: the SMFIP_NR_* bit that lets the filter stay silent at a stage (EOM always needs a reply)
NO_REPLY_BITS: Mapping[str, int] = {
    STAGE_CONNECT: SMFIP_NR_CONN,
    STAGE_HELO: SMFIP_NR_HELO,
    STAGE_MAIL: SMFIP_NR_MAIL,
    STAGE_RCPT: SMFIP_NR_RCPT,
    STAGE_DATA: SMFIP_NR_DATA,
    STAGE_HEADER: SMFIP_NR_HDR,
    STAGE_EOH: SMFIP_NR_EOH,
    STAGE_BODY: SMFIP_NR_BODY,
    STAGE_UNKNOWN: SMFIP_NR_UNKN,
}
SMFIP_NR_ALL = 0
for _bit in NO_REPLY_BITS.values():
    SMFIP_NR_ALL |= _bit
del _bit

# -- macro stages for SETSYMLIST (SMFIM_*, SPEC §3.4) ----------------------------------------
SMFIM_CONNECT = 0
SMFIM_HELO = 1
SMFIM_ENVFROM = 2
SMFIM_ENVRCPT = 3
SMFIM_DATA = 4
SMFIM_EOM = 5
SMFIM_EOH = 6

#: the macros rmilter asks for when the MTA lets it choose (SPEC §3.4, §3.5)
REQUESTED_MACROS: Dict[int, str] = {
    SMFIM_CONNECT: "j {daemon_name}",
    SMFIM_ENVFROM: "i {mail_addr} {client_addr} {client_name} {auth_authen}",
    SMFIM_DATA: "i",
    SMFIM_EOM: "i",
}
