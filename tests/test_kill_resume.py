"""Killed and resumed: a real run killed with SIGKILL in the middle of a training stage resumes after its last
finished stage and ends with the numbers of an uninterrupted run (default augmentation, loader workers)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPE = """
name: killed
model: {{name: test_resnet_cifar}}
data: {{source: synthetic, synthetic_train: 512, synthetic_eval: 64, synthetic_calib: 32, batch_size: 32,
       workers: 2}}
stages:
  - {{kind: train, epochs: 1, lr: 0.01}}
  - {{kind: prune, ratio: 0.25, round_to: null}}
  - {{kind: distill, epochs: 2, lr: 0.002}}
eval: {{throughput: false, compile: false, bf16: false, bootstrap: 100}}
output: {{dir: {out}}}
"""


def start(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / 'compress' / 'run.py'), str(recipe)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)


def finished(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=900)
    assert process.returncode == 0
    return json.loads(Path(out.strip().splitlines()[-1]).read_text())


@pytest.mark.slow
def test_sigkill_in_a_training_stage_then_resume_gives_the_same_record(tmp_path):
    whole = tmp_path / 'whole.yaml'
    whole.write_text(RECIPE.format(out=tmp_path / 'runs_whole'))
    uninterrupted = finished(start(whole))

    recipe = tmp_path / 'killed.yaml'
    recipe.write_text(RECIPE.format(out=tmp_path / 'runs'))
    process = start(recipe)
    for line in process.stdout:  # without a terminal, training logs every 10 % of its steps
        if line.lstrip().startswith('distill step'):
            break
    os.killpg(process.pid, signal.SIGKILL)  # inside distill's training: the run and its loader workers, no cleanup
    process.wait()
    progress = tmp_path / 'runs' / 'killed'
    assert list(progress.rglob('after-stage-2.pt')) and not list(progress.glob('*.json'))  # no record

    resumed = finished(start(recipe))
    assert resumed['resumed_after_stage'] == 2
    for before, after in zip(uninterrupted['stages'], resumed['stages'], strict=True):
        assert before['name'] == after['name']
        for key in ('top1', 'top5', 'correct1_bits', 'params_m', 'gmacs', 'size_mb', 'precision'):
            assert before['metrics'][key] == after['metrics'][key], (before['name'], key)


WRITER = """
import sys
from compress.record import write_record
write_record({'recipe': {'name': 'demo'}, 'git_hash': 'abc', 'padding': 'x' * 400_000_000}, sys.argv[1])
"""


def test_sigkill_while_the_record_is_written_leaves_no_record_and_the_next_run_cleans_up(tmp_path):
    from compress.record import write_record
    from eval.tables import load_records
    writer = subprocess.Popen([sys.executable, '-c', WRITER, str(tmp_path)], cwd=ROOT, start_new_session=True)
    folder = tmp_path / 'demo'
    while writer.poll() is None and not list(folder.glob('.record-*.tmp')):
        pass  # the temporary file appears when the write begins; the 400 MB write takes a while
    os.killpg(writer.pid, signal.SIGKILL)
    writer.wait()
    (partial,) = folder.glob('.record-*.tmp')  # killed before its link: the partial file has a hidden name
    assert not list(folder.glob('*.json')) and not load_records(tmp_path, newest_only=False)
    os.utime(partial, (0, 0))  # a writer dead for long enough: the next record removes what it left
    write_record({'recipe': {'name': 'demo'}, 'git_hash': 'abc'}, tmp_path)
    assert not partial.exists() and len(list(folder.glob('*.json'))) == 1
