"""Minimal pass-through apps used by ``bench/transport.py`` (and as a gateway stand-in)."""
