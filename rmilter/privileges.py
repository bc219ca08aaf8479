"""Running as a dedicated user: ``user``/``group`` (issue 13), applied once everything privileged is open.

The listeners (so a socket under ``/run`` can be created and given to group ``postfix``), the
pid file and the log are opened as root; then the process switches for good (supplementary
groups from ``/etc/group`` included, so ``usermod -aG postfix rmilter`` is honoured).
"""
from __future__ import annotations

import grp
import os
import pwd
from typing import Optional, Tuple

from rmilter.startup import StartupError, os_reason


def user_id(name: str) -> int:
    """uid of a user name or number (the parser checked it exists)."""
    return int(name) if name.isdigit() else pwd.getpwnam(name).pw_uid


def group_id(name: str) -> int:
    return int(name) if name.isdigit() else grp.getgrnam(name).gr_gid


def socket_owner(owner: Optional[str], group: Optional[str]) -> Tuple[int, int]:
    """(uid, gid) for ``os.chown``; -1 leaves that part unchanged."""
    try:
        return (user_id(owner) if owner else -1, group_id(group) if group else -1)
    except KeyError as e:  # removed from /etc/passwd since the file was read
        raise StartupError("no such user or group: %s" % (e,)) from None


def drop(user: Optional[str], group: Optional[str], where: str = "") -> Optional[str]:
    """Switch to ``user`` (its primary group unless ``group``) for good; what was done, or None.

    Nothing to do when neither is set or the process already runs as them.
    """
    if not user and not group:
        return None
    try:
        entry = pwd.getpwnam(user) if user and not user.isdigit() else (pwd.getpwuid(int(user)) if user else None)
        gid = group_id(group) if group else (entry.pw_gid if entry is not None else os.getgid())
    except KeyError as e:
        raise StartupError("%sno such user or group: %s" % (where, e)) from None
    uid = entry.pw_uid if entry is not None else os.getuid()
    if os.getuid() == uid and os.getgid() == gid and os.geteuid() == uid:
        return None
    try:
        if os.geteuid() == 0:
            if entry is not None:
                os.initgroups(entry.pw_name, gid)
            else:
                os.setgroups([gid])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as e:
        raise StartupError("%scannot switch to uid %d, gid %d: %s (rmilter must start as root to "
                           "change user)" % (where, uid, gid, os_reason(e))) from None
    return "running as uid %d, gid %d" % (uid, gid)
