"""Stage ``export``: write what the previous stage deployed as ONNX and/or OpenVINO IR, and evaluate the file.

The stage exports ``ctx.previous[0]`` (the first result of the previous stage: what the pipeline continues
with). For each format it writes the file(s), loads them again with OpenVINO and returns one row
``export[onnx]`` / ``export[openvino]`` whose artifact is the *loaded file*, so the row measures what ships:
ONNX files are read by OpenVINO's ONNX frontend (``ov.Core().read_model(model.onnx)``; onnxruntime is not a
dependency), IR files with ``read_model(model.xml)``; the evaluator runs them with the f32 precision hint and
sizes the row by the files on disk. Every row records the largest difference between the reloaded file and its
source at a batch size the export never saw (3), which also proves the batch dimension is dynamic.

What works in this toolchain (torch 2.14.1, onnx 1.23.2, openvino 2026.4.1, torchao 0.18.0), by source:

* **float torch module** (baseline, prune, train, distill): ONNX with the TorchScript ("legacy") exporter,
  ``torch.onnx.export(..., dynamo=False, opset_version=17, dynamic_axes=batch)``; works for timm CNNs and ViTs
  (``scaled_dot_product_attention`` has an opset-14 symbolic). The dynamo exporter (torch's default) needs
  ``onnxscript``, which is not installed (``ModuleNotFoundError: No module named 'onnxscript'``); it is only
  tried when the legacy exporter fails. IR: ``ov.convert_model(module, example_input)``, batch made dynamic,
  saved with ``compress_to_fp16=False`` (if ``convert_model`` fails, the IR is converted from the ONNX file).
  Reload vs eager torch: max abs error <1e-6 on test_resnet_cifar and deit_tiny (fp32 round-off).
* **PT2E int8 GraphModule** (``ptq_int8[x86_pt2e]``; ``qat_int8`` converts to the same form, not tested here):
  ONNX works, as a QDQ model: the legacy exporter has no symbolics for the ``quantized_decomposed`` q/dq ops
  (``UnsupportedOperatorError: ONNX export failed on an operator with unrecognized namespace
  quantized_decomposed::dequantize_per_channel``), so this stage registers them for the export
  (``QuantizeLinear`` / ``DequantizeLinear``, per-axis for the weights, which stay int8 initializers). Two
  preparations are made on a copy of the graph: train/eval is allowed (exported graphs refuse ``.eval()``,
  which the exporter calls), and ``aten.sym_size`` plus the ``expand``/``reshape``/``view`` calls using it
  become tensor methods, or the tracer bakes the example's batch size into the ViT's class-token ``expand``.
  OpenVINO reads the QDQ file and runs every conv/linear in u8.
  Reload vs the PT2E graph (its q/dq reference ops): ~1e-7 on most inputs of a CNN (test_resnet_cifar), with
  an occasional one-step flip (4e-3 max over 32 images, SQNR 62 dB vs the quantization's 34 dB); on a ViT
  (deit_tiny, one block) up to ~2e-2 on logits of magnitude ~1 (SQNR 38-40 dB vs the quantization's 33 dB).
  That is the int8 graph's own sensitivity, not an export error: torch's q/dq graph moves by the same 1.5e-2
  when its input is perturbed by 1e-6 (relative), since a value on a quantizer's rounding boundary then lands
  one int8 step away, and OpenVINO's int8 and float kernels round differently from torch's in the last bit.
  ``ov.convert_model`` of the graph itself fails: via ``torch.export`` the FX frontend converts the folded int8
  weights without their ``dequantize_per_channel`` (``OpConversionFailure: Conversion is failed for:
  aten.convolution.default, aten.linear.default``: "Arguments do not have the same element type (arg0 element
  type: i8, arg1 element type: f32)"); via TorchScript there is no rule for ``quantized_decomposed::*``. So the
  IR is converted from the QDQ ONNX (``ov.convert_model(model.onnx)``), with the direct failure in the notes.
  If a format still fails, its row has no result and carries the one-line reason (the other rows note it too).
* **OpenVINO model** (``ptq_int8[openvino]``; NNCF int4 weights take the same path, not tested here): IR via
  ``ov.save_model(ov_model, compress_to_fp16=False)``; reload vs source: 0 (the same graph). ONNX is not
  possible (OpenVINO has no ONNX writer): ``export[onnx]`` is a row without a result, with the reason (also noted
  on the IR row), never raised.

If no requested format can be written (say ``formats: [onnx]`` after an OpenVINO stage), the stage returns no
artifact, only the reasons: no row claims a file that was not written.
"""
from __future__ import annotations

