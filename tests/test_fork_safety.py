"""The kill tests fork children from the test process and SIGKILL them mid-work: nothing a
killed child held may block this process afterwards (tests/conftest.py)."""
import io
import os
import signal
import threading
import time

import pytest


def _draw_a_bar_in_a_thread(bar_cls) -> bool:
    """True when a progress bar of ``bar_cls`` opens and closes within 20 s in this process."""
    done = threading.Event()

    def draw():
        for _ in bar_cls(range(3), disable=False, file=io.StringIO()):
            pass
        done.set()

    threading.Thread(target=draw, daemon=True).start()
    return done.wait(20)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("module", ["tqdm.auto", "huggingface_hub.utils"])
def test_a_child_killed_inside_a_progress_bar_does_not_block_the_parent(module):
    import importlib

    bar_cls = importlib.import_module(module).tqdm
    assert _draw_a_bar_in_a_thread(bar_cls)  # this class now owns its lock, as after a Trainer run
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: take the bars' write lock as a bar does, then wait to be killed
        try:
            bar_cls.get_lock().acquire()
            os.write(write, b"x")
            time.sleep(60)
        finally:
            os._exit(0)
    assert os.read(read, 1) == b"x"
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(read)
    os.close(write)
    assert _draw_a_bar_in_a_thread(bar_cls), f"a {module} progress bar waits for a killed child's lock"
