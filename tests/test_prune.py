"""Structured pruning: real width changes, the function kept where only dead channels go, MAC targets met."""
import pytest
import timm
import torch

import compress.models  # noqa: F401
from compress.config import PruneStage, RecipeError
from compress.stages.prune import prune_model
from eval.complexity import count_macs, count_params


def test_resnet_cifar_keeps_its_residual_stream_and_halves_macs():
    model = timm.create_model('resnet20_cifar').eval()
    pruned, spec = prune_model(model, PruneStage(ratio=0.5), 0.5, torch.randn(2, 3, 32, 32))
    for block, original in zip((b for s in pruned.stages for b in s), (b for s in model.stages for b in s)):
        assert block.conv2.out_channels == original.conv2.out_channels  # option-A stream untouched
        assert block.conv1.out_channels == original.conv1.out_channels // 2
    assert count_macs(pruned, (3, 32, 32)) / count_macs(model, (3, 32, 32)) == pytest.approx(0.505, abs=0.01)
    assert pruned(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_pruning_dead_channels_keeps_the_function():
    torch.manual_seed(0)
    model = timm.create_model('resnet20_cifar').eval()
    dead = {}
    with torch.no_grad():
        for block in (b for s in model.stages for b in s):
            width = block.conv1.out_channels
            channels = torch.randperm(width)[:width // 2]
            block.conv1.weight[channels] = 0
            block.bn1.weight[channels] = 0
            block.bn1.bias[channels] = 0
            block.conv2.weight[:, channels] = 0
            dead[block] = channels
        x = torch.randn(4, 3, 32, 32)
        expected = model(x)
    pruned, _ = prune_model(model, PruneStage(ratio=0.5, importance='group_norm', round_to=None), 0.5, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(('ratio', 'exact_width'), [(0.02, 15), (0.3, 11), (0.5, 8)])
def test_round_to_rounds_the_kept_channels_down_as_the_help_says(ratio, exact_width):
    # resnet20_cifar's first stage: 16-channel inner convs; the help of round_to promises 8 kept at any ratio <= 1/2
    model = timm.create_model('resnet20_cifar').eval()
    example = torch.randn(2, 3, 32, 32)
    rounded, _ = prune_model(model, PruneStage(ratio=ratio, round_to=8), ratio, example)
    exact, _ = prune_model(model, PruneStage(ratio=ratio, round_to=None), ratio, example)
    assert rounded.stages[0][0].conv1.out_channels == 8
    assert exact.stages[0][0].conv1.out_channels == exact_width


def test_target_macs_is_searched():
    model = timm.create_model('resnet20_cifar').eval()
    from compress.stages.prune import search_ratio
    cfg = PruneStage(target_macs=0.7, round_to=None)
    pruned, ratio, _ = search_ratio(model, cfg, torch.randn(2, 3, 32, 32), None, (3, 32, 32),
                                     count_macs(model, (3, 32, 32)))
    assert count_macs(pruned, (3, 32, 32)) / count_macs(model, (3, 32, 32)) == pytest.approx(0.7, abs=0.01)
    assert 0.2 < ratio < 0.4  # inner channels only: block MACs scale with (1 - ratio)


def test_taylor_importance_uses_gradients():
    model = timm.create_model('test_resnet_cifar').eval()
    batches = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))) for _ in range(2)]
    pruned, _ = prune_model(model, PruneStage(ratio=0.25, importance='taylor'), 0.25, batches[0][0][:2], batches)
    assert count_params(pruned) < count_params(model)
    assert all(p.grad is None for p in pruned.parameters())


