"""Tests for compress/models/smt.py (SMT, arXiv 2307.08579).

Sizes come from ../shared/notes/smt_s2aformer.md section 1.3 ("Analytic params", "GMACs (A)" = conv+linear
only, "GMACs (B)" = plus attention matmuls). Full-size variants are built on the meta device, so counting params
and MACs costs shapes only.

MACs: `count_macs` counts what runs ("executed"): the fused MHMC 9x9 depthwise conv over all channels, zero taps
included. The official "tap-exact" numbers (per-head 3/5/7/9 kernels) are executed minus the zero taps, derived
analytically from `MultiHeadMixedConv.num_padded_taps`.
"""
import math
import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import compress.models.smt  # noqa: F401  (registers the entrypoints)
from compress.models.smt import SMT, MultiHeadMixedConv, ScaleAwareModulation, checkpoint_filter_fn
from eval.complexity import count_macs, count_params
from eval.coverage import weight_coverage

aten = torch.ops.aten

# name -> (official params, exact; notes' params in M). Ours must equal the official count exactly.
PARAMS = {
    'smt_t': (11_506_536, 11.51),
    'smt_s': (22_550_952, 22.55),  # paper's 20.5M is a misprint (notes 1.3)
    'smt_b': (32_037_352, 32.04),
    'smt_l': (80_620_264, 80.62),
}
# official configs for the independent official-layout reference (RefSMT below)
REF_CONFIGS = {
    'smt_t': dict(dims=(64, 128, 256, 512), depths=(2, 2, 8, 1), mlp_ratios=(4, 4, 4, 2), head_conv=3),
    'smt_s': dict(dims=(64, 128, 256, 512), depths=(3, 4, 18, 2), mlp_ratios=(4, 4, 4, 2), head_conv=3),
    'smt_b': dict(dims=(64, 128, 256, 512), depths=(4, 6, 28, 2), mlp_ratios=(8, 6, 4, 2), head_conv=7),
    'smt_l': dict(dims=(96, 192, 384, 768), depths=(4, 6, 28, 4), mlp_ratios=(8, 6, 4, 2), head_conv=7,
                  layerscale=True),
}
# (name, res) -> (executed MACs = count_macs, official tap-exact MACs, notes' GMACs (A) conv+linear,
#                 notes' GMACs (B) + attention, paper GMACs); both conventions include the attention matmuls
MACS = {
    ('smt_t', 224): (2_493_381_120, 2_461_268_480, 2.38, 2.46, 2.4),
    ('smt_s', 224): (4_897_037_312, 4_838_833_152, 4.66, 4.84, 4.7),
    ('smt_b', 224): (8_050_197_504, 7_965_901_824, 7.69, 7.97, 7.7),
    ('smt_l', 224): (18_033_570_816, 17_907_127_296, 17.48, 17.91, None),  # paper 17.7 / README 17.6: neither
    ('smt_l', 384): (55_432_574_976, 55_060_985_856, 51.37, 55.06, None),  # paper 54.6 ~ (B), README 51.6 ~ (A)
}


def _padded_macs(model, res):
    # zero taps the fused MHMC convs execute; each runs at its stage's resolution, res / (4 * 2 ** stage)
    return sum(
        m.num_padded_taps * (res // (4 * 2 ** int(name.split('.')[1]))) ** 2
        for name, m in model.named_modules() if isinstance(m, MultiHeadMixedConv)
    )


def _attention_macs(model, res):
    # q @ k^T and attn @ v: 2 * N^2 * C per MSA block
    total = 0
    for i, stage in enumerate(model.stages):
        n = (res // (4 * 2 ** i)) ** 2
        for blk in stage.blocks:
            if isinstance(blk.attn, compress.models.smt.Attention):
                total += 2 * n * n * blk.attn.q.out_features
    return total


def _conv_linear_macs(model, res):
    # second count that keeps only conv and linear ops (what ptflops-style counters see)
    counter = FlopCounterMode(display=False)
    device = next(model.parameters()).device
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, res, res, device=device))
    flops = counter.get_flop_counts()['Global']
    return sum(flops.get(op, 0) for op in (aten.convolution, aten.addmm, aten.mm)) // 2


# --- registry / anatomy --------------------------------------------------------------------------------------------

def test_registry():
    names = timm.list_models('smt_*') + timm.list_models('test_smt')
    assert sorted(names) == ['smt_b', 'smt_l', 'smt_s', 'smt_t', 'test_smt']
    for name in names:
        assert timm.models.model_entrypoint(name).__module__ == 'compress.models.smt'
    cfg = timm.models.get_pretrained_cfg('smt_l')
    assert cfg.input_size == (3, 384, 384) and cfg.hf_hub_id is None and cfg.url.startswith('https://github.com/AFeng-x/SMT/releases/')
    assert cfg.paper_ids == 'arXiv:2307.08579' and cfg.license == 'mit'


