"""miltertest (OpenDKIM's milter test driver) with a general script (REAL-SERVICES §8).

``miltertest(sock=..., **defines)`` runs ``BASIC_LUA`` with ``-D name=value`` for each define
and returns the exit status and what the script printed.  The script sends a whole SMTP session
over the milter protocol and checks the end-of-message reply; what it saw is printed in lines
the result object parses (``eom_replies``, ``headers``), so tests can assert in Python.

Defines understood by ``BASIC_LUA`` (all optional except ``sock``):

=================  ========================================================================
``sock``           ``inet:PORT@HOST`` or ``unix:/path`` (sendmail syntax)
``expect``         ``accept`` (default: ACCEPT or CONTINUE at EOM), ``reply`` (SMFIR_REPLYCODE
                   with ``code``/``esc``/``text``, all three needed), ``tempfail``, ``reject``,
                   ``discard``, ``any`` (no check; see ``eom_replies``)
``hdr``            a header the filter must add (or insert) at EOM; its value is printed
``hdr_value``      ...and a substring its value must contain
``body``           the body text (default: a short greeting); ``\\n`` is sent as CRLF
``auth``           ``{auth_authen}`` sent with MAIL (the SASL login)
``client_addr``    client address for CONNECT and ``{client_addr}`` (default 192.0.2.10)
``client_name``    client host name (default client.example.com)
``helo``           HELO argument (default: client_name)
``from``           envelope sender without brackets (default alice@example.com)
``rcpt``           recipients, comma-separated (default bob@example.org)
``queue_id``       the ``i`` macro (default 4ABCDEF0123; the n-th message gets suffix n>1)
``subject``        Subject header (default "miltertest")
``messages``       messages on this one connection (default 1); an ABORT follows each EOM,
                   as Postfix sends it
``connect_tries``  connection attempts, 0.25 s apart (default 40)
``abort_first``    ``1``: the first message is aborted after its body (no EOM), then the
                   remaining messages are sent in full on the same connection
=================  ========================================================================

NB: miltertest prints NOTHING when a Lua error escapes, so the script runs under pcall and
prints ``FAIL: <reason>``; a passing run ends with ``PASS``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional, Union

from tests.harness.base import find_program, run, scratch_dir, write_file

BASIC_LUA = r"""
local function opt(name, default)
  local v = _G[name]
  if v == nil or v == "" then return default end
  return v
end

local function split(s)
  local out = {}
  for item in string.gmatch(s, "[^,%s]+") do table.insert(out, item) end
  return out
end

local sock = opt("sock", "inet:11339@127.0.0.1")
local expect = opt("expect", "accept")
local client_addr = opt("client_addr", "192.0.2.10")
local client_name = opt("client_name", "client.example.com")
local helo = opt("helo", client_name)
local sender = opt("from", "alice@example.com")
local recipients = split(opt("rcpt", "bob@example.org"))
local nmessages = tonumber(opt("messages", "1"))
local abort_first = opt("abort_first", "0") == "1"
local body = string.gsub(opt("body", "Hello Bob, lunch tomorrow?"), "\r?\n", "\r\n")
local unpack = table.unpack or unpack

local function send_envelope(conn, n)
  local qid = opt("queue_id", "4ABCDEF0123")
  if n > 1 then qid = qid .. tostring(n) end
  local m = {"i", qid, "{mail_addr}", sender, "{client_addr}", client_addr,
             "{client_name}", client_name}
  if auth then table.insert(m, "{auth_authen}"); table.insert(m, auth) end
  mt.macro(conn, SMFIC_MAIL, unpack(m))
  assert(mt.mailfrom(conn, "<" .. sender .. ">") == nil, "mailfrom failed")
  assert(mt.getreply(conn) == SMFIR_CONTINUE, "mail: not continued")
  for _, r in ipairs(recipients) do
    mt.macro(conn, SMFIC_RCPT, "{rcpt_addr}", r)
    assert(mt.rcptto(conn, "<" .. r .. ">") == nil, "rcptto failed")
    assert(mt.getreply(conn) == SMFIR_CONTINUE, "rcpt " .. r .. ": not continued")
  end
end

local function send_content(conn, n)
  for _, h in ipairs({{"From", "Alice <" .. sender .. ">"}, {"To", "Bob <" .. recipients[1] .. ">"},
                      {"Subject", opt("subject", "miltertest")},
                      {"Message-ID", "<mt-" .. tostring(n) .. "@example.com>"},
                      {"Date", os.date("!%a, %d %b %Y %H:%M:%S +0000")},
                      {"Content-Type", "text/plain; charset=us-ascii"}}) do
    assert(mt.header(conn, h[1], h[2]) == nil, "header failed")
  end
  assert(mt.eoh(conn) == nil, "eoh failed")
  assert(mt.bodystring(conn, body .. "\r\n") == nil, "body failed")
