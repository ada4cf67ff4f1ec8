"""Stage ``distill``: knowledge distillation as a training stage (Accelerate).

Loss = (1 − alpha) · cross-entropy(labels) + alpha · T² · KL(student_T ‖ teacher_T) + feature_weight · Σ_stages
normalised MSE(projection(student stage output), teacher stage output). The logit term is the one timm's
``LogitDistillationTask`` uses; the feature term uses the models' ``forward_intermediates`` and a learned 1x1
convolution per stage where the widths differ (after pruning they do). The teacher runs frozen, in eval mode,
on the same preprocessed images (re-normalised if its own mean/std differ).
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from compress.config import DistillStage, RecipeError
from compress.deploy import deploy_form
from compress.stages.base import StageContext, StageResult
from compress.stages.train import train_model

__all__ = ['DistillationObjective', 'apply_distill', 'build_teacher']


class DistillationObjective:
    """``(student, images, labels) -> (loss, logits)`` with logit and optional feature distillation."""

    def __init__(self, teacher: nn.Module, cfg: DistillStage, features: bool = False,
                 renormalize: tuple[torch.Tensor, torch.Tensor] | None = None, device: torch.device | str = 'cpu'):
        self.teacher = teacher.to(device).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.cfg = cfg
        self.features = features  # the student is a FeatureStudent: it returns (logits, projected stage outputs)
        # (scale, shift): teacher_input = images * scale + shift
        self.renormalize = None if renormalize is None else tuple(t.to(device) for t in renormalize)
        self.label_loss = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.last = {}

    def _teacher_outputs(self, images: torch.Tensor):
        if self.renormalize is not None:
            images = images * self.renormalize[0] + self.renormalize[1]
        with torch.no_grad():
            if not self.features:
                return self.teacher(images), None
            final, features = self.teacher.forward_intermediates(images)
            return self.teacher.forward_head(final), features

    def __call__(self, student: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        teacher_logits, teacher_features = self._teacher_outputs(images)
        if self.features:  # through the (DDP-wrapped) student's own forward, so gradients are synchronised
            logits, features = student(images)
        else:
            logits, features = student(images), None
        temperature = self.cfg.temperature
        kd = F.kl_div(F.log_softmax(logits / temperature, dim=-1), F.log_softmax(teacher_logits / temperature, dim=-1),
                      reduction='batchmean', log_target=True) * temperature ** 2
        task = self.label_loss(logits, labels)
        loss = (1 - self.cfg.alpha) * task + self.cfg.alpha * kd
        if features is not None:
            feature_loss = sum(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-6)
                               for s, t in zip(features, teacher_features))
            loss = loss + self.cfg.feature_weight * feature_loss
            self.last['feature_loss'] = float(feature_loss.detach())
        self.last.update(task_loss=float(task.detach()), kd_loss=float(kd.detach()))
        return loss, logits


class FeatureStudent(nn.Module):
    """The student with its feature-KD projections, as one module: under DDP everything trainable goes through
    one wrapped forward (and its gradient synchronisation), projections included. ``model`` is the student."""

    def __init__(self, model: nn.Module, projections: nn.ModuleList):
        super().__init__()
        self.model, self.projections = model, projections

    def forward(self, images: torch.Tensor):
        final, features = self.model.forward_intermediates(images)
        return self.model.forward_head(final), [project(f) for project, f in zip(self.projections, features)]


def build_teacher(cfg: DistillStage, ctx: StageContext) -> tuple[nn.Module, str]:
    if cfg.teacher is None:
        if ctx.initial_model is None:
            raise RecipeError('distill.teacher: no teacher: name one with teacher: {name: ..., checkpoint: ...}')
        return copy.deepcopy(ctx.initial_model), 'the model before the first stage'
    from compress.factory import build_model
    teacher, _, notes = build_model(cfg.teacher, ctx.data.num_classes, key='teacher')
    return teacher, f'{cfg.teacher.name} ({"; ".join(notes)})'


def _renormalization(teacher: nn.Module, ctx: StageContext):
    """Scale and shift that turn the student's normalised images into the teacher's normalisation."""
    from timm.data import resolve_data_config
    student_cfg = ctx.data_config or {}
    teacher_cfg = resolve_data_config(model=teacher)
    if not student_cfg or (tuple(student_cfg['mean']) == tuple(teacher_cfg['mean'])
                           and tuple(student_cfg['std']) == tuple(teacher_cfg['std'])):
        return None
    mean_s, std_s = (torch.tensor(student_cfg[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    mean_t, std_t = (torch.tensor(teacher_cfg[k]).view(1, 3, 1, 1) for k in ('mean', 'std'))
    return std_s / std_t, (mean_s - mean_t) / std_t


def _stage_outputs(model: nn.Module, input_size) -> list[torch.Tensor]:
    # each on its own device: the teacher already sits on the accelerator, the student is moved there later
    probe = torch.zeros(1, *input_size, device=next(model.parameters()).device)
    with torch.no_grad():
        return model.eval().forward_intermediates(probe)[1]


def _feature_projections(student: nn.Module, teacher: nn.Module, input_size) -> nn.ModuleList:
    for name, model in (('student', student), ('teacher', teacher)):
        if not hasattr(model, 'forward_intermediates'):
            raise RecipeError(f'distill.feature_weight: the {name} has no forward_intermediates; set feature_weight=0')
    student_features, teacher_features = (_stage_outputs(model, input_size) for model in (student, teacher))
    if len(student_features) != len(teacher_features):
        raise RecipeError('distill.feature_weight: student and teacher have different numbers of stages')
    projections = []
    for s, t in zip(student_features, teacher_features):
        if s.shape[-2:] != t.shape[-2:]:
            raise RecipeError('distill.feature_weight: stage outputs differ in resolution; set feature_weight=0')
        projections.append(nn.Identity() if s.shape[1] == t.shape[1] else nn.Conv2d(s.shape[1], t.shape[1], 1))
    return nn.ModuleList(projections)


def apply_distill(cfg: DistillStage, model: nn.Module, ctx: StageContext) -> list[StageResult]:
    start = time.perf_counter()
    teacher, teacher_name = build_teacher(cfg, ctx)
    features = cfg.feature_weight > 0
    objective = DistillationObjective(teacher, cfg, features, _renormalization(teacher, ctx), ctx.accelerator.device)
    student = FeatureStudent(model, _feature_projections(model, teacher, ctx.input_size)) if features else model
    student, summary = train_model(cfg, student, ctx, objective=objective, desc='distill')
    model = student.model if features else student
    losses = ', '.join(f'{k} {v:.3f}' for k, v in objective.last.items())
    return [StageResult(
        name='distill', kind='distill', artifact=deploy_form(model), float_model=model, next_model=model,
        seconds=time.perf_counter() - start,
        notes=[f'teacher: {teacher_name}; T={cfg.temperature}, alpha={cfg.alpha}, feature_weight={cfg.feature_weight}',
               f'{summary["steps"]} steps; last batch: {losses}'],
        info={'distill': {**summary, 'teacher': teacher_name}},
    )]
