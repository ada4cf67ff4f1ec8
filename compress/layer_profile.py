"""Where the CPU time goes: per-op / per-layer profile of any timm model, fp32 vs int8.

    python -m compress.layer_profile spartan_t --input-size 224 --batch 32 --backend both --top 25

Builds the model (random init), then, single-threaded and in one process:

* torch: ``torch.profiler`` on the compiled fp32 model and the compiled PT2E int8 model (X86InductorQuantizer).
  Rows are grouped by kernel / op name (inductor's fused C++ kernels have their graph prefix and index stripped).
  oneDNN conv / linear calls are mapped back to module names through their input and weight shapes; every other
  kernel is attributed to the module of the conv / linear that ran just before it ("after <module>").
* OpenVINO: the CPU plugin's performance counters (``PERF_COUNT``) on the fp32 model (f32 hint) and on the NNCF
  int8 model (NNCF settings from the model, as in a recipe); rows are grouped by layer type and exec type (e.g.
  ``Convolution [brgconv_avx512_I8]``), with the module names parsed from the layer names.
* totals: one timing session (``eval.timing``, the mechanism every run uses: interleaved rounds, process CPU time,
  no profiler attached) over fp32 eager and every compiled / OpenVINO variant, and each backend's int8 speedup over
  its fp32 with its 95 % interval.
"""
from __future__ import annotations

import argparse
import os
import re
from collections import defaultdict

import timm
import torch
from torch import nn

import compress.models  # noqa: F401  (registers the project's models with timm)
from compress.deploy import deploy_form
from compress.stages.ptq_int8 import nncf_settings, quantize_openvino, quantize_x86_pt2e
from eval.coverage import weight_coverage
from eval.runtimes import compile_for_cpu
from eval.timing import speedup, throughput, time_forms

__all__ = ['profile_model', 'print_profile']

_KERNEL_OPS = ('convolution', 'qconv', 'qlinear', 'linear', 'addmm', 'onednn::', 'mkldnn::', 'mkl::')
_OVERHEAD = ('## Call CompiledFxGraph', 'TorchDynamo', 'Torch-Compiled Region', 'CompiledFunction')


def _role(module: str) -> str:
    return re.sub(r'(blocks|layers)\.\d+', r'\1.*', module)


def _compact(names: list[str]) -> str:
    """['a.b.x', 'a.b.y'] -> 'a.b.{x,y}' (layers with the same shapes cannot be told apart)."""
    if len(names) == 1:
        return names[0]
    prefix = os.path.commonprefix(names)
    prefix = prefix[:prefix.rfind('.') + 1]
    return prefix + '{' + ','.join(n[len(prefix):] for n in names) + '}'


def _layer_signatures(model: nn.Module, images: torch.Tensor) -> dict:
    """(input shape without batch, weight shape) -> module names, for every conv / linear."""
    signatures, hooks = defaultdict(list), []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            def hook(m, args, _out, name=name):
                signatures[(tuple(args[0].shape[1:]), tuple(m.weight.shape))].append(name)
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(images[:1])
    [h.remove() for h in hooks]
    return signatures


def _match_layer(event, signatures: dict) -> str | None:
    shapes = [s for s in (event.input_shapes or []) if s]
    if len(shapes) < 2:
        return None
    x_shape = tuple(shapes[0][1:])
    for w_shape in shapes[1:3]:
        for key in ((x_shape, tuple(w_shape)), (x_shape, tuple(reversed(w_shape)))):
            if key in signatures:
                return _compact(sorted({_role(n) for n in signatures[key]}))
    return None


def _group_rows(items, total_ms: float, top: int, iters: int) -> list[dict]:
    """items: (op, kind, ms, module); returns rows sorted by time (calls per batch, modules the op ran in)."""
    by_op = defaultdict(lambda: {'ms': 0.0, 'calls': 0, 'modules': defaultdict(float)})
    for op, kind, ms, module in items:
        row = by_op[(op, kind)]
        row['ms'] += ms
        row['calls'] += 1
        row['modules'][module] += ms
    rows = []
    for (op, kind), row in sorted(by_op.items(), key=lambda kv: -kv[1]['ms'])[:top]:
        modules = sorted(row['modules'].items(), key=lambda kv: -kv[1])
        rows.append({'op': op, 'kind': kind, 'ms': row['ms'], 'pct': 100 * row['ms'] / total_ms,
                     'calls': row['calls'] // iters, 'modules': ', '.join(m for m, _ in modules[:3])
                     + (f' (+{len(modules) - 3})' if len(modules) > 3 else '')})
    return rows


