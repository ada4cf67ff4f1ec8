"""One timing session: every form of a run timed side by side, in interleaved rounds, with an A/A control.

A speed ratio is only as good as the conditions both of its figures were taken under. On a shared machine the
same module timed minutes apart differs by up to 2x, so figures are never divided across runs or stages:

* **Interleaved rounds.** A round times every form once at every batch size (a block of calls lasting at least
  ``min_seconds``), in an order rotated from round to round, so drift in load and position effects hit every
  form alike. A ratio is the median of its per-round ratios, with the order-statistic 95 % interval of that
  median (:func:`eval.stats.median_ci`).
* **CPU time and wall time.** Each block runs under ``torch.utils.benchmark``'s thread setting, starts with one
  untimed call (the caches after switching forms; skipped where one call already fills the block, as it would
  double the block and a cold start is a small part of it), and records the wall time and the process CPU time of
  its timed calls. With one compute thread, time-slicing by other processes inflates wall time but not CPU time,
  so ratios use CPU time (``measure='cpu'``) unless told otherwise; img/s columns are wall clock. OpenVINO runs
  with one inference thread, on the calling thread (its other threads used no CPU during any block when this was
  checked), so its CPU time is comparable.
* **A/A control.** The reference form is timed twice, as two separately built forms. Their ratio must lie within
  ``1 ± tolerance`` (its whole interval); if it does not, more rounds are added (up to ``max_attempts`` times
  the rounds); if it still does not, the session is marked ``noisy`` and every table flags its speedups.
* **One allocator state.** :func:`pin_allocator` stops glibc from serving large blocks with fresh ``mmap`` calls
  and from returning freed memory to the system, as tuned CPU deployments do (Intel's PyTorch guides preload
  jemalloc or tcmalloc for this). By default every activation above glibc's mmap threshold was mapped and
  page-faulted in again on every call, and glibc moves that threshold whenever a large block is freed: a torch
  form's speed and spread depended on the size of its activations and on what the process had run before it (a
  compiled SpaRTAN-T got faster once NNCF had quantized a model in the same process; a compiled
  EfficientNet-Lite0 at batch 32 spent about a third of its time faulting pages), while OpenVINO, which keeps its
  buffers, did not pay it.

The load average before and after the session is recorded with it.
"""
from __future__ import annotations

import ctypes
import math
import os
import time
from collections.abc import Callable

import torch
from torch.utils.benchmark.utils.common import set_torch_threads

from eval.stats import median_ci

__all__ = ['pin_allocator', 'time_forms', 'speedup', 'throughput', 'control_ratios']

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_NO_TRIM = -1  # freed memory stays with the process instead of being returned and faulted in again
_NO_MMAP = 0   # every block comes from the heap, where freed blocks are reused
_allocator_pinned = False


def pin_allocator() -> bool:
    """Make glibc reuse freed memory for the rest of the process (see the module docstring); False if not glibc."""
    global _allocator_pinned
    if _allocator_pinned:
        return True
    try:
        libc = ctypes.CDLL('libc.so.6')
        _allocator_pinned = bool(libc.mallopt(_M_MMAP_MAX, _NO_MMAP)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, _NO_TRIM))
    except (OSError, AttributeError):
        _allocator_pinned = False
    return _allocator_pinned


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _block(call, calls: int, threads: int) -> tuple[float, float]:
    """Wall and process CPU seconds per call of one block of ``calls`` timed calls."""
    with set_torch_threads(threads):
        if calls > 1:
            call()
        _sync()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            call()
        _sync()
        return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def _calls(forms: dict[str, Callable], input_size, batch: int) -> dict[str, Callable[[], None]]:
    images = torch.randn(batch, *input_size)

    def bind(run):
        def call():
            with torch.no_grad():
                run(images)
        return call
    return {label: bind(run) for label, run in forms.items()}


