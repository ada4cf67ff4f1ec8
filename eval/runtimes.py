"""How an artifact runs when deployed: the callables the evaluator scores and times.

* :class:`TorchRunner`: a torch module (a float model, a PT2E int8 graph, a model with torchao weights) run eagerly
  or under ``torch.compile`` (inductor with freezing, which CPU weight prepacking and the PT2E int8 fusions need),
  optionally in bf16, on the CPU or on a CUDA device (its own copy there; logits always come back on the CPU).
  Compiled runners have one graph per batch size, so the evaluator pads a short last batch up to
  ``fixed_batch`` rather than compile another shape.
* :class:`OpenVINORunner`: an OpenVINO model compiled for the CPU plugin with an explicit precision hint (OpenVINO
  otherwise runs "fp32" in bf16 on CPUs that have it) and thread count.
* :func:`to_openvino`: the one torch → OpenVINO conversion (dynamic batch) every stage and tool uses.
"""
from __future__ import annotations

import copy
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from eval.complexity import serialized_size_mb

__all__ = ['TorchRunner', 'OpenVINORunner', 'compile_for_cpu', 'to_openvino', 'with_dynamic_batch']

# Each compiled form gets its own entry function (see compile_for_cpu), so a form never shares dynamo's
# per-code-object cache with another; this only bounds the shapes one form may compile.
_RECOMPILE_LIMIT = 16


def _entry_point(module: nn.Module, tag: str):
    """A function calling ``module`` whose code object is new: dynamo caches compiled graphs per code object."""
    namespace: dict = {}
    exec(compile('def forward(images):\n    return module(images)\n', f'<compiled {tag}>', 'exec'),
         {'module': module}, namespace)
    return namespace['forward']


def compile_for_cpu(module: nn.Module, tag: str = 'form'):
    """``torch.compile`` for CPU inference on a private copy of ``module``.

    Freezing bakes the weights into the compiled code. Two precautions follow. The copy keeps a later in-place
    update of the original (training) from being served stale weights. And every compiled form calls its module
    through its own entry function: compiled through a shared ``forward``, copies of one model class share one
    dynamo cache, and once it overflows (8 entries: 4 forms at 2 batch sizes) calls were measured returning
    another copy's outputs. No ``torch._dynamo.reset()`` is needed, so earlier forms stay compiled.
    """
    torch._inductor.config.freezing = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    return torch.compile(_entry_point(_inference_mode(copy.deepcopy(module)), tag), dynamic=False)


def _inference_mode(module: nn.Module) -> nn.Module:
    # exported graphs (PT2E) refuse .eval(): their train/eval behaviour was fixed at export
    return module if isinstance(module, torch.fx.GraphModule) else module.eval()


class TorchRunner:
    """A torch module as deployed: eager, or compiled (``compiled=True``); ``dtype=torch.bfloat16`` runs a copy
    whose parameters and input are bf16; ``device='cuda'`` runs a copy on that device. Logits come back in fp32 on
    the CPU."""

    def __init__(self, module: nn.Module, compiled: bool, label: str, fixed_batch: int | None = None,
                 dtype: torch.dtype | None = None, device: str | torch.device = 'cpu'):
        self.module = _inference_mode(module)
        self.compiled = compiled
        self.label = label
        self.dtype = dtype
        self.device = torch.device(device)
        self.fixed_batch = fixed_batch if compiled else None
        runnable = self.module
        if dtype is not None or self.device.type != 'cpu':
            runnable = copy.deepcopy(self.module).to(device=self.device, dtype=dtype)
        self._fn = compile_for_cpu(runnable, label) if compiled else runnable

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(device=self.device, dtype=self.dtype or images.dtype)
        logits = self._fn(images)
        return logits if self.dtype is None and self.device.type == 'cpu' else logits.float().cpu()

    @property
    def runtime(self) -> str:
        return ('torch.compile (inductor)' if self.compiled else 'torch eager') + \
            (f', {str(self.dtype).removeprefix("torch.")}' if self.dtype is not None else '') + \
            (f', {self.device.type}' if self.device.type != 'cpu' else '')

    def size_mb(self) -> float:
        """Serialized size of the tensors the model runs with (for a graph, only those its nodes use)."""
        if isinstance(self.module, torch.fx.GraphModule):
            # convert_pt2e leaves the float weights behind as unused attributes: they do not ship
            used = {node.target for node in self.module.graph.nodes if node.op == 'get_attr'}
            return serialized_size_mb({k: v for k, v in self.module.state_dict().items() if k in used})
        if self.dtype is not None:
            return serialized_size_mb({k: v.to(self.dtype) if v.is_floating_point() else v
                                       for k, v in self.module.state_dict().items()})
        return serialized_size_mb(self.module)


