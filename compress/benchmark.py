"""Speed of a model in every deployed form, timed side by side in one session (``eval.timing``).

``python -m compress.benchmark spartan_xt spartan_t smt_t --batch 1 32`` prints, per model: params and GMACs
(ours, next to the paper's and the extraction notes' figures where we have them) and, from one timing session of
interleaved rounds, the img/s of each form and its speedups with their 95 % intervals:

* forms: fp32 eager and fp32 compiled as written; the deploy form (``compress.deploy.deploy_form``) compiled in
  fp32 — the baseline every speedup divides by (``x_fp32``) — and a second copy of it (the A/A control,
  ``aa``); the deploy form compiled in bf16 (``x_bf16`` divides by it); PT2E int8 (compiled); OpenVINO fp32 (f32
  hint) and NNCF int8 in OpenVINO (``ov_int8_x_ov_fp32``: the quantization's own gain in that runtime). NNCF's
  settings come from the model (``compress.stages.ptq_int8.nncf_settings``), as in a recipe.
* with ``--prune``, the model is first pruned by those fractions of its channels (or of its MACs, ``--prune-by
  macs``); the dense deploy form is timed in the same rounds: ``prune_x_dense`` and ``prune_efficiency`` (that
  speedup divided by the MAC reduction).

Weights are random and calibration uses random images: speed does not depend on them (accuracy does; use a
recipe for that). Single-threaded unless ``--threads``. ``--json`` writes the rows with the git hash, date,
environment, load and each row's timing session.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import timm
import torch
from tabulate import tabulate

import compress.models  # noqa: F401  (registers the project's models with timm)
from compress.deploy import deploy_form, has_deploy_form
from compress.record import environment, git_hash
from compress.stages.base import backend_failure
from compress.stages.ptq_int8 import nncf_settings, quantize_openvino, quantize_x86_pt2e
from eval.complexity import count_macs, count_params
from eval.coverage import weight_coverage
from eval.runtimes import OpenVINORunner, TorchRunner
from eval.timing import speedup, throughput, time_forms

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
    # paper-only families (no official code: no notes' figures). S2AFormer Tables II / III; EMSNet, MAT and
    # PartialFormer: the dissertation's Tables 3.x, 4.3 and 5.1
    's2aformer_mini': (224, 5.02, 0.43, None, None), 's2aformer_t': (224, 5.80, 0.655, None, None),
    's2aformer_xs': (224, 6.54, 0.786, None, None), 's2aformer_s': (224, 10.69, 1.38, None, None),
    's2aformer_m': (224, 24.87, 4.12, None, None),
    'emsnet_xxtiny': (224, 2.56, 0.54, None, None), 'emsnet_xtiny': (224, 3.0, 0.7, None, None),
    'emsnet_tiny': (224, 5.4, 1.9, None, None),
    'mat_1': (224, 6.714, 0.389, None, None), 'mat_2': (224, 10.767, 0.666, None, None),
    'mat_3': (224, 17.008, 1.042, None, None), 'mat_4': (224, 29.057, 1.933, None, None),
    'mat_5': (224, 50.108, 3.156, None, None),
    'partialformer_b0': (224, 5.3, 0.4, None, None), 'partialformer_b1': (224, 8.2, 0.7, None, None),
    'partialformer_b2': (224, 21.1, 1.9, None, None), 'partialformer_b3': (224, 36.1, 3.4, None, None),
    'partialformer_b4': (224, 64.5, 6.8, None, None),
}
BASELINE, AA = 'fp32_deploy', 'fp32_deploy_aa'


def _prune(model, shape, prune_ratio: float, prune_by: str, round_to: int):
    from compress.config import PruneStage
    from compress.stages.prune import prune_model, search_ratio
    dense_macs = count_macs(model, shape)
    amount = dict(target_macs=1 - prune_ratio) if prune_by == 'macs' else dict(ratio=prune_ratio)
    stage = PruneStage(round_to=round_to or None, **amount)
    if prune_by == 'macs':
        pruned, _, _ = search_ratio(model, stage, torch.randn(2, *shape), None, shape, dense_macs)
    else:
        pruned, _ = prune_model(model, stage, prune_ratio, torch.randn(2, *shape))
    return pruned.eval(), dense_macs


def benchmark_model(name: str, batch_sizes=(1, 32), threads: int = 1, input_size: int | None = None,
                    backends=('x86_pt2e', 'openvino'), rounds: int = 9, min_seconds: float = 0.3,
                    prune_ratio: float | None = None, prune_by: str = 'channels', round_to: int = 8,
                    tolerance: float = 0.05, max_attempts: int = 3, measure: str = 'cpu', timed: bool = True) -> dict:
    """Params, MACs, and the speed of every deployed form of one model; see the module docstring."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    size = input_size or (REFERENCE.get(name, (None,))[0] or model.pretrained_cfg['input_size'][-1])
    shape = (3, size, size)
    row = {'model': name, 'input': size}
    dense = None
    if prune_ratio:
        dense = model
        model, dense_macs = _prune(model, shape, prune_ratio, prune_by, round_to)
        row.update(pruned=prune_ratio, pruned_by=prune_by, macs_kept=round(count_macs(model, shape) / dense_macs, 3))
    row.update(params_m=round(count_params(model) / 1e6, 3), gmacs=round(count_macs(model, shape) / 1e9, 3))
    if name in REFERENCE and not prune_ratio:
        _, row['paper_params_m'], row['paper_gmacs'], row['notes_params_m'], row['notes_gmacs'] = REFERENCE[name]
        for ours, paper in (('params_m', 'paper_params_m'), ('gmacs', 'paper_gmacs')):
            row[f'{ours}_off_pct'] = round(100 * (row[ours] / row[paper] - 1), 1)
    if not timed:
        return row
    deploy = deploy_form(model)
    calib = [torch.randn(8, *shape) for _ in range(4)]
    forms = {'fp32_eager': TorchRunner(model, compiled=False, label='fp32 eager')}
    if has_deploy_form(model):  # the model as written, so the rewrite's own gain is shown apart
        forms['fp32_compiled'] = TorchRunner(model, compiled=True, label='fp32 as written')
    forms[BASELINE] = TorchRunner(deploy, compiled=True, label='fp32 deploy')
    forms[AA] = TorchRunner(deploy, compiled=True, label='fp32 deploy (A/A)')
    forms['bf16'] = TorchRunner(deploy, compiled=True, label='bf16', dtype=torch.bfloat16)
    if dense is not None:
        forms['dense_fp32'] = TorchRunner(deploy_form(dense), compiled=True, label='dense fp32')
    failed = {}  # a backend that cannot take the model leaves its forms out, with the reason (as a stage does)
    if 'x86_pt2e' in backends:
        try:
            graph = quantize_x86_pt2e(deploy, calib)
            forms['pt2e_int8'] = TorchRunner(graph, compiled=True, label='int8')
            row['pt2e_int8_w8'] = weight_coverage(graph)['int8_weight_fraction']
        except Exception as error:
            failed['pt2e_int8'] = backend_failure(error)
    if 'openvino' in backends:
        settings = nncf_settings(deploy, shape)
        row['nncf_model_type'] = settings['model_type']
        row['nncf_ignored_scope'] = bool(settings['ignored_scope'])
        try:
            ov_int8, ov_fp32 = quantize_openvino(deploy, calib, settings)
            forms['ov_fp32'] = OpenVINORunner(ov_fp32, 'fp32', precision='f32', threads=threads)
            forms['ov_int8'] = OpenVINORunner(ov_int8, 'int8', precision='f32', threads=threads)
            row['ov_int8_w8'] = weight_coverage(ov_int8)['int8_weight_fraction']
        except Exception as error:
            failed['ov_int8'] = backend_failure(error)
    if failed:
        row['failed'] = failed
    session = time_forms(forms, shape, batch_sizes, threads=threads, rounds=rounds, min_seconds=min_seconds,
                         control=(BASELINE, AA), tolerance=tolerance, max_attempts=max_attempts, measure=measure)
    for batch in batch_sizes:
        for label in forms:
            if label != AA:
                row[f'{label}_img_s_bs{batch}'] = throughput(session, label, batch)['img_s']
        row[f'aa_bs{batch}'] = speedup(session, AA, BASELINE, batch)
        for label in forms:
            if label not in (BASELINE, AA, 'dense_fp32'):
                row[f'{label}_x_fp32_bs{batch}'] = speedup(session, label, BASELINE, batch)
        for label in ('pt2e_int8', 'ov_int8'):
            if label in forms:
                row[f'{label}_x_bf16_bs{batch}'] = speedup(session, label, 'bf16', batch)
        if 'ov_int8' in forms:
            row[f'ov_int8_x_ov_fp32_bs{batch}'] = speedup(session, 'ov_int8', 'ov_fp32', batch)
        if dense is not None:
            ratio = speedup(session, BASELINE, 'dense_fp32', batch)
            row[f'prune_x_dense_bs{batch}'] = ratio
            row[f'prune_efficiency_bs{batch}'] = round(ratio[0] * row['macs_kept'], 3)
            for label in ('pt2e_int8', 'ov_int8'):
                if label in forms:
                    row[f'{label}_x_dense_bs{batch}'] = speedup(session, label, 'dense_fp32', batch)
    row['noisy'] = session['noisy']
    row['timing'] = session
    return row


