"""The regression gate (`compress.check`) judged on a real record: ResNet-20 CIFAR int8, 10,000 test images."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from compress.check import Verdict, check_record, cpu_isa, cpu_model, default_metrics, load_reference, main
from eval.stats import mcnemar_exact, pack_bits, unpack_bits

RECORD = sorted(Path('results/runs/resnet20_cifar_int8').glob('*.json'))[-1]
PT2E = 'ptq_int8[x86_pt2e]'


@pytest.fixture
def record():
    return json.loads(RECORD.read_text())


def _stage(record, name):
    return next(stage for stage in record['stages'] if stage['name'] == name)


def _entry(record, tmp_path):
    """A reference entry made from the record itself, its record copied where the entry points."""
    (tmp_path / 'ref').mkdir(exist_ok=True)
    (tmp_path / 'ref' / RECORD.name).write_text(json.dumps(record))
    count = record['data']['num_images']
    rows = {stage['name']: default_metrics(stage, count) for stage in record['stages']
            if 'metrics' in stage and stage['kind'] != 'reference'}
    return {'recipe': 'recipes/resnet20_cifar_int8.yaml', 'isa': cpu_isa(record['env']),
            'cpu': cpu_model(record['env']), 'record': f'ref/{RECORD.name}', 'rows': rows}


def _statuses(verdicts: list[Verdict]) -> dict:
    return {(v.row, v.metric): v.status for v in verdicts}


def test_mcnemar_exact_matches_the_binomial_tail():
    before = np.ones(100, dtype=bool)
    after = before.copy()
    after[:5] = False  # 5 lost, 0 gained: 2 * 0.5**5
    assert mcnemar_exact(before, after) == (5, 0, 0.0625)
    after[5:7] = False
    after[90:] = True
    before[90:92] = False  # 7 lost, 2 gained: 2 * (1 + 9 + 36) / 512
    lost, gained, p = mcnemar_exact(before, after)
    assert (lost, gained) == (7, 2) and p == pytest.approx(92 / 512)
    assert mcnemar_exact(before, before) == (0, 0, 1.0)


def test_a_record_passes_against_itself(record, tmp_path):
    entry = _entry(record, tmp_path)
    verdicts = check_record(record, entry, root=tmp_path)
    statuses = _statuses(verdicts)
    assert set(statuses.values()) == {'pass'}
    # what the default entry gates for an int8 row
    assert {metric for row, metric in statuses if row == PT2E} == {
        'top1', 'top1_delta', 'size_mb', 'int8_weight_fraction', 'int4_weight_fraction', 'gmacs', 'params_m',
        'speedup_fp32_bs1', 'speedup_fp32_bs32'}
    paired = next(v for v in verdicts if v.row == PT2E and v.metric == 'top1')
    assert paired.judged_by.startswith('paired: lost 0, gained 0, p=1')


def test_paired_test_catches_a_drop_a_tolerance_of_half_a_point_misses(record, tmp_path):
    entry = _entry(record, tmp_path)
    stage = _stage(record, PT2E)
    count = record['data']['num_images']
    correct = unpack_bits(stage['metrics']['correct1_bits'], count).copy()
    right = np.flatnonzero(correct)
    correct[right[:30]] = False  # 30 of 10,000 images lost, none gained: 0.3 points
    stage['metrics']['correct1_bits'] = pack_bits(correct)
    stage['metrics']['top1'] = round(100 * correct.mean(), 2)
    verdict = next(v for v in check_record(record, entry, root=tmp_path) if v.row == PT2E and v.metric == 'top1')
    assert verdict.status == 'FAIL' and 'lost 30, gained 0' in verdict.judged_by
    assert abs(verdict.drift) == pytest.approx(0.3, abs=0.01)  # within a 0.5-point tolerance


def test_an_improvement_fails_too_and_xfail_holds(record, tmp_path):
    entry = _entry(record, tmp_path)
    entry['rows'][PT2E]['speedup_fp32_bs32']['tolerance'] = 0.1
    _stage(record, PT2E)['metrics']['speedup_fp32_bs32'][0] += 0.5  # faster than accepted, unexplained
    _stage(record, PT2E)['metrics']['int8_weight_fraction'] = 0.99  # one layer left in float
    statuses = _statuses(check_record(record, entry, root=tmp_path))
    assert statuses[(PT2E, 'speedup_fp32_bs32')] == 'FAIL'
    assert statuses[(PT2E, 'int8_weight_fraction')] == 'FAIL'
    entry['rows'][PT2E]['int8_weight_fraction']['xfail'] = 'known: one layer float'
    assert _statuses(check_record(record, entry, root=tmp_path))[(PT2E, 'int8_weight_fraction')] == 'xfail'


def test_a_missing_row_fails_unless_it_is_an_xfail(record, tmp_path):
    entry = _entry(record, tmp_path)
    broken = copy.deepcopy(record)
    stage = _stage(broken, 'ptq_int8[openvino]')
    del stage['metrics']
    stage['reason'] = 'the OpenVINO CPU plugin cannot compile the int8 model'
    verdicts = check_record(broken, entry, root=tmp_path)
    assert [v.status for v in verdicts if v.row == 'ptq_int8[openvino]'] == ['FAIL']
    entry['rows']['ptq_int8[openvino]'] = {'xfail': 'plugin bug'}
    assert [v.status for v in check_record(broken, entry, root=tmp_path) if v.row == 'ptq_int8[openvino]'] == ['xfail']


def test_speed_is_not_judged_when_the_timing_control_failed(record, tmp_path):
    entry = _entry(record, tmp_path)
    record['timing']['noisy'] = True
    _stage(record, PT2E)['metrics']['speedup_fp32_bs32'][0] = 9.9
    assert _statuses(check_record(record, entry, root=tmp_path))[(PT2E, 'speedup_fp32_bs32')] == 'unjudged'


def test_speed_bands_belong_to_the_cpu_model_they_were_measured_on(record, tmp_path, capsys):
    """Two CPUs of one ISA (a Zen 4 and a Xeon, both avx512_vnni) differ in int8 speedup by more than any band: on
    another model the record is judged on accuracy, size and coverage, and its speed is printed unjudged; --update
    from that CPU adds its own entry and leaves the first CPU's bands as they were."""
    entry = _entry(record, tmp_path)
    other = copy.deepcopy(record)
    other['env']['cpu']['model'] = 'Another CPU @ 2.80GHz'
    other['git_hash'] = 'abcdef123456'
    _stage(other, PT2E)['metrics']['speedup_fp32_bs32'][0] *= 0.7  # slower int8 on that CPU: not a regression
    verdicts = check_record(other, entry, root=tmp_path)
    speed = [v for v in verdicts if v.metric.startswith('speedup')]
    assert speed and {v.status for v in speed} == {'unjudged'}
    assert all(entry['cpu'] in v.judged_by for v in speed)
    assert {v.status for v in verdicts if not v.metric.startswith('speedup')} == {'pass'}
    _stage(other, PT2E)['metrics']['int8_weight_fraction'] = 0.9  # coverage is still judged there
    assert _statuses(check_record(other, entry, root=tmp_path))[(PT2E, 'int8_weight_fraction')] == 'FAIL'
    _stage(other, PT2E)['metrics']['int8_weight_fraction'] = 1.0

    reference = tmp_path / 'reference.yaml'
    reference.write_text(yaml.safe_dump({'alpha': 0.01, 'entries': [entry]}))
    path = tmp_path / 'other.json'
    path.write_text(json.dumps(other))
    assert main([str(path), '--reference', str(reference), '--update', '--why', 'the Xeon pool']) == 0
    first, added = yaml.safe_load(reference.read_text())['entries']
    assert (first['cpu'], added['cpu']) == (entry['cpu'], 'Another CPU @ 2.80GHz')
    measured = _stage(other, PT2E)['metrics']['speedup_fp32_bs32'][0]
    assert first['rows'][PT2E]['speedup_fp32_bs32']['value'] != measured
    assert added['rows'][PT2E]['speedup_fp32_bs32']['value'] == measured
    capsys.readouterr()
    assert main([str(path), '--reference', str(reference)]) == 0  # now judged against its own CPU's entry
    out = capsys.readouterr().out
    assert 'reference measured on Another CPU @ 2.80GHz' in out and 'unjudged' not in out


