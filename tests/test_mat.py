"""Tests for compress/models/mat.py (MAT, Vo 2023 dissertation, Chapter 4; a re-implementation from the text).

Published numbers are the dissertation's own: Table 4.3 / 4.12 (variants), Table 4.2 (MAT attention per stage) and
Table 4.9 (ablations), all at 224x224 (see ../shared/notes/emsnet_mat_partialformer.md section 2). Full-size models
are built on the meta device, so counting params and MACs costs shapes only.

MACs: the dissertation's "GFLOPs" are multiply-accumulates counted like fvcore - conv + linear + attention matmuls
+ norms and pooling - i.e. `count_macs(model, input_size, include_norms=True)` here; that is the quantity compared
with the tables. The plain `count_macs` (conv + linear + attention matmuls) is pinned as well.
"""
import math
import types

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import compress.models.mat  # noqa: F401  (registers the entrypoints)
import timm.models._features
from compress.deploy import deploy_form
from compress.models.mat import MAT, BilinearPatchEmbed, MATAttention, checkpoint_filter_fn
from eval.complexity import count_macs, count_params
from pruned_models import check_pruned_model_runs

RES = (3, 224, 224)

# Table 4.3 (= Table 4.12 layouts): params (M) and GFLOPs (= GMACs) at 224
PUBLISHED = {
    'mat_1': (6.714, 0.389),
    'mat_2': (10.767, 0.666),
    'mat_3': (17.008, 1.042),
    'mat_4': (29.057, 1.933),
    'mat_5': (50.108, 3.156),
}
# this implementation's exact counts at 224: params, fvcore-convention MACs, plain count_macs
OURS = {
    'mat_1': (6_654_502, 374_096_672, 370_154_720),
    'mat_2': (10_664_702, 646_188_160, 640_994_944),
    'mat_3': (16_854_550, 1_018_037_168, 1_011_371_600),
    'mat_4': (28_851_838, 1_894_393_664, 1_884_440_000),
    'mat_5': (49_843_054, 3_117_750_784, 3_106_047_232),
}
# Table 4.2 (MAT-2 with MAT attention from stage k on, pure MLP before) and Table 4.9 rows: params (M), GFLOPs
ABLATIONS = {
    'pure_mlp': (('mlp', 'mlp', 'mlp', 'mlp'), 5.699, 0.461),
    'window_3_4': (('mlp', 'mlp', 'window', 'window'), 7.802, 0.659),
    'mat_4_only': (('mlp', 'mlp', 'mlp', 'mat'), 9.767, 0.568),
    'mat_3_4': (('mlp', 'mlp', 'mat', 'mat'), 10.767, 0.666),
    'mat_2_4': (('mlp', 'mat', 'mat', 'mat'), 10.852, 0.707),
    'mat_1_4': (('mat', 'mat', 'mat', 'mat'), 10.874, 0.783),
}


def _meta(name, **kwargs):
    return timm.create_model(name, device='meta', **kwargs).eval()


def _counts(model, res=RES):
    return count_params(model), count_macs(model, res, include_norms=True)


def _mat2_row(mixers):
    return _counts(_meta('mat_2', stage_mixers=mixers))


# --- registry / anatomy --------------------------------------------------------------------------------------------

def test_registry():
    names = timm.list_models('mat_*') + timm.list_models('test_mat')
    assert sorted(names) == ['mat_1', 'mat_2', 'mat_3', 'mat_4', 'mat_5', 'test_mat']
    for name in names:
        assert timm.models.model_entrypoint(name).__module__ == 'compress.models.mat'
        cfg = timm.models.get_pretrained_cfg(name)
        assert not cfg.url and not cfg.hf_hub_id  # no official weights exist
        assert 're-implementation' in cfg.notes[0]
    assert timm.models.get_pretrained_cfg('test_mat').input_size == (3, 64, 64)
    assert compress.models.mat.__all__[0] == 'MAT' and isinstance(timm.create_model('test_mat'), MAT)


