"""Tests for compress/models/emsnet.py (EMSNet, Vo 2023 PhD dissertation, Chapter 3; re-implemented from the text).

Published sizes: Table 3.1 (params, "GFLOPs"); for XXTiny the precise 2.56 M / 0.54 G of Tables 3.5, 3.7 and 3.9
(full-model rows), which Table 3.1 truncates to 2.5 / 0.5. The dissertation's GFLOPs are multiply-accumulates
(../shared/notes/emsnet_mat_partialformer.md, "Conventions"), so they are compared with `count_macs` as it stands:
conv + linear + attention matmuls, norms / pooling / activations not counted (they would add < 1 %). Full-size
variants are built on the meta device, so counting costs shapes only.
"""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import compress.models.emsnet  # noqa: F401  (registers the entrypoints)
from compress.models.emsnet import (
    ConvAttention, EMSBlock, EMSNet, PatchMixer, StaticOperator,
)
from eval.complexity import count_macs, count_params
from pruned_models import check_pruned_model_runs, kill_channels

# name -> (published params M, published GMACs at 224)
PUBLISHED = {
    'emsnet_xxtiny': (2.56, 0.54),
    'emsnet_xtiny': (3.0, 0.7),
    'emsnet_tiny': (5.4, 1.9),
}
# name -> (params, MACs at 224) of this re-implementation, pinned so that any change to the reading shows up
EXACT = {
    'emsnet_xxtiny': (2_550_498, 531_809_648),
    'emsnet_xtiny': (2_963_810, 716_601_768),
    'emsnet_tiny': (5_430_434, 1_871_456_832),
}


# --- registry / size -----------------------------------------------------------------------------------------------

def test_registry():
    names = timm.list_models('emsnet_*') + timm.list_models('test_emsnet')
    assert sorted(names) == ['emsnet_tiny', 'emsnet_xtiny', 'emsnet_xxtiny', 'test_emsnet']
    for name in names:
        assert timm.models.model_entrypoint(name).__module__ == 'compress.models.emsnet'
        cfg = timm.models.get_pretrained_cfg(name)
        assert not cfg.url and not cfg.hf_hub_id  # no official weights exist
    assert timm.models.get_pretrained_cfg('test_emsnet').input_size == (3, 64, 64)


@pytest.mark.parametrize('name', list(PUBLISHED))
def test_published_size(name):
    model = timm.create_model(name, device='meta').eval()
    params, macs = count_params(model), count_macs(model, (3, 224, 224))
    assert (params, macs) == EXACT[name]
    published_params, published_gmacs = PUBLISHED[name]
    assert abs(params / 1e6 / published_params - 1) < 0.05
    assert abs(macs / 1e9 / published_gmacs - 1) < 0.05


def test_xtiny_table_widths_miss_published_params():
    # Table 3.1's literal XTiny widths (C_4 = 128) fall 22 % short of the published 3.0 M at the right GMACs:
    # the reason emsnet_xtiny uses C_4 = 192 (module docstring, ambiguity 3)
    model = timm.create_model('emsnet_xtiny', embed_dims=(32, 64, 96, 128), device='meta').eval()
    params, macs = count_params(model), count_macs(model)
    assert (params, macs) == (2_327_170, 690_162_408)
    assert params / 3.0e6 < 0.8 and abs(macs / 0.7e9 - 1) < 0.05


def test_stage_layout():
    model = timm.create_model('emsnet_tiny', device='meta')
    assert [len(s.blocks) for s in model.stages] == [3, 3, 10, 2]
    assert [s.blocks[0].norm1.num_features for s in model.stages] == [64, 96, 128, 256]
    assert [s.blocks[0].mlp.fc1.out_channels for s in model.stages] == [512, 768, 512, 1024]
    mixer = model.stages[0].blocks[0].mixer
    assert mixer.static_chs == 48  # C_s : C_d = 3 : 1
    assert [mixer.static.mixer_fine.patch_size, mixer.static.mixer_coarse.patch_size,
            mixer.dynamic.local_mixer.patch_size, mixer.dynamic.global_mixer.patch_size] == [2, 4, 4, 6]
    assert mixer.static.mixer_fine.embed.out_channels == 48  # static quarter 12 -> C_s
    assert mixer.dynamic.local_mixer.embed.out_channels == 16  # dynamic half 8 -> C_d
    assert mixer.static.mixer_fine.prop.groups == mixer.static.mixer_fine.prop.out_channels  # depthwise Prop


