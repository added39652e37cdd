"""Pool workers die with the process that started them (a killed mini-VTAB leaves no worker
training on alone and racing a restarted run for the same run folders)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PARENT = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from consolidator_apps.workers import die_with_parent

    def main(arm):
        init, args = (die_with_parent, (os.getpid(),)) if arm else (None, ())
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=init, initargs=args)
        print(pool.submit(os.getpid).result(), flush=True)
        pool.submit(time.sleep, 120)  # a long unit, like a training run
        time.sleep(1.0)
        print("busy", flush=True)
        time.sleep(600)

    if __name__ == "__main__":
        main(sys.argv[1] == "arm")
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has finished
    except FileNotFoundError:
        return False


def _worker_after_parent_killed(tmp_path, arm: bool, wait: float) -> bool:
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), "arm" if arm else "plain"],
                              stdout=subprocess.PIPE, text=True)
    worker = int(parent.stdout.readline())
    assert parent.stdout.readline().strip() == "busy"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + wait
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_busy_worker_dies_with_its_killed_parent(tmp_path):
    # without the signal the busy worker outlives its parent (the failure this guards against)
    assert _worker_after_parent_killed(tmp_path, arm=False, wait=1.0)
    assert not _worker_after_parent_killed(tmp_path, arm=True, wait=10.0)


def test_mini_vtab_workers_arm_the_signal(monkeypatch):
    from consolidator_apps import workers
    from consolidator_apps.mini_vtab import benchmark

    armed = []
    monkeypatch.setattr(workers, "die_with_parent", armed.append)
    benchmark._worker_init(1, 4242)
    assert armed == [4242]
