"""SMT: what structured pruning must know about its mixed convs, grouped aggregation and attention heads."""
from __future__ import annotations

import math
from typing import List

import torch
from torch import nn

from compress.models.smt import SMT, Attention, LayerScale, MultiHeadMixedConv, ScaleAwareModulation
from compress.stages.families import FamilyRules, register_rules


# Torch-Pruning (tp) traces the model into a dependency graph and removes coupled channels together. What it must be
# told about SMT, per block:
# * MHMC: its kernels are assembled in `forward`, so tp cannot see them; a customized pruner slices the per-head
#   weights. Its channels are head-interleaved (c * num_heads + i = channel c of head i) and the fused conv needs all
#   heads equally wide, so channels can only go as whole proj0 groups (channel c of every head).
# * proj0 (W_intra) is grouped over exactly those groups. tp prunes a grouped conv only at the same in-group position
#   in every group. On its output side (W_intra's expansion -> BN -> proj1 inputs) that is valid and left to tp; on
#   its input side it would delete one MHMC head (a whole kernel scale) in every group, so the s -> MHMC -> proj0
#   group is kept out of tp's pass (the MHMC is in `ignored_layers`) and `_prune_sam_groups` removes whole proj0
#   groups right after it, through tp's own dependency graph, importance and pruners.
# * MSA: the k / v split is an unbind(0), which tp maps onto the two halves of kv, so q, k, v, the V conv and proj
#   stay aligned. `num_heads` is declared on q and on the V conv (each exactly num_heads x head_dim wide; kv is twice
#   that): dims are then pruned at the same positions in every head, or whole heads go (cfg.heads), and `num_heads`
#   is updated afterwards. tp derives head_dim from `out_features` of the first declared layer it meets, which is the
#   V conv: `pruning_spec` gives it that attribute for the duration of the pruning.
# * Stem, patch embeddings, LayerNorms, FFN (with its depthwise conv), the v -> (s-path * v) -> proj group and
#   layer-scale gammas (unwrapped parameters tp detects itself, dim 0) need nothing; the classifier keeps its outputs
#   (the stage's generic rule).

