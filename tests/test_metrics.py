import json
import os

import pytest

from consolidator_hf.data import paper_results, registry
from consolidator_hf.metrics import Top1Accuracy, vtab_aggregate
from fresh_python import run_fresh

METRIC_FILE = os.path.join(os.path.dirname(__file__), "..", "consolidator_hf", "metrics", "top1_accuracy.py")


def test_top1_accuracy_offline(tmp_path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    metric = Top1Accuracy(cache_dir=str(tmp_path))
    assert metric.compute(predictions=[0, 1, 2, 3], references=[0, 1, 2, 0]) == {"accuracy": 0.75}
    assert metric.compute(predictions=[5, 5, 5], references=[1, 2, 3]) == {"accuracy": 0.0}
    for preds, refs in (([1, 2], [1, 0]), ([3, 3, 3], [3, 3, 1])):  # streamed batches: 3 right of 5
        metric.add_batch(predictions=preds, references=refs)
    assert metric.compute()["accuracy"] == pytest.approx(3 / 5)
    # what a Trainer's compute_metrics passes: numpy logits' argmax, or tensors
    import numpy as np
    import torch

    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert Top1Accuracy().compute(predictions=logits.argmax(-1), references=np.array([1, 0, 0, 0])) == \
        {"accuracy": 0.75}
    assert Top1Accuracy().compute(predictions=torch.tensor([2, 2]), references=torch.tensor([2, 1])) == \
        {"accuracy": 0.5}


def test_top1_accuracy_writes_no_cache_files(tmp_path):
    Top1Accuracy(cache_dir=str(tmp_path)).compute(predictions=[1], references=[1])
    assert list(tmp_path.rglob("*.arrow")) == [] and list(tmp_path.rglob("*.lock")) == []


def test_top1_accuracy_loads_through_evaluate_from_its_file(tmp_path):
    # a fresh process, offline, that never imports consolidator_hf
    code = ("import evaluate, json, sys; m = evaluate.load(sys.argv[1]); "
            "print(json.dumps(m.compute(predictions=[1, 0, 2, 2], references=[1, 1, 2, 2])))")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HOME": str(tmp_path / "home")}
    out = run_fresh(code, os.path.abspath(METRIC_FILE), env=env, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"accuracy": 0.75}


def test_aggregate_hand_computed():
    r = vtab_aggregate({"cifar": 0.5, "dtd": 0.7, "eurosat": 0.9, "dmlab": 0.2, "kitti": 0.4, "dsprites_loc": 0.9})
    assert list(r["per_task"]) == ["cifar100", "dtd", "eurosat", "dmlab", "kitti", "dsprites_loc"]
    # natural (0.5+0.7)/2 = 0.6, specialized 0.9, structured (0.2+0.4+0.9)/3 = 0.5
    assert r["group_means"] == pytest.approx({"natural": 0.6, "specialized": 0.9, "structured": 0.5})
    assert r["average"] == pytest.approx((0.6 + 0.9 + 0.5) / 3)
    assert r["mean"] == pytest.approx((0.5 + 0.7 + 0.9 + 0.2 + 0.4 + 0.9) / 6)
    assert len(r["missing"]) == 13 and "caltech101" in r["missing"]
    only_natural = vtab_aggregate({"svhn": 80.0, "sun397": 60.0})
    assert only_natural["group_means"] == {"natural": 70.0} and only_natural["average"] == 70.0


def test_aggregate_of_the_paper_numbers_gives_the_paper_average():
    r = vtab_aggregate(paper_results())
    assert r["missing"] == [] and len(r["per_task"]) == 19
    assert round(r["average"], 2) == 76.53 == registry()["paper_average"]
    assert round(r["mean"], 2) == 74.16 == registry()["paper_mean_of_19_tasks"]
    assert {g: round(v, 2) for g, v in r["group_means"].items()} == registry()["paper_group_means"]


def test_aggregate_errors():
    with pytest.raises(ValueError, match="no task scores"):
        vtab_aggregate({})
    with pytest.raises(ValueError, match="unknown VTAB-1k task 'imagenet'"):
        vtab_aggregate({"imagenet": 0.8})
    with pytest.raises(ValueError, match="task 'cifar100' given twice"):
        vtab_aggregate({"cifar": 0.5, "cifar100": 0.6})


def test_top_level_lazy_exports():
    import consolidator_hf
    from consolidator_hf.data import load_vtab1k, make_transform

    assert consolidator_hf.Top1Accuracy is Top1Accuracy and consolidator_hf.vtab_aggregate is vtab_aggregate
    assert consolidator_hf.load_vtab1k is load_vtab1k and consolidator_hf.make_transform is make_transform
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        consolidator_hf.nope
