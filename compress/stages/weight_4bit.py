"""Stage ``weight_4bit``: 4-bit weights with float activations, a storage win more than a speed win on CPU.

Backends:

* ``nncf_openvino``: ``openvino.convert_model`` of the float model (dynamic batch) → data-free
  ``nncf.compress_weights(mode=INT4_SYM|INT4_ASYM, group_size, ratio, all_layers)`` → OpenVINO CPU runtime with
  the f32 precision hint (the plugin decompresses the i4/u4 weights inside its FullyConnected kernels; convs
  with 8-bit weights run as f32 convs). A group
  size that does not divide a layer's input channels is adjusted per layer (NNCF's
  ``GroupSizeFallbackMode.ADJUST``: the largest power of two >= 32 that divides them, e.g. 64 for deit_tiny's
  192-wide qkv/proj/fc1 when 128 is asked) instead of failing the whole model.
* ``torchao``: ``torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig`` (``Int4OpaqueTensor``,
  ``aten._weight_int4pack_mm_for_cpu``) on the ``nn.Linear`` layers whose ``out_features % 16 == 0`` (the CPU
  pack kernel's requirement) and whose ``in_features`` is divisible by the group size (adjusted per layer like
  NNCF: 128 → 64 → 32; torchao only has group sizes 32/64/128, so ``group_size: -1`` runs as 128 with a note).
  torchao's CPU int4 is always asymmetric (tinygemm scale + zero point), whatever ``mode`` says. Each int4
  layer takes its input in bf16 and hands its output back in the caller's dtype; the rest of the model stays
  fp32. Measured here (deit_tiny with 2 blocks, batch 8, 1 thread, CPU time): fp32 activations into the int4
  kernel take 2.03 s vs 0.047 s for fp32 eager (43x slower: unusable for evaluation, and ``torch.compile`` does
  not change it); with bf16 activations at the int4 layers 0.034-0.041 s eager and 0.029 s compiled (22 s to
  compile) vs 0.043 s / 0.041 s for fp32 eager / compiled. The full deit_tiny at batch 8 ran 38.6 img/s eager
  vs 33.5 fp32 eager. So the runner follows ``eval.compile`` like the other torch rows. ``torch.save`` of the
  state dict stores the packed tensors (uint8 ``qdata`` at 0.5 B per weight, bf16 scale+zero at 4 B per group)
  and loads them back as ``Int4OpaqueTensor``, so the runner's ``size_mb`` (serialized state dict) is the
  packed int4 size.

Which layers get 4 bits (found by experiment with NNCF 3.4.0 / torchao 0.18.0; random weights):

* NNCF 3.4 only ranks **MatMul** weights (and, with ``all_layers``, embeddings) for the 4-bit precision:
  every Convolution and GroupConvolution, 1x1 and depthwise included, is compressed to the 8-bit backup
  (``INT8_ASYM``, per output channel), and so is the last MatMul unless ``all_layers``. On
  ``tf_efficientnet_lite0`` that is 0 of 50 layers in 4 bit (49 convs + classifier in u8, 100 % of the weights
  in 8 bit); with ``all_layers`` only the classifier (1000x1280, 28 % of the weights) goes to i4. On
  ``deit_tiny_patch16_224`` 48 of 50 layers are i4 (every block Linear; qkv/proj/fc1 at group 64, fc2 at 128)
  and the patch-embedding conv and the head are u8 (94 % / 6 % of the weight elements); the IR shrinks from
  22.9 MB to 3.6 MB and runs 94 vs 73 img/s (OpenVINO f32 hint, batch 8, 1 thread). tf_efficientnet_lite0's IR
  shrinks from 18.6 MB to 5.0 MB, all of it from the 8-bit backup (4.4 MB with ``all_layers``). Making 1x1
  convs eligible would need them rewritten as MatMuls before compression; not done here.
* torchao covers ``nn.Linear`` only: on ``tf_efficientnet_lite0`` nothing (its only Linear, the 1000-class
  classifier, fails ``out_features % 16``); on ``deit_tiny`` the 48 block Linears (head: 1000 % 16 != 0,
  patch embedding: a conv). By default (``all_layers: false``) the last Linear stays float too, mirroring NNCF.

* torchao's conv path in 0.18 (``IntxWeightOnlyConfig(weight_dtype=torch.int4)`` on ``nn.Conv2d``) gives no
  smaller artifact: it keeps the 4-bit values in int8 storage (``IntxUnpackedToInt8Tensor``; EfficientNet-Lite0's
  state dict stays 18.87 MB) and fails on depthwise convs (``RuntimeError: shape '[32, 1, 3, 3]' is invalid``), so
  it is not offered.

What each result holds (4-bit, 8-bit, float fractions, layer by layer) is read from the artifact by the evaluator
(:mod:`eval.coverage`); the stage records why the layers that did not get 4 bits did not (``info['not_4bit']``). A
backend that puts no weight in 4 bit makes no result: its reason is recorded, and no "4-bit" row exists.
"""
from __future__ import annotations