def test_layout_follows_table_4_12():
    model = _meta('mat_3')
    assert [m.out_channels for m in (model.stem.conv1, model.stem.conv2, model.stem.conv3)] == [18, 18, 36]
    assert model.stem.conv2.groups == 18 and model.stem.conv2.stride == (1, 1)
    assert [len(s.blocks) for s in model.stages] == [2, 2, 8, 8]
    assert [s.blocks[0].attn is None for s in model.stages] == [True, True, False, False]  # pure MLP in stages 1-2
    assert [s.blocks[0].attn.num_heads for s in model.stages[2:]] == [8, 16]
    assert all(s.blocks[0].mlp.fc1.out_features == 4 * s.blocks[0].mlp.fc1.in_features for s in model.stages)
    assert isinstance(model.stages[0].downsample, nn.Identity)
    for i, stage in enumerate(model.stages[1:]):
        pe = stage.downsample  # 3x3 DWconv s2 C, 1x1 conv 2C, bilinear sampling
        assert pe.offset_dw.groups == pe.offset_dw.in_channels == 36 * 2 ** i and pe.offset_dw.stride == (2, 2)
        assert pe.proj.out_channels == 2 * pe.proj.in_channels and pe.offset_head.out_channels == 2
    assert model.stages[2].blocks[0].attn.window_size == 7
    assert model.pre_logits.conv.out_channels == model.head.in_features == 1280


# --- size against the dissertation -------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(PUBLISHED))
def test_params_against_table_4_3(name):
    params = count_params(_meta(name))
    assert params == OURS[name][0]
    published = PUBLISHED[name][0] * 1e6
    assert abs(params / published - 1) < 0.01  # all variants are 0.5-1.0 % low (module docstring)


@pytest.mark.parametrize('name', [
    pytest.param('mat_1', marks=pytest.mark.xfail(strict=True, reason='-3.8 %: the unexplained stage-4 cost')),
    'mat_2', 'mat_3', 'mat_4', 'mat_5',
])
def test_macs_against_table_4_3(name):
    # fvcore convention (conv + linear + attention matmuls + norms + pooling) against the published GFLOPs
    macs = count_macs(_meta(name), RES, include_norms=True)
    assert abs(macs / (PUBLISHED[name][1] * 1e9) - 1) < 0.03


@pytest.mark.parametrize('name', list(PUBLISHED))
def test_macs_pinned(name):
    model = _meta(name)
    _, fvcore, plain = OURS[name]
    assert count_macs(model, RES, include_norms=True) == fvcore
    assert count_macs(model, RES) == plain
    # every variant is low, MAT-1 most (-3.8 %), none by more than 4 %
    assert -0.04 < fvcore / (PUBLISHED[name][1] * 1e9) - 1 < 0


def test_macs_cpu_matches_meta():
    # on CPU the attention runs through the SDPA CPU kernel, counted by the project's formula
    model = timm.create_model('test_mat').eval()
    assert count_macs(model, (3, 64, 64)) == count_macs(_meta('test_mat'), (3, 64, 64))


def test_pure_mlp_ablation():
    # Table 4.9 "Pure MLP": stem, pure-MLP blocks everywhere, Bilinear PE and the 1280 head - everything but attention
    params, macs = _mat2_row(ABLATIONS['pure_mlp'][0])
    assert abs(params / 5.699e6 - 1) < 0.001
    assert abs(macs / 0.461e9 - 1) < 0.005
    # the 1280 pre-logits layer must run before pooling: after pooling, the same params miss the table by > 3 %
    model = _meta('mat_2', stage_mixers=ABLATIONS['pure_mlp'][0])

    def pool_first(self, x, pre_logits=False):
        return self.head(self.flatten(self.pre_logits(self.global_pool(x))))
    model.forward_head = types.MethodType(pool_first, model)
    assert count_params(model) == params
    assert count_macs(model, RES, include_norms=True) / 0.461e9 - 1 < -0.03


