"""What every stage receives and returns.

A stage is a function ``apply(cfg, model, ctx) -> list[StageResult]``: it takes the float model the previous
stage left, applies its transformation, and returns what it made, one result per variant (a quantization stage
with two backends returns two). Measuring the results (accuracy, complexity, coverage, speed) is the
evaluator's job alone. No base class: stages share this data, not behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from compress.config import DataConfig, EvalConfig, first_line
from compress.data import DataBundle

_OWN_CODE = tuple(str(Path(__file__).resolve().parents[2] / package) for package in ('compress', 'eval'))
_PROGRAMMING_ERRORS = (AttributeError, NameError, TypeError, KeyError, IndexError, AssertionError, SyntaxError)


def backend_failure(error: BaseException) -> str:
    """The one-line reason a backend (torch.export, NNCF, OpenVINO, torchao) could not transform the model: a
    limitation the record keeps. A programming error raised in this project's own code is a bug, not a result: it
    is raised again, never turned into a row."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    raised_here = frame is not None and frame.tb_frame.f_code.co_filename.startswith(_OWN_CODE)
    if raised_here and isinstance(error, _PROGRAMMING_ERRORS):
        raise error
    return f'{type(error).__name__}: {first_line(error)}'


def layers_not_taken(layers: list[dict]) -> str:
    """One line for the layers a backend did not take, counted by reason (each item has a ``why``)."""
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer['why']] = counts.get(layer['why'], 0) + 1
    return '; '.join(f'{count} layer(s): {why}' for why, count in counts.items())


@dataclass
class StageContext:
    accelerator: Any
    data: DataBundle
    data_cfg: DataConfig
    eval_cfg: EvalConfig
    input_size: tuple[int, int, int]
    seed: int = 0
    initial_model: nn.Module | None = None   # the model before the first stage (the default KD teacher)
    data_config: dict | None = None          # the resolved preprocessing (mean, std, input size)
    previous: list = field(default_factory=list)  # the previous stage's results (export writes their artifact)
    output_dir: str | None = None            # where the run writes its record (exports go next to it)


@dataclass
class StageResult:
    """What one stage made: the artifact as it ships, and what the stage knows about how it made it.

    ``artifact`` is a float module in its deploy form, a PT2E int8 graph, a module with torchao weights or an
    OpenVINO model; ``None`` when the stage could not make it, and then ``failed`` says why (the record keeps
    the reason; no table row claims a result that does not exist).
    """
    name: str
    kind: str
    artifact: Any
    float_model: nn.Module                   # the float model it came from: params and MACs are counted on it
    next_model: nn.Module | None             # what the next stage starts from (None after quantization)
    backend: str = 'torch'
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # facts of the transformation: calibration images, NNCF settings, layers it could not take and why, ...
    info: dict = field(default_factory=dict)
    # artifacts made along the way that give a row its context, timed next to it (e.g. 'openvino fp32')
    references: dict[str, Any] = field(default_factory=dict)
    files: list[str] | None = None           # what ships on disk, when the stage wrote files (export)
    failed: str | None = None
