"""A watchdog for the test suite that works while a thread holds the GIL.

pytest-timeout's SIGALRM handler is Python code: it runs only when the main thread
gets the GIL, so a thread stuck in C code while holding it (as rclpy's wait set
once was, after a client was destroyed under its spinning thread) hangs the whole
run until CI's limit. faulthandler's watchdog is a C thread: when a test (setup,
call and teardown) or the session's teardown runs past its budget, it writes
every thread's stack to stderr and ends the process with status 1.

NEXTCHAT_TEST_WATCHDOG_S sets the budget of one test in seconds (default 300).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys

import pytest

TEST_BUDGET_S = float(os.environ.get("NEXTCHAT_TEST_WATCHDOG_S", "300"))
SESSION_TEARDOWN_BUDGET_S = 120.0
# The terminal's stderr, kept before pytest's capture points file descriptor 2 at a
# temporary file (which a process ended by the watchdog never shows). Loaded with
# `-p tests.watchdog` (pytest.ini), this module is imported before capture starts.
_STDERR = os.fdopen(os.dup(sys.stderr.fileno()), "w")


@contextlib.contextmanager
def _watchdog(seconds: float):
    faulthandler.dump_traceback_later(seconds, exit=True, file=_STDERR)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    with _watchdog(TEST_BUDGET_S):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_sessionfinish(session, exitstatus):
    with _watchdog(SESSION_TEARDOWN_BUDGET_S):
        yield
