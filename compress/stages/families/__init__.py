"""What the stages must know about a model family, declared here so that model files hold architecture only.

A family's rules (:class:`FamilyRules`) say how it is pruned (``pruning_form``: an equivalent form that prunes
better; ``pruning_spec``: what Torch-Pruning cannot see), what NNCF must leave in float (``nncf_ignored_scope``:
node-name patterns of the OpenVINO model) and how NNCF quantizes the rest where its defaults for the model type
cost speed (``nncf_preset``: 'performance' or 'mixed'; ``nncf_smooth_quant``: False turns SmoothQuant off).
:func:`rules_for` finds them by the model's class; a model without rules gets the generic ones (nothing extra).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

__all__ = ['FamilyRules', 'rules_for', 'register_rules']


@dataclass(frozen=True)
class FamilyRules:
    pruning_form: Callable[[nn.Module], nn.Module] | None = None
    pruning_spec: Callable[[nn.Module], object] | None = None   # -> compress.stages.prune.PruningSpec
    nncf_ignored_scope: tuple[str, ...] = field(default_factory=tuple)
    nncf_preset: str | None = None            # None: NNCF's default for the model type
    nncf_smooth_quant: bool | None = None     # None: NNCF's default for the model type


_RULES: dict[type, FamilyRules] = {}


def register_rules(model_class: type, rules: FamilyRules) -> None:
    _RULES[model_class] = rules


def rules_for(model: nn.Module) -> FamilyRules:
    """The rules of the model's family (its class or a base class), or the empty rules."""
    for cls in type(model).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return FamilyRules()


# the families with rules register them on import
from compress.stages.families import (  # noqa: E402,F401
    emsnet, mat, partialformer, resnet_cifar, s2aformer, smt, spartan,
)
