"""Model complexity: parameters, multiply-accumulates, serialized size.

The one MAC counter of this project is :func:`count_macs`. It runs a forward pass under
``torch.utils.flop_counter.FlopCounterMode``, which sees every op at the ATen dispatcher, so functional
matmuls are never missed:

* counted: convolutions, linear layers, every matmul / bmm / einsum, and attention through
  ``scaled_dot_product_attention`` (QK^T and AV, including the CPU flash kernel that torch's own table lacks);
* one multiply-add counts as one MAC. Papers' "GFLOPs" for vision backbones are almost always MACs; the
  columns of this project say ``gmacs``;
* not counted by default: norms, pooling, activations and element-wise ops. With ``include_norms=True``
  the fvcore rules are added (batch/group/layer norm 5 MACs per element with affine, 4 without, batch norm
  in eval mode 2 per element; average pooling, global pooling included, 1 per input element), which reproduces the
  numbers papers obtain with fvcore ``FlopCountAnalysis``.

Quantization does not change MACs: quantized models report the MACs of the float model they came from.
"""
from __future__ import annotations

import io
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

__all__ = ['count_macs', 'count_params', 'serialized_size_mb']


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


# FlopCounterMode formulas return FLOPs (2 per multiply-add); the extra formulas below follow that unit.
def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    *batch, q_len, head_dim = query_shape
    kv_len = key_shape[-2]
    value_dim = value_shape[-1]
    return 2 * _numel(batch) * q_len * kv_len * (head_dim + value_dim)


def _affine_norm_flops(weight_index: int):
    def flops(*args, out_shape=None, **kwargs) -> int:
        has_affine = len(args) > weight_index and args[weight_index] is not None
        return 2 * _numel(args[0]) * (5 if has_affine else 4)
    return flops


def _eval_batch_norm_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(input_shape) * (2 if weight_shape is not None else 1)


def _pool_flops(input_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(input_shape)


_ATTENTION_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
_NORM_FORMULAS = {
    aten.native_batch_norm: _affine_norm_flops(1),
    aten._native_batch_norm_legit: _affine_norm_flops(1),
    aten._native_batch_norm_legit_no_training: _eval_batch_norm_flops,
    aten.native_group_norm: _affine_norm_flops(1),
    aten.native_layer_norm: _affine_norm_flops(2),
    aten._adaptive_avg_pool2d: _pool_flops,
    # global average pooling reaches the dispatcher as a mean, not as adaptive_avg_pool2d
    aten.mean: _pool_flops,
}


@torch.no_grad()
def count_macs(
        model: nn.Module,
        input_size: Sequence[int] = (3, 224, 224),
        include_norms: bool = False,
        train_mode: bool = False,
) -> int:
    """Count multiply-accumulates of one forward pass at batch 1.

    Args:
        model: a float model (quantized graphs are not counted: use the float model they came from).
        input_size: (C, H, W) of one image.
        include_norms: add fvcore's norm and pooling costs (see module docstring).
        train_mode: count with the model in train mode, as some papers' fvcore scripts did (changes only the
            batch-norm term when ``include_norms`` is set).

    Returns:
        MACs as an integer.
    """
    mapping = dict(_ATTENTION_FORMULAS)
    if include_norms:
        mapping.update(_NORM_FORMULAS)
    param = next(model.parameters(), None)
    device = param.device if param is not None else 'cpu'
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.train(train_mode)
    try:
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with counter:
            model(torch.zeros(1, *input_size, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running stats excluded, as papers count)."""
    return sum(p.numel() for p in model.parameters())


def serialized_size_mb(obj) -> float:
    """Size in MB (10^6 bytes) of what would ship: a module's state_dict saved with ``torch.save``."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell() / 1e6
