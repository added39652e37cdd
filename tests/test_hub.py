"""Publishing: merged models and adapters to folders and to a Hub-compatible server on loopback.

The server (tests/hub_server.py) speaks the part of the Hub API that huggingface_hub 2.x and
transformers call; every test gets its own server, cache folder and token.
"""

import base64
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load, load_file
from transformers import ViTConfig, ViTForImageClassification

from consolidator_hf import (
    ConsolidatorConfig,
    ConsolidatorLinear,
    ConsolidatorModel,
    HubError,
    get_consolidator_model,
    push_adapter,
    push_merged,
    save_adapter,
    save_merged,
)
from consolidator_hf.cards import build_model_card, load_metrics
from hub_server import MiniHub, git_blob_sha1
from script_module import load_script
from tiny import pixels, tiny_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "hf_TestTokenZq8xVb3KpL0wNe7RmYc2"
BASE_ID = "google/vit-base-patch16-224-in21k"  # only named in cards: nothing is downloaded
# huggingface_hub's LFS PUT passes a file object as `data=`, which its HTTP client deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

METRICS = {"eval_accuracy": 0.8125, "eval_loss": 0.61, "eval_runtime": 1.5,
           "eval_samples_per_second": 100.0, "epoch": 7.0}


def trained(model: ConsolidatorModel, seed: int = 3) -> ConsolidatorModel:
    """Give branches, biases, norms and head visibly non-trivial values (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny_model(seed: int = 0) -> ConsolidatorModel:
    return trained(get_consolidator_model(tiny_vit(seed), ConsolidatorConfig(groups=(4, 2), drop_rate=0.1)))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A MiniHub that requires TOKEN for writes, with huggingface_hub pointed at it.

    huggingface_hub reads its settings into ``constants`` at import time, so the in-process
    client is patched there; subprocesses get the same settings through ``hub_env``.
    """
    from huggingface_hub import constants

    server = MiniHub(token=TOKEN).start()
    home = tmp_path / "hf_home"
    for name, value in {"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                        "HF_HOME": str(home)}.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    patches = {
        "ENDPOINT": server.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_XET": True, "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"), "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
    }
    for name, value in patches.items():
        monkeypatch.setattr(constants, name, value)
    yield server
    server.stop()


def hub_env(server: MiniHub, home, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=server.url, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0",
               HF_HOME=str(home), PYTHONPATH=ROOT)
    env.pop("TRANSFORMERS_OFFLINE", None)
    env.update(extra)
    return env


