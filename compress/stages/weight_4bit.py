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

Coverage: ``int4_weight_fraction`` / ``int8_weight_fraction`` / ``float_weight_fraction`` of the conv+linear
(conv+matmul) weight elements (they sum to 1), ``quantized_weight_fraction`` = the 4-bit fraction, the layers
by precision, the group size per 4-bit layer and, for the layers not in 4 bit, why. A row with no 4-bit weight
is labelled with the precision it really has (``int8`` for NNCF's backup, ``fp32``), never ``int4``; a failed
backend is reported in the notes and its row is the float model.
"""
from __future__ import annotations

import copy
import os
import re
import time

import torch
from torch import nn

from compress.config import Weight4BitStage, first_line
from compress.deploy import OpenVINORunner, TorchRunner, deploy_form, float_runner
from compress.stages.base import StageContext, StageResult
from compress.stages.ptq_int8 import weight_constant

__all__ = ['apply_weight_4bit', 'compress_openvino', 'openvino_weight_coverage', 'quantize_torchao_int4',
           'execution_order']

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_OV_WEIGHTED = ('Convolution', 'GroupConvolution', 'ConvolutionBackpropData', 'GroupConvolutionBackpropData',
                'MatMul')
_OV_4BIT = {'i4', 'u4', 'nf4', 'f4e2m1'}
_OV_8BIT = {'i8', 'u8', 'f8e4m3', 'f8e5m2'}
_TORCHAO_GROUPS = (128, 64, 32)  # Int4OpaqueTensor.from_hp accepts these only


def execution_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The conv/linear modules in the order one forward pass calls them (a module called twice appears twice)."""
    order, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, _WEIGHTED):
            handles.append(module.register_forward_hook(lambda m, a, o, name=name: order.append((name, m))))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _fractions(elements: dict[str, int]) -> dict:
    total = sum(elements.values())
    fraction = {k: round(v / total, 4) if total else 0.0 for k, v in elements.items()}
    return {
        'quantized_weight_fraction': fraction['int4'],
        'int4_weight_fraction': fraction['int4'], 'int8_weight_fraction': fraction['int8'],
        'float_weight_fraction': fraction['float'],
        'int4_weight_elements': elements['int4'], 'int8_weight_elements': elements['int8'],
        'float_weight_elements': elements['float'], 'weight_elements': total,
    }


# --------------------------------------------------------------------------------------------- NNCF → OpenVINO

def _ov_layer_name(op) -> str:
    name = op.get_friendly_name()
    match = re.match(r'__module\.([^/]+)/', name)
    return match.group(1) if match else name


def openvino_weight_coverage(ov_model, torch_layers: list[tuple[str, nn.Module]] | None = None) -> dict:
    """How the conv/matmul weights of an OpenVINO model are stored: 4 bit, 8 bit or float, layer by layer.

    ``torch_layers`` (from :func:`execution_order`) names the layers after the torch modules when the OpenVINO
    ops match them one to one in order and in weight size (convert_model loses the names of convs it fused a
    BatchNorm into); otherwise the OpenVINO op names are used.
    """
    weighted = []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() not in _OV_WEIGHTED:
            continue
        constant = weight_constant(op.input_value(1).get_node())
        if constant is None:  # activation x activation matmul (attention): no weight
            continue
        shape = [int(d) for d in constant.get_output_shape(0)]
        count = 1
        for dim in shape:
            count *= dim
        weighted.append((op, constant, shape, count))
    names = [_ov_layer_name(op) for op, *_ in weighted]
    named_from = 'openvino op names'
    if torch_layers and len(torch_layers) == len(weighted) and all(
            module.weight.numel() == count for (_, module), (*_, count) in zip(torch_layers, weighted)):
        names = [name for name, _ in torch_layers]
        named_from = 'torch modules (matched by execution order and weight size)'

    elements = {'int4': 0, 'int8': 0, 'float': 0}
    layers: dict[str, list[str]] = {'int4': [], 'int8': [], 'float': []}
    group_sizes: dict[str, int] = {}
    backup_8bit, left_float = [], []
    last_matmul = max((i for i, (op, *_) in enumerate(weighted) if op.get_type_name() == 'MatMul'), default=None)
    for index, ((op, constant, shape, count), name) in enumerate(zip(weighted, names)):
        element_type = constant.get_element_type().get_type_name()
        if element_type in _OV_4BIT:
            precision = 'int4'
            # grouped weights are stored as [out, groups, group_size]; per channel as [out, in]
            group_sizes[name] = shape[-1] if len(shape) == 3 and op.get_type_name() == 'MatMul' else -1
        elif element_type in _OV_8BIT:
            precision = 'int8'
            if op.get_type_name() != 'MatMul':
                why = 'convolution: NNCF 3.4 compresses convolutions (1x1 and depthwise too) only to the 8-bit backup'
            elif index == last_matmul:
                why = 'last MatMul: 8-bit backup unless all_layers'
            else:
                why = '8-bit backup (ratio < 1 or no usable group size)'
            backup_8bit.append({'layer': name, 'op': op.get_type_name(), 'why': why})
        else:
            precision = 'float'
            left_float.append({'layer': name, 'op': op.get_type_name(),
                               'why': f'left in {element_type} by nncf.compress_weights'})
        elements[precision] += count
        layers[precision].append(name)
    coverage = _fractions(elements)
    coverage.update({
        'layer_counts': {k: len(v) for k, v in layers.items()}, 'layers': layers,
        'int4_group_sizes': group_sizes, 'backup_8bit': backup_8bit, 'not_quantized': left_float,
        'layer_names_from': named_from,
    })
    return coverage


