"""On a CUDA machine (skipped elsewhere): the run trains, evaluates and times float artifacts on the GPU, keeps the
CPU-only artifacts (PT2E x86 int8) on the CPU and says so, and distils with teacher and student on one device.
Run exactly these with ``python -m pytest -m gpu``.

The chain runs eager: compiling its six forms of a transformer on CUDA took over 5 minutes on an H200; compiled
CUDA is ``test_bf16_runs_on_the_gpu``. The chain uses SMT, whose linears (multiples of 8 wide) CUDA's int8
matmul takes."""
import pytest
import timm
import torch
from accelerate import Accelerator

import compress.models  # noqa: F401
from compress.config import load_recipe

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]

RECIPE = """
name: gpu_chain
model: {{name: test_smt}}
data: {{source: synthetic, synthetic_train: 512, synthetic_eval: 128, synthetic_calib: 64, batch_size: 32,
       workers: 0, train_augment: none, input_size: [3, 64, 64]}}
stages:
  - {{kind: train, epochs: 1, lr: 0.01}}
  - {{kind: prune, ratio: 0.25, round_to: 8}}
  - {{kind: distill, epochs: 1, lr: 0.002, feature_weight: 1.0}}
  - {{kind: ptq_int8, backend: [x86_pt2e, torchao_int8], calib_images: 64}}
eval: {{batch_size: 32, compile: false, throughput_batch_sizes: [1, 32], rounds: 3, min_seconds: 0.05, warmup: 1,
       bootstrap: 100}}
output: {{dir: {out}}}
"""


def test_train_prune_distill_ptq_on_the_gpu(tmp_path):
    from compress.pipeline import run_recipe
    path = tmp_path / 'r.yaml'
    path.write_text(RECIPE.format(out=tmp_path / 'runs'))
    accelerator = Accelerator()
    assert accelerator.device.type == 'cuda'
    record = run_recipe(load_recipe(path), accelerator)
    rows = {stage['name']: stage for stage in record['stages']}
    for name in ('baseline', 'baseline[bf16]', 'train', 'prune', 'distill'):
        metrics = rows[name]['metrics']
        assert metrics['evaluated_on'] == 'cuda', name
        assert metrics['gpu_img_s_bs1'] > 0 and metrics['gpu_img_s_bs32'] > 0, name
    for name in ('baseline', 'train', 'distill'):  # fp32 rows: bf16 on the GPU too, timed in the same rounds
        metrics = rows[name]['metrics']
        assert metrics['gpu_bf16_img_s_bs32'] > 0 and len(metrics['gpu_bf16_speedup_bs32']) == 3
    pt2e = rows['ptq_int8[x86_pt2e]']['metrics']
    assert pt2e['evaluated_on'] == 'cpu' and pt2e['int8_weight_fraction'] == 1.0  # oneDNN int8: a CPU artifact
    torchao = rows['ptq_int8[torchao_int8]']
    assert torchao['metrics']['evaluated_on'] == 'cuda' and torchao['metrics']['gpu_img_s_bs32'] > 0
    assert abs(torchao['metrics']['top1'] - rows['distill']['metrics']['top1']) < 5
    assert record['timing']['control']['forms'] == ['baseline', 'baseline A/A']  # the CPU session still runs


def test_teacher_and_student_train_on_one_device():
    from compress.config import DataConfig, DistillStage, EvalConfig
    from compress.data import DataBundle, SyntheticShapes, attach_transforms
    from compress.stages.base import StageContext
    from compress.stages.distill import apply_distill
    bundle = DataBundle('synthetic', 10, SyntheticShapes('eval', 32), None, SyntheticShapes('train', 128), 'eval')
    config = {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.25,) * 3, 'interpolation': 'bilinear',
              'crop_pct': 1.0, 'crop_mode': 'center'}
    attach_transforms(bundle, config, 'none')
    accelerator = Accelerator()
    teacher = timm.create_model('test_resnet_cifar').eval()
    ctx = StageContext(accelerator, bundle, DataConfig(batch_size=32, workers=0), EvalConfig(compile=False),
                       (3, 32, 32), initial_model=teacher, data_config={**config, 'mean': (0.4,) * 3})
    (result,) = apply_distill(DistillStage(epochs=1, lr=1e-3, feature_weight=1.0), timm.create_model(
        'test_resnet_cifar'), ctx)  # another normalisation: the renormalisation tensors go to the device too
    assert result.info['distill']['steps'] == 4 and next(result.float_model.parameters()).device.type == 'cpu'


def test_bf16_runs_on_the_gpu():
    from eval.runtimes import TorchRunner
    model = timm.create_model('test_resnet_cifar').eval()
    runner = TorchRunner(model, compiled=True, label='bf16', dtype=torch.bfloat16, device='cuda')
    images = torch.randn(4, 3, 32, 32)
    logits = runner(images)
    assert logits.dtype == torch.float32 and logits.device.type == 'cpu' and runner.runtime.endswith('cuda')
    with torch.no_grad():
        expected = model(images)
    # bf16 keeps 8 bits of mantissa: a few per cent of the logits' norm through a small net
    assert (logits - expected).norm() / expected.norm() < 0.05
