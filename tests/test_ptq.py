"""int8 PTQ: both backends quantize every conv/linear of a CNN, keep the logits close, and report coverage."""
import pytest
import torch
from torch import nn

from compress.deploy import OpenVINORunner, TorchRunner
from compress.stages.ptq_int8 import quantize_openvino, quantize_x86_pt2e


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return float(20 * torch.log10(reference.norm() / (reference - approximation).norm()))


@pytest.fixture(scope='module')
def model_and_data(tiny_cnn_and_calib):
    return tiny_cnn_and_calib


def test_x86_pt2e_quantizes_all_weights(model_and_data):
    model, calib = model_and_data
    graph, coverage = quantize_x86_pt2e(model, calib)
    assert coverage['quantized_weight_fraction'] == 1.0 and coverage['not_quantized'] == []
    assert coverage['weight_elements'] == sum(m.weight.numel() for m in model.modules()
                                              if isinstance(m, (nn.Conv2d, nn.Linear)))
    with torch.no_grad():
        assert sqnr_db(model(calib[0]), graph(calib[0])) > 20
    runner = TorchRunner(graph, compiled=False, label='int8')
    assert runner.size_mb() < 0.5 * TorchRunner(model, compiled=False, label='fp32').size_mb()


def test_openvino_quantizes_all_weights(model_and_data):
    model, calib = model_and_data
    ov_model, coverage = quantize_openvino(model, calib, transformer=False)
    assert coverage['quantized_weight_fraction'] == 1.0
    runner = OpenVINORunner(ov_model, 'int8', threads=1)
    assert set(runner.runtime_precisions()) == {'u8'}  # every weighted layer executes in int8
    with torch.no_grad():
        assert sqnr_db(model(calib[0]), runner(calib[0])) > 20


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # a data-dependent branch torch.export cannot capture
            return self.conv(x).mean((2, 3))
        return self.conv(-x).mean((2, 3))


def test_capture_failure_is_reported_not_raised():
    from compress.config import DataConfig, EvalConfig, PtqInt8Stage
    from compress.data import DataBundle
    from compress.stages.base import StageContext
    from compress.stages.ptq_int8 import apply_ptq_int8
    calib_set = [(torch.randn(3, 8, 8), 0, i) for i in range(4)]
    bundle = DataBundle('t', 4, calib_set, calib_set, None, 'eval')
    ctx = StageContext(None, bundle, DataConfig(workers=0, batch_size=2), EvalConfig(compile=False), (3, 8, 8))
    (result,) = apply_ptq_int8(PtqInt8Stage(backend=['x86_pt2e'], calib_images=4), DataDependent().eval(), ctx)
    assert result.precision == 'fp32' and result.coverage['quantized_weight_fraction'] == 0.0
    assert 'x86_pt2e failed' in result.notes[-1]