@pytest.mark.parametrize('heads', ['dims', 'heads'])
def test_vit_heads_stay_consistent(heads):
    model = timm.create_model('deit_tiny_patch16_224', depth=2).eval()
    pruned, _ = prune_model(model, PruneStage(ratio=0.5, heads=heads, round_to=None), 0.5,
                            torch.randn(2, 3, 224, 224))
    attn = pruned.blocks[0].attn
    assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
    assert (attn.num_heads < 3) if heads == 'heads' else (attn.num_heads == 3 and attn.head_dim < 64)
    assert pruned(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    assert pruned.head.out_features == 1000


def test_prune_config_needs_exactly_one_amount():
    with pytest.raises(RecipeError, match='exactly one of ratio'):
        PruneStage(ratio=0.5, target_macs=0.5)
    with pytest.raises(RecipeError, match='must be in'):
        PruneStage(ratio=1.5)


SEED_CHAIN = """
name: seed_chain
model: {{name: {model}}}
data: {{source: synthetic, synthetic_image_size: 64, input_size: [3, 64, 64], crop_pct: 1.0, synthetic_train: 64,
       synthetic_eval: 64, synthetic_calib: 32, batch_size: 16, workers: 0, train_augment: none}}
stages:
  - {{kind: prune, ratio: 0.5, round_to: 8}}
  - {{kind: distill, epochs: 1, lr: 0.001, feature_weight: 1.0}}
  - {last}
eval: {{throughput: false, compile: false, bootstrap: 100}}
output: {{dir: {out}}}
"""


@pytest.mark.parametrize('name, last', [
    ('test_spartan', '{kind: ptq_int8, backend: [x86_pt2e], calib_images: 32}'),
    pytest.param('test_smt', '{kind: qat_int8, epochs: 1, lr: 0.0001, alpha: 0.5}', marks=pytest.mark.slow),
])
def test_seed_backbone_prune_distill_int8_chain(name, last, tmp_path):
    """Each seed backbone goes through prune -> distill (feature KD over changed widths) -> int8, as its recipe."""
    from accelerate import Accelerator

    from compress.config import load_recipe
    from compress.pipeline import run_recipe
    path = tmp_path / 'r.yaml'
    path.write_text(SEED_CHAIN.format(model=name, out=tmp_path / 'runs', last=last))
    record = run_recipe(load_recipe(path), Accelerator(cpu=True))
    rows = {s['name']: s for s in record['stages']}
    int8 = 'ptq_int8[x86_pt2e]' if 'ptq' in last else 'qat_int8[x86_pt2e]'
    assert list(rows) == ['baseline', 'baseline[bf16]', 'prune', 'distill', int8]
    assert rows['prune']['info']['macs_kept'] < 0.6
    assert rows['prune']['metrics']['params_m'] < rows['baseline']['metrics']['params_m']
    assert rows['distill']['metrics']['gmacs'] == rows['prune']['metrics']['gmacs']
    assert rows[int8]['metrics']['int8_weight_fraction'] == 1.0
    assert rows[int8]['metrics']['precision'] == 'int8'


def test_pruned_model_is_saved_whole_and_reloaded_with_its_history(tmp_path):
    """A pruned architecture cannot take a fresh model's state dict: the run saves the module, a recipe reloads it."""
    from accelerate import Accelerator

    from compress.config import load_recipe
    from compress.pipeline import run_recipe
    first = tmp_path / 'first.yaml'
    first.write_text(f"""
name: prune_and_save
model: {{name: test_resnet_cifar}}
data: {{source: synthetic, synthetic_eval: 64, synthetic_calib: 32, batch_size: 16, workers: 0}}
stages: [{{kind: prune, ratio: 0.5, round_to: null}}]
eval: {{throughput: false, compile: false}}
output: {{dir: {tmp_path / 'runs'}, save_model: true}}
""")
    record = run_recipe(load_recipe(first), Accelerator(cpu=True))
    saved = record['final_model']
    with pytest.raises(RecipeError, match='is a whole model saved by a compress run; set model.whole_module=true'):
        run_recipe(load_recipe(first, [f'model.checkpoint={saved}']), Accelerator(cpu=True))
    again = run_recipe(load_recipe(first, [f'model.checkpoint={saved}', 'model.whole_module=true',
                                           f'output.dir={tmp_path / "runs2"}']), Accelerator(cpu=True))
    baseline = again['stages'][0]
    pruned = next(stage for stage in record['stages'] if stage['name'] == 'prune')
    assert baseline['metrics']['params_m'] == pruned['metrics']['params_m']
    assert baseline['metrics']['top1'] == pruned['metrics']['top1']
    assert 'stages it went through: prune' in ' '.join(baseline['notes'])
    payload = torch.load(again['final_model'], weights_only=False)
    assert [step['name'] for step in payload['history']] == ['prune', 'prune']
    with pytest.raises(RecipeError, match='model.name: .* holds a test_resnet_cifar'):
        run_recipe(load_recipe(first, [f'model.checkpoint={saved}', 'model.whole_module=true',
                                       'model.name=resnet20_cifar']), Accelerator(cpu=True))
