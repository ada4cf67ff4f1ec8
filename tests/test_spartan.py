"""SpaRTAN model file: sizes against the notes / paper, timm integration, export, weight loading, complex math."""
import pytest
import timm
import torch
import torch.nn.functional as F

import compress.models.spartan  # noqa: F401  (registers the entrypoints)
from compress.models.spartan import CMixer, SpaRTANBlock, checkpoint_filter_fn, complex_pair_mix
from eval.complexity import count_macs, count_params
from eval.coverage import weight_coverage


@pytest.fixture(scope='module')
def full_models():
    torch.manual_seed(0)
    return {name: timm.create_model(name) for name in ('spartan_xt', 'spartan_t')}


@pytest.mark.parametrize('name,params', [('spartan_xt', 2_222_792), ('spartan_t', 3_820_296)])
def test_param_count(full_models, name, params):
    assert count_params(full_models[name]) == params


# notes section 1.10, to the 4 decimals given there (GMACs)
@pytest.mark.parametrize('name,size,conv_linear,fvcore_train', [
    ('spartan_xt', 224, 0.6144, 0.6405),
    ('spartan_t', 224, 0.7996, 0.8291),
    ('spartan_t', 256, 1.0441, 1.0827),
])
def test_macs(full_models, name, size, conv_linear, fvcore_train):
    model = full_models[name]
    macs = count_macs(model, (3, size, size))
    assert round(macs / 1e9, 4) == conv_linear
    # the paper's numbers are fvcore's, model in train mode: norms 5 per element, global pool 1 per element
    with_norms = count_macs(model, (3, size, size), include_norms=True, train_mode=True)
    assert round(with_norms / 1e9, 4) == fvcore_train


def test_forward_shape_and_cfg():
    model = timm.create_model('test_spartan', num_classes=10).eval()
    cfg = timm.create_model('spartan_t', pretrained=False).pretrained_cfg
    assert cfg['input_size'] == (3, 256, 256) and cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bilinear'
    assert not cfg.get('hf_hub_id')
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 10)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    sd = model.state_dict()
    assert cfg['first_conv'] + '.weight' in sd


def test_hybrid_grouping_and_drop_path():
    model = timm.create_model('spartan_t', drop_path_rate=0.1)
    for i, stage in enumerate(model.stages):
        block = stage.blocks[0]
        dim = block.scale_1.shape[1]
        hidden = block.cmixer.theta.out_channels
        smixer_groups = {block.smixer.h_conv.conv.groups, block.smixer.l_conv[0].conv.groups,
                         block.smixer.l_conv[1].conv.groups}
        if i < 2:
            assert smixer_groups == {1} and block.cmixer.conv.conv.groups == hidden == 4 * dim
        else:
            assert smixer_groups == {dim // 2} and block.cmixer.conv.conv.groups == dim and hidden == 2 * dim
    blocks = [b for s in model.stages for b in s.blocks]
    assert isinstance(blocks[0].drop_path1, torch.nn.Identity)
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.1 * 19 / 20)
    assert model.no_weight_decay() == {n for n, _ in model.named_parameters() if n.endswith('smixer.gamma')}


def test_export():
    model = timm.create_model('test_spartan').eval()
    x = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == 'call_function'}
    assert not any('complex' in op for op in ops)
    assert torch.allclose(exported.module()(x), model(x), atol=1e-5)


def _to_official(state_dict, depths):
    """Rename our keys to the official layout: stem `conv`, flat `layers` (blocks, then downsample), `linear`."""
    flat = {}
    idx = 0
    for s, depth in enumerate(depths):
        for b in range(depth):
            flat[f'stages.{s}.blocks.{b}.'] = f'layers.{idx}.'
            idx += 1
        if s < len(depths) - 1:
            flat[f'stages.{s + 1}.downsample.'] = f'layers.{idx}.'
            idx += 1
    out = {}
    for k, v in state_dict.items():
        if k.startswith('stem.'):
            k = 'conv.' + k[len('stem.'):]
        elif k.startswith('head.'):
            k = 'linear.' + k[len('head.'):]
        else:
            prefix = next(p for p in flat if k.startswith(p))
            k = flat[prefix] + k[len(prefix):]
        out[k] = v
    return out


