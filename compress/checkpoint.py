"""Checkpoints after each stage, so an interrupted run resumes after its last finished stage.

After every stage that leaves a float model (train, prune, distill), the model is saved as a whole module (a
pruned model is a new architecture: a fresh model cannot take its state dict) together with the record entries
so far; the models of earlier stages are kept, since the run times every stage's artifact at its end.
Re-running the same recipe (same model, data, stages and seed; eval and output settings may differ) finds that
progress and continues from there. Quantized results are not saved: the quantization stage is
final, deterministic and re-run. The folder is removed when the run completes.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from eval.stats import unpack_bits

__all__ = ['RunProgress', 'restore_metrics']


def restore_metrics(entry: dict, num_images: int) -> dict:
    """A stage's metrics as the pipeline holds them in memory (per-image results unpacked)."""
    metrics = dict(entry['metrics'])
    if 'correct1_bits' in metrics:
        metrics['_correct1'] = unpack_bits(metrics['correct1_bits'], num_images)
    return metrics


class RunProgress:
    """The progress folder of one recipe: ``<output dir>/<name>/.progress-<hash of what determines results>``."""

    def __init__(self, output_dir: str | os.PathLike, config: dict, writes: bool = True, code: str | None = None):
        identity = json.dumps({k: config[k] for k in ('model', 'data', 'stages', 'seed')}, sort_keys=True, default=str)
        digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
        self.dir = Path(output_dir) / config['name'] / f'.progress-{digest}'
        self.writes = writes  # every process reads the progress; one writes it
        self.code = code  # the git hash of the running code: pickled modules only go back into the code that wrote them
        self.refused: str | None = None

    def load(self) -> dict | None:
        """The saved progress (``entries``, ``completed`` stages, ``before`` stage name), or None.

        Progress written by other code is not unpickled (``refused`` says why): its modules would be rebuilt by
        classes that may have changed, and its metrics would mix two versions of the code.
        """
        path = self.dir / 'progress.json'
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if state.get('code') != self.code:
            self.refused = (f'progress in {self.dir} was written by code {state.get("code")}, this is {self.code}: '
                            f'not resumed, the run starts over')
            return None
        models = state.get('models', {})
        return state if models and all((self.dir / file).is_file() for file in models.values()) else None

    def restore_models(self, state: dict) -> dict[str, nn.Module]:
        """The float model each finished stage left, by the name of its row."""
        # our own files, written by save() below: whole pickled modules
        return {name: torch.load(self.dir / file, map_location='cpu', weights_only=False).eval()
                for name, file in state['models'].items()}

    def save(self, entries: list[dict], completed: int, before: str, model: nn.Module) -> None:
        """Record the entries so far and the float model that stage ``completed`` left (row ``before``)."""
        if not self.writes:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        previous = self.load()
        if previous is None and self.dir.exists():  # another code version's progress: replaced, not mixed
            shutil.rmtree(self.dir)
            self.dir.mkdir(parents=True)
        models = dict(previous['models']) if previous else {}
        models[before] = f'after-stage-{completed}.pt'
        _atomic(self.dir / models[before], lambda handle: torch.save(model, handle), binary=True)
        state = {'entries': entries, 'completed': completed, 'before': before, 'models': models, 'code': self.code}
        _atomic(self.dir / 'progress.json', lambda handle: handle.write(json.dumps(state, default=str)))

    def clear(self) -> None:
        if self.writes and self.dir.exists():
            shutil.rmtree(self.dir)


def _atomic(path: Path, write, binary: bool = False) -> None:
    with tempfile.NamedTemporaryFile('wb' if binary else 'w', dir=path.parent, delete=False) as handle:
        write(handle)
        temporary = Path(handle.name)
    os.replace(temporary, path)