def compress_openvino(model: nn.Module, example: torch.Tensor, cfg: Weight4BitStage) -> tuple[object, object, dict]:
    """Convert to OpenVINO (dynamic batch) and compress the weights to 4 bit with NNCF, data-free.

    Returns the compressed model, the float OpenVINO model it came from and the coverage.
    """
    os.environ.setdefault('NNCF_EXTENSION_LOAD_TIMEOUT', '0')
    import nncf
    import openvino as ov

    ov_model = ov.convert_model(model.eval(), example_input=example)
    ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})
    float_model = ov_model.clone()  # compress_weights rewrites its argument in place
    mode = nncf.CompressWeightsMode.INT4_SYM if cfg.mode == 'int4_sym' else nncf.CompressWeightsMode.INT4_ASYM
    compressed = nncf.compress_weights(
        ov_model, mode=mode, group_size=cfg.group_size, ratio=cfg.ratio, all_layers=cfg.all_layers,
        advanced_parameters=nncf.AdvancedCompressionParameters(
            group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST))
    return compressed, float_model, openvino_weight_coverage(compressed, execution_order(model, example))


# --------------------------------------------------------------------------------------------------- torchao

def _to_bf16(module, args):
    module._int4_input_dtype = args[0].dtype  # the forward hook only sees the cast arguments
    return (args[0].to(torch.bfloat16), *args[1:])


def _back_to_input_dtype(module, args, output):
    return output.to(module._int4_input_dtype)


def _torchao_group(in_features: int, requested: int) -> int | None:
    return next((g for g in _TORCHAO_GROUPS if g <= requested and in_features % g == 0), None)


def quantize_torchao_int4(model: nn.Module, example: torch.Tensor, group_size: int = 128,
                          all_layers: bool = False) -> tuple[nn.Module, dict]:
    """A copy of ``model`` whose eligible ``nn.Linear`` weights are torchao CPU int4 (``Int4OpaqueTensor``).

    Eligible: ``out_features % 16 == 0`` and ``in_features`` divisible by the group size (the largest of
    128/64/32 not above ``group_size`` that divides it); not the last Linear unless ``all_layers``. An int4
    layer's input is cast to bf16 and its output back (fp32 activations make the CPU kernel ~40x slower).
    """
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
    from torchao.quantization import quantize_

    requested = 128 if group_size == -1 else group_size
    if requested < min(_TORCHAO_GROUPS):
        raise ValueError(f'torchao CPU int4 supports group sizes 32/64/128, not {group_size}')
    quantized = copy.deepcopy(model).eval()
    order = execution_order(quantized, example)
    linears = [name for name, module in order if isinstance(module, nn.Linear)]
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
        elif isinstance(module, _WEIGHTED):
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

    elements = {'int4': 0, 'int8': 0, 'float': 0}
    layers: dict[str, list[str]] = {'int4': [], 'int8': [], 'float': []}
    packed_bytes = 0
    for name, module in quantized.named_modules():
        if not isinstance(module, _WEIGHTED):
            continue
        precision = 'int4' if name in plan else 'float'
        elements[precision] += module.weight.numel()
        layers[precision].append(name)
        if name in plan:
            weight = module.weight
            packed_bytes += sum(t.numel() * t.element_size() for t in (weight.qdata, weight.scale_and_zero))
    coverage = _fractions(elements)
    coverage.update({
        'layer_counts': {k: len(v) for k, v in layers.items()}, 'layers': layers, 'int4_group_sizes': plan,
        'not_quantized': [{'layer': name, 'op': type(modules[name]).__name__, 'why': why}
                          for name, why in why_not.items()],
        'int4_packed_bytes': packed_bytes, 'int4_activation_dtype': 'bfloat16',
    })
    return quantized, coverage


