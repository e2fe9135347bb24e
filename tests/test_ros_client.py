"""GroundingClient: close() while its thread spins never hangs, and waits end in TimeoutError."""

import os
import threading
import time

import pytest

from nextchat_ros.ros_client import GroundingClient

pytestmark = pytest.mark.ros


def test_closing_a_client_whose_thread_is_spinning_never_hangs():
    """The race that once hung the suite: close() while the spin thread is inside
    spin_once, 50 times, with a publisher keeping its callbacks busy."""
    ns = f"/nextchat_close_race_{os.getpid()}"
    for k in range(50):
        client = GroundingClient(ns)
        # Its own results topic carries a message or two so the thread has work.
        client.text_pub.publish(client.text_pub.msg_type(data=f"hello {k}"))
        time.sleep(0.005 * (k % 5))
        t0 = time.monotonic()
        client.close()
        assert time.monotonic() - t0 < 5.0
        assert not client.spinner.thread.is_alive()
        client.close()  # a second close is a no-op
    assert not [t for t in threading.enumerate() if t.name == "nextchat-client-spin"]


def test_waits_end_in_a_timeout_error_naming_what_did_not_come():
    client = GroundingClient(f"/nextchat_nobody_{os.getpid()}")
    try:
        with pytest.raises(TimeoutError, match="ground service did not appear"):
            client.wait_for_node(timeout=0.5)
        with pytest.raises(TimeoutError, match=r"no matching result within 0\.3 s"):
            client.wait_result(lambda r: True, timeout=0.3)
    finally:
        client.close()
