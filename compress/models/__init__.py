"""Backbones registered with timm's registry on import (``timm.create_model('spartan_t')``)."""
from compress.models import (  # noqa: F401
    efficientnet_lite, emsnet, mat, partialformer, resnet_cifar, s2aformer, smt, spartan,
)

# the backbones of the seed papers, by module (``timm.list_models(module=SEED_FAMILIES)``); each has a `test_<family>`
SEED_FAMILIES = ('spartan', 'smt', 's2aformer', 'emsnet', 'mat', 'partialformer')