def test_stage_layout():
    model = timm.create_model('smt_t', device='meta')
    kinds = [[type(b.attn).__name__ for b in s.blocks] for s in model.stages]
    assert kinds[0] == kinds[1] == ['ScaleAwareModulation'] * 2
    assert kinds[2] == ['ScaleAwareModulation', 'Attention'] * 4  # evolutionary hybrid stage starts with SAM
    assert kinds[3] == ['Attention']
    assert [b.attn.num_heads for b in model.stages[2].blocks[1::2]] == [8] * 4
    assert model.stages[3].blocks[0].attn.num_heads == 16
    assert model.stem.conv1.kernel_size == (3, 3)
    assert isinstance(model.stages[0].blocks[0].ls1, nn.Identity)
    large = timm.create_model('smt_l', device='meta')
    assert large.stem.conv1.kernel_size == (7, 7)
    assert large.stages[3].blocks[0].ls1.init_values == 1e-4


# --- size ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(PARAMS))
def test_param_count(name):
    model = timm.create_model(name, device='meta')
    official, notes_m = PARAMS[name]
    assert count_params(model) == official
    assert round(official / 1e6, 2) == notes_m
    with torch.device('meta'):  # independent check: the official module layout, built from the official config
        assert count_params(RefSMT(**REF_CONFIGS[name], sa_heads=(1, 1, 8, 16))) == official


@pytest.mark.parametrize('name,res', list(MACS))
def test_macs(name, res):
    model = timm.create_model(name, device='meta').eval()
    executed, tap_exact, notes_a, notes_b, paper = MACS[(name, res)]
    assert count_macs(model, (3, res, res)) == executed  # what runs: fused 9x9 MHMC, zero taps included
    conv_linear = _conv_linear_macs(model, res)
    attention = _attention_macs(model, res)
    padded = _padded_macs(model, res)
    assert executed - conv_linear == attention  # the only non conv/linear MACs are the two attention matmuls
    assert executed - padded == tap_exact  # official per-head kernels: the fused conv's zero taps removed
    assert round((conv_linear - padded) / 1e9, 2) == notes_a
    assert round(tap_exact / 1e9, 2) == notes_b
    if paper is not None:
        assert round((conv_linear - padded) / 1e9, 1) == paper  # paper FLOPs = conv+linear only


def test_macs_cpu_matches_meta():
    # on CPU attention runs through the SDPA flash kernel, counted by the project's formula
    model = timm.create_model('smt_t').eval()
    assert count_macs(model) == MACS[('smt_t', 224)][0]


# --- forward / features / export -----------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['smt_t', 'smt_s', 'smt_b', 'smt_l'])
def test_forward_full(name):
    model = timm.create_model(name).eval()
    res = model.pretrained_cfg['input_size'][-1]
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 3, res, res))
        out = model.forward_head(feats)
    assert feats.shape == (1, model.num_features, *model.pretrained_cfg['pool_size'])
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


def test_forward_train_backward():
    model = timm.create_model('test_smt', num_classes=10, drop_path_rate=0.1)
    model.set_grad_checkpointing(True)
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_classifier():
    model = timm.create_model('test_smt', num_classes=7)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(0)
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 128)
    model.reset_classifier(3, '')
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, 128, 2, 2)
    assert model.no_weight_decay() == set()
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert sum(len(v) for v in groups.values()) == len(list(model.named_parameters()))


def _conv_nodes(graph):
    return [n for n in graph.nodes if n.op == 'call_function' and 'conv' in str(n.target)]


def test_export():
    model = timm.create_model('test_smt').eval()
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x), atol=1e-5)
    # one fused 9x9 depthwise conv per SAM mixer, no per-head convs
    convs = _conv_nodes(exported.graph)
    kernels = [tuple(n.args[1].meta['val'].shape[-2:]) for n in convs]
    num_sam = sum(isinstance(m, ScaleAwareModulation) for m in model.modules())
    assert kernels.count((9, 9)) == num_sam and not {(5, 5), (7, 7)} & set(kernels)
    # stem 2 + downsample 3 + SAM 3 (mhmc, proj0, proj1) + MSA 1 (local conv) + FFN dwconv 1 per block
    num_msa = sum(isinstance(m, compress.models.smt.Attention) for m in model.modules())
    assert len(convs) == 2 + 3 + 3 * num_sam + num_msa + (num_sam + num_msa)


