"""Uploads to the Hugging Face Hub: transport only.

:func:`push_merged` / :func:`push_adapter` stage what :func:`consolidator_hf.publish.save_merged`
/ :func:`~consolidator_hf.publish.save_adapter` write in a temporary folder and upload it.
Uploads go through ``huggingface_hub`` (``create_repo`` + one ``create_commit``), so
``HF_ENDPOINT``, ``HF_TOKEN`` and the login cache work as usual. Tokens are passed to the
client only: never printed, logged or written. Any failure while talking to the Hub raises
:class:`HubError` naming the repo and the step that failed, and leaves no local files behind.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any, Callable, List, Mapping, Optional, Union

from .cards import MetricsLike, require_consolidator
from .model import ConsolidatorModel
from . import publish

logger = logging.getLogger(__name__)


class HubError(RuntimeError):
    """Talking to the Hub failed; the message names the repo, the step and the cause."""


def _redact(text: str, token: Optional[str]) -> str:
    for secret in (token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        if secret and len(secret) >= 8:  # a short "secret" would mangle ordinary words
            text = text.replace(secret, "***")
    return text


def _describe_error(e: BaseException) -> str:
    """One line: the exception and its causes (e.g. LFS upload -> HTTP error), without repeats."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it (or set HF_HUB_OFFLINE=0) to upload"
    parts: List[str] = []
    seen_ids, seen_msgs = set(), []
    while e is not None and id(e) not in seen_ids:
        seen_ids.add(id(e))
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        if not any(msg in m for m in seen_msgs):
            text = f"{type(e).__name__}: {msg}"
            if isinstance(e, HfHubHTTPError) and e.response is not None \
                    and e.response.status_code == 401:
                text += " (authentication failed: pass token=, set HF_TOKEN or run `hf auth login`)"
            parts.append(text)
            seen_msgs.append(msg)
        if isinstance(e, HfHubHTTPError):
            break  # its cause is the raw HTTP error it already describes
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)


def _hub_step(step: str, repo_id: str, token: Optional[str], endpoint: str, fn: Callable[[], Any]):
    try:
        return fn()
    except Exception as e:  # every client or network error becomes one clear message
        detail = _redact(_describe_error(e), token)
        raise HubError(f"could not {step} for Hub repo {repo_id!r} at {endpoint}: {detail}") from None


