import json
import os

import pytest

from consolidator_hf.data import GROUPS, get_task, paper_results, shared_recipe, task_names, tasks

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "vtab1k.json")


def test_registry_has_19_tasks_in_three_groups():
    assert len(tasks()) == 19
    assert {t.group for t in tasks()} == set(GROUPS)
    assert [t.group for t in tasks()].count("natural") == 7
    assert [t.group for t in tasks()].count("specialized") == 4
    assert [t.group for t in tasks()].count("structured") == 8
    assert get_task("cifar").name == "cifar100" and get_task("oxford_iiit_pet").name == "oxford_pet"
    assert get_task("svhn").recipe() == {"learning_rate": 0.01, "weight_decay": 0.001, "drop_rate": 0.5}
    assert shared_recipe()["epochs"] == 100
    with pytest.raises(ValueError, match="unknown VTAB-1k task 'nope'"):
        get_task("nope")
    with pytest.raises(ValueError, match="no paper recipe"):
        get_task("svhn").recipe("resnet")


@pytest.mark.skipif(not os.path.exists(SHARED), reason="the shared registry lives beside a developer checkout")
def test_packaged_registry_is_the_shared_one():
    shared = json.load(open(SHARED))
    assert [t["name"] for t in shared["tasks"]] == task_names()
    assert paper_results() == {t["name"]: t["paper_top1_vit_b16_in21k"] for t in shared["tasks"]}


def test_paper_recipe_reads_the_registry():
    from consolidator_hf.recipes import paper_recipe

    r = paper_recipe("cifar")
    task = get_task("cifar100")
    assert r.training["learning_rate"] == task.recipe()["learning_rate"]
    assert r.training["weight_decay"] == task.recipe()["weight_decay"]
    assert r.consolidator["drop_rate"] == task.recipe()["drop_rate"]
    assert r.consolidator["groups"] == tuple(shared_recipe()["groups"])
    assert r.training["num_train_epochs"] == 100 and r.training["batch_size"] == 64
    assert r.preprocess == "paper"
    assert paper_recipe("svhn", "mocov3_vit_b16").training["weight_decay"] == \
        get_task("svhn").recipe("mocov3_vit_b16")["weight_decay"]
