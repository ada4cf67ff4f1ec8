"""Records are written atomically and never overwritten; tables are generated from them with paired deltas."""
import csv
import json

import numpy as np
import pytest

from compress.record import environment, write_record
from eval.stats import pack_bits
from eval.tables import load_records, main, stage_rows


def make_record(name='demo', date='2026-11-21T00:00:00+00:00'):
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.75
    base[:44] = False
    after_train = base.copy()
    after_train[:44] = True                      # training fixes 44 images
    quantized = after_train.copy()
    quantized[40:44] = False                     # int8 loses 4 of them

    def metrics(correct, img_s, precision):
        return {'top1': round(100 * correct.mean(), 2), 'top1_ci95': [0, 0], 'top5': 99.0,
                'correct1_bits': pack_bits(correct), 'params_m': 0.27, 'gmacs': 0.041, 'size_mb': 1.1,
                'cpu_img_s_bs1': img_s / 2, 'cpu_img_s_bs32': img_s, 'precision': precision,
                'runtime': 'torch eager', 'quantized_weight_fraction': 1.0 if precision == 'int8' else 0.0}
    return {
        'recipe': {'name': name}, 'model': {'name': 'resnet20_cifar'}, 'git_hash': 'abc', 'date': date,
        'data': {'name': 'cifar10', 'split': 'test', 'num_images': 400},
        'env': {'cpu': {'model': 'test cpu'}, 'eval_threads': 1},
        'stages': [
            {'name': 'baseline', 'before': None, 'metrics': metrics(base, 100, 'fp32')},
            {'name': 'train', 'before': 'baseline', 'metrics': metrics(after_train, 100, 'fp32')},
            {'name': 'ptq_int8[x86_pt2e]', 'before': 'train', 'metrics': metrics(quantized, 300, 'int8')},
        ],
    }


def test_rows_have_deltas_against_the_stage_input_and_speedups_against_baseline():
    rows = stage_rows(make_record())
    assert rows[0]['Δtop1'] == '' and rows[0]['speedup_bs32'] == '1.00×'
    assert rows[1]['Δtop1'].startswith('+11.00 [')      # 44 of 400 images fixed
    assert rows[2]['Δtop1'].startswith('-1.00 [')       # against train, not against baseline
    assert rows[2]['speedup_bs32'] == '3.00×' and rows[2]['int8_weights'] == '100%'


def test_records_never_overwrite_and_tables_pick_the_newest(tmp_path):
    first = write_record(make_record(), tmp_path)
    second = write_record(make_record(date='2026-11-22T00:00:00+00:00'), tmp_path)
    assert first != second and first.exists() and second.exists()
    assert not list(tmp_path.rglob('*.tmp'))
    assert len(load_records(tmp_path)) == 1 and len(load_records(tmp_path, newest_only=False)) == 2
    out = tmp_path / 'tables'
    assert main([str(tmp_path), '--out', str(out)]) == 0
    markdown = (out / 'runs.md').read_text()
    assert '| ptq_int8[x86_pt2e]' in markdown and 'cifar10 test (400 images)' in markdown
    assert '\\toprule' in (out / 'runs.tex').read_text()
    rows = list(csv.DictReader((out / 'runs.csv').open()))
    assert [r['stage'] for r in rows] == ['baseline', 'train', 'ptq_int8[x86_pt2e]']


def test_tables_refuse_an_empty_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert 'no run records' in capsys.readouterr().err


def test_environment_names_versions_and_cpu():
    env = environment()
    assert env['versions']['torch'].startswith('2.14') and env['versions']['torchao'] == '0.18.0'
    assert env['cpu']['logical_cpus'] >= 1
    json.dumps(env)


@pytest.mark.parametrize('field', ['recipe', 'stages'])
def test_non_records_are_ignored(tmp_path, field):
    record = make_record()
    del record[field]
    (tmp_path / 'x.json').write_text(json.dumps(record))
    assert load_records(tmp_path) == []
