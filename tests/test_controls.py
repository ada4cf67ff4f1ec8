"""The fine-tuned control: the uncompressed model trained with the recipe's own training stages."""
import pytest
from accelerate import Accelerator

from compress.config import RecipeError, load_recipe
from compress.pipeline import run_recipe

RECIPE = """
name: control_demo
model: {{name: test_resnet_cifar}}
data: {{source: synthetic, synthetic_train: 256, synthetic_eval: 128, synthetic_calib: 64, workers: 0,
       train_augment: none}}
stages:
  - {{kind: prune, ratio: 0.3, round_to: null}}
  - {{kind: distill, epochs: 1, lr: 0.002}}
  - {{kind: qat_int8, epochs: 1, lr: 0.0001, alpha: 0.5}}
controls: [finetune]
eval: {{throughput: false, compile: false, bf16: false, bootstrap: 100}}
output: {{dir: {out}}}
"""


def test_control_row_is_the_uncompressed_model_trained_like_the_stages(tmp_path):
    path = tmp_path / 'r.yaml'
    path.write_text(RECIPE.format(out=tmp_path / 'runs'))
    record = run_recipe(load_recipe(path), Accelerator(cpu=True))
    rows = {stage['name']: stage for stage in record['stages']}
    assert list(rows) == ['baseline', 'prune', 'distill', 'qat_int8[x86_pt2e]', 'control[finetune]']
    control = rows['control[finetune]']
    assert control['kind'] == 'control' and control['before'] == 'baseline'
    # uncompressed: the baseline's architecture, float weights
    assert control['metrics']['params_m'] == rows['baseline']['metrics']['params_m']
    assert control['metrics']['precision'] == 'fp32' and control['metrics']['int8_weight_fraction'] == 0.0
    # trained by the distill stage and, in float with its KD settings, by the QAT stage; not pruned
    assert [step.split(' ')[0] for step in control['info']['trained_as']] == ['distill', 'qat_int8']
    assert 'KD alpha 0.5' in control['info']['trained_as'][1]
    # every compressed row is compared with it on the same images, the references and the control itself are not
    for name in ('prune', 'distill', 'qat_int8[x86_pt2e]'):
        metrics = rows[name]['metrics']
        assert metrics['top1_vs_control'] == round(metrics['top1'] - control['metrics']['top1'], 2)
        low, high = metrics['top1_vs_control_ci95']
        assert low <= metrics['top1_vs_control'] <= high
    assert 'top1_vs_control' not in rows['baseline']['metrics'] and 'top1_vs_control' not in control['metrics']


def test_a_control_needs_a_stage_that_trains(tmp_path):
    path = tmp_path / 'r.yaml'
    path.write_text('name: t\nmodel: {name: test_resnet_cifar}\nstages: [{kind: ptq_int8}]\ncontrols: [finetune]\n')
    with pytest.raises(RecipeError, match='controls: a finetune control needs a stage that trains'):
        load_recipe(path)
    with pytest.raises(RecipeError, match="controls: 'nothing' is not one of finetune"):
        load_recipe(path, ['controls=[nothing]'])
    assert load_recipe(path, ['controls=[]']).controls == []
