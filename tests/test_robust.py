"""Issue 13: refusal of bad input (non-finite values, wrong dtypes, bad fields, bad data),
exact unload after low-precision merges, resume checks, and all-or-nothing writes under
SIGKILL and injected failures."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from consolidator_hf import ConsolidatorConfig, ConsolidatorModel, save_merged
from consolidator_hf.config import WEIGHTS_NAME
from tiny import perturb_trainables, tiny_vit


def _adapter(seed=0, groups=(4, 2)):
    model = ConsolidatorModel(tiny_vit(seed), ConsolidatorConfig(groups=groups))
    perturb_trainables(model, seed=seed + 1)
    return model.eval()


# ---------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("where", ["classifier.weight", "vit.layernorm.bias",
                                   "vit.layers.0.layernorm_before.weight",
                                   "vit.embeddings.cls_token"])
def test_safe_merge_refuses_nan_outside_the_adapted_layers(where):
    model = _adapter()
    with torch.no_grad():
        model.base_model.get_parameter(where).view(-1)[0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for merge in (lambda: model.merge_and_unload(safe_merge=True),
                  lambda: model.merge_adapter(safe_merge=True)):
        with pytest.raises(ValueError, match=where.replace(".", r"\.")):
            merge()
        assert not any(l.merged for _, l in model.consolidator_layers())
    after = model.state_dict()
    assert all(torch.allclose(before[k], after[k], rtol=0, atol=0, equal_nan=True) for k in before)


def test_safe_merge_refuses_a_nan_branch_naming_the_layer():
    model = _adapter()
    name, layer = next(iter(model.consolidator_layers()))
    with torch.no_grad():
        layer.branches[1].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=name):
        model.merge_and_unload(safe_merge=True)


def test_save_merged_refuses_nan_head_and_writes_nothing(tmp_path):
    model = _adapter()
    with torch.no_grad():
        model.base_model.classifier.bias[1] = float("nan")
    with pytest.raises(ValueError, match=r"classifier\.bias"):
        save_merged(model, tmp_path / "merged")
    assert os.listdir(tmp_path) == []


def _rewrite_adapter(folder, change):
    path = os.path.join(folder, WEIGHTS_NAME)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    key = change(tensors, meta)
    save_file(tensors, path, metadata=meta)
    return path, key


@pytest.mark.parametrize("bad", ["nan", "inf", "int64", "bool"])
def test_adapter_load_refuses_non_finite_and_non_float_tensors(tmp_path, bad):
    _adapter().save_pretrained(tmp_path)

    def change(tensors, meta):
        key = sorted(k for k in tensors if k.endswith(".delta"))[0] if bad in ("nan", "inf") \
            else "classifier.weight"
        t = tensors[key]
        if bad == "nan":
            t.view(-1)[3] = float("nan")
        elif bad == "inf":
            t.view(-1)[3] = float("-inf")
        else:
            tensors[key] = (t > 0).to(torch.int64 if bad == "int64" else torch.bool)
        return key

    path, key = _rewrite_adapter(tmp_path, change)
    with pytest.raises(ValueError) as e:
        ConsolidatorModel.from_pretrained(tiny_vit(0), tmp_path)
    assert path in str(e.value) and key in str(e.value)
    assert ("NaN or inf" in str(e.value)) == (bad in ("nan", "inf"))


@pytest.mark.parametrize("version,msg", [("1.0", "not a positive integer"),
                                         ("0", "not a positive integer"),
                                         ("-5", "not a positive integer"),
                                         ("7", "newer than this library")])
def test_adapter_file_format_version_is_checked(tmp_path, version, msg):
    _adapter().save_pretrained(tmp_path)

    def change(tensors, meta):
        meta["format_version"] = version

    _rewrite_adapter(tmp_path, change)
    with pytest.raises(ValueError, match=msg):
        ConsolidatorModel.from_pretrained(tiny_vit(0), tmp_path)


@pytest.mark.parametrize("version,msg", [("1", "integer >= 1"), (0, "integer >= 1"),
                                         (-5, "integer >= 1"), (True, "integer >= 1"),
                                         (2, "newer than this library")])
def test_config_format_version_must_be_a_positive_int(version, msg):
    d = ConsolidatorConfig(groups=(4,)).to_dict()
    d["format_version"] = version
    with pytest.raises(ValueError, match=f"format_version: .*{msg}"):
        ConsolidatorConfig.from_dict(d)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -1e-3, True, "1e-3"])
def test_config_init_range_finite_positive_not_bool(value):
    with pytest.raises(ValueError, match="init_range"):
        ConsolidatorConfig(groups=(4,), init_range=value)


# ---------------------------------------------------------------------- exact unload
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_unload_after_merge_restores_the_base_bit_for_bit(dtype):
    base = tiny_vit(0).to(dtype)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    model = ConsolidatorModel(base, ConsolidatorConfig(groups=(4, 2)))
    perturb_trainables(model)
    if dtype == torch.float32:  # huge deltas: W0 + D - D would lose W0 entirely
        with torch.no_grad():
            for _, layer in model.consolidator_layers():
                layer.branches[0].weight.fill_(1e8)
    model.merge_adapter()
    model.unmerge_adapter()  # unmerge, then merge again: the record is refreshed each time
    model.merge_adapter()
    restored = model.unload().state_dict()
    assert set(restored) == set(original)
    for k, v in original.items():
        assert torch.equal(restored[k], v), k


def test_conversion_refuses_a_nan_branch_and_writes_nothing(tmp_path):
    from consolidator_hf.convert import ConversionError, convert_checkpoint
    from test_convert import make_state, save_checkpoint

    state = make_state()
    state["blocks.1.mlp.fc1.fc_rep_branches.0.group_fc.weight"][5, 0, 0] = float("nan")
    path = save_checkpoint(tmp_path / "c.pth", state)
    with pytest.raises(ConversionError, match=r"blocks\.1\.mlp\.fc1\.fc_rep_branches\.0\.group_fc\.weight"):
        convert_checkpoint(path, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["c.pth"]


def test_training_stops_at_the_first_non_finite_loss(tmp_path):
    from consolidator_hf.training import FinetuneConfig, run_finetune
    from consolidator_hf.training.trainer import NonFiniteLossError
    from tiny_vtab import write_tiny_workdir

    write_tiny_workdir(tmp_path)
    seen = []


    cfg = FinetuneConfig(model=str(tmp_path / "backbone"), task="tiny_task",
                         data_dir=str(tmp_path / "vtab"), num_classes=3, groups=(8,),
                         learning_rate=1e-2, batch_size=8, max_steps=6, warmup_epochs=0,
                         logging_steps=1, save_strategy="no", output_dir=str(tmp_path / "run"))
    from transformers import TrainerCallback

    class NanAfterTwo(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            seen.append(state.global_step)
            if state.global_step == 2:
                with torch.no_grad():
                    model.base_model.classifier.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"step 3\b"):
        run_finetune(cfg, callbacks=[NanAfterTwo()])
    assert seen == [1, 2]
    # No adapter, merged model or metrics: the failed run that created the folder removes it
    # whole (nothing in it was a result).
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- resume
def _run_cfg(root, name, **kw):
    from tiny_vtab import tiny_finetune_config

    return tiny_finetune_config(root, name, **{
        **dict(max_steps=5, drop_rate=0.2, save_strategy="steps", save_steps=1,
               save_total_limit=2), **kw})


@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    from tiny_vtab import write_tiny_workdir

    return write_tiny_workdir(tmp_path_factory.mktemp("robust_run"))


@pytest.fixture(scope="module")
def finished_run(run_root):
    from consolidator_hf.training import run_finetune

    cfg = _run_cfg(run_root, "whole")
    run_finetune(cfg)
    return cfg


def _adapter_tensors(run_dir):
    return load_file(os.path.join(run_dir, "adapter", WEIGHTS_NAME))


@pytest.mark.parametrize("damage,error,match", [
    ("optimizer.pt", FileNotFoundError, r"missing optimizer\.pt.*allow_partial_resume"),
    ("scheduler.pt", FileNotFoundError, r"missing scheduler\.pt.*allow_partial_resume"),
    ("rng_state.pth", FileNotFoundError, r"missing rng_state\.pth.*allow_partial_resume"),
    ("truncate optimizer.pt", ValueError, r"optimizer\.pt: truncated or corrupt"),
    ("garbage trainer_state.json", ValueError, r"trainer_state\.json: not valid JSON"),
])
def test_resume_refuses_incomplete_or_corrupt_checkpoints(run_root, finished_run, tmp_path,
                                                          damage, error, match):
    from consolidator_hf.training import run_finetune

    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    import shutil
    shutil.copytree(os.path.join(finished_run.output_dir, "checkpoints", "checkpoint-4"), ckpt)
    verb, _, name = damage.rpartition(" ")
    path = ckpt / name
    if verb == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif verb == "garbage":
        path.write_text("{not json")
    else:
        path.unlink()
    before = sorted(os.listdir(ckpt))
    with pytest.raises(error, match=match):
        run_finetune(_run_cfg(run_root, "x", output_dir=str(tmp_path / "run"),
                              resume_from_checkpoint="last"))
    assert sorted(os.listdir(ckpt)) == before
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints"]
    if verb == "":  # the way out named in the message works (with a warning)
        with pytest.warns(UserWarning, match=f"missing {name}"):
            run_finetune(_run_cfg(run_root, "x", output_dir=str(tmp_path / "run"),
                                  resume_from_checkpoint="last", allow_partial_resume=True))
        assert os.path.isfile(tmp_path / "run" / "adapter" / WEIGHTS_NAME)


# ---------------------------------------------------------------------- data
def _task(tmp_path, n=4):
    import numpy as np
    from PIL import Image
    from consolidator_hf.data import write_vtab_task

    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]
    write_vtab_task(str(tmp_path / "vtab"), "t", {"train800": (ims, [i % 2 for i in range(n)])})
    return tmp_path / "vtab" / "t"


def _load(task_dir, **kw):
    from consolidator_hf.data import load_vtab1k

    return load_vtab1k(str(task_dir.parent), "t", "train800", num_classes=2, **kw)


@pytest.mark.parametrize("rel", ["/etc/passwd", "../../etc/passwd", "images/../../t2/x.jpg"])
def test_list_paths_must_stay_inside_the_task_folder(tmp_path, rel):
    task = _task(tmp_path)
    (task / "train800.txt").write_text(f"images/train800/000000.jpg 0\n{rel} 1\n")
    with pytest.raises(ValueError, match=r"train800\.txt:2: image path .* must be relative and stay inside"):
        _load(task)


@pytest.mark.parametrize("kind", ["text", "truncated", "png_truncated"])
def test_bad_images_are_reported_at_load_with_their_path(tmp_path, kind):
    from PIL import Image

    task = _task(tmp_path)
    bad = task / "images" / "train800" / "000002.jpg"
    if kind == "text":
        bad.write_text("not an image")
    elif kind == "truncated":
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) * 2 // 3])
    else:
        bad = task / "images" / "train800" / "000002.png"
        Image.new("RGB", (64, 64), (1, 2, 3)).save(bad)
        bad.write_bytes(bad.read_bytes()[:-20])
        (task / "train800.txt").write_text("images/train800/000002.png 0\n")
    with pytest.raises(ValueError, match=f"train800.txt:\\d+: {bad}"):
        _load(task)


def test_images_checked_once_per_process_until_the_file_changes(tmp_path, monkeypatch):
    """A task loaded again (a sweep, mini-VTAB) does not reopen images that passed, but a file
    rewritten since (same name, other bytes) is checked again and fails."""
    from consolidator_hf.data import loaders

    task = _task(tmp_path)
    _load(task)
    opened = []
    real = loaders._check_image_file
    monkeypatch.setattr(loaders, "_check_image_file",
                        lambda path, *a: opened.append(path) or real(path, *a))
    assert len(_load(task)) == 4 and opened == []
    bad = task / "images" / "train800" / "000002.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ValueError, match=f"train800.txt:3: {bad} is truncated"):
        _load(task)
    assert opened == [str(bad)]
    bad.write_bytes(data)  # restored: checked again, passes
    assert len(_load(task)) == 4 and opened == [str(bad)] * 2


def test_pixel_limit_and_decode_time_downscale(tmp_path):
    from PIL import Image
    from consolidator_hf.data import decode_image, make_transform

    task = _task(tmp_path)
    big = task / "images" / "train800" / "000001.jpg"
    Image.new("RGB", (2400, 2000), (200, 10, 10)).save(big, quality=90)
    with pytest.raises(ValueError, match=r"000001\.jpg is 2400x2000 = 4,800,000 pixels, over the limit of 1,000,000"):
        _load(task, max_pixels=1_000_000)
    ds = _load(task)  # default limit
    im = decode_image(str(big), (64, 64))
    assert im.size == (600, 500)  # JPEG draft 1/4 (1/8 would go below 4 x 64 in height)
    png = tmp_path / "big.png"
    Image.new("RGB", (2600, 1300), (0, 90, 0)).save(png)
    assert decode_image({"path": str(png), "bytes": None}, (64, 64)).size == (520, 260)  # reduce(5)
    assert decode_image(str(big), (224, 224)).size == (1200, 1000)  # 1/2 only: margin kept
    small = task / "images" / "train800" / "000000.jpg"
    assert decode_image(str(small), (224, 224)).size == (16, 16)
    import datasets
    out = ds.cast_column("image", datasets.Image(decode=False))
    out.set_transform(make_transform("paper", image_size=64))
    assert out[1]["pixel_values"].shape == (3, 64, 64)
    assert abs(out[1]["pixel_values"][0].mean().item() - (200 / 255 - 0.485) / 0.229) < 0.05


def test_list_file_encoding(tmp_path):
    task = _task(tmp_path)
    lines = "images/train800/000000.jpg 0\nimages/train800/000001.jpg 1\n"
    (task / "train800.txt").write_bytes(b"\xef\xbb\xbf" + lines.encode())
    assert _load(task)["label"] == [0, 1]
    (task / "train800.txt").write_bytes(lines.encode() + "images/caf\u00e9.jpg 1\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"train800\.txt:3: not UTF-8 text"):
        _load(task)


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "a\\b"])
def test_write_vtab_task_refuses_bad_task_names(tmp_path, name):
    from consolidator_hf.data import write_vtab_task
    import numpy as np

    (tmp_path / "root" / "sibling").mkdir(parents=True)
    (tmp_path / "root" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="task name"):
        write_vtab_task(str(tmp_path / "root"), name,
                        {"train800": ([np.zeros((4, 4, 3), np.uint8)], [0])})
    assert sorted(os.listdir(tmp_path)) == ["root"]
    assert sorted(os.listdir(tmp_path / "root")) == ["keep.txt", "sibling"]


@pytest.mark.parametrize("image,label,match", [
    ("RGBA", 0, r"t/val200: image 1: PIL image of mode 'RGBA'"),
    ("I;16", 0, r"t/val200: image 1: PIL image of mode 'I;16'"),
    ("RGB", None, r"t/val200: label None of image 1"),
])
def test_write_vtab_task_names_split_and_image(tmp_path, image, label, match):
    from PIL import Image
    from consolidator_hf.data import write_vtab_task

    ok = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match=match):
        write_vtab_task(str(tmp_path), "t", {"train800": ([ok], [0]),
                                             "val200": ([ok, Image.new(image, (4, 4))], [0, label])})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------- all-or-nothing writes
import errno
import random
import signal
import time


def _kill_trials(target_loop, check, trials=10, seed=0, window=(0.0, 0.25)):
    """Fork a child that runs ``target_loop()`` forever (it writes the target over and over);
    SIGKILL it at random moments; after each kill ``check()`` must find the old or the new
    content, complete. The children are forked from this (already-imported) process."""
    rng = random.Random(seed)
    for _ in range(trials):
        pid = os.fork()
        if pid == 0:  # the child: write until killed
            try:
                target_loop()
            finally:
                os._exit(0)
        time.sleep(rng.uniform(*window))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)  # reaped: its leftovers now belong to a dead pid
        check()


def _two_adapters():
    a = _adapter(seed=0, groups=(4,))
    b = _adapter(seed=3, groups=(2,))
    return a, b


def _files_of(folder):
    return sorted(f for f in os.listdir(folder))


def test_adapter_save_survives_sigkill(tmp_path):
    a, b = _two_adapters()
    target = tmp_path / "adapter"
    a.save_pretrained(target)
    (target / "notes.txt").write_text("mine")  # an unrelated file in the folder survives
    want = {4: load_file(str(target / WEIGHTS_NAME))}
    b.save_pretrained(tmp_path / "b")
    want[2] = load_file(str(tmp_path / "b" / WEIGHTS_NAME))

    def loop():
        while True:
            for m in (b, a):
                m.save_pretrained(target)

    def check():
        cfg = ConsolidatorConfig.from_pretrained(target)
        got = load_file(str(target / WEIGHTS_NAME))
        expected = want[cfg.groups[0]]
        assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
        ConsolidatorModel.from_pretrained(tiny_vit(0), target)  # loads as a whole
        assert (target / "notes.txt").read_text() == "mine"

    _kill_trials(loop, check, trials=12, window=(0.0, 0.15))
    a.save_pretrained(target)  # the next write removes what the killed writers left
    assert sorted(os.listdir(tmp_path)) == ["adapter", "b"]
    assert _files_of(target) == ["consolidator_config.json", WEIGHTS_NAME, "notes.txt"]


def test_merged_save_survives_sigkill(tmp_path):
    a, b = _two_adapters()
    target = tmp_path / "merged"
    labels = {"a": ["cat", "dog", "eel"], "b": ["x", "y", "z"]}
    heads = {"a": a.base_model.classifier.weight.detach().clone(),
             "b": b.base_model.classifier.weight.detach().clone()}
    save_merged(a, target, id2label=labels["a"])
    (target / "pytorch_model.bin").write_bytes(b"stale")  # replaced whole: this goes

    def loop():
        while True:
            for key, m in (("b", b), ("a", a)):
                save_merged(m, target, id2label=labels[key])

    def check():
        config = json.loads((target / "config.json").read_text())
        key = "a" if config["id2label"]["0"] == "cat" else "b"
        weights = load_file(str(target / "model.safetensors"))
        assert torch.equal(weights["classifier.weight"], heads[key])  # labels and weights agree
        assert (target / "preprocessor_config.json").is_file() and (target / "README.md").is_file()
        assert not (target / "pytorch_model.bin").exists()

    _kill_trials(loop, check, trials=10, window=(0.0, 0.6))
    save_merged(a, target, id2label=labels["a"])
    assert os.listdir(tmp_path) == ["merged"]


def test_vtab_task_write_survives_sigkill(tmp_path):
    import numpy as np
    from consolidator_hf.data import load_vtab1k, write_vtab_task

    rng = np.random.default_rng(0)
    versions = {n: [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
                for n in (6, 20)}
    root = tmp_path / "vtab"
    (root / "other_task").mkdir(parents=True)

    def write(n):
        write_vtab_task(str(root), "t", {"train800": (versions[n], [n % 3] * n)})

    write(6)

    def loop():
        while True:
            write(20)
            write(6)

    def check():
        ds = load_vtab1k(str(root), "t", "train800", num_classes=3)
        n = len(ds)
        assert n in (6, 20) and set(ds["label"]) == {n % 3}
        assert len(os.listdir(root / "t" / "images" / "train800")) == n
        assert (root / "other_task").is_dir()

    _kill_trials(loop, check, trials=10, window=(0.0, 0.3))
    write(6)
    assert sorted(os.listdir(root)) == ["other_task", "t"]


def test_killed_finetune_resumes_to_the_same_adapter(run_root, finished_run, tmp_path):
    from consolidator_hf.training import run_finetune

    whole = _adapter_tensors(finished_run.output_dir)
    rng = random.Random(1)
    trials = 10
    for trial in range(trials):
        cfg = _run_cfg(run_root, f"k{trial}", output_dir=str(tmp_path / f"k{trial}"))
        pid = os.fork()
        if pid == 0:
            try:
                run_finetune(cfg)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.8, 2.2))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        ckpts = os.path.join(cfg.output_dir, "checkpoints")
        have = os.path.isdir(ckpts) and any(n.startswith("checkpoint-") for n in os.listdir(ckpts))
        # Killed before its first checkpoint: the folder names the run (metadata.json) and is
        # refused unless cleared, as the user is told to (--overwrite-output-dir).
        resumed = _run_cfg(run_root, f"k{trial}", output_dir=cfg.output_dir,
                           resume_from_checkpoint="last" if have else None,
                           overwrite_output_dir=not have)
        run_finetune(resumed)
        got = _adapter_tensors(cfg.output_dir)
        assert set(got) == set(whole)
        assert all(torch.equal(got[k], whole[k]) for k in got), f"trial {trial}"
        assert not os.path.exists(os.path.join(ckpts, ".staging"))


def test_failing_second_file_leaves_the_previous_folder(tmp_path, monkeypatch):
    import numpy as np
    from consolidator_hf.data import load_vtab1k, write_vtab_task
    from consolidator_hf.data import writer as writer_module

    a, b = _two_adapters()
    a.save_pretrained(tmp_path / "adapter")
    save_merged(a, tmp_path / "merged", id2label=["cat", "dog", "eel"])
    write_vtab_task(str(tmp_path / "vtab"), "t", {"train800": ([np.zeros((4, 4, 3), np.uint8)], [0]),
                                                  "val200": ([np.zeros((4, 4, 3), np.uint8)], [1])})
    before = {p: {f: (tmp_path / p / f).read_bytes() for f in os.listdir(tmp_path / p)
                  if (tmp_path / p / f).is_file()} for p in ("adapter", "merged")}

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    # adapter: the config is the second file
    monkeypatch.setattr(ConsolidatorConfig, "save_pretrained", enospc)
    with pytest.raises(OSError, match="No space"):
        b.save_pretrained(tmp_path / "adapter")
    monkeypatch.undo()
    # merged: the image processor is written after the weights
    from transformers import ViTImageProcessor
    monkeypatch.setattr(ViTImageProcessor, "save_pretrained", enospc)
    with pytest.raises(OSError, match="No space"):
        save_merged(b, tmp_path / "merged", id2label=["x", "y", "z"])
    monkeypatch.undo()
    # VTAB task: the second list file fails
    calls = []
    real = writer_module._write_text

    def second_fails(path, text):
        calls.append(path)
        if len(calls) == 2:
            enospc()
        real(path, text)

    monkeypatch.setattr(writer_module, "_write_text", second_fails)
    with pytest.raises(OSError, match="No space"):
        write_vtab_task(str(tmp_path / "vtab"), "t",
                        {"train800": ([np.ones((4, 4, 3), np.uint8)] * 3, [2] * 3),
                         "val200": ([np.ones((4, 4, 3), np.uint8)], [2])})
    monkeypatch.undo()
    for p in ("adapter", "merged"):
        assert {f: (tmp_path / p / f).read_bytes() for f in os.listdir(tmp_path / p)
                if (tmp_path / p / f).is_file()} == before[p]
    ConsolidatorModel.from_pretrained(tiny_vit(0), tmp_path / "adapter")
    assert load_vtab1k(str(tmp_path / "vtab"), "t", "train800", num_classes=3)["label"] == [0]
    assert sorted(os.listdir(tmp_path)) == ["adapter", "merged", "vtab"]
    assert os.listdir(tmp_path / "vtab") == ["t"]
