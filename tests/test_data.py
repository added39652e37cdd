import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from consolidator_hf.data import (
    SPLITS,
    load_image_dataset,
    load_vtab1k,
    make_transform,
    shared_recipe,
    to_rgb,
)
from vtab_data import SIZES, write_vtab_task


@pytest.fixture(scope="module")
def vtab_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("vtab-1k"))
    labels = {
        "cifar": write_vtab_task(root, "cifar", num_classes=100),                 # folder spelling
        "oxford_pet": write_vtab_task(root, "oxford_pet", num_classes=37, mode="RGB"),  # training name
        "mini": write_vtab_task(root, "mini", num_classes=5),                     # not in the registry
    }
    return root, labels


@pytest.mark.parametrize("task, folder, n", [("cifar100", "cifar", 100), ("cifar", "cifar", 100),
                                             ("oxford_pet", "oxford_pet", 37),
                                             ("oxford_iiit_pet", "oxford_pet", 37)])
def test_vtab1k_loads_every_split_with_the_schema(vtab_dir, task, folder, n):
    root, labels = vtab_dir
    for split in SPLITS:
        ds = load_vtab1k(root, task, split)
        assert isinstance(ds, datasets.Dataset)
        assert set(ds.features) == {"image", "label"}
        assert isinstance(ds.features["image"], datasets.Image)
        assert isinstance(ds.features["label"], datasets.ClassLabel) and ds.features["label"].num_classes == n
        assert len(ds) == SIZES[split]
        assert ds["label"] == labels[folder][split]
    image = ds[0]["image"]
    assert isinstance(image, Image.Image) and image.size == (24, 24)


def test_other_folder_spelling_is_found(tmp_path):
    write_vtab_task(str(tmp_path), "oxford_iiit_pet", num_classes=37, sizes={"test": 3})
    write_vtab_task(str(tmp_path), "cifar100", num_classes=100, sizes={"test": 2})
    assert len(load_vtab1k(str(tmp_path), "oxford_pet", "test")) == 3
    assert len(load_vtab1k(str(tmp_path), "oxford_iiit_pet", "test")) == 3
    assert len(load_vtab1k(str(tmp_path), "cifar", "test")) == 2


def test_task_outside_the_registry_needs_num_classes(vtab_dir):
    root, labels = vtab_dir
    with pytest.raises(ValueError, match="'mini' is not in the VTAB-1k registry: pass num_classes="):
        load_vtab1k(root, "mini", "test")
    ds = load_vtab1k(root, "mini", "test", num_classes=5)
    assert ds.features["label"].num_classes == 5 and ds["label"] == labels["mini"]["test"]
    # an explicit num_classes wins over the registry's (and still bounds the labels)
    assert load_vtab1k(root, "cifar", "test", num_classes=10).features["label"].num_classes == 10
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        load_vtab1k(root, "cifar", "test", num_classes=2)
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        load_vtab1k(root, "mini", "test", num_classes=0)


