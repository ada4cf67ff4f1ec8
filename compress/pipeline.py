"""The one straight path of a run: recipe → model → data → baseline → stages → controls → timing → record.

Stages make artifacts; the evaluator measures them: accuracy, complexity and coverage right after each stage,
speed once at the end, for every artifact of the run together in one timing session (interleaved rounds, an A/A
control, each speedup named after what it divides by).
"""
from __future__ import annotations

import copy
import datetime as dt
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from compress.checkpoint import RunProgress, restore_metrics
from compress.config import CALIBRATING_KINDS, TRAINING_KINDS, RecipeConfig, RecipeError
from compress.controls import finetune_control
from compress.data import attach_transforms, build_datasets, make_loader, resolve_data_config
from compress.deploy import deploy_form, has_deploy_form
from compress.factory import build_model, save_whole_model
from compress.record import environment, git_hash
from compress.stages import STAGES
from compress.stages.base import StageContext, StageResult
from eval.evaluate import (
    describe_reference, evaluate_result, paired_delta, public_metrics, runner_for, speed_metrics, time_run,
)

__all__ = ['run_recipe']

BASELINE, BF16, AA, EAGER = 'baseline', 'baseline[bf16]', 'baseline A/A', 'fp32 eager'


class _Rows:
    """The record's entries in table order, with what the timing session needs of each (runner, artifact)."""

    def __init__(self, ctx: StageContext, loader):
        self.ctx, self.loader = ctx, loader
        self.entries: list[dict] = []
        self.metrics: dict[str, dict] = {}
        self.runners: dict[str, object] = {}
        self.references: dict[str, tuple[object, str]] = {}  # label -> (artifact, row it gives context to)

    def evaluate(self, result: StageResult, before: str | None, dtype=None) -> dict:
        if result.failed is not None:
            entry = {'name': result.name, 'kind': result.kind, 'backend': result.backend, 'before': before,
                     'seconds': round(result.seconds, 2), 'result': None, 'reason': result.failed,
                     'notes': result.notes, 'info': result.info}
            self.ctx.accelerator.print(f'{result.name}: no result: {result.failed}')
            self.entries.append(entry)
            return entry
        metrics, runner = evaluate_result(result, self.ctx, self.loader, self.metrics.get(before), dtype=dtype)
        coverage = metrics.pop('_coverage')
        entry = {'name': result.name, 'kind': result.kind, 'backend': result.backend, 'before': before,
                 'seconds': round(result.seconds, 2), 'metrics': metrics, 'coverage': coverage,
                 'info': result.info, 'notes': result.notes}
        self.metrics[result.name], self.runners[result.name] = metrics, runner
        for label, artifact in result.references.items():
            label = label if before == BASELINE else f'{label} (of {before})'
            self.references[label] = (artifact, result.name)
        _report(self.ctx.accelerator, result.name, metrics)
        self.entries.append(entry)
        return entry

    def restore(self, entry: dict, artifact=None, dtype=None) -> None:
        """An entry of an interrupted run: its metrics, and a runner of its artifact for the timing session."""
        self.entries.append(entry)
        if entry.get('result', True) is None:
            return
        self.metrics[entry['name']] = restore_metrics(entry, len(self.loader.dataset))
        if artifact is not None:
            self.runners[entry['name']] = runner_for(artifact, entry['name'], self.ctx.eval_cfg, dtype=dtype)

    def public(self) -> list[dict]:
        return [{**e, 'metrics': public_metrics(e['metrics'])} if 'metrics' in e else e for e in self.entries]


