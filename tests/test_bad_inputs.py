"""The bad-input corpus: every case ends in one line on stderr naming the key or file and the fix, exit code 2, no
traceback, no record and no partial file, whether it is found before any work or during the run."""
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from compress.run import main

ROOT = Path(__file__).resolve().parent.parent

BASE = 'name: bad\nmodel: {name: test_resnet_cifar}\n'
SMALL = ('data: {source: synthetic, synthetic_train: 64, synthetic_eval: 16, synthetic_calib: 16, batch_size: 8, '
         'workers: 0}\neval: {throughput: false, compile: false, bf16: false, bootstrap: 100}\n')
WNID = 'n01440764'  # tench: an ImageNet-1k class folder


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', (40, 40), (120, 30, 200)).save(buffer, format='JPEG')
    return buffer.getvalue()


def image_folders(tmp_path, corrupt: bool = False, calib: bool = True):
    root = tmp_path / 'images'
    for split in ('val',) + (('train',) if calib else ()):
        folder = root / split / WNID
        folder.mkdir(parents=True)
        for i in range(3):
            (folder / f'{i}.JPEG').write_bytes(jpeg_bytes())
    if corrupt:
        (root / 'val' / WNID / '1.JPEG').write_bytes(jpeg_bytes()[:40])  # a truncated file among good ones
    return root


def hf_parquet(tmp_path):
    import datasets
    root = tmp_path / 'hf'
    root.mkdir()
    for split in ('train', 'test'):
        data = datasets.Dataset.from_dict({'image': [{'bytes': jpeg_bytes(), 'path': None}] * 4, 'label': [0, 1, 0, 1]})
        data.to_parquet(str(root / f'{split}.parquet'))
    return root


def checkpoint(tmp_path, kind: str):
    path = tmp_path / f'{kind}.pth'
    if kind == 'list':
        torch.save([torch.ones(2)], path)
    elif kind == 'truncated':
        torch.save({'w': torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:60])
    elif kind == 'imagenet_head':
        import timm
        torch.save(timm.create_model('test_resnet_cifar', num_classes=1000).state_dict(), path)
    elif kind == 'safetensors':
        path = tmp_path / 'garbage.safetensors'
        path.write_bytes(b'\x00\x01 not safetensors at all')
    return path


