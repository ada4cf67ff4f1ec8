"""What every stage receives and returns.

A stage is a function ``apply(cfg, model, ctx) -> list[StageResult]``: it takes the float model the previous
stage left and returns one result per variant it made (a quantization stage with two backends returns two).
No base class: stages share this data, not behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from compress.config import DataConfig, EvalConfig
from compress.data import DataBundle


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
    previous: list = field(default_factory=list)  # the previous stage's results (export ships their runner)
    output_dir: str | None = None            # where the run writes its record (exports go next to it)


@dataclass
class StageResult:
    """One row of the results: the model a stage produced, in the form it is deployed."""
    name: str
    kind: str
    runner: Any
    float_model: nn.Module
    next_model: nn.Module | None
    precision: str = 'fp32'
    backend: str = 'torch'
    seconds: float = 0.0
    coverage: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # other forms timed next to this one for context (e.g. 'openvino_fp32'): throughput only, no accuracy
    reference_runners: dict[str, Any] = field(default_factory=dict)
