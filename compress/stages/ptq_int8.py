"""Stage ``ptq_int8``: static int8 post-training quantization of convolutions and linears.

Backends:

* ``x86_pt2e``: ``torch.export`` (dynamic batch) → ``prepare_pt2e`` with ``X86InductorQuantizer`` (folds BN,
  inserts observers) → calibration → ``convert_pt2e`` → ``torch.compile`` (inductor lowers the q/dq patterns to
  oneDNN int8 kernels; VNNI on this CPU).
* ``openvino``: ``openvino.convert_model`` → ``nncf.quantize`` on the OpenVINO model (quantizing the OpenVINO
  model, not NNCF's torch fake-quant model, is what makes every conv run in u8) → OpenVINO CPU runtime with
  the f32 precision hint, so "int8" is compared with true fp32.

Every result carries a coverage report: the fraction of conv/linear weight elements stored in int8, the layers
left in float and why. A model whose capture fails is reported, not crashed on: its row stays fp32 with the
reason in the notes, so an int8 row can never silently be fp32.
"""
from __future__ import annotations

import os
import time

import torch
from torch import nn

from compress.config import PtqInt8Stage, first_line
from compress.data import calibration_batches
from compress.deploy import OpenVINORunner, TorchRunner, deploy_form, float_runner
from compress.stages.base import StageContext, StageResult

__all__ = ['apply_ptq_int8', 'quantize_x86_pt2e', 'quantize_openvino', 'pt2e_coverage', 'openvino_coverage']

_WEIGHTED_ATEN_OPS = ('conv1d', 'conv2d', 'conv3d', 'linear', 'conv_transpose2d')
# ops with real compute that X86InductorQuantizer leaves in float: reported so a slow int8 model can be explained
_FLOAT_COMPUTE_OPS = ('conv1d', 'conv2d', 'linear', 'matmul', 'bmm', 'group_norm', 'layer_norm', 'batch_norm',
                      'softmax', '_softmax', 'scaled_dot_product_attention', 'argmax', 'gather', 'mul', 'add',
                      'gelu', 'silu', 'sigmoid', 'mean')


def _has_attention(model: nn.Module) -> bool:
    return any('attn' in name.lower() or 'attention' in type(m).__name__.lower() for name, m in model.named_modules())


