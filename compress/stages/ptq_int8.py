"""Stage ``ptq_int8``: static int8 post-training quantization of convolutions and linears.

Backends:

* ``x86_pt2e``: ``torch.export`` (dynamic batch) → ``prepare_pt2e`` with ``X86InductorQuantizer`` (folds BN,
  inserts observers) → calibration → ``convert_pt2e``; deployed under ``torch.compile`` (inductor lowers the q/dq
  patterns to oneDNN int8 kernels). On a CPU without VNNI activations are quantized to 7 bits (``reduce_range``).
* ``openvino``: ``openvino.convert_model`` → ``nncf.quantize`` on the OpenVINO model (quantizing the OpenVINO
  model, not NNCF's torch fake-quant model, is what makes every conv run in u8) → OpenVINO CPU runtime. The float
  OpenVINO model it started from is returned too (reference ``openvino fp32``), so the evaluator can time the
  runtime's own gain apart from quantization's.
* ``torchao_int8``: ``quantize_(model, Int8DynamicActivationInt8WeightConfig())`` on the ``nn.Linear`` layers:
  int8 weights, activations quantized at run time. It runs on CUDA (where the other two backends do not) and on
  the CPU under ``torch.compile``; convolutions stay float, so a CNN gets no row (the reason says so).

NNCF's settings come from the model (:func:`nncf_settings`), the same in a recipe and in ``compress.benchmark``,
and are recorded with the result. A backend that cannot quantize the model returns no artifact, only the reason.
"""
from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from compress.config import PtqInt8Stage, RecipeError
from compress.data import calibration_batches
from compress.deploy import deploy_form
from compress.record import VNNI_ISAS, cpu_isa
from compress.stages.base import StageContext, StageResult, backend_failure, layers_not_taken
from compress.stages.families import rules_for
from eval.coverage import weight_coverage
from eval.runtimes import check_compiles, to_openvino

__all__ = ['apply_ptq_int8', 'quantize_x86_pt2e', 'x86_reduce_range', 'quantize_openvino', 'quantize_torchao_int8',
           'nncf_settings', 'runs_attention']

# activation x activation products: what makes a model a transformer to NNCF (it then quantizes them, keeps
# softmax inputs in float and smooths activations)
_ATTENTION_OPS = ('bmm', 'baddbmm', '_scaled_dot_product_flash_attention_for_cpu',
                  '_scaled_dot_product_efficient_attention', '_scaled_dot_product_flash_attention',
                  '_scaled_dot_product_attention_math')


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def runs_attention(model: nn.Module, input_size) -> bool:
    """Whether a forward pass multiplies activations by activations (a batched matmul or an SDPA kernel)."""
    recorder = _OpNames()
    with recorder:
        model.eval()(torch.zeros(1, *input_size))
    return any(name in recorder.names for name in _ATTENTION_OPS)


def nncf_settings(model: nn.Module, input_size, transformer: bool | None = None) -> dict:
    """How NNCF quantizes this model: ``model_type`` from what the model computes (attention or not) unless
    ``transformer`` says otherwise, and the family's ignored scope. Returned as a plain dict for the record."""
    if transformer is None:
        transformer = runs_attention(model, input_size)
        why = ('the model multiplies activations by activations (attention)' if transformer else
               'no activation x activation products (a convolutional network)')
    else:
        why = 'set by the recipe (transformer)'
    rules = rules_for(model)
    scope = rules.nncf_ignored_scope
    return {'model_type': 'transformer' if transformer else 'default', 'why': why,
            'ignored_scope': list(scope) if scope else None,
            'preset': rules.nncf_preset, 'smooth_quant': rules.nncf_smooth_quant}


def x86_reduce_range(setting: bool | None) -> tuple[bool, str]:
    """Whether X86InductorQuantizer quantizes activations to 7 bits, and why: a recipe's setting, else on exactly
    when this CPU has no VNNI. Without VNNI oneDNN sums pairs of u8 x s8 products in int16, which saturates at full
    8-bit range (README: "CPUs without VNNI")."""
    if setting is not None:
        return setting, 'set by the recipe'
    isa = cpu_isa()
    return isa not in VNNI_ISAS, f'this CPU is {isa}' + ('' if isa in VNNI_ISAS else ' (no VNNI)')


