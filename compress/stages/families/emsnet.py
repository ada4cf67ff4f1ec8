"""EMSNet: what structured pruning must know about its channel splits and its two attentions."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from compress.models.emsnet import ConvAttention, EMSNet, GlobalAttention, MultiScaleInteraction, StaticOperator
from compress.stages.families import FamilyRules, register_rules


# Torch-Pruning (tp) traces the model into a dependency graph and removes coupled channels together. What it must be
# told about EMSNet, per block:
# * MSI split: the block's channels are sliced into a static part (3/4) and two dynamic halves (1/8 each); every
#   block of a stage slices its residual stream at the same places. tp maps channel slices onto their consumers by
#   their bounds, so the model slices with non-negative bounds read from the weights (tp 1.6 takes a negative bound
#   for a huge unsigned one) and a pruned split needs no attribute update. But tp ranks the stream's channels as
#   one set and may pick every channel of a 1/8 slice, which it cannot remove, so it then keeps the whole stream.
#   So the kept width is shared out over the slices in proportion to their widths (a pruned block keeps about
#   C_s : C_d = 3 : 1 and equal halves), ranked within each slice. Declared as channel groups (the same positions in
#   every 1/8) tp would keep the proportion, but 1.6 rounds the per-group count against the whole width (with
#   round_to 8 a 32-wide stream loses all or nothing), and a 1/8 grain is coarse for MAC targets. So the stream's
#   producer (stem conv2 / downsample conv) is listed as ignored for tp's pass and `_prune_split_widths` prunes the
#   stream right after, through tp's own dependency graph, importance and pruners.
# * Static operator: the DWConv output is sliced 1/4 : 1/2 : 1/4 and concatenated again with the pass-through half.
#   tp infers the width of a concat input from the nearest layer upstream, which for a slice is the whole DWConv,
#   so the sum misses the concat width and tp drops the concat's index mapping (every channel behind it would be
#   misaligned). The pruning form (`pruning_form`) puts an exact identity with a width into the model's
#   `pass_through` slot: a PReLU of slope 1 per channel, which tp prunes with its channels and which takes no part in
#   importance (not a conv / linear / norm); it is taken out again after pruning. This width (whiten outputs, DWConv,
#   the three slices) is pruned like the stream, shared out 1 : 2 : 1 (a quarter slice cannot be emptied),
#   `whiten` held out of tp's pass. Rooting it at `whiten` also matters: tp's importance skips depthwise convs and
#   sizes its sum by the first layer it counts, so a group rooted at the DWConv (where tp would root it) fails on a
#   quarter slice's consumer.
# * C-MHSA (ConvAttention): M emits k^2 x k^2 attention logits per head and window (81 h channels, not features),
#   and N's values are unfolded into the same windows. tp reads the window product as element-wise, which would
#   couple M's logits with the value channels (and a 5-D matmul records a broadcast that tp 1.6 takes for a
#   grouped-query repeat and divides by zero on; the model runs it as a 3-D bmm). So the attention is one customized
#   layer: its inputs are what the depthwise shrink conv, M and N read, its outputs N's rows, in `num_heads` equal
#   groups (the value reshape splits them by head). M's outputs stay whole.
# * G-MHSA (GlobalAttention): qkv -> reshape -> unbind -> SDPA -> proj, as in timm's Attention: `num_heads` is
#   declared on qkv (dims pruned at the same positions in every head, or whole heads with cfg.heads), the reshapes
#   read widths from the weights, and `num_heads` is updated afterwards from the widths (tp 1.6 also counts down
#   the heads of a group it then declines to prune).
# * Stem conv1, the MLP, the PE convs, the coordinate and Prop depthwise convs, the fusion convs and the BatchNorms
#   need nothing; the classifier keeps its outputs (the stage's generic rule).

def _conv_attention_pruner():
    """A `tp.pruner.function.BasePruningFunc` for ConvAttention (created lazily: the model does not need tp)."""
    import torch_pruning as tp

    class ConvAttentionPruner(tp.pruner.function.BasePruningFunc):
        """Inputs: shrink (depthwise), M and N read them. Outputs: N's rows, `num_heads` equal groups."""
        TARGET_MODULES = (ConvAttention,)

        def prune_in_channels(self, layer: ConvAttention, idxs: list[int]) -> ConvAttention:
            idxs = list(idxs)
            tp.prune_depthwise_conv_out_channels(layer.shrink, idxs)
            tp.prune_conv_in_channels(layer.attn, idxs)
            tp.prune_conv_in_channels(layer.v, idxs)
            return layer

        def prune_out_channels(self, layer: ConvAttention, idxs: list[int]) -> ConvAttention:
            tp.prune_conv_out_channels(layer.v, list(idxs))
            return layer

        def get_in_channels(self, layer: ConvAttention) -> int:
            return layer.v.in_channels

        def get_out_channels(self, layer: ConvAttention) -> int:
            return layer.v.out_channels

        def get_out_channel_groups(self, layer: ConvAttention) -> int:
            return layer.num_heads

    return ConvAttentionPruner()


