"""End to end through the real launcher: `accelerate launch compress/run.py` on a tiny recipe."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_tiny_recipe_through_accelerate_launch(tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    command = [sys.executable, '-m', 'accelerate.commands.launch', '--num_processes', '1', '--cpu',
               'compress/run.py', 'recipes/tiny/synthetic_train_int8.yaml', f'output.dir={tmp_path}']
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    record_path = Path(done.stdout.strip().splitlines()[-1])  # the contract: the record's path comes last
    record = json.loads(record_path.read_text())
    assert record_path.parent == tmp_path / 'tiny_synthetic_train_int8'
    names = [stage['name'] for stage in record['stages']]
    assert names == ['baseline', 'train', 'ptq_int8[x86_pt2e]', 'ptq_int8[openvino]']
    baseline, trained, pt2e, openvino = (stage['metrics'] for stage in record['stages'])
    assert record['data'] == {**record['data'], 'name': 'synthetic-shapes-10c', 'num_images': 200}
    assert baseline['top1'] < 20 and trained['top1'] > 35  # chance is 10 %
    for quantized in (pt2e, openvino):
        assert quantized['quantized_weight_fraction'] == 1.0 and quantized['precision'] == 'int8'
        assert abs(quantized['top1'] - trained['top1']) < 5
    for metrics in (baseline, trained, pt2e, openvino):
        for key in ('top1', 'top5', 'top1_ci95', 'params_m', 'gmacs', 'size_mb', 'cpu_img_s_bs1', 'cpu_img_s_bs32',
                    'quantized_weight_fraction'):
            assert key in metrics
    assert pt2e['size_mb'] < 0.5 * trained['size_mb']  # (OpenVINO's XML alone outweighs a 20k-weight model)
    assert 'cpu_img_s_bs32_eager' in baseline
    assert record['env']['versions']['torchao'] == '0.18.0' and record['git_hash']