@pytest.mark.parametrize('stage', [1, 2, 3])
def test_mat_cost_per_stage_table_4_2(stage):
    # cost of putting MAT blocks into stage `stage` (Table 4.2 rows differ by one stage): checks the attention
    # itself (projections, abstract tokens, relative position bias, matmuls) independently of stem, PE and head
    rows = {4: 'mat_4_only', 3: 'mat_3_4', 2: 'mat_2_4', 1: 'mat_1_4'}
    with_mat, without = ABLATIONS[rows[stage]], ABLATIONS[rows[stage + 1]]
    ours_with, ours_without = _mat2_row(with_mat[0]), _mat2_row(without[0])
    published_params = (with_mat[1] - without[1]) * 1e6  # 22 k / 85 k / 1000 k
    published_macs = (with_mat[2] - without[2]) * 1e9  # 76 M / 41 M / 98 M
    assert abs((ours_with[0] - ours_without[0]) / published_params - 1) < 0.03
    assert abs((ours_with[1] - ours_without[1]) / published_macs - 1) < 0.03


def test_mat_over_window_attention_table_4_9():
    # MAT attention adds 2.965 M params over plain window attention (6.03 C^2 per block) for +0.007 GFLOPs
    window, mat = _mat2_row(ABLATIONS['window_3_4'][0]), _mat2_row(ABLATIONS['mat_3_4'][0])
    assert abs((mat[0] - window[0]) / 2.965e6 - 1) < 0.001
    assert 0.006e9 < mat[1] - window[1] < 0.010e9  # ours 9.4 M; published 7 +- 1 M


def test_stage4_attention_gap():
    # the one published cost not reproduced: every row with attention in stage 4 carries ~100 k params and ~20 M
    # MACs more than this reconstruction, the pure-MLP row does not (module docstring, "Not reproduced")
    for name, (mixers, params_m, gmacs) in ABLATIONS.items():
        params, macs = _mat2_row(mixers)
        param_gap, mac_gap = params_m * 1e6 - params, gmacs * 1e9 - macs
        if mixers[3] == 'mlp':
            assert 0 < param_gap < 5e3 and 0 < mac_gap < 2e6, name
        else:
            assert 95e3 < param_gap < 110e3 and 17e6 < mac_gap < 24e6, name


class ConvPatchEmbed(nn.Module):
    """Table 4.9 alternative: 3x3 stride-2 conv + BN."""

    def __init__(self, in_chs, out_chs):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_chs)

    def forward(self, x):
        return self.norm(self.conv(x))


class PatchMerging(nn.Module):
    """Table 4.9 alternative: Swin patch merging (2x2 neighbours concatenated, LayerNorm, Linear 4C -> 2C)."""

    def __init__(self, in_chs, out_chs):
        super().__init__()
        self.norm = nn.LayerNorm(4 * in_chs)
        self.reduction = nn.Linear(4 * in_chs, out_chs, bias=False)

    def forward(self, x):
        B, C, H, W = x.shape
        x = x.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 3, 5, 1).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x)).permute(0, 3, 1, 2)


@pytest.mark.parametrize('alternative,published_params,published_macs', [
    (ConvPatchEmbed, 11.107 - 10.767, 0.703 - 0.666),
    (PatchMerging, 10.892 - 10.767, None),  # its MAC delta (13 M) depends on how the 4C LayerNorm was counted
])
def test_bilinear_pe_against_table_4_9(alternative, published_params, published_macs):
    base = _counts(_meta('mat_2'))
    model = _meta('mat_2')
    with torch.device('meta'):
        for stage in model.stages[1:]:
            pe = stage.downsample
            stage.downsample = alternative(pe.proj.in_channels, pe.proj.out_channels)
    params, macs = _counts(model)
    assert abs((params - base[0]) / (published_params * 1e6) - 1) < 0.02
    if published_macs is not None:
        assert abs((macs - base[1]) / (published_macs * 1e9) - 1) < 0.03


# --- MAT attention semantics ---------------------------------------------------------------------------------------

