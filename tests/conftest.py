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


def _process_local_progress_locks(in_forked_child: bool = False) -> None:
    # The kill tests fork writers (and whole Trainer runs) from this process and SIGKILL them.
    # tqdm's default write lock includes a multiprocessing RLock, a semaphore shared across
    # fork: a child killed while drawing a progress bar leaves it held, and this process's next
    # bar waits forever (a CI run hung at 407 of 409 tests). Every tqdm subclass that drew a bar
    # (tqdm.auto's, huggingface_hub's, ...) owns its own lock object, so each one is replaced
    # by a lock without the process-shared part. In a forked child the thread lock is renewed
    # too: it was copied at fork, possibly held by another thread (tqdm's monitor).
    import threading

    from tqdm.std import TqdmDefaultWriteLock, tqdm

    TqdmDefaultWriteLock.mp_lock = None
    if in_forked_child:
        TqdmDefaultWriteLock.th_lock = threading.RLock()
    pending = [tqdm]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "_lock" in vars(cls):
            cls._lock = TqdmDefaultWriteLock()


_process_local_progress_locks()
os.register_at_fork(after_in_child=lambda: _process_local_progress_locks(in_forked_child=True))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_finish(session):
    # Every Trainer run calls gc.collect() (accelerate's free_memory); in a test process that
    # has imported every test module, one full collection walks millions of objects (~0.4 s on
    # the slow 2-core VM, ~80 runs per suite). The objects alive after collection (modules,
    # functions, fixtures' definitions) live until the process ends anyway: freezing them keeps
    # them out of every later collection; what the tests create is still collected as before.
    import gc

    gc.collect()
    gc.freeze()