def test_noise_keeps_as_reference_the_first_run_whose_timing_control_passed(record, tmp_path, monkeypatch, capsys):
    import compress.check as check
    runs = []
    for index, noisy in enumerate((True, False, False)):
        run = copy.deepcopy(record)
        run['timing']['noisy'] = noisy
        _stage(run, PT2E)['metrics']['speedup_fp32_bs32'][0] = 2.0 + index / 10
        runs.append(run)
    served = iter(runs)
    monkeypatch.setattr(check, '_run_recipe', lambda recipe, overrides, out: None)
    monkeypatch.setattr(check, '_read_record', lambda path: next(served))
    entry = _entry(record, tmp_path)
    kept, suggested = check._noise([entry], 3, tmp_path, [])
    assert kept == [runs[1]]
    assert suggested[(record['recipe']['name'], PT2E, 'speedup_fp32_bs32')] == pytest.approx(0.4)  # 2 × spread 0.2
    assert '| 2.0 ' in capsys.readouterr().out  # the spread still counts every run


def test_noise_measures_only_this_cpus_entries_once_per_recipe(record, tmp_path, monkeypatch, capsys):
    import compress.check as check
    vnni, other_model, avx2 = (_entry(record, tmp_path) for _ in range(3))
    vnni['isa'], other_model['isa'], other_model['cpu'], avx2['isa'] = 'avx512_vnni', 'avx2', 'Other', 'avx2'
    reference = tmp_path / 'reference.yaml'
    reference.write_text(yaml.safe_dump({'alpha': 0.01, 'entries': [vnni, other_model, avx2]}))
    measured = []
    monkeypatch.setattr(check, '_noise', lambda entries, *args: measured.extend(entries) or ([], {}))
    monkeypatch.setattr(check, 'cpu_info', lambda: {'model': avx2['cpu'], 'flags': ['avx2']})
    assert main(['--noise', '2', '--reference', str(reference), '--out', str(tmp_path)]) == 0
    assert measured == [avx2]  # not the AVX-512 entry it cannot measure, and its recipe once, this CPU's entry
    monkeypatch.setattr(check, 'cpu_info', lambda: {'model': 'x', 'flags': ['avx512f']})
    assert main(['--noise', '2', '--reference', str(reference), '--out', str(tmp_path)]) == 2
    assert "no gate has an entry for this CPU's ISA (avx512)" in capsys.readouterr().err


