"""MAT: what structured pruning must know about its Bilinear PE, window attention and abstract-token mixing, and how
NNCF quantizes it."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from compress.models.mat import MAT, BilinearPatchEmbed, MATAttention
from compress.stages.families import FamilyRules, register_rules

# Torch-Pruning (tp) traces the model into a dependency graph and removes coupled channels together. What it must be
# told about MAT, per block:
# * Bilinear PE: `grid_sample` reads the offset head's two outputs (dx, dy) as sampling positions shared by every
#   channel, but tp takes it for an element-wise op and couples them with the feature channels, which made the whole
#   residual stream before each PE one group of width 2 rooted at its offset head. The PE is therefore one customized
#   layer: its inputs are the feature channels (depthwise offset conv, offset-head and proj inputs), its outputs the
#   proj rows and BN; the offset head keeps its two outputs. tp's own conv / BN pruners do the slicing.
# * Window attention: q, k, v, the fusion's k_a / v_a (`fuse_kv`) and `proj` inputs are one head-structured space;
#   `num_heads` is declared on qkv and on fuse_kv (this group is rooted at fuse_kv, and tp only re-roots an attention
#   group found from a declared layer), so dims go at the same positions in every head. The model splits q / k / v
#   before the head reshape, so that each unbind output has one reader: tp cuts an unbind into as many chunks as it
#   has readers, and q (read by the window attention and the fusion) made four chunks of qkv (the IndexError).
# * Abstract-token mixing: `mix_qkv` has its own heads (`num_heads` declared), the mixing attention reads the
#   head-concatenated window output. Its output width (`mix_proj` out -> `fuse_kv` in) is a free group, but tp 1.6
#   names local ranking scopes after a group's root module and the mixing group, re-rooted at `mix_proj`, takes that
#   scope: `_prune_mixing_width` prunes it right after, through tp's graph, importance and pruners.
# * Abstract tokens are unwrapped parameters on the channel dim (2); their concat runs along tokens, which tp
#   leaves unmapped for 3-D parameters (its ViT cls-token rule). The relative-position bias tables are indexed by
#   head, not channel (tp's default dim would cut heads at channel positions): they are ignored parameters; heads
#   stay, so they stay whole.
# * Whole heads cannot go (heads='heads'): the window and mixing attentions share `num_heads`, which tp would cut
#   per group, and tp takes the head width from fuse_kv (2 x head_dim). Stem, MLPs, norms and the pre-logits layer
#   need nothing; the classifier keeps its outputs (the stage's generic rule).


def _bilinear_pe_pruner():
    """A `tp.pruner.function.BasePruningFunc` for BilinearPatchEmbed (created lazily: the model does not need tp)."""
    import torch_pruning as tp

    class BilinearPatchEmbedPruner(tp.pruner.function.BasePruningFunc):
        """Inputs: feature channels (offset_dw, offset_head and proj inputs). Outputs: proj rows and BN."""
        TARGET_MODULES = (BilinearPatchEmbed,)

        def prune_in_channels(self, layer: BilinearPatchEmbed, idxs: List[int]) -> BilinearPatchEmbed:
            tp.prune_depthwise_conv_out_channels(layer.offset_dw, idxs)
            tp.prune_conv_in_channels(layer.offset_head, idxs)
            tp.prune_conv_in_channels(layer.proj, idxs)
            return layer

        def prune_out_channels(self, layer: BilinearPatchEmbed, idxs: List[int]) -> BilinearPatchEmbed:
            tp.prune_conv_out_channels(layer.proj, idxs)
            tp.prune_batchnorm_out_channels(layer.norm, idxs)
            return layer

        def get_in_channels(self, layer: BilinearPatchEmbed) -> int:
            return layer.proj.in_channels

        def get_out_channels(self, layer: BilinearPatchEmbed) -> int:
            return layer.proj.out_channels

    return BilinearPatchEmbedPruner()


def _mixers(model: nn.Module) -> list[MATAttention]:
    return [m for m in model.modules() if isinstance(m, MATAttention) and m.abstract_token is not None]


def _prune_mixing_width(model: nn.Module, pruner) -> None:
    """Prune each mixing output width (mix_proj rows, fuse_kv inputs) as tp's local pass would have.

    tp's count (the layer's target ratio, the kept width rounded down to `round_to`), lowest importance first. With
    global pruning the group is ranked with all others by tp itself and left alone here.
    """
    import torch_pruning as tp
    if pruner.global_pruning:
        return
    for attn in _mixers(model):
        layer = attn.mix_proj
        if layer in pruner.ignored_layers or attn.fuse_kv in pruner.ignored_layers:  # a recipe's `ignore`
            continue
        width = layer.out_features
        keep = int(width * (1 - pruner.get_target_pruning_ratio(layer)))
        if pruner.round_to:
            keep -= keep % pruner.round_to
        if keep <= 0 or keep >= width:
            continue
        group = pruner.DG.get_pruning_group(layer, tp.prune_linear_out_channels, list(range(width)))
        imp = pruner.estimate_importance(group)
        if imp is None:
            continue
        removed = sorted(torch.argsort(imp.detach().cpu())[:width - keep].tolist())
        pruner.DG.get_pruning_group(layer, tp.prune_linear_out_channels, removed).prune()


def _refuse_whole_heads(model: nn.Module, pruner) -> None:
    if pruner.prune_num_heads and any(isinstance(m, MATAttention) for m in model.modules()):
        raise ValueError("MAT: whole attention heads cannot be pruned (heads='heads'): the window and mixing "
                         "attentions share num_heads; prune head dims (heads='dims') or keep them (heads='none')")


def pruning_spec(model: nn.Module):
    """What Torch-Pruning must be told about MAT (see the comment above). Call it on the model that is pruned."""
    from compress.stages.prune import PruningSpec  # the stage imports this package: import late
    attns = [m for m in model.modules() if isinstance(m, MATAttention)]
    mixers = _mixers(model)
    spec = PruningSpec(
        num_heads={layer: a.num_heads for a in attns for layer in (a.qkv, getattr(a, 'fuse_kv', None),
                                                                   getattr(a, 'mix_qkv', None)) if layer is not None},
        unwrapped_parameters={a.abstract_token: 2 for a in mixers},
        customized_pruners={BilinearPatchEmbed: _bilinear_pe_pruner()},
        after_prune=[_prune_mixing_width, _refuse_whole_heads],
    )
    tables = [a.relative_position_bias_table for a in attns if a.relative_position_bias_table is not None]
    spec.unwrapped_parameters.update({table: 1 for table in tables})
    spec.ignored_layers += tables  # nn.Parameters: tp leaves them whole
    if any(isinstance(m, BilinearPatchEmbed) for m in model.modules()):
        spec.notes.append('Bilinear PE: one customized layer (feature channels in, proj / BN out); the offset head '
                          'keeps its two outputs (sampling offsets shared by all channels)')
    if attns:
        spec.notes.append('attention: head dims at the same positions in every head of q, k, v, fuse_kv and proj '
                          '(and of the mixing q, k, v); heads and relative-position bias tables kept whole')
    if mixers:
        spec.notes.append('abstract tokens pruned with the stream; mixing output width (mix_proj -> fuse_kv) pruned '
                          'right after tp\'s pass (tp 1.6 gives its local ranking scope to the mixing heads)')
    return spec


# NNCF -> OpenVINO on MAT (a transformer to NNCF: it runs SDPA). Two of NNCF's transformer defaults cost the CPU
# plugin time on MAT: the mixed preset's asymmetric activations leave zero-point subtractions as separate ops, and
# SmoothQuant's per-channel scales stay separate multiplies in front of the MLP and attention matmuls; hence
# symmetric activations (performance preset) and no SmoothQuant. The int8 attention (SDPA) stays: float SDPA was
# slower.
register_rules(MAT, FamilyRules(pruning_spec=pruning_spec, nncf_preset='performance', nncf_smooth_quant=False))
