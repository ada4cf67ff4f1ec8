"""Evaluate one stage result: accuracy, complexity, size, CPU (and GPU) throughput, coverage."""
from __future__ import annotations

import numpy as np

from compress.deploy import TorchRunner
from compress.stages.base import StageResult
from eval.accuracy import evaluate_accuracy
from eval.complexity import count_macs, count_params
from eval.stats import pack_bits, paired_delta_ci
from eval.throughput import measure_cpu, measure_gpu

__all__ = ['evaluate_stage']


def evaluate_stage(result: StageResult, ctx, before: dict | None = None, baseline: dict | None = None) -> dict:
    """Metrics of a stage result, keyed as the record contract says (``top1``, ``cpu_img_s_bs32``, ...).

    Args:
        result: the stage's model as deployed.
        ctx: the stage context (data, eval config, accelerator, input size).
        before: metrics of the model this stage started from, for accuracy deltas with paired 95 % intervals.
        baseline: metrics of the run's starting model, for speedups.
    """
    cfg = ctx.eval_cfg
    metrics: dict = {}
    if cfg.accuracy:
        accuracy = evaluate_accuracy(result.runner, ctx.data.eval, ctx.accelerator, cfg.batch_size,
                                     ctx.data_cfg.workers, cfg.bootstrap, desc=f'eval {result.name}')
        correct1, correct5 = accuracy.pop('correct1'), accuracy.pop('correct5')
        metrics.update(accuracy)
        metrics['correct1_bits'] = pack_bits(correct1)
        metrics['correct5_bits'] = pack_bits(correct5)
        if before is not None and '_correct1' in before:
            metrics['top1_delta'] = round(metrics['top1'] - before['top1'], 2)
            metrics['top1_delta_ci95'] = list(paired_delta_ci(before['_correct1'], correct1, cfg.bootstrap))
            metrics['top5_delta'] = round(metrics['top5'] - before['top5'], 2)
        metrics['_correct1'] = correct1  # kept in memory for later deltas, not written
    metrics['params_m'] = round(count_params(result.float_model) / 1e6, 4)
    metrics['gmacs'] = round(count_macs(result.float_model, ctx.input_size) / 1e9, 4)
    metrics['size_mb'] = round(result.runner.size_mb(), 3)
    metrics['precision'] = result.precision
    metrics['runtime'] = _runtime_name(result)
    if 'quantized_weight_fraction' in result.coverage:
        metrics['quantized_weight_fraction'] = result.coverage['quantized_weight_fraction']
    else:
        metrics['quantized_weight_fraction'] = 0.0
    if cfg.throughput and ctx.accelerator.is_main_process:
        timing = dict(threads=cfg.threads, warmup=cfg.warmup, repeats=cfg.repeats, min_seconds=cfg.min_seconds)
        for batch in cfg.throughput_batch_sizes:
            measured = measure_cpu(result.runner, ctx.input_size, batch, **timing)
            metrics[f'cpu_img_s_bs{batch}'] = measured['img_s']
            metrics[f'cpu_latency_ms_bs{batch}'] = measured['latency_ms']
            metrics[f'cpu_spread_bs{batch}'] = measured['spread']
        for name, reference in result.reference_runners.items():
            for batch in cfg.throughput_batch_sizes:
                metrics[f'cpu_img_s_bs{batch}_{name}'] = measure_cpu(reference, ctx.input_size, batch, **timing)['img_s']
        if cfg.eager and result.precision == 'fp32':
            eager = TorchRunner(result.float_model, compiled=False, label='fp32 eager')
            for batch in cfg.throughput_batch_sizes:
                metrics[f'cpu_img_s_bs{batch}_eager'] = measure_cpu(eager, ctx.input_size, batch, **timing)['img_s']
        if result.precision == 'fp32':
            gpu = measure_gpu(result.float_model, ctx.input_size, max(cfg.throughput_batch_sizes))
            if gpu is not None:
                metrics[f'gpu_img_s_bs{max(cfg.throughput_batch_sizes)}'] = gpu['img_s']
        metrics['cpu_threads'] = cfg.threads
    if baseline is not None:
        for key, value in list(metrics.items()):
            if key.startswith('cpu_img_s_bs') and not key.endswith('_eager') and baseline.get(key):
                metrics[f'speedup_{key.removeprefix("cpu_img_s_")}'] = round(value / baseline[key], 3)
    return metrics


def _runtime_name(result: StageResult) -> str:
    runner = result.runner
    if isinstance(runner, TorchRunner):
        return 'torch.compile (inductor)' if runner.compiled else 'torch eager'
    return f'openvino CPU ({getattr(runner, "precision", "f32")} hint)'


def public_metrics(metrics: dict) -> dict:
    """The metrics as written to the record (in-memory arrays dropped)."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in metrics.items() if not k.startswith('_')}
