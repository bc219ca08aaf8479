"""DKIM: keys loaded with the configuration (``keys``) and signatures computed off-thread (``signer``).

The check that signs accepted messages is ``rmilter.checks.dkim``.
"""