def _randomize(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def _heads(t, num_heads):
    """(n, C) -> (h, n, C/h)"""
    return t.reshape(t.shape[0], num_heads, -1).transpose(0, 1)


def _softmax_attention(q, k, v, bias=None):
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    return logits.softmax(-1) @ v


def reference_attention(attn: MATAttention, x: torch.Tensor) -> torch.Tensor:
    """Window by window, as Sec. 4.3.1 reads (zero padding to whole windows, crop at the end). x: B, H, W, C."""
    B, H, W, C = x.shape
    w, h = attn.window_size, attn.num_heads
    x = F.pad(x, (0, 0, 0, (-W) % w, 0, (-H) % w))
    Hp, Wp = x.shape[1:3]
    mix = attn.abstract_token is not None
    bias = None
    if attn.relative_position_bias_table is not None:
        ys, xs = torch.meshgrid(torch.arange(w), torch.arange(w), indexing='ij')
        ys, xs = ys.flatten(), xs.flatten()
        rel = (ys[:, None] - ys[None, :] + w - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)
        bias = attn.relative_position_bias_table[rel].permute(2, 0, 1)  # h, w*w, w*w
    out = torch.zeros(B, Hp, Wp, C)
    for b in range(B):
        windows = [(i, j) for i in range(0, Hp, w) for j in range(0, Wp, w)]
        abstract, queries, local = [], [], []
        for i, j in windows:
            tokens = x[b, i:i + w, j:j + w].reshape(w * w, C)
            if mix:
                tokens = torch.cat([attn.abstract_token.reshape(1, C), tokens])
            q, k, v = (_heads(t, h) for t in attn.qkv(tokens).chunk(3, dim=-1))
            full_bias = None
            if bias is not None:
                full_bias = torch.zeros(h, len(tokens), len(tokens))
                full_bias[:, -w * w:, -w * w:] = bias  # image-image pairs only
            y = _softmax_attention(q, k, v, full_bias)  # h, n, d
            if mix:
                abstract.append(y[:, 0].reshape(C))
                queries.append(q[:, 1:])
                y = y[:, 1:]
            local.append(y)
        if mix:
            tokens = torch.stack(abstract)  # N_w, C: one per window, mixed across the image
            q, k, v = (_heads(t, h) for t in attn.mix_qkv(tokens).chunk(3, dim=-1))
            mixed = attn.mix_proj(_softmax_attention(q, k, v).transpose(0, 1).reshape(len(windows), C))
            k_a, v_a = (_heads(t, h) for t in attn.fuse_kv(mixed).chunk(2, dim=-1))
            local = [y + _softmax_attention(q_img, k_a, v_a) for y, q_img in zip(local, queries)]
        for (i, j), y in zip(windows, local):
            out[b, i:i + w, j:j + w] = y.transpose(0, 1).reshape(w, w, C)
    return attn.proj(out[:, :H, :W])


@pytest.mark.parametrize('mix', [True, False])
@pytest.mark.parametrize('rel_pos_bias', [True, False])
@pytest.mark.parametrize('size', [(5, 7), (8, 8)])  # padded to 2 x 3 windows of 3 / exact 2 x 2 windows of 4
def test_attention_matches_window_by_window_reference(mix, rel_pos_bias, size):
    window = 3 if size == (5, 7) else 4
    attn = _randomize(MATAttention(12, 3, window_size=window, mix_abstract_tokens=mix, rel_pos_bias=rel_pos_bias))
    x = torch.randn(2, *size, 12)
    with torch.no_grad():
        expected = reference_attention(attn, x)
        torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)
        attn.fused_attn = not attn.fused_attn  # both attention paths
        torch.testing.assert_close(attn(x), expected, rtol=1e-4, atol=1e-5)


def test_abstract_tokens_exchange_information_across_windows():
    # changing one window reaches every other window through the mixed abstract tokens, and only through them
    x = torch.randn(1, 8, 8, 16)
    x2 = x.clone()
    x2[:, :4, :4] += 1.  # top-left window of four
    for mix, crosses in [(True, True), (False, False)]:
        attn = _randomize(MATAttention(16, 2, window_size=4, mix_abstract_tokens=mix)).eval()
        with torch.no_grad():
            delta = (attn(x2) - attn(x))[:, 4:, 4:].abs().max()  # bottom-right window
        assert (delta > 1e-3) if crosses else (delta == 0)