import copy
import os
import time

import torch
from torch import nn

from compress.config import Weight4BitStage
from compress.deploy import deploy_form
from compress.stages.base import StageContext, StageResult, backend_failure, layers_not_taken
from eval.coverage import execution_order, weight_coverage
from eval.runtimes import check_compiles, to_openvino

__all__ = ['apply_weight_4bit', 'compress_openvino', 'quantize_torchao_int4']

_TORCHAO_GROUPS = (128, 64, 32)  # Int4OpaqueTensor.from_hp accepts these only


# --------------------------------------------------------------------------------------------- NNCF → OpenVINO

def compress_openvino(model: nn.Module, example: torch.Tensor, cfg: Weight4BitStage) -> tuple[object, object]:
    """Convert to OpenVINO (dynamic batch) and compress the weights to 4 bit with NNCF, data-free.

    Returns the compressed model and the float OpenVINO model it came from.
    """
    os.environ.setdefault('NNCF_EXTENSION_LOAD_TIMEOUT', '0')
    import nncf

    float_model = to_openvino(model, example)
    mode = nncf.CompressWeightsMode.INT4_SYM if cfg.mode == 'int4_sym' else nncf.CompressWeightsMode.INT4_ASYM
    compressed = nncf.compress_weights(  # rewrites its argument in place
        float_model.clone(), mode=mode, group_size=cfg.group_size, ratio=cfg.ratio, all_layers=cfg.all_layers,
        advanced_parameters=nncf.AdvancedCompressionParameters(
            group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST))
    check_compiles(compressed, '4-bit model')
    return compressed, float_model


def _nncf_not_4bit(coverage: dict, op_of: dict[str, str], last_matmul: str | None) -> list[dict]:
    """Why each layer NNCF did not put in 4 bit stayed in 8 bit (or float)."""
    reasons = []
    for precision in ('int8', 'float'):
        for layer in coverage['layers'][precision]:
            op = op_of.get(layer, '?')
            if precision == 'float':
                why = 'left in float by nncf.compress_weights'
            elif op != 'MatMul':
                why = 'convolution: NNCF 3.4 compresses convolutions (1x1 and depthwise too) only to the 8-bit backup'
            elif layer == last_matmul:
                why = 'last MatMul: 8-bit backup unless all_layers'
            else:
                why = '8-bit backup (ratio < 1 or no usable group size)'
            reasons.append({'layer': layer, 'op': op, 'precision': precision, 'why': why})
    return reasons


# --------------------------------------------------------------------------------------------------- torchao

def _to_bf16(module, args):
    module._int4_input_dtype = args[0].dtype  # the forward hook only sees the cast arguments
    return (args[0].to(torch.bfloat16), *args[1:])


def _back_to_input_dtype(module, args, output):
    return output.to(module._int4_input_dtype)


def _torchao_group(in_features: int, requested: int) -> int | None:
    return next((g for g in _TORCHAO_GROUPS if g <= requested and in_features % g == 0), None)


def quantize_torchao_int4(model: nn.Module, example: torch.Tensor, group_size: int = 128,
                          all_layers: bool = False) -> tuple[nn.Module, dict[str, int], dict[str, str]]:
    """A copy of ``model`` whose eligible ``nn.Linear`` weights are torchao CPU int4 (``Int4OpaqueTensor``).

    Eligible: ``out_features % 16 == 0`` and ``in_features`` divisible by the group size (the largest of
    128/64/32 not above ``group_size`` that divides it); not the last Linear unless ``all_layers``. An int4
    layer's input is cast to bf16 and its output back (fp32 activations make the CPU kernel ~40x slower).

    Returns:
        The copy, the group size of each int4 layer, and why each other conv / linear layer is not int4.
    """
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
    from torchao.quantization import quantize_

    requested = 128 if group_size == -1 else group_size
    if requested < min(_TORCHAO_GROUPS):
        raise ValueError(f'torchao CPU int4 supports group sizes 32/64/128, not {group_size}')
    quantized = copy.deepcopy(model).eval()
    linears = [name for name, module in execution_order(quantized, example) if isinstance(module, nn.Linear)]
    last_linear = linears[-1] if linears else None

    plan: dict[str, int] = {}
    why_not: dict[str, str] = {}
    for name, module in quantized.named_modules():
        if isinstance(module, nn.Linear):
            group = _torchao_group(module.in_features, requested)
            if module.out_features % 16:
                why_not[name] = f'out_features {module.out_features} % 16 != 0 (CPU int4 pack kernel)'
            elif group is None:
                why_not[name] = f'in_features {module.in_features} not divisible by 32'
            elif name == last_linear and not all_layers:
                why_not[name] = 'last Linear: kept float unless all_layers'
            else:
                plan[name] = group
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            why_not[name] = 'convolution: torchao int4 covers Linear only'

    modules = dict(quantized.named_modules())
    for group in sorted(set(plan.values()), reverse=True):
        names = {name for name, g in plan.items() if g == group}
        for name in names:
            modules[name].to(torch.bfloat16)  # the kernel wants bf16 activations, so scales and bias are bf16
        quantize_(quantized, PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False),
                  filter_fn=lambda module, fqn, names=names: fqn in names)
    for name in list(plan):
        module = modules[name]
        if isinstance(module.weight, Int4OpaqueTensor):
            module.register_forward_pre_hook(_to_bf16)
            module.register_forward_hook(_back_to_input_dtype)
        else:  # torchao skipped it silently
            module.to(torch.float32)
            why_not[name] = 'skipped by torchao'
            del plan[name]
    return quantized, plan, why_not


