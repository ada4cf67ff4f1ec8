"""The benchmark command measures every deployed form in one process and reports int8 speedups."""
import json

from eval.benchmark import benchmark_model, main


def test_benchmark_row_has_every_form_and_ratios():
    row = benchmark_model('test_resnet_cifar', batch_sizes=(4,), input_size=32, repeats=1, min_seconds=0.05)
    for form in ('fp32_eager', 'fp32_compiled', 'pt2e_int8', 'ov_fp32', 'ov_int8'):
        assert row[f'{form}_bs4'] > 0
    assert row['pt2e_int8_speedup_bs4'] == round(row['pt2e_int8_bs4'] / row['fp32_compiled_bs4'], 2)
    assert row['pt2e_int8_weights'] == 1.0 and row['ov_int8_weights'] == 1.0
    assert row['params_m'] == 0.019


def test_unknown_model_is_one_line(capsys):
    assert main(['no_such_model']) == 2
    assert capsys.readouterr().err.strip() == "error: unknown model 'no_such_model'; see timm.list_models()"


def test_benchmark_of_a_pruned_model():
    row = benchmark_model('test_resnet_cifar', batch_sizes=(4,), input_size=32, repeats=1, min_seconds=0.05,
                          backends=('x86_pt2e',), prune_ratio=0.5)
    # round_to=8 on 8-channel layers keeps them: only the wider inner channels go
    assert row['pruned'] == 0.5 and row['macs_kept'] < 0.8 and row['pt2e_int8_weights'] == 1.0
    assert row['prune_speedup_bs4'] == round(row['fp32_compiled_bs4'] / row['dense_fp32_compiled_bs4'], 2)


def test_benchmark_prunes_by_macs():
    row = benchmark_model('resnet20_cifar', batch_sizes=(4,), input_size=32, repeats=1, min_seconds=0.05,
                          backends=(), prune_ratio=0.5, prune_by='macs', round_to=0)
    assert row['pruned_by'] == 'macs' and abs(row['macs_kept'] - 0.5) <= 0.01


def test_a_model_with_a_deploy_form_gets_its_own_fp32_row():
    row = benchmark_model('test_spartan', batch_sizes=(2,), input_size=64, repeats=1, min_seconds=0.05,
                          backends=('x86_pt2e',))
    assert row['fp32_deploy_compiled_bs2'] > 0
    assert row['fp32_deploy_compiled_speedup_bs2'] == round(row['fp32_deploy_compiled_bs2'] / row['fp32_compiled_bs2'], 2)
    assert row['pt2e_int8_vs_deploy_fp32_bs2'] == round(row['pt2e_int8_bs2'] / row['fp32_deploy_compiled_bs2'], 2)


def test_table_from_saved_rows(tmp_path, capsys):
    row = {'model': 'm', 'input': 32, 'params_m': 1.0, 'gmacs': 0.1, 'fp32_compiled_bs32': 10.0,
           'pt2e_int8_speedup_bs32': 2.5}
    (tmp_path / 'rows.json').write_text(json.dumps([row]))
    assert main(['--from-json', str(tmp_path / 'rows.json')]) == 0
    table = capsys.readouterr().out.splitlines()
    cells = [[cell.strip() for cell in line.split('|')[1:-1]] for line in table]
    assert cells[0] == ['model', 'input', 'params_m', 'gmacs', 'fp32_compiled_bs32', 'pt2e_int8_speedup_bs32']
    assert cells[2] == ['m', '32', '1', '0.1', '10', '2.5']
    assert main(['--from-json', str(tmp_path / 'rows.json'), '--columns', 'model', 'pt2e_int8_speedup_bs32']) == 0
    assert capsys.readouterr().out.splitlines()[2].replace(' ', '') == '|m|2.5|'
    assert main(['--from-json', str(tmp_path / 'missing.json')]) == 2
