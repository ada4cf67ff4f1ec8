"""Speed of a model in every deployed form, measured in one process so the ratios are honest.

``python -m eval.benchmark spartan_xt spartan_t smt_t --batch 1 32`` prints, per model: params and GMACs (ours,
next to the paper's and the extraction notes' figures where we have them), CPU img/s of fp32 eager, fp32
``torch.compile`` (as written, and in the fused deploy form when the model has one), PT2E int8 (compiled) and NNCF
int8 in OpenVINO (with OpenVINO fp32 under the f32 hint for reference), and the speedups over fp32 compiled as
written. The int8 paths start from the deploy form, so ``pt2e_int8_vs_deploy_fp32`` is the gain of quantization
alone and ``fp32_deploy_compiled_speedup`` the gain of the rewrite alone. Weights are random and calibration uses random images:
speed does not depend on them (accuracy does; use a recipe for that). Single-threaded unless ``--threads``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import timm
import torch
from tabulate import tabulate

import compress.models  # noqa: F401
from compress.deploy import OpenVINORunner, TorchRunner, deploy_form, has_deploy_form
from compress.stages.ptq_int8 import openvino_fp32, quantize_openvino, quantize_x86_pt2e
from eval.complexity import count_macs, count_params
from eval.throughput import measure_cpu

__all__ = ['benchmark_model', 'REFERENCE']

# Published figures (paper) and our notes' figures (from the official code) at the input size given:
# (input size, paper params M, paper GMACs, notes params M, notes GMACs). GMACs of the papers are their "GFLOPs".
REFERENCE = {
    'spartan_xt': (224, 2.2, 0.64, 2.222792, 0.6405),
    'spartan_t': (224, 3.8, 0.83, 3.820296, 0.8291),
    'smt_t': (224, 11.5, 2.4, 11.51, 2.38),
    'smt_s': (224, 20.5, 4.7, 22.55, 4.66),
    'smt_b': (224, 32.0, 7.7, 32.04, 7.69),
    'smt_l': (224, 80.5, 17.7, 80.62, 17.48),
}


def benchmark_model(name: str, batch_sizes=(1, 32), threads: int = 1, input_size: int | None = None,
                    backends=('x86_pt2e', 'openvino'), repeats: int = 3, min_seconds: float = 1.0,
                    prune_ratio: float | None = None, prune_by: str = 'channels', round_to: int = 8) -> dict:
    """Params, MACs and img/s of every deployed form of one model; see the module docstring.

    With ``prune_ratio`` the model is first pruned (group-norm importance, the model's own pruning rules) by that
    fraction of its channels (``prune_by='channels'``) or of its MACs (``'macs'``, the channel ratio is searched);
    every form is measured on the pruned model, and the dense model's fp32 compiled form in the same rounds, so
    ``prune_speedup`` (pruned / dense, both fp32 compiled) compares like with like.
    """
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    size = input_size or (REFERENCE.get(name, (None,))[0] or model.pretrained_cfg['input_size'][-1])
    shape = (3, size, size)
    row = {'model': name, 'input': size}
    dense = None
    if prune_ratio:
        from compress.config import PruneStage
        from compress.stages.prune import prune_model
        dense, dense_macs = model, count_macs(model, shape)
        amount = dict(target_macs=1 - prune_ratio) if prune_by == 'macs' else dict(ratio=prune_ratio)
        stage = PruneStage(round_to=round_to or None, **amount)
        if prune_by == 'macs':
            from compress.stages.prune import search_ratio
            model, _, _ = search_ratio(model, stage, torch.randn(2, *shape), None, shape, dense_macs)
        else:
            model, _ = prune_model(model, stage, prune_ratio, torch.randn(2, *shape))
        row.update(pruned=prune_ratio, pruned_by=prune_by, macs_kept=round(count_macs(model, shape) / dense_macs, 3))
    row.update(params_m=round(count_params(model) / 1e6, 3), gmacs=round(count_macs(model, shape) / 1e9, 3))
    if name in REFERENCE and not prune_ratio:
        _, row['paper_params_m'], row['paper_gmacs'], row['notes_params_m'], row['notes_gmacs'] = REFERENCE[name]
    deploy = deploy_form(model)
    calib = [torch.randn(8, *shape) for _ in range(4)]
    runners = {'fp32_eager': TorchRunner(model, compiled=False, label='fp32 eager'),
               'fp32_compiled': TorchRunner(model, compiled=True, label='fp32')}
    if has_deploy_form(model):  # the fused form the int8 paths start from, so its gain is shown apart
        runners['fp32_deploy_compiled'] = TorchRunner(deploy, compiled=True, label='fp32 deploy')
    if dense is not None:
        runners['dense_fp32_compiled'] = TorchRunner(deploy_form(dense), compiled=True, label='dense fp32')
    if 'x86_pt2e' in backends:
        graph, coverage = quantize_x86_pt2e(deploy, calib)
        runners['pt2e_int8'] = TorchRunner(graph, compiled=True, label='int8')
        row['pt2e_int8_weights'] = coverage['quantized_weight_fraction']
    if 'openvino' in backends:
        runners['ov_fp32'] = openvino_fp32(deploy, calib[0][:1]).for_threads(threads)
        ov_model, coverage = quantize_openvino(deploy, calib, transformer=False)
        runners['ov_int8'] = OpenVINORunner(ov_model, 'int8', precision='f32', threads=threads)
        row['ov_int8_weights'] = coverage['quantized_weight_fraction']
    # round robin: each round times every form once, so a change of load on a shared machine hits all forms
    # alike; a form's figure is its median round
    for batch in batch_sizes:
        rounds = {label: [] for label in runners}
        for index in range(repeats):
            for label, runner in runners.items():
                rounds[label].append(measure_cpu(runner, shape, batch, threads=threads, warmup=2 if index == 0 else 0,
                                                 repeats=1, min_seconds=min_seconds)['img_s'])
        for label, rates in rounds.items():
            row[f'{label}_bs{batch}'] = round(statistics.median(rates), 2)
        compiled = row[f'fp32_compiled_bs{batch}']
        deployed = row.get(f'fp32_deploy_compiled_bs{batch}', compiled)
        for label in ('fp32_deploy_compiled', 'pt2e_int8', 'ov_int8'):
            if f'{label}_bs{batch}' in row:
                row[f'{label}_speedup_bs{batch}'] = round(row[f'{label}_bs{batch}'] / compiled, 2)
        if f'pt2e_int8_bs{batch}' in row:
            row[f'pt2e_int8_vs_deploy_fp32_bs{batch}'] = round(row[f'pt2e_int8_bs{batch}'] / deployed, 2)
        if dense is not None:
            pruned = row.get(f'fp32_deploy_compiled_bs{batch}', compiled)
            row[f'prune_speedup_bs{batch}'] = round(pruned / row[f'dense_fp32_compiled_bs{batch}'], 2)
        if f'ov_int8_bs{batch}' in row:
            row[f'ov_int8_vs_ov_fp32_bs{batch}'] = round(row[f'ov_int8_bs{batch}'] / row[f'ov_fp32_bs{batch}'], 2)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='*')
    parser.add_argument('--batch', type=int, nargs='+', default=[1, 32])
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--input-size', type=int)
    parser.add_argument('--backends', nargs='+', default=['x86_pt2e', 'openvino'])
    parser.add_argument('--repeats', type=int, default=3, help='round-robin rounds over all forms; medians reported')
    parser.add_argument('--prune', type=float, nargs='*', default=[],
                        help='also measure the model pruned at these channel ratios (e.g. 0.3 0.5)')
    parser.add_argument('--prune-by', choices=['channels', 'macs'], default='channels',
                        help='--prune ratios remove this fraction of channels, or of MACs (ratio searched)')
    parser.add_argument('--round-to', type=int, default=8, help='pruned widths in multiples of this (0: any width)')
    parser.add_argument('--pruned-only', action='store_true',
                        help='with --prune: skip the dense row (pruned rows still time the dense fp32 model)')
    parser.add_argument('--json', help='also write the rows to this file')
    parser.add_argument('--from-json', help='print the table of rows saved by --json, measuring nothing')
    parser.add_argument('--columns', nargs='+', help='print only these columns (names as in the JSON rows)')
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if not timm.models.is_model(m)]
    if unknown:
        print(f'error: unknown model {unknown[0]!r}; see timm.list_models()', file=sys.stderr)
        return 2
    if not args.models and not args.from_json:
        print('error: name at least one model, or pass --from-json FILE', file=sys.stderr)
        return 2
    rows = []
    if args.from_json:
        try:
            with open(args.from_json) as handle:
                rows = json.load(handle)
        except (OSError, ValueError) as error:
            print(f'error: --from-json: cannot read {args.from_json} ({error})', file=sys.stderr)
            return 2
        args.batch = sorted({int(key.rsplit('_bs', 1)[1]) for row in rows for key in row
                             if key.startswith('fp32_compiled_bs')})
    for name in args.models:
        for ratio in ([] if args.pruned_only and args.prune else [None]) + args.prune:
            rows.append(benchmark_model(name, args.batch, args.threads, args.input_size, args.backends, args.repeats,
                                        prune_ratio=ratio, prune_by=args.prune_by,
                                        round_to=args.round_to))
            print(json.dumps(rows[-1]), flush=True)
    columns = ['model', 'input', 'pruned', 'pruned_by', 'macs_kept', 'params_m', 'paper_params_m', 'notes_params_m', 'gmacs', 'paper_gmacs', 'notes_gmacs']
    for batch in args.batch:
        columns += [f'fp32_eager_bs{batch}', f'fp32_compiled_bs{batch}', f'fp32_deploy_compiled_speedup_bs{batch}',
                    f'prune_speedup_bs{batch}', f'pt2e_int8_speedup_bs{batch}', f'pt2e_int8_vs_deploy_fp32_bs{batch}',
                    f'ov_int8_speedup_bs{batch}', f'ov_int8_vs_ov_fp32_bs{batch}']
    columns = [c for c in (args.columns or columns) if any(c in row for row in rows)]
    print(tabulate([[row.get(c, '') for c in columns] for row in rows], columns, tablefmt='github'))
    if args.json:
        with open(args.json, 'w') as handle:
            json.dump(rows, handle, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