def quantize_x86_pt2e(model: nn.Module, calib: list[torch.Tensor]) -> tuple[torch.fx.GraphModule, dict]:
    """Export, prepare with X86InductorQuantizer, calibrate and convert; returns the int8 graph and coverage."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    example = calib[0][:2] if calib[0].shape[0] >= 2 else calib[0].repeat(2, 1, 1, 1)
    batch = torch.export.Dim('batch', min=1, max=4096)
    exported = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for images in calib:
            prepared(images)
    converted = convert_pt2e(prepared)
    return converted, pt2e_coverage(converted)


def _module_path(node) -> str:
    stack = node.meta.get('nn_module_stack') or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    return path.replace('L__self__.', '').replace("L['self'].", '') or node.name


def pt2e_coverage(graph_module: torch.fx.GraphModule) -> dict:
    """Which conv/linear weights of a converted PT2E graph are int8 (their weight comes through a dequantize)."""
    quantized, total, left_float = 0, 0, []
    float_ops: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op != 'call_function':
            continue
        op_name = getattr(node.target, '__name__', str(node.target)).split('.')[0]
        if op_name in _FLOAT_COMPUTE_OPS and not any('dequantize' in str(getattr(a, 'target', ''))
                                                     for a in node.all_input_nodes):
            float_ops[op_name] = float_ops.get(op_name, 0) + 1
        if op_name not in _WEIGHTED_ATEN_OPS:
            continue
        weight = node.args[1]
        is_quantized = weight.op == 'call_function' and 'dequantize' in str(weight.target)
        source = weight.args[0] if is_quantized else weight
        tensor = getattr(graph_module, source.target, None) if source.op == 'get_attr' else None
        count = tensor.numel() if isinstance(tensor, torch.Tensor) else int(source.meta['val'].numel()) \
            if 'val' in source.meta else 0
        total += count
        if is_quantized:
            quantized += count
        else:
            left_float.append({'layer': _module_path(node), 'op': node.target.__name__,
                               'why': 'not annotated by X86InductorQuantizer'})
    return {
        'quantized_weight_fraction': round(quantized / total, 4) if total else 0.0,
        'int8_weight_elements': quantized, 'weight_elements': total, 'not_quantized': left_float,
        'float_ops': float_ops,
    }


def quantize_openvino(model: nn.Module, calib: list[torch.Tensor], transformer: bool) -> tuple[object, dict]:
    """Convert to OpenVINO (dynamic batch) and quantize it with NNCF; returns the int8 OpenVINO model."""
    os.environ.setdefault('NNCF_EXTENSION_LOAD_TIMEOUT', '0')
    import nncf
    import openvino as ov

    example = calib[0][:1]
    ov_model = ov.convert_model(model.eval(), example_input=example)
    ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})
    dataset = nncf.Dataset(calib, lambda images: images.numpy())
    subset = len(calib)  # NNCF counts dataset items, and each item here is a batch
    kwargs = {'model_type': nncf.ModelType.TRANSFORMER} if transformer else {}
    if hasattr(model, 'nncf_ignored_scope'):  # a model family's ops that must stay float (SpaRTAN's CMixer products)
        kwargs['ignored_scope'] = model.nncf_ignored_scope()
    quantized = nncf.quantize(ov_model, dataset, subset_size=subset, target_device=nncf.TargetDevice.CPU, **kwargs)
    return quantized, openvino_coverage(quantized)


def openvino_fp32(model: nn.Module, example: torch.Tensor) -> OpenVINORunner:
    import openvino as ov
    ov_model = ov.convert_model(model.eval(), example_input=example)
    ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})
    return OpenVINORunner(ov_model, label='fp32', precision='f32')


def weight_constant(node, depth: int = 0):
    """Follow a weight input through Convert/Subtract/Multiply/Reshape/FakeQuantize back to its constant."""
    if node.get_type_name() == 'Constant':
        return node
    if depth > 8 or node.get_input_size() == 0:
        return None
    return weight_constant(node.input_value(0).get_node(), depth + 1)


def openvino_coverage(ov_model) -> dict:
    """Which conv/matmul weights of an OpenVINO model are stored in int8."""
    quantized, total, left_float = 0, 0, []
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() not in ('Convolution', 'GroupConvolution', 'MatMul'):
            continue
        constant = weight_constant(op.input_value(1).get_node())
        if constant is None:  # activation x activation matmul (attention): no weight to quantize
            continue
        count = 1
        for dim in constant.get_output_shape(0):
            count *= dim
        total += count
        if constant.get_element_type().get_type_name() in ('i8', 'u8'):
            quantized += count
        else:
            left_float.append({'layer': op.get_friendly_name(), 'op': op.get_type_name(),
                               'why': 'left in float by nncf.quantize'})
    return {
        'quantized_weight_fraction': round(quantized / total, 4) if total else 0.0,
        'int8_weight_elements': quantized, 'weight_elements': total, 'not_quantized': left_float,
    }


def apply_ptq_int8(cfg: PtqInt8Stage, model: nn.Module, ctx: StageContext) -> list[StageResult]:
    calib = calibration_batches(ctx.data.calib, cfg.calib_images, ctx.data_cfg.batch_size, ctx.data_cfg.workers,
                                ctx.seed)
    calib_count = sum(len(images) for images in calib)
    transformer = _has_attention(model) if cfg.transformer is None else cfg.transformer
    # deploy form: blocks with fuse()/reparameterize() (timm's convention) become the plain layers quantizers know
    deploy_model = deploy_form(model)
    results = []
    for backend in cfg.backend:
        references = {}
        start = time.perf_counter()
        name = f'ptq_int8[{backend}]'
        notes = [f'calibrated on {calib_count} images of the calibration split']
        try:
            if backend == 'x86_pt2e':
                graph, coverage = quantize_x86_pt2e(deploy_model, calib)
                runner = TorchRunner(graph, compiled=ctx.eval_cfg.compile, label='int8',
                                     fixed_batch=ctx.eval_cfg.batch_size)
                if not ctx.eval_cfg.compile:
                    notes.append('eval.compile is false: the int8 graph ran as reference q/dq ops, not int8 kernels')
            else:
                ov_model, coverage = quantize_openvino(deploy_model, calib, transformer)
                runner = OpenVINORunner(ov_model, label='int8', precision='f32')
                # OpenVINO's own fp32 (f32 hint) separates the runtime's gain from the quantization's
                references = {'openvino_fp32': openvino_fp32(deploy_model, calib[0][:1])}
                runtime = runner.runtime_precisions()
                coverage['runtime_precisions'] = {p: len(names) for p, names in runtime.items()}
                if transformer:
                    notes.append('nncf model_type=TRANSFORMER')
            precision = 'int8' if coverage['quantized_weight_fraction'] > 0 else 'fp32'
        except Exception as error:  # capture or quantization failed: keep the float model and say why
            runner = float_runner(model, ctx.eval_cfg)
            coverage = {'quantized_weight_fraction': 0.0, 'failed': f'{type(error).__name__}: {first_line(error)}'}
            notes.append(f'{backend} failed, row is the float model: {coverage["failed"]}')
            precision = 'fp32'
        if coverage.get('not_quantized'):
            notes.append(f'{len(coverage["not_quantized"])} weighted layers left in float, e.g. '
                         f'{coverage["not_quantized"][0]["layer"]}')
        if coverage.get('float_ops'):
            notes.append('ops running in float on float inputs: ' + ', '.join(
                f'{op} x{count}' for op, count in sorted(coverage['float_ops'].items(), key=lambda kv: -kv[1])))
        results.append(StageResult(
            name=name, kind='ptq_int8', runner=runner, float_model=model, next_model=None, precision=precision,
            backend=backend, seconds=time.perf_counter() - start, coverage=coverage, notes=notes,
            reference_runners=references,
        ))
    return results
