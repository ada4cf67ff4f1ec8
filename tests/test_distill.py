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


def _cifar_context(augment: str = 'none'):
    from accelerate import Accelerator
    from compress.config import DataConfig, EvalConfig
    from compress.data import DataBundle, SyntheticShapes, attach_transforms
    from compress.stages.base import StageContext
    bundle = DataBundle('synthetic', 10, SyntheticShapes('eval', 32), None, SyntheticShapes('train', 64), 'eval')
    cfg = {'input_size': (3, 32, 32), 'mean': (0.5,) * 3, 'std': (0.25,) * 3, 'interpolation': 'bilinear',
           'crop_pct': 1.0, 'crop_mode': 'center'}
    attach_transforms(bundle, cfg, augment)
    return StageContext(Accelerator(cpu=True), bundle, DataConfig(batch_size=16, workers=0),
                        EvalConfig(compile=False), (3, 32, 32), initial_model=None, data_config=cfg)


def test_channels_last_training_matches_nchw_and_returns_nchw():
    from compress.stages.families import rules_for
    from compress.stages.train import train_model
    assert rules_for(timm.create_model('test_resnet_cifar')).channels_last_training
    context, cfg = _cifar_context(), DistillStage(epochs=1, lr=1e-3)  # 4 steps of logit KD
    trained, layouts = {}, []
    for channels_last in (False, True):
        torch.manual_seed(0)
        teacher, student = timm.create_model('test_resnet_cifar'), timm.create_model('test_resnet_cifar')
        objective = DistillationObjective(teacher, cfg)
        model, _ = train_model(cfg, student, context, objective=objective, channels_last=channels_last,
                               on_step=lambda step, total, m: layouts.append(
                                   m.conv1.weight.is_contiguous(memory_format=torch.channels_last)))
        trained[channels_last] = model
    assert layouts == [False] * 4 + [True] * 4  # the second run trained in channels-last memory
    for (name, nchw), channels_last in zip(trained[False].state_dict().items(), trained[True].state_dict().values()):
        assert channels_last.is_contiguous(), name  # returned in the default layout: export and pruning see NCHW
        torch.testing.assert_close(channels_last, nchw, rtol=1e-3, atol=1e-4, msg=name)


def test_a_teacher_without_the_channels_last_rule_gets_nchw_images():
    class FlatteningTeacher(torch.nn.Module):  # views its input as NCHW-contiguous, as some attention code does
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3 * 32 * 32, 10)

        def forward(self, images):
            return self.head(images.view(images.shape[0], -1))

    images = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match='view'):
        FlatteningTeacher()(images)
    objective = DistillationObjective(FlatteningTeacher(), DistillStage())
    student = timm.create_model('test_resnet_cifar').to(memory_format=torch.channels_last)
    loss, _ = objective(student, images, torch.randint(0, 10, (4,)))
    assert torch.isfinite(loss)
