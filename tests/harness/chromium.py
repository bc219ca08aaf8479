"""Headless Chromium (Debian's ``chromium``): a page's DOM after it rendered, or a screenshot."""
from __future__ import annotations

import os
import struct
import zlib
from typing import List

from tests.harness.base import find_program, run, scratch_dir

#: root has no sandbox user namespace here; no GPU, no first-run UI, a profile of its own
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars"]


def _argv(*args: str) -> List[str]:
    profile = scratch_dir("chromium-profile")
    return [find_program("chromium")] + _FLAGS + ["--user-data-dir=" + profile] + list(args)


def dump_dom(url: str, timeout: float = 60.0) -> str:
    """The serialised DOM of ``url`` once loaded (``--dump-dom``)."""
    result = run(_argv("--dump-dom", url), timeout=timeout)
    if result.returncode != 0:
        raise AssertionError("chromium --dump-dom %s: exit %d\n%s" % (url, result.returncode, result.stderr[-2000:]))
    return result.stdout.decode("utf-8", "replace")


def screenshot(url: str, width: int = 1024, height: int = 900, timeout: float = 60.0) -> bytes:
    """A PNG of ``url`` rendered at ``width`` x ``height``."""
    path = os.path.join(scratch_dir("chromium-shot"), "page.png")
    result = run(_argv("--window-size=%d,%d" % (width, height), "--screenshot=" + path, url), timeout=timeout)
    if result.returncode != 0 or not os.path.exists(path):
        raise AssertionError("chromium --screenshot %s: exit %d\n%s" % (url, result.returncode, result.stderr[-2000:]))
    with open(path, "rb") as f:
        return f.read()


def png_pixels(png: bytes) -> bytes:
    """The decompressed (still filtered) scanlines of a PNG: enough to tell a blank page from a drawn one."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise AssertionError("not a PNG")
    offset, data = 8, b""
    while offset < len(png):
        length, kind = struct.unpack(">I4s", png[offset:offset + 8])
        if kind == b"IDAT":
            data += png[offset + 8:offset + 8 + length]
        offset += 12 + length
    return zlib.decompress(data)
