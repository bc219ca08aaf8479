"""DKIM signing (SPEC §6.7). Placeholder until issue 7 lands."""
from __future__ import annotations

from typing import Optional

from twisted.internet.defer import Deferred, succeed

from rmilter.config.schema import Config
from rmilter.context import MessageContext
from rmilter.verdict import CheckResult


class Keyring:
    """DKIM keys loaded at start and on reload."""


def from_config(config: Config) -> Optional[Keyring]:
    return None


def sign(msg: MessageContext) -> "Deferred[CheckResult]":
    return succeed(CheckResult("dkim", "unsigned"))
