"""End to end through the real launcher: `accelerate launch compress/run.py` on a tiny recipe."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_recipe_through_accelerate_launch(tmp_path):
    command = [sys.executable, '-m', 'accelerate.commands.launch', '--num_processes', '1', '--cpu',
               'compress/run.py', 'recipes/tiny/synthetic_train_int8.yaml', f'output.dir={tmp_path}']
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    record_path = Path(done.stdout.strip().splitlines()[-1])  # the contract: the record's path comes last
    record = json.loads(record_path.read_text())
    assert record_path.parent == tmp_path / 'tiny_synthetic_train_int8'
    rows = {stage['name']: stage for stage in record['stages']}
    assert list(rows) == ['baseline', 'fp32 eager', 'baseline[bf16]', 'train', 'ptq_int8[x86_pt2e]',
                          'openvino fp32 (of train)', 'ptq_int8[openvino]']
    baseline, trained, pt2e, openvino = (rows[name]['metrics'] for name in
                                         ('baseline', 'train', 'ptq_int8[x86_pt2e]', 'ptq_int8[openvino]'))
    assert record['data'] == {**record['data'], 'name': 'synthetic-shapes-10c', 'num_images': 200}
    assert baseline['top1'] < 20 and trained['top1'] > 35  # chance is 10 %
    for quantized in (pt2e, openvino):
        assert quantized['int8_weight_fraction'] == 1.0 and quantized['precision'] == 'int8'
        assert abs(quantized['top1'] - trained['top1']) < 5
    assert openvino['runs_in'].startswith('u8') and pt2e['runs_in'].startswith('int8 kernels')
    # one timing session for every form, the baseline timed twice as the A/A control
    timing = record['timing']
    assert set(timing['forms']) == set(rows) | {'baseline A/A'} and timing['batch_sizes'] == [1, 32]
    assert timing['control']['forms'] == ['baseline', 'baseline A/A'] and timing['rounds'] >= 3
    for name, row in rows.items():
        metrics = row['metrics']
        for key in ('cpu_img_s_bs1', 'cpu_img_s_bs32', 'cpu_img_s_cpu_bs32', 'size_mb', 'runtime'):
            assert key in metrics, (name, key)
        # every speedup says what it divides by: the fp32 baseline and the bf16 one, each timed in the same rounds
        assert ('speedup_fp32_bs32' in metrics) == (name != 'baseline')
        assert ('speedup_bf16_bs32' in metrics) == (name != 'baseline[bf16]')
    assert len(openvino['speedup_ov_fp32_bs32']) == 3 and 'speedup_ov_fp32_bs32' not in pt2e
    assert pt2e['size_mb'] < 0.5 * trained['size_mb']  # (OpenVINO's XML alone outweighs a 20k-weight model)
    assert record['env']['versions']['torchao'] == '0.18.0' and record['git_hash']
