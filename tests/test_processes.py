"""Several processes, same numbers: a training recipe run by 2 processes (Accelerate, gloo on the CPU) takes the
optimizer steps of a 1-process run with the same global batch and ends close to it; the record is written once."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE = """
name: processes
model: {{name: test_resnet_cifar}}
data: {{source: synthetic, synthetic_train: 1536, synthetic_eval: 256, workers: 0, train_augment: none,
       batch_size: {batch}}}
stages:
  - {{kind: train, epochs: 4, lr: 0.01}}
eval: {{throughput: false, compile: false, bf16: false, bootstrap: 100, batch_size: 32}}
output: {{dir: {out}}}
"""
LAUNCH = """
import sys
from accelerate import debug_launcher
from compress.run import main
debug_launcher(lambda: main(sys.argv[1:]), num_processes=int(sys.argv.pop(1)))
"""


def run(tmp_path, processes: int, batch: int) -> dict:
    out = tmp_path / f'runs{processes}'
    recipe = tmp_path / f'p{processes}.yaml'
    recipe.write_text(RECIPE.format(batch=batch, out=out))
    done = subprocess.run([sys.executable, '-c', LAUNCH, str(processes), str(recipe)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.rglob('*.json')  # one record, written once
    return json.loads(path.read_text())


@pytest.mark.slow
def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(tmp_path):
    one = run(tmp_path, 1, 32)
    two = run(tmp_path, 2, 16)  # 16 per process: the same global batch of 32
    train_one, train_two = (next(s for s in r['stages'] if s['name'] == 'train') for r in (one, two))
    assert two['env']['processes'] == 2 and one['env']['processes'] == 1
    assert train_two['info']['train']['global_batch'] == train_one['info']['train']['global_batch'] == 32
    assert train_two['info']['train']['steps'] == train_one['info']['train']['steps'] == 4 * 1536 // 32
    # the same images, evaluated once each across the two processes
    assert two['data']['num_images'] == one['data']['num_images'] == 256
    # the runs differ by the order each process sees its shard in; measured 33.6 % (1 process) against 37.9 %
    # (2 processes), the same twice: a bound of 10 points on 256 images (a 95 % interval is about +-6 points wide)
    assert abs(train_two['metrics']['top1'] - train_one['metrics']['top1']) < 10
