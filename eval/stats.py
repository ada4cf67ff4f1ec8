"""Intervals. Over images: eval sets here are small (1,001 ImageNet images), so every accuracy and every
before→after delta carries a 95 % bootstrap interval. Over timing rounds: a speed ratio is the median of its
per-round ratios, with the distribution-free (order-statistic) interval of that median."""
from __future__ import annotations

import base64
import math
import statistics

import numpy as np

__all__ = ['bootstrap_ci', 'paired_delta_ci', 'mcnemar_exact', 'pack_bits', 'unpack_bits', 'median_ci']


def bootstrap_ci(correct: np.ndarray, samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the accuracy (in %) of a 0/1 per-image vector."""
    return _mean_ci(np.asarray(correct, dtype=np.float64), samples, seed)


def paired_delta_ci(before: np.ndarray, after: np.ndarray, samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % interval of (after − before) accuracy in points, resampling the same images for both."""
    before = np.asarray(before, dtype=np.float64)
    after = np.asarray(after, dtype=np.float64)
    if before.shape != after.shape:
        raise ValueError('paired intervals need the same images before and after')
    return _mean_ci(after - before, samples, seed)


def mcnemar_exact(before: np.ndarray, after: np.ndarray) -> tuple[int, int, float]:
    """Exact two-sided McNemar test of two 0/1 per-image vectors over the same images.

    Only the images the two disagree on carry information: ``lost`` (right before, wrong after) and ``gained``.
    Under "same accuracy" each disagreement falls either way with probability 1/2, so the p-value is the two-sided
    binomial tail of ``min(lost, gained)`` among ``lost + gained``.

    Returns:
        (lost, gained, p-value); the p-value is 1.0 when they never disagree.
    """
    before = np.asarray(before, dtype=bool)
    after = np.asarray(after, dtype=bool)
    if before.shape != after.shape:
        raise ValueError('a paired test needs the same images in both')
    lost = int((before & ~after).sum())
    gained = int((~before & after).sum())
    disagreements = lost + gained
    tail = sum(math.comb(disagreements, i) for i in range(min(lost, gained) + 1)) / 2 ** disagreements
    return lost, gained, min(1.0, 2 * tail)


def _mean_ci(values: np.ndarray, samples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1) * 100
    return round(float(np.percentile(means, 2.5)), 2), round(float(np.percentile(means, 97.5)), 2)


def pack_bits(correct: np.ndarray) -> str:
    """Per-image 0/1 results as base64 text, so records stay small and deltas can be recomputed."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode('ascii')


def unpack_bits(text: str, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:count].astype(bool)


def median_ci(values, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Median of ``values`` and the order-statistic interval around it, which assumes nothing about their spread.

    The interval is ``[x_(k), x_(n+1-k)]`` (sorted, 1-based) for the largest ``k`` whose coverage,
    ``1 - 2 P(Binomial(n, 1/2) < k)``, is still at least ``confidence``; with fewer than 6 values no ``k`` reaches
    95 %, and the interval is ``[min, max]`` with its lower coverage (5 values: 93.75 %).

    Returns:
        (median, low, high, coverage of [low, high]).
    """
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    if n == 0:
        raise ValueError('median_ci needs at least one value')

    def coverage(k: int) -> float:  # P(k <= B <= n - k), B ~ Binomial(n, 1/2)
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return statistics.median(ordered), ordered[k - 1], ordered[n - k], coverage(k)
