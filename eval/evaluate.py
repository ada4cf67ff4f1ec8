"""The evaluator: everything measured about a run's artifacts, and nothing a stage says about itself.

* :func:`evaluate_result`: accuracy (with paired intervals against the model a stage started from), params,
  GMACs, size, which weights are int8 / 4 bit / float (:mod:`eval.coverage`) and the precision they run in, for
  one artifact deployed as its runtime runs it (:mod:`eval.runtimes`).
* :func:`time_run`: the run's one timing session (:mod:`eval.timing`): every artifact and the references next to
  them, in interleaved rounds with an A/A control; :func:`speed_metrics` turns it into img/s and speedups, each
  named after what it divides by.

Artifacts are duck-typed (``name``, ``artifact``, ``float_model``, ``files``): the evaluator knows no stage.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from eval.accuracy import evaluate_accuracy
from eval.complexity import count_macs, count_params
from eval.coverage import execution_order, weight_coverage
from eval.runtimes import OpenVINORunner, TorchRunner
from eval.stats import pack_bits, paired_delta_ci
from eval.timing import speedup, throughput, time_forms

__all__ = ['runner_for', 'runs_on_accelerator', 'gpu_speed', 'evaluate_result', 'describe_reference', 'paired_delta',
           'time_run', 'speed_metrics', 'public_metrics']


def runner_for(artifact, label: str, eval_cfg, files: list[str] | None = None,
               dtype: torch.dtype | None = None, compiled: bool | None = None, device: str | torch.device = 'cpu'):
    """How an artifact runs when deployed: torch modules compiled (or eager), OpenVINO models on the CPU plugin."""
    if isinstance(artifact, nn.Module):
        compiled = eval_cfg.compile if compiled is None else compiled
        return TorchRunner(artifact, compiled=compiled, label=label, fixed_batch=eval_cfg.batch_size, dtype=dtype,
                           device=device)
    return OpenVINORunner(artifact, label=label, precision='f32', threads=eval_cfg.threads, files=files)


def runs_on_accelerator(artifact) -> bool:
    """Whether an artifact can run on a CUDA device: torch modules do, except PT2E x86 graphs (oneDNN int8 kernels
    are CPU kernels); OpenVINO models run on the CPU plugin here."""
    return isinstance(artifact, nn.Module) and not isinstance(artifact, torch.fx.GraphModule)


def _precision(coverage: dict, dtype: torch.dtype | None) -> str:
    if coverage['int4_weight_fraction'] > 0:
        label = 'int4' + ('+int8' if coverage['int8_weight_fraction'] > 0 else '')
        return label + (' (simulated)' if 'simulation' in (coverage.get('int4_storage') or '') else '')
    if coverage['int8_weight_fraction'] > 0:
        return 'int8'
    return 'bf16' if dtype == torch.bfloat16 else 'fp32'


def _runs_in(runner, coverage: dict) -> str:
    """The precision the weighted layers compute in, where the runtime says or the format fixes it."""
    if isinstance(runner, OpenVINORunner):
        counts = {p: len(names) for p, names in runner.runtime_precisions().items()}
        return ', '.join(f'{p} x{n}' for p, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if coverage.get('format') == 'pt2e' and coverage['int8_weight_fraction'] > 0:
        return 'int8 kernels (inductor, oneDNN)' if runner.compiled else 'fp32 (reference q/dq ops, eager)'
    if coverage['int4_weight_fraction'] > 0:
        if 'simulation' in (coverage.get('int4_storage') or ''):
            return 'float (4-bit weights dequantized each call)'
        return 'int4 weights x bf16 activations; other layers fp32'
    return 'bf16' if getattr(runner, 'dtype', None) == torch.bfloat16 else 'fp32'


def evaluate_result(result, ctx, loader, before: dict | None = None, dtype: torch.dtype | None = None,
                    runner=None) -> tuple[dict, object]:
    """Metrics of one artifact (the record's keys) and the runner that ran it (kept for the timing session).

    Args:
        result: a stage result (``name``, ``artifact``, ``float_model``, ``files``).
        ctx: the run context (``eval_cfg``, ``accelerator``, ``input_size``).
        loader: the evaluation data loader (images, labels, indices).
        before: metrics of the model it started from, for accuracy deltas with paired 95 % intervals.
        dtype: run a float artifact in this dtype (bf16).
        runner: an already built runner of the artifact.
    """
    cfg = ctx.eval_cfg
    runner = runner or runner_for(result.artifact, result.name, cfg, result.files, dtype)  # the CPU form
    device = ctx.accelerator.device
    on_device = device.type == 'cuda' and runs_on_accelerator(result.artifact)
    scorer = runner_for(result.artifact, result.name, cfg, dtype=dtype, device=device) if on_device else runner
    metrics: dict = {'evaluated_on': device.type if on_device else 'cpu'}
    if cfg.accuracy:
        accuracy = evaluate_accuracy(scorer, loader, ctx.accelerator, cfg.bootstrap, desc=f'eval {result.name}')
        correct1, correct5 = accuracy.pop('correct1'), accuracy.pop('correct5')
        metrics.update(accuracy)
        metrics['correct1_bits'] = pack_bits(correct1)
        metrics['correct5_bits'] = pack_bits(correct5)
        metrics['_correct1'] = correct1  # kept in memory for later deltas, not written
        if before is not None:
            metrics.update(paired_delta(metrics, before, cfg.bootstrap))
            metrics['top5_delta'] = round(metrics['top5'] - before['top5'], 2)
    metrics['params_m'] = round(count_params(result.float_model) / 1e6, 4)
    metrics['gmacs'] = round(count_macs(result.float_model, ctx.input_size) / 1e9, 4)
    metrics['size_mb'] = round(runner.size_mb(), 3)
    torch_layers = None
    if not isinstance(result.artifact, nn.Module):  # name OpenVINO layers after the torch modules
        torch_layers = execution_order(result.float_model, torch.zeros(1, *ctx.input_size))
    coverage = weight_coverage(result.artifact, torch_layers)
    if dtype is not None:
        coverage['float_dtype'] = str(dtype).removeprefix('torch.')
    metrics['precision'] = _precision(coverage, dtype)
    metrics['runtime'] = runner.runtime
    metrics['runs_in'] = _runs_in(runner, coverage)
    metrics.update({key: coverage[key] for key in ('int8_weight_fraction', 'int4_weight_fraction',
                                                    'float_weight_fraction', 'quantized_weight_fraction')})
    metrics['_coverage'] = coverage  # written to the entry by the caller, not into metrics
    if on_device and cfg.throughput and ctx.accelerator.is_main_process:
        metrics.update(gpu_speed(result.artifact, result.name, cfg, ctx.input_size, device, dtype))
    return metrics, runner


def gpu_speed(artifact, label: str, cfg, input_size, device, dtype: torch.dtype | None = None) -> dict:
    """img/s on the CUDA device, compiled, at each throughput batch size; a float artifact also in bf16
    (``gpu_img_s_bf16_bs<B>``) and its speedup over its own fp32 there, medians of interleaved rounds."""
    forms = {'gpu': runner_for(artifact, label, cfg, dtype=dtype, device=device)}
    if dtype is None and weight_coverage(artifact)['quantized_weight_fraction'] == 0:
        forms['gpu_bf16'] = runner_for(artifact, label, cfg, dtype=torch.bfloat16, device=device)
    session = time_forms(forms, input_size, cfg.throughput_batch_sizes, rounds=cfg.rounds,
                         min_seconds=cfg.min_seconds, warmup=cfg.warmup, measure='wall')
    metrics = {}
    for batch in cfg.throughput_batch_sizes:
        for form in forms:
            metrics[f'{form}_img_s_bs{batch}'] = throughput(session, form, batch)['img_s']
        if 'gpu_bf16' in forms:
            metrics[f'gpu_bf16_speedup_bs{batch}'] = speedup(session, 'gpu_bf16', 'gpu', batch)
    metrics['gpu'] = torch.cuda.get_device_name(device)
    return metrics


def describe_reference(runner) -> dict:
    """What a float form timed for context (fp32 eager, OpenVINO fp32) is: runtime, precision, size."""
    coverage = {'int4_weight_fraction': 0.0, 'int8_weight_fraction': 0.0}
    return {'runtime': runner.runtime, 'precision': 'fp32', 'runs_in': _runs_in(runner, coverage),
            'size_mb': round(runner.size_mb(), 3)}


def paired_delta(metrics: dict, reference: dict, bootstrap: int = 1000, key: str = 'top1_delta') -> dict:
    """Top-1 of ``metrics`` minus that of ``reference`` on the same images, with its paired 95 % interval."""
    if '_correct1' not in metrics or '_correct1' not in reference:
        return {}
    return {key: round(metrics['top1'] - reference['top1'], 2),
            f'{key}_ci95': list(paired_delta_ci(reference['_correct1'], metrics['_correct1'], bootstrap))}


def time_run(runners: dict[str, object], eval_cfg, input_size, reference: str, copy_of_reference: str,
             log=None) -> dict:
    """The run's one timing session over ``runners`` (label → runner), with the A/A pair given."""
    return time_forms(
        runners, input_size, eval_cfg.throughput_batch_sizes, threads=eval_cfg.threads, rounds=eval_cfg.rounds,
        min_seconds=eval_cfg.min_seconds, warmup=eval_cfg.warmup, control=(reference, copy_of_reference),
        tolerance=eval_cfg.aa_tolerance, max_attempts=eval_cfg.max_attempts, measure=eval_cfg.measure, log=log,
    )


def speed_metrics(session: dict, label: str, baselines: dict[str, str], macs_reduction: float | None = None) -> dict:
    """img/s of one form and its speedups over each baseline (``{'fp32': label, 'bf16': label, ...}``).

    Keys: ``cpu_img_s_bs<B>`` (wall clock, median round), ``cpu_latency_ms_bs<B>``, ``cpu_img_s_cpu_bs<B>``
    (images per CPU second), ``speedup_<baseline>_bs<B>`` ([median, low, high] of per-round ratios), and with
    ``macs_reduction`` (baseline MACs / this form's MACs, when it differs from 1) ``prune_efficiency_bs<B>``: the
    measured speedup over fp32 divided by the MAC reduction.
    """
    metrics = {}
    for batch in session['batch_sizes']:
        speed = throughput(session, label, batch)
        metrics[f'cpu_img_s_bs{batch}'] = speed['img_s']
        metrics[f'cpu_latency_ms_bs{batch}'] = speed['latency_ms']
        metrics[f'cpu_img_s_cpu_bs{batch}'] = speed['img_s_cpu']
        for name, reference in baselines.items():
            if reference and reference != label:
                ratio = speedup(session, label, reference, batch)
                if ratio is not None:
                    metrics[f'speedup_{name}_bs{batch}'] = ratio
        if macs_reduction and abs(macs_reduction - 1) > 1e-3 and f'speedup_fp32_bs{batch}' in metrics:
            metrics[f'prune_efficiency_bs{batch}'] = round(metrics[f'speedup_fp32_bs{batch}'][0] / macs_reduction, 3)
    metrics['cpu_threads'] = session['threads']
    return metrics


def public_metrics(metrics: dict) -> dict:
    """The metrics as written to the record (in-memory arrays and objects dropped)."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in metrics.items() if not k.startswith('_')}
