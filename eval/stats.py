"""Bootstrap intervals over images: eval sets here are small (1,001 ImageNet images), so every accuracy and
every before→after delta carries a 95 % interval."""
from __future__ import annotations

import base64

import numpy as np

__all__ = ['bootstrap_ci', 'paired_delta_ci', 'pack_bits', 'unpack_bits']


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


def _mean_ci(values: np.ndarray, samples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1) * 100
    return round(float(np.percentile(means, 2.5)), 2), round(float(np.percentile(means, 97.5)), 2)


def pack_bits(correct: np.ndarray) -> str:
    """Per-image 0/1 results as base64 text, so records stay small and deltas can be recomputed."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode('ascii')


def unpack_bits(text: str, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), dtype=np.uint8))[:count].astype(bool)