class OpenVINORunner:
    """An OpenVINO model on the CPU plugin; ``precision`` is 'f32' or 'bf16' (the inference precision hint).

    ``files``: the files it was read from, if any; then ``size_mb`` is their size on disk.
    """

    def __init__(self, ov_model, label: str, precision: str = 'f32', threads: int = 1,
                 files: list[str] | None = None):
        import openvino as ov
        self.ov_model = ov_model
        self.label = label
        self.precision = precision
        self.threads = threads
        self.files = files
        self.fixed_batch = None
        config = {'INFERENCE_PRECISION_HINT': precision, 'INFERENCE_NUM_THREADS': threads}
        self.compiled_model = ov.Core().compile_model(ov_model, 'CPU', config)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled_model(images.cpu().numpy())[0])

    @property
    def runtime(self) -> str:
        return f'openvino CPU ({self.precision} hint)'

    def size_mb(self) -> float:
        """Size of the OpenVINO IR (.xml + .bin) as it would ship (or of the files it was read from)."""
        import openvino as ov
        if self.files:
            return sum(Path(f).stat().st_size for f in self.files) / 1e6
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / 'model.xml'
            ov.save_model(self.ov_model, str(path), compress_to_fp16=False)
            return (os.path.getsize(path) + os.path.getsize(path.with_suffix('.bin'))) / 1e6

    def runtime_precisions(self) -> dict[str, list[str]]:
        """Names of the weighted layers the CPU plugin actually runs, grouped by the precision it runs them in."""
        by_precision: dict[str, list[str]] = {}
        for op in self.compiled_model.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if info['layerType'].astype(str) in ('Convolution', 'GroupConvolution', 'FullyConnected', 'MatMul',
                                                 'Deconvolution'):
                precision = info['runtimePrecision'].astype(str)
                # int8 weights under a float kernel (e.g. a matmul whose input the plugin could not take quantized)
                # report the weights' precision here; the kernel's name ends in the precision it computes in
                kernel = info['primitiveType'].astype(str).lower() if 'primitiveType' in info else ''
                if precision in ('i8', 'u8') and kernel.endswith(('_f32', '_bf16', '_f16')):
                    precision = kernel.rsplit('_', 1)[1]
                by_precision.setdefault(precision, []).append(op.get_friendly_name())
        return by_precision


def to_openvino(module: nn.Module, example: torch.Tensor):
    """``ov.convert_model`` with a dynamic batch: a module through TorchScript, an exported graph via torch.export."""
    import openvino as ov
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        if isinstance(module, torch.fx.GraphModule):
            batch = torch.export.Dim('batch', min=1, max=4096)
            program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
            ov_model = ov.convert_model(program)
        else:
            ov_model = ov.convert_model(module.eval(), example_input=example)
    return with_dynamic_batch(ov_model, tuple(example.shape[1:]))


def check_compiles(ov_model, what: str) -> None:
    """Compile ``ov_model`` for the CPU once, so that a model OpenVINO converts (and NNCF rewrites) but its CPU plugin
    rejects fails where it is made, with a reason, not later in the evaluator."""
    import openvino as ov
    try:
        ov.Core().compile_model(ov_model, 'CPU')
    except RuntimeError as error:
        # OpenVINO prefixes its message with one "Exception from src/...cpp:N:" line per layer it passed through
        lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith('Exception from')]
        raise RuntimeError(f'the OpenVINO CPU plugin cannot compile the {what}: {" ".join(lines)[:400]}') from None


def with_dynamic_batch(ov_model, image_shape: tuple[int, ...] | None = None):
    """The model with a dynamic batch and a static image shape (``image_shape``, or the shape its first input
    already has: converted from a traced module the spatial sizes come out dynamic, which costs speed). In place;
    returned for chaining."""
    import openvino as ov
    shape = image_shape or list(ov_model.inputs[0].get_partial_shape())[1:]
    ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, *shape])})
    return ov_model

