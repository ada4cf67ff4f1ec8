"""weight_4bit: which layers each backend stores in 4 bit, how much smaller the artifact gets, how close it stays.

Error bounds (random weights, so no accuracy exists to check): a 4-bit grid over a group of 32-128 roughly
Gaussian or uniform weights has a step of ~0.27-0.35 sigma, an RMS rounding error of ~7-10 % of the weight RMS.
One deit block of four such matmuls (plus the 8-bit head) gave a relative logit error of 0.13-0.16 over three
seeds with either backend; the bound 0.25 leaves headroom for that spread and still catches a broken kernel or
wrong scales (which give errors of order 1). The 8-bit backup gave 0.010-0.012 on test_resnet_cifar: bound 0.03.
The OpenVINO fp32 reference matches torch to ~1e-6, so the measured error is the compression alone.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from compress.config import DataConfig, EvalConfig, Weight4BitStage
from compress.data import DataBundle
from compress.stages.base import StageContext
from compress.stages.weight_4bit import apply_weight_4bit, compress_openvino, quantize_torchao_int4
from eval.coverage import execution_order, weight_coverage
from eval.runtimes import OpenVINORunner, TorchRunner

DEIT_BLOCK = {'blocks.0.attn.qkv', 'blocks.0.attn.proj', 'blocks.0.mlp.fc1', 'blocks.0.mlp.fc2'}


def relative_error(approximation: torch.Tensor, reference: torch.Tensor) -> float:
    return float((approximation - reference).norm() / reference.norm())


def weighted_elements(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def assert_fractions_sum_to_one(coverage: dict) -> None:
    assert (coverage['int4_weight_elements'] + coverage['int8_weight_elements'] + coverage['float_weight_elements']
            == coverage['weight_elements'])
    total = coverage['int4_weight_fraction'] + coverage['int8_weight_fraction'] + coverage['float_weight_fraction']
    assert total == pytest.approx(1.0, abs=2e-4)


def context(input_size) -> StageContext:
    bundle = DataBundle('t', 10, [], None, None, 'eval')
    return StageContext(None, bundle, DataConfig(workers=0, batch_size=2), EvalConfig(compile=False), input_size)


@pytest.fixture(scope='module')
def deit():
    torch.manual_seed(0)
    return timm.create_model('deit_tiny_patch16_224', depth=1).eval(), torch.randn(2, 3, 224, 224)


def test_nncf_puts_deit_linears_in_4bit_and_shrinks_the_ir(deit):
    model, images = deit
    compressed, float_ov = compress_openvino(model, images[:1], Weight4BitStage(group_size=128))
    coverage = weight_coverage(compressed, execution_order(model, images[:1]))
    assert set(coverage['layers']['int4']) == DEIT_BLOCK
    # the patch-embedding conv and the last layer take NNCF's 8-bit backup
    assert set(coverage['layers']['int8']) == {'patch_embed.proj', 'head'} and coverage['layers']['float'] == []
    # 192 input channels are not divisible by 128: adjusted to 64; fc2 has 768
    assert coverage['int4_group_sizes'] == {'blocks.0.attn.qkv': 64, 'blocks.0.attn.proj': 64,
                                            'blocks.0.mlp.fc1': 64, 'blocks.0.mlp.fc2': 128}
    assert coverage['weight_elements'] == weighted_elements(model)
    assert_fractions_sum_to_one(coverage)
    runner, reference = OpenVINORunner(compressed, 'int4', threads=1), OpenVINORunner(float_ov, 'fp32', threads=1)
    assert runner.size_mb() < 0.3 * reference.size_mb()  # measured 0.77 MB vs 3.31 MB
    with torch.no_grad():
        expected = model(images)
    assert relative_error(reference(images), expected) < 1e-4
    assert relative_error(runner(images), expected) < 0.25


def test_nncf_keeps_cnn_convs_in_8bit_and_torchao_covers_linear_only():
    torch.manual_seed(0)
    model = timm.create_model('test_resnet_cifar').eval()
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    nncf_row, torchao_row = apply_weight_4bit(Weight4BitStage(backend=['nncf_openvino', 'torchao']), model,
                                              context((3, 32, 32)))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    (classifier,) = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]

    # nothing became 4 bit: no "4-bit" result exists, and the reasons say why, layer kind by layer kind
    assert nncf_row.name == 'weight_4bit[nncf_openvino]' and nncf_row.kind == 'weight_4bit'
    assert nncf_row.artifact is None and nncf_row.next_model is None and nncf_row.references == {}
    assert nncf_row.failed.startswith('nncf_openvino put no weight in 4 bit: ')
    assert f'{len(convs)} layer(s): convolution: NNCF 3.4' in nncf_row.failed
    assert '1 layer(s): last MatMul: 8-bit backup unless all_layers' in nncf_row.failed
    why = {n['layer']: n for n in nncf_row.info['not_4bit']}
    assert list(why) == convs + [classifier] and all(n['precision'] == 'int8' for n in why.values())

    assert torchao_row.artifact is None and torchao_row.failed.startswith('torchao put no weight in 4 bit: ')
    why = {n['layer']: n['why'] for n in torchao_row.info['not_4bit']}
    assert why[classifier].startswith('out_features 10 % 16') and why[convs[0]].endswith('covers Linear only')

    (all_layers,) = apply_weight_4bit(Weight4BitStage(all_layers=True), model, context((3, 32, 32)))
    coverage = weight_coverage(all_layers.artifact, execution_order(model, images[:1]))
    assert coverage['layers']['int4'] == [classifier] and coverage['layers']['int8'] == convs  # named after torch
    assert all_layers.info['group_sizes'] == {classifier: 32}  # 32 input features: 128 adjusted to 32
    assert_fractions_sum_to_one(coverage)
    assert 'openvino fp32' in all_layers.references
    with torch.no_grad():
        assert relative_error(OpenVINORunner(all_layers.artifact, 'int4')(images), expected) < 0.25


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)  # a conv: torchao leaves it float
        self.fc1 = nn.Linear(16, 256)    # 16 input features: no group size fits
        self.fc2 = nn.Linear(256, 384)   # int4, group 128
        self.fc3 = nn.Linear(384, 192)   # int4, group 128
        self.fc4 = nn.Linear(192, 96)    # int4, group 64 (192 % 128 != 0)
        self.odd = nn.Linear(96, 40)     # 40 % 16 != 0: float
        self.head = nn.Linear(96, 32)    # the last Linear: float unless all_layers (then group 32)

    def forward(self, x):
        h = self.stem(x).mean((2, 3))
        for layer in (self.fc1, self.fc2, self.fc3, self.fc4):
            h = F.gelu(layer(h))
        return self.odd(h).mean(-1, keepdim=True) + self.head(h)  # head runs last


def dequantized_weight(layer: nn.Linear) -> torch.Tensor:
    """The weight an int4 layer really multiplies by: its response to the identity, minus the bias."""
    with torch.no_grad():
        return (layer(torch.eye(layer.in_features)) - layer(torch.zeros(1, layer.in_features))).T.float()


def test_torchao_quantizes_eligible_linears_only():
    torch.manual_seed(0)
    model, images = TinyNet().eval(), torch.randn(4, 3, 16, 16)
    quantized, plan, why = quantize_torchao_int4(model, images[:1], group_size=128)
    coverage = weight_coverage(quantized)
    assert plan == {'fc2': 128, 'fc3': 128, 'fc4': 64} and set(coverage['layers']['int4']) == set(plan)
    assert coverage['int4_storage'] == 'packed'
    assert set(why) == {'stem', 'fc1', 'odd', 'head'}
    assert why['stem'].startswith('convolution') and why['odd'].startswith('out_features 40 % 16')
    assert why['fc1'].startswith('in_features 16') and why['head'].startswith('last Linear')
    assert type(quantized.fc2.weight).__name__ == 'Int4OpaqueTensor' and type(model.fc2.weight) is nn.Parameter
    assert coverage['weight_elements'] == weighted_elements(model)
    assert_fractions_sum_to_one(coverage)

    with torch.no_grad():
        expected, output = model(images), quantized(images)
    assert output.dtype == torch.float32
    # this net's outputs are mostly biases: measured 0.0034-0.0043 over three seeds
    assert relative_error(output, expected) < 0.02
    # the int4 layers really are 4 bit: nn.Linear's uniform weights on a 16-level grid per group have an RMS
    # error of (range / 15) / sqrt(12) = 6.7 % of their RMS (measured 6.4-6.6 %; bf16 alone would be ~0.3 %)
    reference = TinyNet().eval()
    reference.load_state_dict(model.state_dict())
    for name in plan:
        weight = dequantized_weight(getattr(quantized, name))
        assert 0.04 < relative_error(weight, getattr(model, name).weight) < 0.09
        getattr(reference, name).weight.data.copy_(weight)
    with torch.no_grad():  # and the model computes with exactly those weights, up to bf16 activations (~6e-4)
        assert relative_error(output, reference(images)) < 0.005

    # the serialized size is the packed int4 data plus the float layers, not the float weights
    size, float_size = TorchRunner(quantized, False, 'int4').size_mb(), TorchRunner(model, False, 'fp32').size_mb()
    packed_bytes = sum(t.numel() * t.element_size() for name in plan
                       for t in (getattr(quantized, name).weight.qdata, getattr(quantized, name).weight.scale_and_zero))
    float_bytes = 4 * (coverage['float_weight_elements'] + sum(m.bias.numel() for m in model.modules()
                                                                if isinstance(m, (nn.Conv2d, nn.Linear))))
    assert packed_bytes < coverage['int4_weight_elements']  # 2 weights a byte, plus bf16 scales per group
    assert packed_bytes / 1e6 < size < (packed_bytes + float_bytes) / 1e6 + 0.02
    assert size < 0.3 * float_size

    _, everything, _ = quantize_torchao_int4(model, images[:1], group_size=128, all_layers=True)
    assert everything['head'] == 32


def test_torchao_on_deit_block(deit):
    model, images = deit
    (row,) = apply_weight_4bit(Weight4BitStage(backend=['torchao'], group_size=128), model, context((3, 224, 224)))
    coverage = weight_coverage(row.artifact)
    assert row.name == 'weight_4bit[torchao]' and row.failed is None
    assert set(coverage['layers']['int4']) == DEIT_BLOCK
    assert set(coverage['layers']['float']) == {'patch_embed.proj', 'head'}  # a conv; 1000 % 16 != 0
    assert_fractions_sum_to_one(coverage)
    runner = TorchRunner(row.artifact, False, 'int4')
    with torch.no_grad():
        assert relative_error(runner(images), model(images)) < 0.25
    assert runner.size_mb() < 0.6 * TorchRunner(model, False, 'fp32').size_mb()  # head + patch embed stay fp32


def test_unavailable_torchao_setting_is_reported_not_raised():
    model = TinyNet().eval()
    (row,) = apply_weight_4bit(Weight4BitStage(backend=['torchao'], group_size=16), model, context((3, 16, 16)))
    assert row.artifact is None and row.failed.startswith('torchao failed: ValueError: ')
    assert 'group sizes 32/64/128' in row.failed


def test_registered():
    from compress.stages import STAGES
    assert STAGES['weight_4bit'] is apply_weight_4bit
