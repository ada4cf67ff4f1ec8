"""Backbones registered with timm's registry on import (``timm.create_model('spartan_t')``)."""
from compress.models import (  # noqa: F401
    efficientnet_lite, emsnet, mat, partialformer, resnet_cifar, s2aformer, smt, spartan,
)