def _cell(value) -> str:
    if isinstance(value, list) and len(value) == 3:
        return f'{value[0]:.2f} [{value[1]:.2f}, {value[2]:.2f}]'
    if isinstance(value, dict):
        return '; '.join(f'{key}: {reason}' for key, reason in value.items())
    return '' if value is None else str(value)


def default_columns(batches) -> list[str]:
    columns = ['model', 'input', 'pruned', 'pruned_by', 'macs_kept', 'params_m', 'paper_params_m', 'params_m_off_pct',
               'notes_params_m', 'gmacs', 'paper_gmacs', 'gmacs_off_pct', 'notes_gmacs']
    for batch in batches:
        columns += [f'fp32_eager_img_s_bs{batch}', f'{BASELINE}_img_s_bs{batch}', f'aa_bs{batch}',
                    f'fp32_compiled_x_fp32_bs{batch}', f'bf16_x_fp32_bs{batch}', f'prune_x_dense_bs{batch}',
                    f'prune_efficiency_bs{batch}', f'pt2e_int8_x_fp32_bs{batch}', f'pt2e_int8_x_bf16_bs{batch}',
                    f'ov_int8_x_fp32_bs{batch}', f'ov_int8_x_bf16_bs{batch}', f'ov_int8_x_ov_fp32_bs{batch}']
    return columns + ['pt2e_int8_w8', 'ov_int8_w8', 'noisy', 'failed']


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    batches = sorted({int(key.rsplit('_bs', 1)[1]) for row in rows for key in row if key.startswith('aa_bs')})
    columns = [c for c in (columns or default_columns(batches)) if any(c in row for row in rows)]
    return tabulate([[_cell(row.get(c)) for c in columns] for row in rows], columns, tablefmt='github')


