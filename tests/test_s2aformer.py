"""Tests for compress/models/s2aformer.py (S2AFormer re-implementation, arXiv 2505.22195 v1).

Paper numbers are Table II / III (params, GMACs at 224 and 256). The paper's GMACs count convs and linears only,
without the strip-attention matmuls (test_paper_counts_conv_and_linear_only derives that from its 224 / 256
pairs), so they are compared with a conv + linear count; `count_macs` (which adds the attention matmuls) is pinned
separately. Full-size variants are built on the meta device: counting costs shapes only.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import compress.models.s2aformer  # noqa: F401  (registers the entrypoints)
from compress.models.s2aformer import S2AFormer, StripAttention
from eval.complexity import count_macs, count_params
from pruned_models import check_pruned_model_runs, kill_channels

aten = torch.ops.aten

# Table II / III: params (M), GMACs at 224, GMACs at 256
PAPER = {
    's2aformer_mini': (5.02, 0.43, 0.56),
    's2aformer_t': (5.80, 0.655, 0.855),
    's2aformer_xs': (6.54, 0.786, 1.030),
    's2aformer_s': (10.69, 1.38, 1.80),
    's2aformer_m': (24.87, 4.12, 5.38),
}
# this implementation, exact: params, conv + linear MACs at 224 and 256, count_macs at 224 (adds attention matmuls)
OURS = {
    's2aformer_mini': (5_027_716, 437_200_192, 570_145_792, 456_216_112),
    's2aformer_t': (5_803_668, 656_504_672, 856_581_632, 685_508_752),
    's2aformer_xs': (6_542_548, 787_371_872, 1_027_507_712, 821_446_864),
    's2aformer_s': (10_678_412, 1_380_461_664, 1_802_141_184, 1_438_623_488),
    's2aformer_m': (25_181_564, 4_220_607_680, 5_511_572_480, 4_322_832_656),
}
TOLERANCE = 0.03  # relative, against the paper


def _conv_linear_macs(model, res):
    # a second count keeping only conv and linear ops (what module-hook counters such as ptflops / thop see)
    counter = FlopCounterMode(display=False)
    device = next(model.parameters()).device
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, res, res, device=device))
    flops = counter.get_flop_counts()['Global']
    return sum(flops.get(op, 0) for op in (aten.convolution, aten.addmm, aten.mm)) // 2


def _ssa_matmul_macs(model, res):
    # paper Eq. 14 + 15: Q K^T costs N * N_s per head (one scalar per head), attn V costs N * N_s * d
    total = 0
    for i, stage in enumerate(model.stages):
        side = res // (4 * 2 ** i)
        for blk in stage.blocks:
            attn = blk.attn
            k = attn.sr.stride[0] if attn.sr is not None else 1
            n, n_s = side * side, (side // k) ** 2
            total += n * n_s * (attn.num_heads + attn.v.out_features)
    return total


def _meta(name, **kwargs):
    return timm.create_model(name, device='meta', **kwargs).eval()


# --- registry / anatomy --------------------------------------------------------------------------------------------

def test_registry():
    names = timm.list_models('s2aformer_*') + timm.list_models('test_s2aformer')
    assert sorted(names) == sorted(list(PAPER) + ['test_s2aformer'])
    for name in names:
        assert timm.models.model_entrypoint(name).__module__ == 'compress.models.s2aformer'
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.tag == 'untrained' and not cfg.url and cfg.hf_hub_id is None  # no official weights exist
        assert cfg.paper_ids == 'arXiv:2505.22195'
    assert isinstance(timm.create_model('test_s2aformer'), S2AFormer)


def test_strip_attention_layout():
    model = _meta('s2aformer_t')
    for stage, dim, heads, sr in zip(model.stages, (48, 64, 128, 256), (1, 2, 4, 8), (8, 4, 2, 1)):
        for blk in stage.blocks:
            attn = blk.attn
            # channel squeeze: Q and K are one scalar per head; V keeps every channel
            assert attn.q.out_features == attn.k.out_features == heads
            assert attn.v.out_features == attn.proj.in_features == dim
            if sr > 1:  # CSR: k x k depthwise conv with stride k
                assert attn.sr.kernel_size == attn.sr.stride == (sr, sr) and attn.sr.groups == dim
            else:
                assert attn.sr is None
            assert blk.pos_conv.groups == dim and blk.pos_conv.kernel_size == (3, 3)
            assert (blk.lim.pw1.groups, blk.lim.pw2.groups, blk.lim.dw.groups) == (2, 4, dim)
            assert blk.mlp.fc1.out_features == 4 * dim
    assert [s.downsample.proj.kernel_size for s in model.stages] == [(2, 2)] * 4


# --- size against the paper ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(PAPER))
def test_param_count(name):
    params = count_params(_meta(name))
    assert params == OURS[name][0]
    assert abs(params / 1e6 / PAPER[name][0] - 1) < TOLERANCE


@pytest.mark.parametrize('name', list(PAPER))
def test_macs(name):
    model = _meta(name)
    _, paper_224, paper_256 = PAPER[name]
    _, ours_224, ours_256, executed = OURS[name]
    conv_linear = _conv_linear_macs(model, 224)
    assert conv_linear == ours_224
    assert abs(conv_linear / 1e9 / paper_224 - 1) < TOLERANCE
    assert abs(_conv_linear_macs(model, 256) / 1e9 / paper_256 - 1) < TOLERANCE
    # count_macs sees the strip-attention matmuls too, exactly at the paper's complexity (Eq. 14, 15)
    assert count_macs(model, (3, 224, 224)) == executed
    assert executed - conv_linear == _ssa_matmul_macs(model, 224)


def test_paper_counts_conv_and_linear_only():
    # the paper's 256 / 224 MAC ratios fit conv + linear MACs, not MACs with the attention matmuls (which grow as
    # N * N_s, i.e. (256 / 224)^4); mini's 0.56 / 0.43 has too few digits to tell
    for name in ('s2aformer_t', 's2aformer_xs', 's2aformer_s', 's2aformer_m'):
        model = _meta(name)
        paper_ratio = PAPER[name][2] / PAPER[name][1]
        conv_linear_ratio = _conv_linear_macs(model, 256) / _conv_linear_macs(model, 224)
        with_attention_ratio = count_macs(model, (3, 256, 256)) / count_macs(model, (3, 224, 224))
        assert abs(conv_linear_ratio - paper_ratio) < 0.006
        assert abs(with_attention_ratio - paper_ratio) > 0.009


def test_hpb_cost_matches_paper_differences():
    # XS is T plus four stage-3 HPBs (C = 128 at 14x14): Table III's 6.54 - 5.80 M and 0.786 - 0.655 G, within their
    # rounding, pin one HPB at 0.1825-0.1875 M params and 32.50-33.00 M MACs (this is what fixes the LIM widths)
    t, xs = _meta('s2aformer_t'), _meta('s2aformer_xs')
    per_block_params = (count_params(xs) - count_params(t)) / 4
    per_block_macs = (_conv_linear_macs(xs, 224) - _conv_linear_macs(t, 224)) / 4
    assert 0.1825e6 <= per_block_params <= 0.1875e6
    assert 32.50e6 <= per_block_macs <= 33.00e6
    # T is mini with C1 48 instead of 32 and four more stage-3 HPBs: 5.80 - 5.02 M
    assert 0.77e6 <= count_params(t) - count_params(_meta('s2aformer_mini')) <= 0.79e6


@pytest.mark.parametrize('name,paper_after', [('s2aformer_mini', 5.01), ('s2aformer_t', 5.79)])
def test_depthwise_reduction_params_match_table8(name, paper_after):
    # Table VIII: replacing the CSR convs with pooling takes mini 5.02 -> 5.01 M and T 5.80 -> 5.79 M, so the CSR
    # convs hold at most 0.02 M (a dense PVT-style k x k reduction would hold 0.39 M on mini)
    model = _meta(name)
    csr = sum(p.numel() for m in model.modules() if isinstance(m, StripAttention) and m.sr is not None
              for p in m.sr.parameters())
    paper_before = PAPER[name][0]
    assert 0 < csr <= (paper_before - paper_after + 0.01) * 1e6


def test_test_variant_is_small():
    model = timm.create_model('test_s2aformer')
    assert count_params(model) == 410_512
    assert model.pretrained_cfg['input_size'] == (3, 64, 64)
    # on CPU the attention runs through scaled_dot_product_attention: the count must equal the meta count
    assert count_macs(model.eval(), (3, 64, 64)) == count_macs(_meta('test_s2aformer'), (3, 64, 64)) == 4_469_472


# --- strip self-attention against Algorithm 1 ----------------------------------------------------------------------

def _algorithm_1(attn, x):
    """SSA written straight from Algorithm 1, head by head, with the module's weights."""
    B, H, W, C = x.shape
    tokens = x.reshape(B, H * W, C)
    q = F.linear(tokens, attn.q.weight, attn.q.bias)  # B, N, h: one scalar per token and head
    if attn.sr is not None:
        reduced = F.conv2d(x.permute(0, 3, 1, 2), attn.sr.weight, attn.sr.bias, stride=attn.sr.stride, groups=C)
        reduced = F.layer_norm(reduced.flatten(2).transpose(1, 2), (C,), attn.norm.weight, attn.norm.bias,
                               attn.norm.eps)
    else:
        reduced = tokens
    k = F.linear(reduced, attn.k.weight, attn.k.bias)  # B, N_s, h
    v = F.linear(reduced, attn.v.weight, attn.v.bias)  # B, N_s, C
    heads = attn.num_heads
    head_dim = C // heads
    out = []
    for i in range(heads):
        logits = q[:, :, i, None] * k[:, None, :, i] * head_dim ** -0.5  # the outer product of two strips
        out.append(logits.softmax(-1) @ v[..., i * head_dim:(i + 1) * head_dim])
    out = F.linear(torch.cat(out, dim=-1), attn.proj.weight, attn.proj.bias)
    return out.reshape(B, H, W, C)


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('heads,sr', [(1, 4), (4, 2), (2, 1)])
def test_strip_attention_matches_algorithm_1(heads, sr, fused):
    torch.manual_seed(0)
    attn = StripAttention(32, num_heads=heads, sr_ratio=sr).eval()
    attn.fused_attn = fused
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)  # large q / k: peaked, non-uniform attention
        x = torch.randn(2, 8, 12, 32)
        out = attn(x)
        ref = _algorithm_1(attn, x)
    assert out.shape == (2, 8, 12, 32)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# --- forward / head / features / export ----------------------------------------------------------------------------

