"""SpaRTAN: how it is pruned (in its deploy form, argmax links rebuilt) and what NNCF leaves in float."""
from __future__ import annotations

import torch
from torch import nn

from compress.models.spartan import CMixer, CMixerDeploy, SpaRTAN
from compress.stages.families import FamilyRules, register_rules

# NNCF's default CPU scheme also fake-quantizes the inputs / outputs of the CMixer's element-wise products, sums
# and complex mix (~400 extra FakeQuantize nodes in T), and lets the FakeQuantize of the block norm's output move
# in front of the argmax (`amax` / `eq`), so the argmax would run on the int8 grid, where ties are common (the
# official structure's int8 graph reads the float norm output there). Leaving those ops in float (every conv stays
# int8) measured 0.80x the int8 time and ~0.55x the int8 logit error of the default on spartan_t, batch 32. The
# patterns match the node names `convert_model` gives a reparameterized SpaRTAN (`__module.stages.0.blocks.0.cmixer/
# aten::addcmul/Multiply`); convolutions (`cmixer.theta_re/aten::_convolution/...`) are not matched.
_CMIXER_FLOAT_OPS = 'mul|add|addcmul|sub|sum|where|amax|eq|amin|clamp_max'
NNCF_IGNORED_SCOPE = (rf'.*\.cmixer/aten::({_CMIXER_FLOAT_OPS})/.*',)


# SpaRTAN is pruned in its deploy form (`pruning_form`): there every CMixer's complex pairs are two aligned tensors
# (`re`, `im`), so Torch-Pruning (tp) keeps a pair together by construction (re / im meet in adds and subtractions),
# and the 4-way split of the group-width-2 conv is four depthwise convs tp knows. The BN of the CMixer's 3x3 conv is
# folded (fine-tuning continues without it) and the depthwise stages' complex mix is a frozen per-pair scale.
# What tp cannot see is the argmax link: input channel j selects hidden channel j (official numbering), i.e. re
# channel j / 2 for even j and im channel j / 2 for odd j. `chan_re` / `chan_im` hold, per linked hidden pair, the
# position of its input channel; after pruning they are rebuilt from the original indices of the channels that
# survived (tracked group by group), so the argmax over the kept channels still picks its own hidden channel. A
# kept input channel whose hidden pair was pruned no longer contributes an argmax term (-1 never matches), and a
# kept linked pair whose input channel was pruned can no longer be selected. Layer scales and the SMixer FD `gamma`
# are per-channel parameters (dim 1); the classifier keeps its outputs (the stage's generic rule).

def pruning_form(model: nn.Module) -> nn.Module:
    """The model as pruned: every CMixer in its deploy form (same function; see the comment above)."""
    from timm.utils.model import reparameterize_model
    return reparameterize_model(model.eval(), inplace=True)


def pruning_spec(model: nn.Module):
    """What Torch-Pruning must be told about a SpaRTAN in `pruning_form` (see the comment above)."""
    import torch_pruning as tp
    from compress.stages.prune import PruningSpec  # the stage imports this package: import late
    mixers = [m for m in model.modules() if isinstance(m, CMixerDeploy)]
    if any(isinstance(m, CMixer) for m in model.modules()):
        raise ValueError('prune SpaRTAN through pruning_form(model): its CMixers must be in deploy form')
    # original input / re-half indices still present, per mixer, in their current order
    kept = {m: (list(range(m.theta_re.in_channels)), list(range(m.theta_re.out_channels))) for m in mixers}
    by_conv = {m.theta_re: m for m in mixers}

    def track(group, graph):
        for dep, idxs in group.items:
            mixer = by_conv.get(dep.target.module)
            if mixer is None:
                continue
            removed = set(tp._helpers.to_plain_idxs(idxs))
            side = 1 if graph.is_out_channel_pruning_fn(dep.handler) else 0
            kept[mixer] = tuple([i for pos, i in enumerate(ch) if pos not in removed] if k == side else ch
                                for k, ch in enumerate(kept[mixer]))

    def relink(model, pruner):
        for mixer, (inputs, pairs) in kept.items():
            position = {channel: new for new, channel in enumerate(inputs)}
            linked = [k for k in pairs if k < mixer.chan_re.shape[0]]  # a prefix: tp keeps channel order
            device = mixer.chan_re.device
            mixer.chan_re = torch.tensor([position.get(2 * k, -1) for k in linked], device=device).reshape(-1, 1, 1)
            mixer.chan_im = torch.tensor([position.get(2 * k + 1, -1) for k in linked], device=device).reshape(-1, 1, 1)
            mixer.chan = torch.arange(len(inputs), device=device).reshape(-1, 1, 1)
            if not mixer.mix_in_conv:
                mixer.mix_a, mixer.mix_b = mixer.mix_a[pairs], mixer.mix_b[pairs]

    scales = [(p, 1) for name, p in model.named_parameters() if name.endswith(('.gamma', '.scale_1', '.scale_2'))]
    return PruningSpec(
        unwrapped_parameters=dict(scales), on_group=[track], after_prune=[relink],
        notes=['SpaRTAN pruned in deploy form: CMixer complex pairs as aligned re / im halves (pairs stay whole), '
               'CMixer BN folded, argmax links rebuilt for the kept channels'],
    )


register_rules(SpaRTAN, FamilyRules(pruning_form=pruning_form, pruning_spec=pruning_spec,
                                    nncf_ignored_scope=NNCF_IGNORED_SCOPE))
