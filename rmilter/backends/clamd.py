"""Client for clamd. Placeholder until its issue lands."""
from __future__ import annotations

from typing import Any, Optional

from rmilter.config.schema import Config


def from_config(config: Config, reactor: Any) -> Optional[Any]:
    return None
