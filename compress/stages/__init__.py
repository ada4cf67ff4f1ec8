"""Stage registry: recipe ``kind`` → the function that applies it."""
from compress.stages.distill import apply_distill
from compress.stages.export import apply_export
from compress.stages.prune import apply_prune
from compress.stages.ptq_int8 import apply_ptq_int8
from compress.stages.qat import apply_qat_int8
from compress.stages.train import apply_train
from compress.stages.weight_4bit import apply_weight_4bit

STAGES = {'train': apply_train, 'prune': apply_prune, 'distill': apply_distill, 'ptq_int8': apply_ptq_int8,
          'qat_int8': apply_qat_int8, 'weight_4bit': apply_weight_4bit, 'export': apply_export}

__all__ = ['STAGES']
