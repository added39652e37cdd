"""Fresh interpreters for the checks that load an artifact without ``consolidator_hf``, for the
price of one interpreter start per test worker instead of one per check.

:func:`run_fresh` behaves like ``subprocess.run([sys.executable, "-c", code, *argv], ...)``
(return code, captured stdout and stderr, ``timeout``, ``check``). The process it runs in is
forked from a *zygote*: one clean interpreter per test worker, started with the test
environment minus ``PYTHONPATH`` (so neither the worktree nor ``tests/`` is importable), which
has imported torch, transformers' vision classes, safetensors, numpy and PIL, and never
``consolidator_hf`` (checked before it serves). Each check still gets a process of its own:
its own ``sys.modules`` (a copy: what the check imports dies with it), working directory,
``sys.argv``, environment overrides and output files; the zygote itself runs no tensor op and
starts no thread, so forking it is safe. Importing those libraries costs 5-10 s per process on
the 2-core VMs, which was most of what each of these checks cost.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, Optional

_PRELOAD = """
import numpy, PIL.Image, safetensors.torch, torch, transformers
from transformers import (AutoImageProcessor, AutoModelForImageClassification, Dinov2Model,
                          ViTForImageClassification, ViTImageProcessor, ViTModel)
"""

_ZYGOTE = r"""
import json, os, sys, threading, time, traceback
exec(compile(PRELOAD, "<preload>", "exec"), {})
assert not any(m.startswith("consolidator") for m in sys.modules), "zygote imported our package"
assert threading.active_count() == 1, "a thread before fork: " + str(threading.enumerate())
channel = os.fdopen(os.dup(1), "w")
channel.write("ready\n"); channel.flush()
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.chdir(job["cwd"])
            os.environ.update(job["env"])
            for key in job["unset"]:
                os.environ.pop(key, None)
            sys.argv = ["-c", *job["argv"]]
            try:
                exec(compile(job["code"], "<string>", "exec"), {"__name__": "__main__"})
                code = 0
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    deadline, status = time.monotonic() + job["timeout"], None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
        elif time.monotonic() > deadline:
            os.kill(pid, 9); os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.01)
    channel.write(json.dumps({"returncode": status}) + "\n"); channel.flush()
"""

_zygote: Optional[subprocess.Popen] = None
_scratch = tempfile.mkdtemp(prefix="fresh-python-")


def _start() -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.Popen([sys.executable, "-c", f"PRELOAD = {_PRELOAD!r}\n" + _ZYGOTE],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            cwd=_scratch)
    if proc.stdout.readline() != "ready\n":
        raise RuntimeError(f"the fresh-python zygote failed to start (exit {proc.wait()})")
    return proc


def _stop() -> None:
    if _zygote is not None and _zygote.poll() is None:
        _zygote.stdin.close()
        _zygote.wait(timeout=30)
    shutil.rmtree(_scratch, ignore_errors=True)


atexit.register(_stop)


def run_fresh(code: str, *argv: str, cwd: str, env: Optional[Dict[str, str]] = None,
              unset: tuple = (), timeout: float = 300,
              check: bool = False) -> subprocess.CompletedProcess:
    """Run ``code`` as ``python -c code *argv`` in ``cwd`` in a fresh process forked from the
    zygote; ``env`` entries are set and ``unset`` names removed in that process."""
    global _zygote
    if _zygote is None or _zygote.poll() is not None:
        _zygote = _start()
    fd, out = tempfile.mkstemp(prefix="out-", dir=_scratch)
    os.close(fd)
    fd, err = tempfile.mkstemp(prefix="err-", dir=_scratch)
    os.close(fd)
    job = {"code": code, "argv": [os.fspath(a) for a in argv], "cwd": os.fspath(cwd),
           "env": {k: os.fspath(v) for k, v in (env or {}).items()}, "unset": list(unset),
           "timeout": timeout, "stdout": out, "stderr": err}
    _zygote.stdin.write(json.dumps(job) + "\n")
    _zygote.stdin.flush()
    answer = _zygote.stdout.readline()
    if not answer:
        raise RuntimeError(f"the fresh-python zygote died (exit {_zygote.wait()})")
    returncode = json.loads(answer)["returncode"]
    with open(out) as f_out, open(err) as f_err:
        stdout, stderr = f_out.read(), f_err.read()
    os.unlink(out)
    os.unlink(err)
    args = [sys.executable, "-c", code, *job["argv"]]
    if returncode == "timeout":
        raise subprocess.TimeoutExpired(args, timeout, output=stdout, stderr=stderr)
    if check and returncode != 0:
        raise AssertionError(f"fresh python exited with {returncode}:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(args, returncode, stdout, stderr)