def time_forms(forms: dict[str, Callable[[torch.Tensor], object]], input_size, batch_sizes, *, threads: int = 1,
               rounds: int = 7, min_seconds: float = 0.3, warmup: int = 2,
               control: tuple[str, str] | None = None, tolerance: float = 0.05, max_attempts: int = 3,
               measure: str = 'cpu', log: Callable[[str], None] | None = None) -> dict:
    """Time every form at every batch size in interleaved rounds; returns the session (a plain dict).

    Args:
        forms: label -> callable taking a batch of images (each already built: compiled, converted, ...).
        input_size: (C, H, W) of one image.
        batch_sizes: the batch sizes to time.
        threads: torch threads while timing (OpenVINO forms are compiled with their own thread count).
        rounds: rounds per attempt.
        min_seconds: each block (one form, one batch size, one round) lasts at least this long.
        warmup: calls of each form at each batch size before the rounds (compiles happen here).
        control: (reference, its second copy): the A/A pair.
        tolerance: the A/A ratio's interval must lie within 1 ± tolerance.
        max_attempts: attempts (of ``rounds`` rounds each) before the session is declared noisy.
        measure: 'cpu' or 'wall': what the ratios divide.
        log: called with one line per round.

    Returns:
        ``{'forms': {label: {'bs<B>': {'calls', 'wall_s', 'cpu_s'}}}, 'measure', 'threads', 'batch_sizes',
        'rounds', 'attempts', 'min_seconds', 'load_before', 'load_after', 'control', 'noisy', 'seconds'}`` with
        per-round seconds per batch in ``wall_s`` / ``cpu_s``.
    """
    if measure not in ('cpu', 'wall'):
        raise ValueError(f"measure must be 'cpu' or 'wall', not {measure!r}")
    if control is not None and not set(control) <= set(forms):
        raise ValueError(f'control forms {control} are not among the forms')
    pin_allocator()
    started = time.perf_counter()
    session = {'measure': measure, 'threads': threads, 'batch_sizes': list(batch_sizes), 'min_seconds': min_seconds,
               'rounds': 0, 'attempts': 0, 'load_before': _load(), 'order': 'rotated each round',
               'forms': {label: {} for label in forms}}
    bound = {batch: _calls(forms, input_size, batch) for batch in batch_sizes}
    calls = {}
    for batch in batch_sizes:
        for label, call in bound[batch].items():
            with set_torch_threads(threads):
                for _ in range(max(1, warmup)):
                    call()
            per_call, _ = _block(call, 1, threads)
            calls[label, batch] = max(1, math.ceil(min_seconds / max(per_call, 1e-9)))
            session['forms'][label][f'bs{batch}'] = {'calls': calls[label, batch], 'wall_s': [], 'cpu_s': []}
    labels = list(forms)
    while True:
        session['attempts'] += 1
        for _ in range(rounds):
            shift = session['rounds'] % len(labels)
            for batch in batch_sizes:
                for label in labels[shift:] + labels[:shift]:
                    wall, cpu = _block(bound[batch][label], calls[label, batch], threads)
                    record = session['forms'][label][f'bs{batch}']
                    record['wall_s'].append(wall)
                    record['cpu_s'].append(cpu)
            session['rounds'] += 1
            if log:
                log(f'timing round {session["rounds"]}: {len(labels)} forms x batch {", ".join(map(str, batch_sizes))}')
        session['control'] = _control(session, control, tolerance) if control else None
        if session['control'] is None or session['control']['ok'] or session['attempts'] >= max_attempts:
            break
    session['noisy'] = bool(session['control'] and not session['control']['ok'])
    session['load_after'] = _load()
    session['seconds'] = round(time.perf_counter() - started, 1)
    return session


def _load() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, 'getloadavg') else None


def speedup(session: dict, label: str, reference: str, batch: int) -> list[float] | None:
    """``[median, low, high]`` of the per-round ratios reference time / ``label`` time (> 1: ``label`` is faster)."""
    forms = session['forms']
    if label not in forms or reference not in forms or f'bs{batch}' not in forms[label]:
        return None
    key = f'{session["measure"]}_s'
    ratios = [ref / own for own, ref in zip(forms[label][f'bs{batch}'][key], forms[reference][f'bs{batch}'][key])]
    median, low, high, _ = median_ci(ratios)
    return [round(median, 3), round(low, 3), round(high, 3)]


def throughput(session: dict, label: str, batch: int) -> dict:
    """Wall-clock img/s and latency (median round), and img/s per CPU second, of one form at one batch size."""
    record = session['forms'][label][f'bs{batch}']
    wall = sorted(record['wall_s'])[len(record['wall_s']) // 2]
    cpu = sorted(record['cpu_s'])[len(record['cpu_s']) // 2]
    return {'img_s': round(batch / wall, 2), 'latency_ms': round(1000 * wall, 3), 'img_s_cpu': round(batch / cpu, 2)}


def _control(session: dict, control: tuple[str, str], tolerance: float) -> dict:
    reference, copy = control
    ratios = {f'bs{batch}': speedup(session, copy, reference, batch) for batch in session['batch_sizes']}
    ok = all(1 - tolerance <= low and high <= 1 + tolerance for _, low, high in ratios.values())
    return {'forms': [reference, copy], 'tolerance': tolerance, 'ratios': ratios, 'ok': ok}


def control_ratios(session: dict) -> dict | None:
    """The A/A ratios of a session (``{'bs<B>': [median, low, high]}``), or None without a control."""
    return session['control']['ratios'] if session.get('control') else None

