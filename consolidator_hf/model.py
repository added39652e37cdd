"""``ConsolidatorModel``: injects :class:`ConsolidatorLinear` into any ``nn.Module`` by name,
applies the freezing policy, saves/loads the adapter, merges back into plain ``nn.Linear``.

Nothing here knows about ViT: architecture defaults come from :mod:`consolidator_hf.targets`.
"""

from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .io import load_safetensors, resolve_file, write_folder
from .config import WEIGHTS_NAME, ConsolidatorConfig
from .drop_path import BackboneDropPath, add_backbone_drop_path
from .layer import ConsolidatorLinear, merge_is_finite
from .adapter_state import adapter_tensors, load_adapter_state, stores_layer_bias
from .storage import write_adapter_file
from .targets import default_target_modules, is_norm, linear_names, name_matches, qkv_modules

def _matches(name: str, spec: Union[List[str], str]) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name_matches(name, t) for t in spec)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class ConsolidatorModel(nn.Module):
    """A base model whose target ``nn.Linear`` layers carry Consolidator branches.

    Forward passes every argument through to the base model (``labels`` give a loss), so
    the model trains with the Hugging Face ``Trainer`` like any other. Attributes the
    wrapper lacks (``config``, ``device``, ...) are looked up on the base model.

    ``config.qkv_grouping="fused"`` makes q, k and v row slices of one virtual grouped layer
    (the sets come from :mod:`consolidator_hf.targets`); ``config.backbone_drop_path`` adds
    stochastic depth hooks (:mod:`consolidator_hf.drop_path`), removed again by
    :meth:`merge_and_unload` and :meth:`unload`.
    """

    def __init__(self, model: nn.Module, config: ConsolidatorConfig) -> None:
        super().__init__()
        config.validate()
        self.base_model = model
        self.consolidator_config = config
        self.targeted_module_names: List[str] = []
        self._row_slices: Dict[str, Tuple[int, int]] = {}
        self._inject()
        self._apply_freezing()
        # Hooks, not modules: names and state dicts stay those of the base model.
        self.backbone_drop_path: Optional[BackboneDropPath] = add_backbone_drop_path(
            self.base_model, config.backbone_drop_path)
        # Originals of every tensor training will change in place (biases, norms, heads),
        # so that unload() can hand back the untouched base model.
        self._originals: Dict[str, torch.Tensor] = {
            n: p.detach().clone() for n, p in self.trained_base_parameters()
        }

    # ------------------------------------------------------------------ plumbing
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def consolidator_layers(self) -> Iterator[Tuple[str, ConsolidatorLinear]]:
        """``(name, layer)`` for every injected layer; names as in the base model."""
        for name, module in self.base_model.named_modules():
            if isinstance(module, ConsolidatorLinear):
                yield name, module

    # ------------------------------------------------------------------ injection
    def _resolve_targets(self) -> Union[List[str], str]:
        cfg = self.consolidator_config
        return cfg.target_modules if cfg.target_modules is not None else \
            default_target_modules(self.base_model)

    def _fused_sets(self) -> List[List[str]]:
        """Module-name suffixes whose layers form one virtual grouped layer, rows in order.

        ``qkv_grouping="fused"``: the model's q, k and v projections (names from
        :mod:`consolidator_hf.targets`), as the paper's single qkv layer.
        """
        if self.consolidator_config.qkv_grouping != "fused":
            return []
        return [qkv_modules(linear_names(self.base_model))]

    def _compute_row_slices(self, chosen: List[str], modules: Dict[str, nn.Module]
                            ) -> Dict[str, Tuple[int, int]]:
        """``name -> (row_offset, virtual_out)`` for layers that are row slices of a fused set."""
        slices: Dict[str, Tuple[int, int]] = {}
        targeted = set(chosen)
        for suffixes in self._fused_sets():
            for name in chosen:
                first = next((t for t in suffixes if name_matches(name, t)), None)
                if first is None or name in slices:
                    continue
                prefix = name[: len(name) - len(first)]
                members = [prefix + t for t in suffixes]
                absent = [m for m in members if m not in targeted]
                if absent:
                    raise ValueError(
                        f"qkv_grouping='fused': {name} is adapted but {absent} of its fused set "
                        f"{members} are not (check target_modules / exclude_modules)"
                    )
                sizes = [modules[m].out_features for m in members]
                ins = {modules[m].in_features for m in members}
                if len(ins) != 1:
                    raise ValueError(f"qkv_grouping='fused': {members} have different "
                                     f"in_features {[modules[m].in_features for m in members]}")
                offset = 0
                for m, size in zip(members, sizes):
                    slices[m] = (offset, sum(sizes))
                    offset += size
        return slices

    def _layer_kwargs(self, name: str, module: nn.Linear) -> Dict[str, Any]:
        """Per-layer extras for :class:`ConsolidatorLinear` (row slices of a virtual layer)."""
        if name in self._row_slices:
            offset, virtual_out = self._row_slices[name]
            return {"row_offset": offset, "virtual_out_features": virtual_out}
        return {}

    def _inject(self) -> None:
        cfg = self.consolidator_config
        targets = self._resolve_targets()
        exclude = cfg.exclude_modules
        modules = dict(self.base_model.named_modules())
        chosen: List[str] = []
        for name, module in modules.items():
            if not name or not _matches(name, targets):
                continue
            if exclude is not None and _matches(name, exclude):
                continue
            if isinstance(module, nn.Linear):
                chosen.append(name)
            elif isinstance(module, ConsolidatorLinear):
                raise ValueError(f"{name} already carries Consolidator branches")
            elif not isinstance(targets, str):
                raise ValueError(
                    f"target module {name!r} is a {type(module).__name__}, not nn.Linear; "
                    "Consolidator adapts linear layers only"
                )
        if not isinstance(targets, str):
            for t in targets:
                if not any(name_matches(n, t) for n in chosen):
                    linear = linear_names(self.base_model)
                    raise ValueError(
                        f"target module {t!r} matches no nn.Linear in "
                        f"{type(self.base_model).__name__} (after exclude_modules); linear "
                        f"layers are e.g. {linear[:6]}"
                    )
        if not chosen:
            raise ValueError(f"target_modules={targets!r} matches no nn.Linear in "
                             f"{type(self.base_model).__name__}")
        self._row_slices = self._compute_row_slices(chosen, modules)
        for name in chosen:
            base = modules[name]
            layer = ConsolidatorLinear(
                base, cfg.groups, channel_shuffle=cfg.channel_shuffle, drop_rate=cfg.drop_rate,
                branch_bias=cfg.branch_bias, init_range=cfg.init_range, impl=cfg.impl, name=name,
                **self._layer_kwargs(name, base),
            )
            _set_submodule(self.base_model, name, layer)
        self.targeted_module_names = chosen

    def _saved_module_names(self) -> List[str]:
        names = self.consolidator_config.modules_to_save or []
        found = [n for n, _ in self.base_model.named_modules()
                 if n and any(name_matches(n, t) for t in names)]
        return [n for n in found if not any(n == a or n.startswith(a + ".")
                                             for a in self.targeted_module_names)]

    def trained_base_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        """Non-branch parameters that the config's policy trains (and the adapter stores):
        adapted layers' biases, norms, ``modules_to_save``. Named as in the merged model
        (``.base_layer`` dropped). Decided by the config, not by ``requires_grad``, so a model
        loaded frozen still saves the same adapter."""
        cfg = self.consolidator_config
        chosen: Dict[int, Tuple[str, nn.Parameter]] = {}

        def add(module_name: str, module: nn.Module, recurse: bool) -> None:
            for pname, p in module.named_parameters(recurse=recurse):
                full = f"{module_name}.{pname}" if module_name else pname
                if ".branches." not in f".{full}" and id(p) not in chosen:
                    chosen[id(p)] = (full.replace(".base_layer.", "."), p)

        for name, module in self.base_model.named_modules():
            if isinstance(module, ConsolidatorLinear):
                if cfg.train_bias and module.base_layer.bias is not None:
                    chosen.setdefault(id(module.base_layer.bias), (f"{name}.bias", module.base_layer.bias))
            elif cfg.train_layernorm and is_norm(module):
                add(name, module, recurse=False)
        for name in self._saved_module_names():
            add(name, self.base_model.get_submodule(name), recurse=True)
        # base-model parameter order, so files and counts are deterministic
        order = {id(p): i for i, p in enumerate(self.base_model.parameters())}
        yield from sorted(chosen.values(), key=lambda np_: order[id(np_[1])])

    def _apply_freezing(self) -> None:
        cfg = self.consolidator_config
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for _, layer in self.consolidator_layers():
            for p in layer.branches.parameters():
                p.requires_grad_(True)
        wanted = cfg.modules_to_save or []
        saved = self._saved_module_names()
        missing = [t for t in wanted if not any(name_matches(n, t) for n in saved)]
        if missing:
            warnings.warn(f"modules_to_save {missing} match no module of "
                          f"{type(self.base_model).__name__}; nothing is saved for them",
                          stacklevel=3)
        for _, p in self.trained_base_parameters():
            p.requires_grad_(True)

    # ------------------------------------------------------------------ counting
    def parameter_counts(self) -> Dict[str, int]:
        """``trainable``, ``branch``, ``stored`` (after consolidation) and ``base`` counts.

        ``trainable`` is what the config's policy trains (branches, biases, norms, heads),
        whatever ``requires_grad`` says right now (e.g. after ``from_pretrained``)."""
        branch = sum(p.numel() for _, l in self.consolidator_layers() for p in l.branches.parameters())
        trainable = branch + sum(p.numel() for _, p in self.trained_base_parameters())
        base = sum(p.numel() for p in self.parameters()) - branch
        # What save_pretrained() writes, counted from the structure (no deltas computed).
        stored, layer_biases = 0, set()
        for name, layer in self.consolidator_layers():
            stored += layer.stored_numel()
            if self._stores_layer_bias(layer):
                stored += layer.out_features
                layer_biases.add(f"{name}.bias")
        stored += sum(p.numel() for n, p in self.trained_base_parameters() if n not in layer_biases)
        return {"trainable": trainable, "branch": branch, "stored": stored, "base": base}

    def _stores_layer_bias(self, layer: ConsolidatorLinear) -> bool:
        return stores_layer_bias(self, layer)

    def print_trainable_parameters(self) -> None:
        c = self.parameter_counts()
        print(
            f"trainable params: {c['trainable']:,} (branches: {c['branch']:,}) || "
            f"stored after consolidation: {c['stored']:,} || base params: {c['base']:,} || "
            f"trainable%: {100 * c['trainable'] / c['base']:.4f} || "
            f"stored%: {100 * c['stored'] / c['base']:.4f}"
        )

    # ------------------------------------------------------------------ merge
    def merge_adapter(self, safe_merge: bool = False) -> None:
        """Merge every layer in place (forward then uses plain linear weights).

        ``safe_merge``: check every merged weight and every other tensor of the model for
        NaN/inf first; on a bad one raise ``ValueError`` naming it, with nothing merged."""
        checked = self._checked_merge(safe_merge)
        for name, layer in self.consolidator_layers():
            layer.merge(safe_merge=safe_merge, merged_values=checked.pop(name, None))

    def unmerge_adapter(self) -> None:
        for _, layer in self.consolidator_layers():
            layer.unmerge()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside this ``with`` block the model computes what the untouched base model computes.

        The branches are bypassed, the tensors that train in place (adapted layers' biases,
        LayerNorms, ``modules_to_save``) hold their original values, stochastic-depth hooks are
        off and nothing requires grad; everything is put back on exit, exceptions included.
        Merged layers cannot be bypassed: call :meth:`unmerge_adapter` first.
        """
        layers = list(self.consolidator_layers())
        merged = [name for name, layer in layers if layer.merged]
        if merged:
            raise ValueError(f"disable_adapter: {merged[0]} (and {len(merged) - 1} more) is merged; "
                             "call unmerge_adapter() first")
        if any(layer.disabled for _, layer in layers):
            yield  # already inside a disable_adapter block
            return
        in_place = dict(self.trained_base_parameters())  # names as in self._originals
        trained = {name: in_place[name].detach().clone() for name in self._originals}
        grad_flags = [(p, p.requires_grad) for p in self.base_model.parameters()]
        drop_path = self.backbone_drop_path
        try:
            with torch.no_grad():
                for name, original in self._originals.items():
                    in_place[name].copy_(original)
            for p, _ in grad_flags:
                p.requires_grad_(False)
            for _, layer in layers:
                layer.disabled = True
            if drop_path is not None:
                drop_path.remove()
                self.backbone_drop_path = None
            yield
        finally:
            for _, layer in layers:
                layer.disabled = False
            with torch.no_grad():
                for name, value in trained.items():
                    in_place[name].copy_(value)
            for p, flag in grad_flags:
                p.requires_grad_(flag)
            if drop_path is not None:
                self.backbone_drop_path = add_backbone_drop_path(
                    self.base_model, self.consolidator_config.backbone_drop_path)

    def _checked_merge(self, safe_merge: bool) -> Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """With ``safe_merge``: the merged values of every unmerged layer, after checking them
        and every other tensor of the model for NaN/inf (``ValueError`` naming the first bad
        tensor; nothing is touched). Without: ``{}`` (each layer merges on its own)."""
        checked: Dict[str, Tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        if not safe_merge:
            return checked
        # Check every layer before touching any, so a bad merge leaves the model intact;
        # the checked values are the ones written (each merged weight is formed once).
        for name, layer in self.consolidator_layers():
            if layer.merged:
                continue
            checked[name] = layer.merged_values()
            if not merge_is_finite(*checked[name]):
                raise ValueError(f"{name}: merge would produce NaN or inf weights; "
                                 "nothing was merged")
        # ... and everything else that goes into the merged model as it is (the head,
        # LayerNorms, embeddings): a NaN there gives NaN logits just the same.
        bad = self.non_finite_tensors(skip=list(checked))
        if bad:
            raise ValueError(f"{bad[0]} holds NaN or inf values"
                             f"{f' (and {len(bad) - 1} more tensors)' if len(bad) > 1 else ''}"
                             "; nothing was merged")
        return checked

    def _replace_layers(self, merge: bool, safe_merge: bool = False) -> nn.Module:
        checked = self._checked_merge(safe_merge) if merge else {}
        if self.backbone_drop_path is not None:  # hand back a plain model, without our hooks
            self.backbone_drop_path.remove()
            self.backbone_drop_path = None
        if merge:
            for name, layer in self.consolidator_layers():
                layer.merge(safe_merge=safe_merge, merged_values=checked.pop(name, None))
        else:
            self.unmerge_adapter()
        for name, layer in list(self.consolidator_layers()):
            _set_submodule(self.base_model, name, layer.base_layer)
        return self.base_model

    @torch.no_grad()
    def non_finite_tensors(self, skip: Sequence[str] = ()) -> List[str]:
        """Names (``.base_layer`` dropped) of the floating parameters and buffers holding NaN or
        inf: branches, adapted layers' weights and biases, the head, the norms, the embeddings.
        ``skip``: module names left out (the merge checks their merged values instead)."""
        bad: List[str] = []
        for name, t in list(self.base_model.named_parameters()) + list(self.base_model.named_buffers()):
            if any(name.startswith(a + ".") for a in skip):
                continue
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(name.replace(".base_layer.", "."))
        return bad

    def merge_and_unload(self, safe_merge: bool = False) -> nn.Module:
        """The plain base model (e.g. ``ViTForImageClassification``) with merged weights.

        Trained biases, norms and ``modules_to_save`` stay as trained. This consumes the
        wrapper: the returned model is the wrapped one, with ``nn.Linear`` layers back.
        """
        return self._replace_layers(merge=True, safe_merge=safe_merge)

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """The untouched base model: branches removed, trained tensors restored."""
        model = self._replace_layers(merge=False)
        params = dict(model.named_parameters())
        for name, original in self._originals.items():
            params[name].copy_(original)
        return model

    # ------------------------------------------------------------------ storage
    def _adapter_tensors(self, consolidate: bool) -> Dict[str, torch.Tensor]:
        """What training changed, keyed by base-model module paths (:func:`adapter_tensors`)."""
        return adapter_tensors(self, consolidate)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *,
                        consolidate: bool = True) -> None:
        """Write ``consolidator_config.json`` and ``consolidator_model.safetensors``.

        With ``consolidate=True`` (stage 1 of the paper) each layer's branches are stored as
        one delta on the union of their supports, with branch biases folded into the
        layer bias; ``consolidate=False`` stores the raw branches (exact training state, for
        checkpoints). Frozen backbone tensors are never written.

        Config and weights are written as one unit (:func:`io.write_folder`): the folder is
        staged beside its place and swapped in, so it always holds a matching pair, the old or
        the new; other files already in the folder are kept (hard-linked into the stage).
        """
        tensors = self._adapter_tensors(consolidate)  # errors (merged, disabled) before any write
        with write_folder(save_directory, preserve_others=True) as stage:
            self.write_adapter_files(stage, consolidate, tensors)

    def write_adapter_files(self, directory: Union[str, os.PathLike], consolidate: bool = True,
                            tensors: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """The two adapter files written straight into ``directory`` (each atomically, not as
        a unit): for a folder the caller already stages, e.g. a Trainer checkpoint."""
        if tensors is None:
            tensors = self._adapter_tensors(consolidate)
        write_adapter_file(directory, tensors, self._model_type(), consolidated=consolidate)
        self.consolidator_config.save_pretrained(directory)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, path_or_repo: Union[str, os.PathLike], *,
        revision: Optional[str] = None, token: Optional[str] = None, is_trainable: bool = False,
    ) -> "ConsolidatorModel":
        """Wrap ``model`` with the adapter saved in a folder or Hub repo (stage 2 of the paper).

        A consolidated adapter is split back into the branches exactly, so the result gives
        the saved outputs. As in PEFT, the result is frozen and in eval mode unless
        ``is_trainable=True``, which applies the config's freezing policy to keep training.
        """
        config = ConsolidatorConfig.from_pretrained(path_or_repo, revision=revision, token=token)
        base_name = getattr(model, "name_or_path", None)
        if config.base_model_name_or_path and base_name and base_name != config.base_model_name_or_path:
            warnings.warn(f"adapter was trained on {config.base_model_name_or_path!r}, loading it "
                          f"onto {base_name!r}", stacklevel=2)
        path = resolve_file(path_or_repo, WEIGHTS_NAME, revision=revision, token=token)
        tensors, metadata = load_safetensors(path)
        wrapped = cls(model, config)
        wrapped.load_adapter_state(tensors, metadata, source=path)
        if not is_trainable:
            for p in wrapped.parameters():
                p.requires_grad_(False)
            wrapped.eval()
        return wrapped

    def _model_type(self) -> str:
        return getattr(getattr(self.base_model, "config", None), "model_type", "") or ""

    def load_adapter_state(self, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str],
                           source: str = "adapter") -> None:
        """Load tensors written by :meth:`save_pretrained`, either storage form
        (:func:`consolidator_hf.adapter_state.load_adapter_state`)."""
        load_adapter_state(self, tensors, metadata, source)
