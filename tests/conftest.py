import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _key in ("NO_PROXY", "no_proxy"):  # the loopback Hub server is reached directly, proxy or not
    os.environ[_key] = ",".join(filter(None, [os.environ.get(_key), "127.0.0.1", "localhost"]))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` (setup.cfg): N workers share the cores, so each (and every process it
    # starts) uses one thread instead of oversubscribing them.
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def _progress_bars_lock_only_within_a_process() -> None:
    # The kill tests fork writers (and whole Trainer runs) from this process and SIGKILL them.
    # tqdm's default write lock includes a multiprocessing RLock, a semaphore shared across
    # fork: a child killed while drawing a progress bar leaves it held, and this process's next
    # bar waits forever (a CI run hung at 407 of 409 tests). Every tqdm subclass that drew a bar
    # (tqdm.auto's, huggingface_hub's, ...) owns its own lock object, so replacing the base
    # class's lock is not enough: without the process-shared part no lock can cross a fork.
    from tqdm.std import TqdmDefaultWriteLock

    TqdmDefaultWriteLock.mp_lock = None


def _fresh_progress_locks_in_forked_children() -> None:
    # The thread lock is copied at fork too; another thread (tqdm's monitor) may hold it then.
    import threading

    from tqdm.std import TqdmDefaultWriteLock, tqdm

    TqdmDefaultWriteLock.th_lock = threading.RLock()
    pending = [tqdm]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "_lock" in vars(cls):
            cls._lock = TqdmDefaultWriteLock()


_progress_bars_lock_only_within_a_process()
os.register_at_fork(after_in_child=_fresh_progress_locks_in_forked_children)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