def _static_operators(model: nn.Module) -> list[StaticOperator]:
    return [m for m in model.modules() if isinstance(m, StaticOperator)]


def pruning_form(model: nn.Module) -> nn.Module:
    """The model as pruned: every static operator's pass-through half behind an identity PReLU (see above)."""
    for op in _static_operators(model):
        width = op.dwconv.out_channels - op.mixer_fine.embed.in_channels - op.mixer_coarse.embed.in_channels
        weight = op.dwconv.weight
        op.pass_through = nn.PReLU(width, init=1.0, device=weight.device, dtype=weight.dtype)
    return model


def _split_roots(model: nn.Module) -> list[tuple[nn.Conv2d, tuple[int, ...]]]:
    """(root conv, slice widths) of the widths that are split by slicing: each stage's stream, each static operator's
    DWConv width."""
    roots = []
    for i, stage in enumerate(model.stages):
        mixers = [m for m in stage.modules() if isinstance(m, MultiScaleInteraction)]
        if mixers:
            dynamic = mixers[0].dynamic
            parts = (mixers[0].static_chs, dynamic.local_mixer.embed.in_channels,
                     dynamic.global_mixer.embed.in_channels)
            roots.append((model.stem.conv2 if i == 0 else stage.downsample.conv, parts))
    for op in _static_operators(model):
        c1, c3 = op.mixer_fine.embed.in_channels, op.mixer_coarse.embed.in_channels
        roots.append((op.whiten, (c1, op.whiten.out_channels - c1 - c3, c3)))
    return roots


