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

from compress.config import RecipeError, TrainStage
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


def train_model(cfg: TrainStage, model: nn.Module, ctx: StageContext, objective=None, on_step=None,
                desc: str = 'train') -> tuple[nn.Module, dict]:
    """Train ``model`` on the training split; returns the trained (unwrapped, eval-mode) model and a summary.

    With several processes the loader is sharded: steps, the learning-rate schedule and ``on_step`` count this
    process's steps (each one optimizer step of the global batch), so every process runs the same schedule.

    Args:
        cfg: optimisation settings (a :class:`TrainStage` or a stage config extending it).
        model: the model to train (in place); every trainable part the objective uses must be inside it, so one
            (DDP) forward covers it.
        ctx: the stage context.
        objective: ``(model, images, labels) -> (loss, logits)``; default cross-entropy with label smoothing.
        on_step: called as ``on_step(step, total_steps, model)`` before each step (e.g. QAT freezing schedules).
        desc: progress-bar label.
    """
    accelerator = ctx.accelerator
    if ctx.data.train is None:
        raise ValueError('the train stage needs a training split')
    batch_size = cfg.batch_size or ctx.data_cfg.batch_size
    loader = make_loader(ctx.data.train, batch_size, ctx.data_cfg.workers, shuffle=True, seed=ctx.seed,
                         drop_last=True)
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, cfg.weight_decay), lr=cfg.lr)
    objective = objective or CrossEntropyObjective(cfg.label_smoothing)
    _train_mode(model)
    # the scheduler stays outside prepare(): Accelerate would step a prepared scheduler once per process per step
    raw_optimizer = optimizer
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = len(loader)  # this process's shard
    if steps_per_epoch == 0:
        raise RecipeError(f'data.batch_size: {len(ctx.data.train)} training images make no batch of {batch_size} '
                          f'per process; lower the batch size')
    total_steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        raw_optimizer, _cosine_with_warmup(total_steps, max(1, int(cfg.warmup_fraction * total_steps))))
    step, running_loss, running_correct, seen = 0, 0.0, 0, 0
    progress = tqdm(total=total_steps, desc=desc, disable=None if accelerator.is_local_main_process else True,
                    leave=False)
    while step < total_steps:
        for images, labels, _ in loader:
            if on_step is not None:
                on_step(step, total_steps, accelerator.unwrap_model(model))
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
    return model.cpu(), {'steps': total_steps, 'processes': accelerator.num_processes,
                         'global_batch': batch_size * accelerator.num_processes,
                         'train_loss': round(running_loss / max(1, seen), 4),
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
