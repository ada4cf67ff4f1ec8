"""The regression gate: compare runs against the accepted values in ``results/reference.yaml``.

``python -m compress.check --run`` runs every gated recipe (``--only NAME`` for some) and compares its record;
``python -m compress.check RECORD.json ...`` compares records made elsewhere. It prints one line per checked value
(reference, measured, drift, how it was judged, pass/FAIL) and exits 1 when a value regressed, 2 on bad input.

Every value is judged two-sided: an unexplained improvement fails as a drop does, so the reference stays true
(change it with ``--update``). How a value is judged is part of its entry:

* ``tolerance: T``: pass when ``|measured - value| <= T``. Speedups compare the median of the run's per-round
  ratios (the run's interval is printed next to it); when the run's A/A control failed its speed is not judged.
* ``judge: paired`` (top-1): an exact McNemar test on the per-image correctness stored in the reference record and
  in the new one, the same images: it fails when the two disagree on more images in one direction than chance
  allows (p < ``alpha``). Far more sensitive than a tolerance on a small evaluation set.
* ``xfail: REASON`` on a value or a whole row: checked and printed, never fails the gate.

References are kept per CPU ISA (``avx512_vnni``, ``amx``, ``avx2``, ...; read from the record's CPU flags): int8
speed and even int8 rounding differ between instruction sets. Speed bands belong to the CPU model they were measured
on (an entry's ``cpu``): two CPUs of one ISA differ in int8 speedup by more than any tolerance, so on another model
the record is judged against its ISA's entry for everything but speed, which is printed unjudged with the reason.

``--update --why TEXT`` writes the measured values of records made by committed code into the reference (tolerances
kept; a new entry gets the default tolerances below; a new CPU model of a known ISA gets its own entry with the
rules of that ISA's), copies the records under ``results/reference/`` for later paired tests and notes when, from
which commit and why. ``--noise N`` runs each gated recipe N times and prints the spread of every value with the
tolerance it suggests (twice the spread, never below the entry's own); with ``--update`` it writes those tolerances:
they are set from measured run-to-run noise, not guessed.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from compress.launch import launch
from compress.record import cpu_info, cpu_isa
from eval.tables import RecordError, read_record

__all__ = ['cpu_isa', 'cpu_model', 'check_record', 'Verdict', 'default_metrics', 'load_reference', 'main']

REFERENCE = 'results/reference.yaml'
ALPHA = 0.01
QUANTIZED_KINDS = ('ptq_int8', 'qat_int8', 'weight_4bit')


class GateError(ValueError):
    """A problem with the reference file, the records or the command line: one line, exit code 2."""


def cpu_model(env: dict) -> str:
    """The CPU's model name as the record read it: the key of an entry's speed bands."""
    return env.get('cpu', {}).get('model') or 'unknown'


def _speed_keys(metrics: dict) -> list[str]:
    return sorted(key for key in metrics if key.startswith('speedup_fp32_bs'))


def default_metrics(stage: dict, num_images: int) -> dict:
    """The values a new reference entry gates for one row, with starting tolerances (``--noise`` measures better ones):
    top-1 by the paired test; its delta within two images' worth; size within 1 %; the int8 / 4-bit weight
    fractions exactly (coverage is deterministic); GMACs and params within 0.5 % (pruning); speedups within 15 %."""
    metrics = stage['metrics']
    entry = {}
    if metrics.get('top1') is not None and metrics.get('correct1_bits'):
        entry['top1'] = {'value': metrics['top1'], 'judge': 'paired'}
    if metrics.get('top1_delta') is not None:
        entry['top1_delta'] = {'value': metrics['top1_delta'], 'tolerance': round(200 / num_images, 2)}
    if metrics.get('size_mb') is not None:
        entry['size_mb'] = {'value': metrics['size_mb'], 'tolerance': round(0.01 * metrics['size_mb'], 4)}
    if stage.get('kind') in QUANTIZED_KINDS:
        for key in ('int8_weight_fraction', 'int4_weight_fraction'):
            entry[key] = {'value': metrics.get(key, 0.0), 'tolerance': 0.0}
    if stage.get('kind') == 'prune' or (stage.get('kind') != 'baseline' and metrics.get('gmacs') is not None):
        for key in ('gmacs', 'params_m'):
            if metrics.get(key) is not None:
                entry[key] = {'value': metrics[key], 'tolerance': round(0.005 * metrics[key], 4)}
    for key in _speed_keys(metrics):
        entry[key] = {'value': metrics[key][0], 'tolerance': round(0.15 * metrics[key][0], 2)}
    return entry


@dataclass
class Verdict:
    gate: str
    row: str
    metric: str
    reference: object
    measured: object
    drift: float | None
    judged_by: str
    status: str  # pass, FAIL, xfail, xpass, unjudged

    @property
    def failed(self) -> bool:
        return self.status == 'FAIL'


def load_reference(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise GateError(f'{path}: no reference file; make one with --update --why TEXT from a run of your recipe')
    try:
        reference = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise GateError(f'{path}: not valid YAML ({str(error).splitlines()[0]}); fix the file') from None
    if not isinstance(reference, dict) or not isinstance(reference.get('entries', []), list):
        raise GateError(f'{path}: expected a mapping with a list under "entries"')
    unknown = set(reference) - {'alpha', 'entries'}
    if unknown:
        raise GateError(f'{path}: unknown key {sorted(unknown)[0]!r}; the keys are alpha and entries')
    for index, entry in enumerate(reference.get('entries', [])):
        where = f'{path}: entries.{index}'
        if not isinstance(entry, dict) or 'recipe' not in entry or 'isa' not in entry:
            raise GateError(f'{where}: each entry needs recipe and isa')
        extra = set(entry) - {'recipe', 'name', 'overrides', 'isa', 'cpu', 'record', 'updated', 'rows'}
        if extra:
            raise GateError(f'{where}: unknown key {sorted(extra)[0]!r}')
        for row, values in (entry.get('rows') or {}).items():
            if not isinstance(values, dict):
                raise GateError(f'{where}.rows.{row}: expected a mapping of metric to value/tolerance or xfail')
            for metric, rule in values.items():
                if metric == 'xfail':
                    continue
                if not isinstance(rule, dict) or not ({'value', 'xfail'} & set(rule)):
                    raise GateError(f'{where}.rows.{row}.{metric}: give value with tolerance or judge: paired, '
                                    f'or xfail: REASON')
                if 'value' in rule and 'tolerance' not in rule and rule.get('judge') != 'paired':
                    raise GateError(f'{where}.rows.{row}.{metric}: needs a tolerance (or judge: paired for top1)')
    return reference


def _entry_name(entry: dict) -> str:
    return entry.get('name') or Path(entry['recipe']).stem


def _measured(metrics: dict, metric: str):
    value = metrics.get(metric)
    return value[0] if isinstance(value, list) else value


def _shown(metrics: dict, metric: str) -> str:
    value = metrics.get(metric)
    if isinstance(value, list):
        return f'{value[0]} [{value[1]}, {value[2]}]'
    return '' if value is None else str(value)


def _paired_verdict(stage: dict, rule: dict, reference_stage: dict | None, count: int, alpha: float):
    from eval.stats import mcnemar_exact, unpack_bits
    metrics = stage['metrics']
    if not reference_stage or not reference_stage.get('metrics', {}).get('correct1_bits'):
        raise GateError('a paired check needs the reference record with per-image results (the entry\'s record); '
                        'run --update again')
    lost, gained, p = mcnemar_exact(unpack_bits(reference_stage['metrics']['correct1_bits'], count),
                                    unpack_bits(metrics['correct1_bits'], count))
    return f'paired: lost {lost}, gained {gained}, p={p:.2g} (fail < {alpha})', p >= alpha


def check_record(record: dict, entry: dict, alpha: float = ALPHA, root: Path = Path('results')) -> list[Verdict]:
    """Judge one record against its reference entry: one verdict per gated value. ``root`` is the folder of the
    reference file, which the entry's record path is relative to."""
    gate = _entry_name(entry)
    stages = {stage['name']: stage for stage in record['stages']}
    reference_record = None
    if entry.get('record'):
        record_path = root / entry['record']
        if not record_path.is_file():
            raise GateError(f'{entry["record"]}: the reference record of {gate} is missing; restore it or --update')
        reference_record = json.loads(record_path.read_text())
    count = record['data']['num_images']
    if reference_record and reference_record['data']['num_images'] != count:
        theirs = reference_record['data']['num_images']
        raise GateError(f'{gate}: the record evaluated {count} images, the reference {theirs}; run the gate recipe '
                        f'unchanged')
    noisy = bool((record.get('timing') or {}).get('noisy'))  # no timing session: throughput off
    other_cpu = entry.get('cpu') not in (None, cpu_model(record['env']))
    verdicts = []
    for row, rules in (entry.get('rows') or {}).items():
        stage = stages.get(row)
        row_xfail = rules.get('xfail')
        if stage is None or 'metrics' not in stage:
            why = (stage or {}).get('reason', 'no such row in the record')
            verdicts.append(Verdict(gate, row, '(row)', 'present', f'missing: {why}', None,
                                    f'xfail: {row_xfail}' if row_xfail else 'row must exist',
                                    'xfail' if row_xfail else 'FAIL'))
            continue
        metrics = stage['metrics']
        for metric, rule in rules.items():
            if metric == 'xfail':
                continue
            xfail = rule.get('xfail') or row_xfail
            measured = _measured(metrics, metric)
            reference_value = rule.get('value')
            drift = (round(measured - reference_value, 4)
                     if isinstance(measured, (int, float)) and isinstance(reference_value, (int, float)) else None)
            if measured is None:
                judged_by, ok = 'value must exist', False
            elif rule.get('judge') == 'paired':
                judged_by, ok = _paired_verdict(stage, rule, (reference_record and {
                    s['name']: s for s in reference_record['stages']}.get(row)), count, alpha)
            elif reference_value is None:
                judged_by, ok = 'no accepted value', False
            elif metric.startswith('speedup') and other_cpu:
                verdicts.append(Verdict(gate, row, metric, reference_value, _shown(metrics, metric), drift,
                                        f'not judged: band from {entry["cpu"]}; --update adds this CPU\'s',
                                        'unjudged'))
                continue
            elif metric.startswith('speedup') and noisy:
                verdicts.append(Verdict(gate, row, metric, reference_value, _shown(metrics, metric), drift,
                                        'not judged: the run\'s A/A timing control failed', 'unjudged'))
                continue
            else:
                judged_by, ok = f'±{rule["tolerance"]}', abs(drift) <= rule['tolerance'] + 1e-9
            if xfail:
                status, judged_by = ('xpass' if ok else 'xfail'), f'xfail: {xfail}'
            else:
                status = 'pass' if ok else 'FAIL'
            verdicts.append(Verdict(gate, row, metric, reference_value, _shown(metrics, metric), drift, judged_by,
                                    status))
    return verdicts