def test_bilinear_pe_sampling():
    torch.manual_seed(0)
    pe = BilinearPatchEmbed(4, 8).eval()
    with torch.no_grad():
        pe.norm.running_mean.uniform_(-1, 1)
        pe.norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 8, 10)
    with torch.no_grad():
        def project(sampled):
            return pe.norm(pe.proj(sampled))
        # zero-initialised offsets: the reference points are the 2x2 cell centres, bilinear = 2x2 average
        assert not pe.offset_head.weight.any() and not pe.offset_head.bias.any()
        pooled = F.avg_pool2d(x, 2)
        torch.testing.assert_close(pe(x), project(pooled))
        # offsets are in input pixels, (dx, dy): +2 px in x samples the next cell's centre (zeros beyond the border)
        pe.offset_head.bias.copy_(torch.tensor([2., 0.]))
        torch.testing.assert_close(pe(x), project(F.pad(pooled[..., 1:], (0, 1))))
        pe.offset_head.bias.copy_(torch.tensor([0., -2.]))
        torch.testing.assert_close(pe(x), project(F.pad(pooled[..., :-1, :], (0, 0, 1, 0))))
    # odd sizes: ceil(H / 2) outputs, as the stride-2 offset conv
    assert pe(torch.randn(1, 4, 7, 5)).shape == (1, 8, 4, 3)
    # offsets are learned: gradients reach the offset path once they are non-zero
    pe.train()
    pe.offset_head.weight.data.normal_(0, 0.1)
    pe.offset_head.bias.data.fill_(0.3)
    pe(x).square().sum().backward()
    assert pe.offset_head.weight.grad.abs().sum() > 0 and pe.offset_dw.weight.grad.abs().sum() > 0


# --- forward / features / export -----------------------------------------------------------------------------------

def test_test_mat_is_small_and_mirrors_224():
    model = timm.create_model('test_mat').eval()
    assert count_params(model) < 500_000
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model.forward_head(feats)
    assert feats.shape == (2, 64, 2, 2) and out.shape == (2, 1000) and torch.isfinite(out).all()
    # window 2 at 64 px: stage 3 (4x4) holds four windows and stage 4 (2x2) one, as window 7 at 224 px
    assert model.stages[2].blocks[0].attn.window_size == 2


@pytest.mark.parametrize('res', [(57, 57), (80, 48), (33, 70)])
def test_sizes_not_multiple_of_window_pad_and_crop(res):
    model = timm.create_model('test_mat').eval()
    x = torch.randn(1, 3, *res)
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
        out = model(x)
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
    size = [math.ceil(math.ceil(s / 2) / 2) for s in res]  # two stride-2 stem convs
    for f in feats:
        assert list(f.shape[-2:]) == size
        size = [math.ceil(s / 2) for s in size]  # each Bilinear PE


def test_full_size_forward_224():
    model = timm.create_model('mat_2').eval()
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, 224, 224))
        out = model.forward_head(feats)
    assert feats.shape == (1, 256, 7, 7) and out.shape == (1, 1000) and torch.isfinite(out).all()


def test_forward_train_backward():
    model = timm.create_model('test_mat', num_classes=10, drop_path_rate=0.1)
    model.set_grad_checkpointing(True)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.sum().backward()
    # the offset heads start at zero, so their inputs get no gradient on the first step; everything else does
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert all('offset_dw' in n for n in missing)



@pytest.mark.parametrize('size', [64, 80])  # exact windows / padded windows in stages 3 and 4
def test_deploy_form_is_the_same_function(size):
    model = _randomize(timm.create_model('test_mat')).double().eval()
    deploy = deploy_form(model)
    attns = [m for m in deploy.modules() if isinstance(m, MATAttention)]
    # the abstract token lives on as its q / k / v row (still a parameter, for QAT on the deploy form)
    assert all(a.abstract_token is None and a.token_qkv.shape == (1, 1, a.qkv.out_features) for a in attns)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), model(x), rtol=1e-12, atol=1e-12)
        for a in attns:
            a.fused_attn = not a.fused_attn
        torch.testing.assert_close(deploy(x), model(x), rtol=1e-12, atol=1e-12)


