"""CPU and GPU throughput and latency, measured like timm's benchmark.py.

CPU: a fixed, recorded thread count (1 by default: on a shared 2-core machine two threads spin on each other's
barriers), warm-up calls, then ``repeats`` timed rounds of at least ``min_seconds`` each; the median round is
reported. GPU (when CUDA is present): the same under ``torch.cuda.synchronize`` with optional bf16 autocast.
"""
from __future__ import annotations

import statistics
import time

import torch

__all__ = ['measure_cpu', 'measure_gpu']


def _timed_rounds(call, batch: int, warmup: int, repeats: int, min_seconds: float, sync=lambda: None) -> dict:
    for _ in range(warmup):
        call()
    sync()
    rates = []
    for _ in range(repeats):
        iterations, start = 0, time.perf_counter()
        while True:
            call()
            iterations += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        rates.append(batch * iterations / elapsed)
    img_s = statistics.median(rates)
    return {'img_s': round(img_s, 2), 'latency_ms': round(1000 * batch / img_s, 3),
            'spread': round((max(rates) - min(rates)) / img_s, 3)}


def measure_cpu(runner, input_size, batch_size: int, threads: int = 1, warmup: int = 3, repeats: int = 5,
                min_seconds: float = 0.5) -> dict:
    """Images per second and per-batch latency of a runner on the CPU.

    Returns:
        ``img_s`` (median over repeats), ``latency_ms`` (per batch), ``spread`` ((max − min) / median).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        timed = runner.for_threads(threads)
        images = torch.randn(batch_size, *input_size)
        with torch.no_grad():
            return _timed_rounds(lambda: timed(images), batch_size, warmup, repeats, min_seconds)
    finally:
        torch.set_num_threads(previous)


def measure_gpu(module: torch.nn.Module, input_size, batch_size: int, bf16: bool = False, warmup: int = 10,
                repeats: int = 5, min_seconds: float = 0.5) -> dict | None:
    """Throughput of a float module on the first CUDA device (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    device = torch.device('cuda')
    module = module.to(device).eval()
    images = torch.randn(batch_size, *input_size, device=device)

    def call():
        with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16, enabled=bf16):
            module(images)
    try:
        return _timed_rounds(call, batch_size, warmup, repeats, min_seconds, sync=torch.cuda.synchronize)
    finally:
        module.to('cpu')