def test_cli_exit_codes_and_one_line_errors(record, tmp_path, capsys):
    entry = _entry(record, tmp_path)
    reference = tmp_path / 'reference.yaml'
    reference.write_text(yaml.safe_dump({'alpha': 0.01, 'entries': [entry]}))
    good = tmp_path / 'good.json'
    good.write_text(json.dumps(record))
    assert main([str(good), '--reference', str(reference)]) == 0
    _stage(record, PT2E)['metrics']['int8_weight_fraction'] = 0.95
    bad = tmp_path / 'bad.json'
    bad.write_text(json.dumps(record))
    assert main([str(bad), '--reference', str(reference)]) == 1
    out = capsys.readouterr().out
    assert 'FAILED: 1 regression(s)' in out and 'int8_weight_fraction' in out
    # bad input: exit 2, one line naming the file
    for argv, words in (([str(good), '--reference', str(tmp_path / 'none.yaml')], 'none.yaml: no reference file'),
                        ([str(tmp_path / 'none.json'), '--reference', str(reference)], 'none.json: not a readable'),
                        ([str(good), '--reference', str(reference), '--update'], '--update needs --why'),
                        ([str(good), '--reference', str(reference), '--update', '--why', 'x'], 'uncommitted code')):
        record_dirty = json.loads(good.read_text())
        record_dirty['git_hash'] = 'abc-dirty'
        good.write_text(json.dumps(record_dirty))
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_reference_file_is_validated(tmp_path):
    path = tmp_path / 'reference.yaml'
    path.write_text('entries:\n- recipe: r.yaml\n  isa: avx2\n  rows:\n    baseline:\n      top1: {value: 80}\n')
    with pytest.raises(ValueError, match=r'entries.0.rows.baseline.top1: needs a tolerance'):
        load_reference(path)
    path.write_text('alpha: 0.01\nentrys: []\n')
    with pytest.raises(ValueError, match="unknown key 'entrys'"):
        load_reference(path)