# ------------------------------------------------------------------------------------------------------ stage

def _group_size_note(group_sizes: dict[str, int], requested: int) -> str | None:
    adjusted = {}
    for group in group_sizes.values():
        if group != requested:
            adjusted[group] = adjusted.get(group, 0) + 1
    if not adjusted:
        return None
    return f'group size {requested} does not divide every layer: ' + ', '.join(
        f'{count} layers at group {group}' for group, count in sorted(adjusted.items(), key=lambda kv: -kv[0]))


def apply_weight_4bit(cfg: Weight4BitStage, model: nn.Module, ctx: StageContext) -> list[StageResult]:
    example = torch.zeros(1, *ctx.input_size)
    deploy_model = deploy_form(model)  # the plain layers the compressors know
    results = []
    for backend in cfg.backend:
        start = time.perf_counter()
        references, notes, info, failed = {}, [], {}, None
        try:
            if backend == 'nncf_openvino':
                artifact, float_ov = compress_openvino(deploy_model, example, cfg)
                references['openvino fp32'] = float_ov
                torch_layers = execution_order(deploy_model, example)
                coverage = weight_coverage(artifact, torch_layers)
                op_of = {}
                for (name, module) in torch_layers:
                    op_of[name] = 'MatMul' if isinstance(module, nn.Linear) else 'Convolution'
                last_matmul = next((name for name, module in reversed(torch_layers) if isinstance(module, nn.Linear)),
                                   None)
                info['not_4bit'] = _nncf_not_4bit(coverage, op_of, last_matmul)
                info['group_sizes'] = coverage['int4_group_sizes']
                notes.append(f'nncf.compress_weights {cfg.mode}, group {cfg.group_size}, ratio {cfg.ratio}, '
                             f'all_layers {cfg.all_layers}, data-free')
                group_note = _group_size_note(coverage['int4_group_sizes'], cfg.group_size)
            else:
                artifact, plan, why_not = quantize_torchao_int4(deploy_model, example, cfg.group_size, cfg.all_layers)
                coverage = weight_coverage(artifact)
                info['not_4bit'] = [{'layer': name, 'precision': 'float', 'why': why} for name, why in why_not.items()]
                info['group_sizes'] = plan
                notes.append('torchao PrototypeInt4WeightOnlyConfig (asymmetric, tinygemm) on Linear; int4 layers '
                             'take bf16 activations, the rest runs fp32')
                if cfg.mode == 'int4_sym':
                    notes.append('mode int4_sym not available in torchao CPU int4: weights are asymmetric')
                if cfg.group_size == -1:
                    notes.append('torchao CPU int4 has no per-channel mode: group 128 used')
                if cfg.ratio < 1:
                    notes.append(f'ratio {cfg.ratio} applies to nncf_openvino only: every eligible Linear is int4')
                group_note = _group_size_note(plan, 128 if cfg.group_size == -1 else cfg.group_size)
            if group_note:
                notes.append(group_note)
            if info['not_4bit']:
                notes.append('not in 4 bit: ' + layers_not_taken(info['not_4bit']))
            if coverage['int4_weight_fraction'] == 0:
                artifact, references = None, {}
                failed = f'{backend} put no weight in 4 bit: ' + (layers_not_taken(info['not_4bit'])
                                                                  or 'the model has no conv / linear weights')
        except Exception as error:  # unavailable config or kernel, or a failed conversion
            artifact, references = None, {}
            failed = f'{backend} failed: {backend_failure(error)}'
        results.append(StageResult(
            name=f'weight_4bit[{backend}]', kind='weight_4bit', artifact=artifact, float_model=model,
            next_model=None, backend=backend, seconds=time.perf_counter() - start, notes=notes, info=info,
            references=references, failed=failed,
        ))
    return results
