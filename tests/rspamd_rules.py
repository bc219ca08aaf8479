"""Extra Rspamd Lua rules for the spam-scanning integration tests (loaded into the harness's Rspamd).

How the harness loads them: ``tests.harness.register_lua(name, source)`` before
``shared_rspamd()`` (or ``Rspamd(extra_lua={name: source})`` for a private instance); the
harness appends each source to ``rspamd.local.lua`` after its own hooks.
``register_spam_rules()`` does that for both rules below.

Both rules only act when the message body asks for it, so other tests sharing the Rspamd
see no new symbols:

``RSPAMD-TEST-ECHO``
    Rspamd echoes the request context as zero-score symbols whose options carry the values:
    ``ECHO_IP``, ``ECHO_HELO``, ``ECHO_HOSTNAME``, ``ECHO_FROM``, ``ECHO_RCPT`` (one option
    per recipient), ``ECHO_USER``, ``ECHO_QUEUE_ID``.  A test reads them back from the
    ``X-Spamd-Result`` header rmilter adds.

``RSPAMD-TEST-SLOW: <port> <seconds>``
    the scan waits up to ``<seconds>`` for a reply from ``127.0.0.1:<port>`` (a socket the
    test keeps silent), then adds ``HARNESS_SLOW``: a scan that is slow but finishes within
    Rspamd's ``task_timeout`` (8 s in the harness).
"""
from __future__ import annotations

from tests.harness import register_lua

ECHO_CONTEXT_LUA = r"""
-- rmilter spam tests: body line RSPAMD-TEST-ECHO makes Rspamd echo the request context
local function rmilter_echo_wanted(task)
  local c = task:get_content()
  return c and tostring(c):find('RSPAMD-TEST-ECHO', 1, true)
end
local function rmilter_echo(name, getter)
  rspamd_config:register_symbol{
    name = name, score = 0.0, group = 'harness', description = 'request context echo',
    callback = function(task)
      if not rmilter_echo_wanted(task) then return end
      local values = getter(task)
      if values and #values > 0 then task:insert_result(name, 0.0, values) end
    end,
  }
end
rmilter_echo('ECHO_IP', function(task)
  local ip = task:get_from_ip()
  if ip and ip:is_valid() then return {ip:to_string()} end
end)
rmilter_echo('ECHO_HELO', function(task)
  local helo = task:get_helo()
  if helo then return {helo} end
end)
rmilter_echo('ECHO_HOSTNAME', function(task)
  local hostname = task:get_hostname()
  if hostname then return {hostname} end
end)
rmilter_echo('ECHO_FROM', function(task)
  local from = task:get_from('smtp')
  if from and from[1] then return {from[1].addr} end
end)
rmilter_echo('ECHO_RCPT', function(task)
  local out = {}
  for _, rcpt in ipairs(task:get_recipients('smtp') or {}) do table.insert(out, rcpt.addr) end
  return out
end)
rmilter_echo('ECHO_USER', function(task)
  local user = task:get_user()
  if user then return {user} end
end)
rmilter_echo('ECHO_QUEUE_ID', function(task)
  local queue_id = task:get_queue_id()
  if queue_id then return {queue_id} end
end)
"""

SLOW_SCAN_LUA = r"""
-- rmilter spam tests: body line "RSPAMD-TEST-SLOW: <port> <seconds>" delays the scan
local rmilter_tcp = require "rspamd_tcp"
rspamd_config:register_symbol{
  name = 'HARNESS_SLOW', score = 0.0, group = 'harness', description = 'slow scan',
  callback = function(task)
    local c = task:get_content()
    local port, seconds = c and tostring(c):match('RSPAMD%-TEST%-SLOW: (%d+) ([%d%.]+)')
    if not port then return end
    rmilter_tcp.request{
      task = task, host = '127.0.0.1', port = tonumber(port), timeout = tonumber(seconds),
      data = 'anyone there?\n', read = true,
      callback = function(err, data)
        task:insert_result('HARNESS_SLOW', 0.0, err and 'waited' or 'answered')
      end,
    }
  end,
}
"""


def register_spam_rules() -> None:
    """Add both rules to the shared Rspamd of this test process (call before shared_rspamd())."""
    register_lua("rmilter-spam-echo", ECHO_CONTEXT_LUA)
    register_lua("rmilter-spam-slow", SLOW_SCAN_LUA)