def test_forward_train_backward():
    model = timm.create_model('test_s2aformer', num_classes=10, drop_path_rate=0.1)
    model.set_grad_checkpointing(True)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_twin_classifier():
    torch.manual_seed(0)
    model = timm.create_model('test_s2aformer', num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        assert feats.shape == (2, 128)
        # without a teacher both classifiers are trained on the labels and averaged
        torch.testing.assert_close(model(x), (model.head(feats) + model.head_dist(feats)) / 2)
    model.set_distilled_training(True)
    model.train()
    out, out_dist = model(x)
    assert out.shape == out_dist.shape == (2, 7)


def test_classifier():
    model = timm.create_model('test_s2aformer', num_classes=7)
    assert [m.out_features for m in model.get_classifier()] == [7, 7]
    model.reset_classifier(0)
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 128)
    model.reset_classifier(3, '')  # no pooling: the 1x1 head conv runs on the map
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 128, 2, 2)
    assert model.no_weight_decay() == set()
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))


def test_full_variant_forward():
    # one real full-size forward (the smallest variant): shapes and finite logits at the default resolution
    model = timm.create_model('s2aformer_mini').eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 224, 224))
        out = model.forward_head(feats)
    assert feats.shape == (1, 256, *model.pretrained_cfg['pool_size'])
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    torch.manual_seed(0)
    model = timm.create_model('test_s2aformer').eval()
    x = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch.compile(model)(x)
    finally:
        torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


