"""Helpers for the worker processes the demo applications start (mini-VTAB's ``--jobs``).

Kept import-light (no torch, no transformers) so that a worker's first act costs nothing.
"""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(parent_pid: int) -> None:
    """Make this process get SIGTERM when ``parent_pid`` (the process that started it) dies.

    A pool worker whose parent is killed (``kill``, the OOM killer, a closed terminal) otherwise
    finishes its current unit alone, minutes of training, and races a restarted run for the same
    run folders. Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere a no-op. If the parent is
    already gone when this runs, the process exits at once.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        return  # not fatal: the worker still ends when its unit does
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