def test_compile_freezing_folds_mhmc_weight():
    # inductor with freezing (as compress.deploy.compile_for_cpu): the per-head kernels are assembled once into a
    # constant 9x9 weight and the compiled code runs one conv, with no pad / stack work per call
    from torch._inductor import config as inductor_config
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    conv = MultiHeadMixedConv(16, num_heads=4).eval()
    x = torch.randn(2, 16, 10, 10)
    torch._dynamo.reset()
    try:
        with inductor_config.patch(freezing=True), torch.no_grad():
            out, (code, *_) = run_and_get_code(torch.compile(conv, dynamic=False), x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
    call = code[code.index('def call('):code.index('def get_args(')]  # what runs per call
    assert len(re.findall(r'= (?:torch\.ops\.mkldnn\._convolution|extern_kernels\.convolution)[\w.]*\(', call)) == 1
    assert re.search(r'_frozen_param\d+ = None  # .*\(16, 1, 9, 9\)', code)  # the assembled weight is a constant
    assert not re.search(r'constant_pad|\bcat\b|stack', call)


# --- fused multi-head mixed conv -----------------------------------------------------------------------------------

class RefSAM(nn.Module):
    """Straightforward SAM mixer in the official layout: a Python loop over per-head convs, then the head shuffle."""

    def __init__(self, dim, num_heads=4, expand_ratio=2):
        super().__init__()
        self.num_heads = num_heads
        self.v = nn.Linear(dim, dim)
        self.s = nn.Linear(dim, dim)
        for i in range(num_heads):
            chs = dim // num_heads
            setattr(self, f'local_conv_{i + 1}', nn.Conv2d(chs, chs, 3 + 2 * i, padding=1 + i, groups=chs))
        self.proj0 = nn.Conv2d(dim, dim * expand_ratio, 1, groups=dim // num_heads)
        self.bn = nn.BatchNorm2d(dim * expand_ratio)
        self.proj1 = nn.Conv2d(dim * expand_ratio, dim, 1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        h = self.num_heads
        v = self.v(x)
        s = self.s(x).reshape(B, H, W, h, C // h).permute(3, 0, 4, 1, 2)  # head, B, C/h, H, W
        heads = [getattr(self, f'local_conv_{i + 1}')(s[i]).reshape(B, C // h, 1, H, W) for i in range(h)]
        s = torch.cat(heads, dim=2).reshape(B, C, H, W)  # channel c * h + i = channel c of head i
        s = self.proj1(F.gelu(self.bn(self.proj0(s)))).reshape(B, C, N).transpose(1, 2)
        return self.proj(s * v)


class RefMSA(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.local_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, H, W):
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).permute(0, 2, 1, 3)
        k, v = self.kv(x).reshape(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // h) ** -0.5).softmax(-1)
        v_img = v.transpose(1, 2).reshape(B, N, C).transpose(1, 2).reshape(B, C, H, W)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C) + self.local_conv(v_img).reshape(B, C, N).transpose(1, 2)
        return self.proj(x)


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Module()
        self.dwconv.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, H, W):
        x = self.fc1(x)
        B, N, C = x.shape
        x = F.gelu(x + self.dwconv.dwconv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2))
        return self.fc2(x)


class RefBlock(nn.Module):
    def __init__(self, dim, use_attn, sa_heads, mlp_ratio, layerscale):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefMSA(dim, sa_heads) if use_attn else RefSAM(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = nn.Parameter(torch.ones(dim)) if layerscale else 1.
        self.gamma_2 = nn.Parameter(torch.ones(dim)) if layerscale else 1.

    def forward(self, x, H, W):
        x = x + self.gamma_1 * self.attn(self.norm1(x), H, W)
        return x + self.gamma_2 * self.mlp(self.norm2(x), H, W)


class RefSMT(nn.Module):
    """Official-layout SMT (module names as AFeng-x/SMT models/smt.py), tokens B x N x C between blocks."""

    def __init__(self, dims, depths, mlp_ratios, sa_heads, head_conv=3, layerscale=False, num_classes=1000):
        super().__init__()
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            if i == 0:
                embed = nn.Module()
                embed.conv = nn.Sequential(
                    nn.Conv2d(3, dim, head_conv, 2, padding=head_conv // 2, bias=False), nn.BatchNorm2d(dim),
                    nn.ReLU(), nn.Conv2d(dim, dim, 2, 2),
                )
            else:
                embed = nn.Module()
                embed.proj = nn.Conv2d(dims[i - 1], dim, 3, 2, padding=1)
            embed.norm = nn.LayerNorm(dim)
            setattr(self, f'patch_embed{i + 1}', embed)
            use_attn = [i == 3 or (i == 2 and j % 2 == 1) for j in range(depth)]
            setattr(self, f'block{i + 1}', nn.ModuleList([
                RefBlock(dim, use_attn[j], sa_heads[i], mlp_ratios[i], layerscale) for j in range(depth)]))
            setattr(self, f'norm{i + 1}', nn.LayerNorm(dim, eps=1e-6))
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        for i in range(4):
            embed = getattr(self, f'patch_embed{i + 1}')
            x = embed.conv(x) if i == 0 else embed.proj(x)
            B, C, H, W = x.shape
            x = embed.norm(x.flatten(2).transpose(1, 2))
            for blk in getattr(self, f'block{i + 1}'):
                x = blk(x, H, W)
            x = getattr(self, f'norm{i + 1}')(x)
            if i < 3:
                x = x.transpose(1, 2).reshape(B, C, H, W)
        return self.head(x.mean(1))


def _randomize(module):
    # non-trivial values everywhere (incl. BN stats, norms, layer scale) so every key must land in the right place
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            is_norm_weight = name.endswith('.weight') and p.ndim == 1
            p.copy_(torch.randn_like(p) * (0.2 if p.ndim > 1 else 0.1) + (1. if is_norm_weight else 0.))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return module


def _loop_mhmc(conv, x):
    """Per-head reference: a Python loop of the official per-head convs on head-interleaved channels."""
    h = conv.num_heads
    outs = [getattr(conv, f'local_conv_{i + 1}')(x[:, i::h]) for i in range(h)]
    return torch.stack(outs, dim=2).flatten(1, 2)  # (B, C/h, h, H, W) -> channel c * h + i


def test_mhmc_structure():
    conv = MultiHeadMixedConv(16, num_heads=4)
    # stored per head exactly as the official module: names, shapes, bias, and nothing else
    shapes = {k: tuple(v.shape) for k, v in conv.state_dict().items()}
    assert shapes == {
        **{f'local_conv_{i + 1}.weight': (4, 1, 3 + 2 * i, 3 + 2 * i) for i in range(4)},
        **{f'local_conv_{i + 1}.bias': (4,) for i in range(4)},
    }
    assert count_params(conv) == 4 * (9 + 25 + 49 + 81) + 16
    # the fused kernel: head-interleaved, each head's kernel centred in 9x9, zeros elsewhere
    weight, bias = conv.fused_weight_bias()
    assert weight.shape == (16, 1, 9, 9) and bias.shape == (16,)
    active = (weight != 0).sum(dim=(1, 2, 3))
    assert active.tolist() == [(2 * (j % 4) + 3) ** 2 for j in range(16)]
    assert conv.num_padded_taps == weight.numel() - int(active.sum()) == 16 * 81 - 4 * 164
    assert torch.equal(weight[5, 0, 2:7, 2:7], conv.local_conv_2.weight[1, 0])  # channel 1 * 4 + head 1
    # official init: normal(0, sqrt(2 / (k * k))) per head, zero bias
    big = MultiHeadMixedConv(4096, num_heads=4)
    for i, c in enumerate(big.head_convs()):
        k = 3 + 2 * i
        assert abs(c.weight.std().item() - (2 / k ** 2) ** 0.5) < 0.05 * (2 / k ** 2) ** 0.5
        assert not c.bias.any()
    # train and eval are the same graph; gradients reach exactly the per-head parameters
    x = torch.randn(2, 16, 11, 11)
    conv.train()(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in conv.parameters())
    assert torch.equal(conv.train()(x), conv.eval()(x))


@pytest.mark.parametrize('dim,num_heads', [(16, 4), (24, 2), (64, 4)])
def test_mhmc_fused_equals_per_head_loop(dim, num_heads):
    conv = _randomize(MultiHeadMixedConv(dim, num_heads=num_heads)).eval()
    x = torch.randn(2, dim, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), _loop_mhmc(conv, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('dim', [16, 64])
def test_sam_fused_equals_per_head_reference(dim):
    ref = _randomize(RefSAM(dim)).eval()
    fused = ScaleAwareModulation(dim, num_heads=4).eval()
    prefix = 'block1.0.attn.'
    converted = checkpoint_filter_fn({prefix + k: v for k, v in ref.state_dict().items()}, None)
    new_prefix = 'stages.0.blocks.0.attn.'
    # official per-head kernels: same key suffix, tensors passed through untouched
    for i in range(4):
        for name in ('weight', 'bias'):
            key = f'local_conv_{i + 1}.{name}'
            assert torch.equal(converted[f'{new_prefix}mhmc.{key}'], ref.state_dict()[key])
    fused.load_state_dict({k[len(new_prefix):]: v for k, v in converted.items()}, strict=True)
    H, W = 12, 10
    x = torch.randn(2, H, W, dim)
    with torch.no_grad():
        expected = ref(x.reshape(2, H * W, dim), H, W).reshape(2, H, W, dim)
        assert torch.allclose(fused(x), expected, atol=1e-5)


@pytest.mark.parametrize('layerscale,legacy_dw_name', [(False, False), (True, True)])
def test_official_checkpoint_loads(layerscale, legacy_dw_name):
    dims, depths, mlp_ratios, sa_heads = (16, 32, 64, 128), (1, 1, 2, 1), (2, 2, 2, 2), (1, 2, 2, 4)
    ref = _randomize(RefSMT(dims, depths, mlp_ratios, sa_heads, layerscale=layerscale)).eval()
    state_dict = {'module.' + k: v for k, v in ref.state_dict().items()}
    if legacy_dw_name:  # some official revisions name the MSA V conv `dw_conv`
        state_dict = {k.replace('attn.local_conv.', 'attn.dw_conv.'): v for k, v in state_dict.items()}
    assert any('local_conv_4' in k for k in state_dict)
    model = timm.create_model('test_smt', layer_scale_init_value=1e-4 if layerscale else None).eval()
    converted = checkpoint_filter_fn({'model': state_dict}, model)
    # every official MHMC key maps by prefix only (block{s}.{j}.attn. -> stages.{s-1}.blocks.{j}.attn.mhmc.)
    official_mhmc = [k for k in state_dict if re.search(r'\.local_conv_\d', k)]
    assert len(official_mhmc) == 3 * 4 * 2  # 3 SAM blocks x 4 heads x (weight, bias)
    for k in official_mhmc:
        s, j, suffix = re.match(r'^module\.block(\d)\.(\d+)\.attn\.(.*)$', k).groups()
        assert torch.equal(converted[f'stages.{int(s) - 1}.blocks.{j}.attn.mhmc.{suffix}'], state_dict[k])
    assert count_params(model) == count_params(ref)
    model.load_state_dict(converted, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # 13 blocks of float32 summation-order noise on logits of magnitude ~3; a mapping error is O(1)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
    # already converted dicts pass through unchanged
    assert checkpoint_filter_fn(model.state_dict(), model).keys() == model.state_dict().keys()


def test_pretrained_file_through_timm(tmp_path):
    # the path a recipe takes: official .pth -> pretrained_cfg_overlay(file=...) -> checkpoint_filter_fn
    ref = _randomize(RefSMT((16, 32, 64, 128), (1, 1, 2, 1), (2, 2, 2, 2), (1, 2, 2, 4), num_classes=10)).eval()
    path = tmp_path / 'smt_official.pth'
    torch.save({'model': ref.state_dict(), 'epoch': 1}, path)
    model = timm.create_model(
        'test_smt', pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)

# --- prunability ---------------------------------------------------------------------------------------------------

def test_prune_attention_heads():
    # drop one of two heads by slicing weights and updating num_heads; head_dim is read from the weights
    model = timm.create_model('test_smt').eval()
    attn = model.stages[2].blocks[1].attn
    assert attn.num_heads == 2
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        keep = torch.arange(32)  # head 0 of q, k, v, local conv and proj input
        reference = attn.proj.weight[:, keep].clone()
        attn.q = _slice_linear(attn.q, out_idx=keep)
        attn.kv = _slice_linear(attn.kv, out_idx=torch.cat([keep, keep + 64]))
        attn.local_conv = _slice_dwconv(attn.local_conv, keep)
        attn.proj = _slice_linear(attn.proj, in_idx=keep)
        attn.num_heads = 1
        assert torch.equal(attn.proj.weight, reference)
        assert model(x).shape == (1, 1000)


def test_prune_mhmc_group():
    # removing one proj0 group (channel c of every head) equals zeroing that group's path into proj1; the MHMC is
    # pruned in place by slicing its per-head weights: no shape attribute needs updating
    torch.manual_seed(0)
    sam = _randomize(ScaleAwareModulation(16, num_heads=4)).eval()
    x = torch.randn(1, 6, 6, 16)
    group, nh, expand = 1, 4, 2
    keep = torch.tensor([c for c in range(16) if c // nh != group])
    keep_head = torch.tensor([c for c in range(16 // nh) if c != group])
    keep_exp = torch.tensor([c for c in range(32) if c // (nh * expand) != group])
    with torch.no_grad():
        pruned = ScaleAwareModulation(16, num_heads=4).eval()
        pruned.load_state_dict(sam.state_dict())
        pruned.s = _slice_linear(pruned.s, out_idx=keep)
        for conv in pruned.mhmc.head_convs():
            conv.weight = nn.Parameter(conv.weight[keep_head])
            conv.bias = nn.Parameter(conv.bias[keep_head])
        pruned.proj0 = nn.Conv2d(12, 24, 1, groups=3)
        pruned.proj0.weight.copy_(sam.proj0.weight[keep_exp])
        pruned.proj0.bias.copy_(sam.proj0.bias[keep_exp])
        bn = nn.BatchNorm2d(24).eval()
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            getattr(bn, name).copy_(getattr(sam.bn, name)[keep_exp])
        pruned.bn = bn
        pruned.proj1 = _slice_conv1x1(sam.proj1, keep_exp)
        sam.proj1.weight[:, [c for c in range(32) if c not in keep_exp]] = 0
        assert torch.allclose(pruned(x), sam(x), atol=1e-5)
        weight, _ = pruned.mhmc.fused_weight_bias()
        assert weight.shape == (12, 1, 9, 9) and torch.equal(weight, sam.mhmc.fused_weight_bias()[0][keep])
        assert count_params(pruned.mhmc) == count_params(sam.mhmc) * 3 // 4


def _slice_linear(layer, out_idx=None, in_idx=None):
    w = layer.weight
    b = layer.bias
    if out_idx is not None:
        w, b = w[out_idx], b[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Linear(w.shape[1], w.shape[0])
    new.weight.data.copy_(w)
    new.bias.data.copy_(b)
    return new


def _slice_dwconv(conv, idx):
    new = nn.Conv2d(len(idx), len(idx), conv.kernel_size, padding=conv.padding, groups=len(idx))
    new.weight.data.copy_(conv.weight[idx])
    new.bias.data.copy_(conv.bias[idx])
    return new


def _slice_conv1x1(conv, in_idx):
    new = nn.Conv2d(len(in_idx), conv.out_channels, 1)
    new.weight.data.copy_(conv.weight[:, in_idx])
    new.bias.data.copy_(conv.bias)
    return new


def test_model_class_exported():
    # register_model appends every entrypoint (incl. test_smt) to __all__: never star-import this module in tests
    assert compress.models.smt.__all__[0] == 'SMT' and 'test_smt' in compress.models.smt.__all__
    assert isinstance(timm.create_model('test_smt'), SMT)


def test_fuse_gives_a_plain_conv_that_pt2e_quantizes():
    from timm.utils.model import reparameterize_model

    from compress.stages.ptq_int8 import quantize_x86_pt2e
    torch.manual_seed(0)
    model = timm.create_model('test_smt').eval()
    fused = reparameterize_model(model)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
    assert not any(type(m).__name__ == 'MultiHeadMixedConv' for m in fused.modules())
    assert weight_coverage(quantize_x86_pt2e(fused, [x]))['int8_weight_fraction'] == 1.0


# --- structured pruning through compress.stages.prune (Torch-Pruning + compress.stages.families.smt) ---------------

def _prune(model, ratio, heads='dims', res=64, **cfg):
    from compress.config import PruneStage
    from compress.stages.prune import prune_model
    torch.manual_seed(0)
    return prune_model(model, PruneStage(ratio=ratio, heads=heads, **cfg), ratio, torch.randn(2, 3, res, res))


def _mixers(model, kind):
    return [m for m in model.modules() if isinstance(m, kind)]


def _check_structure(model):
    """Every width the forward relies on agrees with its neighbours; returns {Attention: (num_heads, head_dim)}."""
    heads = {}
    for sam in _mixers(model, ScaleAwareModulation):
        h = sam.mhmc.num_heads
        per_head = {tuple(conv.weight.shape[:2]) for conv in sam.mhmc.head_convs()}
        assert len(per_head) == 1  # every MHMC head equally wide
        width = per_head.pop()[0]
        assert sam.mhmc.fused_weight_bias()[0].shape[0] == sam.s.out_features == width * h
        assert sam.proj0.in_channels == sam.s.out_features and sam.proj0.groups == width  # one group per channel c
        assert sam.proj0.weight.shape[:2] == (sam.proj0.out_channels, h)
        assert sam.proj0.out_channels % sam.proj0.groups == 0
        assert sam.bn.num_features == sam.proj1.in_channels == sam.proj0.out_channels
        assert sam.v.out_features == sam.proj1.out_channels == sam.proj.in_features
    for attn in _mixers(model, compress.models.smt.Attention):
        width = attn.q.out_features
        assert width % attn.num_heads == 0
        assert attn.kv.out_features == 2 * width
        assert attn.local_conv.in_channels == attn.local_conv.out_channels == attn.local_conv.groups == width
        assert attn.proj.in_features == width
        assert not hasattr(attn.local_conv, 'out_features')  # the pruning-time hint is gone
        heads[attn] = (attn.num_heads, width // attn.num_heads)
    for blk in model.modules():
        if isinstance(blk, compress.models.smt.DetailMlp):
            assert blk.fc1.out_features == blk.dwconv.out_channels == blk.dwconv.groups == blk.fc2.in_features
    return heads


def test_pruning_spec():
    from compress.stages.prune import pruning_spec
    model = timm.create_model('test_smt').eval()
    spec = pruning_spec(model)
    assert set(spec.ignored_layers) == {model.head} | {m.mhmc for m in _mixers(model, ScaleAwareModulation)}
    attns = _mixers(model, compress.models.smt.Attention)
    assert spec.num_heads == {layer: a.num_heads for a in attns for layer in (a.q, a.local_conv)}
    assert list(spec.customized_pruners) == [MultiHeadMixedConv]
    assert any(note.startswith('SAM:') for note in spec.notes) and any('MSA' in n for n in spec.notes)
    assert spec.unwrapped_parameters == {}  # no layer scale here; with it tp finds the gammas itself


def test_mhmc_pruner_removes_whole_groups():
    # the customized pruner slices the per-head kernels; fused channel c * 4 + i is channel c of head i
    from compress.stages.families.smt import pruning_spec
    pruner = pruning_spec(timm.create_model('test_smt')).customized_pruners[MultiHeadMixedConv]
    conv = _randomize(MultiHeadMixedConv(16, num_heads=4)).eval()
    reference, _ = conv.fused_weight_bias()
    x = torch.randn(1, 16, 7, 7)
    with torch.no_grad():
        expected = conv(x)[:, [c for c in range(16) if c // 4 != 2]]
        with pytest.raises(ValueError, match='whole groups'):
            pruner.prune_out_channels(conv, [8, 9])  # half of group 2
        assert pruner.get_out_channels(conv) == 16
        pruner.prune_in_channels(conv, [8, 9, 10, 11])  # group 2 = channel 2 of every head
        assert pruner.get_in_channels(conv) == 12
        assert all(c.weight.shape[0] == c.bias.shape[0] == 3 for c in conv.head_convs())
        assert torch.equal(conv.fused_weight_bias()[0], reference[[c for c in range(16) if c // 4 != 2]])
        torch.testing.assert_close(conv(x[:, [c for c in range(16) if c // 4 != 2]]), expected)


@pytest.mark.parametrize('heads', ['dims', 'heads'])
@pytest.mark.parametrize('ratio', [0.3, 0.5])
def test_prune_test_smt(ratio, heads):
    from timm.utils.model import reparameterize_model

    from compress.stages.ptq_int8 import quantize_x86_pt2e
    model = timm.create_model('test_smt').eval()
    before = _check_structure(model)
    params, macs = count_params(model), count_macs(model, (3, 160, 160))
    pruned, spec = _prune(model, ratio, heads, res=160)
    assert count_params(model) == params and not hasattr(model.stages[3].blocks[0].attn.local_conv, 'out_features')

    after = _check_structure(pruned)
    assert count_params(pruned) < params and count_macs(pruned, (3, 160, 160)) < macs
    for new, old in zip(_mixers(pruned, ScaleAwareModulation), _mixers(model, ScaleAwareModulation)):
        assert new.mhmc.num_heads == old.mhmc.num_heads  # all four kernel scales stay
        assert new.proj0.groups < old.proj0.groups  # whole proj0 groups (channel c of every head) went
    for (nh, hd), (old_nh, old_hd) in zip(after.values(), before.values()):
        if heads == 'dims':  # head count kept, every head loses the same number of dims
            assert nh == old_nh and hd < old_hd
        else:  # whole heads removed, head_dim kept
            assert nh == old_nh - math.ceil(ratio * old_nh) and hd == old_hd
    assert pruned.head.out_features == 1000 and pruned.head.in_features == pruned.num_features
    assert [i['num_chs'] for i in pruned.feature_info] == [s.norm.normalized_shape[0] for s in pruned.stages]

    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        out = pruned(x)
        assert out.shape == (2, 1000) and torch.isfinite(out).all()
        exported = torch.export.export(pruned, (x,))
        torch.testing.assert_close(exported.module()(x), out, rtol=1e-4, atol=1e-5)
    assert weight_coverage(quantize_x86_pt2e(reparameterize_model(pruned), [x]))['int8_weight_fraction'] > 0.9


def _zero_pruned_channels(model, ratio, heads):
    """Zero every parameter of a random set of channels, as many per structure as the pruner removes at `ratio`.

    The zeroed channels have zero importance, so a magnitude pruner removes exactly them, and they contribute nothing
    to the output (a zero row feeds zero through the zeroed BN / conv / activation, and the consumer's columns are zero
    too), so removing them must leave the output unchanged. Returns the widths the pruned model must have.
    """
    gen = torch.Generator().manual_seed(0)

    def pick(size, count):
        return torch.randperm(size, generator=gen)[:count]

    def count(size):  # Torch-Pruning's count at round_to=None
        return size - int(size * (1 - ratio))

    expected = {}
    with torch.no_grad():
        stem = model.stem
        idx = pick(stem.conv1.out_channels, count(stem.conv1.out_channels))
        for t in (stem.conv1.weight, stem.bn.weight, stem.bn.bias):
            t[idx] = 0
        stem.conv2.weight[:, idx] = 0
        expected['stem.conv1'] = stem.conv1.out_channels - len(idx)
        for name, blk in model.named_modules():
            if not isinstance(blk, compress.models.smt.Block):
                continue
            mlp = blk.mlp
            idx = pick(mlp.fc1.out_features, count(mlp.fc1.out_features))
            for t in (mlp.fc1.weight, mlp.fc1.bias, mlp.dwconv.weight, mlp.dwconv.bias):
                t[idx] = 0
            mlp.fc2.weight[:, idx] = 0
            expected[f'{name}.mlp.fc1'] = mlp.fc1.out_features - len(idx)
            attn = blk.attn
            if isinstance(attn, ScaleAwareModulation):
                dim, h = attn.s.out_features, attn.mhmc.num_heads
                groups, per_group = dim // h, attn.proj0.out_channels // (dim // h)
                # v -> (modulator * v) -> proj
                idx = pick(dim, count(dim))
                for t in (attn.v.weight, attn.v.bias, attn.proj1.weight, attn.proj1.bias):
                    t[idx] = 0
                attn.proj.weight[:, idx] = 0
                expected[f'{name}.attn.v'] = dim - len(idx)
                # W_intra's expansion: the same output position in every proj0 group (tp's grouped-conv pattern)
                pos = pick(per_group, count(per_group))
                rows = (torch.arange(groups)[:, None] * per_group + pos).flatten()
                # whole proj0 groups: channel c of every MHMC head, with the group's W_intra rows
                drop = pick(groups, groups - int(groups * (1 - ratio)))
                rows = torch.cat([rows, (drop[:, None] * per_group + torch.arange(per_group)).flatten()])
                for t in (attn.proj0.weight, attn.proj0.bias, attn.bn.weight, attn.bn.bias):
                    t[rows] = 0
                attn.proj1.weight[:, rows] = 0
                chans = (drop[:, None] * h + torch.arange(h)).flatten()
                attn.s.weight[chans] = 0
                attn.s.bias[chans] = 0
                for conv in attn.mhmc.head_convs():
                    conv.weight[drop] = 0
                    conv.bias[drop] = 0
                expected[f'{name}.attn.s'] = dim - len(chans)
                expected[f'{name}.attn.proj0'] = (groups - len(drop)) * (per_group - len(pos))
            elif heads != 'none':
                dim, nh = attn.q.out_features, attn.num_heads
                hd = dim // nh
                if heads == 'heads':  # whole heads
                    drop = pick(nh, math.ceil(ratio * nh))
                    chans = (drop[:, None] * hd + torch.arange(hd)).flatten()
                else:  # the same dims of every head; q = 0 makes softmax uniform, so 1 / sqrt(head_dim) is moot
                    chans = (torch.arange(nh)[:, None] * hd + pick(hd, count(hd))).flatten()
                    attn.q.weight.zero_()
                    attn.q.bias.zero_()
                for t in (attn.q.weight, attn.q.bias, attn.local_conv.weight, attn.local_conv.bias):
                    t[chans] = 0
                for t in (attn.kv.weight, attn.kv.bias):
                    t[chans] = 0
                    t[chans + dim] = 0
                attn.proj.weight[:, chans] = 0
                expected[f'{name}.attn.q'] = dim - len(chans)
    return expected


def _stream_writers(model):
    # layers writing the residual stream: a stream channel also feeds LayerNorm statistics, so removing it (even
    # zeroed) changes the function; the function test keeps the stream and prunes everything inside the blocks
    return ['stem.conv2'] + [name for name, m in model.named_modules()
                             if re.search(r'(downsample\.proj|attn\.proj|mlp\.fc2)$', name)]


@pytest.mark.parametrize('heads', ['dims', 'heads', 'none'])
@pytest.mark.parametrize('ratio', [0.3, 0.5])
def test_prune_removes_exactly_the_zeroed_channels(ratio, heads):
    # removing head dims changes softmax's 1 / sqrt(head_dim), so in 'dims' mode q is zeroed (uniform attention):
    # that still checks k, v, the V conv and proj lose the same dims of every head
    model = _randomize(timm.create_model('test_smt')).eval()
    expected = _zero_pruned_channels(model, ratio, heads)
    pruned, _ = _prune(model, ratio, heads, round_to=None, ignore=_stream_writers(model))
    _check_structure(pruned)
    modules = dict(pruned.named_modules())
    widths = {name: getattr(modules[name], 'out_features', None) or modules[name].out_channels for name in expected}
    assert widths == expected
    assert count_params(pruned) < count_params(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-4)


def test_prune_with_layer_scale():
    model = timm.create_model('test_smt', layer_scale_init_value=1e-4).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith('gamma'):
                p.normal_(1e-4, 1e-5)
    pruned, spec = _prune(model, 0.5)
    assert any('layer scale' in note for note in spec.notes)
    _check_structure(pruned)
    for blk in pruned.modules():
        if isinstance(blk, compress.models.smt.Block):
            assert blk.ls1.gamma.shape == blk.ls2.gamma.shape == blk.norm1.weight.shape
    assert count_params(pruned) < count_params(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert pruned(x).shape == (1, 1000)
        torch.testing.assert_close(torch.export.export(pruned, (x,)).module()(x), pruned(x))


def test_prune_ignore_keeps_a_stage():
    model = timm.create_model('test_smt').eval()
    pruned, _ = _prune(model, 0.5, ignore=['stages.0'])
    old, new = model.stages[0].blocks[0].attn, pruned.stages[0].blocks[0].attn
    assert new.s.out_features == old.s.out_features and new.proj0.groups == old.proj0.groups
    assert new.mhmc.local_conv_1.weight.shape == old.mhmc.local_conv_1.weight.shape
    assert pruned.stages[1].blocks[0].attn.proj0.groups < model.stages[1].blocks[0].attn.proj0.groups


def test_prune_global_taylor():
    from compress.config import PruneStage
    from compress.stages.prune import prune_model
    torch.manual_seed(0)
    model = timm.create_model('test_smt', num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64)
    cfg = PruneStage(ratio=0.5, importance='taylor', global_pruning=True)
    pruned, _ = prune_model(model, cfg, 0.5, x[:2], grad_batches=[(x, torch.arange(4))])
    _check_structure(pruned)
    assert count_params(pruned) < count_params(model)
    assert all(p.grad is None for p in pruned.parameters())
    with torch.no_grad():
        assert pruned(x).shape == (4, 10)


def test_prune_smt_t():
    model = timm.create_model('smt_t').eval()
    params, macs = count_params(model), count_macs(model)
    pruned, _ = _prune(model, 0.5, res=224)
    _check_structure(pruned)
    assert count_params(pruned) < 0.5 * params and count_macs(pruned) < 0.5 * macs
    with torch.no_grad():
        out = pruned(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()