def _run_recipe(recipe: str, overrides: list[str], out: Path) -> Path:
    logs = out / 'logs'  # one per run: --noise runs a recipe several times into the same folder
    logs.mkdir(parents=True, exist_ok=True)
    handle, log = tempfile.mkstemp(dir=logs, prefix=f'{Path(recipe).stem}-', suffix='.log')
    os.close(handle)
    launched = launch(recipe, [*overrides, f'output.dir={out}'], Path(log))
    if launched.code == 2:
        raise GateError(f'{recipe}: {launched.error.removeprefix("error: ")}')
    if launched.code != 0 or launched.record is None:
        raise RuntimeError(f'{recipe} failed (exit {launched.code}): {launched.error} (log: {log})')
    return launched.record


def _read_record(path: str | Path) -> dict:
    try:
        return read_record(path)
    except RecordError as error:
        raise GateError(str(error)) from None


def _entries_for(reference: dict, record: dict) -> tuple[list[dict], list[dict]]:
    """The entries for the record's recipe and ISA: those measured on the record's CPU model (or on no named
    CPU), and all of them."""
    isa, model = cpu_isa(record['env']), cpu_model(record['env'])
    name = record['recipe']['name']
    matches = [entry for entry in reference.get('entries', []) if entry['isa'] == isa and _recipe_name(entry) == name]
    return [entry for entry in matches if entry.get('cpu') in (None, model)], matches