def _mhmc_pruner():
    """A `tp.pruner.function.BasePruningFunc` for MultiHeadMixedConv (created lazily: the model does not need tp)."""
    import torch_pruning as tp

    class MultiHeadMixedConvPruner(tp.pruner.function.BasePruningFunc):
        """Slices the per-head kernels. Indices are fused (head-interleaved) channels and must be whole groups.

        The MHMC is depthwise: its inputs and outputs are the same channels (`prune_in_channels` is
        `prune_out_channels`, which is how tp learns that they are coupled).
        """
        TARGET_MODULES = (MultiHeadMixedConv,)

        def prune_out_channels(self, layer: MultiHeadMixedConv, idxs: List[int]) -> MultiHeadMixedConv:
            h = layer.num_heads
            idxs = {int(i) for i in idxs}
            removed = {i // h for i in idxs}
            if idxs != {c * h + i for c in removed for i in range(h)}:
                raise ValueError(
                    f'MultiHeadMixedConv channels go in whole groups (channel c of all {h} heads, fused indices '
                    f'c * {h} + 0..{h - 1}); got {sorted(idxs)}')
            keep = [c for c in range(layer.local_conv_1.weight.shape[0]) if c not in removed]
            for conv in layer.head_convs():
                conv.weight = self._prune_parameter_and_grad(conv.weight, keep, 0)
                if conv.bias is not None:
                    conv.bias = self._prune_parameter_and_grad(conv.bias, keep, 0)
                conv.in_channels = conv.out_channels = conv.groups = len(keep)  # holders are never called
            return layer

        prune_in_channels = prune_out_channels

        def get_out_channels(self, layer: MultiHeadMixedConv) -> int:
            return layer.local_conv_1.weight.shape[0] * layer.num_heads

        get_in_channels = get_out_channels

    return MultiHeadMixedConvPruner()


def _prune_sam_groups(model: nn.Module, pruner) -> None:
    """Remove whole proj0 groups from every SAM mixer: s rows, channel c of every MHMC head, W_intra, BN, proj1 inputs.

    As many as tp removes elsewhere (the layer's target ratio; the kept width rounded down to `round_to`; a mixer that
    would lose every group is left whole), lowest first by the pruner's importance summed over both sides of a group
    (s / MHMC side and W_intra / BN / proj1 side). The ranking is per mixer, also with global pruning.
    """
    import torch_pruning as tp
    graph = pruner.DG
    for sam in [m for m in model.modules() if isinstance(m, ScaleAwareModulation)]:
        if any(m in pruner.ignored_layers for m in (sam.s, sam.proj0, sam.bn)):  # a recipe's `ignore`
            continue
        proj0 = sam.proj0
        groups = proj0.groups
        in_per_group, out_per_group = proj0.in_channels // groups, proj0.out_channels // groups
        keep = int(groups * (1 - pruner.get_target_pruning_ratio(sam.s)))
        if pruner.round_to:
            step = math.lcm(in_per_group, pruner.round_to) // in_per_group
            keep -= keep % step
        if keep <= 0 or keep >= groups:
            continue
        # the W_intra side is rooted at the BN: proj0's own root handler would turn depthwise-style once tp has left
        # one output per group (groups == out_channels)
        score = torch.zeros(groups)
        for root, fn, width in ((sam.s, tp.prune_linear_out_channels, in_per_group),
                                (sam.bn, tp.prune_batchnorm_out_channels, out_per_group)):
            group = graph.get_pruning_group(root, fn, list(range(groups * width)))
            imp = pruner.estimate_importance(group)
            if imp is not None:
                score += imp.detach().float().cpu().view(groups, width).mean(1)
        removed = sorted(torch.argsort(score)[:groups - keep].tolist())

        # 1) W_intra rows of the removed groups with BN and proj1's inputs: tp's own pruners
        out_idxs = [g * out_per_group + o for g in removed for o in range(out_per_group)]
        graph.get_pruning_group(sam.bn, tp.prune_batchnorm_out_channels, out_idxs).prune()
        # 2) s rows and the MHMC (customized pruner). tp's conv pruner would take proj0's inputs at one in-group
        #    position; here whole groups go, whose weights already left with their rows in 1), so only proj0's
        #    `in_channels` and `groups` change.
        in_idxs = [g * in_per_group + i for g in removed for i in range(in_per_group)]
        for dep, idxs in graph.get_pruning_group(sam.s, tp.prune_linear_out_channels, in_idxs):
            if dep.target.module is not proj0:
                dep(idxs)
        proj0.in_channels -= len(in_idxs)
        proj0.groups -= len(removed)
        assert proj0.weight.shape[:2] == (proj0.out_channels, proj0.in_channels // proj0.groups)


def _fix_attention_heads(model: nn.Module, pruner) -> None:
    for attn in model.modules():
        if isinstance(attn, Attention):
            attn.local_conv.__dict__.pop('out_features', None)  # the pruning-time hint of `pruning_spec`
            if attn.q in pruner.num_heads:
                attn.num_heads = pruner.num_heads[attn.q]


def pruning_spec(model: nn.Module):
    """What Torch-Pruning must be told about SMT (see the comment above). Call it on the model that is pruned."""
    from compress.stages.prune import PruningSpec  # the stage imports this package: import late
    sams = [m for m in model.modules() if isinstance(m, ScaleAwareModulation)]
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    for attn in attns:
        # tp reads head_dim as out_features // num_heads of the first declared layer it meets (here the V conv)
        attn.local_conv.out_features = attn.local_conv.out_channels
    spec = PruningSpec(
        ignored_layers=[sam.mhmc for sam in sams],
        num_heads={layer: attn.num_heads for attn in attns for layer in (attn.q, attn.local_conv)},
        customized_pruners={MultiHeadMixedConv: _mhmc_pruner()},
        after_prune=[_prune_sam_groups, _fix_attention_heads],
    )
    if sams:
        spec.notes += [
            'SAM: attn.mhmc is listed as ignored only for the Torch-Pruning pass, which prunes the grouped proj0 at '
            'one in-group position (= one MHMC kernel scale); whole proj0 groups (channel c of every MHMC head, s '
            'rows, W_intra, BN, proj1 inputs) are removed right after it, ranked per mixer',
            'SAM W_intra expansion (proj0 outputs at one in-group position in every group): Torch-Pruning 1.6 rounds '
            'that per-group count against the whole width, so with round_to it is usually kept whole',
        ]
    if attns:
        spec.notes.append('MSA: heads consistent in q, k, v, V conv and proj (num_heads on q and the V conv); '
                          'num_heads updated, head_dim read from the weights')
    if any(isinstance(m, LayerScale) for m in model.modules()):
        spec.notes.append('layer scale gammas: Torch-Pruning detects them as unwrapped parameters (dim 0)')
    return spec


register_rules(SMT, FamilyRules(pruning_spec=pruning_spec))
