"""Export stage: every written file is loaded again and must compute what its source computes, at any batch size.

Tolerances:

* float models: the file holds the same fp32 weights and ops, so only fp32 round-off differs (measured < 1e-6 on
  logits up to ~2.5). ``FLOAT_ATOL`` = 1e-4 leaves 100x headroom yet catches real faults: fp16 weight storage
  (``compress_to_fp16``) moves these logits by ~1e-3, a wrong op or mixed-up batch by far more.
* int8 models (PT2E): the file runs real int8 kernels where the graph runs q/dq reference ops. The math is the
  same, but an activation on a quantizer's rounding boundary can land one int8 step away (the graph itself moves
  that much under 1e-6 relative input noise). So the export error is bounded relative to the quantization
  error: the file must be closer to the int8 graph than the int8 graph is to the float model, by ``QDQ_MARGIN_DB``
  (measured: test_resnet_cifar 62-140 dB vs 31-34 dB, deit_tiny with one block 38-40 dB vs 33 dB).
"""
import os

import onnx
import pytest
import timm
import torch

from compress.config import DataConfig, EvalConfig, ExportStage
from compress.stages import STAGES
from compress.stages.base import StageContext, StageResult
from compress.stages.export import apply_export
from compress.stages.ptq_int8 import nncf_settings, quantize_openvino, quantize_x86_pt2e
from eval.coverage import weight_coverage
from eval.runtimes import OpenVINORunner

FLOAT_ATOL = 1e-4
QDQ_MARGIN_DB = 3.0
CIFAR = (3, 32, 32)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return float(20 * torch.log10(reference.norm() / (reference - approximation).norm().clamp_min(1e-12)))


def make_ctx(source: StageResult, input_size, out_dir) -> StageContext:
    ctx = StageContext(None, None, DataConfig(workers=0), EvalConfig(compile=False), input_size,
                       output_dir=str(out_dir))
    ctx.previous = [source]
    return ctx


def float_source(model) -> StageResult:
    return StageResult('baseline', 'baseline', model, model, model)


def run(result):
    """The exported file as the evaluator runs it."""
    return OpenVINORunner(result.artifact, result.name, files=result.files)


def outputs(fn, batches):
    with torch.no_grad():
        return [fn(images) for images in batches]


@pytest.fixture(scope='module')
def cnn(tiny_cnn_and_calib):
    model, calib = tiny_cnn_and_calib
    return model, calib[:2]


@pytest.fixture(scope='module')
def batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(1, *CIFAR, generator=generator), torch.randn(5, *CIFAR, generator=generator)]


def check_rows(results, source: StageResult, formats):
    assert [r.name for r in results] == [f'export[{fmt}]' for fmt in formats]
    for result, fmt in zip(results, formats):
        assert result.kind == 'export' and result.next_model is None and result.failed is None
        assert result.float_model is source.float_model
        info = result.info
        assert info['format'] == fmt and info['source'] == source.name and result.files == info['files']
        assert all(os.path.isfile(f) for f in info['files'])
        assert info['file'].endswith('.onnx' if fmt == 'onnx' else '.xml')
        assert info['bytes'] == sum(os.path.getsize(f) for f in info['files']) > 0
        assert run(result).size_mb() == pytest.approx(info['bytes'] / 1e6)


def test_registered():
    assert STAGES['export'] is apply_export


def test_float_cnn_onnx_and_ir(cnn, batches, tmp_path):
    model, _ = cnn
    source = float_source(model)
    results = apply_export(ExportStage(), model, make_ctx(source, CIFAR, tmp_path))
    check_rows(results, source, ['onnx', 'openvino'])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['baseline.bin', 'baseline.onnx', 'baseline.xml']
    expected = outputs(model, batches)
    for result in results:
        assert result.info['max_abs_diff_vs_source'] < FLOAT_ATOL
        runner = run(result)
        assert {p: len(n) for p, n in runner.runtime_precisions().items()} == {'f32': 8}  # f32 hint: no silent bf16
        for want, got in zip(expected, outputs(runner, batches)):  # batch 1 and 5: dynamic batch
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=FLOAT_ATOL, rtol=0)
    # the IR keeps fp32 weights (compress_to_fp16=False): 18968 weights take at least 4 bytes each
    coverage = weight_coverage(results[1].artifact)
    assert coverage['float_weight_elements'] == coverage['weight_elements'] == 18968
    assert results[1].info['bytes'] > 4 * 18968