# (id, recipe text (may use {tmp}, {images}, {hf}, {ckpt}), overrides, expected start of the message after 'error: ')
CASES = [
    ('missing recipe', None, [], 'recipes_missing.yaml: recipe not found'),
    ('yaml not a mapping', '- a\n- b\n', [], 'a recipe is a YAML mapping'),
    ('not yaml', 'name: [unclosed\n', [], 'is not valid YAML'),
    ('unknown key', BASE + 'evall: {}\n', [], 'evall: unknown key'),
    ('override without value', BASE, ['data.batch_size'], 'data.batch_size: overrides are key=value'),
    ('override of a wrong type', BASE, ['data.batch_size=many'], "data.batch_size: expected an integer, got 'many'"),
    ('override of a missing stage', BASE + 'stages: [{kind: train}]\n', ['stages.5.epochs=1'],
     'stages.5.epochs: stages.5 is not a stage index'),
    ('unknown model', 'name: bad\nmodel: {name: resnet9000}\n', [], "model.name: unknown model 'resnet9000'"),
    ('unknown teacher', BASE + 'stages: [{kind: distill, teacher: {name: no_such_net}}]\n', [],
     "stages[0].teacher.name: unknown model 'no_such_net'"),
    ('zero stage batch size', BASE + 'stages: [{kind: train, batch_size: 0}]\n', [], 'stages[0].batch_size: must be'),
    ('zero max_train', BASE + 'data: {max_train: 0}\n', [], 'data.max_train: must be positive'),
    ('zero input size', BASE + 'data: {input_size: [3, 0, 32]}\n', [], 'data.input_size: must be [C, H, W]'),
    ('zero std', BASE + 'data: {std: [0.2, 0, 0.2]}\n', [], 'data.std: must be positive'),
    ('crop_pct out of range', BASE + 'data: {crop_pct: 0}\n', [], 'data.crop_pct: must be in (0, 1]'),
    ('empty 4-bit backends', BASE + 'stages: [{kind: weight_4bit, backend: []}]\n', [],
     'stages[0].backend: name at least one of'),
    ('empty export formats', BASE + 'stages: [{kind: export, formats: []}]\n', [],
     'stages[0].formats: name at least one of'),
    ('backend twice', BASE + 'stages: [{kind: ptq_int8, backend: [openvino, openvino]}]\n', [],
     'stages[0].backend: lists a backend twice'),
    ('prune ratio out of range', BASE + 'stages: [{kind: prune, ratio: 1.5}]\n', [], 'stages[0].ratio: must be in'),
    ('4-bit group size 0', BASE + 'stages: [{kind: weight_4bit, group_size: 0}]\n', [],
     'stages[0].group_size: must be positive or -1'),
    ('stage after quantization', BASE + 'stages: [{kind: ptq_int8}, {kind: train}]\n', [],
     'stages[1]: train comes after ptq_int8'),
    ('too few timing rounds', BASE, ['eval.rounds=2'], 'eval.rounds: must be at least 3'),
    ('unknown time measure', BASE, ['eval.measure=gpu'], 'eval.measure: must be one of cpu, wall'),
    ('control without training', BASE + 'stages: [{kind: ptq_int8}]\ncontrols: [finetune]\n', [],
     'controls: a finetune control needs a stage that trains'),
    ('unknown control', BASE + 'stages: [{kind: train}]\ncontrols: [nothing]\n', [],
     "controls: 'nothing' is not one of finetune"),
    ('missing data folder', BASE + 'data: {source: imagefolder, root: {tmp}/nowhere}\n', [],
     'data.root: {tmp}/nowhere is not a folder'),
    ('prune-only recipe without its calibration folder',
     BASE + 'data: {source: imagefolder, root: {images}, eval_dir: val, calib_dir: calib}\n'
            'stages: [{kind: prune, ratio: 0.3}]\n', [], 'data.calib_dir: {images}/calib is not a folder'),
    ('mislabelled folders', BASE + 'data: {source: imagefolder, root: {tmp}, eval_dir: plain}\n', [],
     "data.class_index: folder 'cats' in {tmp}/plain is not an ImageNet-1k wnid"),
    ('empty evaluation folder', BASE + 'data: {source: imagefolder, root: {tmp}, eval_dir: empty}\n', [],
     'data.eval_dir: {tmp}/empty holds no class folders'),
    ('missing HF label column', BASE + 'data: {source: hf, root: {hf}, label_key: lbl}\n', [],
     "data.label_key: column 'lbl' not in the data set"),
    ('missing HF split', BASE + 'data: {source: hf, root: {hf}, eval_split: validation}\n', [],
     'data.eval_split: no validation.parquet in'),
    ('unwritable output folder', BASE + SMALL + 'output: {dir: {tmp}/a_file/runs}\n', [],
     'output.dir: {tmp}/a_file/runs cannot be written'),
    ('missing checkpoint', 'name: bad\nmodel: {name: test_resnet_cifar, checkpoint: {tmp}/no.pth}\n', [],
     'model.checkpoint: {tmp}/no.pth does not exist'),
    ('checkpoint that is a list', 'name: bad\nmodel: {name: test_resnet_cifar, checkpoint: {ckpt}}\n' + SMALL, [],
     'model.checkpoint: {ckpt} holds no state dict of tensors'),
    ('truncated checkpoint', 'name: bad\nmodel: {name: test_resnet_cifar, checkpoint: {ckpt}}\n' + SMALL, [],
     'model.checkpoint: cannot read {ckpt}'),
    ('garbage safetensors', 'name: bad\nmodel: {name: test_resnet_cifar, checkpoint: {ckpt}}\n' + SMALL, [],
     'model.checkpoint: cannot read {ckpt}'),
    ('checkpoint with other classes and nothing to train them',
     'name: bad\nmodel: {name: test_resnet_cifar, checkpoint: {ckpt}}\n' + SMALL, [],
     'model.checkpoint: imagenet_head.pth predicts 1000 classes, the data set has 10'),
    ('num_classes against the data', 'name: bad\nmodel: {name: test_resnet_cifar, num_classes: 5}\n' + SMALL, [],
     'model.num_classes: 5, but the data set has 10 classes'),
    ('training set smaller than a batch', BASE + SMALL + 'stages: [{kind: train}]\n', ['data.synthetic_train=4'],
     'data.batch_size: the training set has 4 images, fewer than one batch of 8'),
    ('corrupt image in the evaluation set', BASE + 'data: {source: imagefolder, root: {images}, eval_dir: val, '
                                           'workers: 0}\neval: {throughput: false, compile: false, bf16: false}\n', [],
     'data.eval_dir: {images}/val/n01440764/1.JPEG is not a readable image'),
    ('corrupt image read by a loader worker', BASE + 'data: {source: imagefolder, root: {images}, eval_dir: val, '
                                              'workers: 1}\neval: {throughput: false, compile: false, bf16: false}\n',
     [], 'data.eval_dir: {images}/val/n01440764/1.JPEG is not a readable image'),
]
CHECKPOINT_KIND = {'checkpoint that is a list': 'list', 'truncated checkpoint': 'truncated',
                   'garbage safetensors': 'safetensors',
                   'checkpoint with other classes and nothing to train them': 'imagenet_head'}


