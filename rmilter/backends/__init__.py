"""Clients of the services rmilter talks to; each owns its timeouts and failover (SPEC §6.6)."""