def test_checkpoint_filter_fn(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model('test_spartan').eval()
    official = _to_official(src.state_dict(), (1, 1, 2, 1))
    # layer indices the official SpaRTAN builds for depths (1, 1, 2, 1): blocks 0, 2, 4-5, 7; downsamples 1, 3, 6
    assert official['layers.6.conv.weight'].shape == (48, 32, 2, 2)
    assert 'layers.5.cmixer.complex' in official and 'conv.0.conv.weight' in official

    wrapped = {'model': {'module.' + k: v for k, v in official.items()}, 'epoch': 3}
    dst = timm.create_model('test_spartan').eval()
    dst.load_state_dict(checkpoint_filter_fn(wrapped, dst), strict=True)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(dst(x), src(x))

    # timm's own file path also goes through the filter
    path = tmp_path / 'spartan_official.pth'
    torch.save(wrapped, path)
    loaded = timm.create_model('test_spartan', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    assert torch.equal(loaded(x), src(x))


def _official_cmixer(m: CMixer, x: torch.Tensor) -> torch.Tensor:
    """The official CMixer forward, with the modulation done in complex arithmetic."""
    B, _, H, W = x.shape
    idx = x.argmax(dim=1, keepdim=True)
    theta = F.gelu(m.theta(x))
    amp = m.proj(x)
    feat = amp * theta + amp.gather(1, idx) * theta.gather(1, idx)
    feat = feat.permute(0, 2, 3, 1).reshape(B, H, W, -1, 2)
    z = torch.complex(feat[..., 0], feat[..., 1]) * torch.complex(m.complex[..., 0], m.complex[..., 1])
    feat = torch.stack((z.real, z.imag), dim=-1).reshape(B, H, W, -1).permute(0, 3, 1, 2)
    return m.proj_out(m.attn(m.conv(feat)))


@pytest.mark.parametrize('depthwise,ratio', [(False, 4), (True, 2)])
def test_complex_equivalence(depthwise, ratio):
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    w = torch.randn(1, 1, 1, 8, 2, dtype=torch.float64)
    ref = torch.view_as_real(torch.view_as_complex(x.permute(0, 2, 3, 1).reshape(2, 5, 6, 8, 2).contiguous())
                             * torch.view_as_complex(w)).reshape(2, 5, 6, 16).permute(0, 3, 1, 2)
    assert torch.allclose(complex_pair_mix(x, w), ref, atol=1e-12)

    block = SpaRTANBlock(16, expand_ratio=ratio, depthwise=depthwise).double().eval()
    with torch.no_grad():
        for p in block.parameters():  # lift the 1e-5 layer scales so the mixers matter in the comparison
            p.add_(torch.randn_like(p) * 0.1)
        y = torch.randn(2, 16, 7, 7, dtype=torch.float64)
        assert torch.allclose(block.cmixer(y), _official_cmixer(block.cmixer, y), atol=1e-10)
        z = y + block.scale_1 * block.smixer(block.norm_1(y))
        z = z + block.scale_2 * _official_cmixer(block.cmixer, block.norm_2(z))
        assert torch.allclose(block(y), z, atol=1e-10)

    half = CMixer(16, 2, depthwise=True).to(torch.bfloat16)
    assert half(torch.randn(1, 16, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_prune_complex_pairs():
    """Removing whole complex pairs from the CMixer (beyond the argmax range) needs no shape attribute updates."""
    torch.manual_seed(0)
    dim, ratio = 16, 4
    m = CMixer(dim, ratio, depthwise=False).eval()
    x = torch.randn(1, dim, 6, 6)
    pairs = torch.arange(dim * ratio // 2)
    keep_pairs = torch.cat([pairs[:dim // 2], pairs[dim // 2::2]])  # keep every pair the argmax can reach
    keep = torch.stack((2 * keep_pairs, 2 * keep_pairs + 1), dim=1).flatten()
    drop = torch.tensor(sorted(set(range(dim * ratio)) - set(keep.tolist())))

    with torch.no_grad():
        zeroed = CMixer(dim, ratio, depthwise=False).eval()
        zeroed.load_state_dict(m.state_dict())
        # dropped channels must not reach the output or the SE squeeze
        zeroed.proj_out.weight[:, drop] = 0.
        zeroed.attn.squeeze.weight[:, drop] = 0.
        ref = zeroed(x)

        m.theta.weight.data, m.theta.bias.data = m.theta.weight[keep], m.theta.bias[keep]
        m.proj.weight.data, m.proj.bias.data = m.proj.weight[keep], m.proj.bias[keep]
        m.complex.data = m.complex[:, :, :, keep_pairs]
        conv, bn = m.conv.conv, m.conv.norm
        conv.weight.data, conv.groups = conv.weight[keep], len(keep)
        for name in ('weight', 'bias', 'running_mean', 'running_var'):
            getattr(bn, name).data = getattr(bn, name)[keep]
        m.attn.squeeze.weight.data = m.attn.squeeze.weight[:, keep]
        m.attn.expand.weight.data, m.attn.expand.bias.data = m.attn.expand.weight[keep], m.attn.expand.bias[keep]
        m.proj_out.weight.data = m.proj_out.weight[:, keep]
        assert torch.allclose(m(x), ref, atol=1e-5)


def _dead_hidden_half(model):
    """Zero half of every CMixer's complex pairs (linked or not) and half its SE squeeze: they reach nothing."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(('scale_1', 'scale_2')):
                p.fill_(1.0)  # at the 1e-5 init a wrong argmax term would hide below the tolerance
        for m in (m for m in model.modules() if isinstance(m, CMixer)):
            pairs = m.theta.out_channels // 2
            dead_pairs = torch.randperm(pairs)[:pairs // 2]
            dead = torch.stack((2 * dead_pairs, 2 * dead_pairs + 1), 1).flatten()
            for conv in (m.theta, m.proj, m.conv.conv, m.attn.expand):
                conv.weight[dead] = 0
                if conv.bias is not None:
                    conv.bias[dead] = 0
            m.conv.norm.weight[dead] = 0
            m.conv.norm.bias[dead] = 0
            m.attn.squeeze.weight[:, dead] = 0
            m.proj_out.weight[:, dead] = 0
            rd = m.attn.squeeze.out_channels
            dead_rd = torch.randperm(rd)[:rd // 2]
            m.attn.squeeze.weight[dead_rd] = 0
            m.attn.squeeze.bias[dead_rd] = 0
            m.attn.expand.weight[:, dead_rd] = 0


def test_prune_stage_removes_dead_complex_pairs_and_keeps_the_function():
    """The argmax links survive pruning: dead hidden pairs (half of them reachable by the argmax) go, output stays."""
    from compress.config import PruneStage
    from compress.stages.prune import prune_model
    torch.manual_seed(0)
    model = timm.create_model('test_spartan').eval()
    _dead_hidden_half(model)
    # the residual stream and the SMixers keep their width: GroupNorm statistics would change otherwise
    keep = ['stem', 'stages.1.downsample', 'stages.2.downsample', 'stages.3.downsample'] + [
        n for n, _ in model.named_modules() if n.endswith('.smixer')]
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    pruned, _ = prune_model(model, PruneStage(ratio=0.5, round_to=None, ignore=keep), 0.5, x[:2])
    mixers = [m for m in pruned.modules() if type(m).__name__ == 'CMixerDeploy']
    original = [m for m in model.modules() if isinstance(m, CMixer)]
    assert [m.theta_re.out_channels for m in mixers] == [m.theta.out_channels // 4 for m in original]
    # each mixer still links some input channels to kept pairs, and lost the others' links
    assert all(0 < m.chan_re.shape[0] < m.theta_re.in_channels // 2 for m in mixers)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-4, atol=1e-4)


def test_prune_stage_relinks_kept_input_channels_to_their_pairs():
    """Residual and hidden channels both pruned: each link points at the input channel with the pair's index."""
    from compress.config import PruneStage
    from compress.stages.prune import prune_model
    from compress.stages.ptq_int8 import quantize_x86_pt2e
    torch.manual_seed(0)
    model = timm.create_model('test_spartan').eval()
    with torch.no_grad():  # stamp each theta weight with its (out, in) index, read back after pruning
        for m in (m for m in model.modules() if isinstance(m, CMixer)):
            out_chs, in_chs = m.theta.weight.shape[:2]
            stamp = torch.arange(out_chs)[:, None] * 1000 + torch.arange(in_chs)[None] + 1
            m.theta.weight.copy_(stamp[:, :, None, None] * torch.randn(out_chs, 1, 1, 1).sign())
    x = torch.randn(2, 3, 64, 64)
    pruned, _ = prune_model(model, PruneStage(ratio=0.4, round_to=None), 0.4, x)
    checked = 0
    originals = [m for m in model.modules() if isinstance(m, CMixer)]
    for m, original in zip((m for m in pruned.modules() if type(m).__name__ == 'CMixerDeploy'), originals):
        stamp = m.theta_re.weight[:, :, 0, 0].abs().round().long() - 1
        pair = stamp[:, 0] // 1000 // 2          # original pair index of each kept re channel
        inputs = stamp[0] % 1000                 # original index of each kept input channel
        assert len(inputs) < original.theta.in_channels and len(pair) < original.theta.out_channels // 2
        # linked pairs (those an input channel can select) come first, and all of them are listed
        assert m.chan_re.shape[0] == int((pair < original.theta.in_channels // 2).sum())
        for position, k in enumerate(pair[:m.chan_re.shape[0]].tolist()):
            for link, channel in ((m.chan_re, 2 * k), (m.chan_im, 2 * k + 1)):
                found = (inputs == channel).nonzero()
                assert link[position].item() == (found.item() if len(found) else -1)
                checked += 1
    assert checked > 0
    assert torch.isfinite(pruned(x)).all()
    graph = quantize_x86_pt2e(pruned, [torch.randn(2, 3, 64, 64)])
    assert weight_coverage(graph)['int8_weight_fraction'] == 1.0


def test_train_backward_grad_checkpointing():
    torch.manual_seed(0)
    model = timm.create_model('test_spartan', drop_path_rate=0.1, num_classes=5).train()
    model.set_grad_checkpointing(True)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# --- deployment rewrites: each one computes the same function as the official formulation ---

def _perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Lift the 1e-5 layer scales / gammas and give the BNs real statistics, so every term matters in comparisons."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return module.eval()


def test_group_norm1_layout_free_form():
    from compress.models.spartan import GroupNorm1, group_norm1
    torch.manual_seed(0)
    norm = _perturbed(GroupNorm1(12).double())
    x = torch.randn(3, 12, 5, 7, dtype=torch.float64) * 3 + 1
    ref = F.group_norm(x, 1, norm.weight, norm.bias, norm.eps)
    assert norm.eps == 1e-6 and torch.allclose(norm(x), ref, atol=1e-12)
    for layout in (torch.contiguous_format, torch.channels_last):
        assert torch.allclose(group_norm1(x.contiguous(memory_format=layout), norm.weight, norm.bias, norm.eps), ref,
                              atol=1e-12)
    # the compiled path takes the reshape-free form
    compiled = torch.compile(norm, backend='aot_eager', fullgraph=True)
    assert torch.allclose(compiled(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-12)


@pytest.mark.parametrize('depthwise,ratio', [(False, 4), (True, 2)])
def test_cmixer_fuse_equivalence(depthwise, ratio):
    """CMixer.fuse(): re / im halves, complex mix folded into the group-width-2 conv (or kept element-wise before
    the depthwise halves), BN folded, split SE squeeze and proj_out: same outputs as the official complex form."""
    from compress.models.spartan import CMixerDeploy
    torch.manual_seed(0)
    m = _perturbed(CMixer(16, ratio, depthwise=depthwise).double())
    deploy = m.fuse()
    assert isinstance(deploy, CMixerDeploy) and deploy.mix_in_conv == depthwise
    x = torch.randn(2, 16, 7, 6, dtype=torch.float64)
    x[0, :, 0, 0] = 0.5  # an all-equal pixel: argmax ties go to channel 0 in both forms
    with torch.no_grad():
        assert torch.allclose(deploy(x), _official_cmixer(m, x), atol=1e-12)
        assert torch.allclose(deploy(x), m(x), atol=1e-12)
    grouped = [c for c in deploy.modules() if isinstance(c, torch.nn.Conv2d) and 1 < c.groups < c.out_channels]
    assert not grouped, 'every 3x3 conv of the deploy form is depthwise'
    # fp32 module: fp32 buffers, close to the double reference
    m32 = CMixer(16, ratio, depthwise=depthwise).eval()
    with torch.no_grad():
        assert torch.allclose(m32.fuse()(x.float()), m32(x.float()), atol=1e-5)


def test_reparameterize_model_deploy_form():
    """timm's reparameterize_model swaps every CMixer for its deploy form: same logits, exportable, no complex
    ops, no interleaving stack; the source model (official keys) is left untouched."""
    from timm.models import reparameterize_model
    from compress.models.spartan import CMixerDeploy
    torch.manual_seed(0)
    model = _perturbed(timm.create_model('test_spartan').double())
    keys = set(model.state_dict())
    deploy = reparameterize_model(model)
    assert set(model.state_dict()) == keys
    assert sum(isinstance(m, CMixerDeploy) for m in deploy.modules()) == 5
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        assert ref.abs().max() > 1e-2
        assert torch.allclose(deploy(x), ref, atol=1e-10)
    exported = torch.export.export(deploy.float(), (x.float(),))
    ops = {str(n.target) for n in exported.graph.nodes if n.op == 'call_function'}
    assert not any('complex' in op or 'stack' in op for op in ops)
    assert torch.allclose(exported.module()(x.float()), deploy(x.float()), atol=1e-4)


@pytest.mark.slow
def test_deploy_form_quantizes():
    """The deploy form goes through both int8 paths of the ptq stage with every conv in int8; NNCF's ignored scope
    for the CMixer element-wise ops removes their FakeQuantize nodes and keeps the argmax in float."""
    from timm.models import reparameterize_model
    from compress.stages.ptq_int8 import nncf_settings, quantize_openvino, quantize_x86_pt2e
    torch.manual_seed(0)
    deploy = reparameterize_model(_perturbed(timm.create_model('test_spartan')))
    calib = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    graph = quantize_x86_pt2e(deploy, calib)
    assert weight_coverage(graph)['int8_weight_fraction'] == 1.0
    with torch.no_grad():
        ref = deploy(calib[0])
        assert (graph(calib[0]) - ref).norm() < 0.5 * ref.norm()

    # NNCF may leave squeeze-excite convs (1x1 maps) in float, in the official structure as well; nothing else
    settings = nncf_settings(deploy, (3, 64, 64))
    assert settings['ignored_scope'] and settings['model_type'] == 'default'  # the family's scope, and a CNN
    unscoped, _ = quantize_openvino(deploy, calib, {**settings, 'ignored_scope': None})
    coverage = weight_coverage(unscoped)
    assert coverage['int8_weight_fraction'] > 0.95
    assert all('attn.' in layer['layer'] for layer in coverage['float_layers'])
    scoped, _ = quantize_openvino(deploy, calib, settings)
    fq_users = [u.get_node() for op in scoped.get_ordered_ops() if op.get_type_name() == 'FakeQuantize'
                for u in op.output(0).get_target_inputs()]
    assert not any(n.get_type_name() in ('Multiply', 'Add', 'Subtract', 'ReduceSum', 'Select')
                   and '.cmixer/aten::' in n.get_friendly_name() for n in fq_users)
    # the argmax (amax / eq) reads the float norm output, not the int8 grid (where ties are common)
    argmax_inputs = [op.input_value(0).get_node().get_type_name() for op in scoped.get_ordered_ops()
                     if op.get_type_name() in ('ReduceMax', 'Equal') and '.cmixer/aten::' in op.get_friendly_name()]
    assert argmax_inputs and 'FakeQuantize' not in argmax_inputs
    scoped_coverage = weight_coverage(scoped)
    assert scoped_coverage['int8_weight_fraction'] >= coverage['int8_weight_fraction']
    assert all('attn.' in layer['layer'] for layer in scoped_coverage['float_layers'])