def test_macs_cpu_matches_meta():
    # on CPU attention runs through the SDPA flash kernel, counted by the project's own formula
    model = timm.create_model('test_emsnet').eval()
    assert count_macs(model, (3, 64, 64)) == count_macs(timm.create_model('test_emsnet', device='meta'), (3, 64, 64))
    assert count_params(model) < 500_000


# --- the operators -------------------------------------------------------------------------------------------------

def _reference_conv_attention(attn_module: ConvAttention, x: torch.Tensor) -> torch.Tensor:
    """Eqs. 3.9-3.10 written window by window with explicit loops (k = 3, stride 2, padding 1)."""
    B, C, H, W = x.shape
    k, s, pad, h = attn_module.kernel_size, attn_module.stride, attn_module.padding, attn_module.num_heads
    logits = attn_module.attn(attn_module.shrink(x))  # B, h * k^4, Hw, Ww
    values = F.pad(attn_module.v(x), [pad] * 4)
    out = torch.zeros_like(values)
    d = C // h
    for b in range(B):
        for i in range(logits.shape[-2]):
            for j in range(logits.shape[-1]):
                window = values[b, :, i * s:i * s + k, j * s:j * s + k].reshape(C, k * k)  # C, k^2 positions
                for head in range(h):
                    a = logits[b, head * k ** 4:(head + 1) * k ** 4, i, j].reshape(k * k, k * k).softmax(-1)
                    mixed = window[head * d:(head + 1) * d] @ a.T  # d, k^2 (query positions)
                    out[b, head * d:(head + 1) * d, i * s:i * s + k, j * s:j * s + k] += mixed.reshape(d, k, k)
    return out[:, :, pad:pad + H, pad:pad + W]


@pytest.mark.parametrize('size', [(5, 6), (4, 4), (1, 1)])
def test_conv_attention_matches_window_reference(size):
    torch.manual_seed(0)
    module = ConvAttention(8, num_heads=2).eval()
    for p in module.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 8, *size)
    with torch.no_grad():
        torch.testing.assert_close(module(x), _reference_conv_attention(module, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('pool', ['max', 'avg'])
@pytest.mark.parametrize('patch_size,size', [(6, (14, 14)), (4, (7, 9)), (2, (7, 7)), (6, (56, 56)), (4, (8, 8))])
def test_patch_mixer_pads_and_crops(pool, patch_size, size):
    # identity embed, identity mixer and an all-ones Prop make the branch "each pixel gets its patch's pooled value",
    # so the output shows how edge patches of a non-dividing size are pooled: over their real pixels only
    torch.manual_seed(0)
    mixer = PatchMixer(3, 3, patch_size, pool, nn.Identity()).eval()
    with torch.no_grad():
        mixer.embed.weight.copy_(torch.eye(3)[:, :, None, None])
        mixer.embed.bias.zero_()
        mixer.prop.weight.fill_(1.)
        mixer.prop.bias.zero_()
    x = torch.randn(1, 3, *size) - 3.  # all negative: a zero pad would win every edge max and bias every edge mean
    H, W = size
    pad_h, pad_w = -H % patch_size, -W % patch_size
    if pool == 'max':
        pooled = F.max_pool2d(F.pad(x, (0, pad_w, 0, pad_h), value=float('-inf')), patch_size)
    else:
        padded = F.pad(x, (0, pad_w, 0, pad_h))
        counts = F.avg_pool2d(F.pad(torch.ones_like(x), (0, pad_w, 0, pad_h)), patch_size)
        pooled = F.avg_pool2d(padded, patch_size) / counts
    expected = pooled.repeat_interleave(patch_size, -2).repeat_interleave(patch_size, -1)[..., :H, :W]
    with torch.no_grad():
        out = mixer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, expected)


def test_whitening_removes_spatial_mean():
    # the DWConv of the static operator sees a map whose every channel has zero spatial mean
    torch.manual_seed(0)
    static = StaticOperator(16).eval()
    seen = []
    static.dwconv.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        static(torch.randn(2, 16, 9, 11) + 3.)
    means = seen[0].mean(dim=(2, 3))
    assert means.abs().max() < 1e-5 and seen[0].std() > 0.01


# --- model / timm anatomy ------------------------------------------------------------------------------------------

def test_forward_train_backward():
    model = timm.create_model('test_emsnet', num_classes=10, drop_path_rate=0.1)
    model.set_grad_checkpointing(True)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize('size', [(72, 72), (70, 90), (33, 47)])
def test_non_dividing_input_sizes(size):
    # 72 -> stages 18, 9, 5, 3: p = 4 and 6 divide none of them, p = 2 only the first; 70 x 90 and 33 x 47 are
    # non-square with odd sides
    model = timm.create_model('test_emsnet').eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        out = model.forward_head(final)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    expected = []
    h, w = size
    for i in range(4):
        h, w = (h + 1) // 2, (w + 1) // 2  # stride-2 convs with padding 1
        if i == 0:
            h, w = (h + 1) // 2, (w + 1) // 2
        expected.append((h, w))
    assert [tuple(t.shape[-2:]) for t in inter] == expected


def test_classifier():
    model = timm.create_model('test_emsnet', num_classes=7)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(0)
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 64)
    model.reset_classifier(3, '')
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 64, 2, 2)
    assert model.no_weight_decay() == set()
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))