# --- structured pruning through compress.stages.prune (Torch-Pruning + compress.stages.families.s2aformer) ----------

def _prune(model, ratio, res=64, **cfg):
    from compress.config import PruneStage
    from compress.stages.prune import prune_model
    torch.manual_seed(0)
    example = torch.randn(2, 3, res, res, dtype=next(model.parameters()).dtype)
    return prune_model(model, PruneStage(ratio=ratio, **cfg), ratio, example)


def _check_structure(model, x):
    """Widths the forward relies on agree; feature_info / num_features / head sizes match what the model produces."""
    import copy

    from timm.models._features import FeatureListNet
    for attn in model.modules():
        if isinstance(attn, StripAttention):
            assert attn.q.out_features == attn.k.out_features == attn.num_heads  # one scalar per head
            assert attn.v.out_features == attn.proj.in_features and attn.v.out_features % attn.num_heads == 0
    with torch.no_grad():
        inter = model.forward_intermediates(x, intermediates_only=True)
        features = FeatureListNet(copy.deepcopy(model), out_indices=(0, 1, 2, 3), flatten_sequential=True)
        feats = features(x)
    widths = [t.shape[1] for t in inter]
    assert widths == [i['num_chs'] for i in model.feature_info] == [f.shape[1] for f in feats]
    assert features.feature_info.channels() == widths
    assert model.num_features == widths[-1] == model.conv_head.in_channels
    assert model.head_hidden_size == model.conv_head.out_channels == model.head.in_features
    assert model.head_dist.in_features == model.head_hidden_size
    return widths


