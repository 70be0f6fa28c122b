"""Benchmarks for the gateway (not part of the installed package).

Run the scripts from the repository root, e.g. ``.venv/bin/python bench/run.py``.
"""
