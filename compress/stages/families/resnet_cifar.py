"""ResNet-CIFAR: what pruning must know (option-A shortcuts)."""
from __future__ import annotations

from compress.models.resnet_cifar import CifarResNet
from compress.stages.families import FamilyRules, register_rules


def pruning_spec(model: CifarResNet):
    """Option-A shortcuts zero-pad the residual stream by position, which no dependency graph can follow: the stream
    (stem and every block's conv2) keeps its width and only the inner channels (conv1 → bn1 → conv2) are pruned."""
    from compress.stages.prune import PruningSpec  # the stage imports this package: import late
    stream = [model.conv1] + [block.conv2 for stage in model.stages for block in stage]
    return PruningSpec(ignored_layers=stream, notes=['residual stream kept: option-A shortcuts pad by position'])


register_rules(CifarResNet, FamilyRules(pruning_spec=pruning_spec))
