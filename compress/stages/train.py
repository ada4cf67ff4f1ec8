"""Stage ``train``: short supervised training with Accelerate (AdamW, warm-up + cosine, label smoothing).

Used by recipes that make their own baseline (the quickstart, CIFAR) and, later, by recovery fine-tuning.
"""
from __future__ import annotations

import math
import time

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from tqdm.auto import tqdm

from compress.config import TrainStage
from compress.data import make_loader
from compress.deploy import deploy_form
from compress.stages.base import StageContext, StageResult

__all__ = ['apply_train', 'train_model']


def _cosine_with_warmup(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


class CrossEntropyObjective:
    """The supervised loss: ``(model, images, labels) -> (loss, logits)``."""

    def __init__(self, label_smoothing: float = 0.0):
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def __call__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor):
        logits = model(images)
        return self.loss_fn(logits, labels), logits


def train_model(cfg: TrainStage, model: nn.Module, ctx: StageContext, objective=None, extra: nn.Module | None = None,
                on_step=None, desc: str = 'train') -> tuple[nn.Module, dict]:
    """Train ``model`` on the training split; returns the trained (unwrapped, eval-mode) model and a summary.

    Args:
        cfg: optimisation settings (a :class:`TrainStage` or a stage config extending it).
        model: the model to train (in place).
        ctx: the stage context.
        objective: ``(model, images, labels) -> (loss, logits)``; default cross-entropy with label smoothing.
        extra: more trainable modules the objective uses (e.g. feature-distillation projections).
        on_step: called as ``on_step(step, total_steps, model)`` before each step (e.g. QAT freezing schedules).
        desc: progress-bar label.
    """
    accelerator = ctx.accelerator
    if ctx.data.train is None:
        raise ValueError('the train stage needs a training split')
    loader = make_loader(ctx.data.train, cfg.batch_size or ctx.data_cfg.batch_size, ctx.data_cfg.workers,
                         shuffle=True, seed=ctx.seed, drop_last=True)
    steps_per_epoch = len(loader)
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    groups = param_groups_weight_decay(model, cfg.weight_decay)
    if extra is not None:
        groups += param_groups_weight_decay(extra, cfg.weight_decay)
        extra.train()
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _cosine_with_warmup(total_steps, max(1, int(cfg.warmup_fraction * total_steps))))
    objective = objective or CrossEntropyObjective(cfg.label_smoothing)
    _train_mode(model)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    step, running_loss, running_correct, seen = 0, 0.0, 0, 0
    progress = tqdm(total=total_steps, desc=desc, disable=None if accelerator.is_local_main_process else True,
                    leave=False)
    while step < total_steps:
        for images, labels, _ in loader:
            if on_step is not None:
                on_step(step, total_steps, model)
            with accelerator.autocast():
                loss, logits = objective(model, images, labels)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            running_loss += loss.item() * len(labels)
            running_correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            step += 1
            progress.update(1)
            if step % 20 == 0:
                progress.set_postfix(loss=f'{running_loss / seen:.3f}', acc=f'{100 * running_correct / seen:.1f}')
            if progress.disable and step % max(1, total_steps // 10) == 0:  # logs without a terminal: every 10 %
                accelerator.print(f'  {desc} step {step}/{total_steps}: loss {running_loss / seen:.3f}, '
                                  f'train top-1 {100 * running_correct / seen:.1f}', flush=True)
            if step >= total_steps:
                break
    progress.close()
    model = _eval_mode(accelerator.unwrap_model(model))
    accelerator.free_memory()
    return model, {'steps': total_steps, 'train_loss': round(running_loss / max(1, seen), 4),
                   'train_top1': round(100 * running_correct / max(1, seen), 2)}


def _train_mode(model: nn.Module) -> nn.Module:
    if isinstance(model, torch.fx.GraphModule):  # exported graphs (PT2E QAT) switch modes through torchao
        from torchao.quantization.pt2e import move_exported_model_to_train
        return move_exported_model_to_train(model)
    return model.train()


def _eval_mode(model: nn.Module) -> nn.Module:
    if isinstance(model, torch.fx.GraphModule):
        from torchao.quantization.pt2e import move_exported_model_to_eval
        return move_exported_model_to_eval(model)
    return model.eval()


def apply_train(cfg: TrainStage, model: nn.Module, ctx: StageContext) -> list[StageResult]:
    start = time.perf_counter()
    model, summary = train_model(cfg, model, ctx)
    return [StageResult(
        name='train', kind='train', artifact=deploy_form(model), float_model=model, next_model=model,
        seconds=time.perf_counter() - start,
        notes=[f'{summary["steps"]} steps, final running loss {summary["train_loss"]}, '
               f'train top-1 {summary["train_top1"]}'],
        info={'train': summary},
    )]