def _shares(kept: int, parts: tuple[int, ...]) -> list[int]:
    """`kept` channels shared out over slices in proportion to their widths (largest remainder, at least one each)."""
    width = sum(parts)
    shares = [max(1, kept * part // width) for part in parts]
    by_remainder = sorted(range(len(parts)), key=lambda i: -(kept * parts[i] % width))
    for i in by_remainder[:max(0, kept - sum(shares))]:
        shares[i] += 1
    return [min(share, part) for share, part in zip(shares, parts)]


def _prune_split_widths(model: nn.Module, pruner, held: set[nn.Module]) -> None:
    """Prune the sliced widths that tp's pass left whole (`held`: see the comment above).

    As many as tp removes elsewhere: the root's target ratio, the kept width rounded down to `round_to` but never to
    zero, shared out over the slices in proportion to their widths. Within each slice the channels go lowest first by
    the pruner's importance over the whole group; ranked per root, also with global pruning.
    """
    import torch_pruning as tp
    graph = pruner.DG
    ignored = {m for m in pruner.ignored_layers if m not in held}  # a recipe's `ignore`, the classifier
    for root, parts in _split_roots(model):
        width = root.out_channels
        full = graph.get_pruning_group(root, tp.prune_conv_out_channels, list(range(width)))
        if any(dep.target.module in ignored and graph.is_out_channel_pruning_fn(dep.handler) for dep, _ in full):
            continue
        kept = int(width * (1 - pruner.get_target_pruning_ratio(root)))
        if pruner.round_to:
            kept = max(kept - kept % pruner.round_to, pruner.round_to)
        imp = pruner.estimate_importance(full)
        if kept >= width or imp is None:
            continue
        imp = imp.detach().float().cpu()
        idxs, start = [], 0
        for part, share in zip(parts, _shares(kept, parts)):
            idxs += (torch.argsort(imp[start:start + part])[:part - share] + start).tolist()
            start += part
        group = graph.get_pruning_group(root, tp.prune_conv_out_channels, sorted(idxs))
        if graph.check_pruning_group(group):
            group.prune()


def _restore_pass_through(model: nn.Module, pruner) -> None:
    for op in _static_operators(model):
        if isinstance(op.pass_through, nn.PReLU):
            assert bool((op.pass_through.weight == 1).all()), 'the pass-through PReLU must stay an identity'
            op.pass_through = nn.Identity()


def _fix_heads(model: nn.Module, pruner, head_dims: dict[nn.Module, int]) -> None:
    # whole heads go only in 'heads' mode, which keeps head_dim; 'dims' mode keeps the head count
    if pruner.prune_num_heads:
        for attn, head_dim in head_dims.items():
            attn.num_heads = attn.qkv.out_features // 3 // head_dim


def pruning_spec(model: nn.Module):
    """What Torch-Pruning must be told about EMSNet in `pruning_form` (see the comment above)."""
    from compress.stages.prune import PruningSpec  # the stage imports this package: import late
    if any(not isinstance(op.pass_through, nn.PReLU) for op in _static_operators(model)):
        raise ValueError('prune EMSNet through pruning_form(model): its static operators need their identity PReLU')
    globals_ = [m for m in model.modules() if isinstance(m, GlobalAttention)]
    held = [root for root, _ in _split_roots(model)]
    head_dims = {attn: attn.qkv.out_features // 3 // attn.num_heads for attn in globals_}
    spec = PruningSpec(
        ignored_layers=held,
        num_heads={attn.qkv: attn.num_heads for attn in globals_},
        customized_pruners={ConvAttention: _conv_attention_pruner()},
        after_prune=[partial(_prune_split_widths, held=set(held)), _restore_pass_through,
                     partial(_fix_heads, head_dims=head_dims)],
    )
    if _static_operators(model):
        spec.notes += [
            'residual streams (stem conv2 / downsample convs listed as ignored only for the Torch-Pruning pass) and '
            'static DWConv widths (whiten likewise) are pruned right after, the kept width shared out over the slices '
            'of their split (6 : 1 : 1 and 1 : 2 : 1), ranked within each slice',
            'static operator: its pass-through half runs through an identity PReLU (slope 1) while pruning, so that '
            'Torch-Pruning keeps the concat aligned; taken out after']
    if any(isinstance(m, ConvAttention) for m in model.modules()):
        spec.notes.append('C-MHSA: one customized layer for Torch-Pruning (inputs of shrink / M / N, N rows in equal '
                          'head groups); the k^2 x k^2 attention logits of M stay whole and its weights take no part '
                          'in ranking channels')
    if globals_:
        spec.notes.append('G-MHSA: heads consistent in qkv and proj (num_heads on qkv), num_heads updated')
    return spec


# NNCF -> OpenVINO: with the transformer scheme the CPU plugin's low-precision passes cannot compile the int8
# C-MHSA (its `unfold` becomes im2col Gathers, and moving a per-channel dequantization scale through them fails shape
# inference: "[GatherTransformation] ... Argument shapes are inconsistent", OpenVINO 2026.4). The local dynamic mixer
# stays float; every other weight is int8 (the coverage report lists the float layers).
NNCF_IGNORED_SCOPE = (r'.*\.dynamic\.local_mixer\..*',)

register_rules(EMSNet, FamilyRules(pruning_form=pruning_form, pruning_spec=pruning_spec,
                                   nncf_ignored_scope=NNCF_IGNORED_SCOPE))
