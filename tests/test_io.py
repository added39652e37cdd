"""The one all-or-nothing folder writer (consolidator_hf.io.write_folder): replace semantics, a
failure or a kill while filling leaves the old folder whole, leftovers of killed writers go."""

import os
import random
import signal
import time

import pytest

from consolidator_hf.io import is_hub_id, recover_folder, write_folder


def _fill(folder, tag, n=3):
    for i in range(n):
        with open(os.path.join(folder, f"f{i}.txt"), "w") as f:
            f.write(f"{tag}:{i}")


def _read(folder):
    return {name: open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder))}


def _siblings(parent):
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


def test_write_replaces_the_whole_folder(tmp_path):
    target = tmp_path / "out"
    with write_folder(target) as stage:
        _fill(stage, "old")
        open(os.path.join(stage, "stale.bin"), "w").close()
    with write_folder(target) as stage:
        _fill(stage, "new")
    assert _read(target) == {f"f{i}.txt": f"new:{i}" for i in range(3)}  # stale.bin is gone
    assert _siblings(tmp_path) == []
    mode = os.stat(target / "f0.txt").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_a_failure_while_filling_leaves_the_old_folder(tmp_path):
    target = tmp_path / "out"
    with write_folder(target) as stage:
        _fill(stage, "old")
    with pytest.raises(OSError, match="disk full"):
        with write_folder(target) as stage:
            _fill(stage, "new", n=1)  # the first file written, the second fails
            raise OSError(28, "disk full")
    assert _read(target) == {f"f{i}.txt": f"old:{i}" for i in range(3)}
    assert _siblings(tmp_path) == []


def test_overwrite_false_refuses_a_non_empty_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        with write_folder(target, overwrite=False) as stage:
            _fill(stage, "new")
    assert _read(target) == {"mine.txt": "keep"}
    with pytest.raises(NotADirectoryError):
        with write_folder(target / "mine.txt"):
            pass


def test_leftovers_of_a_killed_writer_are_cleaned_and_a_moved_aside_folder_returns(tmp_path):
    target = tmp_path / "out"
    dead = 2 ** 22 + 12345  # no such pid
    stage = tmp_path / f".out.{dead}-0123456789ab.stage"
    stage.mkdir()
    (stage / "half.txt").write_text("half")
    old = tmp_path / f".out.{dead}-ba9876543210.old"
    old.mkdir()
    (old / "f0.txt").write_text("old:0")
    recover_folder(target)  # died between its two renames: the old folder goes back
    assert _read(target) == {"f0.txt": "old:0"} and _siblings(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_writer_killed_at_random_moments_leaves_old_or_new_complete(tmp_path):
    target = tmp_path / "out"
    with write_folder(target) as stage:
        _fill(stage, "v0", n=4)
    rng = random.Random(0)
    for trial in range(12):
        pid = os.fork()
        if pid == 0:  # child: rewrite the folder in a loop until killed
            try:
                k = 1
                while True:
                    with write_folder(target) as stage:
                        _fill(stage, f"v{k}", n=4)
                    k += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.001, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        recover_folder(target)
        files = _read(target)
        tags = {v.split(":")[0] for v in files.values()}
        assert sorted(files) == [f"f{i}.txt" for i in range(4)], (trial, files)
        assert len(tags) == 1, (trial, files)  # every file from the same write
        assert _siblings(tmp_path) == [], trial


def test_is_hub_id(tmp_path):
    assert is_hub_id("google/vit-base-patch16-224-in21k") and is_hub_id("gpt2")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("a/b/c") and not is_hub_id("x--y")
    assert not is_hub_id(None)
