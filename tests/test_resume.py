"""An interrupted run resumes after its last finished stage and ends with the same results."""
import pytest
from accelerate import Accelerator

from compress import stages as stage_registry
from compress.config import load_recipe
from compress.pipeline import run_recipe

RECIPE = """
name: resume_demo
model: {name: test_resnet_cifar}
data: {source: synthetic, synthetic_train: 512, synthetic_eval: 128, synthetic_calib: 64, workers: 0,
       train_augment: none}
stages:
  - {kind: train, epochs: 1, lr: 0.01}
  - {kind: prune, ratio: 0.25, round_to: null}
  - {kind: distill, epochs: 1, lr: 0.002}
eval: {throughput: false, compile: false, bootstrap: 100}
"""


def _accuracies(record):
    return [(s['name'], s['metrics']['top1']) for s in record['stages']]


def test_interrupted_run_resumes_with_identical_results(tmp_path, monkeypatch):
    path = tmp_path / 'r.yaml'
    path.write_text(RECIPE + f'output: {{dir: {tmp_path / "runs"}}}\n')
    cfg = load_recipe(path)
    uninterrupted = run_recipe(cfg, Accelerator(cpu=True))
    assert not list((tmp_path / 'runs').rglob('.progress-*'))  # cleaned up after a complete run

    cfg = load_recipe(path, [f'output.dir={tmp_path / "runs2"}'])
    real_distill = stage_registry.STAGES['distill']

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setitem(stage_registry.STAGES, 'distill', killed)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(cfg, Accelerator(cpu=True))
    assert list((tmp_path / 'runs2').rglob('after-stage-2.pt'))
    monkeypatch.setitem(stage_registry.STAGES, 'distill', real_distill)
    resumed = run_recipe(cfg, Accelerator(cpu=True))
    assert resumed['resumed_after_stage'] == 2
    assert _accuracies(resumed) == _accuracies(uninterrupted)


def test_progress_written_by_other_code_is_not_resumed(tmp_path, monkeypatch, capsys):
    import compress.pipeline
    path = tmp_path / 'r.yaml'
    path.write_text(RECIPE + f'output: {{dir: {tmp_path / "runs"}}}\n')
    cfg = load_recipe(path)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compress.pipeline, 'git_hash', lambda: 'aaaaaaaaaaaa')
    monkeypatch.setitem(stage_registry.STAGES, 'distill', killed)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(cfg, Accelerator(cpu=True))
    monkeypatch.undo()
    monkeypatch.setattr(compress.pipeline, 'git_hash', lambda: 'bbbbbbbbbbbb')
    capsys.readouterr()
    record = run_recipe(cfg, Accelerator(cpu=True))
    assert record['resumed_after_stage'] is None and record['git_hash'] == 'bbbbbbbbbbbb'
    assert 'was written by code aaaaaaaaaaaa, this is bbbbbbbbbbbb: not resumed, the run starts over' in \
        capsys.readouterr().out