end

local function check_eom(conn, n)
  local r = mt.getreply(conn)
  mt.echo("MSG " .. n .. " EOM " .. string.char(r))
  if hdr then
    local added = mt.eom_check(conn, MT_HDRADD, hdr) or mt.eom_check(conn, MT_HDRINSERT, hdr)
    if added then
      local value = tostring(mt.getheader(conn, hdr, 0))
      mt.echo("MSG " .. n .. " HEADER " .. hdr .. ": " .. value)
      if hdr_value then
        assert(string.find(value, hdr_value, 1, true), "header " .. hdr .. " lacks " .. hdr_value)
      end
    elseif expect == "accept" then
      error("header " .. hdr .. " not added")
    end
  end
  if expect == "accept" then
    assert(r == SMFIR_ACCEPT or r == SMFIR_CONTINUE, "expected accept/continue")
  elseif expect == "reply" then
    -- MT_SMTPREPLY needs the EXACT code, esc and text
    assert(r == SMFIR_REPLYCODE, "expected SMFIR_REPLYCODE")
    assert(mt.eom_check(conn, MT_SMTPREPLY, code, esc, text),
           "reply is not: " .. tostring(code) .. " " .. tostring(esc) .. " " .. tostring(text))
  elseif expect == "tempfail" then
    assert(r == SMFIR_TEMPFAIL or r == SMFIR_REPLYCODE, "expected tempfail")
  elseif expect == "reject" then
    assert(r == SMFIR_REJECT or r == SMFIR_REPLYCODE, "expected reject")
  elseif expect == "discard" then
    assert(r == SMFIR_DISCARD, "expected discard")
  end
end

local function main()
  local conn = mt.connect(sock, tonumber(opt("connect_tries", "40")), 0.25)   -- retry every 0.25 s
  if conn == nil then error("cannot connect to " .. tostring(sock)) end
  mt.set_timeout(tonumber(opt("timeout", "30")))
  assert(mt.negotiate(conn, nil, nil, nil) == nil, "negotiate failed")
  mt.macro(conn, SMFIC_CONNECT, "j", "mx.harness.test", "{daemon_name}", "mx.harness.test")
  assert(mt.conninfo(conn, client_name, client_addr) == nil, "conninfo failed")
  assert(mt.getreply(conn) == SMFIR_CONTINUE, "connect: not continued")
  assert(mt.helo(conn, helo) == nil, "helo failed")
  for n = 1, nmessages do
    send_envelope(conn, n)
    send_content(conn, n)
    if n == 1 and abort_first and nmessages > 1 then
      assert(mt.abort(conn) == nil, "abort failed")
      mt.echo("MSG " .. n .. " ABORTED")
    else
      assert(mt.eom(conn) == nil, "eom failed")
      check_eom(conn, n)
      if n < nmessages then assert(mt.abort(conn) == nil, "abort failed") end
    end
  end
  mt.disconnect(conn)
end

local ok, err = pcall(main)
if not ok then mt.echo("FAIL: " .. tostring(err)); os.exit(1) end
mt.echo("PASS")
"""

_EOM_LINE = re.compile(r"^MSG (\d+) EOM (.)$", re.M)
_HEADER_LINE = re.compile(r"^MSG (\d+) HEADER ([^:]+): (.*)$", re.M)


@dataclass(frozen=True)
class MiltertestResult:
    status: int
    output: str

    @property
    def passed(self) -> bool:
        return self.status == 0 and self.output.rstrip().endswith("PASS")

    @property
    def eom_replies(self) -> List[str]:
        """The EOM reply code of each completed message (``a`` accept, ``y`` reply code, ...)."""
        return [m.group(2) for m in _EOM_LINE.finditer(self.output)]

    def headers(self, name: str) -> List[str]:
        """The value of header ``hdr`` added at each EOM where it was added."""
        return [m.group(3) for m in _HEADER_LINE.finditer(self.output)
                if m.group(2).lower() == name.lower()]


def miltertest(
    sock: str,
    script: Optional[str] = None,
    timeout: float = 90.0,
    verbose: int = 0,
    **defines: Union[str, int],
) -> MiltertestResult:
    """Run miltertest with ``script`` (default ``BASIC_LUA``) and ``-D`` defines.

    ``from_`` may be used for the ``from`` define (a Python keyword).
    """
    path = os.path.join(scratch_dir("mt"), "script.lua")
    write_file(path, script if script is not None else BASIC_LUA)
    argv = [find_program("miltertest"), "-s", path, "-D", "sock=" + sock]
    argv += ["-v"] * verbose
    for name, value in sorted(defines.items()):
        argv += ["-D", "%s=%s" % (name.rstrip("_"), value)]
    result = run(argv, timeout=timeout)
    return MiltertestResult(result.returncode, result.stdout.decode("utf-8", "replace"))

