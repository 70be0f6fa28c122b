"""Accounting: rate limits, budgets, cost and usage, over the runtime's `Store` (see docs/accounting.md)."""