def test_openvino_int8_runs_every_matmul_in_int8():
    # the qkv input used to be a concat of quantized image tokens and the float abstract token, which the CPU plugin
    # ran as a float matmul with int8 weights; in the deploy form qkv reads the image tokens alone
    from compress.stages.ptq_int8 import nncf_settings, quantize_openvino
    from eval.runtimes import OpenVINORunner
    model = deploy_form(_randomize(timm.create_model('test_mat')).eval())
    settings = nncf_settings(model, (3, 64, 64))
    assert (settings['model_type'], settings['preset'], settings['smooth_quant']) == ('transformer', 'performance',
                                                                                     False)
    int8, _ = quantize_openvino(model, [torch.randn(4, 3, 64, 64) for _ in range(2)], settings)
    linears = {name: precision for precision, names in OpenVINORunner(int8, 'int8').runtime_precisions().items()
               for name in names if 'aten::linear' in name}
    assert sum('attn.qkv' in name for name in linears) == 2 + 2  # stages 3 and 4
    assert {name: p for name, p in linears.items() if p not in ('i8', 'u8')} == {}

def test_classifier_and_optimizer_groups():
    model = timm.create_model('test_mat', num_classes=7)
    assert model.get_classifier().out_features == 7
    x = torch.randn(1, 3, 64, 64)
    model.reset_classifier(0)
    assert model(x).shape == (1, 256)  # the pre-logits width (1280 in the full variants)
    model.reset_classifier(3, '')
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 256, 2, 2)
    nwd = model.no_weight_decay()
    assert len(nwd) == 2 * 4 and all('relative_position_bias_table' in n or 'abstract_token' in n for n in nwd)
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))


def test_bilinear_pe_exports_as_one_op():
    # export with a dynamic batch: tests/test_backbone_anatomy.py
    exported = torch.export.export(timm.create_model('test_mat').eval(), (torch.randn(2, 3, 64, 64),))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == 'call_function'}
    assert any('grid_sampler' in op for op in ops)  # the Bilinear PE survives as one op, no custom kernel


@pytest.mark.slow
def test_compile_matches_eager():
    torch.manual_seed(0)
    model = _randomize(timm.create_model('test_mat')).eval()
    x = torch.randn(2, 3, 80, 80)  # padded windows in stages 3 and 4
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            compiled = torch.compile(model)(x)
            eager = model(x)
    finally:
        torch._dynamo.reset()
    assert eager.abs().max() > 1e-2
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_meta_build_then_materialize():
    # the relative position index is a derived buffer: it must be valid after a meta build + to_empty
    model = timm.create_model('test_mat', device='meta')
    model.to_empty(device='cpu')
    for m in model.modules():
        if isinstance(m, MATAttention):
            m.init_non_persistent_buffers()
    reference = timm.create_model('test_mat')
    for a, b in zip(model.buffers(), reference.buffers()):
        if a.dtype == torch.long and a.ndim == 2:
            assert torch.equal(a, b)


# --- checkpoints ---------------------------------------------------------------------------------------------------