import contextlib
import copy
import re
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from compress.config import ExportStage
from compress.stages.base import StageContext, StageResult, backend_failure
from eval.runtimes import OpenVINORunner, to_openvino, with_dynamic_batch

__all__ = ['apply_export', 'ExportError', 'export_onnx', 'ONNX_OPSET', 'CHECK_BATCH']

ONNX_OPSET = 17
CHECK_BATCH = 3     # the reload check runs at a batch size the export never saw (it traces with 2)
_EXAMPLE_BATCH = 2


class ExportError(RuntimeError):
    """A format could not be written; the message is one line per exporter tried."""


# --- failure messages ------------------------------------------------------------------------------------------

def _one_line(error: Exception) -> str:
    """One line that says why: OpenVINO's conversion reports are pages long, their summary is what matters. (A
    programming error of this project is raised again, not reported: see ``backend_failure``.)"""
    backend_failure(error)
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    summary = [line.lstrip('- ') for line in lines
               if line.startswith('--') and ('Conversion is failed for' in line or 'No conversion rule' in line)]
    detail = next((line for line in lines if line.startswith('Arguments do not')), None)
    if summary:
        message = '; '.join(summary) + (f' ({detail})' if detail else '')
    else:
        message = lines[0] if lines else ''
    return f'{type(error).__name__}: {message}'[:400]


# --- torch → ONNX ----------------------------------------------------------------------------------------------

def _onnx_type(dtype: torch.dtype) -> int:
    import onnx
    return {torch.uint8: onnx.TensorProto.UINT8, torch.int8: onnx.TensorProto.INT8}[dtype]


_FULL_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127)}


def _qdtype(code: int) -> torch.dtype:
    dtype = torch.onnx.JitScalarType(code).dtype()
    if dtype not in _FULL_RANGE:
        raise RuntimeError(f'quantized dtype {dtype} has no ONNX QuantizeLinear type (uint8 / int8 only)')
    return dtype


def _check_full_range(quant_min: int, quant_max: int, dtype: torch.dtype) -> None:
    # per-channel weights: ONNX QuantizeLinear saturates to the whole type (PT2E's x86 weights always use it)
    if (quant_min, quant_max) != _FULL_RANGE[dtype]:
        raise RuntimeError(f'quantization range [{quant_min}, {quant_max}] is not the full {dtype} range, '
                           'which ONNX QuantizeLinear cannot express')