@pytest.mark.parametrize('case', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, tmp_path, capsys, request):
    text, overrides, expected = case
    name = request.node.callspec.id
    places = {'tmp': str(tmp_path), 'images': str(tmp_path / 'images'), 'hf': str(tmp_path / 'hf'), 'ckpt': ''}
    if 'images' in (text or ''):
        image_folders(tmp_path, corrupt='corrupt' in name, calib='calibration' not in name)
    if '{hf}' in (text or ''):
        hf_parquet(tmp_path)
    if name in CHECKPOINT_KIND:
        places['ckpt'] = str(checkpoint(tmp_path, CHECKPOINT_KIND[name]))
    (tmp_path / 'a_file').write_text('a file, not a folder')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'plain' / 'cats').mkdir(parents=True)
    fill = lambda s: s.replace('{tmp}', places['tmp']).replace('{images}', places['images']) \
        .replace('{hf}', places['hf']).replace('{ckpt}', places['ckpt'])  # noqa: E731
    if text is None:
        recipe = tmp_path / 'recipes_missing.yaml'
    else:
        recipe = tmp_path / 'recipe.yaml'
        body = fill(text)
        if body.startswith('name:') and 'output:' not in body:
            body += f'output: {{dir: {tmp_path / "runs"}}}\n'
        recipe.write_text(body)
    capsys.readouterr()  # what making the bad inputs printed
    if 'worker' in name:
        # loader workers start from a fork server; one started inside the test process makes its later forks
        # (accelerate's debug_launcher) crash, so this case runs the command line in its own interpreter
        done = subprocess.run([sys.executable, str(ROOT / 'compress' / 'run.py'), str(recipe), *overrides],
                              capture_output=True, text=True, timeout=600, cwd=ROOT)
        code, err = done.returncode, done.stderr.strip().splitlines()
    else:
        code = main([str(recipe), *overrides])
        err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith('error: '), err
    message = err[0].removeprefix('error: ')
    request.node.user_properties.append(('printed', err[0]))  # the corpus with its lines: --junitxml
    assert fill(expected) in message
    assert not (tmp_path / 'runs').exists() or not any((tmp_path / 'runs').rglob('*.json'))
    assert not list(tmp_path.rglob('*.tmp')) and not list(tmp_path.rglob('.progress-*'))
