"""What an artifact really holds: the fraction of its conv / linear (matmul) weights stored in 8 bit, in 4 bit and
in float, layer by layer, read from the artifact itself, never from what a stage meant to do.

* PT2E graph (``torch.fx.GraphModule``): a weight is int8 when it reaches its conv / linear through a dequantize.
* OpenVINO model: the element type of each weight constant (i8/u8: 8 bit; i4/u4/nf4: 4 bit; else float).
* torch module: torchao weight tensors: ``Int4OpaqueTensor`` (packed, two weights a byte) is 4 bit;
  ``IntxUnpackedToInt8Tensor`` holds 4-bit *values* in int8 storage: it counts as 4 bit with ``int4_storage``
  'int8 (simulation)', so no row claims a smaller artifact than the file it writes.

``runs_in`` says in what precision the weights are used when the model runs, where that differs from storage.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ['weight_coverage', 'weight_constant', 'execution_order', 'float_compute_ops']

_TORCH_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                   nn.Linear)
_ATEN_WEIGHTED = ('conv1d', 'conv2d', 'conv3d', 'linear', 'conv_transpose2d')
_OV_WEIGHTED = ('Convolution', 'GroupConvolution', 'ConvolutionBackpropData', 'GroupConvolutionBackpropData',
                'MatMul')
_OV_4BIT = {'i4', 'u4', 'nf4', 'f4e2m1'}
_OV_8BIT = {'i8', 'u8', 'f8e4m3', 'f8e5m2'}
# ops with real compute that X86InductorQuantizer leaves in float: reported so a slow int8 model can be explained
_FLOAT_COMPUTE_OPS = ('conv1d', 'conv2d', 'linear', 'matmul', 'bmm', 'group_norm', 'layer_norm', 'batch_norm',
                      'softmax', '_softmax', 'scaled_dot_product_attention', 'argmax', 'gather', 'mul', 'add',
                      'gelu', 'silu', 'sigmoid', 'mean')

# ops that rank tokens or gather / scatter them by data-dependent indices (PartialFormer's foreground selection, an
# argmax channel pick): no int8 kernel exists for them in either backend, so they are reported, never counted as
# quantized. OpenVINO's names; its gathers and scatters count only with indices a TopK computed (others are static
# rearrangements such as im2col, or shape arithmetic).
_PT2E_SELECTION_OPS = ('topk', 'sort', 'argsort', 'argmax', 'argmin', 'gather', 'scatter', 'index_select',
                       'take_along_dim')
_OV_SELECTION_OPS = ('TopK', 'Gather', 'GatherElements', 'GatherND', 'ScatterElementsUpdate', 'ScatterUpdate',
                     'ScatterNDUpdate')


def _summary(layers: list[tuple[str, str, str, int]], **extra) -> dict:
    """layers: (name, op, precision in {'int8', 'int4', 'float'}, weight elements)."""
    elements = {'int8': 0, 'int4': 0, 'float': 0}
    names: dict[str, list[str]] = {'int8': [], 'int4': [], 'float': []}
    for name, _op, precision, count in layers:
        elements[precision] += count
        names[precision].append(name)
    total = sum(elements.values())
    fraction = {k: round(v / total, 4) if total else 0.0 for k, v in elements.items()}
    return {
        'int8_weight_fraction': fraction['int8'], 'int4_weight_fraction': fraction['int4'],
        'float_weight_fraction': fraction['float'] if total else 1.0,
        'quantized_weight_fraction': round(fraction['int8'] + fraction['int4'], 4),
        'weight_elements': total, 'int8_weight_elements': elements['int8'],
        'int4_weight_elements': elements['int4'], 'float_weight_elements': elements['float'],
        'layer_counts': {k: len(v) for k, v in names.items()}, 'layers': names,
        'float_layers': [{'layer': name, 'op': op} for name, op, precision, _ in layers if precision == 'float'],
        **extra,
    }


# --------------------------------------------------------------------------------------------------- PT2E

def _module_path(node) -> str:
    stack = node.meta.get('nn_module_stack') or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    return path.replace('L__self__.', '').replace("L['self'].", '') or node.name


def _pt2e_coverage(graph_module: torch.fx.GraphModule) -> dict:
    layers = []
    for node in graph_module.graph.nodes:
        if node.op != 'call_function':
            continue
        op_name = getattr(node.target, '__name__', str(node.target)).split('.')[0]
        if op_name not in _ATEN_WEIGHTED:
            continue
        weight = node.args[1]
        is_quantized = weight.op == 'call_function' and 'dequantize' in str(weight.target)
        source = weight.args[0] if is_quantized else weight
        tensor = getattr(graph_module, source.target, None) if source.op == 'get_attr' else None
        count = tensor.numel() if isinstance(tensor, torch.Tensor) else int(source.meta['val'].numel()) \
            if 'val' in source.meta else 0
        layers.append((_module_path(node), op_name, 'int8' if is_quantized else 'float', count))
    return _summary(layers, format='pt2e', float_ops=float_compute_ops(graph_module),
                    selection_ops=_pt2e_selection_ops(graph_module))


def _pt2e_selection_ops(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        op_name = getattr(node.target, '__name__', str(node.target)).split('.')[0]
        if node.op == 'call_function' and op_name in _PT2E_SELECTION_OPS:
            counts[op_name] = counts.get(op_name, 0) + 1
    return counts


def float_compute_ops(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    """Ops of a PT2E graph with real compute whose inputs are not dequantized (they run in float)."""
    counts: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op != 'call_function':
            continue
        op_name = getattr(node.target, '__name__', str(node.target)).split('.')[0]
        if op_name in _FLOAT_COMPUTE_OPS and not any('dequantize' in str(getattr(a, 'target', ''))
                                                     for a in node.all_input_nodes):
            counts[op_name] = counts.get(op_name, 0) + 1
    return counts


# ----------------------------------------------------------------------------------------------- OpenVINO

def weight_constant(node, depth: int = 0):
    """Follow a weight input through Convert/Subtract/Multiply/Reshape/FakeQuantize back to its constant."""
    if node.get_type_name() == 'Constant':
        return node
    if depth > 8 or node.get_input_size() == 0:
        return None
    return weight_constant(node.input_value(0).get_node(), depth + 1)


def _computed_by_topk(node, depth: int = 0) -> bool:
    """Whether an index tensor comes from a ranking (TopK a few reshapes / broadcasts up), not from shape math."""
    if node.get_type_name() == 'TopK':
        return True
    return depth < 6 and any(_computed_by_topk(node.input_value(i).get_node(), depth + 1)
                             for i in range(node.get_input_size()))


def _ov_layer_name(op) -> str:
    import re
    name = op.get_friendly_name()
    match = re.match(r'__module\.([^/]+)/', name)
    return match.group(1) if match else name


def _openvino_coverage(ov_model, torch_layers: list[tuple[str, nn.Module]] | None) -> dict:
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
    selection: dict[str, int] = {}
    for op in ov_model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in _OV_SELECTION_OPS or not op.get_output_element_type(0).is_real() and kind != 'TopK':
            continue  # shape arithmetic gathers integers
        if kind == 'TopK' and not op.input_value(0).get_element_type().is_real():
            continue
        if kind != 'TopK' and not _computed_by_topk(op.input_value(1).get_node()):
            continue
        selection[kind] = selection.get(kind, 0) + 1
    names = [_ov_layer_name(op) for op, *_ in weighted]
    named_from = 'openvino op names'
    # convert_model loses the names of convs it fused a BatchNorm into: name them after the torch modules when
    # the ops match them one to one, in order and in weight size
    if torch_layers and len(torch_layers) == len(weighted) and all(
            module.weight.numel() == count for (_, module), (*_, count) in zip(torch_layers, weighted)):
        names = [name for name, _ in torch_layers]
        named_from = 'torch modules (matched by execution order and weight size)'
    layers, group_sizes = [], {}
    for (op, constant, shape, count), name in zip(weighted, names):
        element_type = constant.get_element_type().get_type_name()
        precision = 'int4' if element_type in _OV_4BIT else 'int8' if element_type in _OV_8BIT else 'float'
        if precision == 'int4':  # grouped weights are stored as [out, groups, group_size]; per channel [out, in]
            group_sizes[name] = shape[-1] if len(shape) == 3 and op.get_type_name() == 'MatMul' else -1
        layers.append((name, op.get_type_name(), precision, count))
    return _summary(layers, format='openvino', int4_storage='packed' if group_sizes else None,
                    int4_group_sizes=group_sizes, layer_names_from=named_from, selection_ops=selection)


# ------------------------------------------------------------------------------------------- torch module

def _torch_weight_precision(weight) -> tuple[str, str | None]:
    kind = type(weight).__name__
    if kind == 'Int4OpaqueTensor':
        return 'int4', 'packed'
    if kind == 'IntxUnpackedToInt8Tensor':
        bits = getattr(weight, 'target_dtype', None)
        if bits in (torch.int4, getattr(torch, 'uint4', None)):
            return 'int4', 'int8 (simulation)'
        return 'int8', None
    if kind in ('Int8Tensor', 'AffineQuantizedTensor'):
        return 'int8', None
    return 'float', None


def _module_coverage(module: nn.Module) -> dict:
    layers, storage = [], set()
    for name, sub in module.named_modules():
        if isinstance(sub, _TORCH_WEIGHTED) and getattr(sub, 'weight', None) is not None:
            precision, how = _torch_weight_precision(sub.weight)
            if how:
                storage.add(how)
            layers.append((name, type(sub).__name__, precision, sub.weight.numel()))
    return _summary(layers, format='torch', int4_storage=' + '.join(sorted(storage)) or None)


def weight_coverage(artifact, torch_layers: list[tuple[str, nn.Module]] | None = None) -> dict:
    """Fractions of the conv / linear weight elements in int8, int4 and float, and the layers in each.

    Args:
        artifact: a PT2E graph, an OpenVINO model or a torch module.
        torch_layers: for an OpenVINO model, the torch model's layers in execution order (names its layers).
    """
    if isinstance(artifact, torch.fx.GraphModule):
        return _pt2e_coverage(artifact)
    if isinstance(artifact, nn.Module):
        return _module_coverage(artifact)
    return _openvino_coverage(artifact, torch_layers)


def execution_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The conv/linear modules in the order one forward pass calls them (a module called twice appears twice)."""
    order, handles = [], []
    for name, module in model.named_modules():
        if isinstance(module, _TORCH_WEIGHTED):
            handles.append(module.register_forward_hook(lambda m, a, o, name=name: order.append((name, m))))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return order
