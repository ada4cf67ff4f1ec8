"""Data: ImageNet-layout folders, Hugging Face datasets, and the embedded synthetic default.

Every dataset yields ``(image, label, index)``; the index lets the evaluator line up per-image results across
processes and across stages (paired bootstrap intervals). Transforms come from the model's own data config
(``timm.data.resolve_data_config``), overridden by the weights' needs and then by the recipe.
"""
from __future__ import annotations

import math
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from compress.config import DataConfig, RecipeError, first_line

__all__ = ['SyntheticShapes', 'ImageFolderByWnid', 'HFImages', 'DataBundle', 'build_datasets', 'attach_transforms',
           'make_loader']

IMAGE_EXTENSIONS = {'.jpg', '.jpeg', '.png', '.bmp', '.webp', '.ppm', '.tif', '.tiff'}


class SyntheticShapes(Dataset):
    """A deterministic generated classification set with real learnable structure.

    Class ``c`` fixes a shape (disc, square, diamond, ring, cross) and the orientation of the stripes that fill
    it (horizontal or vertical); colours, position, size, stripe period, background and noise are drawn from a
    generator seeded by (seed, split, index), so every image is reproducible with no files. Chance is
    1/num_classes; a small CNN learns it in a minute on a CPU.
    """

    SHAPES = ('disc', 'square', 'diamond', 'ring', 'cross')
    SPLIT_IDS = {'train': 0, 'eval': 1, 'calib': 2}

    def __init__(self, split: str, size: int, num_classes: int = 10, image_size: int = 32, seed: int = 0):
        self.split, self.size, self.num_classes, self.image_size, self.seed = split, size, num_classes, image_size, seed
        self.transform = None

    def __len__(self) -> int:
        return self.size

    def render(self, index: int) -> tuple[np.ndarray, int]:
        rng = np.random.default_rng([self.seed, self.SPLIT_IDS[self.split], index])
        label = int(rng.integers(self.num_classes))
        shape = self.SHAPES[label % len(self.SHAPES)]
        vertical = (label // len(self.SHAPES)) % 2 == 1
        n = self.image_size
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
        cx, cy = rng.uniform(0.3, 0.7, size=2)
        radius = rng.uniform(0.18, 0.32)
        dx, dy = xx - cx, yy - cy
        if shape == 'disc':
            mask = dx ** 2 + dy ** 2 < radius ** 2
        elif shape == 'square':
            mask = np.maximum(abs(dx), abs(dy)) < radius * 0.85
        elif shape == 'diamond':
            mask = abs(dx) + abs(dy) < radius * 1.2
        elif shape == 'ring':
            dist = np.sqrt(dx ** 2 + dy ** 2)
            mask = (dist < radius) & (dist > radius * 0.55)
        else:
            mask = (np.minimum(abs(dx), abs(dy)) < radius * 0.3) & (np.maximum(abs(dx), abs(dy)) < radius)
        period = rng.uniform(0.08, 0.16)
        phase = rng.uniform(0, 1)
        stripes = np.sin(2 * math.pi * ((xx if vertical else yy) / period + phase)) > 0
        colours = rng.uniform(0, 255, size=(3, 3)).astype(np.float32)  # background, stripe a, stripe b
        image = np.empty((n, n, 3), np.float32)
        image[:] = colours[0]
        image[mask & stripes] = colours[1]
        image[mask & ~stripes] = colours[2]
        image += rng.normal(0, 12, size=image.shape)
        return np.clip(image, 0, 255).astype(np.uint8), label

    def __getitem__(self, index: int):
        array, label = self.render(index)
        image = Image.fromarray(array)
        return (self.transform(image) if self.transform else image), label, index


class ImageFolderByWnid(Dataset):
    """An ImageNet-layout folder (``<class folder>/<image>``).

    With ``class_index='imagenet1k'`` folder names are WordNet ids mapped to the standard 1000-class indices, so a
    subset holding only some classes still gets the right labels; ``'sorted'`` numbers the folders in order.
    """

    def __init__(self, root: str | os.PathLike, class_index: str = 'imagenet1k', key: str = 'data.root'):
        self.root, self.key = Path(root), key
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise RecipeError(f'{key}: {self.root} holds no class folders (expected <class>/<image> files)')
        if class_index == 'imagenet1k':
            from timm.data import ImageNetInfo
            wnid_to_index = {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}
            unknown = [f for f in folders if f not in wnid_to_index]
            if unknown:
                raise RecipeError(f'data.class_index: folder {unknown[0]!r} in {self.root} is not an ImageNet-1k '
                                  f'wnid; use data.class_index=sorted for other data sets')
            self.num_classes = 1000
        else:
            wnid_to_index = {f: i for i, f in enumerate(folders)}
            self.num_classes = len(folders)
        self.samples = [(str(path), wnid_to_index[folder]) for folder in folders
                        for path in sorted((self.root / folder).iterdir())
                        if path.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise RecipeError(f'{key}: no images under {self.root}')
        self.transform = None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = open_image(path, self.key)
        return (self.transform(image) if self.transform else image), label, index


class UnreadableImage(RecipeError):
    """An image file that cannot be decoded. A set silently one image smaller would change the accuracy, so the run
    stops and names the file."""


def open_image(path: str | os.PathLike, key: str) -> Image.Image:
    """The image at ``path`` in RGB, or :class:`UnreadableImage` naming the file and the recipe key it came from."""
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # UnidentifiedImageError is an OSError
        raise UnreadableImage(f'{key}: {path} is not a readable image ({first_line(error, 120)}); replace or remove '
                              f'it') from None


class HFImages(Dataset):
    """One split of a Hugging Face ``datasets`` image-classification set."""

    def __init__(self, hf_split, image_key: str, label_key: str):
        _require_columns(hf_split, image_key, label_key)
        self.data, self.image_key, self.label_key = hf_split, image_key, label_key
        self.transform = None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        row = self.data[index]
        image = row[self.image_key].convert('RGB')
        return (self.transform(image) if self.transform else image), int(row[self.label_key]), index


def _require_columns(hf_split, image_key: str, label_key: str) -> None:
    for key, column in (('image_key', image_key), ('label_key', label_key)):
        if column not in hf_split.column_names:
            raise RecipeError(f'data.{key}: column {column!r} not in the data set (columns: '
                              f'{", ".join(hf_split.column_names)}); set data.{key}=NAME')


def _load_hf(cfg: DataConfig, splits: list[str]):
    import datasets
    datasets.disable_progress_bars()  # per-split progress lines on stderr, before any one-line error
    root = Path(cfg.root)
    if root.is_dir():
        parquet = {p.stem: str(p) for p in sorted(root.glob('*.parquet'))}
        if parquet:
            missing = [s for s in splits if s not in parquet]
            if missing:
                raise RecipeError(f'data.{_split_key(cfg, missing[0])}: no {missing[0]}.parquet in {root} '
                                  f'(have: {", ".join(parquet)})')
            loaded = datasets.load_dataset('parquet', data_files={s: parquet[s] for s in splits})
        else:
            loaded = datasets.load_dataset('imagefolder', data_dir=str(root))
    else:
        try:
            loaded = datasets.load_dataset(cfg.root)
        except Exception as e:  # the hub is unreachable, or the name is wrong
            raise RecipeError(f'data.root: cannot load data set {cfg.root!r} ({type(e).__name__}); give a local '
                              f'folder of parquet files or images') from None
    for split in splits:
        if split not in loaded:
            raise RecipeError(f'data.{_split_key(cfg, split)}: split {split!r} not found (have: '
                              f'{", ".join(loaded)})')
        _require_columns(loaded[split], cfg.image_key, cfg.label_key)
        feature = loaded[split].features.get(cfg.image_key)
        if isinstance(feature, dict) and 'bytes' in feature:
            # parquet written with the Image layout ({bytes, path}) but without its feature metadata
            loaded[split] = loaded[split].cast_column(cfg.image_key, datasets.Image())
    if cfg.label_key in loaded[splits[0]].features and hasattr(loaded[splits[0]].features[cfg.label_key], 'names'):
        num_classes = len(loaded[splits[0]].features[cfg.label_key].names)
    else:
        num_classes = int(max(loaded[splits[0]][cfg.label_key])) + 1
    return loaded, num_classes


def _split_key(cfg: DataConfig, split: str) -> str:
    for key in ('eval_split', 'calib_split', 'train_split'):
        if getattr(cfg, key) == split:
            return key
    return 'eval_split'


@dataclass
class DataBundle:
    """The data sets of a run (without transforms until :func:`attach_transforms`)."""
    name: str
    num_classes: int
    eval: Dataset
    calib: Dataset | None
    train: Dataset | None
    eval_split: str
    data_config: dict | None = None


def _deterministic_subset(dataset: Dataset, count: int | None, seed: int, in_order: bool) -> Dataset:
    # a random draw, not the first N: data sets stored sorted by class (CIFAR-10's parquet, image folders) would
    # otherwise give N images of the first few classes
    if count is None or count >= len(dataset):
        return dataset
    indices = np.random.default_rng(seed).permutation(len(dataset))[:count]
    return Subset(dataset, sorted(indices.tolist()) if in_order else indices.tolist())


def build_datasets(cfg: DataConfig, need_calib: bool, need_train: bool, seed: int = 0) -> DataBundle:
    """Open the evaluation set, and the calibration / training sets a recipe's stages need."""
    calib = train = None
    if cfg.source == 'synthetic':
        def make(split: str, size: int) -> SyntheticShapes:
            return SyntheticShapes(split, size, cfg.synthetic_classes, cfg.synthetic_image_size, seed)
        eval_set = make('eval', cfg.synthetic_eval)
        calib = make('calib', cfg.synthetic_calib) if need_calib else None
        train = make('train', cfg.synthetic_train) if need_train else None
        name, num_classes, eval_split = f'synthetic-shapes-{cfg.synthetic_classes}c', cfg.synthetic_classes, 'eval'
    elif cfg.source == 'imagefolder':
        root = Path(cfg.root)
        eval_set = ImageFolderByWnid(root / cfg.eval_dir, cfg.class_index, 'data.eval_dir')
        calib = ImageFolderByWnid(root / cfg.calib_dir, cfg.class_index, 'data.calib_dir') if need_calib else None
        train = ImageFolderByWnid(root / cfg.train_dir, cfg.class_index, 'data.train_dir') if need_train else None
        name, num_classes, eval_split = Path(os.path.abspath(root / cfg.eval_dir)).name, eval_set.num_classes, \
            cfg.eval_dir
    else:
        splits = ([cfg.eval_split] + ([cfg.calib_split] if need_calib else [])
                  + ([cfg.train_split] if need_train else []))
        loaded, num_classes = _load_hf(cfg, list(dict.fromkeys(splits)))
        eval_set = HFImages(loaded[cfg.eval_split], cfg.image_key, cfg.label_key)
        calib = HFImages(loaded[cfg.calib_split], cfg.image_key, cfg.label_key) if need_calib else None
        train = HFImages(loaded[cfg.train_split], cfg.image_key, cfg.label_key) if need_train else None
        name, eval_split = Path(os.path.abspath(cfg.root)).name if Path(cfg.root).exists() else cfg.root, \
            cfg.eval_split
    # the evaluation subset does not follow the recipe's seed: every run of a recipe family sees the same images
    eval_set = _deterministic_subset(eval_set, cfg.max_eval, 0, in_order=True)
    if train is not None:
        train = _deterministic_subset(train, cfg.max_train, seed, in_order=False)
    return DataBundle(name, num_classes, eval_set, calib, train, eval_split)


def _base(dataset: Dataset) -> Dataset:
    return dataset.dataset if isinstance(dataset, Subset) else dataset


def resolve_data_config(cfg: DataConfig, model: torch.nn.Module, weights_cfg: dict | None = None) -> dict:
    """The model's timm data config, then what its weights need, then the recipe's overrides."""
    from timm.data import resolve_data_config as timm_resolve
    data_config = dict(timm_resolve(model=model))
    data_config.update(weights_cfg or {})
    for key in ('input_size', 'crop_pct', 'mean', 'std', 'interpolation'):
        value = getattr(cfg, key)
        if value is not None:
            data_config[key] = tuple(value) if isinstance(value, list) else value
    return data_config


def attach_transforms(bundle: DataBundle, data_config: dict, train_augment: str = 'none') -> None:
    """Give each data set its transform: eval-style for eval and calibration, augmented for training."""
    from timm.data import create_transform
    eval_tf = create_transform(**data_config, is_training=False)
    for dataset in (bundle.eval, bundle.calib):
        if dataset is not None:
            _base(dataset).transform = eval_tf
    if bundle.train is not None:
        _base(bundle.train).transform = _train_transform(data_config, train_augment, eval_tf)
    bundle.data_config = data_config


def _train_transform(data_config: dict, augment: str, eval_tf):
    from timm.data import create_transform
    from torchvision import transforms
    if augment == 'none':
        return eval_tf
    if augment == 'rrc':
        return create_transform(
            input_size=data_config['input_size'], is_training=True, mean=data_config['mean'], std=data_config['std'],
            interpolation=data_config['interpolation'], hflip=0.5, scale=(0.35, 1.0), auto_augment=None, re_prob=0.0)
    # crop_flip: the eval geometry, then a padded random crop and a flip (the CIFAR recipe of He et al.)
    size = data_config['input_size'][-1]
    resize_and_crop = [t for t in eval_tf.transforms if not isinstance(t, (transforms.ToTensor, transforms.Normalize))
                       and type(t).__name__ not in ('MaybeToTensor', 'ToNumpy')]
    return transforms.Compose([
        *resize_and_crop, transforms.RandomCrop(size, padding=max(1, size // 8), padding_mode='reflect'),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(mean=data_config['mean'], std=data_config['std'])])


def make_loader(dataset: Dataset, batch_size: int, workers: int, shuffle: bool = False, seed: int = 0,
                drop_last: bool = False) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    # workers start from a fresh server process: forking a process in which OpenVINO's or inductor's thread pools
    # already run can leave a worker with a held lock, and it crashed once that way. The server imports this module
    # (torch, timm, the models) once, before any pool exists; a worker that imported them itself would spend
    # seconds of CPU on it at every loader's start (each epoch and each evaluation)
    context = None
    if workers > 0:
        context = multiprocessing.get_context('forkserver')
        context.set_forkserver_preload(['__main__', __name__])
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=drop_last,
                      generator=generator, persistent_workers=False, multiprocessing_context=context)


def calibration_batches(dataset: Dataset, count: int, batch_size: int, workers: int, seed: int = 0):
    """The first ``count`` images of a fixed shuffle of the calibration set, as image batches."""
    subset = _deterministic_subset(dataset, count, seed, in_order=False)
    return [images for images, _, _ in make_loader(subset, batch_size, workers)]
