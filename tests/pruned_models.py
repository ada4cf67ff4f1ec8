"""Checks shared by the per-family pruning tests: dead channels made on purpose, and a pruned model that must still
be a whole timm model (its outputs, widths, features, export and training)."""
import copy

import timm
import torch


def kill_channels(idx, rows=(), norms=(), cols=()):
    """Make channels `idx` dead: zero the producers' rows and biases and the norms' affine terms (the channel is 0
    everywhere), and the consumers' columns (`(layer, offset)`), so that every layer of the group ranks them last."""
    for layer in rows:
        layer.weight[idx] = 0
        if layer.bias is not None:
            layer.bias[idx] = 0
    for norm in norms:
        norm.weight[idx] = 0
        norm.bias[idx] = 0
    for layer, offset in cols:
        layer.weight[:, idx + offset] = 0


def check_pruned_model_runs(pruned, x, num_classes=1000):
    """Logits of the right shape; feature_info, num_features and features_only agree with the real outputs; the
    exported program gives the same logits; every parameter gets a gradient."""
    with torch.no_grad():
        out = pruned(x)
        assert out.shape == (x.shape[0], num_classes) and torch.isfinite(out).all()
        feats = pruned.forward_intermediates(x, intermediates_only=True)
        assert [f.shape[1] for f in feats] == [info['num_chs'] for info in pruned.feature_info]
        assert pruned.forward_features(x).shape[1] == pruned.num_features
        features = timm.models._features.FeatureListNet(pruned, out_indices=(0, 1, 2, 3), flatten_sequential=True)
        assert [f.shape[1] for f in features(x)] == features.feature_info.channels()
        torch.testing.assert_close(torch.export.export(pruned, (x,)).module()(x), out, rtol=1e-4, atol=1e-5)
    trained = copy.deepcopy(pruned).train()
    trained(x).sum().backward()
    assert all(p.grad is not None for p in trained.parameters() if p.requires_grad)