def _provenance(meta: dict) -> str:
    """The line under a generated table: what made the file, when, from which code, on what, under what load."""
    env = meta.get('env', {})
    versions = env.get('versions', {})
    return (f'Generated from `{meta.get("file")}`, written by `{meta.get("command")}` at git {meta.get("git_hash")} '
            f'on {str(meta.get("date", ""))[:10]}; {env.get("cpu", {}).get("model", "?")}, torch '
            f'{versions.get("torch")}, openvino {versions.get("openvino")}; load average '
            f'{env.get("load_average")} before, {meta.get("load_after")} after.')


def portable_command(words: list[str], json_path: str | None) -> str:
    """The command as a reader would type it: the output file relative to the working folder (or by its name
    alone when outside it), never a folder of the machine it was run on."""
    if json_path:
        out = Path(json_path).resolve()
        shown = str(out.relative_to(Path.cwd())) if out.is_relative_to(Path.cwd()) else out.name
        words = [word.replace(json_path, shown) for word in words]
    return 'python -m compress.benchmark ' + ' '.join(words)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('models', nargs='*')
    parser.add_argument('--batch', type=int, nargs='+', default=[1, 32])
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--input-size', type=int)
    parser.add_argument('--backends', nargs='+', default=['x86_pt2e', 'openvino'], choices=['x86_pt2e', 'openvino'])
    parser.add_argument('--rounds', type=int, default=9, help='interleaved rounds over all forms (6+: 95 %% interval)')
    parser.add_argument('--min-seconds', type=float, default=0.3, help='each form timed at least this long per round')
    parser.add_argument('--measure', choices=['cpu', 'wall'], default='cpu', help='what the ratios divide')
    parser.add_argument('--prune', type=float, nargs='*', default=[],
                        help='also measure the model pruned at these channel ratios (e.g. 0.3 0.5)')
    parser.add_argument('--prune-by', choices=['channels', 'macs'], default='channels',
                        help='--prune ratios remove this fraction of channels, or of MACs (ratio searched)')
    parser.add_argument('--round-to', type=int, default=8, help='pruned widths in multiples of this (0: any width)')
    parser.add_argument('--pruned-only', action='store_true',
                        help='with --prune: skip the dense row (pruned rows still time the dense fp32 model)')
    parser.add_argument('--complexity-only', action='store_true',
                        help='params and GMACs (next to the papers\' figures) without timing anything')
    parser.add_argument('--json', help='also write the rows, with git hash, date, environment and load, to this file')
    parser.add_argument('--from-json', nargs='+', metavar='FILE',
                        help='print the table of rows saved by --json (several files: one table), measuring nothing')
    parser.add_argument('--columns', nargs='+', help='print only these columns (names as in the JSON rows)')
    parser.add_argument('--readme', help='with --from-json: also write the table into this Markdown file, between '
                                         'the lines <!-- benchmark: FILE --> and <!-- end of benchmark: FILE -->')
    args = parser.parse_args(argv)
    unknown = [m for m in args.models if not timm.models.is_model(m)]
    if unknown:
        print(f'error: unknown model {unknown[0]!r}; see timm.list_models()', file=sys.stderr)
        return 2
    if not args.models and not args.from_json:
        print('error: name at least one model, or pass --from-json FILE', file=sys.stderr)
        return 2
    if args.rounds < 3:
        print('error: --rounds: at least 3 (6 or more for a 95 % interval)', file=sys.stderr)
        return 2
    rows, metas = [], []
    for path in args.from_json or []:
        try:
            with open(path) as handle:
                saved = json.load(handle)
            rows, metas = rows + saved['rows'], metas + [{**saved['meta'], 'file': path}]
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f'error: --from-json: cannot read {path} ({type(error).__name__}: {error}); give a file '
                  f'written by --json', file=sys.stderr)
            return 2
    if args.readme and not args.from_json:
        print('error: --readme writes a saved table: pass --from-json FILE too', file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    command = portable_command(argv if argv is not None else sys.argv[1:], args.json)
    meta = {'command': command, 'git_hash': git_hash(),
            'date': dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds'), 'env': environment()}
    for name in args.models:
        for ratio in ([] if args.pruned_only and args.prune else [None]) + args.prune:
            row = benchmark_model(name, args.batch, args.threads, args.input_size, args.backends, args.rounds,
                                  args.min_seconds, prune_ratio=ratio, prune_by=args.prune_by, round_to=args.round_to,
                                  measure=args.measure, timed=not args.complexity_only)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != 'timing'}), flush=True)
    table = format_table(rows, args.columns)
    print(table)
    if args.readme:
        from eval.tables import replace_block
        files = ' + '.join(args.from_json)
        provenance = '\n\n'.join(_provenance(saved_meta) for saved_meta in metas)
        replace_block(Path(args.readme), f'<!-- benchmark: {files} -->', f'<!-- end of benchmark: {files} -->',
                      f'{table}\n\n{provenance}')
    if args.json:
        meta['load_after'] = environment()['load_average']
        with open(args.json, 'w') as handle:
            json.dump({'meta': meta, 'rows': rows}, handle, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
