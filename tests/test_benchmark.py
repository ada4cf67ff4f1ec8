"""compress.benchmark: every deployed form of a model timed in one session, speedups with intervals."""
import json

import pytest

from compress.benchmark import benchmark_model, main

FAST = dict(rounds=3, min_seconds=0.02)


def is_interval(ratio) -> bool:
    return isinstance(ratio, list) and len(ratio) == 3 and 0 < ratio[1] <= ratio[0] <= ratio[2]


@pytest.mark.slow
def test_benchmark_row_has_every_form_and_named_speedups():
    row = benchmark_model('test_resnet_cifar', batch_sizes=(4,), input_size=32, **FAST)
    for form in ('fp32_eager', 'fp32_deploy', 'bf16', 'pt2e_int8', 'ov_fp32', 'ov_int8'):
        assert row[f'{form}_img_s_bs4'] > 0
    assert 'fp32_compiled_img_s_bs4' not in row  # no deploy form: "as written" is the baseline itself
    for key in ('aa_bs4', 'bf16_x_fp32_bs4', 'pt2e_int8_x_fp32_bs4', 'pt2e_int8_x_bf16_bs4', 'ov_int8_x_fp32_bs4',
                'ov_int8_x_bf16_bs4', 'ov_int8_x_ov_fp32_bs4', 'fp32_eager_x_fp32_bs4'):
        assert is_interval(row[key]), key
    assert row['pt2e_int8_w8'] == 1.0 and row['ov_int8_w8'] == 1.0 and row['params_m'] == 0.019
    assert row['nncf_model_type'] == 'default' and row['nncf_ignored_scope'] is False
    timing = row['timing']
    assert timing['control']['forms'] == ['fp32_deploy', 'fp32_deploy_aa'] and timing['load_after'] is not None
    assert row['noisy'] == timing['noisy']


@pytest.mark.slow
def test_benchmark_of_a_pruned_model_times_the_dense_one_in_the_same_rounds():
    row = benchmark_model('test_resnet_cifar', batch_sizes=(4,), input_size=32, backends=('x86_pt2e',),
                          prune_ratio=0.5, **FAST)
    # round_to=8 on 8-channel layers keeps them: only the wider inner channels go
    assert row['pruned'] == 0.5 and row['macs_kept'] < 0.8 and row['pt2e_int8_w8'] == 1.0
    assert is_interval(row['prune_x_dense_bs4']) and is_interval(row['pt2e_int8_x_dense_bs4'])
    assert row['prune_efficiency_bs4'] == pytest.approx(row['prune_x_dense_bs4'][0] * row['macs_kept'], abs=2e-3)


@pytest.mark.slow
def test_benchmark_prunes_by_macs():
    row = benchmark_model('resnet20_cifar', batch_sizes=(4,), input_size=32, backends=(), prune_ratio=0.5,
                          prune_by='macs', round_to=0, **FAST)
    assert row['pruned_by'] == 'macs' and abs(row['macs_kept'] - 0.5) <= 0.01


@pytest.mark.slow
def test_a_model_with_a_deploy_form_is_also_timed_as_written():
    row = benchmark_model('test_spartan', batch_sizes=(2,), input_size=64, backends=('openvino',), **FAST)
    assert row['fp32_compiled_img_s_bs2'] > 0 and is_interval(row['fp32_compiled_x_fp32_bs2'])
    assert row['nncf_ignored_scope'] is True and row['nncf_model_type'] == 'default'  # the family's NNCF settings


def test_unknown_model_is_one_line(capsys):
    assert main(['no_such_model']) == 2
    assert capsys.readouterr().err.strip() == "error: unknown model 'no_such_model'; see timm.list_models()"


def test_table_from_saved_rows(tmp_path, capsys):
    row = {'model': 'm', 'input': 32, 'params_m': 1.0, 'gmacs': 0.1, 'fp32_deploy_img_s_bs32': 10.0,
           'aa_bs32': [1.0, 0.98, 1.03], 'pt2e_int8_x_fp32_bs32': [2.5, 2.4, 2.61]}
    meta = {'git_hash': 'abc123', 'command': 'python -m compress.benchmark m', 'date': '2026-11-30T00:00:00+00:00',
            'env': {'cpu': {'model': 'AMD EPYC'}, 'versions': {'torch': '2.14.1'}, 'load_average': [1.0, 1.0, 1.0]},
            'load_after': [1.5, 1.1, 1.0]}
    (tmp_path / 'rows.json').write_text(json.dumps({'meta': meta, 'rows': [row]}))
    assert main(['--from-json', str(tmp_path / 'rows.json')]) == 0
    table = capsys.readouterr().out.splitlines()
    cells = [[cell.strip() for cell in line.split('|')[1:-1]] for line in table]
    assert cells[0] == ['model', 'input', 'params_m', 'gmacs', 'fp32_deploy_img_s_bs32', 'aa_bs32',
                        'pt2e_int8_x_fp32_bs32']
    assert cells[2] == ['m', '32', '1', '0.1', '10', '1.00 [0.98, 1.03]', '2.50 [2.40, 2.61]']
    assert main(['--from-json', str(tmp_path / 'rows.json'), '--columns', 'model', 'pt2e_int8_x_fp32_bs32']) == 0
    assert capsys.readouterr().out.splitlines()[2].replace(' ', '') == '|m|2.50[2.40,2.61]|'
    assert main(['--from-json', str(tmp_path / 'missing.json')]) == 2
    (tmp_path / 'old.json').write_text(json.dumps([row]))  # rows without the metadata: refused
    assert main(['--from-json', str(tmp_path / 'old.json')]) == 2
    assert 'give a file written by --json' in capsys.readouterr().err


