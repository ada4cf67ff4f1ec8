"""The one straight path of a run: recipe → model → data → baseline → stages → record."""
from __future__ import annotations

import copy
import datetime as dt
import time
from pathlib import Path

import torch

from compress.checkpoint import RunProgress, restore_metrics
from compress.config import QUANTIZE_KINDS, TRAINING_KINDS, RecipeConfig
from compress.data import attach_transforms, build_datasets, resolve_data_config
from compress.deploy import float_runner, has_deploy_form
from compress.factory import build_model, save_whole_model
from compress.record import environment, git_hash
from compress.stages import STAGES
from compress.stages.base import StageContext, StageResult
from eval.evaluate import evaluate_stage, public_metrics

__all__ = ['run_recipe']


def _stage_entry(result: StageResult, metrics: dict, before: str | None) -> dict:
    return {
        'name': result.name, 'kind': result.kind, 'backend': result.backend, 'before': before,
        'seconds': round(result.seconds, 2),
        'metrics': public_metrics(metrics), 'coverage': result.coverage, 'notes': result.notes,
    }


def run_recipe(cfg: RecipeConfig, accelerator, recipe_path: str | None = None) -> dict:
    """Run a validated recipe and return its record (the caller writes it).

    Args:
        cfg: a recipe from :func:`compress.config.load_recipe` that passed :func:`compress.config.check_inputs`.
        accelerator: an ``accelerate.Accelerator``.
        recipe_path: where the recipe came from, for the record.
    """
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    need_calib = any(s.kind in QUANTIZE_KINDS or s.kind == 'prune' for s in cfg.stages)
    need_train = any(s.kind in TRAINING_KINDS for s in cfg.stages)
    data = build_datasets(cfg.data, need_calib, need_train, cfg.seed)
    model, weights_cfg, model_notes = build_model(cfg.model, data.num_classes)
    data_config = resolve_data_config(cfg.data, model, weights_cfg)
    attach_transforms(data, data_config, cfg.data.train_augment)
    input_size = tuple(data_config['input_size'])
    ctx = StageContext(accelerator, data, cfg.data, cfg.eval, input_size, cfg.seed,
                       initial_model=copy.deepcopy(model) if _needs_initial_teacher(cfg) else None,
                       data_config=data_config)
    accelerator.print(f'{cfg.name}: {cfg.model.name} on {data.name} ({len(data.eval)} eval images), '
                      f'input {input_size}; {"; ".join(model_notes)}')

    progress = RunProgress(cfg.output.dir, cfg.to_dict(), enabled=accelerator.is_main_process)
    state = progress.load()
    num_images = len(data.eval)
    if state is None:
        baseline = StageResult(
            name='baseline', kind='baseline',
            runner=float_runner(model, cfg.eval), float_model=model, next_model=model,
            notes=model_notes + (['fp32 evaluated and timed in deploy form (fused blocks, same function), as the '
                                  'quantized rows ship'] if has_deploy_form(model) else []),
        )
        baseline_metrics = evaluate_stage(baseline, ctx)
        _report(accelerator, baseline, baseline_metrics)
        entries = [_stage_entry(baseline, baseline_metrics, before=None)]
        # accuracy deltas compare a stage with the model it started from; speedups compare with the baseline
        before_name, before_metrics, first_stage = 'baseline', baseline_metrics, 0
        ctx.previous = [baseline]
    else:
        entries, first_stage, before_name = state['entries'], state['completed'], state['before']
        model = progress.restore_model(state)
        baseline_metrics = restore_metrics(entries[0], num_images)
        before_metrics = restore_metrics(next(e for e in entries if e['name'] == before_name), num_images)
        ctx.previous = [StageResult(name=before_name, kind='restored', float_model=model, next_model=model,
                                    runner=float_runner(model, cfg.eval))]
        accelerator.print(f'resuming after stage {first_stage} ({before_name}) from {progress.dir}')
    ctx.output_dir = str(Path(cfg.output.dir) / cfg.name)
    for index, stage_cfg in enumerate(cfg.stages):
        if index < first_stage:
            continue
        torch.manual_seed(cfg.seed + 1 + index)  # a resumed run draws the same numbers as an uninterrupted one
        results = STAGES[stage_cfg.kind](stage_cfg, model, ctx)
        ctx.previous = results
        for result in results:
            metrics = evaluate_stage(result, ctx, before=before_metrics, baseline=baseline_metrics)
            _report(accelerator, result, metrics)
            entries.append(_stage_entry(result, metrics, before=before_name))
            if result is results[0]:
                first_name, first_metrics = result.name, metrics
        # the next stage starts from this stage's (first) result, quantized or not
        before_name, before_metrics = first_name, first_metrics
        if results[0].next_model is not None:
            model = results[0].next_model
            progress.save(entries, index + 1, before_name, model)

    record = {
        'schema': 1,
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
        'git_hash': git_hash(),
        'date': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'),
        'stages': entries,
        'resumed_after_stage': state['completed'] if state else None,
        'wall_seconds': round(time.perf_counter() - started, 1),
    }
    if cfg.output.save_model:
        record['final_model'] = _save_final_model(model, cfg, entries)
    progress.clear()
    return record


def _save_final_model(model, cfg: RecipeConfig, entries: list[dict]) -> str:
    folder = Path(cfg.output.dir) / cfg.name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f'{cfg.name}-final-{dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")}.pt'
    history = [{'name': e['name'], 'kind': e['kind'], 'backend': e['backend'], 'recipe': cfg.name}
               for e in entries if e['kind'] != 'baseline']
    # a model that was compressed by an earlier run keeps its earlier steps
    save_whole_model(model, path, cfg.model.name, getattr(model, 'compress_history', []) + history)
    return str(path)


def _needs_initial_teacher(cfg: RecipeConfig) -> bool:
    # distillation without a named teacher learns from the model as it was before the first stage
    return any(hasattr(s, 'teacher') and s.teacher is None and (s.kind == 'distill' or s.alpha > 0)
               for s in cfg.stages)


def _report(accelerator, result: StageResult, metrics: dict) -> None:
    parts = [f'{result.name}:']
    if 'top1' in metrics:
        parts.append(f'top-1 {metrics["top1"]:.2f} [{metrics["top1_ci95"][0]:.1f}, {metrics["top1_ci95"][1]:.1f}]')
    if 'top1_delta' in metrics:
        parts.append(f'Δ {metrics["top1_delta"]:+.2f} [{metrics["top1_delta_ci95"][0]:+.1f}, '
                     f'{metrics["top1_delta_ci95"][1]:+.1f}]')
    for key in ('cpu_img_s_bs1', 'cpu_img_s_bs32'):
        if key in metrics:
            parts.append(f'{key} {metrics[key]:.1f}')
    parts.append(f'{metrics["precision"]}, quantized weights {metrics["quantized_weight_fraction"]:.0%}')
    accelerator.print('  '.join(parts))