def test_update_writes_values_keeps_tolerances_and_notes_why(record, tmp_path):
    entry = _entry(record, tmp_path)
    entry['rows'][PT2E]['size_mb']['tolerance'] = 0.123
    reference = tmp_path / 'reference.yaml'
    reference.write_text('# accepted values\n' + yaml.safe_dump({'alpha': 0.01, 'entries': [entry]}))
    record['git_hash'] = 'abcdef123456'
    record['recipe']['name'] = 'resnet20_cifar_int8'
    _stage(record, PT2E)['metrics']['size_mb'] = 0.5
    new = tmp_path / 'new.json'
    new.write_text(json.dumps(record))
    assert main([str(new), '--reference', str(reference), '--update', '--why', 'new calibration']) == 0
    text = reference.read_text()
    assert text.startswith('# accepted values')
    updated = yaml.safe_load(text)['entries'][0]
    assert updated['rows'][PT2E]['size_mb'] == {'value': 0.5, 'tolerance': 0.123}
    assert updated['updated']['commit'] == 'abcdef123456' and updated['updated']['why'] == 'new calibration'
    assert (tmp_path / updated['record']).is_file()


TINY_GATE = """
name: tiny_gate
seed: 0
model: {name: test_resnet_cifar}
data: {source: synthetic, synthetic_train: 256, synthetic_eval: 200, synthetic_calib: 64, batch_size: 32, workers: 0,
       train_augment: none}
stages:
  - {kind: train, epochs: 1, lr: 0.01}
  - {kind: ptq_int8, backend: [x86_pt2e], calib_images: 64}
eval: {throughput: false, bf16: false, eager: false, bootstrap: 100}
"""


@pytest.mark.slow
def test_a_labs_own_gate_in_three_commands(tmp_path, capsys):
    """README's user flow: a recipe put under the gate from two runs, then checked as CI would; a layer left in
    float fails it."""
    from compress.record import git_hash
    if (git_hash() or '-dirty').endswith('-dirty'):
        pytest.skip('the reference takes records of committed code only: run on a clean checkout (CI does)')
    recipe = tmp_path / 'tiny_gate.yaml'
    recipe.write_text(TINY_GATE)
    reference = tmp_path / 'gate' / 'reference.yaml'
    reference.parent.mkdir()
    common = ['--reference', str(reference), '--out', str(tmp_path / 'runs')]
    assert main(['--noise', '2', '--update', '--recipe', str(recipe), '--why', 'first reference', *common]) == 0
    entry = yaml.safe_load(reference.read_text())['entries'][0]
    assert entry['updated']['why'] == 'first reference' and (reference.parent / entry['record']).is_file()
    assert entry['rows']['ptq_int8[x86_pt2e]']['int8_weight_fraction'] == {'value': 1.0, 'tolerance': 0.0}
    capsys.readouterr()
    # (CI runs the passing case: .ci/run checks the project's own reference)
    assert main(['--run', '--set', 'stages.1.keep_float=[conv1]', *common]) == 1
    out = capsys.readouterr().out
    assert 'FAILED' in out and 'int8_weight_fraction' in out
