"""ResNet for CIFAR-10 (ResNet-20/32/44/56) with option-A shortcuts.

Paper: `Deep Residual Learning for Image Recognition` - https://arxiv.org/abs/1512.03385 (section 4.2, CIFAR-10)
Weights: https://github.com/akamaster/pytorch_resnet_cifar10 (BSD-2-Clause)

Module names equal those of the akamaster checkpoints (``conv1``, ``bn1``, ``layer1..3``, ``linear``) so that
their state dicts load after ``checkpoint_filter_fn`` strips the ``module.`` prefix DataParallel left behind.

@inproceedings{he2016deep,
  title={Deep Residual Learning for Image Recognition},
  author={He, Kaiming and Zhang, Xiangyu and Ren, Shaoqing and Sun, Jian},
  booktitle={CVPR},
  year={2016}
}
"""
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

__all__ = ['CifarResNet']

CIFAR10_MEAN = (0.485, 0.456, 0.406)  # the akamaster checkpoints were trained with ImageNet statistics
CIFAR10_STD = (0.229, 0.224, 0.225)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def forward(self, x: torch.Tensor, out_chs: int) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        extra = out_chs - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))


class BasicBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.shortcut = ZeroPadShortcut() if stride != 1 or in_chs != out_chs else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # NOTE: the padded width is read from the conv weight, so a pruned block stays consistent.
        shortcut = x if self.shortcut is None else self.shortcut(x, self.conv2.weight.shape[0])
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-6n+2 for 32x32 inputs: 3 stages of n basic blocks at 16/32/64 channels."""

    def __init__(
            self,
            depth: int = 20,
            widths: tuple[int, ...] = (16, 32, 64),
            in_chans: int = 3,
            num_classes: int = 10,
            global_pool: str = 'avg',
            drop_rate: float = 0.,
    ):
        super().__init__()
        assert (depth - 2) % 6 == 0, 'depth must be 6n+2'
        assert global_pool == 'avg', 'only average pooling is supported'
        blocks_per_stage = (depth - 2) // 6
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.feature_info = []
        in_chs = widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(in_chs if j == 0 else width, width, stride if j == 0 else 1)
                      for j in range(blocks_per_stage)]
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
            in_chs = width
            self.feature_info.append(dict(num_chs=width, reduction=2 ** i, module=f'layer{i + 1}'))
        self.num_features = self.head_hidden_size = in_chs
        self.linear = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @property
    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3]

    def get_classifier(self) -> nn.Module:
        return self.linear

    def reset_classifier(self, num_classes: int, global_pool: str = 'avg'):
        self.num_classes = num_classes
        self.linear = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: int | list[int] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward features that returns intermediates.

        Args:
            x: input images.
            indices: take the last n stages if an int, the listed stages if a list, all if None.
            norm: unused (no final norm in this model).
            stop_early: stop after the last requested stage.
            output_fmt: only 'NCHW'.
            intermediates_only: return only the intermediates.
        """
        assert output_fmt == 'NCHW'
        stages = self.stages
        if indices is None:
            take = list(range(len(stages)))
        elif isinstance(indices, int):
            take = list(range(len(stages) - indices, len(stages)))
        else:
            take = [i if i >= 0 else len(stages) + i for i in indices]
        intermediates = []
        x = F.relu(self.bn1(self.conv1(x)))
        last = max(take) if stop_early else len(stages) - 1
        for i, stage in enumerate(stages[:last + 1]):
            x = stage(x)
            if i in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Unwrap ``{'state_dict': ...}`` and strip the DataParallel ``module.`` prefix of the akamaster files."""
    state_dict = state_dict.get('state_dict', state_dict)
    return {k.removeprefix('module.'): v for k, v in state_dict.items()}


def _cfg(url: str = '', **kwargs: Any) -> dict[str, Any]:
    return {
        'url': url, 'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (8, 8),
        'crop_pct': 1.0, 'interpolation': 'bilinear', 'mean': CIFAR10_MEAN, 'std': CIFAR10_STD,
        'first_conv': 'conv1', 'classifier': 'linear',
        'paper_ids': 'arXiv:1512.03385', 'paper_name': 'Deep Residual Learning for Image Recognition',
        'origin_url': 'https://github.com/akamaster/pytorch_resnet_cifar10', 'license': 'bsd-2-clause',
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'resnet20_cifar.akamaster_c10': _cfg(),
    'resnet32_cifar.akamaster_c10': _cfg(),
    'resnet44_cifar.akamaster_c10': _cfg(),
    'resnet56_cifar.akamaster_c10': _cfg(),
    'test_resnet_cifar.untrained': _cfg(),
})


def _create_resnet_cifar(variant: str, pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return build_model_with_cfg(
        CifarResNet, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2), feature_cls='getter'),
        **kwargs,
    )


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _create_resnet_cifar('resnet20_cifar', pretrained, **dict(dict(depth=20), **kwargs))


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _create_resnet_cifar('resnet32_cifar', pretrained, **dict(dict(depth=32), **kwargs))


@register_model
def resnet44_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _create_resnet_cifar('resnet44_cifar', pretrained, **dict(dict(depth=44), **kwargs))


@register_model
def resnet56_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _create_resnet_cifar('resnet56_cifar', pretrained, **dict(dict(depth=56), **kwargs))


@register_model
def test_resnet_cifar(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    return _create_resnet_cifar('test_resnet_cifar', pretrained, **dict(dict(depth=8, widths=(8, 16, 32)), **kwargs))
