"""timm's anatomy, the same for every seed backbone: its tiny `test_<family>` variant exports, compiles, gives
features, intermediates and a replaceable head, and loads a wrapped checkpoint through its filter."""
import importlib

import pytest
import timm
import torch

from compress.models import SEED_FAMILIES

TINY = [f'test_{family}' for family in SEED_FAMILIES]


def _model(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def _input(model, batch=2):
    return torch.randn(batch, *model.pretrained_cfg['input_size'])


def test_every_seed_family_has_a_tiny_variant():
    assert sorted(timm.list_models('test_*', module=SEED_FAMILIES)) == sorted(TINY)


@pytest.mark.parametrize('name', TINY)
def test_export_with_dynamic_batch(name):
    model = _model(name)
    batch = torch.export.Dim('batch', min=1, max=64)
    exported = torch.export.export(model, (_input(model),), dynamic_shapes=({0: batch},))
    for size in (1, 5):
        x = _input(model, size)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', TINY)
def test_compile_without_graph_breaks(name):
    # aot_eager traces as inductor does, without its C++ build
    model = _model(name)
    x = _input(model)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch.compile(model, backend='aot_eager', fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', TINY)
def test_features_only_reports_what_it_returns(name):
    model = _model(name, features_only=True)
    x = _input(model, 1)
    with torch.no_grad():
        feats = model(x)
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert [x.shape[-1] // f.shape[-1] for f in feats] == model.feature_info.reduction() == [4, 8, 16, 32]
    picked = _model(name, features_only=True, out_indices=(1, 3))
    assert picked.feature_info.channels() == model.feature_info.channels()[1::2]


@pytest.mark.parametrize('name', TINY)
def test_forward_intermediates(name):
    model = _model(name)
    x = _input(model, 1)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [t.shape[1] for t in inter] == [info['num_chs'] for info in model.feature_info]
        early = model.forward_intermediates(x, indices=[0, 1], stop_early=True, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(early, inter[:2]))
        assert model.prune_intermediate_layers(indices=(1,)) == [1]
        assert len(model.stages) == 2
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True)[-1], inter[1])


@pytest.mark.parametrize('name', TINY)
def test_reset_classifier(name):
    model = _model(name)
    x = _input(model)
    with torch.no_grad():
        features = model.forward_features(x)
        model.reset_classifier(0)
        pooled = model(x)
        assert pooled.shape == (2, getattr(model, 'head_hidden_size', None) or model.num_features)
        torch.testing.assert_close(pooled, model.forward_head(features, pre_logits=True))
        model.reset_classifier(3)
        assert model(x).shape == (2, 3) and model.num_classes == 3


@pytest.mark.parametrize('name', TINY)
def test_checkpoint_filter_fn_takes_a_wrapped_training_checkpoint(name):
    model = _model(name)
    family = importlib.import_module(type(model).__module__)
    wrapped = {'model': {f'module.{key}': value for key, value in model.state_dict().items()}}
    fresh = timm.create_model(name)
    fresh.load_state_dict(family.checkpoint_filter_fn(wrapped, fresh))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
