"""consolidator_hf.data.write_vtab_task: the VTAB-1k on-disk format from your own images."""

import os

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from consolidator_hf.data import load_vtab1k, write_vtab_task


def _images(n, seed=0, gray=False):
    rng = np.random.default_rng(seed)
    shape = (12, 12) if gray else (12, 12, 3)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(n)]


def _splits():
    return {"train800": (_images(4, 1), [0, 1, 2, 1]),
            "val200": (_images(2, 2, gray=True), [2, 0]),
            "test": ([Image.fromarray(a) for a in _images(3, 3)], [1, 1, 0])}


def test_round_trip_through_the_loader(tmp_path):
    sizes = write_vtab_task(str(tmp_path), "mine", _splits(), extra_files={"README": "hello\n"})
    assert sizes == {"train800": 4, "val200": 2, "train800val200": 6, "test": 3}
    folder = tmp_path / "mine"
    assert sorted(os.listdir(folder)) == ["README", "images", "test.txt", "train800.txt",
                                          "train800val200.txt", "val200.txt"]
    assert (folder / "README").read_text() == "hello\n"
    lines = (folder / "train800.txt").read_text().splitlines()
    assert lines[0] == "images/train800/000000.jpg 0" and len(lines) == 4
    # train800val200 lists the two parts' files again, in order.
    assert (folder / "train800val200.txt").read_text() == \
        (folder / "train800.txt").read_text() + (folder / "val200.txt").read_text()
    for split, labels in (("train800", [0, 1, 2, 1]), ("val200", [2, 0]),
                          ("train800val200", [0, 1, 2, 1, 2, 0]), ("test", [1, 1, 0])):
        ds = load_vtab1k(str(tmp_path), "mine", split, num_classes=3)
        assert ds["label"] == labels
        assert ds[0]["image"].size == (12, 12)
    # Grey arrays stay grey; JPEGs carry full-resolution chroma (4:4:4) and near-exact pixels.
    with Image.open(folder / "images" / "val200" / "000000.jpg") as im:
        assert im.mode == "L"
    with Image.open(folder / "images" / "train800" / "000001.jpg") as im:
        assert im.mode == "RGB" and JpegImagePlugin.get_sampling(im) == 0


def test_same_pixels_same_bytes_and_existing_task_replaced(tmp_path):
    write_vtab_task(str(tmp_path / "a"), "t", _splits())
    write_vtab_task(str(tmp_path / "b"), "t", {"test": (_images(1, 9), [0])})
    write_vtab_task(str(tmp_path / "b"), "t", _splits())  # replaces the 1-image task
    for rel in ("images/train800/000003.jpg", "images/test/000002.jpg", "test.txt"):
        assert (tmp_path / "a" / "t" / rel).read_bytes() == (tmp_path / "b" / "t" / rel).read_bytes()
    assert len((tmp_path / "b" / "t" / "test.txt").read_text().splitlines()) == 3


@pytest.mark.parametrize("splits, extra, match", [
    ({"train": ([np.zeros((2, 2), np.uint8)], [0])}, None, "unknown split"),
    ({"test": (_images(2), [0])}, None, "2 images but 1 labels"),
    ({"test": (_images(1), [-1])}, None, "label -1 of image 0"),
    ({"test": (_images(1), [1.5])}, None, "label 1.5 of image 0"),
    ({"test": (_images(1), [True])}, None, "label True"),
    ({"test": (_images(1), [0])}, {"../x": ""}, "plain file name"),
    ({"test": (_images(1), [0])}, {"test.txt": ""}, "plain file name"),
])
def test_bad_input_is_named_and_writes_nothing(tmp_path, splits, extra, match):
    with pytest.raises(ValueError, match=match):
        write_vtab_task(str(tmp_path), "t", splits, extra_files=extra)
    assert os.listdir(tmp_path) == []


def test_failure_mid_write_keeps_the_old_task(tmp_path):
    write_vtab_task(str(tmp_path), "t", {"test": (_images(2), [0, 1])})
    before = (tmp_path / "t" / "test.txt").read_text()
    bad = _images(3) + [np.zeros((4, 4), np.float32)]  # the 4th image cannot be written
    with pytest.raises(ValueError, match="uint8 array"):
        write_vtab_task(str(tmp_path), "t", {"test": (bad, [0, 1, 0, 1])})
    assert os.listdir(tmp_path) == ["t"]  # no temporary folder left behind
    assert (tmp_path / "t" / "test.txt").read_text() == before
    assert sorted(os.listdir(tmp_path / "t" / "images" / "test")) == ["000000.jpg", "000001.jpg"]
