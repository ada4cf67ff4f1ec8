"""The `compress` command: a bad recipe is one line and exit code 2 before any launcher starts; a good one runs
through `accelerate launch` and prints the record's path last."""
import json
import subprocess
import sys
from pathlib import Path

from compress.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_bad_recipe_is_one_line_and_launches_nothing(tmp_path, capsys, monkeypatch):
    launched = []
    monkeypatch.setattr(subprocess, 'run', lambda *a, **k: launched.append(a))
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('name: t\nmodel: {name: test_resnet_cifar}\nstages: [{kind: train, epochs: -1}]\n')
    assert main([str(recipe)]) == 2
    assert capsys.readouterr().err.strip() == 'error: stages[0].epochs: must be positive'
    assert main([str(recipe), 'stages.0.epochs=1', '--launch']) == 2
    assert 'give the accelerate launch options as one string' in capsys.readouterr().err
    assert launched == []


def test_good_recipe_runs_through_accelerate_launch(tmp_path):
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('name: cli_demo\nmodel: {name: test_resnet_cifar}\n'
                      'data: {source: synthetic, synthetic_eval: 32, workers: 0}\n'
                      'eval: {throughput: false, compile: false, bf16: false, bootstrap: 100}\n'
                      f'output: {{dir: {tmp_path / "runs"}}}\n')
    done = subprocess.run([sys.executable, '-m', 'compress.cli', str(recipe), '--launch', '--num_processes 1 --cpu'],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads(Path(done.stdout.strip().splitlines()[-1]).read_text())
    assert record['recipe']['name'] == 'cli_demo' and record['stages'][0]['metrics']['num_images'] == 32
