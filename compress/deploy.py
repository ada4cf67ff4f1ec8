"""The deploy form of a model: the same function laid out for inference.

Blocks that can be re-parameterized (timm's convention: ``fuse()`` / ``reparameterize()`` /
``switch_to_deploy()``) are folded into the plain layers the quantizers and compilers know. The quantization
stages quantize this form, and float rows are timed in it too, so an int8 speedup measures quantization, not the
rewrite. How an artifact runs (compiled, OpenVINO) is the evaluator's business: :mod:`eval.runtimes`.
"""
from __future__ import annotations

import copy

from torch import nn

__all__ = ['deploy_form', 'has_deploy_form']


def has_deploy_form(model: nn.Module) -> bool:
    """Whether ``timm.utils.reparameterize_model`` changes ``model`` (some block has fuse/reparameterize)."""
    return any(hasattr(m, name) for m in model.modules() if m is not model
               for name in ('fuse', 'reparameterize', 'switch_to_deploy'))


def deploy_form(model: nn.Module) -> nn.Module:
    """The inference form of ``model``: a private copy in eval mode with every block's ``fuse()`` /
    ``reparameterize()`` applied (timm's ``reparameterize_model``; same function)."""
    from timm.utils.model import reparameterize_model
    return reparameterize_model(copy.deepcopy(model).eval(), inplace=True)  # the caller's model keeps its mode
