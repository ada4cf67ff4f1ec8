"""Records are written atomically and never overwritten; tables are generated from them with paired deltas."""
import csv
import json
import os

import numpy as np
import pytest

from compress.record import environment, write_record
from eval.stats import pack_bits
from eval.tables import MATRIX_BEGIN, MATRIX_END, load_records, main, stage_rows


def per_image_results():
    """Correct / wrong per image: baseline, after training, after int8, the fine-tuned control."""
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.75
    base[:44] = False
    after_train = base.copy()
    after_train[:44] = True                      # training fixes 44 images
    quantized = after_train.copy()
    quantized[40:44] = False                     # int8 loses 4 of them
    control = after_train.copy()
    control[100:110] = ~control[100:110]         # the equally fine-tuned control differs on 10 images
    return base, after_train, quantized, control


def make_record(name='demo', date='2026-11-21T00:00:00+00:00', noisy=False):
    base, after_train, quantized, control = per_image_results()

    def metrics(correct, img_s, precision, speedup=None):
        return {'top1': round(100 * correct.mean(), 2), 'top1_ci95': [0, 0], 'top5': 99.0,
                'correct1_bits': pack_bits(correct), 'params_m': 0.27, 'gmacs': 0.041, 'size_mb': 1.1,
                'cpu_img_s_bs1': img_s / 2, 'cpu_img_s_bs32': img_s, 'precision': precision,
                'runtime': 'torch.compile (inductor)', 'int8_weight_fraction': 1.0 if precision == 'int8' else 0.0,
                'int4_weight_fraction': 0.0, **({'speedup_fp32_bs32': speedup} if speedup else {})}
    return {
        'schema': 2, 'recipe': {'name': name}, 'model': {'name': 'resnet20_cifar'}, 'git_hash': 'abc', 'date': date,
        'data': {'name': 'cifar10', 'split': 'test', 'num_images': 400},
        'env': {'cpu': {'model': 'test cpu'}, 'eval_threads': 1},
        'stages': [
            {'name': 'baseline', 'kind': 'baseline', 'before': None, 'metrics': metrics(base, 100, 'fp32')},
            {'name': 'train', 'kind': 'train', 'before': 'baseline',
             'metrics': metrics(after_train, 100, 'fp32', [1.0, 0.98, 1.02])},
            {'name': 'ptq_int8[x86_pt2e]', 'kind': 'ptq_int8', 'before': 'train',
             'metrics': metrics(quantized, 300, 'int8', [2.95, 2.81, 3.1]),
             'coverage': {'quantized_weight_fraction': 0.99, 'float_weight_fraction': 0.01,
                          'layer_counts': {'int8': 20, 'int4': 0, 'float': 1},
                          'float_layers': [{'layer': 'linear', 'op': 'linear'}]}},
            {'name': 'ptq_int8[openvino]', 'kind': 'ptq_int8', 'before': 'train', 'result': None,
             'reason': 'openvino could not quantize the model: RuntimeError: no'},
            {'name': 'control[finetune]', 'kind': 'control', 'before': 'baseline',
             'metrics': metrics(control, 100, 'fp32', [1.01, 0.97, 1.03])},
        ],
        'timing': {'batch_sizes': [1, 32], 'rounds': 7, 'threads': 1, 'measure': 'cpu', 'noisy': noisy,
                   'load_before': [1.0, 1.0, 1.0], 'load_after': [1.2, 1.0, 1.0],
                   'control': {'ok': not noisy, 'tolerance': 0.05,
                               'ratios': {'bs1': [1.0, 0.99, 1.01], 'bs32': [1.002, 0.98, 1.03]}}},
    }


def test_rows_have_deltas_against_the_stage_input_and_the_control_and_named_speedups():
    rows = stage_rows(make_record())
    assert [row['stage'] for row in rows] == ['baseline', 'train', 'ptq_int8[x86_pt2e]', 'control[finetune]']
    assert rows[0]['Δtop1'] == '' and rows[0]['×fp32_bs32'] == ''
    assert rows[1]['Δtop1'].startswith('+11.00 [')      # 44 of 400 images fixed
    assert rows[2]['Δtop1'].startswith('-1.00 [')       # against train, not against baseline
    assert rows[2]['×fp32_bs32'] == '2.95 [2.81, 3.10]' and rows[2]['int8_w'] == '100%'
    # against the fine-tuned control, on the same images
    _, _, quantized, control = per_image_results()
    assert rows[2]['Δctrl'].startswith(f'{100 * (quantized.mean() - control.mean()):+.2f} [')
    assert rows[3]['Δctrl'] == '' and rows[0]['Δctrl'] == ''


