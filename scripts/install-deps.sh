#!/usr/bin/env bash
# Install everything the test suite needs on Debian 12, as root; idempotent and quiet.
#
#   sudo scripts/install-deps.sh
#
# - Debian packages: the real peers the integration tests run on loopback (Redis, Rspamd,
#   clamd, Postfix + smtp-sink, Cyrus SASL tools, miltertest, swaks, Prometheus, headless
#   Chromium for the status page; systemd for systemd-analyze and systemd-socket-activate) and the C toolchain for
#   shared/tools/milterload.  No service is started: a policy-rc.d that exits 101 stops the
#   packages' init scripts, and Postfix is preconfigured as "No configuration" so the system
#   instance has no main.cf.  The tests run private instances of everything.
# - Python: this package with its test extra, into the interpreter that runs the tests
#   ($PYTHON, default python3).
# apt-get runs only when a package is missing, so a second run takes a few seconds.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

packages=(
  redis-server rspamd clamav-daemon clamav postfix miltertest swaks sasl2-bin libsasl2-modules
  curl opendkim-tools libmilter-dev make gcc openssl stunnel4
  prometheus chromium systemd
)

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo -E "$0" "$@"
  fi
  echo "install-deps.sh: must run as root (Debian packages are installed)" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps.sh: installing ${missing[*]}"
  # no service may start during the install: invoke-rc.d asks policy-rc.d first
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
  fi
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q -q
  # "newaliases: fatal: open /etc/postfix/main.cf" during Postfix's postinst is expected
  apt-get install -y -q -q -o Dpkg::Use-Pty=0 "${missing[@]}" \
    > /tmp/rmilter-install-deps.log 2>&1 || {
      tail -n 40 /tmp/rmilter-install-deps.log >&2
      echo "install-deps.sh: apt-get install failed (full log: /tmp/rmilter-install-deps.log)" >&2
      exit 1
    }
fi

# Python: pip may be absent from a bare Debian python3
if ! "$python" -m pip --version >/dev/null 2>&1; then
  apt-get install -y -q -q python3-pip > /dev/null
fi
# Debian's own python3 is "externally managed" (PEP 668); pip's override is harmless elsewhere
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
cd "$repo"
"$python" -m pip install -q '.[test]'