def test_blocks_are_ems_blocks():
    model = timm.create_model('test_emsnet')
    assert isinstance(model, EMSNet)
    assert sum(isinstance(m, EMSBlock) for m in model.modules()) == 5


# --- export / compile ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compile_matches_eager():
    torch.manual_seed(0)
    model = timm.create_model('test_emsnet').eval()
    x = torch.randn(2, 3, 72, 72)  # non-dividing size on the compiled path too
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(model, dynamic=False)(x)
            eager = model(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


# --- structured pruning through compress.stages.prune (Torch-Pruning + compress.stages.families.emsnet) -------------

def _prune(model, ratio, res=64, **cfg):
    from compress.config import PruneStage
    from compress.stages.prune import prune_model
    torch.manual_seed(0)
    example = torch.randn(2, 3, res, res, dtype=next(model.parameters()).dtype)
    return prune_model(model, PruneStage(ratio=ratio, **cfg), ratio, example)


def _check_widths(model, x):
    """feature_info, num_features and the classifier agree with what the pruned model really produces."""
    import copy

    from timm.models._features import FeatureListNet
    with torch.no_grad():
        inter = model.forward_intermediates(x, intermediates_only=True)
        features = FeatureListNet(copy.deepcopy(model), out_indices=(0, 1, 2, 3), flatten_sequential=True)
        feats = features(x)
    widths = [t.shape[1] for t in inter]
    assert widths == [i['num_chs'] for i in model.feature_info] == [f.shape[1] for f in feats]
    assert features.feature_info.channels() == widths
    assert model.num_features == widths[-1] == model.norm.num_features == model.head.in_features
    return widths


@pytest.mark.parametrize('heads', ['dims', 'heads'])
@pytest.mark.parametrize('ratio, macs_kept', [(0.3, 0.375), (0.5, 0.321)])
def test_prune_test_variant(ratio, macs_kept, heads):
    torch.manual_seed(0)
    model = timm.create_model('test_emsnet').eval()
    params, macs = count_params(model), count_macs(model, (3, 224, 224))
    pruned, spec = _prune(model, ratio, heads=heads)
    assert count_params(model) == params  # the stage prunes a copy
    assert all(isinstance(m.pass_through, nn.Identity) for m in pruned.modules() if isinstance(m, StaticOperator))
    assert count_macs(pruned, (3, 224, 224)) / macs == pytest.approx(macs_kept, abs=0.01)
    assert count_params(pruned) < 0.55 * params
    x = torch.randn(2, 3, 64, 64)
    assert _check_widths(pruned, x) < [16, 32, 48, 64]
    for attn in pruned.modules():
        if isinstance(attn, compress.models.emsnet.GlobalAttention):
            assert attn.qkv.out_features % (3 * attn.num_heads) == 0 and attn.num_heads >= 1
    check_pruned_model_runs(pruned, x)
    assert any('G-MHSA' in note for note in spec.notes)


def _kill_channels(model, ratio):
    """Kill, in every prunable width of EMSNet, as many channels as the pruner removes at `ratio` (round_to None).

    Torch-Pruning removes size - int(size * (1 - ratio)) channels of a width; the sliced widths (residual streams,
    static DWConv) keep int(width * (1 - ratio)) shared out over their slices (`_shares`), each slice losing its
    dead channels. Returns the widths the pruned model must have.
    """
    from compress.stages.families.emsnet import _shares
    gen = torch.Generator().manual_seed(0)

    def pick(size):
        return torch.randperm(size, generator=gen)[:size - int(size * (1 - ratio))]

    def pick_split(parts):
        idx, start = [], 0
        for part, share in zip(parts, _shares(int(sum(parts) * (1 - ratio)), parts)):
            idx.append(torch.randperm(part, generator=gen)[:part - share] + start)
            start += part
        return torch.cat(idx)

    expected = {}
    stem = model.stem
    idx = pick(stem.conv1.out_channels)
    kill_channels(idx, rows=[stem.conv1], norms=[stem.norm1], cols=[(stem.conv2, 0)])
    expected['stem.conv1'] = stem.conv1.out_channels - len(idx)
    for i, stage in enumerate(model.stages):
        blocks = list(stage.blocks)
        mixer = blocks[0].mixer
        parts = (mixer.static_chs, mixer.dynamic.local_mixer.embed.in_channels,
                 mixer.dynamic.global_mixer.embed.in_channels)
        cs = parts[0]
        idx = pick_split(parts)  # the residual stream of the stage
        static, local, glob = idx[idx < cs], idx[(idx >= cs) & (idx < cs + parts[1])], idx[idx >= cs + parts[1]]
        producer, norm = (stem.conv2, stem.norm2) if i == 0 else (stage.downsample.conv, stage.downsample.norm)
        kill_channels(idx, rows=[producer], norms=[norm])
        for blk in blocks:
            mix, dyn = blk.mixer, blk.mixer.dynamic
            kill_channels(idx, rows=[mix.proj, blk.mlp.fc2], norms=[blk.norm1, blk.norm2], cols=[(blk.mlp.fc1, 0)])
            kill_channels(static, cols=[(mix.static.whiten, 0), (mix.static.gate_proj, 0)])
            kill_channels(local, cols=[(dyn.local_mixer.embed, -cs)])
            kill_channels(glob, cols=[(dyn.global_mixer.embed, -cs - parts[1])])
        if i + 1 < len(model.stages):
            kill_channels(idx, cols=[(model.stages[i + 1].downsample.conv, 0)])
        else:
            kill_channels(idx, norms=[model.norm], cols=[(model.head, 0)])
        expected[f'stages.{i}'] = sum(parts) - len(idx)
        for j, blk in enumerate(blocks):
            name = f'stages.{i}.blocks.{j}'
            mlp, op, dyn = blk.mlp, blk.mixer.static, blk.mixer.dynamic
            idx = pick(mlp.fc1.out_channels)
            kill_channels(idx, rows=[mlp.fc1], cols=[(mlp.fc2, 0)])
            expected[f'{name}.mlp'] = mlp.fc1.out_channels - len(idx)
            # static operator: the DWConv width (sliced 1 : 2 : 1), the two patch mixers, the gated output
            fine, coarse = op.mixer_fine, op.mixer_coarse
            c1, c3 = fine.embed.in_channels, coarse.embed.in_channels
            cm, e = op.whiten.out_channels - c1 - c3, fine.embed.out_channels
            idx = pick_split((c1, cm, c3))
            kill_channels(idx, rows=[op.whiten, op.dwconv])
            kill_channels(idx[idx < c1], cols=[(fine.embed, 0)])
            kill_channels(idx[(idx >= c1) & (idx < c1 + cm)], cols=[(op.merge, e - c1)])
            kill_channels(idx[idx >= c1 + cm], cols=[(coarse.embed, -c1 - cm)])
            expected[f'{name}.static.dwconv'] = op.whiten.out_channels - len(idx)
            for mixer, offset in ((fine, 0), (coarse, e + cm)):
                idx = pick(e)
                kill_channels(idx, rows=[mixer.embed, mixer.mixer.conv_h, mixer.mixer.conv_v, mixer.prop],
                      cols=[(op.merge, offset)])
            idx = pick(op.merge.out_channels)
            kill_channels(idx, rows=[op.merge, op.gate_proj], cols=[(blk.mixer.proj, 0)])
            # dynamic operator: C-MHSA input and value widths, G-MHSA input, head dims and output, the fusion
            local, glob = dyn.local_mixer, dyn.global_mixer
            idx = pick(local.embed.out_channels)
            kill_channels(idx, rows=[local.embed, local.mixer.shrink], cols=[(local.mixer.attn, 0), (local.mixer.v, 0)])
            idx = pick(local.mixer.v.out_channels)
            kill_channels(idx, rows=[local.mixer.v, local.prop], cols=[(dyn.merge, 0)])
            expected[f'{name}.conv_attention.v'] = local.mixer.v.out_channels - len(idx)
            idx = pick(glob.embed.out_channels)
            kill_channels(idx, rows=[glob.embed], cols=[(glob.mixer.qkv, 0)])
            attn = glob.mixer
            width = attn.proj.in_features
            head_dim = width // attn.num_heads
            dims = pick(head_dim)
            idx = torch.cat([dims + h * head_dim for h in range(attn.num_heads)])  # the same dims in every head
            kill_channels(torch.cat([idx, idx + width, idx + 2 * width]), rows=[attn.qkv])
            kill_channels(idx, cols=[(attn.proj, 0)])
            expected[f'{name}.global.qkv'] = 3 * (width - len(idx))
            idx = pick(attn.proj.out_features)
            kill_channels(idx, rows=[attn.proj, glob.prop], cols=[(dyn.merge, local.prop.out_channels)])
            idx = pick(dyn.merge.out_channels)
            kill_channels(idx, rows=[dyn.merge], cols=[(blk.mixer.proj, cs)])
    return expected


def test_prune_dead_channels_keeps_the_function():
    # every prunable width gets exactly as many dead channels as the pruner removes: group_norm ranks them last,
    # so if the rules keep every group aligned (slices, concats, heads, value widths) the function is unchanged
    torch.manual_seed(0)
    model = timm.create_model('test_emsnet').double().eval()
    with torch.no_grad():
        # signal-preserving weights (the default init leaves the pooled attention inputs nearly constant, which would
        # hide a wrong attention scale or head split), non-trivial norm statistics and biases
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.2, 0.2)
        expected = _kill_channels(model, 0.5)
        x = torch.randn(2, 3, 72, 72, dtype=torch.float64)  # non-dividing sizes: crops and ceil-mode pools too
        reference = model(x)
    pruned, _ = _prune(model, 0.5, res=72, round_to=None)
    blk = pruned.stages[2].blocks[1]
    widths = {
        'stem.conv1': pruned.stem.conv1.out_channels,
        **{f'stages.{i}': info['num_chs'] for i, info in enumerate(pruned.feature_info)},
        'stages.2.blocks.1.mlp': blk.mlp.fc1.out_channels,
        'stages.2.blocks.1.static.dwconv': blk.mixer.static.dwconv.out_channels,
        'stages.2.blocks.1.conv_attention.v': blk.mixer.dynamic.local_mixer.mixer.v.out_channels,
        'stages.2.blocks.1.global.qkv': blk.mixer.dynamic.global_mixer.mixer.qkv.out_features,
    }
    assert widths == {k: expected[k] for k in widths}
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference, rtol=1e-9, atol=1e-9)
