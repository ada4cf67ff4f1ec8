"""QAT: fake-quantized training on the exported graph, freezing schedule, conversion to the deployable int8."""
import pytest
import timm
import torch
from accelerate import Accelerator

import compress.models  # noqa: F401
from compress.config import DataConfig, EvalConfig, QatInt8Stage, RecipeError, load_recipe
from compress.data import DataBundle, SyntheticShapes, attach_transforms
from compress.stages.base import StageContext
from compress.stages.qat import _FreezeSchedule, apply_qat_int8, prepare_qat_x86
from eval.coverage import weight_coverage


@pytest.fixture(scope='module')
def context():
    bundle = DataBundle('synthetic', 10, SyntheticShapes('eval', 64), None, SyntheticShapes('train', 256), 'eval')
    cfg = {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.25,) * 3, 'interpolation': 'bilinear',
           'crop_pct': 1.0, 'crop_mode': 'center'}
    attach_transforms(bundle, cfg, 'crop_flip')
    return StageContext(Accelerator(cpu=True), bundle, DataConfig(batch_size=32, workers=0),
                        EvalConfig(compile=False), (3, 32, 32), initial_model=None, data_config=cfg)


@pytest.mark.slow
def test_qat_trains_freezes_and_converts(context):
    torch.manual_seed(0)
    model = timm.create_model('test_resnet_cifar').eval()
    (result,) = apply_qat_int8(QatInt8Stage(epochs=1, lr=1e-3, freeze_observers_at=0.5, freeze_bn_at=0.75,
                                            reduce_range=True), model, context)
    assert weight_coverage(result.artifact)['int8_weight_fraction'] == 1.0
    assert result.info['qat']['steps'] == 8
    # 7-bit activations (what a CPU without VNNI gets by default) reach the converted graph
    assert result.info['reduce_range'] == {'on': True, 'why': 'set by the recipe'}
    assert {node.args[4] for node in result.artifact.graph.nodes if node.op == 'call_function'
            and 'quantize_per_tensor' in str(node.target) and 'dequantize' not in str(node.target)} == {127}
    images = torch.stack([context.data.eval[i][0] for i in range(16)])
    assert result.artifact(images).shape == (16, 10)
    assert result.next_model is None  # a quantized model is final


def test_freeze_schedule_disables_observers_then_bn():
    model = timm.create_model('test_resnet_cifar')
    prepared = prepare_qat_x86(model, torch.randn(2, 3, 32, 32))
    fake_quants = [m for m in prepared.modules() if hasattr(m, 'observer_enabled')]
    assert fake_quants and all(int(m.observer_enabled) == 1 for m in fake_quants)
    schedule = _FreezeSchedule(observers_at=0.5, bn_at=0.9)
    schedule(5, 10, prepared)
    assert all(int(m.observer_enabled) == 0 for m in fake_quants) and not schedule.bn_frozen
    schedule(9, 10, prepared)
    assert schedule.bn_frozen


def test_qat_and_ptq_are_exclusive(tmp_path):
    path = tmp_path / 'r.yaml'
    path.write_text('name: t\nmodel: {name: test_resnet_cifar}\nstages: [{kind: qat_int8}, {kind: ptq_int8}]\n')
    with pytest.raises(RecipeError, match='ptq_int8 comes after qat_int8'):
        load_recipe(path)
    with pytest.raises(RecipeError, match='feature KD is not supported'):
        QatInt8Stage(feature_weight=1.0)


@pytest.mark.slow
def test_convert_skips_absent_conv_kinds_and_makes_torchaos_graph(monkeypatch):
    import torch.nn.functional as F
    from torchao.quantization.pt2e import move_exported_model_to_eval, qat_utils
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from compress.stages.qat import convert_qat_x86
    x = torch.randn(4, 3, 32, 32)

    def trained_a_step():  # the same graph twice (a deep copy would name the folded nodes differently)
        torch.manual_seed(0)
        prepared = prepare_qat_x86(timm.create_model('test_resnet_cifar'), x, reduce_range=False)
        prepared(x)  # observers see data, BN statistics move
        return move_exported_model_to_eval(prepared)

    theirs = convert_pt2e(trained_a_step())
    folded_kinds = []
    fold_one_kind = qat_utils._fold_conv_bn_qat_helper

    def recording(graph, conv_fn, *args, **kwargs):
        folded_kinds.append(conv_fn)
        return fold_one_kind(graph, conv_fn, *args, **kwargs)

    monkeypatch.setattr(qat_utils, '_fold_conv_bn_qat_helper', recording)
    ours = convert_qat_x86(trained_a_step())
    assert folded_kinds == [F.conv2d] * (2 if torch.cuda.is_available() else 1)  # a 2-D CNN: conv2d only
    assert 'batch_norm' not in ours.code and ours.code == theirs.code
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
