"""Fuzz targets of rmilter (issue 18): the milter codec + session, the config lexer/parser, the
Rspamd reply parser and the clamd reply parser.  Each target takes bytes and may raise only
the errors its input can cause by design; anything else is a bug.  ``python3 -m fuzz`` runs them.
"""
