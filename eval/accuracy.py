"""Top-1 / top-5 accuracy with Accelerate, correct with several processes.

``gather_for_metrics`` drops the samples a distributed sampler repeats to even out the last batch, and every
image carries its data-set index, so the per-image results come back in one fixed order whatever the number of
processes: that order is what the paired before/after intervals resample.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from eval.stats import bootstrap_ci

__all__ = ['evaluate_accuracy']


def evaluate_accuracy(runner, loader, accelerator, bootstrap: int = 1000, desc: str = 'eval') -> dict:
    """Score a runner (any callable images → logits) on a loader of ``(images, labels, indices)`` batches.

    Compiled runners have a ``fixed_batch``: a short last batch is padded up to it and the padding dropped. The
    loader's batches come on the accelerator's device; runners move them where they run (PT2E and OpenVINO: the
    CPU) and the results are gathered on the accelerator's device.

    Returns:
        ``top1``, ``top5`` (in %), their 95 % bootstrap intervals, ``num_images`` and the per-image 0/1 vectors
        ``correct1`` / ``correct5`` in data-set index order.
    """
    loader = accelerator.prepare_data_loader(loader)
    fixed = getattr(runner, 'fixed_batch', None)
    indices, hits1, hits5 = [], [], []
    for images, labels, index in tqdm(loader, desc=desc, leave=False,
                                      disable=None if accelerator.is_local_main_process else True):
        count = images.shape[0]
        if fixed and count < fixed:
            images = torch.cat([images, images.new_zeros((fixed - count, *images.shape[1:]))])
        with torch.no_grad():
            logits = runner(images)[:count].float().to(labels.device)  # CPU-only runtimes answer on the CPU
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit1 = top5[:, 0] == labels
        hit5 = (top5 == labels[:, None]).any(dim=1)
        hit1, hit5, index = accelerator.gather_for_metrics((hit1, hit5, index))
        indices.append(index.cpu())
        hits1.append(hit1.cpu())
        hits5.append(hit5.cpu())
    order = torch.cat(indices).argsort()
    correct1 = torch.cat(hits1)[order].numpy()
    correct5 = torch.cat(hits5)[order].numpy()
    return {
        'top1': round(float(correct1.mean() * 100), 2),
        'top5': round(float(correct5.mean() * 100), 2),
        'top1_ci95': list(bootstrap_ci(correct1, bootstrap)),
        'top5_ci95': list(bootstrap_ci(correct5, bootstrap)),
        'num_images': int(len(correct1)),
        'correct1': correct1.astype(bool),
        'correct5': correct5.astype(bool),
    }


