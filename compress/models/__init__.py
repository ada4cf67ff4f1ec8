"""Backbones registered with timm's registry on import (``timm.create_model('spartan_t')``)."""
from compress.models import efficientnet_lite, resnet_cifar, smt, spartan  # noqa: F401
