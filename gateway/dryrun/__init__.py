"""Policies decided without serving: dry runs (`gateway explain`), policy tests, diffs, shadow policies."""