def test_float_vit_onnx(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', depth=1).eval()
    source = float_source(model)
    (result,) = apply_export(ExportStage(formats=['onnx']), model, make_ctx(source, (3, 224, 224), tmp_path))
    check_rows([result], source, ['onnx'])
    onnx_model = onnx.load(result.info['file'])
    assert onnx_model.opset_import[0].version >= 17
    assert onnx_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch dim
    generator = torch.Generator().manual_seed(1)
    images = [torch.randn(1, 3, 224, 224, generator=generator), torch.randn(5, 3, 224, 224, generator=generator)]
    for want, got in zip(outputs(model, images), outputs(run(result), images)):
        torch.testing.assert_close(got, want, atol=FLOAT_ATOL, rtol=0)


def test_after_openvino_int8_writes_ir_and_notes_onnx(cnn, batches, tmp_path):
    model, calib = cnn
    ov_model, _ = quantize_openvino(model, calib, nncf_settings(model, CIFAR))
    source = StageResult('ptq_int8[openvino]', 'ptq_int8', ov_model, model, None, backend='openvino')
    no_onnx, result = apply_export(ExportStage(), model, make_ctx(source, CIFAR, tmp_path))
    assert no_onnx.name == 'export[onnx]' and no_onnx.artifact is None and 'cannot write' in no_onnx.failed
    check_rows([result], source, ['openvino'])
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ptq_int8_openvino.bin', 'ptq_int8_openvino.xml']
    assert any('onnx not written' in note and 'cannot write' in note for note in result.notes)
    assert weight_coverage(result.artifact)['int8_weight_fraction'] == 1.0
    assert set(run(result).runtime_precisions()) == {'u8'}
    for want, got in zip(outputs(OpenVINORunner(ov_model, 'int8'), batches), outputs(run(result), batches)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # the same graph on the same plugin

    # ONNX alone cannot be written: no row, the reason, and nothing on disk
    (only,) = apply_export(ExportStage(formats=['onnx']), model, make_ctx(source, CIFAR, tmp_path / 'onnx'))
    assert only.name == 'export[onnx]' and only.artifact is None and only.files is None
    assert only.failed.startswith('onnx not written') and not any((tmp_path / 'onnx').iterdir())


@pytest.mark.parametrize('reduce_range', [False, True], ids=['8-bit', '7-bit activations'])
def test_after_pt2e_int8_writes_qdq_onnx_and_ir(cnn, tmp_path, reduce_range):
    """Both activation ranges PT2E uses (7 bits on CPUs without VNNI) reach ONNX and OpenVINO with every layer in
    int8 and the int8 graph's outputs."""
    model, calib = cnn
    batches = [calib[0][:1], calib[1][:5]]  # in the calibrated range (random normals saturate the quantizers)
    graph = quantize_x86_pt2e(model, calib, reduce_range=reduce_range)
    coverage = weight_coverage(graph)
    source = StageResult('ptq_int8[x86_pt2e]', 'ptq_int8', graph, model, None, backend='x86_pt2e')
    results = apply_export(ExportStage(), model, make_ctx(source, CIFAR, tmp_path))
    check_rows(results, source, ['onnx', 'openvino'])
    onnx_model = onnx.load(results[0].info['file'])
    ops = {node.op_type for node in onnx_model.graph.node}
    assert {'QuantizeLinear', 'DequantizeLinear'} <= ops
    # the weights ship as int8 initializers (the 1-d int8 ones are the per-channel zero points)
    int8_weights = [t for t in onnx_model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) > 1]
    assert sum(int(torch.tensor(t.dims).prod()) for t in int8_weights) == coverage['int8_weight_elements']
    float_weights = [t for t in onnx_model.graph.initializer
                     if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1]
    assert not float_weights
    # direct conversion of the graph fails (documented); the IR comes from the QDQ ONNX
    assert any('ov.convert_model of the torch model failed' in note for note in results[1].notes)
    expected, floats = outputs(graph, batches), outputs(model, batches)
    for result in results:
        assert weight_coverage(result.artifact)['int8_weight_fraction'] == 1.0
        runner = run(result)
        assert {p: len(n) for p, n in runner.runtime_precisions().items()} == {'u8': 8}  # every conv and fc in int8
        for want, got, float_out in zip(expected, outputs(runner, batches), floats):
            assert got.shape == want.shape
            assert sqnr_db(want, got) > sqnr_db(float_out, want) + QDQ_MARGIN_DB
    if reduce_range:
        # beyond the calibrated range the activations clamp: ONNX must clamp where PT2E does, at 127. (At 8 bits a
        # CPU without VNNI also saturates its int16 pair sums there, in OpenVINO as in oneDNN: not comparable.)
        loud = [4 * calib[0][:2]]
        (want,), (got,) = outputs(graph, loud), outputs(run(results[0]), loud)
        assert sqnr_db(want, got) > 30, sqnr_db(want, got)


def test_after_pt2e_int8_vit_onnx(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', depth=1).eval()
    generator = torch.Generator().manual_seed(1)
    graph = quantize_x86_pt2e(model, [torch.randn(4, 3, 224, 224, generator=generator)])
    source = StageResult('ptq_int8[x86_pt2e]', 'ptq_int8', graph, model, None)
    (result,) = apply_export(ExportStage(formats=['onnx']), model, make_ctx(source, (3, 224, 224), tmp_path))
    check_rows([result], source, ['onnx'])
    runner = run(result)
    assert set(runner.runtime_precisions()) == {'u8'}
    images = [torch.randn(1, 3, 224, 224, generator=generator), torch.randn(5, 3, 224, 224, generator=generator)]
    # batch 5 would fail if the class-token expand had kept the traced batch size
    for want, got, float_out in zip(outputs(graph, images), outputs(runner, images), outputs(model, images)):
        assert sqnr_db(want, got) > sqnr_db(float_out, want) + QDQ_MARGIN_DB


class Unexportable(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.linalg.svdvals(self.conv(x).flatten(2))  # no ONNX symbolic, no OpenVINO conversion rule


def test_failure_is_reported_not_raised(tmp_path):
    model = Unexportable().eval()
    source = float_source(model)
    no_onnx, no_ir = apply_export(ExportStage(), model, make_ctx(source, (3, 8, 8), tmp_path))
    assert (no_onnx.name, no_ir.name) == ('export[onnx]', 'export[openvino]')
    assert no_onnx.artifact is None and no_ir.artifact is None
    assert 'onnx export failed' in no_onnx.failed and 'linalg_svdvals' in no_onnx.failed
    assert no_ir.failed.startswith('openvino export failed')
    assert not any(tmp_path.iterdir())