def test_saved_table_goes_into_the_readme_between_its_markers(tmp_path, capsys):
    rows = str(tmp_path / 'rows.json')
    meta = {'git_hash': 'abc123', 'command': 'python -m compress.benchmark m', 'date': '2026-11-30T00:00:00+00:00',
            'env': {'cpu': {'model': 'AMD EPYC'}, 'versions': {'torch': '2.14.1'}, 'load_average': [1.0, 1.0, 1.0]},
            'load_after': [1.5, 1.1, 1.0]}
    (tmp_path / 'rows.json').write_text(json.dumps({'meta': meta, 'rows': [{'model': 'm', 'aa_bs32': [1, 1, 1]}]}))
    readme = tmp_path / 'README.md'
    readme.write_text(f'intro\n<!-- benchmark: {rows} -->\nold table\n<!-- end of benchmark: {rows} -->\noutro\n')
    assert main(['--from-json', rows, '--readme', str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith('intro\n') and text.endswith('outro\n') and 'old table' not in text
    assert '| m       | 1.00 [1.00, 1.00] |' in text
    assert f'Generated from `{rows}`, written by `python -m compress.benchmark m` at git abc123 on 2026-11-30' in text
    assert 'load average [1.0, 1.0, 1.0] before, [1.5, 1.1, 1.0] after' in text
    # two files, one table: every row, and each file's provenance line
    meta['git_hash'] = 'def456'
    (tmp_path / 'more.json').write_text(json.dumps({'meta': meta, 'rows': [{'model': 'n', 'aa_bs32': [1, 1, 1]}]}))
    both = f'{rows} + {tmp_path / "more.json"}'
    readme.write_text(f'<!-- benchmark: {both} -->\n<!-- end of benchmark: {both} -->\n')
    assert main(['--from-json', rows, str(tmp_path / 'more.json'), '--readme', str(readme)]) == 0
    text = readme.read_text()
    assert '| m ' in text and '| n ' in text and 'at git abc123' in text and 'at git def456' in text
    assert main(['test_resnet_cifar', '--readme', str(readme)]) == 2  # measuring and writing the README: refused
    assert 'pass --from-json FILE too' in capsys.readouterr().err


def test_the_recorded_command_names_no_folder_of_this_machine(tmp_path, monkeypatch):
    from compress.benchmark import portable_command
    monkeypatch.chdir(tmp_path)
    assert portable_command(['smt_t', '--json', str(tmp_path / 'out' / 'b.json')], str(tmp_path / 'out' / 'b.json')) \
        == 'python -m compress.benchmark smt_t --json out/b.json'
    assert portable_command(['smt_t', '--json=/elsewhere/b.json'], '/elsewhere/b.json') == \
        'python -m compress.benchmark smt_t --json=b.json'


def test_complexity_only_rows_stand_next_to_the_papers_figures(capsys):
    assert main(['mat_1', 'emsnet_xxtiny', '--complexity-only']) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
    assert [row['model'] for row in rows] == ['mat_1', 'emsnet_xxtiny']
    assert rows[0]['params_m'] == 6.655 and rows[0]['paper_params_m'] == 6.714 and rows[0]['params_m_off_pct'] == -0.9
    assert rows[1]['gmacs'] == 0.532 and rows[1]['gmacs_off_pct'] == -1.5
    assert not any(key.endswith(('_bs1', '_bs32')) for row in rows for key in row)


@pytest.mark.slow
def test_a_backend_that_cannot_take_the_model_leaves_a_reason_not_a_crash(monkeypatch):
    import compress.benchmark

    def refuse(*args, **kwargs):
        raise RuntimeError('the OpenVINO CPU plugin cannot compile the int8 model: [SomeTransformation] failed')
    monkeypatch.setattr(compress.benchmark, 'quantize_openvino', refuse)
    row = benchmark_model('test_resnet_cifar', batch_sizes=(4,), input_size=32, **FAST)
    assert row['failed'] == {'ov_int8': 'RuntimeError: the OpenVINO CPU plugin cannot compile the int8 model: '
                                        '[SomeTransformation] failed'}
    assert 'ov_int8_x_fp32_bs4' not in row and is_interval(row['pt2e_int8_x_fp32_bs4'])
