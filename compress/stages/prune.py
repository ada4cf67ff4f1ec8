"""Stage ``prune``: structured (physical) pruning with Torch-Pruning.

What to remove (the importance, chosen by name) stays apart from how much (``ratio`` or a ``target_macs`` that
is searched) — Torch-Pruning's own split. What a model family needs for its channels to stay consistent is
declared in :mod:`compress.stages.families`: ``pruning_spec(model) -> PruningSpec`` (layers that must keep their
width, heads, parameters Torch-Pruning cannot see, hooks that see each pruned group, fix-ups of attributes after
pruning), and ``pruning_form(model) -> model`` when an equivalent form of the model suits pruning better (SpaRTAN
prunes its deploy form, whose complex channel pairs are aligned halves). On top of that every model gets
the generic rules: the classifier keeps its outputs, and timm ``Attention`` blocks are pruned with a consistent
head structure and their ``num_heads`` / ``head_dim`` / ``scale`` updated afterwards.

The pruned model is a new architecture: it is carried on as a whole module (a fresh model cannot take its state
dict), and its params and MACs are measured again.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from compress.config import PruneStage
from compress.data import make_loader
from compress.deploy import deploy_form
from compress.stages.base import StageContext, StageResult
from compress.stages.families import rules_for
from eval.complexity import count_macs, count_params

__all__ = ['PruningSpec', 'IMPORTANCE_FACTORIES', 'pruning_spec', 'prune_model', 'search_ratio', 'apply_prune']

IMPORTANCE_FACTORIES: dict[str, Callable[[], tp.importance.Importance]] = {
    'magnitude': lambda: tp.importance.MagnitudeImportance(p=1),
    'group_norm': lambda: tp.importance.GroupMagnitudeImportance(p=2),
    'taylor': lambda: tp.importance.GroupTaylorImportance(),
    'lamp': lambda: tp.importance.LAMPImportance(p=2),
    'fpgm': lambda: tp.importance.FPGMImportance(p=2),
    'random': lambda: tp.importance.RandomImportance(),
}


@dataclass
class PruningSpec:
    """What Torch-Pruning must be told about a model (see the module docstring)."""
    ignored_layers: list[nn.Module] = field(default_factory=list)
    num_heads: dict[nn.Module, int] = field(default_factory=dict)
    unwrapped_parameters: dict[nn.Parameter, int] = field(default_factory=dict)
    customized_pruners: dict = field(default_factory=dict)
    in_channel_groups: dict[nn.Module, int] = field(default_factory=dict)
    out_channel_groups: dict[nn.Module, int] = field(default_factory=dict)
    after_prune: list[Callable[[nn.Module, tp.pruner.BasePruner], None]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # called with each group right before Torch-Pruning removes it (indices as they are at that moment)
    on_group: list[Callable[[tp.dependency.Group, tp.DependencyGraph], None]] = field(default_factory=list)

    def merge(self, other: PruningSpec) -> PruningSpec:
        return PruningSpec(
            self.ignored_layers + [m for m in other.ignored_layers if m not in self.ignored_layers],
            {**self.num_heads, **other.num_heads}, {**self.unwrapped_parameters, **other.unwrapped_parameters},
            {**self.customized_pruners, **other.customized_pruners},
            {**self.in_channel_groups, **other.in_channel_groups},
            {**self.out_channel_groups, **other.out_channel_groups},
            self.after_prune + other.after_prune, self.notes + other.notes, self.on_group + other.on_group,
        )


def _fix_timm_attention(model: nn.Module, pruner: tp.pruner.BasePruner) -> None:
    from timm.layers import Attention
    for module in model.modules():
        if isinstance(module, Attention) and module.qkv in pruner.num_heads:
            module.num_heads = pruner.num_heads[module.qkv]
            module.head_dim = module.qkv.out_features // (3 * module.num_heads)
            module.attn_dim = module.num_heads * module.head_dim
            module.scale = module.head_dim ** -0.5


def _generic_spec(model: nn.Module) -> PruningSpec:
    from timm.layers import Attention
    spec = PruningSpec()
    classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if isinstance(classifier, nn.Module):
        spec.ignored_layers.append(classifier)
        spec.notes.append('classifier keeps its outputs')
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    if attentions:
        spec.num_heads = {m.qkv: m.num_heads for m in attentions}
        spec.after_prune.append(_fix_timm_attention)
    return spec


def pruning_spec(model: nn.Module, ignore: list[str] = ()) -> PruningSpec:
    """The generic rules, the model family's own ``pruning_spec`` if it has one, and the recipe's ``ignore``."""
    spec = _generic_spec(model)
    family_spec = rules_for(model).pruning_spec
    if family_spec is not None:
        spec = spec.merge(family_spec(model))
    for name, sub in model.named_modules():
        if name and any(name == prefix or name.startswith(prefix + '.') for prefix in ignore):
            if isinstance(sub, (nn.Conv2d, nn.Linear)) and sub not in spec.ignored_layers:
                spec.ignored_layers.append(sub)
    return spec


def _accumulate_taylor_gradients(model: nn.Module, batches) -> None:
    model.zero_grad()
    loss_fn = nn.CrossEntropyLoss()
    for images, labels in batches:
        loss_fn(model(images), labels).backward()


def prune_model(model: nn.Module, cfg: PruneStage, ratio: float, example: torch.Tensor,
                grad_batches=None) -> tuple[nn.Module, PruningSpec]:
    """Prune a copy of ``model`` at one channel ratio; returns the pruned copy and the spec that was used."""
    model = copy.deepcopy(model).eval()
    pruning_form = rules_for(model).pruning_form
    if pruning_form is not None:
        model = pruning_form(model)
    spec = pruning_spec(model, cfg.ignore)
    pruner = tp.pruner.BasePruner(
        model, example, importance=IMPORTANCE_FACTORIES[cfg.importance](), pruning_ratio=ratio,
        global_pruning=cfg.global_pruning, round_to=cfg.round_to, ignored_layers=spec.ignored_layers,
        num_heads=spec.num_heads, prune_num_heads=cfg.heads == 'heads', prune_head_dims=cfg.heads == 'dims',
        head_pruning_ratio=ratio if cfg.heads == 'heads' else 0.0,
        # Torch-Pruning 1.6 takes (parameter, pruned dim) pairs
        unwrapped_parameters=list(spec.unwrapped_parameters.items()) or None,
        customized_pruners=spec.customized_pruners or None,
        in_channel_groups=spec.in_channel_groups, out_channel_groups=spec.out_channel_groups,
    )
    if cfg.importance == 'taylor':
        _accumulate_taylor_gradients(model, grad_batches)
    for group in pruner.step(interactive=True):
        for hook in spec.on_group:
            hook(group, pruner.DG)
        group.prune()
    for fix in spec.after_prune:
        fix(model, pruner)
    model.zero_grad(set_to_none=True)
    _widths_from_outputs(model.eval(), example)
    return model, spec


def _widths_from_outputs(model: nn.Module, example: torch.Tensor) -> None:
    """timm's width attributes (``feature_info`` channels, ``num_features``, ``head_hidden_size``; read by
    ``reset_classifier``, ``features_only`` and distillation) set from what the pruned model outputs, so that no
    family needs to know where its widths live."""
    if not (hasattr(model, 'forward_intermediates') and isinstance(getattr(model, 'feature_info', None), list)):
        return
    with torch.no_grad():
        intermediates = model.forward_intermediates(example[:1], intermediates_only=True)
        features = model.forward_features(example[:1])
        pre_logits = model.forward_head(features, pre_logits=True)
    if len(intermediates) == len(model.feature_info):
        for info, output in zip(model.feature_info, intermediates):
            info['num_chs'] = output.shape[1]
    model.num_features = features.shape[1] if features.ndim == 4 else features.shape[-1]
    if hasattr(model, 'head_hidden_size'):
        model.head_hidden_size = pre_logits.shape[-1] if pre_logits.ndim == 2 else pre_logits.shape[1]


def search_ratio(model, cfg, example, grad_batches, input_size, macs_before) -> tuple[nn.Module, float, PruningSpec]:
    """Bisect the channel ratio until the pruned model keeps ``target_macs`` of the MACs (within 1 %)."""
    low, high, best = 0.0, 0.95, None
    for _ in range(12):
        ratio = (low + high) / 2
        pruned, spec = prune_model(model, cfg, ratio, example, grad_batches)
        kept = count_macs(pruned, input_size) / macs_before
        if best is None or abs(kept - cfg.target_macs) < abs(best[3] - cfg.target_macs):
            best = (pruned, ratio, spec, kept)
        if abs(kept - cfg.target_macs) < 0.01:
            break
        low, high = (ratio, high) if kept > cfg.target_macs else (low, ratio)
    return best[0], best[1], best[2]


def apply_prune(cfg: PruneStage, model: nn.Module, ctx: StageContext) -> list[StageResult]:
    start = time.perf_counter()
    example = torch.randn(2, *ctx.input_size)
    grad_batches = None
    if cfg.importance == 'taylor':
        source = ctx.data.train or ctx.data.calib
        loader = make_loader(source, ctx.data_cfg.batch_size, ctx.data_cfg.workers, shuffle=True, seed=ctx.seed)
        grad_batches = []
        for images, labels, _ in loader:
            grad_batches.append((images, labels))
            if len(grad_batches) == cfg.importance_batches:
                break
    macs_before, params_before = count_macs(model, ctx.input_size), count_params(model)
    if cfg.ratio is not None:
        pruned, spec = prune_model(model, cfg, cfg.ratio, example, grad_batches)
        ratio = cfg.ratio
    else:
        pruned, ratio, spec = search_ratio(model, cfg, example, grad_batches, ctx.input_size, macs_before)
    macs_after, params_after = count_macs(pruned, ctx.input_size), count_params(pruned)
    info = {
        'importance': cfg.importance, 'channel_ratio': round(ratio, 4), 'global': cfg.global_pruning,
        'macs_kept': round(macs_after / macs_before, 4), 'params_kept': round(params_after / params_before, 4),
        'not_pruned': [name for name, m in pruned.named_modules() if m in _ignored_in(pruned, spec)],
        'rules': spec.notes,
    }
    notes = [f'{cfg.importance} importance, channel ratio {ratio:.3f}: MACs x{macs_after / macs_before:.3f}, '
             f'params x{params_after / params_before:.3f}'] + spec.notes
    return [StageResult(name='prune', kind='prune', artifact=deploy_form(pruned), float_model=pruned,
                        next_model=pruned, seconds=time.perf_counter() - start, info=info, notes=notes)]


def _ignored_in(pruned: nn.Module, spec: PruningSpec) -> list[nn.Module]:
    # the spec was built on the copy that became ``pruned``, so its modules are pruned's own
    owned = {id(m) for m in pruned.modules()}
    return [m for m in spec.ignored_layers if id(m) in owned]