def quantize_x86_pt2e(model: nn.Module, calib: list[torch.Tensor], keep_float: Sequence[str] = (),
                      reduce_range: bool | None = None) -> torch.fx.GraphModule:
    """Export, prepare with X86InductorQuantizer, calibrate and convert; returns the int8 graph. The modules named
    in ``keep_float`` stay in float; ``reduce_range`` quantizes activations to 7 bits (default: as
    :func:`x86_reduce_range` decides for this CPU)."""
    modules = dict(model.named_modules())
    for name in keep_float:
        if name not in modules:
            near = [n for n in modules if n and n.endswith(name.rsplit('.', 1)[-1])][:3]
            raise RecipeError(f'keep_float: the model has no module {name!r}'
                              + (f' (names look like {", ".join(near)})' if near else ''))
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    example = calib[0][:2] if calib[0].shape[0] >= 2 else calib[0].repeat(2, 1, 1, 1)
    batch = torch.export.Dim('batch', min=1, max=4096)
    exported = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},)).module()
    quantizer = xiq.X86InductorQuantizer()
    if reduce_range is None:
        reduce_range = x86_reduce_range(None)[0]
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    for name in keep_float:
        quantizer.set_module_name_qconfig(name, None)
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for images in calib:
            prepared(images)
    return convert_pt2e(prepared)


def quantize_openvino(model: nn.Module, calib: list[torch.Tensor], settings: dict) -> tuple[object, object]:
    """Convert to OpenVINO (dynamic batch) and quantize it with NNCF as ``settings`` (:func:`nncf_settings`) say.

    Returns the int8 OpenVINO model and the float one it came from.
    """
    os.environ.setdefault('NNCF_EXTENSION_LOAD_TIMEOUT', '0')
    import nncf

    float_model = to_openvino(model, calib[0][:1])
    dataset = nncf.Dataset(calib, lambda images: images.numpy())
    kwargs = {}
    if settings['model_type'] == 'transformer':
        kwargs['model_type'] = nncf.ModelType.TRANSFORMER
    if settings['ignored_scope']:
        kwargs['ignored_scope'] = nncf.IgnoredScope(patterns=settings['ignored_scope'], validate=False)
    if settings.get('preset'):
        kwargs['preset'] = nncf.QuantizationPreset(settings['preset'])
    if settings.get('smooth_quant') is False:
        from nncf.quantization.advanced_parameters import (
            AdvancedQuantizationParameters, AdvancedSmoothQuantParameters,
        )
        # a negative alpha is NNCF's switch for "no SmoothQuant" on that op type
        kwargs['advanced_parameters'] = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    # NNCF counts dataset items, and each item here is a batch
    quantized = nncf.quantize(float_model.clone(), dataset, subset_size=len(calib),
                              target_device=nncf.TargetDevice.CPU, **kwargs)
    check_compiles(quantized, 'int8 model')
    return quantized, float_model


class _NothingQuantized(Exception):
    """A backend that took no layer of the model; the message says why, layer kind by layer kind."""


def _x86_quantizer_took_nothing(keep_float: Sequence[str]) -> str:
    if keep_float:
        return f'keep_float ({", ".join(keep_float)}) left every conv / linear in float'
    # another torch than the pinned one can make the quantizer match no pattern, silently (torch 2.11 did)
    import torchao
    return (f'X86InductorQuantizer annotated no conv / linear (torch {torch.__version__}, torchao '
            f'{torchao.__version__}; the tested pair is pinned in constraints.txt)')


def _int8_matmul_shape(module: nn.Module) -> bool:
    # torch._int_mm (cuBLAS) refuses other widths at run time; the CPU would take them, but one artifact must run
    # on both devices, so a record made here and one made on a GPU hold the same layers in int8
    return isinstance(module, nn.Linear) and module.in_features % 8 == 0 and module.out_features % 8 == 0


