"""Control rows: what a compressed model is compared with, besides the model it started from.

``finetune``: the uncompressed model trained with the recipe's own training stages (same order, budget, data,
schedule and distillation settings; pruning, quantization and export skipped; a QAT stage trains in float with its
settings). Fine-tuning alone can move top-1 (on data shifted from the checkpoint's, such as the JPEG CIFAR-10
here, it raises it), so a compressed row is honest only against an equally fine-tuned model.
"""
from __future__ import annotations

import copy
import dataclasses
import time

from torch import nn

from compress.config import DistillStage, QatInt8Stage, TrainStage
from compress.deploy import deploy_form
from compress.stages.base import StageContext, StageResult
from compress.stages.distill import apply_distill
from compress.stages.train import apply_train

__all__ = ['finetune_control']


def _float_training(stage) -> TrainStage | None:
    """The float training a stage does, as a train or distill config; None for stages that do not train."""
    if isinstance(stage, QatInt8Stage):
        fields = {f.name: getattr(stage, f.name) for f in dataclasses.fields(DistillStage) if f.name != 'kind'}
        if stage.alpha > 0:
            return DistillStage(**fields)
        return TrainStage(**{k: v for k, v in fields.items() if k in {f.name for f in dataclasses.fields(TrainStage)}})
    if isinstance(stage, (DistillStage, TrainStage)):
        return stage
    return None


def finetune_control(stages: list, model: nn.Module, ctx: StageContext) -> StageResult:
    """Train a copy of the uncompressed ``model`` with every training stage of the recipe, in order."""
    start = time.perf_counter()
    model = copy.deepcopy(model)
    done = []
    for stage in stages:
        training = _float_training(stage)
        if training is None:
            continue
        apply = apply_distill if isinstance(training, DistillStage) else apply_train
        model = apply(training, model, ctx)[0].next_model
        done.append(f'{stage.kind} ({training.epochs:g} epochs, lr {training.lr:g}'
                    + (f', KD alpha {training.alpha:g}' if isinstance(training, DistillStage) else '') + ')')
    return StageResult(
        name='control[finetune]', kind='control', artifact=deploy_form(model), float_model=model, next_model=None,
        seconds=time.perf_counter() - start,
        notes=['the uncompressed model trained like the compressed one: ' + ', then '.join(done)],
        info={'control': 'finetune', 'trained_as': done},
    )