def _entry_for(reference: dict, record: dict) -> dict | None:
    """The entry that judges the record: the one measured on its CPU model, else one of another model of its ISA."""
    ours, matches = _entries_for(reference, record)
    return (ours or matches or [None])[0]


def _recipe_name(entry: dict) -> str:
    if '_recipe_name' not in entry:
        from compress.config import RecipeError, load_recipe
        try:
            entry['_recipe_name'] = load_recipe(entry['recipe'], list(entry.get('overrides') or [])).name
        except RecipeError as error:
            raise GateError(f'{entry["recipe"]}: {error}') from None
    return entry['_recipe_name']


def _print(verdicts: list[Verdict]) -> None:
    from tabulate import tabulate
    rows = [[v.gate, v.row, v.metric, v.reference, v.measured, '' if v.drift is None else f'{v.drift:+g}',
             v.judged_by, v.status] for v in verdicts]
    print(tabulate(rows, headers=['gate', 'row', 'metric', 'reference', 'measured', 'drift', 'judged by', 'status'],
                   tablefmt='github', disable_numparse=True))
    failed = sum(v.failed for v in verdicts)
    counts = {status: sum(v.status == status for v in verdicts) for status in ('pass', 'xfail', 'xpass', 'unjudged')}
    summary = ', '.join(f'{n} {status}' for status, n in counts.items() if n)
    print(f'\n{"FAILED" if failed else "passed"}: {failed} regression(s); {summary}')


