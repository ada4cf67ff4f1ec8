"""S2AFormer: what structured pruning must know about its strip attention and its twin classifier."""
from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from compress.models.s2aformer import LocalInteraction, S2AFormer, StripAttention
from compress.stages.families import FamilyRules, register_rules


# Torch-Pruning (tp) traces the model into a dependency graph and removes coupled channels together. What it must be
# told about S2AFormer, per block:
# * SSA (StripAttention): q and k emit one scalar per head (Linear(C, h)), v keeps C / h channels per head, and
#   `softmax(q k^T) v` meets them in batched matmuls. tp reads those matmuls (bmm behind views and expands) as
#   element-wise ops, so it couples the h q / k outputs with the C value channels, and its reshape rule turns each
#   view between them into a flatten of stride C / h; chained over the attention the index lists multiply until the
#   allocation fails (the MemoryError of an unmodified run). So the attention is one customized layer: tp sees only
#   the residual channels it reads (q, k, v inputs; the depthwise K/V reduction `sr` and its LayerNorm) and writes
#   (proj outputs). The head structure is pruned right after tp's pass (`_prune_value_dims`): v rows and proj
#   columns through tp's own dependency graph, importance and pruners, the same positions in every head
#   (cfg.heads 'dims'; q and k stay, one scalar per head) or whole heads with their q / k rows (cfg.heads 'heads').
# * LIM: its pointwise convs are grouped (2 and 4), so the residual stream of a stage (pw1 inputs, pw2 outputs) and
#   the LIM width (pw1 outputs, DW, SE, pw2 inputs) can only lose the same in-group positions in all 4 groups (tp's
#   grouped-conv pruner takes one set of in-group positions for every group). tp detects the groups, but 1.6 rounds
#   the per-group count against the whole width: with round_to 8 a 32-wide stream is never pruned and a 48-wide one
#   loses two thirds at ratio 0.3. So pw1 / pw2 are listed as ignored for tp's pass, which keeps those groups
#   whole, and `_prune_grouped_streams` prunes them right after through tp's own dependency graph, importance and
#   pruners, with the kept width (4 x per-group count) rounded to `round_to`.
# * Stem, patch embeddings, depthwise position convs, LayerNorms, the SE of the LIM, the MLP and the 1x1 head conv
#   need nothing. The two classifiers (`get_classifier` returns both, so the stage's generic rule misses them) keep
#   their outputs.

def _strip_attention_pruner():
    """A `tp.pruner.function.BasePruningFunc` for StripAttention (created lazily: the model does not need tp)."""
    import torch_pruning as tp

    class StripAttentionPruner(tp.pruner.function.BasePruningFunc):
        """Residual channels only: inputs = what q, k, v, sr and its norm read, outputs = proj rows."""
        TARGET_MODULES = (StripAttention,)

        def prune_in_channels(self, layer: StripAttention, idxs: list[int]) -> StripAttention:
            idxs = list(idxs)
            for fc in (layer.q, layer.k, layer.v):
                tp.prune_linear_in_channels(fc, idxs)
            if layer.sr is not None:
                tp.prune_depthwise_conv_out_channels(layer.sr, idxs)
                tp.prune_layernorm_out_channels(layer.norm, idxs)
            return layer

        def prune_out_channels(self, layer: StripAttention, idxs: list[int]) -> StripAttention:
            tp.prune_linear_out_channels(layer.proj, list(idxs))
            return layer

        def get_in_channels(self, layer: StripAttention) -> int:
            return layer.q.in_features

        def get_out_channels(self, layer: StripAttention) -> int:
            return layer.proj.out_features

    return StripAttentionPruner()


def _prune_value_dims(model: nn.Module, pruner) -> None:
    """Prune every strip attention's heads: v rows with proj columns, head-consistent (see the comment above).

    As many as tp removes elsewhere: the layer's target ratio of each head's dims, the kept width (h x dims) rounded
    down to `round_to` but never to zero; in 'heads' mode ceil(head ratio x h) whole heads, at least one kept. Ranked
    per attention by the pruner's importance over v rows and proj columns (also with global pruning).
    """
    import torch_pruning as tp
    for attn in [m for m in model.modules() if isinstance(m, StripAttention)]:
        if any(m in pruner.ignored_layers for m in (attn.q, attn.k, attn.v, attn.proj)):  # a recipe's `ignore`
            continue
        h, width = attn.num_heads, attn.v.out_features
        d = width // h
        wrapper = nn.Sequential(attn.v, attn.proj)  # the same modules: pruned in place
        graph = tp.DependencyGraph().build_dependency(
            wrapper, torch.zeros(1, attn.v.in_features, dtype=attn.v.weight.dtype, device=attn.v.weight.device),
            verbose=False)
        imp = pruner.estimate_importance(graph.get_pruning_group(attn.v, tp.prune_linear_out_channels,
                                                                 list(range(width))))
        if imp is None:
            continue
        imp = imp.detach().float().cpu().view(h, d)
        if pruner.prune_num_heads:
            removed = min(math.ceil(pruner.get_target_head_pruning_ratio(attn.v) * h), h - 1)
            if removed <= 0:
                continue
            heads = sorted(torch.argsort(imp.mean(1))[:removed].tolist())
            idxs = [j * d + i for j in heads for i in range(d)]
            for fc in (attn.q, attn.k):
                tp.prune_linear_out_channels(fc, heads)
            attn.num_heads = h - removed
        elif pruner.prune_head_dims:
            keep = int(d * (1 - pruner.get_target_pruning_ratio(attn.v)))
            if pruner.round_to:
                step = math.lcm(h, pruner.round_to) // h
                keep = max(keep - keep % step, step)
            if keep >= d:
                continue
            dims = sorted(torch.argsort(imp.mean(0))[:d - keep].tolist())
            idxs = [j * d + i for j in range(h) for i in dims]
        else:
            continue
        graph.get_pruning_group(attn.v, tp.prune_linear_out_channels, idxs).prune()


