"""Stage registry: recipe ``kind`` → the function that applies it."""
from compress.stages.distill import apply_distill
from compress.stages.prune import apply_prune
from compress.stages.ptq_int8 import apply_ptq_int8
from compress.stages.qat import apply_qat_int8
from compress.stages.train import apply_train

STAGES = {'train': apply_train, 'prune': apply_prune, 'distill': apply_distill, 'ptq_int8': apply_ptq_int8,
          'qat_int8': apply_qat_int8}

__all__ = ['STAGES']