def _new_entry(record: dict, recipe: str, overrides: list[str]) -> dict:
    """A reference entry for a recipe not yet under the gate: every row of its record with the default values."""
    count = record['data']['num_images']
    rows = {stage['name']: default_metrics(stage, count) for stage in record['stages']
            if 'metrics' in stage and stage.get('kind') != 'reference'}
    return {'recipe': recipe, 'overrides': list(overrides), 'isa': cpu_isa(record['env']),
            'cpu': cpu_model(record['env']), 'rows': rows}


def _update(reference: dict, path: Path, records: list[dict], why: str, recipes: dict[str, tuple[str, list]],
            tolerances: dict | None = None) -> None:
    """Write the records' values into the reference (tolerances, judges and xfails kept), copy the records under
    results/reference/, note when, from which commit and why; then write the file atomically."""
    for record in records:
        commit = record.get('git_hash') or ''
        if not commit or commit.endswith('-dirty'):
            raise GateError(f'{record["_path"]}: made by uncommitted code ({commit or "no git hash"}); commit, run '
                            f'again, then update: the reference must be reproducible')
    for record in records:
        ours, matches = _entries_for(reference, record)
        name = record['recipe']['name']
        entry = ours[0] if ours else None
        if entry is None and matches:
            # another CPU model of this ISA: its speed bands stay; this CPU gets an entry with the same rules
            entry = {**copy.deepcopy({k: v for k, v in matches[0].items() if k != 'record'}),
                     'cpu': cpu_model(record['env'])}
            reference['entries'].append(entry)
        elif entry is None:
            if name not in recipes:
                raise GateError(f'{record["_path"]}: no entry for recipe {name} on {cpu_isa(record["env"])}; give '
                                f'--recipe with the recipe file to add one')
            entry = _new_entry(record, *recipes[name])
            reference.setdefault('entries', []).append(entry)
        stages = {stage['name']: stage for stage in record['stages']}
        for row, rules in entry['rows'].items():
            metrics = stages.get(row, {}).get('metrics')
            if metrics is None:
                continue  # a missing row keeps its rule (usually an xfail with its reason)
            for metric, rule in rules.items():
                if metric != 'xfail' and _measured(metrics, metric) is not None:
                    rule['value'] = _measured(metrics, metric)
                if (name, row, metric) in (tolerances or {}):
                    rule['tolerance'] = tolerances[(name, row, metric)]
        target = path.parent / 'reference' / name / Path(record['_path']).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(record['_path'], target)
        entry['record'] = os.path.relpath(target, path.parent)
        entry['cpu'] = cpu_model(record['env'])
        entry['updated'] = {'when': dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
                            'commit': record['git_hash'], 'why': why}
    body = {'alpha': reference.get('alpha', ALPHA),
            'entries': [{k: v for k, v in entry.items() if not k.startswith('_')} for entry in reference['entries']]}
    header = ''.join(line for line in (path.read_text().splitlines(keepends=True) if path.is_file() else [])
                     if line.startswith('#'))
    temporary = path.with_suffix('.yaml.tmp')
    temporary.write_text(header + yaml.safe_dump(body, sort_keys=False, width=120))
    temporary.replace(path)
    print(f'updated {path} from {len(records)} record(s): {why}')