@pytest.mark.parametrize('ratio, heads, macs_kept, value_widths', [
    (0.3, 'dims', 0.584, [8, 16, 32, 32, 40]),
    (0.5, 'dims', 0.520, [8, 16, 24, 24, 32]),
    (0.3, 'heads', 0.618, [16, 32, 24, 24, 32]),  # one of two heads goes in stages 2 and 3, head width kept
    (0.5, 'heads', 0.559, [16, 32, 24, 24, 32]),
])
def test_prune_test_variant(ratio, heads, macs_kept, value_widths):
    torch.manual_seed(0)
    model = timm.create_model('test_s2aformer').eval()
    params, macs = count_params(model), count_macs(model, (3, 224, 224))
    pruned, spec = _prune(model, ratio, heads=heads)
    assert count_params(model) == params  # the stage prunes a copy
    # round_to 8 keeps the 8-wide stem whole, and the stem dominates this tiny variant's MACs at 224
    assert count_macs(pruned, (3, 224, 224)) / macs == pytest.approx(macs_kept, abs=0.01)
    assert count_params(pruned) < 0.6 * params
    x = torch.randn(2, 3, 64, 64)
    assert _check_structure(pruned, x) == ([8, 16, 32, 40] if ratio == 0.3 else [8, 16, 24, 32])
    attns = [m for m in pruned.modules() if isinstance(m, StripAttention)]
    assert [a.v.out_features for a in attns] == value_widths
    assert [a.num_heads for a in attns] == ([1, 1, 1, 1, 1] if heads == 'heads' else [1, 1, 2, 2, 2])
    assert pruned.head.out_features == pruned.head_dist.out_features == 1000
    check_pruned_model_runs(pruned, x)
    assert any(note.startswith('SSA:') for note in spec.notes)