def check_can_upload(repo_id: str) -> None:
    """Fail before any long work (a merge, a training run): ``ValueError`` for a malformed
    repo id, :class:`HubError` in offline mode."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        if not isinstance(repo_id, str):
            raise HFValidationError(f"expected a string, got {type(repo_id).__name__}")
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"repo_id: {repo_id!r} is not a valid Hub repo id "
                         f"('namespace/name'): {e}") from None
    if constants.is_offline_mode():
        raise HubError(f"cannot upload to Hub repo {repo_id!r}: HF_HUB_OFFLINE is set (unset it or "
                       "set HF_HUB_OFFLINE=0 to upload)")


def _upload_folder(folder: str, repo_id: str, *, private: bool, token: Optional[str],
                   commit_message: str, revision: Optional[str]) -> str:
    """``create_repo`` (exist_ok) + optional branch + one commit of every file in ``folder``."""
    from huggingface_hub import CommitOperationAdd, HfApi

    check_can_upload(repo_id)
    api = HfApi(token=token)
    endpoint = api.endpoint
    _hub_step("create the repository", repo_id, token, endpoint,
              lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    if revision and revision != "main":
        _hub_step(f"create branch {revision!r}", repo_id, token, endpoint,
                  lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
    files = sorted(os.listdir(folder))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
                  for name in files]
    logger.info("uploading %s to %s/%s", ", ".join(files), endpoint, repo_id)
    info = _hub_step("upload the files and commit", repo_id, token, endpoint,
                     lambda: api.create_commit(repo_id, operations, commit_message=commit_message,
                                               revision=revision))
    logger.info("pushed to %s", info.commit_url)
    return str(info.commit_url)


def push_merged(
    model: ConsolidatorModel, repo_id: str, *, private: bool = False, token: Optional[str] = None,
    commit_message: Optional[str] = None, image_processor: Any = None, metrics: MetricsLike = None,
    dataset: Optional[str] = None, revision: Optional[str] = None, base_model: Optional[str] = None,
    epochs: Optional[float] = None, id2label: Optional[Union[Mapping[Any, str], List[str]]] = None,
    training_details: Optional[Mapping[str, Any]] = None, safe_merge: bool = True,
) -> str:
    """Merge a copy of ``model`` and upload it as an ordinary model repo; return the commit URL.

    The repo gets what :func:`save_merged` writes (``config.json``, ``model.safetensors``,
    ``preprocessor_config.json``, ``README.md``) in one commit; the repo is created when it does
    not exist (``private`` applies then) and ``revision`` names a branch (created from
    ``main`` when missing). ``token`` defaults to ``HF_TOKEN`` / the login cache and is never
    logged or written. The files are staged in a temporary folder that is removed afterwards,
    whether the upload worked or not; failures raise :class:`HubError`. This is the one call
    a training script needs, e.g. ``push_merged(model, args.push_to_hub, metrics=metrics)``.
    """
    model = require_consolidator(model, "push_merged")
    check_can_upload(repo_id)
    with tempfile.TemporaryDirectory(prefix="consolidator-push-") as tmp:
        folder = publish.save_merged(model, os.path.join(tmp, "merged"), image_processor=image_processor,
                             metrics=metrics, dataset=dataset, base_model=base_model,
                             epochs=epochs, id2label=id2label, training_details=training_details,
                             repo_id=repo_id, safe_merge=safe_merge)
        return _upload_folder(folder, repo_id, private=private, token=token, revision=revision,
                              commit_message=commit_message or "Upload merged Consolidator model")


def push_adapter(
    model: ConsolidatorModel, repo_id: str, *, private: bool = False, token: Optional[str] = None,
    commit_message: Optional[str] = None, metrics: MetricsLike = None,
    dataset: Optional[str] = None, revision: Optional[str] = None, base_model: Optional[str] = None,
    epochs: Optional[float] = None, training_details: Optional[Mapping[str, Any]] = None,
) -> str:
    """Upload only the adapter files (what :func:`save_adapter` writes) and their card; return
    the commit URL. ``ConsolidatorModel.from_pretrained(base, repo_id)`` loads them back."""
    model = require_consolidator(model, "push_adapter")
    check_can_upload(repo_id)
    with tempfile.TemporaryDirectory(prefix="consolidator-push-") as tmp:
        folder = publish.save_adapter(model, os.path.join(tmp, "adapter"), metrics=metrics,
                              dataset=dataset, base_model=base_model, epochs=epochs,
                              training_details=training_details, repo_id=repo_id)
        return _upload_folder(folder, repo_id, private=private, token=token, revision=revision,
                              commit_message=commit_message or "Upload Consolidator adapter")


__all__ = ["HubError", "check_can_upload", "push_adapter", "push_merged"]

# Names this module held before publishing was split (docs/DESIGN.md section 2); earlier
# READMEs showed them here, so they still resolve, with a DeprecationWarning.
_MOVED = {"save_merged": "publish", "save_adapter": "publish", "load_for_publishing": "publish",
          "build_model_card": "cards", "load_metrics": "cards", "CARD_NAME": "cards",
          "default_image_processor": "processors", "PREPROCESS_PRESETS": "processors",
          "push_training_run": "training", "RUN_DETAILS": "training.run"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib
        import warnings

        home = f"consolidator_hf.{_MOVED[name]}"
        warnings.warn(f"consolidator_hf.hub.{name} moved to {home}.{name}", DeprecationWarning,
                      stacklevel=2)
        return getattr(importlib.import_module(home), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