def run_recipe(cfg: RecipeConfig, accelerator, recipe_path: str | None = None) -> dict:
    """Run a validated recipe and return its record (the caller writes it).

    Args:
        cfg: a recipe from :func:`compress.config.load_recipe` that passed :func:`compress.config.check_inputs`.
        accelerator: an ``accelerate.Accelerator``.
        recipe_path: where the recipe came from, for the record.
    """
    started = time.perf_counter()
    code_version = git_hash()  # the code that runs now, whatever happens to the tree during the run
    torch.manual_seed(cfg.seed)
    need_calib = any(s.kind in CALIBRATING_KINDS for s in cfg.stages)
    need_train = any(s.kind in TRAINING_KINDS for s in cfg.stages)
    data = build_datasets(cfg.data, need_calib, need_train, cfg.seed)
    model, weights_cfg, model_notes = build_model(cfg.model, data.num_classes, trains=need_train)
    _check_training_sets(cfg, data)
    data_config = resolve_data_config(cfg.data, model, weights_cfg)
    attach_transforms(data, data_config, cfg.data.train_augment)
    input_size = tuple(data_config['input_size'])
    ctx = StageContext(accelerator, data, cfg.data, cfg.eval, input_size, cfg.seed,
                       initial_model=copy.deepcopy(model) if _needs_initial_teacher(cfg) else None,
                       data_config=data_config)
    accelerator.print(f'{cfg.name}: {cfg.model.name} on {data.name} ({len(data.eval)} eval images), '
                      f'input {input_size}; {"; ".join(model_notes)}')
    rows = _Rows(ctx, make_loader(data.eval, cfg.eval.batch_size, cfg.data.workers))
    baseline_model = model
    baseline = StageResult(
        name=BASELINE, kind='baseline', artifact=deploy_form(model), float_model=model, next_model=model,
        notes=model_notes + (['evaluated and timed in deploy form (fused blocks, same function), as the quantized '
                              'rows ship'] if has_deploy_form(model) else []))

    # every process resumes from the same stage; only the main process writes progress
    progress = RunProgress(cfg.output.dir, cfg.to_dict(), writes=accelerator.is_main_process, code=code_version)
    state = progress.load()
    if progress.refused:
        accelerator.print(progress.refused)
    if state is None:
        rows.evaluate(baseline, before=None)
        if cfg.eval.bf16:
            rows.evaluate(StageResult(name=BF16, kind='reference', artifact=baseline.artifact, float_model=model,
                                      next_model=None, notes=['the baseline in bf16 (parameters and activations)']),
                          before=BASELINE, dtype=torch.bfloat16)
        # accuracy deltas compare a stage with the model it started from; speedups compare with the baseline
        before, first_stage = BASELINE, 0
        ctx.previous = [baseline]
    else:
        models = progress.restore_models(state)
        for entry in state['entries']:
            name = entry['name']
            artifact = baseline.artifact if name in (BASELINE, BF16) else \
                deploy_form(models[name]) if name in models else None
            rows.restore(entry, artifact, dtype=torch.bfloat16 if name == BF16 else None)
        first_stage, before = state['completed'], state['before']
        model = models[before]
        ctx.previous = [StageResult(name=before, kind='restored', artifact=deploy_form(model), float_model=model,
                                    next_model=model)]
        accelerator.print(f'resuming after stage {first_stage} ({before}) from {progress.dir}')
    ctx.output_dir = str(Path(cfg.output.dir) / cfg.name)
    for index, stage_cfg in enumerate(cfg.stages):
        if index < first_stage:
            continue
        set_seed(cfg.seed + 1 + index)  # python, numpy, torch: a resumed run draws what an uninterrupted one does
        results = STAGES[stage_cfg.kind](stage_cfg, model, ctx)
        ctx.previous = results
        for result in results:
            rows.evaluate(result, before=before)
        # the next stage starts from this stage's first result, quantized or not
        made = [result for result in results if result.failed is None] or results
        before = made[0].name
        if made[0].next_model is not None:
            model = made[0].next_model
            progress.save(rows.public(), index + 1, before, model)
            accelerator.wait_for_everyone()

    if 'finetune' in cfg.controls:
        set_seed(cfg.seed + 1 + len(cfg.stages))
        control = finetune_control(cfg.stages, baseline_model, ctx)
        rows.evaluate(control, before=BASELINE)
        for entry in rows.entries:
            if entry['name'] in rows.metrics and entry['kind'] not in ('baseline', 'reference', 'control'):
                entry['metrics'].update(paired_delta(rows.metrics[entry['name']], rows.metrics[control.name],
                                                     cfg.eval.bootstrap, key='top1_vs_control'))

    timing = None
    if cfg.eval.throughput and accelerator.is_main_process:
        timing = _time_every_row(rows, baseline, cfg)

    record = {
        'schema': 2,
        'recipe': {'name': cfg.name, 'path': str(recipe_path) if recipe_path else None,
                   'description': cfg.description},
        'config': cfg.to_dict(),
        'model': {'name': cfg.model.name, 'checkpoint': cfg.model.checkpoint, 'num_classes': data.num_classes,
                  'input_size': list(input_size), 'data_config': {k: (list(v) if isinstance(v, tuple) else v)
                                                                  for k, v in data_config.items()}},
        'data': {'name': data.name, 'source': cfg.data.source, 'split': data.eval_split,
                 'num_images': len(data.eval), 'subset': cfg.data.max_eval is not None,
                 'calib_images': len(data.calib) if data.calib is not None else None,
                 'train_images': len(data.train) if data.train is not None else None,
                 'root': str(Path(cfg.data.root)) if cfg.data.root else None},
        'env': {**environment(), 'processes': accelerator.num_processes, 'eval_threads': cfg.eval.threads},
        'git_hash': code_version,
        'date': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'),
        'stages': rows.public(),
        'timing': timing,
        'resumed_after_stage': state['completed'] if state else None,
        'wall_seconds': round(time.perf_counter() - started, 1),
    }
    accelerator.wait_for_everyone()  # the other processes skipped the timing session: the record is written once
    if cfg.output.save_model and accelerator.is_main_process:
        record['final_model'] = _save_final_model(model, cfg, rows.entries)
    progress.clear()
    return record


