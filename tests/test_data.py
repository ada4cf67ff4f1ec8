"""Data sets: the embedded default is deterministic and learnable-looking; real folders map labels by wnid."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compress.config import DataConfig, RecipeError
from compress.data import ImageFolderByWnid, SyntheticShapes, build_datasets


def test_synthetic_is_deterministic_and_balanced():
    a, b = SyntheticShapes('train', 500), SyntheticShapes('train', 500)
    assert np.array_equal(a.render(7)[0], b.render(7)[0])
    assert not np.array_equal(a.render(7)[0], SyntheticShapes('eval', 500).render(7)[0])
    labels = np.array([a.render(i)[1] for i in range(500)])
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 25  # every class present, roughly uniform


def test_synthetic_classes_differ_in_structure_not_colour():
    # the mean colour carries no label information: a nearest-mean classifier on colour is near chance
    data = SyntheticShapes('train', 600)
    samples = [data.render(i) for i in range(600)]
    colours = np.array([img.reshape(-1, 3).mean(0) for img, _ in samples])
    labels = np.array([label for _, label in samples])
    means = np.stack([colours[labels == c].mean(0) for c in range(10)])
    predicted = np.argmin(((colours[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (predicted == labels).mean() < 0.25


def test_imagenet_subset_maps_folders_by_wnid(shared_data):
    dataset = ImageFolderByWnid(shared_data / 'imagenet-val-subset')
    synsets = [line.split()[0] for line in (shared_data / 'imagenet-val-subset.synsets.txt').read_text().splitlines()
               if line.strip()]
    assert dataset.num_classes == 1000 and len(dataset) == 1001
    folders = sorted(p.name for p in (shared_data / 'imagenet-val-subset').iterdir())
    assert len(folders) < 1000  # a subset: sorted folder order would give wrong indices
    for path, label in dataset.samples[::97]:
        assert synsets[label] == path.split('/')[-2]
    assert max(label for _, label in dataset.samples) > len(folders)


def test_non_imagenet_folder_names_need_sorted_index(tmp_path):
    (tmp_path / 'cats').mkdir()
    (tmp_path / 'cats' / 'a.png').write_bytes(b'')
    with pytest.raises(RecipeError, match='data.class_index'):
        ImageFolderByWnid(tmp_path)
    assert ImageFolderByWnid(tmp_path, 'sorted').num_classes == 1


def test_hf_parquet_splits_and_separate_calibration(shared_data):
    cfg = DataConfig(source='hf', root=str(shared_data / 'cifar10'), max_eval=100)
    bundle = build_datasets(cfg, need_calib=True, need_train=False)
    assert bundle.num_classes == 10 and len(bundle.eval) == 100 and len(bundle.calib) == 50000
    image, label, index = bundle.eval[3]
    assert image.size == (32, 32) and 0 <= label < 10
    # the test split is stored sorted by class: a subset is drawn over all of it, in index order, whatever the seed
    labels = [bundle.eval[i][1] for i in range(100)]
    indices = [bundle.eval[i][2] for i in range(100)]
    assert len(set(labels)) == 10 and indices == sorted(indices) and indices[-1] > 9000
    again = build_datasets(cfg, need_calib=False, need_train=False, seed=7)
    assert [again.eval[i][2] for i in range(100)] == indices


WORKER_CHECK = """
import sys, torch
from torchvision import transforms
from compress.data import ImageFolderByWnid, make_loader
data = ImageFolderByWnid(sys.argv[1])
data.transform = transforms.Compose([transforms.Resize(40), transforms.CenterCrop(32), transforms.ToTensor()])
subset = torch.utils.data.Subset(data, range(12))
loader = make_loader(subset, 4, workers=2, shuffle=True, seed=3)
assert loader.multiprocessing_context.get_start_method() == 'forkserver'
in_process = list(make_loader(subset, 4, workers=0, shuffle=True, seed=3))
for (images, labels, _), (expected_images, expected_labels, _) in zip(loader, in_process, strict=True):
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
print('same batches')
"""


def test_worker_processes_give_the_in_process_batches(shared_data):
    """Loaders with workers start them from a fork server (safe after OpenVINO / inductor threads exist).

    Run in a fresh interpreter: a fork server left running in the test process makes later plain forks (the
    2-process evaluation test's launcher) crash.
    """
    result = subprocess.run([sys.executable, '-c', WORKER_CHECK, str(shared_data / 'imagenet-val-subset')],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and 'same batches' in result.stdout, result.stderr[-2000:]


PRELOAD_CHECK = """
import sys
sys.path.insert(0, sys.argv[1])
from compress.data import make_loader
from loader_probe import ImportedModules
(imported,) = make_loader(ImportedModules(), batch_size=1, workers=1)
print('imported', imported.tolist())
"""


def test_loader_workers_start_with_the_models_already_imported():
    # a worker that imported torch, timm and the models itself would spend seconds of CPU at every epoch's start.
    # In a fresh interpreter, as above: no fork server may be left running in the test process
    result = subprocess.run([sys.executable, '-c', PRELOAD_CHECK, str(Path(__file__).parent)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and 'imported [[True, True]]' in result.stdout, result.stderr[-2000:]
