"""Studies: a grid of models × recipes, one run record per cell, resumable, and paper outputs from the records.

    python -m compress.study STUDY.yaml [--out DIR] [--models A,B] [--recipes X,Y] [--set KEY=VALUE] [--dry-run]
    python -m compress.study STUDY.yaml --report [DIR]

A study YAML names models and recipes (or several such ``grids``), overrides for every cell, per model, per
recipe and per cell, and the folder of the records. Every cell's recipe with its overrides is validated by the
recipe loader (:func:`compress.config.load_recipe`, :func:`compress.config.check_inputs`) before any cell runs:
a problem is one line naming the study file, the cell and the key, exit code 2, and no file written.

Each cell runs as ``python compress/run.py RECIPE key=value ... name=<cell id> output.dir=<runs>`` (the same code
path users run; ``launcher: accelerate`` runs ``accelerate launch`` instead), one at a time, its output in
``<runs>/logs/<cell id>.log``. Its record lands in ``<runs>/<cell id>/``. A cell whose newest record was made
from the same resolved recipe is done and skipped, so a killed study resumes where it stopped (and a killed cell
resumes after its last finished stage, as every run does); a cell whose recipe or overrides changed runs again.
A failing cell is reported and the study goes on; the failures are listed at the end (exit code 1).
``--report`` writes the paper outputs (:mod:`eval.paper`) from the records.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compress.config import RecipeConfig, RecipeError, _build, check_inputs, first_line, load_recipe
from compress.launch import launch, launch_command

__all__ = ['StudyConfig', 'Cell', 'load_study', 'select', 'cell_status', 'run_study', 'main']

MANIFEST = 'study.json'
LAUNCHERS = ('python', 'accelerate')
_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')
SEPARATOR = '__'  # cell id = <model id>__<recipe id>: a valid recipe name (no "/") and a folder name


@dataclass
class ModelEntry:
    name: str | None = field(default=None, metadata={'help': 'model.name of its cells (default: the entry key)'})
    overrides: list[str] = field(default_factory=list, metadata={'help': 'key=value for every cell of this model'})


@dataclass
class RecipeEntry:
    recipe: str = field(metadata={'help': 'recipe file, relative to the folder the study is run from'})
    overrides: list[str] = field(default_factory=list, metadata={'help': 'key=value for every cell of this recipe'})
    points: dict = field(default_factory=dict, metadata={
        'help': 'method label -> row of the record that the paper outputs plot and tabulate; default: the rows '
                'of the last stage (the baseline when there is none)'})


@dataclass
class GridConfig:
    models: dict = field(default_factory=dict, metadata={'help': 'model id -> {name, overrides} (or nothing)'})
    recipes: dict = field(default_factory=dict, metadata={'help': 'recipe id -> {recipe, overrides, points}'})


@dataclass
class StudyConfig:
    name: str
    description: str = ''
    runs: str | None = field(default=None, metadata={'help': 'records folder; default results/studies/<name>/runs'})
    report: str | None = field(default=None, metadata={'help': 'paper outputs; default results/studies/<name>'})
    launcher: str = field(default='python', metadata={'help': 'python (compress/run.py) or accelerate (launch)'})
    launch_args: list[str] = field(default_factory=list, metadata={'help': 'accelerate launch options'})
    overrides: list[str] = field(default_factory=list, metadata={'help': 'key=value for every cell'})
    models: dict = field(default_factory=dict, metadata={'help': 'the grid, when there is one'})
    recipes: dict = field(default_factory=dict, metadata={'help': 'the grid, when there is one'})
    grids: list[GridConfig] = field(default_factory=list, metadata={'help': 'several grids (e.g. one per data set)'})
    cells: dict = field(default_factory=dict, metadata={'help': 'cell id -> key=value list for that cell only'})
    exclude: list[str] = field(default_factory=list, metadata={'help': 'cell ids left out of the grid'})


@dataclass
class Cell:
    """One (model, recipe) run of a study: its id, what it runs and which rows of its record are plotted."""
    id: str
    model: str
    recipe: str
    recipe_path: str
    overrides: list[str]
    points: dict
    config: RecipeConfig | None = None

    def manifest(self) -> dict:
        return {'id': self.id, 'model': self.model, 'recipe': self.recipe, 'recipe_path': self.recipe_path,
                'overrides': self.overrides, 'points': self.points}


# --- reading and validating a study ------------------------------------------------------------------------------

def _entry(cls, value, key: str):
    if value is None:
        value = {}
    if isinstance(value, str):  # a model's timm name, or a recipe file, with nothing to override
        value = {'recipe' if cls is RecipeEntry else 'name': value}
    if not isinstance(value, dict):
        raise RecipeError(f'{key}: expected a mapping ({", ".join(cls.__dataclass_fields__)}), got {value!r}')
    return _build(cls, value, key)


def _check_id(value: str, key: str) -> None:
    if not isinstance(value, str) or not _ID.match(value) or SEPARATOR in value:
        raise RecipeError(f'{key}: {value!r} is not a usable id; use letters, digits, "_", "-", "." (no "{SEPARATOR}")')


def _check_overrides(values: list[str], key: str) -> None:
    for i, value in enumerate(values):
        if '=' not in value or value.startswith(('-', '=')):
            raise RecipeError(f'{key}[{i}]: {value!r} is not key=value, e.g. eval.rounds=9')


def _grids(study: StudyConfig) -> list[tuple[str, dict, dict]]:
    if study.grids and (study.models or study.recipes):
        raise RecipeError('grids: give either models + recipes or grids, not both')
    if not study.grids:
        return [('', study.models, study.recipes)]
    return [(f'grids[{i}].', grid.models, grid.recipes) for i, grid in enumerate(study.grids)]


def _cells(study: StudyConfig) -> list[Cell]:
    cells, seen = [], {}
    for prefix, models, recipes in _grids(study):
        if not models or not recipes:
            raise RecipeError(f'{prefix}models: a grid needs at least one model and one recipe')
        model_entries = {}
        for model_id, value in models.items():
            _check_id(model_id, f'{prefix}models')
            model_entries[model_id] = _entry(ModelEntry, value, f'{prefix}models.{model_id}')
            _check_overrides(model_entries[model_id].overrides, f'{prefix}models.{model_id}.overrides')
        for recipe_id, value in recipes.items():
            _check_id(recipe_id, f'{prefix}recipes')
            entry = _entry(RecipeEntry, value, f'{prefix}recipes.{recipe_id}')
            _check_overrides(entry.overrides, f'{prefix}recipes.{recipe_id}.overrides')
            for label, row in entry.points.items():
                if not isinstance(label, str) or not isinstance(row, str) or not label or not row:
                    raise RecipeError(f'{prefix}recipes.{recipe_id}.points: map a method label to a row name, e.g. '
                                      f"'int8 PT2E': 'ptq_int8[x86_pt2e]'")
            for model_id, model in model_entries.items():
                cell_id = f'{model_id}{SEPARATOR}{recipe_id}'
                if cell_id in seen:
                    raise RecipeError(f'{prefix}models.{model_id}: cell {cell_id} is also made by {seen[cell_id]}; '
                                      f'give the model or the recipe another id')
                seen[cell_id] = f'{prefix}recipes.{recipe_id}'
                overrides = [*study.overrides, *entry.overrides, f'model.name={model.name or model_id}',
                             *model.overrides]
                cells.append(Cell(cell_id, model_id, recipe_id, entry.recipe, overrides, dict(entry.points)))
    ids = {cell.id for cell in cells}
    for key, listed in (('cells', list(study.cells)), ('exclude', study.exclude)):
        for cell_id in listed:
            if cell_id not in ids:
                raise RecipeError(f'{key}: {cell_id!r} is no cell of the grid; cell ids are '
                                  f'<model>{SEPARATOR}<recipe>, e.g. {next(iter(ids))}')
    for cell_id, values in study.cells.items():
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise RecipeError(f'cells.{cell_id}: expected a list of key=value overrides')
        _check_overrides(values, f'cells.{cell_id}')
    for cell in cells:
        cell.overrides += study.cells.get(cell.id, [])
    return [cell for cell in cells if cell.id not in study.exclude]


def _row_names(cfg: RecipeConfig) -> set[str] | None:
    """The rows a recipe can make, for checking ``points`` before anything runs (None: cannot tell)."""
    names = {'baseline'} | ({'baseline[bf16]'} if cfg.eval.bf16 else set())
    names |= {f'control[{control}]' for control in cfg.controls}
    for stage in cfg.stages:
        backends = getattr(stage, 'backend', None) or getattr(stage, 'formats', None)
        if isinstance(backends, str):
            backends = [backends]
        names |= {f'{stage.kind}[{b}]' for b in backends} if backends else {stage.kind}
    return names


def load_study(path: str | os.PathLike, runs: str | None = None,
               extra: list[str] | None = None) -> tuple[StudyConfig, list[Cell], Path]:
    """Read and validate a study and every cell of it.

    Args:
        path: the study YAML.
        runs: records folder, instead of the study's ``runs``.
        extra: key=value overrides for every cell, applied last (``--set``).

    Returns:
        (study, every cell with its validated recipe, records folder).

    Raises:
        RecipeError: one line naming the file, the cell and the key, with the fix.
    """
    path = Path(path)
    where = str(path)
    try:
        if not path.is_file():
            raise RecipeError('study not found; pass a study YAML such as recipes/studies/seed_backbones.yaml')
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            mark = getattr(error, 'problem_mark', None)
            raise RecipeError(f'{"line " + str(mark.line + 1) + " " if mark else ""}is not valid YAML '
                              f'({getattr(error, "problem", error)})') from None
        if not isinstance(data, dict):
            raise RecipeError('a study is a YAML mapping with name, models and recipes (or grids)')
        for holder in [data, *(g for g in data.get('grids') or [] if isinstance(g, dict))]:
            if isinstance(holder.get('models'), list) and all(isinstance(m, str) for m in holder['models']):
                holder['models'] = dict.fromkeys(holder['models'])  # a list of model names: nothing to override
        study = _build(StudyConfig, data, '')
        _check_id(study.name, 'name')
        if study.launcher not in LAUNCHERS:
            raise RecipeError(f'launcher: must be one of {", ".join(LAUNCHERS)}')
        _check_overrides(study.overrides, 'overrides')
        _check_overrides(extra or [], '--set')
        cells = _cells(study)
        for cell in cells:
            cell.overrides += extra or []
        if not cells:
            raise RecipeError('exclude: no cell left to run')
    except RecipeError as error:
        raise RecipeError(f'{where}: {error}') from None
    runs_dir = Path(runs or study.runs or f'results/studies/{study.name}/runs')
    import timm

    import compress.models  # noqa: F401  (registers our backbones with timm)
    for cell in cells:
        context = f'{where}: cell {cell.id} ({cell.recipe_path})'
        try:
            cfg = load_recipe(cell.recipe_path, [*cell.overrides, f'name={cell.id}', f'output.dir={runs_dir}'])
            if not timm.models.is_model(cfg.model.name):
                raise RecipeError(f'model.name: unknown model {cfg.model.name!r}; see timm.list_models() or '
                                  f'compress.models')
            check_inputs(cfg)
        except RecipeError as error:
            raise RecipeError(f'{context}: {error}') from None
        known = _row_names(cfg)
        for label, row in cell.points.items():
            if row not in known:
                raise RecipeError(f'{context}: points.{label}: this recipe makes no row {row!r}; its rows are '
                                  f'{", ".join(sorted(known))}')
        cell.config = cfg
    return study, cells, runs_dir


# --- which cells are done ------------------------------------------------------------------------------------------

def _comparable(config: dict) -> str:
    # the records folder may move; what the cell computes may not
    return json.dumps({k: v for k, v in config.items() if k != 'output'}, sort_keys=True, default=str)


def _plain(config: RecipeConfig) -> dict:
    return json.loads(json.dumps(config.to_dict(), default=str))  # as a record stores it


def _read_as_today(config: dict) -> dict | None:
    """A record's resolved recipe read through today's recipe schema, so that an option added since the record
    takes its default (which keeps what the record did; the exception so far: ``reduce_range``, whose default turns
    7-bit activations on for CPUs without VNNI). None when it no longer validates: an option since removed."""
    try:
        return _plain(_build(RecipeConfig, config, ''))
    except RecipeError:
        return None


def cell_status(cell: Cell, runs: Path) -> tuple[str, Path | None]:
    """('done', record) when the newest record of the cell was made from its resolved recipe as it is now (options
    added since at their defaults), ('stale', record) when it was made from another, ('todo', None) when it has
    none."""
    records = []
    for path in sorted((runs / cell.id).glob('*.json')):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and record.get('recipe', {}).get('name') == cell.id and 'config' in record:
            records.append((record.get('date', ''), path, record))
    if not records:
        return 'todo', None
    _, path, record = max(records, key=lambda item: (item[0], str(item[1])))
    fresh = _plain(cell.config)
    made_from = _read_as_today(record['config'])
    return ('done' if made_from is not None and _comparable(made_from) == _comparable(fresh) else 'stale'), path


# --- running ---------------------------------------------------------------------------------------------------

def _launch_args(study: StudyConfig, cell: Cell, runs: Path) -> tuple:
    """What :func:`compress.launch.launch` runs for a cell: recipe, overrides, accelerate options (or None)."""
    return (cell.recipe_path, [*cell.overrides, f'name={cell.id}', f'output.dir={runs}'],
            study.launch_args if study.launcher == 'accelerate' else None)


def _write_manifest(study: StudyConfig, study_path: Path, all_cells: list[Cell], runs: Path) -> None:
    """``<runs>/study.json``: every cell with its model, recipe and points, for the paper outputs."""
    runs.mkdir(parents=True, exist_ok=True)
    manifest = {'study': study.name, 'description': study.description, 'study_file': str(study_path),
                'cells': [cell.manifest() for cell in all_cells]}
    handle, temporary = tempfile.mkstemp(dir=runs, prefix='.study-', suffix='.tmp')
    with os.fdopen(handle, 'w') as out:
        json.dump(manifest, out, indent=1)
    os.chmod(temporary, 0o644)
    os.replace(temporary, runs / MANIFEST)


def run_study(study: StudyConfig, study_path: Path, cells: list[Cell], runs: Path, all_cells: list[Cell],
              progress: bool = True) -> list[tuple[str, str]]:
    """Run every cell that has no record of its current recipe, one at a time; returns (cell id, reason) failures.

    The manifest is written once the cells have run (or were interrupted), not before: where it is tracked by git,
    rewriting it first would mark every record of this run as made by a ``-dirty`` checkout."""
    from tqdm import tqdm
    statuses = {cell.id: cell_status(cell, runs)[0] for cell in cells}
    failures = []
    todo = [cell for cell in cells if statuses[cell.id] != 'done']
    # cells done before count as done but not in the rate: the time left is estimated from this run's cells only
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=study.name, unit='cell', disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for cell in todo:
            bar.set_postfix_str(cell.id)
            recipe, overrides, accelerate_args = _launch_args(study, cell, runs)
            launched = launch(recipe, overrides, runs / 'logs' / f'{cell.id}.log', accelerate_args)
            if launched.code != 0 or cell_status(cell, runs)[0] != 'done':
                reason = f'exit {launched.code}: {launched.error} (log: {launched.log})'
                failures.append((cell.id, reason))
                bar.write(f'{cell.id}: failed, {reason}', file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()
        _write_manifest(study, study_path, all_cells, runs)
    return failures


def select(cells: list[Cell], models: list[str] | None, recipes: list[str] | None) -> list[Cell]:
    """The cells of these model ids and recipe ids (all when None); an id the study lacks is a RecipeError."""
    for key, wanted, have in (('--models', models, {c.model for c in cells}),
                              ('--recipes', recipes, {c.recipe for c in cells})):
        unknown = sorted(set(wanted or ()) - have)
        if unknown:
            raise RecipeError(f'{key}: {", ".join(unknown)} not in the study; it has {", ".join(sorted(have))}')
    return [c for c in cells if (not models or c.model in models) and (not recipes or c.recipe in recipes)]


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def _ids(text: str | None) -> list[str] | None:
    return [item for item in text.split(',') if item] if text else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('study', help='study YAML, e.g. recipes/studies/seed_backbones.yaml')
    parser.add_argument('--out', help="records folder (default: the study's runs)")
    parser.add_argument('--models', help='comma-separated model ids: run only their cells')
    parser.add_argument('--recipes', help='comma-separated recipe ids: run only their cells')
    parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                        help='override for every cell, applied last (e.g. --set eval.rounds=6); cells whose '
                             'records were made without it run again')
    parser.add_argument('--dry-run', action='store_true', help='validate, list every cell and its command, run nothing')
    parser.add_argument('--report', nargs='?', const='', metavar='DIR',
                        help="write the paper outputs from the records (into DIR, default: the study's report)")
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    args = parser.parse_args(argv)
    try:
        study, all_cells, runs = load_study(args.study, args.out, args.set)
        cells = select(all_cells, _ids(args.models), _ids(args.recipes))
    except RecipeError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    if args.report is not None:
        from eval.paper import print_report
        out = Path(args.report or study.report or f'results/studies/{study.name}')
        return print_report(runs, out, cells=all_cells, title=study.name, description=study.description)
    if args.dry_run:
        for cell in cells:
            status, record = cell_status(cell, runs)
            print(f'{cell.id}: {status}' + (f' ({record})' if record else ''))
            print(f'  {shlex.join(launch_command(*_launch_args(study, cell, runs)))}')
        return 0
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        failures = run_study(study, Path(args.study), cells, runs, all_cells, progress=not args.quiet)
    except KeyboardInterrupt:
        print('stopped; run the same command again to resume', file=sys.stderr)
        return 130
    except OSError as error:
        print(f'error: {runs}: {first_line(error)}', file=sys.stderr)
        return 2
    done = sum(cell_status(cell, runs)[0] == 'done' for cell in cells)
    print(f'{study.name}: {done} of {len(cells)} cells have a record in {runs}', file=sys.stderr)
    for cell_id, reason in failures:
        print(f'failed: {cell_id}: {reason}', file=sys.stderr)
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
