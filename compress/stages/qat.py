"""Stage ``qat_int8``: quantization-aware training to the same deployable int8 as ``ptq_int8`` (x86_pt2e).

``torch.export`` (dynamic batch) → ``prepare_qat_pt2e`` with ``X86InductorQuantizer(is_qat=True)`` (conv + BN
are fused into a fake-quantized conv with BN folding) → the project's training loop, optionally with the KD
objective of ``distill`` → observers frozen at ``freeze_observers_at`` of the steps, BN statistics at
``freeze_bn_at`` → ``convert_pt2e`` → ``torch.compile``. Note: PT2E QAT divides by BN gamma; a randomly
initialised timm model with zero-initialised last BN gammas diverges (use trained weights).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from compress.config import QatInt8Stage
from compress.data import calibration_batches
from compress.deploy import deploy_form
from compress.stages.base import StageContext, StageResult
from compress.stages.distill import DistillationObjective, _renormalization, build_teacher
from compress.stages.ptq_int8 import x86_reduce_range
from compress.stages.train import train_model

__all__ = ['apply_qat_int8', 'convert_qat_x86', 'prepare_qat_x86']


def prepare_qat_x86(model: nn.Module, example: torch.Tensor, reduce_range: bool | None = None
                    ) -> torch.fx.GraphModule:
    """Export in training form and insert fake quantization as X86InductorQuantizer wants it for QAT
    (``reduce_range``: activations in 7 bits; default: as :func:`compress.stages.ptq_int8.x86_reduce_range` decides
    for this CPU)."""
    if reduce_range is None:
        reduce_range = x86_reduce_range(None)[0]
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    batch = torch.export.Dim('batch', min=1, max=4096)
    exported = torch.export.export(model.train(), (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True, reduce_range=reduce_range))
    return prepare_qat_pt2e(exported, quantizer)


def convert_qat_x86(prepared: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """torchao's ``convert_pt2e`` of a QAT graph (in eval form), its conv + BN fold asked only for the kinds of
    convolution the graph holds.

    torchao (the pinned version) folds conv1d, conv2d, conv_transpose1d and conv_transpose2d in turn, each by
    exporting 24 pattern graphs whether or not the graph has such a convolution (twice over on a CUDA machine): most
    of a convert's time, and for a 2-D CNN three quarters of it go to patterns that cannot match. A kind absent from
    the graph is skipped; the result is the graph torchao's own convert makes (tests/test_qat.py compares them). A
    graph with no convolution at all goes through torchao unchanged."""
    from torchao.quantization.pt2e import qat_utils
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    fold_one_kind = qat_utils._fold_conv_bn_qat_helper
    kinds = {torch.nn.functional.conv1d: torch.ops.aten.conv1d, torch.nn.functional.conv2d: torch.ops.aten.conv2d,
             torch.nn.functional.conv_transpose1d: torch.ops.aten.conv_transpose1d,
             torch.nn.functional.conv_transpose2d: torch.ops.aten.conv_transpose2d}
    present = {getattr(node.target, 'overloadpacket', None) for node in prepared.graph.nodes}
    if not present & set(kinds.values()):
        return convert_pt2e(prepared)

    def fold_if_present(graph, conv_fn, *args, **kwargs):
        if conv_fn in kinds and kinds[conv_fn] not in present:
            return graph
        return fold_one_kind(graph, conv_fn, *args, **kwargs)

    qat_utils._fold_conv_bn_qat_helper = fold_if_present  # what torchao's _fold_conv_bn_qat calls, for this convert
    try:
        return convert_pt2e(prepared)
    finally:
        qat_utils._fold_conv_bn_qat_helper = fold_one_kind


class _FreezeSchedule:
    """Fixes the quantization ranges, then the BN statistics, at given fractions of the training steps."""

    def __init__(self, observers_at: float, bn_at: float):
        self.observers_at, self.bn_at = observers_at, bn_at
        self.observers_frozen = self.bn_frozen = False

    def __call__(self, step: int, total: int, model: nn.Module) -> None:
        from torchao.quantization.pt2e import disable_observer, move_exported_model_to_eval
        if not self.observers_frozen and step >= self.observers_at * total:
            model.apply(disable_observer)
            self.observers_frozen = True
        if not self.bn_frozen and step >= self.bn_at * total:
            # the exported graph's batch norms switch to running statistics; weights keep training
            move_exported_model_to_eval(model)
            self.bn_frozen = True


def apply_qat_int8(cfg: QatInt8Stage, model: nn.Module, ctx: StageContext) -> list[StageResult]:
    from torchao.quantization.pt2e import move_exported_model_to_eval
    start = time.perf_counter()
    deploy_model = deploy_form(model)
    example = calibration_batches(ctx.data.train, 2, 2, 0, ctx.seed)[0]
    reduce_range, why = x86_reduce_range(cfg.reduce_range)
    prepared = prepare_qat_x86(deploy_model, example, reduce_range)
    notes = [f'activations in 7 bits (reduce_range: {why})'] if reduce_range else []
    objective = None
    if cfg.alpha > 0:
        teacher, teacher_name = build_teacher(cfg, ctx)
        objective = DistillationObjective(teacher, cfg, renormalize=_renormalization(teacher, ctx),
                                          device=ctx.accelerator.device)
        notes.append(f'KD from {teacher_name}, T={cfg.temperature}, alpha={cfg.alpha}')
    schedule = _FreezeSchedule(cfg.freeze_observers_at, cfg.freeze_bn_at)
    prepared, summary = train_model(cfg, prepared, ctx, objective=objective, on_step=schedule, desc='qat')
    converted = convert_qat_x86(move_exported_model_to_eval(prepared))
    notes.append(f'{summary["steps"]} QAT steps; observers frozen at {cfg.freeze_observers_at:.0%}, BN at '
                 f'{cfg.freeze_bn_at:.0%}')
    return [StageResult(
        name='qat_int8[x86_pt2e]', kind='qat_int8', artifact=converted, float_model=model, next_model=None,
        backend='x86_pt2e', seconds=time.perf_counter() - start, notes=notes,
        info={'qat': summary, 'reduce_range': {'on': reduce_range, 'why': why}},
    )]
