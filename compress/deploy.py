"""Deployable forms of a model, each as a callable "runner" the evaluator can time and score.

* :class:`TorchRunner`: an eager module, or the same module under ``torch.compile`` (inductor with freezing, as
  CPU weight prepacking and the PT2E int8 fusions need). Compiled runners have one graph per batch size, so
  the evaluator pads the last batch up to ``fixed_batch`` rather than compile a third shape.
* :class:`OpenVINORunner`: an OpenVINO model compiled for the CPU plugin with an explicit precision hint
  (OpenVINO otherwise runs "fp32" in bf16 on CPUs that have it) and thread count.
"""
from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ['TorchRunner', 'OpenVINORunner', 'compile_for_cpu', 'deploy_form', 'has_deploy_form', 'float_runner']


def compile_for_cpu(module: nn.Module):
    """``torch.compile`` for CPU inference on a private copy of ``module``.

    Freezing lets inductor prepack weights and fold the PT2E q/dq patterns into int8 kernels, but it bakes the
    weights into the compiled code: compiling a copy (and dropping dynamo's caches) keeps a later in-place update
    of the original, such as training, from being served stale weights.
    """
    torch._inductor.config.freezing = True
    torch._dynamo.reset()
    return torch.compile(_inference_mode(copy.deepcopy(module)), dynamic=False)


def has_deploy_form(model: nn.Module) -> bool:
    """Whether ``timm.utils.reparameterize_model`` changes ``model`` (some block has fuse/reparameterize)."""
    return any(hasattr(m, name) for m in model.modules() if m is not model
               for name in ('fuse', 'reparameterize', 'switch_to_deploy'))


def deploy_form(model: nn.Module) -> nn.Module:
    """The inference form of ``model``: a private copy in eval mode with every block's ``fuse()`` /
    ``reparameterize()`` applied (timm's ``reparameterize_model``; same function). The quantization stages quantize
    it, and float rows are timed in it too, so that an int8 speedup measures quantization, not the rewrite.
    """
    from timm.utils.model import reparameterize_model
    return reparameterize_model(copy.deepcopy(model).eval(), inplace=True)  # the caller's model keeps its mode


def float_runner(model: nn.Module, eval_cfg) -> TorchRunner:
    """The fp32 row of a float model: its deploy form, compiled or eager as the recipe's ``eval`` says."""
    return TorchRunner(deploy_form(model), compiled=eval_cfg.compile, label='fp32', fixed_batch=eval_cfg.batch_size)


def _inference_mode(module: nn.Module) -> nn.Module:
    # exported graphs (PT2E) refuse .eval(): their train/eval behaviour was fixed at export
    return module if isinstance(module, torch.fx.GraphModule) else module.eval()


class TorchRunner:
    """A torch module as deployed: eager, or compiled for CPU (``compiled=True``)."""

    def __init__(self, module: nn.Module, compiled: bool, label: str, fixed_batch: int | None = None):
        self.module = _inference_mode(module)
        self.compiled = compiled
        self.label = label
        self.fixed_batch = fixed_batch if compiled else None
        self._fn = compile_for_cpu(self.module) if compiled else self.module

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self._fn(images)

    def for_threads(self, threads: int) -> TorchRunner:
        return self  # torch threads are set by the caller with torch.set_num_threads

    def size_mb(self) -> float:
        """Serialized size of the tensors the model runs with (for a graph, only those its nodes use)."""
        from eval.complexity import serialized_size_mb
        if isinstance(self.module, torch.fx.GraphModule):
            # convert_pt2e leaves the float weights behind as unused attributes: they do not ship
            used = {node.target for node in self.module.graph.nodes if node.op == 'get_attr'}
            return serialized_size_mb({k: v for k, v in self.module.state_dict().items() if k in used})
        return serialized_size_mb(self.module)


class OpenVINORunner:
    """An OpenVINO model on the CPU plugin; ``precision`` is 'f32' or 'bf16' (the inference precision hint)."""

    def __init__(self, ov_model, label: str, precision: str = 'f32', threads: int | None = None):
        import openvino as ov
        self.ov_model = ov_model
        self.label = label
        self.precision = precision
        self.threads = threads
        self.fixed_batch = None
        config = {'INFERENCE_PRECISION_HINT': precision}
        if threads:
            config['INFERENCE_NUM_THREADS'] = threads
        self.compiled_model = ov.Core().compile_model(ov_model, 'CPU', config)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled_model(images.numpy())[0])

    def for_threads(self, threads: int) -> OpenVINORunner:
        if threads == self.threads:
            return self
        return OpenVINORunner(self.ov_model, self.label, self.precision, threads)

    def size_mb(self) -> float:
        """Size of the OpenVINO IR (.xml + .bin) as it would ship."""
        import openvino as ov
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
                by_precision.setdefault(info['runtimePrecision'].astype(str), []).append(op.get_friendly_name())
        return by_precision