def test_a_noisy_session_marks_every_speedup_and_the_footer_says_so(tmp_path):
    rows = stage_rows(make_record(noisy=True))
    assert rows[2]['×fp32_bs32'] == '2.95 [2.81, 3.10]~'
    write_record(make_record(noisy=True), tmp_path)
    assert main([str(tmp_path), '--out', str(tmp_path / 'tables')]) == 0
    markdown = (tmp_path / 'tables' / 'runs.md').read_text()
    assert 'OUTSIDE 1 ± 0.05; every speedup marked ~ is unreliable' in markdown
    assert 'No result from ptq_int8[openvino]: openvino could not quantize the model' in markdown
    assert '| ptq_int8[openvino]' not in markdown   # no row claims a result that does not exist
    # an int8 row with a float layer says so
    assert 'ptq_int8[x86_pt2e]: 1 of 21 weighted layers stay float (1.0% of the weights): linear' in markdown


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
    assert [r['stage'] for r in rows] == ['baseline', 'train', 'ptq_int8[x86_pt2e]', 'control[finetune]']


def test_a_record_is_as_readable_as_other_files_the_user_writes(tmp_path):
    umask = os.umask(0o022)
    try:  # not private (0600) like a temporary file
        assert (write_record(make_record(), tmp_path).stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(umask)


def test_tables_refuse_an_empty_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert 'no run records' in capsys.readouterr().err


def test_environment_names_versions_and_cpu():
    env = environment()
    assert env['versions']['torch'].startswith('2.14') and env['versions']['torchao'] == '0.18.0'
    assert env['cpu']['logical_cpus'] >= 1
    json.dumps(env)


def test_records_of_an_older_schema_are_skipped_with_a_reason(tmp_path, capsys):
    record = make_record()
    del record['schema']
    (tmp_path / 'old.json').write_text(json.dumps(record))
    assert load_records(tmp_path) == []
    assert 'older version (schema 1); run the recipe again' in capsys.readouterr().err


@pytest.mark.parametrize('field', ['recipe', 'stages'])
def test_non_records_are_ignored(tmp_path, field):
    record = make_record()
    del record[field]
    (tmp_path / 'x.json').write_text(json.dumps(record))
    assert load_records(tmp_path) == []


def test_stage_matrix_says_what_each_stage_made_and_why_one_made_nothing(tmp_path):
    record = make_record(name='r20__int8')
    record['stages'][2]['metrics']['int8_weight_fraction'] = 0.99996   # one small layer left float
    pruned = make_record(name='r20__prune', date='2026-11-22T00:00:00+00:00')
    pruned['stages'][1] = {'name': 'prune', 'kind': 'prune', 'before': 'baseline',
                           'metrics': {**pruned['stages'][0]['metrics'], 'gmacs': 0.0205}}
    del pruned['stages'][2:]
    pruned['config'] = {'stages': [{'kind': 'prune', 'target_macs': 0.5, 'ratio': None}]}
    pruned30 = make_record(name='r20__prune30', date='2026-11-22T00:00:00+00:00')
    pruned30['stages'][1] = {'name': 'prune', 'kind': 'prune', 'before': 'baseline',
                             'metrics': {**pruned['stages'][0]['metrics'], 'gmacs': 0.0287}}
    del pruned30['stages'][2:]
    pruned30['config'] = {'stages': [{'kind': 'prune', 'target_macs': 0.7, 'ratio': None}]}
    other = make_record(name='mbv2__int8')
    other['model']['name'] = 'mobilenetv2_100'
    for each in (record, pruned, pruned30, other):
        write_record(each, tmp_path / 'runs')
    readme = tmp_path / 'README.md'
    readme.write_text(f'intro\n{MATRIX_BEGIN}\nold\n{MATRIX_END}\nrest\n')
    assert main([str(tmp_path / 'runs'), '--matrix', '--out', str(tmp_path / 'out'), '--readme', str(readme)]) == 0
    rows = list(csv.reader((tmp_path / 'out' / 'stages.csv').open()))
    # pipeline order; two prune targets of one model are two columns, the lighter first
    assert rows[0] == ['model', 'train', 'prune[target_macs 0.7]', 'prune[target_macs 0.5]', 'ptq_int8[x86_pt2e]',
                       'ptq_int8[openvino]']
    by_model = {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}
    resnet = by_model['resnet20_cifar']
    assert resnet['ptq_int8[x86_pt2e]'] == 'int8 99.9 %' and resnet['prune[target_macs 0.5]'] == 'MACs ×0.50'
    assert resnet['prune[target_macs 0.7]'] == 'MACs ×0.70'
    assert resnet['ptq_int8[openvino]'] == 'no (1)' and by_model['mobilenetv2_100']['prune[target_macs 0.5]'] == ''
    text = readme.read_text()
    assert text.startswith('intro\n') and text.endswith('rest\n') and 'old' not in text
    assert '(1) ptq_int8[openvino]: openvino could not quantize the model: RuntimeError: no' in text
    assert '| resnet20_cifar' in text and 'From 4 records made at git abc.' in text
