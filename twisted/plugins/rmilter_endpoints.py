"""Registers the ``adopted-fd:N`` server endpoint type (rmilter ``bind_socket = fd:N``).

See ``rmilter.config.endpoints`` for why ``fd:N`` is not mapped onto ``systemd:``.
"""
from rmilter.listeners import adoptedFdParser

__all__ = ["adoptedFdParser"]