def test_missing_folder_split_and_list_file(vtab_dir, tmp_path):
    root, _ = vtab_dir
    with pytest.raises(FileNotFoundError, match="task folder for 'dtd' not found"):
        load_vtab1k(root, "dtd", "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vtab1k(str(tmp_path / "nowhere"), "dtd", "test")
    with pytest.raises(ValueError, match="unknown VTAB-1k split 'train'"):
        load_vtab1k(root, "cifar", "train")
    write_vtab_task(str(tmp_path), "svhn", sizes={"test": 2})
    with pytest.raises(FileNotFoundError, match=r"list file .*svhn/train800\.txt.* does not exist"):
        load_vtab1k(str(tmp_path), "svhn", "train800")


def _one_task(tmp_path, lines, num_classes=10):
    write_vtab_task(str(tmp_path), "svhn", sizes={"test": 3})
    list_file = tmp_path / "svhn" / "test.txt"
    list_file.write_text("\n".join(lines) + "\n")
    return str(list_file)


@pytest.mark.parametrize("bad_line, message", [
    ("images/test/000001.jpg", r"test\.txt:2: malformed line 'images/test/000001\.jpg'"),
    ("images/test/000001.jpg seven", r"test\.txt:2: malformed line .*label 'seven' is not an integer"),
    ("images/test/000001.jpg 10", r"test\.txt:2: label 10 outside \[0, 10\)"),
    ("images/test/000001.jpg -1", r"test\.txt:2: label -1 outside \[0, 10\)"),
])
def test_bad_list_lines_name_the_line(tmp_path, bad_line, message):
    _one_task(tmp_path, ["images/test/000000.jpg 1", bad_line, "images/test/000002.jpg 2"])
    with pytest.raises(ValueError, match=message):
        load_vtab1k(str(tmp_path), "svhn", "test")


def test_missing_image_and_empty_list(tmp_path):
    _one_task(tmp_path, ["images/test/000000.jpg 1", "", "images/test/000009.jpg 2"])
    with pytest.raises(FileNotFoundError, match=r"test\.txt:3: image .*images/test/000009\.jpg' does not exist"):
        load_vtab1k(str(tmp_path), "svhn", "test")
    _one_task(tmp_path, ["", "  "])
    with pytest.raises(ValueError, match=r"test\.txt: the list file has no entries"):
        load_vtab1k(str(tmp_path), "svhn", "test")


def test_paper_transform_normalises_by_hand(vtab_dir):
    mean, std = shared_recipe()["normalize_mean"], shared_recipe()["normalize_std"]
    value = (200, 100, 50)
    batch = {"image": [Image.new("RGB", (40, 30), value), Image.new("L", (7, 9), 128)], "label": [3, 0]}
    out = make_transform("paper")(batch)
    assert out["pixel_values"].shape == (2, 3, 224, 224) and out["pixel_values"].dtype == torch.float32
    assert out["labels"].dtype == torch.long and out["labels"].tolist() == [3, 0]
    for c in range(3):  # a constant image stays constant through a bicubic resize
        expected = (value[c] / 255 - mean[c]) / std[c]
        torch.testing.assert_close(out["pixel_values"][0, c], torch.full((224, 224), expected), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["pixel_values"][1, c], torch.full((224, 224), (128 / 255 - mean[c]) / std[c]),
                                   atol=1e-5, rtol=0)
    small = make_transform("paper", image_size=32)(batch)["pixel_values"]
    assert small.shape == (2, 3, 32, 32)


def test_paper_transform_is_bicubic():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (20, 13, 3), dtype=np.uint8)
    out = make_transform("paper", image_size=16)({"image": [Image.fromarray(arr)], "label": [0]})["pixel_values"][0]
    resized = np.asarray(Image.fromarray(arr).resize((16, 16), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    mean = np.asarray(shared_recipe()["normalize_mean"], np.float32)
    std = np.asarray(shared_recipe()["normalize_std"], np.float32)
    np.testing.assert_allclose(out.numpy(), ((resized - mean) / std).transpose(2, 0, 1), atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1"])
def test_any_mode_becomes_rgb(mode):
    base = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, mode="L")
    if mode in ("I;16", "I", "F"):
        image = Image.fromarray((np.arange(64).reshape(8, 8) * 1000).astype(
            {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        if mode == "I;16":
            image = image.convert("I;16") if image.mode != "I;16" else image
    else:
        image = base.convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    if mode in ("I;16", "I", "F"):  # the full 16/32-bit range maps onto 0..255, not clipped
        arr = np.asarray(rgb)[..., 0]
        assert arr.min() == 0 and arr.max() == 255
    out = make_transform("paper", image_size=8)({"image": [image], "label": [1]})
    assert out["pixel_values"].shape == (1, 3, 8, 8)


def test_processor_transform_and_set_transform(vtab_dir):
    from transformers import ViTImageProcessor

    root, labels = vtab_dir
    processor = ViTImageProcessor(size={"height": 16, "width": 16})
    ds = load_vtab1k(root, "cifar", "train800")
    ds.set_transform(make_transform("processor", image_processor=processor))
    batch = ds[:3]
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (3, 3, 16, 16)
    assert batch["labels"].tolist() == labels["cifar"]["train800"][:3]
    # the processor's own normalisation (mean/std 0.5): values lie in [-1, 1]
    assert batch["pixel_values"].min() >= -1 - 1e-6 and batch["pixel_values"].max() <= 1 + 1e-6
    expected = processor(images=[to_rgb(load_vtab1k(root, "cifar", "train800")[0]["image"])],
                         return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(batch["pixel_values"][0], expected)
    with pytest.raises(ValueError, match="needs image_processor="):
        make_transform("processor")
    with pytest.raises(ValueError, match="unknown preprocess 'crop'"):
        make_transform("crop")


def _write_parquet(path, n=6):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (10, 12), (i * 30, 0, 0)).save(buf, format="PNG")
        rows.append({"img": {"bytes": buf.getvalue(), "path": None}, "cls": i % 3, "extra": "x"})
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_load_image_dataset_parquet_with_column_mapping(tmp_path):
    path = str(tmp_path / "train.parquet")
    _write_parquet(path)
    cache = str(tmp_path / "cache")
    ds = load_image_dataset("parquet", "train", data_files={"train": path}, image_column="img",
                            label_column="cls", cache_dir=cache)
    assert set(ds.features) == {"image", "label"}
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.features["label"].num_classes == 3 and ds["label"] == [0, 1, 2, 0, 1, 2]
    assert ds[4]["image"].getpixel((0, 0)) == (120, 0, 0)
    ds = load_image_dataset("parquet", "train", data_files={"train": path}, image_column="img",
                            label_column="cls", num_classes=7, cache_dir=cache)
    assert ds.features["label"].num_classes == 7
    with pytest.raises(ValueError, match=r"row 2 has label 2 outside \[0, 2\)"):
        load_image_dataset("parquet", "train", data_files={"train": path}, image_column="img",
                           label_column="cls", num_classes=2, cache_dir=cache)
    with pytest.raises(ValueError, match="has no column 'image' \\(image_column\\)"):
        load_image_dataset("parquet", "train", data_files={"train": path}, label_column="cls", cache_dir=cache)


def test_load_image_dataset_imagefolder(tmp_path):
    for name, n in (("cat", 2), ("dog", 3)):
        os.makedirs(tmp_path / "pets" / "train" / name)
        for i in range(n):
            Image.new("L", (5, 5), 10 * i).save(tmp_path / "pets" / "train" / name / f"{i}.png")
    ds = load_image_dataset("imagefolder", "train", data_dir=str(tmp_path / "pets"),
                            cache_dir=str(tmp_path / "cache"))
    assert ds.features["label"].names == ["cat", "dog"] and sorted(ds["label"]) == [0, 0, 1, 1, 1]
    ds.set_transform(make_transform("paper", image_size=4))
    assert ds[0]["pixel_values"].shape == (3, 4, 4)
    with pytest.raises(ValueError, match="num_classes=5 but column 'label' is a ClassLabel with 2 classes"):
        load_image_dataset("imagefolder", "train", data_dir=str(tmp_path / "pets"), num_classes=5,
                           cache_dir=str(tmp_path / "cache"))


def test_load_image_dataset_string_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = __import__("io").BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    rows = [{"image": {"bytes": buf.getvalue(), "path": None}, "label": name} for name in ("b", "a", "b")]
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "t.parquet"))
    ds = load_image_dataset("parquet", "train", data_files={"train": str(tmp_path / "t.parquet")},
                            cache_dir=str(tmp_path / "cache"))
    assert ds.features["label"].names == ["a", "b"] and ds["label"] == [1, 0, 1]
    # a ClassLabel column holding -1 ("no label") is refused with the row
    datasets.Dataset.from_dict({"image": [rows[0]["image"]] * 2, "label": [0, -1]},
                               features=datasets.Features({"image": datasets.Image(),
                                                           "label": datasets.ClassLabel(names=["a", "b"])})
                               ).to_parquet(str(tmp_path / "u.parquet"))
    with pytest.raises(ValueError, match=r"row 1 has label -1 outside \[0, 2\)"):
        load_image_dataset("parquet", "train", data_files={"train": str(tmp_path / "u.parquet")},
                           cache_dir=str(tmp_path / "cache"))


def test_elpv_task_in_the_vtab_format(tmp_path):
    pytest.importorskip("elpv_dataset", reason="elpv-dataset is a dev dependency: pip install -e \".[dev]\"")
    from consolidator_apps.elpv import elpv_labels, write_elpv_task

    assert elpv_labels("elpv_defect4", np.array([0, 1 / 3, 2 / 3, 1.0])).tolist() == [0, 1, 2, 3]
    assert elpv_labels("elpv_defective", np.array([0, 1 / 3, 2 / 3, 1.0])).tolist() == [0, 0, 1, 1]
    s = write_elpv_task(str(tmp_path), "elpv_defective", image_size=24, test_size=300)
    assert s["sizes"] == {"train800": 800, "val200": 200, "test": 300, "train800val200": 1000}
    assert sum(s["class_counts"]["train800"]) == 800 and s["num_classes"] == 2
    lines = (tmp_path / "elpv_defective" / "test.txt").read_text().splitlines()
    assert len(lines) == 300
    with Image.open(tmp_path / "elpv_defective" / lines[0].split()[0]) as im:
        assert im.size == (24, 24) and im.mode == "RGB"
    with pytest.raises(ValueError, match="unknown ELPV task"):
        elpv_labels("elpv_colour", np.zeros(1))
