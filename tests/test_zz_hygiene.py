"""Runs last (files run in name order): the session must not leave processes, ports or metrics folders behind.

The baseline is taken when this module is imported, during collection, before any
test runs (or earlier, by the conftest hooks if they are installed). This test
checks what can be checked while session fixtures still run: processes and the
metrics folders. It also registers the full check (the test process's own
listening ports included) for the very end of the session, after session
fixtures have stopped; that one fails the run by its exit status.
"""

from __future__ import annotations

import pytest

from tests.support import leakcheck

BASELINE = leakcheck.session_start()


def test_the_session_left_nothing_running(request: pytest.FixtureRequest) -> None:
    leakcheck.register_finish_check(request.config)
    problems = leakcheck.find_leaks(BASELINE, own_sockets=False)
    if problems:
        leakcheck.cleanup(BASELINE)
    assert not problems, "the test session leaked:\n" + "\n".join(problems)
