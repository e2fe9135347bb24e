"""The suite's watchdog fires on a hang that holds the GIL, where pytest-timeout cannot."""

import subprocess
import sys
import textwrap
import time

from tests.conftest import ROOT

HANG = textwrap.dedent("""
    import ctypes
    import threading
    import time


    def test_a_thread_holds_the_gil():
        # libc's sleep called through PyDLL keeps the GIL for its whole duration.
        threading.Thread(target=ctypes.PyDLL(None).sleep, args=(120,), daemon=True).start()
        while True:  # the main thread waits in Python, as Popen.wait did
            time.sleep(0.01)
""")


def test_the_watchdog_ends_a_run_whose_thread_holds_the_gil(tmp_path):
    test_file = tmp_path / "test_hang.py"
    test_file.write_text(HANG)
    t0 = time.monotonic()
    # pytest-timeout at 1 s, to show it cannot fire; the watchdog at 3 s.
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.watchdog", "-o", "addopts=", "--timeout=1",
                          "-q", str(test_file)], cwd=ROOT, capture_output=True, text=True, timeout=90,
                         env={"NEXTCHAT_TEST_WATCHDOG_S": "3", "PATH": "/usr/bin:/bin"})
    seconds = time.monotonic() - t0
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert seconds < 60
    assert "Timeout (0:00:03)!" in run.stderr
    assert "in test_a_thread_holds_the_gil" in run.stderr  # every thread's stack
    assert "passed" not in run.stdout