def test_checkpoint_roundtrip_through_timm(tmp_path):
    torch.manual_seed(0)
    source = _randomize(timm.create_model('test_mat', num_classes=10)).eval()
    path = tmp_path / 'mat.pth'
    torch.save({'model': {'module.' + k: v for k, v in source.state_dict().items()}, 'epoch': 3}, path)
    assert not any('relative_position_index' in k for k in source.state_dict())  # derived, not stored
    model = timm.create_model(
        'test_mat', pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


# --- structured pruning through compress.stages.prune (Torch-Pruning + compress.stages.families.mat) ---------------

def _prune(model, ratio, res=64, **cfg):
    from compress.config import PruneStage
    from compress.stages.prune import prune_model
    example = torch.randn(2, 3, res, res, dtype=next(model.parameters()).dtype)
    return prune_model(model, PruneStage(ratio=ratio, **cfg), ratio, example)


def _check_pruned(pruned, x):
    """Widths the forward relies on agree; feature_info / num_features match the real outputs; it trains, exports."""
    for attn in pruned.modules():
        if isinstance(attn, MATAttention):
            width = attn.proj.in_features
            assert attn.qkv.out_features == 3 * width and width % attn.num_heads == 0
            assert attn.fuse_kv.out_features == 2 * width and attn.mix_qkv.in_features == width
            assert attn.mix_qkv.out_features % (3 * attn.num_heads) == 0
            assert attn.mix_proj.out_features == attn.fuse_kv.in_features
            assert attn.relative_position_bias_table.shape[1] == attn.num_heads
            assert attn.abstract_token.shape[-1] == attn.qkv.in_features
        elif isinstance(attn, BilinearPatchEmbed):
            assert attn.offset_head.out_channels == 2
            assert attn.offset_dw.out_channels == attn.offset_head.in_channels == attn.proj.in_channels
    assert pruned.head.out_features == 1000 and pruned.head.in_features == pruned.head_hidden_size
    check_pruned_model_runs(pruned, x)


# measured macs_kept at 224 (count_macs), seed 0; round_to=8 over-prunes the 8..64-wide test model
@pytest.mark.parametrize('ratio, round_to, macs_kept', [
    (0.3, 8, 0.457), (0.3, None, 0.492), (0.5, 8, 0.394), (0.5, None, 0.300),
])
def test_prune_test_mat(ratio, round_to, macs_kept):
    torch.manual_seed(0)
    model = timm.create_model('test_mat').eval()
    params, macs = count_params(model), count_macs(model, RES)
    pruned, spec = _prune(model, ratio, round_to=round_to)
    assert count_params(pruned) < params
    assert count_macs(pruned, RES) / macs == pytest.approx(macs_kept, abs=0.01)
    assert any(note.startswith('Bilinear PE') for note in spec.notes)
    old, new = model.stages[3].blocks[0].attn, pruned.stages[3].blocks[0].attn
    assert new.num_heads == old.num_heads and new.qkv.out_features < old.qkv.out_features  # head dims, not heads
    assert new.mix_proj.out_features < old.mix_proj.out_features  # the mixing width (pruned after tp's pass)
    assert pruned.stages[2].downsample.proj.in_channels < model.stages[2].downsample.proj.in_channels
    _check_pruned(pruned, torch.randn(2, 3, 64, 64))


def test_prune_whole_heads_is_refused():
    with pytest.raises(ValueError, match="whole attention heads cannot be pruned"):
        _prune(timm.create_model('test_mat').eval(), 0.5, heads='heads')


def test_bilinear_pe_pruner_slices_inputs_and_outputs():
    # the PE is one customized layer: input channels go from the offset conv, offset-head and proj inputs together
    from compress.stages.families.mat import pruning_spec
    pruner = pruning_spec(timm.create_model('test_mat')).customized_pruners[BilinearPatchEmbed]
    pe = _randomize(BilinearPatchEmbed(8, 16)).double().eval()
    dead, keep = [1, 4, 6], [0, 2, 3, 5, 7]
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    x[:, dead] = 0
    with torch.no_grad():
        pe.offset_dw.bias[dead] = 0  # dead inputs then move no offset
        expected = pe(x)
        pruner.prune_in_channels(pe, dead)
        assert pruner.get_in_channels(pe) == pe.offset_dw.groups == 5 and pe.offset_head.out_channels == 2
        torch.testing.assert_close(pe(x[:, keep]), expected)
        pruner.prune_out_channels(pe, [0, 9])
        assert pruner.get_out_channels(pe) == pe.norm.num_features == 14
        torch.testing.assert_close(pe(x[:, keep]), expected[:, [c for c in range(16) if c not in (0, 9)]])

def _zero_pruned_channels(model, ratio):
    """Zero a random set of channels in every group the pruner cuts inside the blocks, as many as it removes at
    `ratio` (round_to=None), so that group_norm importance picks exactly them and they carry nothing to the output.

    q is zeroed whole (uniform attention: 1 / sqrt(head_dim) is then moot, and the relative position bias, added
    after the scale, still shapes the window attention); k, v, fuse_kv, proj and mix_qkv inputs lose the same dims
    of every head. Returns the widths the pruned model must have.
    """
    gen = torch.Generator().manual_seed(0)

    def pick(size, count):
        return torch.randperm(size, generator=gen)[:count]

    def count(size):  # Torch-Pruning's count at round_to=None
        return size - int(size * (1 - ratio))

    def heads_dims(width, num_heads):  # the same positions in every head
        head_dim = width // num_heads
        return (torch.arange(num_heads)[:, None] * head_dim + pick(head_dim, count(head_dim))).flatten()

    expected = {}
    with torch.no_grad():
        stem = model.stem
        idx = pick(stem.conv1.out_channels, count(stem.conv1.out_channels))
        for t in (stem.conv1.weight, stem.bn1.weight, stem.bn1.bias, stem.conv2.weight, stem.bn2.weight,
                  stem.bn2.bias):
            t[idx] = 0
        stem.conv3.weight[:, idx] = 0
        expected['stem.conv1'] = stem.conv1.out_channels - len(idx)
        head = model.pre_logits
        idx = pick(head.conv.out_channels, count(head.conv.out_channels))
        for t in (head.conv.weight, head.norm.weight, head.norm.bias):
            t[idx] = 0
        model.head.weight[:, idx] = 0
        expected['pre_logits.conv'] = head.conv.out_channels - len(idx)
        for name, blk in model.named_modules():
            if not isinstance(blk, compress.models.mat.Block):
                continue
            idx = pick(blk.mlp.fc1.out_features, count(blk.mlp.fc1.out_features))
            for t in (blk.mlp.fc1.weight, blk.mlp.fc1.bias):
                t[idx] = 0
            blk.mlp.fc2.weight[:, idx] = 0
            expected[f'{name}.mlp.fc1'] = blk.mlp.fc1.out_features - len(idx)
            attn = blk.attn
            if attn is None:
                continue
            width, h = attn.proj.in_features, attn.num_heads
            chans = heads_dims(width, h)
            for t in (attn.qkv.weight, attn.qkv.bias):
                t[:width] = 0
                t[width + chans] = 0
                t[2 * width + chans] = 0
            for t in (attn.fuse_kv.weight, attn.fuse_kv.bias):
                t[chans] = 0
                t[width + chans] = 0
            attn.proj.weight[:, chans] = 0
            attn.mix_qkv.weight[:, chans] = 0
            expected[f'{name}.attn.qkv'] = 3 * (width - len(chans))
            chans = heads_dims(width, h)  # the mixing attention's own heads
            for t in (attn.mix_qkv.weight, attn.mix_qkv.bias):
                t[:width] = 0
                t[width + chans] = 0
                t[2 * width + chans] = 0
            attn.mix_proj.weight[:, chans] = 0
            expected[f'{name}.attn.mix_qkv'] = 3 * (width - len(chans))
            idx = pick(attn.mix_proj.out_features, count(attn.mix_proj.out_features))
            for t in (attn.mix_proj.weight, attn.mix_proj.bias):
                t[idx] = 0
            attn.fuse_kv.weight[:, idx] = 0
            expected[f'{name}.attn.mix_proj'] = attn.mix_proj.out_features - len(idx)
    return expected


def _stream_writers(model):
    # layers writing the residual stream: a stream channel also feeds LayerNorm statistics, so removing it (even
    # zeroed) changes the function; the function test keeps the stream and prunes everything inside the blocks
    return ['stem.conv3'] + [name for name, _ in model.named_modules() if name.endswith(('attn.proj', 'mlp.fc2'))]


@pytest.mark.parametrize('ratio', [0.3, 0.5])
def test_prune_removes_exactly_the_zeroed_channels(ratio):
    model = _randomize(timm.create_model('test_mat')).double().eval()
    expected = _zero_pruned_channels(model, ratio)
    pruned, _ = _prune(model, ratio, round_to=None, ignore=_stream_writers(model))
    modules = dict(pruned.named_modules())
    assert {name: getattr(modules[name], 'out_features', None) or modules[name].out_channels
            for name in expected} == expected
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        expected_out = model(x)
        assert expected_out.std() > 1e-3
        torch.testing.assert_close(pruned(x), expected_out, rtol=1e-10, atol=1e-10)