# ------------------------------------------------------------------------------------------------------ stage

def _group_size_note(coverage: dict, requested: int) -> str | None:
    adjusted = {}
    for group in coverage.get('int4_group_sizes', {}).values():
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
        references = {}
        notes: list[str] = []
        try:
            if backend == 'nncf_openvino':
                compressed, float_ov, coverage = compress_openvino(deploy_model, example, cfg)
                runner = OpenVINORunner(compressed, label='int4', precision='f32')
                # OpenVINO's own fp32 (f32 hint) separates the runtime's gain from the compression's
                references = {'openvino_fp32': OpenVINORunner(float_ov, label='fp32', precision='f32')}
                coverage['runtime_precisions'] = {p: len(n) for p, n in runner.runtime_precisions().items()}
                notes.append(f'nncf.compress_weights {cfg.mode}, group {cfg.group_size}, ratio {cfg.ratio}, '
                             f'all_layers {cfg.all_layers}, data-free')
                if coverage['backup_8bit']:
                    convs = sum(1 for layer in coverage['backup_8bit'] if layer['op'] != 'MatMul')
                    notes.append(f'{len(coverage["backup_8bit"])} layers in 8 bit (NNCF backup), {convs} of them '
                                 f'convolutions (never 4 bit in NNCF 3.4): '
                                 f'{coverage["int8_weight_fraction"]:.0%} of the weights')
            else:
                quantized, coverage = quantize_torchao_int4(deploy_model, example, cfg.group_size, cfg.all_layers)
                runner = TorchRunner(quantized, compiled=ctx.eval_cfg.compile, label='int4',
                                     fixed_batch=ctx.eval_cfg.batch_size)
                notes.append('torchao PrototypeInt4WeightOnlyConfig (asymmetric, tinygemm) on Linear; int4 layers '
                             'take bf16 activations, the rest runs fp32; '
                             + ('torch.compile' if ctx.eval_cfg.compile else 'eager'))
                if cfg.mode == 'int4_sym':
                    notes.append('mode int4_sym not available in torchao CPU int4: weights are asymmetric')
                if cfg.group_size == -1:
                    notes.append('torchao CPU int4 has no per-channel mode: group 128 used')
                if cfg.ratio < 1:
                    notes.append(f'ratio {cfg.ratio} applies to nncf_openvino only: every eligible Linear is int4')
                convs = [n for n in coverage['not_quantized'] if n['why'].startswith('convolution')]
                if convs:
                    conv_elements = sum(dict(deploy_model.named_modules())[n['layer']].weight.numel() for n in convs)
                    notes.append(f'torchao int4 covers Linear only: {len(convs)} conv layer(s) '
                                 f'({conv_elements / max(coverage["weight_elements"], 1):.0%} of the weights) '
                                 f'stay float')
                if coverage['int4_weight_elements']:
                    notes.append(f'size_mb = torch.save of the state dict, int4 packed: {coverage["int4_packed_bytes"]}'
                                 f' bytes (uint8 qdata + bf16 scale/zero) for {coverage["int4_weight_elements"]}'
                                 f' weights')
            group_note = _group_size_note(coverage, 128 if cfg.group_size == -1 and backend == 'torchao'
                                          else cfg.group_size)
            if group_note:
                notes.append(group_note)
            if coverage['int4_weight_fraction'] > 0:
                precision = 'int4'
            elif coverage['int8_weight_fraction'] > 0:
                precision = 'int8'
                notes.append('no weight in 4 bit: every compressed layer is in the 8-bit backup')
            else:
                precision = 'fp32'
                notes.append('no weight in 4 bit: the row is the float model')
        except Exception as error:  # unavailable config/kernel or a failed conversion: keep the float model
            runner = float_runner(model, ctx.eval_cfg)
            coverage = {'quantized_weight_fraction': 0.0, 'failed': f'{type(error).__name__}: {first_line(error)}'}
            notes.append(f'{backend} failed, row is the float model: {coverage["failed"]}')
            precision = 'fp32'
        if coverage.get('not_quantized'):
            notes.append(f'{len(coverage["not_quantized"])} weighted layers left in float, e.g. '
                         f'{coverage["not_quantized"][0]["layer"]} ({coverage["not_quantized"][0]["why"]})')
        results.append(StageResult(
            name=f'weight_4bit[{backend}]', kind='weight_4bit', runner=runner, float_model=model, next_model=None,
            precision=precision, backend=backend, seconds=time.perf_counter() - start, coverage=coverage,
            notes=notes, reference_runners=references,
        ))
    return results