def _summary(items: list, top: int, iters: int) -> dict:
    """Totals by kind, rows by op, time by module (with what follows it) and conv / linear time by layer."""
    total = sum(ms for _op, _kind, ms, _m in items)
    by_kind, by_module, by_layer = defaultdict(float), defaultdict(float), defaultdict(float)
    for op, kind, ms, module in items:
        by_kind[kind if kind in ('conv/linear', 'overhead') or op.startswith('cpp') else 'other'] += ms
        by_module[module.replace('after ', '')] += ms
        if kind == 'conv/linear':
            by_layer[module] += ms
    ranked = lambda d: sorted(d.items(), key=lambda kv: -kv[1])[:top]  # noqa: E731
    return {'total_ms': total, 'by_kind': dict(by_kind), 'rows': _group_rows(items, total, top, iters),
            'by_module': ranked(by_module), 'by_layer': ranked(by_layer)}


def _torch_profile(fn, images, signatures: dict, iters: int, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad():
        fn(images)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(iters):
                fn(images)
    items, module = [], 'input'
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        ms = event.self_cpu_time_total / 1000 / iters
        name = event.name
        if name.startswith(_OVERHEAD):
            items.append(('python / dynamo overhead', 'overhead', ms, '-'))
            continue
        if any(k in name for k in _KERNEL_OPS):
            matched = _match_layer(event, signatures)
            if matched is not None:
                module = matched
                items.append((name, 'conv/linear', ms, module))
                continue
        op = re.sub(r'^graph_\d+_', '', re.sub(r'_\d+$', '', name))
        kind = 'inductor kernel' if op.startswith('cpp_fused') else 'aten op'
        items.append((op, kind, ms, f'after {module}'))
    return _summary(items, top, iters)


def _ov_compile(ov_model, perf: bool):
    import openvino as ov
    config = {'INFERENCE_PRECISION_HINT': 'f32', 'INFERENCE_NUM_THREADS': 1, 'PERF_COUNT': perf}
    return ov.Core().compile_model(ov_model, 'CPU', config)


def _ov_profile(compiled, images, iters: int, top: int) -> dict:
    # a runtime node fuses several original layers (conv + folded BN + activation): name it after them
    original = {op.get_friendly_name(): op.get_rt_info()['originalLayersNames'].astype(str)
                for op in compiled.get_runtime_model().get_ordered_ops()}
    request = compiled.create_infer_request()
    request.infer(images.numpy())
    items = []
    for _ in range(iters):
        request.infer(images.numpy())
        for info in request.get_profiling_info():
            ms = info.real_time.total_seconds() * 1000 / iters
            if info.status.name != 'EXECUTED' or ms <= 0:
                continue
            found = re.search(r'__module\.([\w.]+)', original.get(info.node_name, '') + info.node_name)
            module = _role(found.group(1)) if found else info.node_name.split('/')[0][:40]
            kind = 'conv/linear' if info.node_type in ('Convolution', 'GroupConvolution', 'FullyConnected',
                                                       'MatMul', 'Deconvolution') else info.node_type
            items.append((f'{info.node_type} [{info.exec_type}]', kind, ms, module))
    return _summary(items, top, iters)


def profile_model(model_name: str, input_size: int = 224, batch: int = 32, backend: str = 'both', top: int = 25,
                  iters: int = 2, rounds: int = 3, calib_batches: int = 2, reparameterize: bool = False,
                  model: nn.Module | None = None, min_seconds: float = 0.3, **model_kwargs) -> dict:
    """Profile fp32 (eager, compiled) and int8 of ``model_name``; returns totals and per-op rows per variant.

    ``reparameterize`` profiles the deploy form (``compress.deploy.deploy_form``: every ``fuse()`` /
    ``reparameterize()``) for all variants; ``model`` overrides the timm build. Row times are ms per batch.
    """
    import torch._inductor.config as inductor_config
    os.environ.setdefault('NNCF_EXTENSION_LOAD_TIMEOUT', '0')
    torch.set_num_threads(1)
    inductor_config.cpp.enable_kernel_profile = True  # one profiler event per fused C++ kernel
    torch.manual_seed(0)
    model = (model or timm.create_model(model_name, **model_kwargs)).eval()
    if reparameterize:
        model = deploy_form(model)
    images = torch.randn(batch, 3, input_size, input_size)
    calib = [torch.randn(max(2, min(batch, 8)), 3, input_size, input_size) for _ in range(calib_batches)]
    signatures = _layer_signatures(model, images)
    variants = {'fp32 eager': model}
    result = {'model': model_name + (' (reparameterized)' if reparameterize else ''), 'batch': batch,
              'input_size': input_size}
    if backend in ('x86_pt2e', 'both'):
        variants['torch fp32 compiled'] = compile_for_cpu(model, 'torch fp32 compiled')
        with torch.no_grad():
            variants['torch fp32 compiled'](images)  # compile now, not inside the profile
        graph = quantize_x86_pt2e(model, calib)
        variants['torch int8 compiled'] = compile_for_cpu(graph, 'torch int8 compiled')
        result['pt2e_coverage'] = weight_coverage(graph)['int8_weight_fraction']
        for label in ('torch fp32 compiled', 'torch int8 compiled'):
            result[label] = _torch_profile(variants[label], images, signatures, iters, top)
    if backend in ('openvino', 'both'):
        int8_ov, fp32_ov = quantize_openvino(model, calib, nncf_settings(model, images.shape[1:]))
        result['openvino_coverage'] = weight_coverage(int8_ov)['int8_weight_fraction']
        for label, ov_model in (('openvino fp32', fp32_ov), ('openvino int8', int8_ov)):
            result[label] = _ov_profile(_ov_compile(ov_model, perf=True), images, iters, top)
            compiled = _ov_compile(ov_model, perf=False)
            variants[label] = lambda x, c=compiled: c(x.numpy())
    session = time_forms(variants, images.shape[1:], [batch], rounds=rounds, min_seconds=min_seconds)
    result['timing'] = session
    result['cpu_ms'] = {label: 1000 * batch / throughput(session, label, batch)['img_s_cpu'] for label in variants}
    result['speedups'] = {f'{b} int8 / fp32': speedup(session, f'{b} int8{c}', f'{b} fp32{c}', batch) for b, c in
                          (('torch', ' compiled'), ('openvino', '')) if f'{b} int8{c}' in variants}
    return result


def print_profile(result: dict, top: int = 25) -> None:
    batch = result['batch']
    print(f"\n=== {result['model']} @ {result['input_size']} px, batch {batch}, 1 thread ===")
    for label in ('torch fp32 compiled', 'torch int8 compiled', 'openvino fp32', 'openvino int8'):
        if label not in result:
            continue
        prof = result[label]
        kinds = ', '.join(f'{k} {v:.1f} ms ({100 * v / prof["total_ms"]:.0f}%)' for k, v in
                          sorted(prof['by_kind'].items(), key=lambda kv: -kv[1]))
        print(f"\n--- {label}: profiled {prof['total_ms']:.1f} ms/batch: {kinds}")
        print(f"{'self ms':>9} {'%':>5} {'calls':>6}  {'op':<58} modules")
        for row in prof['rows'][:top]:
            print(f"{row['ms']:9.2f} {row['pct']:5.1f} {row['calls']:6d}  {row['op'][:58]:<58} {row['modules']}")
        for title, key in (('by module (with the kernels that follow it)', 'by_module'),
                           ('conv / linear layers only', 'by_layer')):
            print(f'  {title}:')
            for module, ms in prof[key][:12]:
                print(f"{ms:9.2f} {100 * ms / prof['total_ms']:5.1f}  {module}")
    print(f'\n--- totals: CPU time per batch (median of {result["timing"]["rounds"]} interleaved rounds, no profiler)')
    for label, ms in result['cpu_ms'].items():
        print(f'{label:<22} {ms:9.1f} ms  {1000 * batch / ms:8.1f} img/s')
    for label, (median, low, high) in result['speedups'].items():
        print(f'{label:<28} speedup {median:.2f}x [{low:.2f}, {high:.2f}]')


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('model')
    parser.add_argument('--input-size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--backend', choices=('x86_pt2e', 'openvino', 'both'), default='both')
    parser.add_argument('--top', type=int, default=25)
    parser.add_argument('--iters', type=int, default=2, help='profiled iterations per variant')
    parser.add_argument('--rounds', type=int, default=6, help='interleaved timing rounds')
    parser.add_argument('--reparameterize', action='store_true',
                        help='profile the deploy form (compress.deploy.deploy_form)')
    args = parser.parse_args(argv)
    result = profile_model(args.model, args.input_size, args.batch, args.backend, args.top, args.iters, args.rounds,
                           reparameterize=args.reparameterize)
    print_profile(result, args.top)


if __name__ == '__main__':
    main()
