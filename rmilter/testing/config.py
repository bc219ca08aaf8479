"""Test helpers for configurations: a stub resolver and the shared corpus of real rmilter.conf files.

``StubResolver`` keeps configuration tests off the network: it knows a fixed
set of names and fails like ``getaddrinfo`` for every other one.
``corpus_dir()`` finds ``$RMILTER_TESTDATA/configs`` and raises
``CorpusMissing`` with a message naming the variable when it is not set.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
from typing import Dict, List, Mapping, Optional, Sequence


class StubResolver:
    """A ``Resolver`` with a fixed table; records every name asked for."""

    DEFAULT_TABLE: Mapping[str, Sequence[str]] = {
        "localhost": ("127.0.0.1",),
        "mx.example.test": ("192.0.2.25", "2001:db8::25"),
    }

    def __init__(self, table: Optional[Mapping[str, Sequence[str]]] = None) -> None:
        self.table: Dict[str, Sequence[str]] = dict(self.DEFAULT_TABLE if table is None else table)
        self.asked: List[str] = []

    def __call__(self, name: str) -> Sequence[str]:
        self.asked.append(name)
        try:
            return self.table[name.lower()]
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None


class CorpusMissing(Exception):
    """The shared configuration corpus was not found; the tests that need it did not run."""


def corpus_dir() -> str:
    """``$RMILTER_TESTDATA/configs``; CorpusMissing when unset or absent."""
    base = os.environ.get("RMILTER_TESTDATA")
    if not base:
        raise CorpusMissing(
            "RMILTER_TESTDATA is not set, so the configuration corpus tests were NOT run: set it to the "
            "directory holding configs/ (../shared/testdata next to the repository; CI sets it)"
        )
    path = os.path.join(base, "configs")
    if not os.path.isdir(path):
        raise CorpusMissing("RMILTER_TESTDATA=%s has no configs/ directory: corpus tests NOT run" % base)
    return path


_INCLUDE = re.compile(r"^(?P<lead>[ \t]*)(?P<word>\.(?:try_)?include)(?P<gap>[ \t]+)(?P<pattern>\S+)", re.MULTILINE)


def rewrite_includes(text: str, workdir: str, include_target: Optional[str] = None) -> str:
    """Point ``.include`` at ``include_target`` and every ``.try_include`` into ``workdir``.

    ``.try_include`` patterns keep their base name under ``workdir`` (where
    nothing matches, so they are skipped as SPEC §4.1 says); ``.include``
    lines are left alone when ``include_target`` is None.
    """

    def replace(m: "re.Match[str]") -> str:
        if m.group("word") == ".include":
            if include_target is None:
                return m.group(0)
            target = include_target
        else:
            target = os.path.join(workdir, "absent", os.path.basename(m.group("pattern")))
        return "%s%s%s%s" % (m.group("lead"), m.group("word"), m.group("gap"), target)

    return _INCLUDE.sub(replace, text)


def copy_with_includes(name: str, workdir: str, include: Optional[str] = None) -> str:
    """Write corpus file ``name`` into ``workdir`` with includes rewritten; returns the new path.

    ``include`` names another corpus file, copied beside it, that ``.include`` lines load.
    """
    corpus = corpus_dir()
    target = None
    if include is not None:
        target = os.path.join(workdir, include)
        shutil.copyfile(os.path.join(corpus, include), target)
    with open(os.path.join(corpus, name), encoding="utf-8") as f:
        text = f.read()
    path = os.path.join(workdir, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(rewrite_includes(text, workdir, target))
    return path