def _grouped_roots(model: nn.Module) -> list[tuple[nn.Conv2d, int]]:
    """(root conv, groups) of every width tied to the LIM's conv groups: each stage's residual stream, each LIM width.
    A width goes at the same positions in lcm(pw1 groups, pw2 groups) parts, which satisfies both convs."""
    roots = []
    for stage in model.stages:
        lims = [m for m in stage.modules() if isinstance(m, LocalInteraction)]
        if lims:
            roots.append((stage.downsample.proj, math.lcm(*(c.groups for lim in lims for c in (lim.pw1, lim.pw2)))))
        roots += [(lim.pw1, math.lcm(lim.pw1.groups, lim.pw2.groups)) for lim in lims]
    return roots


def _prune_grouped_streams(model: nn.Module, pruner, held: set[nn.Module]) -> None:
    """Prune the residual streams and LIM widths that tp's pass left whole (`held`: see the comment above).

    As many as tp removes elsewhere: the root's target ratio of each group's positions, the kept width rounded down
    to `round_to` but never to zero; the same positions in every group, lowest first by the pruner's importance
    averaged over the groups (tp's own rule for grouped channels). The ranking is per group, also with global pruning.
    """
    import torch_pruning as tp
    graph = pruner.DG
    ignored = {m for m in pruner.ignored_layers if m not in held}  # a recipe's `ignore`, the classifiers
    for root, groups in _grouped_roots(model):
        width = root.out_channels
        full = graph.get_pruning_group(root, tp.prune_conv_out_channels, list(range(width)))
        if any(dep.target.module in ignored and graph.is_out_channel_pruning_fn(dep.handler) for dep, _ in full):
            continue
        per_group = width // groups
        keep = int(per_group * (1 - pruner.get_target_pruning_ratio(root)))
        if pruner.round_to:
            step = math.lcm(groups, pruner.round_to) // groups
            keep = max(keep - keep % step, step)
        imp = pruner.estimate_importance(full)
        if keep >= per_group or imp is None:
            continue
        positions = torch.argsort(imp.detach().float().cpu().view(groups, per_group).mean(0))[:per_group - keep]
        idxs = sorted(g * per_group + i for g in range(groups) for i in positions.tolist())
        group = graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs)
        if graph.check_pruning_group(group):
            group.prune()


def pruning_spec(model: nn.Module):
    """What Torch-Pruning must be told about S2AFormer (see the comment above). Call it on the model that is pruned."""
    from compress.stages.prune import PruningSpec  # the stage imports this package: import late
    classifiers = [m for m in (getattr(model, 'head', None), getattr(model, 'head_dist', None))
                   if isinstance(m, nn.Linear)]
    held = [conv for lim in model.modules() if isinstance(lim, LocalInteraction) for conv in (lim.pw1, lim.pw2)]
    spec = PruningSpec(
        ignored_layers=classifiers + held,
        customized_pruners={StripAttention: _strip_attention_pruner()},
        after_prune=[_prune_value_dims, partial(_prune_grouped_streams, held=set(held))],
    )
    if classifiers:
        spec.notes.append('both classifiers (head, head_dist) keep their outputs')
    if any(isinstance(m, StripAttention) for m in model.modules()):
        spec.notes += [
            'SSA: Torch-Pruning sees each strip attention as one layer (its residual inputs and proj outputs); v / '
            'proj head dims are pruned right after, the same in every head, ranked per attention; q / k keep one '
            'scalar per head (whole heads go only with heads: heads)',
            'SSA: q / k / v / proj weights take no part in ranking residual channels',
        ]
    if held:
        spec.notes.append('LIM: pw1 / pw2 are listed as ignored only for the Torch-Pruning pass (it rounds grouped '
                          'counts against the whole width); the residual streams and LIM widths they tie to 4 groups '
                          'are pruned right after, the same positions in every group, ranked per group')
    return spec


register_rules(S2AFormer, FamilyRules(pruning_spec=pruning_spec))