def _time_every_row(rows: _Rows, baseline: StageResult, cfg: RecipeConfig) -> dict:
    """One timing session over every row and the references next to them; speed metrics into the entries."""
    runners = {BASELINE: rows.runners[BASELINE],
               AA: runner_for(baseline.artifact, AA, cfg.eval)}  # a second, separately compiled baseline
    if cfg.eval.eager and cfg.eval.compile:
        runners[EAGER] = runner_for(baseline.artifact, EAGER, cfg.eval, compiled=False)
    runners.update((name, runner) for name, runner in rows.runners.items() if name != BASELINE)
    reference_of = {}
    for label, (artifact, row) in rows.references.items():
        runners[label] = runner_for(artifact, label, cfg.eval)
        reference_of[row] = label
    rows.ctx.accelerator.print(f'timing {len(runners)} forms together: {", ".join(runners)}')
    session = time_run(runners, cfg.eval, rows.ctx.input_size, BASELINE, AA,
                       log=lambda line: rows.ctx.accelerator.print(f'  {line}', flush=True))
    baseline_gmacs = rows.metrics[BASELINE]['gmacs']
    for entry in rows.entries:
        name = entry['name']
        if name not in rows.runners:
            continue
        baselines = {'fp32': BASELINE, 'bf16': BF16 if BF16 in runners else None, 'ov_fp32': reference_of.get(name)}
        gmacs = entry['metrics']['gmacs']
        entry['metrics'].update(speed_metrics(session, name, baselines, baseline_gmacs / gmacs if gmacs else None))
    # the references become rows of their own (speed only), placed next to what they explain
    for label in [EAGER] + list(rows.references):
        if label not in runners:
            continue
        runner = runners[label]
        if label == EAGER:
            source, note = BASELINE, f'timed only: {BASELINE} run eagerly'
            position = _position(rows.entries, BASELINE) + 1
        else:
            row = rows.references[label][1]
            source = next(entry['before'] for entry in rows.entries if entry['name'] == row)
            note = f'timed only: the float model {row} was made from ({source}), in OpenVINO (f32 hint)'
            position = _position(rows.entries, row)
        complexity = {key: rows.metrics[source][key] for key in ('params_m', 'gmacs')}
        metrics = {**describe_reference(runner), **complexity,
                   **speed_metrics(session, label, {'fp32': BASELINE, 'bf16': BF16 if BF16 in runners else None})}
        rows.entries.insert(position, {'name': label, 'kind': 'reference', 'backend': runner.runtime.split()[0],
                                       'before': None, 'seconds': 0.0, 'metrics': metrics, 'notes': [note]})
    for line in _speed_lines(rows.entries, session):
        rows.ctx.accelerator.print(line)
    return session


