"""Distillation: the loss matches timm's formula, feature projections bridge pruned widths, the stage recovers."""
import pytest
import timm
import torch
import torch.nn.functional as F

import compress.models  # noqa: F401
from compress.config import DistillStage, RecipeError
from compress.stages.distill import DistillationObjective, FeatureStudent, _feature_projections
from compress.stages.prune import prune_model
from compress.config import PruneStage


def test_logit_kd_loss_formula():
    torch.manual_seed(0)
    teacher = timm.create_model('test_resnet_cifar').eval()
    student = timm.create_model('test_resnet_cifar').eval()
    cfg = DistillStage(temperature=2.0, alpha=0.25, label_smoothing=0.0)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss, logits = DistillationObjective(teacher, cfg)(student, images, labels)
    with torch.no_grad():
        t = teacher(images)
    kd = F.kl_div(F.log_softmax(logits / 2, -1), F.softmax(t / 2, -1), reduction='batchmean') * 4
    expected = 0.75 * F.cross_entropy(logits, labels) + 0.25 * kd
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_feature_kd_projects_pruned_widths():
    teacher = timm.create_model('resnet20_cifar').eval()
    student, _ = prune_model(teacher, PruneStage(ratio=0.5), 0.5, torch.randn(2, 3, 32, 32))
    student.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)  # same widths: identity projections
    projections = _feature_projections(student, teacher, (3, 32, 32))
    assert all(isinstance(p, torch.nn.Identity) for p in projections)  # option-A: stage outputs keep widths
    cfg = DistillStage(feature_weight=1.0)
    objective = DistillationObjective(teacher, cfg, features=True)
    # the student and its projections are one module: under DDP one wrapped forward covers both
    loss, _ = objective(FeatureStudent(student, projections), torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    loss.backward()
    assert objective.last['feature_loss'] > 0
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_feature_kd_needs_matching_stages():
    with pytest.raises(RecipeError, match='forward_intermediates'):
        _feature_projections(torch.nn.Linear(3, 3), timm.create_model('test_resnet_cifar'), (3, 32, 32))


def test_distill_config_validation():
    with pytest.raises(RecipeError, match='alpha'):
        DistillStage(alpha=1.5)
