"""Evaluator: exact accuracy, padding for compiled shapes, 2-process gathering, intervals, coverage of artifacts."""
import json

import numpy as np
import torch
from accelerate import Accelerator, debug_launcher
from torch.utils.data import DataLoader

from eval.accuracy import evaluate_accuracy
from eval.stats import bootstrap_ci, pack_bits, paired_delta_ci, unpack_bits


class Labelled(torch.utils.data.Dataset):
    """37 images whose class is encoded in pixel 0; the "model" reads it back, wrong on every 4th image."""

    def __len__(self):
        return 37

    def __getitem__(self, index):
        label = index % 7
        image = torch.zeros(3, 4, 4)
        image[0, 0, 0] = label if index % 4 else (label + 1) % 7
        return image, label, index


class PixelModel:
    fixed_batch = None

    def __call__(self, images):
        return torch.nn.functional.one_hot(images[:, 0, 0, 0].long(), 7).float() + torch.arange(7) * 1e-3


def expected_correct() -> np.ndarray:
    return np.array([i % 4 != 0 for i in range(37)])


def test_accuracy_is_exact_and_in_index_order():
    result = evaluate_accuracy(PixelModel(), DataLoader(Labelled(), batch_size=5), Accelerator(cpu=True))
    assert result['num_images'] == 37
    assert np.array_equal(result['correct1'], expected_correct())
    assert result['top1'] == round(100 * expected_correct().mean(), 2)
    logits = PixelModel()(torch.stack([Labelled()[i][0] for i in range(37)]))
    labels = torch.tensor([i % 7 for i in range(37)])
    expected_top5 = (logits.topk(5).indices == labels[:, None]).any(1).float().mean().item() * 100
    assert result['top5'] == round(expected_top5, 2) and result['top5'] > result['top1']


def test_short_last_batch_is_padded_for_fixed_shape_runners():
    seen = []

    class FixedShape(PixelModel):
        fixed_batch = 8

        def __call__(self, images):
            seen.append(images.shape[0])
            return super().__call__(images)

    result = evaluate_accuracy(FixedShape(), DataLoader(Labelled(), batch_size=8), Accelerator(cpu=True))
    assert set(seen) == {8} and result['num_images'] == 37


def _two_process_eval(out_path):
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)  # forked from a process that already had one
    accelerator = Accelerator(cpu=True)
    result = evaluate_accuracy(PixelModel(), DataLoader(Labelled(), batch_size=4), accelerator)
    if accelerator.is_main_process:
        with open(out_path, 'w') as handle:
            json.dump({'processes': accelerator.num_processes, 'num_images': result['num_images'],
                       'correct1': result['correct1'].tolist()}, handle)


def test_two_processes_gather_every_image_once(tmp_path):
    out = tmp_path / 'result.json'
    debug_launcher(_two_process_eval, args=(str(out),), num_processes=2)
    result = json.loads(out.read_text())
    assert result['processes'] == 2
    assert result['num_images'] == 37  # 37 is odd: the sampler repeats one image, gather_for_metrics drops it
    assert result['correct1'] == expected_correct().tolist()


def test_intervals():
    correct = np.random.default_rng(0).random(1000) < 0.8
    low, high = bootstrap_ci(correct, 500)
    assert low < 100 * correct.mean() < high and high - low < 6
    assert paired_delta_ci(correct, correct, 200) == (0.0, 0.0)
    flipped = correct.copy()
    flipped[:50] = True
    low, high = paired_delta_ci(correct, flipped, 500)
    assert 0 < low <= high
    assert np.array_equal(unpack_bits(pack_bits(correct), 1000), correct)


def test_coverage_reads_the_artifact_not_the_intent():
    from eval.coverage import weight_coverage
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 32))
    coverage = weight_coverage(model)
    assert coverage['float_weight_fraction'] == 1.0 and coverage['int8_weight_fraction'] == 0.0
    assert coverage['weight_elements'] == 3 * 4 * 9 + 64 * 32 and coverage['layer_counts']['float'] == 2