def _noise(entries: list[dict], repeats: int, out: Path, extra: list[str]) -> tuple[list[dict], dict]:
    """Run each entry's recipe ``repeats`` times; print the spread of every gated value and the tolerance it
    suggests: twice the spread, never below the entry's own. Returns per entry the record to keep as its reference
    (the first whose A/A timing control passed, else the first: a speed band is best taken from a quiet run) and the
    suggested tolerances, keyed by (recipe name, row, metric)."""
    from tabulate import tabulate
    rows, firsts, suggested = [], [], {}
    for entry in entries:
        records = []
        for attempt in range(repeats):
            print(f'running {entry["recipe"]} ({attempt + 1}/{repeats})', file=sys.stderr, flush=True)
            records.append(_read_record(_run_recipe(entry['recipe'], list(entry.get('overrides') or []) + extra,
                                                    out)))
        firsts.append(next((r for r in records if not (r.get('timing') or {}).get('noisy')), records[0]))
        if entry.get('rows') is None:  # a recipe new to the gate: its rows and starting tolerances from its first run
            entry.update(_new_entry(records[0], entry['recipe'], entry.get('overrides') or []))
        for row, rules in (entry.get('rows') or {}).items():
            for metric, rule in rules.items():
                if metric == 'xfail':
                    continue
                values = [_measured({s['name']: s for s in r['stages']}.get(row, {}).get('metrics', {}), metric)
                          for r in records]
                values = [v for v in values if isinstance(v, (int, float))]
                if not values:
                    continue
                spread = round(max(values) - min(values), 4)
                tolerance = rule.get('tolerance')
                if tolerance is not None:
                    tolerance = max(tolerance, round(2 * spread, 4))
                    suggested[(records[0]['recipe']['name'], row, metric)] = tolerance
                rows.append([_entry_name(entry), row, metric, min(values), max(values), spread,
                             'paired' if tolerance is None else tolerance])
    print(tabulate(rows, headers=['gate', 'row', 'metric', 'min', 'max', 'spread', 'suggested tolerance'],
                   tablefmt='github', disable_numparse=True))
    commits = sorted({record.get('git_hash') or '?' for record in firsts})
    print(f'\n{repeats} runs per gate, at git {", ".join(commits)}')
    return firsts, suggested


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m compress.check', description=__doc__.splitlines()[0])
    parser.add_argument('records', nargs='*', help='run records to check (default with --run: run the recipes)')
    parser.add_argument('--reference', default=REFERENCE, help=f'accepted values (default {REFERENCE})')
    parser.add_argument('--run', action='store_true', help='run every gated recipe, then check its record')
    parser.add_argument('--only', action='append', default=[], help='gate name (recipe file stem); repeatable')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='an override added to every recipe run (e.g. to see what a change does)')
    parser.add_argument('--out', help='folder for the records of --run / --noise (default: a temporary folder)')
    parser.add_argument('--update', action='store_true', help='write the measured values into the reference')
    parser.add_argument('--why', help='with --update: the reason, stored with the entry')
    parser.add_argument('--recipe', action='append', default=[], metavar='RECIPE.yaml',
                        help='with --update: a recipe to put under the gate (a new entry)')
    parser.add_argument('--noise', type=int, metavar='N', help='run each gate N times and print the spread')
    args = parser.parse_args(argv)
    try:
        return _main(args)
    except GateError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2