def _qdq_symbolics() -> dict:
    """TorchScript-exporter symbolics for the PT2E ``quantized_decomposed`` q/dq ops → ONNX QDQ."""
    from torch.onnx import symbolic_helper as sh

    def scalar(g, value: float):
        return g.op('Constant', value_t=torch.tensor(value, dtype=torch.float32))

    def zero_point(g, value: int, dtype: torch.dtype):
        return g.op('Constant', value_t=torch.tensor(value, dtype=dtype))

    @sh.parse_args('v', 'f', 'i', 'i', 'i', 'i')
    def quantize_per_tensor(g, x, scale, zp, quant_min, quant_max, dtype):
        dtype = _qdtype(dtype)
        if (quant_min, quant_max) != _FULL_RANGE[dtype]:
            # 7-bit activations (reduce_range, CPUs without VNNI): QuantizeLinear saturates to the whole type, so
            # the narrower range is a clip of the float input to the values that quantize into it (the same codes)
            x = g.op('Clip', x, scalar(g, (quant_min - zp) * scale), scalar(g, (quant_max - zp) * scale))
        return g.op('QuantizeLinear', x, scalar(g, scale), zero_point(g, zp, dtype))

    @sh.parse_args('v', 'f', 'i', 'i', 'i', 'i', 'none')
    def dequantize_per_tensor(g, x, scale, zp, quant_min, quant_max, dtype, out_dtype=None):
        return g.op('DequantizeLinear', x, scalar(g, scale), zero_point(g, zp, _qdtype(dtype)))

    @sh.parse_args('v', 'v', 'v', 'i', 'i', 'i', 'i')
    def quantize_per_channel(g, x, scales, zps, axis, quant_min, quant_max, dtype):
        dtype = _qdtype(dtype)
        _check_full_range(quant_min, quant_max, dtype)
        return g.op('QuantizeLinear', x, g.op('Cast', scales, to_i=1), g.op('Cast', zps, to_i=_onnx_type(dtype)),
                    axis_i=axis)

    @sh.parse_args('v', 'v', 'v', 'i', 'i', 'i', 'i', 'none')
    def dequantize_per_channel(g, x, scales, zps, axis, quant_min, quant_max, dtype, out_dtype=None):
        dtype = _qdtype(dtype)
        return g.op('DequantizeLinear', x, g.op('Cast', scales, to_i=1), g.op('Cast', zps, to_i=_onnx_type(dtype)),
                    axis_i=axis)

    return {f'quantized_decomposed::{fn.__name__}': fn for fn in
            (quantize_per_tensor, dequantize_per_tensor, quantize_per_channel, dequantize_per_channel)}


@contextlib.contextmanager
def _registered_qdq_symbolics():
    symbolics = _qdq_symbolics()
    for name, fn in symbolics.items():
        torch.onnx.register_custom_op_symbolic(name, fn, ONNX_OPSET)
    try:
        yield
    finally:
        for name in symbolics:
            torch.onnx.unregister_custom_op_symbolic(name, ONNX_OPSET)


def _is_quantized_graph(module: nn.Module) -> bool:
    return isinstance(module, torch.fx.GraphModule) and any(
        node.op == 'call_function' and 'quantized_decomposed' in str(node.target) for node in module.graph.nodes)


def _traceable_graph(graph_module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of an exported graph the TorchScript tracer can record with a dynamic batch.

    Exported graphs refuse ``.eval()`` (the exporter calls it), and read sizes with ``aten.sym_size`` which,
    like the ``aten.expand/reshape/view`` overloads taking them, turns the traced size into a constant.
    """
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    graph_module = copy.deepcopy(graph_module)
    allow_exported_model_train_eval(graph_module)
    graph = graph_module.graph
    methods = {torch.ops.aten.expand.default: 'expand', torch.ops.aten.reshape.default: 'reshape',
               torch.ops.aten.view.default: 'view'}
    sizes = set()
    for node in list(graph.nodes):
        if node.op == 'call_function' and node.target is torch.ops.aten.sym_size.int:
            with graph.inserting_after(node):
                size = graph.call_method('size', tuple(node.args))
            node.replace_all_uses_with(size)
            graph.erase_node(node)
            sizes.add(size)
    for node in list(graph.nodes):
        if node.op == 'call_function' and node.target in methods and len(node.args) > 1 \
                and isinstance(node.args[1], (list, tuple)) and any(a in sizes for a in node.args[1]):
            with graph.inserting_after(node):
                method = graph.call_method(methods[node.target], tuple(node.args))
            node.replace_all_uses_with(method)
            graph.erase_node(node)
    graph.lint()
    graph_module.recompile()
    return graph_module


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write ``module`` as ONNX with a dynamic batch; returns how (PT2E graphs become QDQ models).

    Raises:
        ExportError: when neither the TorchScript nor the dynamo exporter can write it; the message has both
            one-line reasons.
    """
    quantized = _is_quantized_graph(module)
    traced = _traceable_graph(module) if isinstance(module, torch.fx.GraphModule) else module
    names = dict(input_names=['images'], output_names=['logits'])
    try:
        with warnings.catch_warnings(), (_registered_qdq_symbolics() if quantized else contextlib.nullcontext()):
            warnings.simplefilter('ignore')  # tracer warnings about timm's shape asserts; exporter deprecation
            torch.onnx.export(traced, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              dynamic_axes={'images': {0: 'batch'}, 'logits': {0: 'batch'}}, **names)
        return (f'torch.onnx.export (TorchScript exporter, opset {ONNX_OPSET})'
                + (', PT2E q/dq as QuantizeLinear/DequantizeLinear' if quantized else ''))
    except Exception as legacy_error:
        legacy = _one_line(legacy_error)
    try:
        batch = torch.export.Dim('batch', min=1, max=4096)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=18,
                              dynamic_shapes=({0: batch},), external_data=False, **names)
        return f'torch.onnx.export (dynamo exporter, opset 18); the TorchScript exporter failed: {legacy}'
    except Exception as dynamo_error:
        raise ExportError(f'TorchScript exporter: {legacy}; dynamo exporter: {_one_line(dynamo_error)}') from None


