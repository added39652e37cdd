import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N` (setup.cfg): N workers share the cores, so each (and every process it
    # starts) uses one thread instead of oversubscribing them.
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def _own_progress_lock_in_forked_children() -> None:
    # The kill tests fork writers from this process and SIGKILL them. tqdm's write lock is a
    # multiprocessing lock shared across fork: a child killed inside a progress bar would leave
    # it held, and this process's next progress bar would wait forever. A child gets its own.
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


os.register_at_fork(after_in_child=_own_progress_lock_in_forked_children)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