def _main(args) -> int:
    path = Path(args.reference)
    if args.update and not args.why:
        raise GateError('--update needs --why "the reason" (it is stored with the reference)')
    if args.recipe and not args.update:
        raise GateError('--recipe adds a recipe to the gate: use it with --update --why TEXT')
    reference = load_reference(path) if path.is_file() or not (args.update and args.recipe) else {'entries': []}
    entries = [entry for entry in reference.get('entries', [])
               if not args.only or _entry_name(entry) in args.only]
    if args.only and not entries and not args.recipe:
        names = sorted({_entry_name(e) for e in reference.get('entries', [])})
        raise GateError(f'--only {args.only[0]}: no such gate; the gates are {", ".join(names)}')
    recipes = {}
    for recipe in args.recipe:
        from compress.config import RecipeError, load_recipe
        try:
            recipes[load_recipe(recipe, args.set).name] = (recipe, list(args.set))
        except RecipeError as error:
            raise GateError(f'{recipe}: {error}') from None
    out = Path(args.out) if args.out else None
    if out is None and (args.noise or (not args.records and (args.run or args.recipe))):
        # records that may become references keep the folder they were written to: a relative one names no machine
        out = (Path(os.path.relpath(tempfile.mkdtemp(prefix='.compress-check-', dir='.'))) if args.update
               else Path(tempfile.mkdtemp(prefix='compress-check-')))
    if args.noise:
        if args.records:
            raise GateError('--noise runs the gated recipes itself: give no records')
        new = [{'recipe': recipe, 'overrides': overrides, 'rows': None} for recipe, overrides in recipes.values()]
        here = {'cpu': cpu_info()}
        # only this CPU's entries can be measured here: one per recipe, the one of this CPU model first
        ours: dict = {}
        for entry in sorted((e for e in entries if e['isa'] == cpu_isa(here)),
                            key=lambda e: e.get('cpu') != cpu_model(here)):
            ours.setdefault((entry['recipe'], tuple(entry.get('overrides') or [])), entry)
        if not new and not ours:
            raise GateError(f'--noise: no gate has an entry for this CPU\'s ISA ({cpu_isa(here)}); add one with '
                            f'--update --recipe RECIPE.yaml --why TEXT')
        firsts, suggested = _noise(new or list(ours.values()), args.noise, out, args.set)
        if args.update:
            reference.setdefault('entries', []).extend(
                {**entry, 'isa': cpu_isa(record['env']), 'cpu': cpu_model(record['env'])}
                for entry, record in zip(new, firsts))
            _update(reference, path, firsts, args.why, recipes, suggested)
        return 0
    if args.records:
        records = [_read_record(p) for p in args.records]
    elif args.run or args.recipe:
        records = []
        seen = set()
        # adding a recipe runs only that one: the gates already accepted keep their reference
        todo = list(recipes.values()) or [(e['recipe'], list(e.get('overrides') or [])) for e in entries]
        for recipe, overrides in todo:
            if (recipe, tuple(overrides)) in seen:
                continue  # one entry per ISA may name the same recipe: it runs once
            seen.add((recipe, tuple(overrides)))
            print(f'running {recipe} {" ".join(overrides + args.set)}'.rstrip(), file=sys.stderr, flush=True)
            records.append(_read_record(_run_recipe(recipe, overrides + args.set, out)))
    else:
        raise GateError('nothing to check: give records, or --run to run the gated recipes')
    if args.update:
        _update(reference, path, records, args.why, recipes)
        return 0
    verdicts = []
    alpha = float(reference.get('alpha', ALPHA))
    for record in records:
        entry = _entry_for(reference, record)
        if entry is None:
            isa = cpu_isa(record['env'])
            verdicts.append(Verdict(record['recipe']['name'], '(record)', '(reference)', f'isa {isa}', 'no entry',
                                    None, 'add one: --update --recipe R --why TEXT', 'FAIL'))
            continue
        verdicts.extend(check_record(record, entry, alpha, root=path.parent))
        print(f'{record["recipe"]["name"]}: run on {cpu_model(record["env"])} ({cpu_isa(record["env"])}); '
              f'reference measured on {entry.get("cpu", "an unnamed CPU")} ({entry["isa"]})')
    _print(verdicts)
    return 1 if any(v.failed for v in verdicts) else 0


if __name__ == '__main__':
    sys.exit(main())
