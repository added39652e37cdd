"""Fine-tune a vision transformer with Consolidator (or a baseline method) through the HF Trainer.

    accelerate launch scripts/finetune.py                      # the offline default run
    accelerate launch scripts/finetune.py --offline-default real   # real DINOv2 -> real ELPV task
    accelerate launch scripts/finetune.py --task cifar100 --data-dir data/vtab-1k \\
        --model google/vit-base-patch16-224-in21k --recipe paper
    accelerate launch scripts/finetune.py --config configs/vtab/cifar100.yaml --learning-rate 1e-3
    python scripts/finetune.py ...                             # the same, one process
    accelerate launch scripts/finetune.py --task cifar100 ... --push-to-hub me/vit-cifar100 \
        [--hub-private]                    # then upload the merged model + card (token: HF_TOKEN)

Every flag mirrors a field of ``consolidator_hf.training.FinetuneConfig``; ``--config`` reads
fields from YAML, and flags given on the command line override it. With no ``--task`` and no
``--config`` the script runs the offline default (``consolidator_apps.offline_default``): a small
ViT pretrained on scikit-learn's digits 0-4, adapted to digits 5-9 with Consolidator and with
the head only. ``--offline-default real`` runs the real-transfer one instead
(``consolidator_apps.real_default``): DINOv2 ViT-S/14 adapted to ELPV solar-cell images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Any, Dict, List, Optional

import yaml

from consolidator_apps.offline_default import OfflineDefaultConfig  # light: the dataclass only
from consolidator_hf import ConsolidatorConfig
from consolidator_hf.cli import HelpFormatter, add_debug_flag, run_cli
from consolidator_hf.training import FinetuneConfig, apply_recipe, check_model_source, prepare_output_dir

# run_finetune / run_offline_default import transformers' Trainer (seconds): imported only after
# the arguments, the backbone source, the output folder and the data have been checked.

# Hidden: sizes of the offline default (tests and quick looks), and the YAML key for `--config`.
_OFFLINE_PREFIX = "offline_"


def _base_type(tp: Any) -> Any:
    """``Optional[X]`` -> ``X``; ``Tuple[int, ...]`` -> ``tuple``."""
    if typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return typing.get_origin(tp) or tp


def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:  # argparse names the flag: "argument --consolidator-kwargs: ..."
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno}): {text!r}; "
                                         "expected an object such as '{\"init_range\": 0.01}'")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _default_text(f: dataclasses.Field) -> str:
    """The default shown in --help (an adapter view's is ConsolidatorConfig's)."""
    if f.metadata.get("adapter"):
        default = getattr(ConsolidatorConfig(), f.name)
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return ""
    else:
        default = f.default
    if "(default" in f.metadata.get("help", ""):  # the help text states it already
        return ""
    if isinstance(default, tuple):
        default = " ".join(map(str, default))
    return f" (default: {default})"


def _add_field(parser: argparse.ArgumentParser, f: dataclasses.Field, hidden: bool = False,
               prefix: str = "") -> None:
    """One flag per config field: type, choices and help from the field and its metadata."""
    if f.name == "consolidator" and not prefix:  # the nested config: its other fields as JSON
        parser.add_argument("--consolidator-kwargs", dest="consolidator_kwargs", metavar="JSON",
                            type=_json_object, default=argparse.SUPPRESS, help=f.metadata["help"])
        return
    flag = "--" + (prefix + f.name).replace("_", "-")
    hints = typing.get_type_hints(OfflineDefaultConfig if prefix else FinetuneConfig)
    tp = _base_type(hints[f.name])
    help_text = (argparse.SUPPRESS if hidden else
                 f.metadata.get("help", "") + _default_text(f))
    dest = prefix + f.name
    kwargs: Dict[str, Any] = dict(dest=dest, default=argparse.SUPPRESS, help=help_text)
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
    elif tp in (tuple, list):
        inner = int if f.name == "groups" else str
        parser.add_argument(flag, nargs="+", type=inner, **kwargs)
    else:
        parser.add_argument(flag, type=tp, choices=f.metadata.get("choices"), **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
        epilog="With no --task and no --config: the offline default run (digits 0-4 -> 5-9).")
    p.add_argument("--config", help="YAML file of FinetuneConfig fields; flags override it")
    add_debug_flag(p)
    p.add_argument("--offline-default", choices=("digits", "real"), default=None,
                   help="without --task: which offline run (default: digits, a small ViT "
                        "pretrained on digits 0-4 adapted to 5-9, about a minute; real: DINOv2 "
                        "ViT-S/14 adapted to ELPV solar cells, see README 'real transfer')")
    # Publishing is not a FinetuneConfig field: the token must never reach metrics.json.
    hub = p.add_argument_group("publishing (consolidator_hf.training.push_training_run)")
    hub.add_argument("--push-to-hub", metavar="REPO", default=None,
                     help="after training, upload the merged model with its model card to this "
                          "Hub repo ('namespace/name'; --method consolidator, --task runs)")
    hub.add_argument("--hub-private", action="store_true", help="create the Hub repo as private")
    hub.add_argument("--hub-token", default=None,
                     help="Hub token (default: the HF_TOKEN environment variable or the login "
                          "cache; prefer those: command lines are visible to other users)")
    for f in dataclasses.fields(FinetuneConfig):
        _add_field(p, f)
    for f in dataclasses.fields(OfflineDefaultConfig):
        if f.name not in ("output_dir", "use_cpu"):
            # sizes for tests and quick looks stay hidden; a field with help text is shown
            _add_field(p, f, hidden="help" not in f.metadata, prefix=_OFFLINE_PREFIX)
    return p


def read_yaml(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a mapping of FinetuneConfig fields")
    # accept either spelling of keys (learning-rate / learning_rate)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = vars(build_parser().parse_args(argv))
    args.pop("debug", None)
    config_path = args.pop("config", None)
    which = args.pop("offline_default", None)
    push = {k: args.pop(k) for k in ("push_to_hub", "hub_private", "hub_token")}
    offline = {k[len(_OFFLINE_PREFIX):]: args.pop(k) for k in list(args)
               if k.startswith(_OFFLINE_PREFIX)}
    fields: Dict[str, Any] = read_yaml(config_path) if config_path else {}
    fields.update(args)  # command-line flags win over the YAML file
    if "task" not in fields:
        if push["push_to_hub"]:
            raise SystemExit("--push-to-hub publishes a --task run (the offline default writes "
                             "its outputs locally; push one with scripts/push_merged.py)")
        extra = set(fields) - {"output_dir", "use_cpu", "logging_steps"}
        if extra:
            raise SystemExit(f"--task is required with {sorted(extra)} (no task: the offline "
                             "default run, which takes only --output-dir and --use-cpu)")
        for key in ("output_dir", "use_cpu", "logging_steps"):
            if key in fields:
                offline[key] = fields[key]
        if which == "real":
            if set(offline) - {"output_dir", "use_cpu", "logging_steps"}:
                raise SystemExit("--offline-default real takes only --output-dir, --use-cpu and "
                                 "--logging-steps")
            from consolidator_apps.real_default import RealDefaultConfig, run_real_default

            return run_real_default(RealDefaultConfig(**offline))
        if "groups" in offline:
            offline["groups"] = tuple(offline["groups"])
        from consolidator_apps.offline_default import run_offline_default

        return run_offline_default(OfflineDefaultConfig(**offline))
    if which:
        raise SystemExit("--offline-default chooses the run without --task; drop one of them")
    if offline:
        raise SystemExit(f"{sorted(offline)}: options of the offline default, not of a --task run")
    try:
        cfg = FinetuneConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"finetune.py: {e}") from None
    preflight(cfg)  # seconds, before the Trainer is even imported
    if push["push_to_hub"]:
        check_push(cfg, push["push_to_hub"])  # before hours of training, not after
    from accelerate import PartialState

    from consolidator_hf.training import run_finetune

    metrics = run_finetune(cfg)
    if not PartialState().is_main_process:  # one summary per job, however many processes
        return metrics
    print(f"{cfg.task} {cfg.method}: test top-1 {100 * metrics['accuracy']:.2f} % "
          f"({metrics['trainable_params']:,} trainable, {metrics['stored_params']:,} stored "
          f"parameters, {metrics['train_runtime_s']:.0f} s); outputs in {cfg.output_dir}")
    if push["push_to_hub"]:  # main process only (above): one upload per run
        metrics["hub_commit_url"] = push_run(cfg, push)
    return metrics


def preflight(cfg: FinetuneConfig) -> None:
    """The checks run_finetune makes, made before its slow imports: the recipe, the backbone
    source, the output folder, the task name and its list files."""
    from consolidator_hf.data import check_vtab_task

    cfg = apply_recipe(cfg)
    cfg.validate()
    check_vtab_task(cfg.data_dir, cfg.task, (cfg.train_split, cfg.eval_split),
                    num_classes=cfg.num_classes)
    check_model_source(cfg.model)
    prepare_output_dir(cfg)


def check_push(cfg: FinetuneConfig, repo_id: str) -> None:
    from consolidator_hf.hub import HubError, check_can_upload

    if cfg.method != "consolidator":
        raise SystemExit(f"--push-to-hub publishes a merged Consolidator model; --method "
                         f"{cfg.method} writes {cfg.output_dir}/merged, which "
                         "`hf upload` can publish")
    try:
        check_can_upload(repo_id)
    except (ValueError, HubError) as e:
        raise SystemExit(f"finetune.py: --push-to-hub: {e}") from None


def push_run(cfg: FinetuneConfig, push: Dict[str, Any]) -> str:
    from consolidator_hf.hub import HubError
    from consolidator_hf.training import push_training_run

    try:
        url = push_training_run(cfg.output_dir, push["push_to_hub"], private=push["hub_private"],
                                token=push["hub_token"])
    except (HubError, OSError, ValueError) as e:
        raise SystemExit(f"finetune.py: training finished (outputs in {cfg.output_dir}) but the "
                         f"upload failed: {e}") from None
    print(f"pushed the merged model to {url}", flush=True)
    return url


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:], prog="finetune.py"))