def _position(entries: list[dict], name: str) -> int:
    return next(i for i, entry in enumerate(entries) if entry['name'] == name)


def _speed_lines(entries: list[dict], session: dict) -> list[str]:
    batch = max(session['batch_sizes'])
    lines = [f'speed at batch {batch} ({session["measure"]} time ratios, median [95 % interval] of '
             f'{session["rounds"]} interleaved rounds; load {session["load_before"]} -> {session["load_after"]}):']
    control = session.get('control')
    if control:
        ratio = control['ratios'][f'bs{batch}']
        lines.append(f'  A/A control {ratio[0]:.3f} [{ratio[1]:.3f}, {ratio[2]:.3f}]'
                     + ('' if control['ok'] else f'  NOISY: outside 1 +- {control["tolerance"]}'))
    for entry in entries:
        metrics = entry.get('metrics') or {}
        if f'cpu_img_s_bs{batch}' not in metrics:
            continue
        parts = [f'  {entry["name"]:<28} {metrics[f"cpu_img_s_bs{batch}"]:9.1f} img/s']
        for key in ('fp32', 'bf16', 'ov_fp32'):
            ratio = metrics.get(f'speedup_{key}_bs{batch}')
            if ratio:
                parts.append(f'x{key} {ratio[0]:.2f} [{ratio[1]:.2f}, {ratio[2]:.2f}]')
        lines.append('  '.join(parts))
    return lines


def _save_final_model(model, cfg: RecipeConfig, entries: list[dict]) -> str:
    folder = Path(cfg.output.dir) / cfg.name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f'{cfg.name}-final-{dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")}.pt'
    history = [{'name': e['name'], 'kind': e['kind'], 'backend': e['backend'], 'recipe': cfg.name}
               for e in entries if e['kind'] not in ('baseline', 'reference', 'control') and e.get('result', 1)]
    # a model that was compressed by an earlier run keeps its earlier steps
    save_whole_model(model, path, cfg.model.name, getattr(model, 'compress_history', []) + history)
    return str(path)


def _check_training_sets(cfg: RecipeConfig, data) -> None:
    """A training set smaller than one batch would give a stage no step at all (drop_last): say so before any work."""
    for index, stage in enumerate(cfg.stages):
        if stage.kind in TRAINING_KINDS:
            batch = stage.batch_size or cfg.data.batch_size
            if len(data.train) < batch:
                key = f'stages[{index}].batch_size' if stage.batch_size else 'data.batch_size'
                raise RecipeError(f'{key}: the training set has {len(data.train)} images, fewer than one batch of '
                                  f'{batch}; lower the batch size or train on more images')


def _needs_initial_teacher(cfg: RecipeConfig) -> bool:
    # distillation without a named teacher learns from the model as it was before the first stage
    return any(hasattr(s, 'teacher') and s.teacher is None and (s.kind == 'distill' or s.alpha > 0)
               for s in cfg.stages)


def _report(accelerator, name: str, metrics: dict) -> None:
    parts = [f'{name}:']
    if 'top1' in metrics:
        parts.append(f'top-1 {metrics["top1"]:.2f} [{metrics["top1_ci95"][0]:.1f}, {metrics["top1_ci95"][1]:.1f}]')
    if 'top1_delta' in metrics:
        parts.append(f'Δ {metrics["top1_delta"]:+.2f} [{metrics["top1_delta_ci95"][0]:+.1f}, '
                     f'{metrics["top1_delta_ci95"][1]:+.1f}]')
    parts.append(f'{metrics["precision"]} ({metrics["runs_in"]}); weights int8 {metrics["int8_weight_fraction"]:.0%}'
                 f', 4-bit {metrics["int4_weight_fraction"]:.0%}; {metrics["size_mb"]:.2f} MB')
    accelerator.print('  '.join(parts))