# --- the stage -------------------------------------------------------------------------------------------------

def _slug(name: str) -> str:
    return re.sub(r'[^A-Za-z0-9_.-]+', '_', name).strip('_') or 'model'


def _reload_check(runner, reference, input_size) -> tuple[float, float]:
    """Max |reloaded - source| and max |source| at batch CHECK_BATCH (deterministic random images)."""
    images = torch.randn(CHECK_BATCH, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(images).float()
        got = runner(images).float()
    if got.shape != expected.shape:
        raise RuntimeError(f'reloaded output has shape {tuple(got.shape)}, the source {tuple(expected.shape)}')
    return float((got - expected).abs().max()), float(expected.abs().max())


def apply_export(cfg: ExportStage, model: nn.Module, ctx: StageContext) -> list[StageResult]:
    import openvino as ov

    sources = [result for result in ctx.previous if result.artifact is not None]
    if sources:
        source = sources[0]
    else:  # called on its own: export the model as it is
        source = StageResult(name='model', kind='model', artifact=model, float_model=model, next_model=model)
    out_dir = cfg.dir or ctx.output_dir
    if out_dir is None:
        raise ValueError('export: no output folder; set the stage dir or run it through the pipeline')
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _slug(source.name)
    example = torch.randn(_EXAMPLE_BATCH, *ctx.input_size, generator=torch.Generator().manual_seed(0))

    # each format: (files, path to load, how it was written, extra notes) or a skip reason
    written: dict[str, tuple] = {}
    skipped: dict[str, str] = {}
    seconds: dict[str, float] = {}
    if not isinstance(source.artifact, nn.Module):  # an OpenVINO model: it ships as IR
        reference = OpenVINORunner(source.artifact, label=source.name, threads=ctx.eval_cfg.threads)
        for fmt in cfg.formats:
            start = time.perf_counter()
            if fmt == 'onnx':
                skipped[fmt] = ('onnx not written: the source is an OpenVINO model, and OpenVINO reads ONNX but '
                                'cannot write it; its deployable file is the IR (format openvino)')
                continue
            xml = out_dir / f'{stem}.xml'
            ov.save_model(source.artifact, str(xml), compress_to_fp16=False)
            written[fmt] = ([xml, xml.with_suffix('.bin')], xml, 'ov.save_model of the OpenVINO model '
                            '(compress_to_fp16=False)', [])
            seconds[fmt] = time.perf_counter() - start
    else:
        module = source.artifact

        def reference(images):
            return module(images)

        onnx_path, onnx_how, onnx_error = None, None, None

        def write_onnx(path: Path):
            nonlocal onnx_path, onnx_how, onnx_error
            try:
                onnx_how = export_onnx(module, example, path)
                onnx_path = path
            except Exception as error:
                onnx_error = str(error) if isinstance(error, ExportError) else _one_line(error)
                path.unlink(missing_ok=True)  # no half-written file next to the record

        if 'onnx' in cfg.formats:
            start = time.perf_counter()
            write_onnx(out_dir / f'{stem}.onnx')
            if onnx_path is not None:
                written['onnx'] = ([onnx_path], onnx_path, onnx_how, [])
            else:
                skipped['onnx'] = f'onnx export failed: {onnx_error}'
            seconds['onnx'] = time.perf_counter() - start
        if 'openvino' in cfg.formats:
            # an ONNX file converted to IR may be memory-mapped: keep it until the IR is saved
            with tempfile.TemporaryDirectory() as scratch:
                start = time.perf_counter()
                extra = []
                try:
                    ov_model = to_openvino(module, example)
                    how = 'ov.convert_model of the torch model (dynamic batch)'
                except Exception as error:  # e.g. the PT2E graph: convert the (QDQ) ONNX file instead
                    ov_model, how, direct = None, None, _one_line(error)
                    if onnx_path is None and onnx_error is None:
                        write_onnx(Path(scratch) / f'{stem}.onnx')
                    via_onnx = onnx_error
                    if onnx_path is not None:
                        try:
                            ov_model = with_dynamic_batch(ov.convert_model(str(onnx_path)))
                            how = f'ov.convert_model of the ONNX file written by {onnx_how}'
                            extra.append(f'ov.convert_model of the torch model failed ({direct}); the IR was '
                                         'converted from the ONNX file instead')
                        except Exception as ov_onnx_error:
                            via_onnx = f'ov.convert_model of the ONNX file: {_one_line(ov_onnx_error)}'
                    if ov_model is None:
                        skipped['openvino'] = (f'openvino export failed: ov.convert_model: {direct}; '
                                               f'via ONNX: {via_onnx}')
                if ov_model is not None:
                    xml = out_dir / f'{stem}.xml'
                    ov.save_model(ov_model, str(xml), compress_to_fp16=False)
                    written['openvino'] = ([xml, xml.with_suffix('.bin')], xml, how, extra)
                seconds['openvino'] = time.perf_counter() - start

    results = []
    for fmt in cfg.formats:
        if fmt not in written:
            continue
        start = time.perf_counter()
        files, load_path, how, extra = written[fmt]
        try:
            loaded = ov.Core().read_model(str(load_path))
            max_diff, source_max = _reload_check(OpenVINORunner(loaded, label=fmt, threads=ctx.eval_cfg.threads),
                                                 reference, ctx.input_size)
        except Exception as error:  # written but not loadable, or not at another batch size: it does not ship
            skipped[fmt] = f'{fmt} file {load_path} written but its reload failed: {_one_line(error)}'
            continue
        info = {'file': str(load_path), 'files': [str(f) for f in files],
                'bytes': sum(Path(f).stat().st_size for f in files), 'source': source.name, 'format': fmt,
                'max_abs_diff_vs_source': max_diff, 'source_max_abs': source_max}
        notes = [f'{fmt} written by {how}; the row runs the file as reloaded by OpenVINO'
                 f'{" (ONNX frontend)" if fmt == "onnx" else ""}',
                 f'reloaded vs {source.name}: max abs diff {max_diff:.3g} at batch {CHECK_BATCH} '
                 f'(source logits up to {source_max:.3g})', *extra]
        results.append(StageResult(
            name=f'export[{fmt}]', kind='export', artifact=loaded, float_model=source.float_model, next_model=None,
            backend=fmt, seconds=seconds.get(fmt, 0.0) + time.perf_counter() - start, notes=notes, info=info,
            files=[str(f) for f in files],
        ))
    for result in results:
        result.notes.extend(skipped[fmt] for fmt in cfg.formats if fmt in skipped)
    # a format that could not be written (or reloaded) is a row without a result, with its reason
    for fmt in cfg.formats:
        if fmt in skipped:
            results.append(StageResult(
                name=f'export[{fmt}]', kind='export', artifact=None, float_model=source.float_model,
                next_model=None, backend=fmt, seconds=seconds.get(fmt, 0.0),
                info={'source': source.name, 'format': fmt}, failed=skipped[fmt]))
    results.sort(key=lambda result: cfg.formats.index(result.backend))
    return results