def run_plain_transformers(source: str, pixels_path, out_path, env: dict) -> None:
    """Load ``source`` with ViTForImageClassification in a fresh process that never imports
    consolidator_hf; save its logits on ``pixels_path`` to ``out_path``."""
    code = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoImageProcessor, ViTForImageClassification
        model = ViTForImageClassification.from_pretrained({source!r}).eval()
        processor = AutoImageProcessor.from_pretrained({source!r})
        with torch.no_grad():
            logits = model(pixel_values=torch.load({str(pixels_path)!r})).logits
        size = {{k: processor.size[k] for k in ("height", "width")}}
        torch.save({{"logits": logits, "id2label": dict(model.config.id2label), "size": size,
                    "resample": int(processor.resample)}}, {str(out_path)!r})
        assert "consolidator_hf" not in sys.modules, "the loader imported consolidator_hf"
    """)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]


def snapshot(model: ConsolidatorModel):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()}, model.training,
            [n for n, _ in model.consolidator_layers()])


def assert_unchanged(model: ConsolidatorModel, before) -> None:
    state, grads, training, layers = before
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert model.training == training
    assert [n for n, _ in model.consolidator_layers()] == layers
    assert not any(layer.merged for _, layer in model.consolidator_layers())


# ---------------------------------------------------------------------- push_merged
def test_push_merged_loads_with_plain_transformers_and_uses_lfs(hub, tmp_path):
    # hidden 256 x 5 layers: ~16 MB of fp32 weights, above the Hub's 10 MB LFS threshold.
    torch.manual_seed(0)
    base = ViTForImageClassification(ViTConfig(
        hidden_size=256, num_hidden_layers=5, num_attention_heads=4, intermediate_size=1024,
        image_size=32, patch_size=8, num_labels=5,
        id2label={i: f"class_{i}" for i in range(5)})).eval()
    model = trained(get_consolidator_model(base, ConsolidatorConfig(groups=(16,), drop_rate=0.2)))
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    before = snapshot(model)

    url = push_merged(model, "ns/vit-merged", token=TOKEN, metrics=METRICS, dataset="cifar100",
                      base_model=BASE_ID)

    assert_unchanged(model, before)
    files = hub.state.files("ns/vit-merged")
    assert url.startswith(f"{hub.url}/ns/vit-merged/commit/")
    assert url.rsplit("/", 1)[1] == hub.state.repos["ns/vit-merged"].branches["main"]
    assert set(files) == {".gitattributes", "config.json", "model.safetensors",
                          "preprocessor_config.json", "README.md"}
    weights = files["model.safetensors"]
    assert len(weights) > 10_000_000
    oid = __import__("hashlib").sha256(weights).hexdigest()
    assert hub.state.lfs_uploads == [oid] and hub.state.lfs_verified == [oid]
    stored = hub.state.repos["ns/vit-merged"].commits[hub.state.repos["ns/vit-merged"].branches["main"]]
    assert stored["model.safetensors"].lfs and not stored["config.json"].lfs
    config = json.loads(files["config.json"])
    assert config["architectures"] == ["ViTForImageClassification"]
    assert config["id2label"]["4"] == "class_4" and config["label2id"]["class_4"] == 4

    torch.save(x, tmp_path / "x.pt")
    run_plain_transformers("ns/vit-merged", tmp_path / "x.pt", tmp_path / "out.pt",
                           hub_env(hub, tmp_path / "fresh_home"))
    out = torch.load(tmp_path / "out.pt")
    assert (out["logits"] - expected).abs().max().item() <= 1e-5
    assert out["id2label"][4] == "class_4"
    assert out["size"] == {"height": 32, "width": 32} and out["resample"] == 2

    card = ModelCard.load("ns/vit-merged")  # downloaded through the server
    data = card.data
    assert data.base_model == BASE_ID and data.base_model_relation == "finetune"
    assert data.library_name == "transformers" and data.pipeline_tag == "image-classification"
    assert {"consolidator", "vision", "image-classification", "vtab"} <= set(data.tags)
    assert data.datasets == ["cifar100"]
    results = {r.metric_type: r for r in data.eval_results}
    assert set(results) == {"accuracy", "loss"}  # runtime, throughput and epoch are not metrics
    assert results["accuracy"].metric_value == 0.8125
    assert results["accuracy"].dataset_name == "VTAB-1k cifar100"
    assert results["accuracy"].task_type == "image-classification"
    counts = model.parameter_counts()
    for text in ("group counts (16)", "branch drop rate | 0.2", f"{counts['trainable']:,}",
                 f"{counts['stored']:,}", "| epochs | 7 |", "no inference overhead",
                 'AutoModelForImageClassification.from_pretrained("ns/vit-merged")',
                 "resize to 32x32 (bilinear)"):
        assert text in card.text, text


def test_push_merged_to_a_branch_and_again(hub):
    model = tiny_model()
    first = push_merged(model, "ns/tiny", token=TOKEN)
    repo = hub.state.repos["ns/tiny"]
    # Same files again, to a new branch: the branch is created, no empty commit is made.
    assert push_merged(model, "ns/tiny", token=TOKEN, revision="v2") == first
    assert repo.branches["v2"] == repo.branches["main"]
    # A changed card is a real commit on that branch only.
    url = push_merged(model, "ns/tiny", token=TOKEN, revision="v2", commit_message="second",
                      metrics={"eval_accuracy": 0.5})
    assert url.endswith(repo.branches["v2"]) and repo.branches["v2"] != repo.branches["main"]
    assert repo.messages[repo.branches["v2"]] == "second"
    v2, main = hub.state.files("ns/tiny", "v2"), hub.state.files("ns/tiny")
    assert v2["model.safetensors"] == main["model.safetensors"]
    assert b"0.5" in v2["README.md"] and v2["README.md"] != main["README.md"]
    assert not hub.state.lfs_uploads  # a tiny model goes in the commit itself (base64)


# ---------------------------------------------------------------------- push_adapter
def test_push_adapter_loads_back_from_the_hub(hub):
    model = tiny_model()
    x = pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    before = snapshot(model)

    url = push_adapter(model, "ns/adapter", token=TOKEN, private=True, base_model=BASE_ID,
                       metrics=METRICS, dataset="cifar100")

    assert_unchanged(model, before)
    assert "/ns/adapter/commit/" in url
    files = hub.state.files("ns/adapter")
    assert set(files) == {".gitattributes", "consolidator_config.json",
                          "consolidator_model.safetensors", "README.md"}
    assert json.loads(files["consolidator_config.json"])["base_model_name_or_path"] == BASE_ID
    assert hub.state.repos["ns/adapter"].private

    # Private repo: without a token the Hub answers "not found", with it the adapter loads.
    with pytest.raises(FileNotFoundError, match="ns/adapter"):
        ConsolidatorModel.from_pretrained(tiny_vit(0), "ns/adapter")
    loaded = ConsolidatorModel.from_pretrained(tiny_vit(0), "ns/adapter", token=TOKEN).eval()
    with torch.no_grad():
        assert (loaded(pixel_values=x).logits - expected).abs().max().item() <= 1e-5

    card = ModelCard.load("ns/adapter", token=TOKEN)
    assert f"base_model:adapter:{BASE_ID}" in card.data.tags
    assert card.data.library_name == "consolidator_hf" and card.data.base_model == BASE_ID
    assert card.data.base_model_relation == "adapter"
    assert 'ConsolidatorModel.from_pretrained(base, "ns/adapter")' in card.text


# ---------------------------------------------------------------------- tokens and failures
def test_token_never_written_printed_or_logged(hub, tmp_path, caplog, capfd):
    caplog.set_level("DEBUG")
    model = tiny_model()
    push_merged(model, "ns/m", token=TOKEN, metrics=METRICS, dataset="cifar100")
    push_adapter(model, "ns/a", token=TOKEN)
    ConsolidatorModel.from_pretrained(tiny_vit(0), "ns/a", token=TOKEN)

    # The token did travel, as the Authorization header ...
    assert f"Bearer {TOKEN}" in hub.state.auth_headers
    # ... and nowhere else: not in any request body, stored file (base64 content decoded),
    # log record, printed output or file on disk.
    needles = (TOKEN.encode(), base64.b64encode(TOKEN.encode()))
    for body in hub.state.uploaded_bodies:
        assert not any(n in body for n in needles)
    for repo in ("ns/m", "ns/a"):
        for name, data in hub.state.files(repo).items():
            assert TOKEN.encode() not in data, name
    assert TOKEN not in caplog.text
    captured = capfd.readouterr()
    assert TOKEN not in captured.out and TOKEN not in captured.err
    for folder, _, names in os.walk(tmp_path):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                assert TOKEN.encode() not in f.read(), os.path.join(folder, name)


def test_failed_upload_raises_clear_error_and_leaves_nothing(hub, tmp_path, monkeypatch):
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(staging))
    model = tiny_model()
    before = snapshot(model)

    hub.state.fail["commit"] = 500
    with pytest.raises(HubError) as err:
        push_merged(model, "ns/broken", token=TOKEN)
    message = str(err.value)
    assert "ns/broken" in message and "upload the files and commit" in message and "500" in message
    assert TOKEN not in message
    assert os.listdir(staging) == []  # the staged folder is gone
    assert_unchanged(model, before)
    assert "ns/broken" in hub.state.repos and \
        set(hub.state.files("ns/broken")) == {".gitattributes"}  # no partial commit either

    with pytest.raises(HubError, match=r"create the repository.*authentication failed"):
        push_adapter(model, "ns/other", token="hf_wrong_token")
    assert os.listdir(staging) == []

    del hub.state.fail["commit"]
    hub.state.lfs_threshold = 1  # every file through LFS, and the storage refuses the upload
    hub.state.fail["lfs_put"] = 403
    with pytest.raises(HubError, match=r"upload the files and commit.*Error while uploading .*403"):
        push_adapter(model, "ns/lfs-refused", token=TOKEN)
    assert os.listdir(staging) == [] and hub.state.lfs_uploads == []
    assert set(hub.state.files("ns/lfs-refused")) == {".gitattributes"}

    with pytest.raises(ValueError, match="repo_id"):
        push_merged(model, "ns/bad name/x", token=TOKEN)

    hub.stop()  # nothing listens any more
    with pytest.raises(HubError, match=r"could not create the repository for Hub repo 'ns/x' at http"):
        push_merged(model, "ns/x", token=TOKEN)
    assert os.listdir(staging) == []


def test_offline_mode_gives_clear_error(hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        push_adapter(tiny_model(), "ns/off", token=TOKEN)


# ---------------------------------------------------------------------- local folders
def test_save_merged_loads_offline_without_consolidator_hf(tmp_path):
    model = tiny_model()
    model.train()  # the caller's mode must survive too
    before = snapshot(model)
    x = pixels(4)
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    model.train()

    path = save_merged(model, tmp_path / "merged", image_processor="paper",
                       id2label=["cat", "dog", "bird"], metrics=METRICS)

    assert_unchanged(model, before)
    assert sorted(os.listdir(path)) == ["README.md", "config.json", "model.safetensors",
                                        "preprocessor_config.json"]
    assert [n for n in os.listdir(tmp_path) if n != "merged"] == []  # no temp folder left
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    for name in os.listdir(path):  # not safetensors' 0600
        assert os.stat(os.path.join(path, name)).st_mode & 0o777 == 0o666 & ~umask, name
    weights = load_file(os.path.join(path, "model.safetensors"))
    assert not any("branches" in k or "base_layer" in k for k in weights)
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_ENDPOINT")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), PYTHONPATH=ROOT)
    run_plain_transformers(str(path), tmp_path / "x.pt", tmp_path / "out.pt", env)
    out = torch.load(tmp_path / "out.pt")
    assert (out["logits"] - expected).abs().max().item() <= 1e-5
    assert out["id2label"] == {0: "cat", 1: "dog", 2: "bird"}
    assert out["size"] == {"height": 16, "width": 16} and out["resample"] == 3  # bicubic
    card = ModelCard.load(os.path.join(path, "README.md"))
    assert card.data.eval_results is None  # no dataset named: metrics only in the body
    # no split known: the metric table has no (empty) split column
    assert "| accuracy | 0.8125 |" in card.text and "| epochs | 7 |" in card.text
    assert "| metric | value |" in card.text and "|  |" not in card.text


def test_save_merged_failure_leaves_no_folder(tmp_path):
    class BrokenProcessor:
        def to_dict(self):
            return {}

        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_merged(tiny_model(), tmp_path / "out", image_processor=BrokenProcessor())
    assert os.listdir(tmp_path) == []

    # An existing folder keeps its files when a save into it fails.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    with pytest.raises(OSError):
        save_merged(tiny_model(), tmp_path / "out", image_processor=BrokenProcessor())
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["keep.txt"]


def test_save_merged_of_a_merged_or_frozen_model(tmp_path):
    model = tiny_model()
    x = pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    counts = model.parameter_counts()
    model.save_pretrained(tmp_path / "adapter")
    frozen = ConsolidatorModel.from_pretrained(tiny_vit(0), tmp_path / "adapter", is_trainable=False)
    frozen.merge_adapter()  # the caller merged in place: still publishable, and stays merged
    path = save_merged(frozen, tmp_path / "merged")
    assert all(layer.merged for _, layer in frozen.consolidator_layers())
    assert not any(p.requires_grad for p in frozen.parameters())
    merged = ViTForImageClassification.from_pretrained(path).eval()
    assert not any(isinstance(m, ConsolidatorLinear) for m in merged.modules())
    with torch.no_grad():
        assert (merged(pixel_values=x).logits - expected).abs().max().item() <= 1e-5
    # The card counts what the recipe trains, not the frozen flags of the loaded copy.
    text = open(os.path.join(path, "README.md")).read()
    assert f"| trainable parameters | {counts['trainable']:,} " in text
    # The adapter of a frozen, merged model still holds everything training changed.
    again = save_adapter(frozen, tmp_path / "adapter2")
    assert load_file(os.path.join(again, "consolidator_model.safetensors")).keys() == \
        load_file(tmp_path / "adapter" / "consolidator_model.safetensors").keys()
    reloaded = ConsolidatorModel.from_pretrained(tiny_vit(0), again).eval()
    with torch.no_grad():
        assert (reloaded(pixel_values=x).logits - expected).abs().max().item() <= 1e-5


def test_save_adapter_and_card_contents(tmp_path):
    model = tiny_model()
    path = save_adapter(model, tmp_path / "adapter", base_model=BASE_ID, dataset="my/dataset")
    assert sorted(os.listdir(path)) == ["README.md", "consolidator_config.json",
                                        "consolidator_model.safetensors"]
    assert model.consolidator_config.base_model_name_or_path is None  # the caller's config
    card = ModelCard.load(os.path.join(path, "README.md"))
    assert "vtab" not in card.data.tags and card.data.datasets == ["my/dataset"]
    loaded = ConsolidatorModel.from_pretrained(tiny_vit(0), path).eval()
    x = pixels()
    with torch.no_grad():
        assert torch.allclose(loaded(pixel_values=x).logits, model(pixel_values=x).logits,
                              atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="base_model"):
        build_model_card(model, base_model="/not/a/hub/id")
    with pytest.raises(TypeError, match="ConsolidatorModel"):
        save_merged(tiny_vit(), tmp_path / "x")
    with pytest.raises(ValueError, match="id2label"):
        save_merged(model, tmp_path / "y", id2label=["only-one"])
    assert not (tmp_path / "y").exists()


def test_load_metrics_from_trainer_style_json(tmp_path):
    (tmp_path / "all_results.json").write_text(json.dumps(
        {"epoch": 3.0, "train_loss": 0.2, "test": {"accuracy": 0.75}, "eval_accuracy": 0.7}))
    flat = load_metrics(tmp_path / "all_results.json")
    assert flat == {"epoch": 3.0, "train_loss": 0.2, "test_accuracy": 0.75, "eval_accuracy": 0.7}
    card = build_model_card(tiny_model(), metrics=tmp_path / "all_results.json", dataset="dtd")
    splits = {(r.metric_type, r.dataset_split): r.metric_value for r in card.data.eval_results}
    assert splits == {("accuracy", "test"): 0.75, ("accuracy", None): 0.7}
    assert "vtab" in card.data.tags and "| epochs | 3 |" in card.text
    full = build_model_card(tiny_model(), metrics={"accuracy": 0.5}, dataset="uoft-cs/cifar100")
    assert "vtab" not in full.data.tags  # the full CIFAR-100, not its VTAB-1k subset
    assert full.data.eval_results[0].dataset_name == "uoft-cs/cifar100"
    # scripts/finetune.py's metrics.json: counts, sizes and the run's config are not metrics;
    # its eval_split and task fill the split and the dataset.
    (tmp_path / "metrics.json").write_text(json.dumps({
        "task": "cifar100", "method": "consolidator", "accuracy": 0.875, "eval_loss": 0.4,
        "eval_split": "test", "epochs": 5.0, "trainable_params": 1234, "stored_params": 999,
        "image_size": 224, "world_size": 1, "train_runtime_s": 12.5, "global_step": 80,
        "loss_history": [[10, 2.1], [20, 1.7]], "config": {"learning_rate": 1e-3, "seed": 42}}))
    card = build_model_card(tiny_model(), metrics=tmp_path / "metrics.json")
    results = {(r.metric_type, r.dataset_split, r.dataset_type): r.metric_value
               for r in card.data.eval_results}
    assert results == {("accuracy", "test", "cifar100"): 0.875, ("loss", "test", "cifar100"): 0.4}
    assert card.data.datasets == ["cifar100"] and "vtab" in card.data.tags
    assert "| epochs | 5 |" in card.text
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="bad.json"):
        load_metrics(tmp_path / "bad.json")


# ---------------------------------------------------------------------- the CLI
def _load_cli():
    return load_script("push_merged")


def test_cli_pushes_merged_and_adapter(hub, tmp_path):
    model = tiny_model()
    x = pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    # The base as saved before training (what a user has on disk), the trained adapter beside it.
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    tiny_vit(0).save_pretrained(base_dir)
    model.save_pretrained(adapter_dir)
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))

    env = hub_env(hub, tmp_path / "cli_home", HF_TOKEN=TOKEN)  # the token from the environment
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "push_merged.py"),
         "--base-model", str(base_dir), "--adapter", str(adapter_dir), "--repo-id", "ns/cli",
         "--metrics", str(tmp_path / "metrics.json"), "--dataset", "cifar100"],
        env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().startswith(f"{hub.url}/ns/cli/commit/")
    assert TOKEN not in r.stdout + r.stderr
    files = hub.state.files("ns/cli")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= set(files)
    (tmp_path / "dl").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "dl" / name).write_bytes(files[name])
    merged = ViTForImageClassification.from_pretrained(tmp_path / "dl").eval()
    with torch.no_grad():
        assert (merged(pixel_values=x).logits - expected).abs().max().item() <= 1e-5

    cli = _load_cli()
    assert cli.main(["--base-model", str(base_dir), "--adapter", str(adapter_dir),
                     "--repo-id", "ns/cli-adapter", "--adapter-only", "--token", TOKEN]) == 0
    assert set(hub.state.files("ns/cli-adapter")) == {
        ".gitattributes", "consolidator_config.json", "consolidator_model.safetensors", "README.md"}
    pushed = load(hub.state.files("ns/cli-adapter")["consolidator_model.safetensors"])
    saved = load_file(adapter_dir / "consolidator_model.safetensors")
    assert pushed.keys() == saved.keys()
    assert all(torch.allclose(pushed[k], saved[k], atol=1e-7, rtol=0) for k in saved)


def test_hub_server_blob_ids_match_git():
    # The server reports git blob ids the way git computes them (checked against a known value).
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


# ---------------------------------------------------------------------- finetune.py --push-to-hub
def _load_finetune():
    return load_script("finetune")


def test_finetune_push_to_hub(hub, tmp_path, monkeypatch):
    from tiny_vtab import save_tiny_backbone, write_tiny_vtab

    write_tiny_vtab(tmp_path / "vtab")
    backbone = save_tiny_backbone(tmp_path / "backbone")
    finetune = _load_finetune()
    run = ["--model", backbone, "--task", "tiny_task", "--data-dir", str(tmp_path / "vtab"),
           "--num-classes", "3", "--groups", "8", "--batch-size", "8", "--max-steps", "3",
           "--learning-rate", "0.03", "--save-strategy", "no", "--logging-steps", "1"]

    # Problems that would only show after training are reported before it.
    with pytest.raises(SystemExit, match="merged Consolidator model"):
        finetune.main(run + ["--method", "linear", "--output-dir", str(tmp_path / "lin"),
                             "--push-to-hub", "ns/lin"])
    with pytest.raises(SystemExit, match="repo_id"):
        finetune.main(run + ["--output-dir", str(tmp_path / "bad"), "--push-to-hub", "a/b/c"])
    assert not (tmp_path / "lin").exists() and not (tmp_path / "bad").exists()

    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the token from the environment, as documented
    out = tmp_path / "run"
    metrics = finetune.main(run + ["--output-dir", str(out), "--push-to-hub", "ns/run",
                                   "--hub-private"])

    repo = hub.state.repos["ns/run"]
    assert repo.private and metrics["hub_commit_url"].endswith(repo.branches["main"])
    files = hub.state.files("ns/run")
    # The upload is the run's own merged model, labels and processor.
    pushed, local = load(files["model.safetensors"]), load_file(out / "merged" / "model.safetensors")
    assert pushed.keys() == local.keys()
    assert max((pushed[k] - local[k]).abs().max().item() for k in local) <= 1e-6
    config = json.loads(files["config.json"])
    assert config["id2label"] == json.loads((out / "merged" / "config.json").read_text())["id2label"]
    assert json.loads(files["preprocessor_config.json"]) == \
        json.loads((out / "merged" / "preprocessor_config.json").read_text())
    card = ModelCard(files["README.md"].decode())
    result = card.data.eval_results[0]
    assert (result.metric_type, result.dataset_split, result.dataset_type) == \
        ("accuracy", "test", "tiny_task")
    assert result.metric_value == metrics["accuracy"]
    assert "| learning rate | 0.03 |" in card.text and "no inference overhead" in card.text
    assert TOKEN not in (out / "metrics.json").read_text()