def _kill_channels(model, ratio):
    """Kill as many channels as the pruner removes at `ratio` (round_to None) in every width whose channels can die.

    Torch-Pruning removes size - int(size * (1 - ratio)) channels of a width; the LIM width keeps int(size / 4 *
    (1 - ratio)) positions of each of its 4 conv groups (the same positions in every group), the value width as many
    dims of every head. The residual streams (and the stem output that feeds the first patch embedding) run into
    LayerNorms, whose statistics see a zero channel, so they cannot lose a channel without changing the function:
    the test keeps them whole. Returns the widths the pruned model must have.
    """
    gen = torch.Generator().manual_seed(0)

    def count(size):
        return size - int(size * (1 - ratio))

    def pick(size, repeat=1):  # the same positions in each of `repeat` equal parts
        part = size // repeat
        positions = torch.randperm(part, generator=gen)[:count(part)]
        return torch.cat([positions + r * part for r in range(repeat)])

    expected = {}
    stem = model.stem
    for conv, nxt in ((stem.conv1, stem.conv2), (stem.conv2, stem.conv3)):
        idx = pick(conv.conv.out_channels)
        kill_channels(idx, rows=[conv.conv], norms=[conv.bn], cols=[(nxt.conv, 0)])
    expected['stem.conv2'] = stem.conv2.conv.out_channels - len(idx)
    for name, blk in model.named_modules():
        if not isinstance(blk, compress.models.s2aformer.HybridPerceptionBlock):
            continue
        lim, attn, mlp = blk.lim, blk.attn, blk.mlp
        idx = pick(lim.pw1.out_channels, repeat=lim.pw2.groups)
        positions = idx[idx < lim.pw1.out_channels // lim.pw2.groups]
        kill_channels(idx, rows=[lim.pw1, lim.dw, lim.se.fc2], cols=[(lim.se.fc1, 0)])
        lim.pw2.weight[:, positions] = 0  # grouped: in-group position p of every group
        expected[f'{name}.lim'] = lim.pw1.out_channels - len(idx)
        idx = pick(lim.se.fc1.out_channels)
        kill_channels(idx, rows=[lim.se.fc1], cols=[(lim.se.fc2, 0)])
        idx = pick(mlp.fc1.out_features)
        kill_channels(idx, rows=[mlp.fc1], cols=[(mlp.fc2, 0)])
        expected[f'{name}.mlp'] = mlp.fc1.out_features - len(idx)
        idx = pick(attn.v.out_features, repeat=attn.num_heads)
        kill_channels(idx, rows=[attn.v], cols=[(attn.proj, 0)])
        expected[f'{name}.attn.v'] = attn.v.out_features - len(idx)
    idx = pick(model.conv_head.out_channels)
    kill_channels(idx, rows=[model.conv_head], cols=[(model.head, 0), (model.head_dist, 0)])
    expected['conv_head'] = model.conv_head.out_channels - len(idx)
    return expected


def test_prune_dead_channels_keeps_the_function():
    # every width that can die gets exactly as many dead channels as the pruner removes: group_norm ranks them last,
    # so if the rules keep every group aligned (grouped LIM convs, value heads, the head conv) the function is
    # unchanged. The LayerNorm-fed streams are held with the recipe's `ignore` (see _kill_channels).
    torch.manual_seed(0)
    model = timm.create_model('test_s2aformer').double().eval()
    with torch.no_grad():
        # signal-preserving weights, non-trivial norms and biases (the default init nearly silences the attention)
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.normal_(0, m.weight[0].numel() ** -0.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
        expected = _kill_channels(model, 0.5)
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
        reference = model(x)
    ignore = ['stem.conv3'] + [f'stages.{i}.downsample' for i in range(4)]
    pruned, _ = _prune(model, 0.5, round_to=None, ignore=ignore)
    blk = pruned.stages[2].blocks[1]
    widths = {
        'stem.conv2': pruned.stem.conv2.conv.out_channels,
        'stages.2.blocks.1.lim': blk.lim.pw1.out_channels,
        'stages.2.blocks.1.mlp': blk.mlp.fc1.out_features,
        'stages.2.blocks.1.attn.v': blk.attn.v.out_features,
        'conv_head': pruned.conv_head.out_channels,
    }
    assert widths == {k: expected[k] for k in widths}
    assert [i['num_chs'] for i in pruned.feature_info] == [16, 32, 48, 64]  # held whole
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference, rtol=1e-9, atol=1e-9)