def quantize_torchao_int8(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """A copy of ``model`` with torchao dynamic int8 ``nn.Linear`` layers; and why each other layer is not int8."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    quantized = copy.deepcopy(model).eval()
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig(), filter_fn=lambda m, fqn: _int8_matmul_shape(m))
    why_not = {}
    for name, module in quantized.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            why_not[name] = 'convolution: torchao int8 covers nn.Linear only'
        elif isinstance(module, nn.Linear) and not _int8_matmul_shape(module):
            width = f'{module.in_features}→{module.out_features}'
            why_not[name] = f'{width} features: CUDA int8 matmul needs multiples of 8'
        elif isinstance(module, nn.Linear) and type(module.weight).__name__ != 'Int8Tensor':
            why_not[name] = 'skipped by torchao'
    return quantized, why_not


def apply_ptq_int8(cfg: PtqInt8Stage, model: nn.Module, ctx: StageContext) -> list[StageResult]:
    calib = calibration_batches(ctx.data.calib, cfg.calib_images, ctx.data_cfg.batch_size, ctx.data_cfg.workers,
                                ctx.seed)
    calib_count = sum(len(images) for images in calib)
    # deploy form: blocks with fuse()/reparameterize() (timm's convention) become the plain layers quantizers know
    deploy_model = deploy_form(model)
    results = []
    for backend in cfg.backend:
        start = time.perf_counter()
        name = f'ptq_int8[{backend}]'
        info = {'calib_images': calib_count}
        notes = [f'calibrated on {calib_count} images of the calibration split']
        references = {}
        try:
            if backend == 'x86_pt2e':
                reduce_range, why = x86_reduce_range(cfg.reduce_range)
                artifact = quantize_x86_pt2e(deploy_model, calib, cfg.keep_float, reduce_range)
                info['reduce_range'] = {'on': reduce_range, 'why': why}
                if reduce_range:
                    notes.append(f'activations in 7 bits (reduce_range: {why})')
                if weight_coverage(artifact)['int8_weight_fraction'] == 0:
                    raise _NothingQuantized(_x86_quantizer_took_nothing(cfg.keep_float))
                if cfg.keep_float:
                    info['keep_float'] = list(cfg.keep_float)
                    notes.append(f'left in float by the recipe: {", ".join(cfg.keep_float)}')
            elif backend == 'torchao_int8':
                artifact, why_not = quantize_torchao_int8(deploy_model)
                info['not_int8'] = [{'layer': name, 'why': why} for name, why in why_not.items()]
                notes[:] = ['torchao Int8DynamicActivationInt8WeightConfig on nn.Linear (no calibration: activations '
                            'are quantized at run time)']
                if weight_coverage(artifact)['int8_weight_fraction'] == 0:
                    raise _NothingQuantized(layers_not_taken(info['not_int8']) or 'the model has no nn.Linear')
            else:
                info['nncf'] = nncf_settings(deploy_model, ctx.input_size, cfg.transformer)
                artifact, float_ov = quantize_openvino(deploy_model, calib, info['nncf'])
                references['openvino fp32'] = float_ov
                family = [what for what, given in (('ignored scope', info['nncf']['ignored_scope']),
                                                   (f'preset {info["nncf"]["preset"]}', info['nncf']['preset']),
                                                   ('no SmoothQuant', info['nncf']['smooth_quant'] is False))
                          if given]
                notes.append(f'nncf model_type {info["nncf"]["model_type"]} ({info["nncf"]["why"]})'
                             + ''.join(f', family {what}' for what in family))
            failed = None
        except RecipeError:
            raise
        except _NothingQuantized as nothing:
            artifact, failed = None, f'{backend} put no weight in int8: {nothing}'
        except Exception as error:  # capture or quantization failed: no int8 row, the reason is recorded
            artifact, failed = None, f'{backend} could not quantize the model: {backend_failure(error)}'
        results.append(StageResult(
            name=name, kind='ptq_int8', artifact=artifact, float_model=model, next_model=None, backend=backend,
            seconds=time.perf_counter() - start, notes=notes, info=info, references=references, failed=failed,
        ))
    return results
