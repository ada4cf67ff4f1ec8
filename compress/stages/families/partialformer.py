"""PartialFormer: what structured pruning must know about its partial attention (head-mixing MLP, abstract token)."""
from __future__ import annotations

from typing import List

from torch import nn

from compress.models.partialformer import HeadMLP, PartialAttention, PartialFormer
from compress.stages.families import FamilyRules, register_rules

# Torch-Pruning (tp) traces the model into a dependency graph and removes coupled channels together. What it must be
# told about PartialFormer, per block:
# * Shared qkv: q / k / v must lose the same positions in every head, and `proj` and the ChannelMLP's fc1 (both read
#   head-concatenated outputs) the same ones; `num_heads` is declared on qkv. The model splits q / k / v with an
#   unbind of a leading dim whose outputs have one reader each (tp cuts an unbind into as many chunks as readers):
#   the former `chunk(3, -1)` was a split, and tp switches the index mapping of every split downstream of a 3-D
#   parameter off (its ViT cls-token rule; the abstract tokens are 3-D), so qkv's 3d row indices reached proj /
#   fc1 unmapped (the IndexError "index 8").
# * HeadMLP (eq 5.5) is a pair of Linears over the head axis of the attention logits; traced as Linears they became
#   part of the channel group (their h inputs indexed by channels). A customized pruner makes it a pass-through:
#   channel indices travel through the logits as they do through q k^T, and the head count it mixes stays. When
#   whole heads go (heads='heads'), `_track_heads` removes those heads from its FCs and `num_heads` is updated.
# * Abstract tokens are unwrapped parameters on the channel dim (2), pruned with the residual stream (they enter
#   the shared qkv); their MMSA concat runs along tokens.
# * Stem, patch embeddings, PEG depthwise convs, LayerNorms, MLPs, the ChannelMLP hidden width (with its LayerNorm)
#   and the pre-logits layer need nothing; the classifier keeps its outputs (the stage's generic rule).


def _head_mlp_pruner():
    """A `tp.pruner.function.BasePruningFunc` for HeadMLP (created lazily: the model does not need tp)."""
    import torch_pruning as tp

    class HeadMLPPruner(tp.pruner.function.BasePruningFunc):
        """Channel indices pass through (an element-wise op for tp): HeadMLP mixes heads, it has no channels."""
        TARGET_MODULES = (HeadMLP,)

        def prune_out_channels(self, layer: HeadMLP, idxs: List[int]) -> HeadMLP:
            return layer

        prune_in_channels = prune_out_channels  # in and out are the same channels: the group goes on through it

        def get_out_channels(self, layer: HeadMLP) -> None:
            return None

        get_in_channels = get_out_channels

    return HeadMLPPruner()


def _track_heads(group, graph) -> None:
    """Remove the heads a group takes whole (heads='heads') from the HeadMLP of their attention."""
    import torch_pruning as tp
    owners = {m.qkv: m for m in graph.model.modules() if isinstance(m, PartialAttention)}
    for dep, idxs in group.items:
        attn = owners.get(dep.target.module)
        if attn is None or not graph.is_out_channel_pruning_fn(dep.handler):
            continue
        width = attn.qkv.out_features // 3
        head_dim = width // attn.num_heads
        gone = set(tp._helpers.to_plain_idxs(idxs))
        heads = [h for h in range(attn.num_heads) if all(h * head_dim + i in gone for i in range(head_dim))]
        if heads:
            tp.prune_linear_in_channels(attn.head_mlp.expand, heads)
            tp.prune_linear_out_channels(attn.head_mlp.reduce, heads)
            attn.num_heads -= len(heads)


def pruning_spec(model: nn.Module):
    """What Torch-Pruning must be told about PartialFormer (see the comment above). Call it on the model pruned."""
    from compress.stages.prune import PruningSpec  # the stage imports this package: import late
    attns = [m for m in model.modules() if isinstance(m, PartialAttention)]
    spec = PruningSpec(
        num_heads={a.qkv: a.num_heads for a in attns},
        unwrapped_parameters={a.abstract_token: 2 for a in attns if a.abstract_token is not None},
        customized_pruners={HeadMLP: _head_mlp_pruner()},
        on_group=[_track_heads],
    )
    if attns:
        spec.notes += [
            'partial attention: head dims at the same positions in every head of q, k, v, proj and ChannelMLP fc1; '
            'HeadMLP passes channels through (it mixes heads: kept whole unless whole heads go)',
            'abstract tokens pruned with the residual stream (unwrapped parameters, dim 2)',
        ]
    return spec


register_rules(PartialFormer, FamilyRules(pruning_spec=pruning_spec))
