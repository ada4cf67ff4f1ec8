"""Paper outputs from run records: one table (Markdown, CSV, LaTeX) and figures (PDF, PNG, SVG), never typed by hand.

    python -m eval.paper RUNS_DIR --out results/studies/<name>      (or: python -m eval.study STUDY.yaml --report)

One point per (model, method): a method is a row of a cell's record, named by the study's ``points`` (default:
the rows of the cell's last stage; the baseline when it has none). Files written into ``--out``:

* ``summary.md`` / ``summary.csv`` / ``summary.tex``: one row per point. Top-1 and Δtop-1 (against the cell's own
  fp32 baseline, paired over the same images) with ± half the width of their 95 % bootstrap intervals; params,
  GMACs, artifact size; latency and throughput (wall clock); speedups over the cell's fp32 baseline compiled, the
  median of per-round CPU-time ratios with ± half the width of its 95 % interval (the CSV keeps both ends). Under
  the table: how each number was measured, the data sets, and the hardware, threads and library versions read
  from the records. Accuracy on the 1,001-image ImageNet val subset carries a mark: that subset is easier than
  the full validation set. Rows whose weights are random say so, and carry no accuracy.
* ``cells.md`` / ``cells.csv`` / ``cells.tex``: every row of every cell, as :mod:`eval.tables` writes them.
* ``top1_vs_latency_<data>.{pdf,png,svg}``, ``top1_vs_gmacs_<data>.{pdf,png,svg}``: per evaluation data set, with the
  Pareto front marked; skipped where every weight is random.
* ``latency_vs_gmacs.{pdf,png,svg}``: every timed point, random weights included: what each form does to latency.
* ``speedup_<backend>.{pdf,png,svg}``: per backend, each point's speedup over its cell's fp32 baseline compiled, with
  the 95 % interval as error bars.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from eval.tables import load_records, paired_top1_delta, write_tables

__all__ = ['ReportError', 'Point', 'pareto_front', 'fronts', 'study_points', 'write_report', 'print_report', 'main']


class ReportError(ValueError):
    """Nothing to report (no records): one line, exit code 2."""

SUBSET_MARK = '†'
PARTIAL_MARK = '‡'
BACKEND_NAMES = {'torch': 'PyTorch (torch.compile, inductor)', 'x86_pt2e': 'PT2E int8 (X86InductorQuantizer)',
                 'openvino': 'OpenVINO int8 (NNCF)', 'nncf_openvino': 'OpenVINO 4-bit weights (NNCF)',
                 'torchao': 'torchao', 'onnx': 'ONNX Runtime'}


@dataclass
class Point:
    """One (model, method) of a study: a row of a cell's record, with the cell's baseline for deltas."""
    model: str
    method: str
    cell: str
    row: str
    backend: str
    metrics: dict
    baseline: dict | None
    record: dict

    @property
    def random_weights(self) -> bool:
        return weights_label(self.record) == 'random'

    @property
    def data(self) -> str:
        return self.record['data']['name']

    @property
    def top1(self) -> float | None:
        return None if self.random_weights else self.metrics.get('top1')


def weights_label(record: dict) -> str:
    """Where a record's weights came from: a checkpoint's name, 'published', 'trained here', or 'random'."""
    model = record.get('config', {}).get('model') or record.get('model') or {}
    checkpoint = model.get('checkpoint')
    if checkpoint:
        return checkpoint.removeprefix('pypi:') if checkpoint.startswith('pypi:') else Path(checkpoint).name
    if model.get('pretrained'):
        return 'published'
    if any(stage.get('kind') == 'train' for stage in record.get('config', {}).get('stages', [])):
        return 'trained here'
    return 'random'


def pareto_front(costs: list[float], values: list[float]) -> list[bool]:
    """For each point, whether no other point is at least as cheap and at least as good, and better in one."""
    return [not any(costs[j] <= costs[i] and values[j] >= values[i] and (costs[j] < costs[i] or values[j] > values[i])
                    for j in range(len(costs)))
            for i in range(len(costs))]


def _default_points(record: dict) -> dict[str, str]:
    stages = record.get('config', {}).get('stages') or []
    made = [s for s in record['stages'] if 'metrics' in s and s.get('kind') not in ('baseline', 'reference', 'control')]
    if not stages or not made:
        return {'fp32': 'baseline'}
    last = [s['name'] for s in made if s['kind'] == stages[-1]['kind']] or [made[-1]['name']]
    return {name: name for name in last}


def _manifest(runs: Path) -> dict:
    path = runs / 'study.json'
    if not path.is_file():
        return {}
    return {cell['id']: cell for cell in json.loads(path.read_text()).get('cells', [])}


def study_points(records: list[dict], cells: dict[str, dict] | None = None) -> tuple[list[Point], list[str]]:
    """The points of a study's records, in the study's cell order, and notes on rows a cell did not make.

    Args:
        records: the newest record of each cell (:func:`eval.tables.load_records`).
        cells: cell id -> {model, recipe, points} (the study's manifest); without it the model is the record's
            model name and every default row a point.
    """
    cells = cells or {}
    order = {cell_id: i for i, cell_id in enumerate(cells)}
    points, notes = [], []
    for record in sorted(records, key=lambda r: order.get(r['recipe']['name'], len(order))):
        cell_id = record['recipe']['name']
        cell = cells.get(cell_id, {})
        rows = {s['name']: s for s in record['stages']}
        baseline = rows.get('baseline', {}).get('metrics')
        # a study's cell id is <model>__<recipe>; records from elsewhere are labelled by their model and recipe
        model_id, _, recipe_id = cell_id.partition('__') if '__' in cell_id else (record['model']['name'], '', cell_id)
        model, recipe = cell.get('model') or model_id, cell.get('recipe') or recipe_id
        explicit = cell.get('points')
        wanted = explicit or _default_points(record)
        for label, row in wanted.items():
            method = label if explicit else recipe if len(wanted) == 1 else f'{recipe} {row}'
            stage = rows.get(row)
            if stage is None or 'metrics' not in stage:
                reason = stage.get('reason') if stage else 'the record has no such row'
                notes.append(f'{model} / {method}: no result ({cell_id}, {row}): {reason}')
                continue
            points.append(Point(model, method, cell_id, row, stage.get('backend') or 'torch', stage['metrics'],
                                baseline, record))
    models = list(dict.fromkeys(p.model for p in points))
    points.sort(key=lambda p: models.index(p.model))  # stable: a model's methods together, in the study's order
    return points, notes


# --- table ---------------------------------------------------------------------------------------------------

def _pm(value, interval, digits: int = 2) -> tuple[str, str]:
    """(Markdown text, LaTeX text) of a value with ± half the width of its interval."""
    if value is None:
        return '', ''
    if not interval:
        return f'{value:.{digits}f}', f'{value:.{digits}f}'
    half = (interval[1] - interval[0]) / 2
    return f'{value:.{digits}f} ± {half:.{digits}f}', f'{value:.{digits}f} $\\pm$ {half:.{digits}f}'


def _batches(points: list[Point]) -> list[int]:
    return sorted({b for p in points for b in (p.record.get('timing') or {}).get('batch_sizes') or []})


def _is_subset(point: Point) -> bool:
    return 'imagenet-val-subset' in point.data


def _columns(points: list[Point]) -> list[tuple[str, str, object]]:
    """(Markdown/CSV title, LaTeX title, cell(point) -> (md, tex, csv values dict)) for the summary table."""
    batches = _batches(points)
    accuracy = any(p.top1 is not None for p in points)
    letters = cpu_letters([p.record for p in points])

    def text(key):
        return lambda p: (lambda v: (v, _latex(v), {key: v}))(str(key_value(p, key)))

    def key_value(p, key):
        return {'model': p.model, 'method': p.method, 'weights': weights_label(p.record), 'data': p.data,
                'precision': p.metrics.get('precision', ''), 'runtime': p.metrics.get('runtime', ''),
                'cpu': letters.get(cpu_description(p.record['env']))}[key]

    def top1(p):
        if p.top1 is None:
            return ('random weights' if p.random_weights else ''), ('random weights' if p.random_weights else ''), \
                {'top1': None, 'top1_lo': None, 'top1_hi': None}
        ci = p.metrics.get('top1_ci95')
        md, tex = _pm(p.top1, ci)
        mark = SUBSET_MARK if _is_subset(p) else ''
        mark += PARTIAL_MARK if p.record['data'].get('subset') else ''
        return md + mark, tex + _latex(mark), {'top1': p.top1, 'top1_lo': ci and ci[0], 'top1_hi': ci and ci[1]}

    def delta(p):
        empty = {'top1_delta': None, 'top1_delta_lo': None, 'top1_delta_hi': None}
        if p.top1 is None or p.row == 'baseline':
            return '', '', empty
        value, ci = paired_top1_delta(p.metrics, p.baseline, p.record['data']['num_images'])
        if value is None:
            return '', '', empty
        md, tex = _pm(value, ci)
        return (('+' if value >= 0 else '') + md, ('+' if value >= 0 else '') + tex,
                {'top1_delta': value, 'top1_delta_lo': ci[0], 'top1_delta_hi': ci[1]})

    def number(key, digits, name=None):
        def cell(p):
            value = p.metrics.get(key)
            shown = '' if value is None else f'{value:.{digits}f}'
            return shown, shown, {name or key: value}
        return cell

    def speedup(batch):
        key = f'speedup_fp32_bs{batch}'

        def cell(p):
            ratio = p.metrics.get(key)
            if p.row == 'baseline':
                return '1 (ref.)', '1 (ref.)', {key: 1.0, f'{key}_lo': None, f'{key}_hi': None}
            if not ratio:
                return '', '', {key: None, f'{key}_lo': None, f'{key}_hi': None}
            md, tex = _pm(ratio[0], ratio[1:])
            noisy = '~' if (p.record.get('timing') or {}).get('noisy') else ''
            return md + noisy, tex + _latex(noisy), {key: ratio[0], f'{key}_lo': ratio[1], f'{key}_hi': ratio[2]}
        return cell

    columns = [('model', 'Model', text('model')), ('method', 'Method', text('method')),
               ('weights', 'Weights', text('weights')), ('precision', 'Precision', text('precision'))]
    if accuracy:
        columns += [('data', 'Eval data', text('data')), ('top1 (%)', 'Top-1 (\\%)', top1),
                    ('Δtop1 vs fp32 (pp)', '$\\Delta$Top-1 vs fp32 (pp)', delta)]
    columns += [('params (M)', 'Params (M)', number('params_m', 2)), ('GMACs', 'GMACs', number('gmacs', 3)),
                ('size (MB)', 'Size (MB)', number('size_mb', 2))]
    if batches:
        small, large = batches[0], batches[-1]
        if len(letters) > 1:
            columns.append(('CPU', 'CPU', text('cpu')))
        columns += [(f'latency bs{small} (ms)', f'Latency bs{small} (ms)',
                     number(f'cpu_latency_ms_bs{small}', 2)),
                    (f'throughput bs{large} (img/s)', f'Throughput bs{large} (img/s)',
                     number(f'cpu_img_s_bs{large}', 1))]
        columns += [(f'×fp32 bs{b}', f'$\\times$fp32 bs{b}', speedup(b)) for b in batches]
    return columns


def _latex(text: str) -> str:
    for plain, escaped in (('\\', '\\textbackslash{}'), ('&', '\\&'), ('%', '\\%'), ('$', '\\$'), ('#', '\\#'),
                           ('_', '\\_'), ('{', '\\{'), ('}', '\\}'), ('~', '\\textasciitilde{}'),
                           ('^', '\\^{}')):
        text = text.replace(plain, escaped)
    for symbol, command in (('×', '$\\times$'), ('±', '$\\pm$'), ('Δ', '$\\Delta$'), (SUBSET_MARK, '$^\\dagger$'),
                            (PARTIAL_MARK, '$^\\ddagger$')):
        text = text.replace(symbol, command)
    return text


def _distinct(values) -> str:
    seen = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return ' / '.join(str(v) for v in seen)


def cpu_description(env: dict) -> str:
    """The CPU a record ran on, as tables name it: model, the instruction-set flags that decide speed, CPU count."""
    cpu = env['cpu']
    return f'{cpu["model"]} ({", ".join(cpu.get("flags") or [])}; {cpu.get("logical_cpus")} logical CPUs)'


def cpu_letters(records: list[dict]) -> dict[str, str]:
    """A letter per distinct CPU of the records, in order of appearance: a table that mixes CPUs says which row
    ran where (cells of one study can be run on different machines)."""
    cpus = list(dict.fromkeys(cpu_description(r['env']) for r in records))
    return {cpu: chr(ord('A') + i) for i, cpu in enumerate(cpus)}


def environment_line(records: list[dict]) -> str:
    """Hardware, threads and library versions of the records, each distinct value once; several CPUs are listed
    with the letters of the table's CPU column."""
    envs = [r['env'] for r in records]
    letters = cpu_letters(records)
    cpus = (next(iter(letters)) if len(letters) == 1 else
            f'{len(letters)} CPUs (column CPU) ' + ', '.join(f'{letter} = {cpu}' for cpu, letter in letters.items()))
    threads = _distinct((r.get('timing') or {}).get('threads', r['env'].get('eval_threads')) for r in records)
    packages = ('torch', 'torchao', 'openvino', 'nncf', 'timm', 'torch-pruning')
    versions = ', '.join(f'{name} {_distinct(e["versions"].get(name) for e in envs)}' for name in packages
                         if any(e['versions'].get(name) for e in envs))
    dates = sorted(r.get('date', '')[:10] for r in records)
    gits = _distinct(r.get('git_hash') for r in records)
    return (f'Hardware: {cpus}; timing threads: {threads}; Python {_distinct(e["python"] for e in envs)}, '
            f'{versions}; git {gits}; measured {dates[0]} to {dates[-1]}.')


def _notes(points: list[Point], records: list[dict]) -> list[str]:
    lines = []
    batches = _batches(points)
    cpus = len(cpu_letters([p.record for p in points]))
    if batches:
        noisy = sorted({p.cell for p in points if (p.record.get('timing') or {}).get('noisy')})
        lines.append(
            'Speed: each cell is one run with one timing session (interleaved rounds, A/A control: the baseline '
            'timed twice). ×fp32 divides by the cell\'s own fp32 baseline, compiled (torch.compile, deploy form), '
            'timed in the same rounds; it is the median of the per-round CPU-time ratios, ± half the width of its '
            '95 % interval (intervals can be asymmetric: the CSV has both ends). Latency and throughput are wall '
            'clock, each cell in its own session on a shared machine: compare them across cells with care.'
            + (f' The cells ran on {cpus} different CPUs (column CPU, listed under Hardware): latency and '
               f'throughput compare only between rows of one CPU, and ×fp32 depends on the CPU too.'
               if cpus > 1 else '')
            + (f' A/A control outside tolerance (speedups marked ~): {", ".join(noisy)}.' if noisy else
               ' Every A/A control was within tolerance.'))
    lines.append('GMACs: multiply-accumulates counted at the ATen level (eval/complexity.py): convolutions, linears '
                 'and every matmul, attention matmuls included; papers\' "GFLOPs" for these backbones are MACs.')
    if any(p.random_weights for p in points):
        lines.append('Random weights: rows marked "random" measure speed and complexity only; their accuracy is not '
                     'meaningful and is not shown.')
    if any(p.top1 is not None for p in points):
        lines.append('Top-1 with ± half the width of its 95 % bootstrap interval over images; Δtop-1 against the '
                     'same cell\'s fp32 baseline, paired over the same images.')
    for data in sorted({(p.data, p.record['data']['num_images']) for p in points if p.top1 is not None}):
        point = next(p for p in points if p.data == data[0])
        if _is_subset(point):
            lines.append(f'{SUBSET_MARK} {data[0]}: {data[1]:,} images of the ImageNet validation set; easier than '
                         f'the full validation set: compare deltas, not published full-val top-1.')
        else:
            lines.append(f'{data[0]}: {data[1]:,} evaluation images ({point.record["data"].get("split")} split).')
    if any(p.record['data'].get('subset') for p in points if p.top1 is not None):
        lines.append(f'{PARTIAL_MARK} evaluated on the first images only (data.max_eval): not for publication.')
    lines.append(environment_line(records))
    return lines


def fronts(points: list[Point]) -> dict[str, list[bool | None]]:
    """Per point, whether it is on the Pareto front of top-1 against bs1 latency and against GMACs, among the points
    evaluated on the same data (None: no accuracy, or not measured)."""
    result = {}
    for key, measure in (('pareto_latency', 'cpu_latency_ms_bs1'), ('pareto_gmacs', 'gmacs')):
        flags: list[bool | None] = [None] * len(points)
        for data in {p.data for p in points}:
            members = [i for i, p in enumerate(points)
                       if p.data == data and p.top1 is not None and p.metrics.get(measure) is not None]
            on = pareto_front([points[i].metrics[measure] for i in members], [points[i].top1 for i in members])
            for i, flag in zip(members, on):
                flags[i] = flag
        result[key] = flags
    return result


def _write_table(points: list[Point], records: list[dict], notes: list[str], out: Path, title: str,
                 description: str) -> list[Path]:
    columns = _columns(points)
    front = fronts(points)
    md_rows, tex_rows, csv_rows = [], [], []
    for index, point in enumerate(points):
        cells = [cell(point) for _, _, cell in columns]
        md_rows.append([c[0] for c in cells])
        tex_rows.append([c[1] for c in cells])
        flat = {'cell': point.cell, 'row': point.row, 'backend': point.backend}
        for c in cells:
            flat.update(c[2])
        flat.update({key: flags[index] for key, flags in front.items()})
        csv_rows.append(flat)
    lines = _notes(points, records)
    random_only = points and all(p.random_weights for p in points)
    heading = f'{title}: ' + ('speed and complexity, random weights (accuracy not meaningful)' if random_only
                              else 'accuracy, complexity and speed')
    intro = (f'Generated by `python -m eval.paper` from {len(records)} run record(s); do not edit. Every row of every '
             f'run, with the stages that made no result: `cells.md`.' + (f' {description}' if description else ''))
    markdown = [f'# {heading}', '', intro, '',
                tabulate(md_rows, [c[0] for c in columns], tablefmt='github', disable_numparse=True), '',
                *[f'{line}  ' for line in lines]]
    if notes:
        markdown += ['', 'Points without a result:', '', *[f'- {note}' for note in notes]]
    (out / 'summary.md').write_text('\n'.join(markdown) + '\n')

    spec = 'l' * 4 + 'r' * (len(columns) - 4)
    label = re.sub(r'[^A-Za-z0-9]+', '-', title).strip('-')
    tex = ['% Generated by python -m eval.paper; needs \\usepackage{booktabs} and \\usepackage{graphicx}',
           '\\begin{table}[t]', '\\centering',
           f'\\caption{{{_latex(heading)}}}', f'\\label{{tab:{label}}}', '\\resizebox{\\linewidth}{!}{%',
           f'\\begin{{tabular}}{{{spec}}}', '\\toprule', ' & '.join(c[1] for c in columns) + ' \\\\', '\\midrule',
           *[' & '.join(row) + ' \\\\' for row in tex_rows], '\\bottomrule', '\\end{tabular}}',
           '\\par\\smallskip\\footnotesize', *[_latex(line) + '\\par' for line in lines], '\\end{table}']
    (out / 'summary.tex').write_text('\n'.join(tex) + '\n')

    fields = list(dict.fromkeys(key for row in csv_rows for key in row))
    with (out / 'summary.csv').open('w', newline='') as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(csv_rows)
    return [out / 'summary.md', out / 'summary.csv', out / 'summary.tex']


# --- figures ----------------------------------------------------------------------------------------------

GMACS_LABEL = 'GMACs (attention matmuls counted)'
LATENCY_CAPTION = 'Latency: wall clock at batch 1, each cell in its own timing session (compare within a cell).'


def _latency_caption(points: list[Point]) -> str:
    cpus = len(cpu_letters([p.record for p in points]))
    return LATENCY_CAPTION + (f' Timed on {cpus} different CPUs (the table\'s CPU column): latencies of different '
                              f'CPUs do not compare.' if cpus > 1 else '')


def _pyplot():
    import matplotlib
    matplotlib.use('Agg')  # files only: no display on servers and CI
    import matplotlib.pyplot as plt
    return plt


def _slug(text: str) -> str:
    return re.sub(r'[^A-Za-z0-9]+', '_', text).strip('_').lower()


def _save(fig, out: Path, stem: str) -> list[Path]:
    import matplotlib
    paths = [out / f'{stem}.pdf', out / f'{stem}.png', out / f'{stem}.svg']
    fig.savefig(paths[0], bbox_inches='tight')
    fig.savefig(paths[1], bbox_inches='tight', dpi=200)
    # the SVG is the committed copy: text, so it diffs; a fixed id salt and no date make a redraw from the same
    # records byte-identical, and text kept as text (not paths) keeps it small
    with matplotlib.rc_context({'svg.hashsalt': 'compress', 'svg.fonttype': 'none'}):
        fig.savefig(paths[2], bbox_inches='tight', metadata={'Date': None})
    return paths


def _styles(points: list[Point]) -> tuple[dict, dict]:
    plt = _pyplot()
    models = list(dict.fromkeys(p.model for p in points))
    methods = list(dict.fromkeys(p.method for p in points))
    colors = plt.get_cmap('tab20' if len(models) > 10 else 'tab10')
    markers = 'osD^v<>pP*XhH8d'
    return ({m: colors(i % colors.N) for i, m in enumerate(models)},
            {m: markers[i % len(markers)] for i, m in enumerate(methods)})


def _scatter_figure(points: list[Point], x_of, y_of, xlabel: str, ylabel: str, stem: str, out: Path, caption: str,
                    top1_axis: bool) -> list[Path]:
    """One point per (model, method): colour by model, marker by method. With ``top1_axis`` (y is top-1) each point
    gets its interval and the Pareto front is drawn; otherwise y is a cost, log-scaled when it spans a wide range."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    xs = [x_of(p) for p in points]
    ys = [y_of(p) for p in points]
    colors, markers = _styles(points)
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    for p, x, y in zip(points, xs, ys):
        ci = p.metrics.get('top1_ci95') if top1_axis else None
        yerr = [[y - ci[0]], [ci[1] - y]] if ci else None
        ax.errorbar([x], [y], yerr=yerr, fmt=markers[p.method], color=colors[p.model], markersize=6, capsize=2,
                    elinewidth=0.8, alpha=0.9)
    if top1_axis:
        on_front = sorted((x, y) for x, y, f in zip(xs, ys, pareto_front(xs, ys)) if f)
        ax.step([x for x, _ in on_front], [y for _, y in on_front], where='post', color='black', linewidth=1.0,
                linestyle='--')
        ax.scatter([x for x, _ in on_front], [y for _, y in on_front], s=160, facecolors='none', edgecolors='black',
                   linewidths=1.0, zorder=3)
    if max(xs) / max(min(xs), 1e-12) > 20:
        ax.set_xscale('log')
    if not top1_axis and max(ys) / max(min(ys), 1e-12) > 20:
        ax.set_yscale('log')
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=c, marker='o', linestyle='', label=m) for m, c in colors.items()]
    handles += [Line2D([], [], color='gray', marker=k, linestyle='', label=m) for m, k in markers.items()]
    if top1_axis:
        handles.append(Line2D([], [], color='black', linestyle='--', marker='o', markerfacecolor='none',
                              label='Pareto front'))
    ax.legend(handles=handles, fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5), frameon=False,
              ncol=2 if len(handles) > 24 else 1)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.text(0.01, 0.01, caption, fontsize=7, ha='left', va='bottom', wrap=True)
    paths = _save(fig, out, stem)
    plt.close(fig)
    return paths


def _speedup_figure(points: list[Point], backend: str, batches: list[int], out: Path) -> list[Path]:
    plt = _pyplot()
    models = list(dict.fromkeys(p.model for p in points))
    methods = list(dict.fromkeys(p.method for p in points))
    colors = plt.get_cmap('tab10')
    panel = max(3.0, 0.3 * len(models) * len(methods) + 1.0)
    fig, axes = plt.subplots(1, len(batches), figsize=(panel * len(batches) + 1.0, 3.8), squeeze=False,
                             sharey=True)
    width = 0.8 / len(methods)
    for ax, batch in zip(axes[0], batches):
        key = f'speedup_fp32_bs{batch}'
        for j, method in enumerate(methods):
            xs, heights, low, high, hatches = [], [], [], [], []
            for i, model in enumerate(models):
                point = next((p for p in points if p.model == model and p.method == method and p.metrics.get(key)),
                             None)
                if point is None:
                    continue
                median, lo, hi = point.metrics[key]
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                heights.append(median)
                low.append(median - lo)
                high.append(hi - median)
                hatches.append('//' if (point.record.get('timing') or {}).get('noisy') else '')
            bars = ax.bar(xs, heights, width=width, yerr=[low, high], capsize=2, color=colors(j % 10), label=method,
                          error_kw={'elinewidth': 0.8})
            for bar, hatch in zip(bars, hatches):
                bar.set_hatch(hatch)
        ax.axhline(1.0, color='black', linewidth=0.8)
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=45, ha='right', fontsize=7)
        ax.set_title(f'batch {batch}', fontsize=9)
        ax.grid(True, axis='y', alpha=0.3)
    from matplotlib.patches import Patch
    axes[0][0].set_ylabel('speedup over fp32 compiled (×)')
    # plain patches: a hatched first bar would make the legend claim every bar of that method was noisy
    axes[0][-1].legend(handles=[Patch(color=colors(j % 10), label=m) for j, m in enumerate(methods)], fontsize=7,
                       frameon=False, loc='center left', bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f'{BACKEND_NAMES.get(backend, backend)}: speedup over the fp32 baseline (torch.compile), timed in '
                 f'the same session', fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.text(0.01, 0.01, 'Bars: median of per-round CPU-time ratios; error bars: its 95 % interval; hatched: the '
                         "session's A/A control was outside tolerance. 1.0 = the cell's own fp32 baseline.",
             fontsize=7, ha='left', va='bottom', wrap=True)
    paths = _save(fig, out, f'speedup_{_slug(backend)}')
    plt.close(fig)
    return paths


def write_figures(points: list[Point], out: Path) -> tuple[list[Path], list[str]]:
    """The accuracy figures (per data set, where weights are not random), latency against GMACs, and the speedup
    bars (per backend)."""
    paths, skipped = [], []
    real = [p for p in points if p.top1 is not None]
    if not real:
        skipped.append('top-1 figures: every point has random weights (or no accuracy)')
    for data in dict.fromkeys(p.data for p in real):
        group = [p for p in real if p.data == data]
        count = group[0].record['data']['num_images']
        caption = (f'{data}, {count:,} images' + (' (easier than the full ImageNet validation set)'
                                                  if _is_subset(group[0]) else '')
                   + '. Error bars: 95 % bootstrap interval of top-1. Dashed: Pareto front. ')
        timed = [p for p in group if p.metrics.get('cpu_latency_ms_bs1') is not None]
        if timed:
            paths += _scatter_figure(timed, lambda p: p.metrics['cpu_latency_ms_bs1'], lambda p: p.top1,
                                     'latency, batch 1 (ms)', 'top-1 (%)', f'top1_vs_latency_{_slug(data)}', out,
                                     caption + _latency_caption(timed), top1_axis=True)
        else:
            skipped.append(f'top-1 vs latency on {data}: no point was timed at batch 1')
        counted = [p for p in group if p.metrics.get('gmacs')]
        if counted:
            paths += _scatter_figure(counted, lambda p: p.metrics['gmacs'], lambda p: p.top1, GMACS_LABEL, 'top-1 (%)',
                                     f'top1_vs_gmacs_{_slug(data)}', out, caption, top1_axis=True)
    # without accuracy (random weights) the cost axes still say something: what each deployed form does to latency
    costed = [p for p in points if p.metrics.get('gmacs') and p.metrics.get('cpu_latency_ms_bs1') is not None]
    if costed:
        paths += _scatter_figure(costed, lambda p: p.metrics['gmacs'], lambda p: p.metrics['cpu_latency_ms_bs1'],
                                 GMACS_LABEL, 'latency, batch 1 (ms)', 'latency_vs_gmacs', out,
                                 ('Random weights: speed and complexity only. ' if all(p.random_weights for p in costed)
                                  else '') + _latency_caption(costed), top1_axis=False)
    batches = _batches(points)
    for backend in dict.fromkeys(p.backend for p in points):
        group = [p for p in points if p.backend == backend and p.row != 'baseline'
                 and any(p.metrics.get(f'speedup_fp32_bs{b}') for b in batches)]
        if group:
            paths += _speedup_figure(group, backend, batches, out)
    return paths, skipped


def write_report(runs: str | Path, out: str | Path, cells=None, title: str | None = None,
                 description: str = '') -> list[Path]:
    """Write the summary table, the per-cell tables and the figures of the records under ``runs`` into ``out``.

    Args:
        runs: the records folder of a study (its ``study.json`` names models, methods and points).
        out: where the files go.
        cells: the study's cells (objects with ``manifest()`` or dicts); default: ``runs/study.json``.
        title: heading; default: the folder's name.

    Raises:
        ReportError: when there is no record to report.
    """
    runs, out = Path(runs), Path(out)
    if cells is not None:
        manifest = {c['id']: c for c in (c.manifest() if hasattr(c, 'manifest') else c for c in cells)}
    else:
        manifest = _manifest(runs)
    records = load_records(runs) if runs.is_dir() else []
    if manifest:
        records = [r for r in records if r['recipe']['name'] in manifest]
    if not records:
        raise ReportError(f'{runs}: no run records of this study yet; run it first '
                          f'(python -m compress.study STUDY.yaml)')
    out.mkdir(parents=True, exist_ok=True)
    points, notes = study_points(records, manifest)
    missing = [cell_id for cell_id in manifest if cell_id not in {r['recipe']['name'] for r in records}]
    if missing:
        notes.append(f'no record yet ({len(missing)} of {len(manifest)} cells): {", ".join(missing)}')
    paths = _write_table(points, records, notes, out, title or runs.name, description)
    paths += write_tables(records, out, stem='cells')
    figures, skipped = write_figures(points, out)
    paths += figures
    if skipped:
        with (out / 'summary.md').open('a') as handle:
            handle.write('\nFigures not drawn: ' + '; '.join(skipped) + '.\n')
    if figures:
        with (out / 'summary.md').open('a') as handle:
            handle.write('\nFigures (SVG beside this file, committed with it; the same figures as PDF and PNG are '
                         'drawn by the command that wrote it and are not in the repository):\n\n'
                         + '\n'.join(f'![{p.stem}]({p.name})' for p in figures if p.suffix == '.svg') + '\n')
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('runs', help="a study's records folder (with its study.json), or any folder of records")
    parser.add_argument('--out', required=True, help='where to write the table and figures')
    parser.add_argument('--title', help='heading (default: the study name or the folder name)')
    args = parser.parse_args(argv)
    manifest_path = Path(args.runs) / 'study.json'
    title = args.title or (json.loads(manifest_path.read_text()).get('study') if manifest_path.is_file() else None)
    return print_report(args.runs, args.out, title=title)


def print_report(runs, out, **options) -> int:
    """Write the report and print the path of every file written; a problem is one line and exit code 2."""
    try:
        paths = write_report(runs, out, **options)
    except ReportError as error:
        print(f'error: {error}', file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == '__main__':
    sys.exit(main())
