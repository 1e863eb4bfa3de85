#!/usr/bin/env python3
"""Speed and memory of attnzoo's kernels and backbones, as ratios to a baseline measured in the same run.

    python tools/benchmark.py kernels                 # every kernel case, bf16 and fp32 on CUDA
    python tools/benchmark.py kernels --quick         # tiny shapes: a smoke run that works on CPU
    python tools/benchmark.py kernels --only routing  # one section
    python tools/benchmark.py kernels --cases 'k13|dil2' --dtype bf16   # cases whose name matches
    python tools/benchmark.py kernels --only neighborhood --na-kernels v2   # one version of the Triton NA kernels
    python tools/benchmark.py design [--json]         # NA kernels v1 / v2: keys scored vs needed, exp, bytes per query
    python tools/benchmark.py models --models cswin_tiny_224 nat_mini --baseline resnet50
    python tools/benchmark.py models --models biformer_tiny --baseline swin_tiny_patch4_window7_224 --tag biformer
    python tools/benchmark.py cpu                     # CPU kernels vs reference vs dense SDPA; NAT vs CSWin train steps
    python tools/benchmark.py cpu --threads 1         # fewer threads than cores: steadier on a loaded machine
    python tools/benchmark.py cpu --cases transnext --tag transnext   # TransNeXt fused vs native (calls, models)
    python tools/benchmark.py models --models dat_pp_tiny --kernel-backends auto reference  # fused vs reference
    python tools/benchmark.py models --family all     # the zoo: every variant, then the cards, README table and plot
    python tools/benchmark.py models --family biformer nat   # some families' variants (files tagged zoo-<families>)
    python tools/benchmark.py cards                   # regenerate the cards' and README's generated parts only
    python tools/benchmark.py official crossformer_tiny crossformer_pp_small --official-repo ~/src/CrossFormer
                                                      # against the official code (a local checkout), same weights

Results go to --out (default model_cards/benchmarks/) as <device kind>-<section>[-<tag>].md (a table),
.json (every number, with the device, library versions and the machine's load), .csv (one row per
measurement) and .png (a plot), the device named in each file; the device kind is the one name of the
machine kind (benchlib/provenance.py, device_kind).
"""
import argparse
import csv
import datetime
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib.harness import (Result, _fmt as fmt, cpu_peak_mib, markdown_table, model_gmacs,  # noqa: E402
                              run_case, time_call, time_interleaved)
from benchlib.provenance import commit_of, cpu_model, device_kind, device_name, slug, versions  # noqa: E402
from _runtime import ToolError, check_at_least, run_cli  # noqa: E402

KERNEL_SECTIONS = ('neighborhood', 'routing')
DEFAULT_OUT = Path(__file__).resolve().parent.parent / 'model_cards' / 'benchmarks'
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def kernel_cases(sections, quick, pattern=None, na_kernels=None):
    import importlib
    cases = []
    for section in sections:
        module = importlib.import_module(f'benchlib.{section}')
        # the neighborhood section times each version of the Triton kernels named in --na-kernels
        options = dict(na_kernels=na_kernels) if section == 'neighborhood' and na_kernels else {}
        cases.extend(case for case in module.cases(quick, **options)
                     if pattern is None or re.search(pattern, case.name))
    return cases


def run_design(as_json):
    from benchlib.design import design_rows, design_table
    rows = design_rows()
    print(json.dumps(rows, indent=1) if as_json else design_table(rows))


def run_kernels(args, device, dtypes):
    cases = kernel_cases(args.only or KERNEL_SECTIONS, args.quick, args.cases, args.na_kernels)
    total = sum(2 * len(case.impls) for case in cases) * len(dtypes)
    results = []
    with tqdm(total=total, desc='kernels', unit='run') as progress:
        for dtype in dtypes:
            for case in cases:
                progress.set_postfix_str(f'{case.section}: {case.name} {dtype}')
                results.extend(run_case(case, device, dtype, args.warmup, args.iters, progress))
    baseline_of = {case.name: case.baseline for case in cases}
    return results, baseline_of


def run_models(args, device, dtypes):
    results = []
    for dtype in dtypes:
        results += _run_models(args, device, dtype)
    return results, {r.case: args.baseline for r in results}


def time_within(fn, device, warmup, iters, budget_s):
    """``time_call`` with at most as many timed calls as fit in ``budget_s`` (at least one), judged by the
    warm-up calls: a 100-GMAC model on two CPU cores takes tens of seconds per call."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    per_call = (time.perf_counter() - start) / warmup if warmup else 0.
    calls = iters if budget_s is None or per_call == 0 else max(1, min(iters, int(budget_s // per_call)))
    ms, peak = time_call(fn, device, 0, calls)
    return ms, peak, calls


def _run_models(args, device, dtype):
    import timm
    import attnzoo.backbones  # noqa: F401  registers the attnzoo families
    from attnzoo.kernels import use_backend
    from benchlib import zoo
    names = [args.baseline] + [n for n in args.models if n != args.baseline]
    runs = sum(len(['auto'] if n == args.baseline else args.kernel_backends) for n in names) * len(args.modes)
    results = []
    progress = tqdm(total=runs, desc=f'models {str(dtype).replace("torch.", "")}', unit='run')
    for name in names:
        progress.set_postfix_str(name)
        size = tuple(timm.models.get_pretrained_cfg(name).input_size[1:]) if timm.is_model(name) else None
        gmacs = model_gmacs(name, size) if size else None   # an unknown name fails below, in create_model
        skip = args.max_gmacs is not None and gmacs is not None and gmacs > args.max_gmacs
        model = None if skip else timm.create_model(name).to(device=device, dtype=dtype)
        with torch.device('meta'):
            meta = timm.create_model(name)
        params = sum(p.numel() for p in meta.parameters())
        fam = next((f for f in zoo.FAMILIES if name in f.variant_names()), None)
        variant = fam.variants[fam.variant_names().index(name)] if fam else None
        facts = dict(family=fam.title if fam else '', paper_top1=variant.top1 if variant else None,
                     paper_resolution=variant.resolution if variant else None)
        x = None if skip else torch.randn(args.batch, 3, *size, device=device, dtype=dtype)
        # the baseline runs once, on the default kernels; each other model once per --kernel-backends entry
        for kernel_backend in ['auto'] if name == args.baseline else args.kernel_backends:
            impl = name if kernel_backend == 'auto' else f'{name} ({kernel_backend} kernels)'
            for mode in args.modes:
                row = Result('models', f'{name} @{size[0]}x{size[1]} b{args.batch}', impl, mode,
                             str(dtype).replace('torch.', ''),
                             extra={'params_m': params / 1e6, 'params': params, 'gmacs': gmacs, 'size': size,
                                    'license': meta.pretrained_cfg.get('license'), 'kernel_backend': kernel_backend,
                                    **facts})
                results.append(row)
                if skip:
                    row.error = f'not timed: {gmacs:.0f} GMACs > --max-gmacs {args.max_gmacs:g}'
                    progress.update(1)
                    continue
                model.train(mode != 'fwd')

                def step():
                    if mode == 'fwd':
                        with torch.inference_mode():
                            model(x)
                    else:
                        model(x).float().sum().backward()
                try:
                    with use_backend(None if kernel_backend == 'auto' else kernel_backend):
                        row.ms, row.peak_mib, row.extra['timed_calls'] = time_within(
                            step, device, args.warmup, args.iters, args.budget_s)
                    row.extra['img_per_s'] = args.batch / (row.ms * 1e-3)
                except Exception as exc:  # reported in the table, not fatal for the other models
                    row.error = f'{type(exc).__name__}: {str(exc).splitlines()[0][:160]}'
                progress.update(1)
        del model, x
    progress.close()
    base = {r.mode: r for r in results if r.impl == args.baseline}
    for row in results:
        if row.ms and base[row.mode].ms:
            row.speedup_vs_baseline = base[row.mode].ms / row.ms
        if row.peak_mib is not None and base[row.mode].peak_mib:
            row.memory_vs_baseline = row.peak_mib / base[row.mode].peak_mib
    return results


def models_table(results, baseline_of):
    """One row per model and mode: size, paper top-1, time, throughput, ratio to the baseline."""
    lines = ['| case | model | family | dtype | mode | params (M) | GMACs | paper top-1 | ms | img/s | x vs baseline '
             '| peak MiB | note |', '|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|']
    for r in results:
        impl = r.impl + (' (baseline)' if baseline_of.get(r.case) == r.impl else '')
        e = r.extra
        lines.append(f'| {r.case} | {impl} | {e.get("family", "")} | {r.dtype} | {r.mode} '
                     f'| {fmt(e["params_m"], ".2f")} '
                     f'| {fmt(e["gmacs"], ".2f")} | {fmt(e.get("paper_top1"), "g")} | {fmt(r.ms, ".1f")} '
                     f'| {fmt(e.get("img_per_s"), ".3g")} | {fmt(r.speedup_vs_baseline, ".2f")} '
                     f'| {fmt(r.peak_mib, ".1f")} | {r.error} |')
    return '\n'.join(lines)


def _ratio(numerator, denominator):
    return numerator / denominator if numerator and denominator else None


def run_official(args, device, notes):
    """attnzoo variants against their official code, same weights, on the CPU (tools/benchlib/official.py)."""
    from benchlib import official
    args.tag = args.tag or '-'.join(dict.fromkeys(official.OFFICIAL_BUILDS[name].family for name in args.variants))
    rounds = len(args.variants) * args.repeats * args.iters
    with tqdm(total=rounds, desc='official', unit='round') as progress:
        try:
            results = official.run(args.variants, args.official_repo, args.batch, args.warmup, args.iters,
                                   args.repeats, progress)
        except ValueError as exc:   # a checkout that does not build the variant, outputs that disagree
            raise ToolError(str(exc)) from None
    notes.update(load_average_at_end=os.getloadavg(), batch=args.batch, repeats=args.repeats,
                 official_repo_commit=commit_of(args.official_repo))
    print(official.table(results))
    write(results, {}, args.section, args, device, table=official.table, plotter=official.plot, notes=notes,
          legend=official.LEGEND)


def run_cpu(args, device, dtype):
    """Kernel cases and model train steps on the CPU, every case's implementations timed in turns;
    ratios from process CPU time (wall time is in the table too)."""
    from benchlib import cpu
    cases = [case for case in cpu.kernel_cases(args.quick) if args.cases is None or re.search(args.cases, case.name)]
    steps = [(size, batch) for size, batch in (((32, 2),) if args.quick else cpu.MODEL_STEPS)
             if args.cases is None or re.search(args.cases, f'train step {size}x{size} b{batch}')]
    results = []
    with tqdm(total=args.iters * (2 * len(cases) + len(steps)), desc='cpu', unit='round') as progress:
        for case in cases:
            progress.set_postfix_str(case.name)
            for mode, calls in zip(('fwd', 'fwd+bwd'), cpu.kernel_calls(case, dtype)):
                rows = _cpu_rows(case.kind, case.name, mode, dtype, calls, args, progress)
                base, dense = rows[case.baseline], rows.get('sdpa-dense')
                for row in rows.values():
                    row.speedup_vs_baseline = _ratio(base.extra['cpu_ms'], row.extra['cpu_ms'])
                    row.memory_vs_baseline = _ratio(row.peak_mib, base.peak_mib)
                    row.extra['speedup_vs_sdpa_dense'] = _ratio(dense.extra['cpu_ms'], row.extra['cpu_ms']) \
                        if dense else None
                results.extend(rows.values())
        for size, batch in steps:
            name = f'train step {size}x{size} b{batch}'
            progress.set_postfix_str(name)
            rows = _cpu_rows('models', name, 'fwd+bwd', dtype, cpu.model_calls(size, batch, dtype), args, progress)
            base = rows[cpu.MODEL_BASELINE]
            for row in rows.values():
                row.extra['time_vs_baseline'] = _ratio(row.extra['cpu_ms'], base.extra['cpu_ms'])
                row.memory_vs_baseline = _ratio(row.peak_mib, base.peak_mib)
            results.extend(rows.values())
    baseline_of = {case.name: case.baseline for case in cases}
    baseline_of.update({r.case: cpu.MODEL_BASELINE for r in results if r.section == 'models'})
    return results, baseline_of


def _cpu_rows(section, case, mode, dtype, calls, args, progress):
    wall, cpu_ms = time_interleaved(calls, args.warmup, args.iters, progress)
    rows = {}
    for impl, fn in calls.items():
        row = Result(section, case, impl, mode, str(dtype).replace('torch.', ''), ms=wall[impl],
                     extra={'cpu_ms': cpu_ms[impl]})
        row.peak_mib = cpu_peak_mib(fn)
        rows[impl] = row
    return rows


def cpu_table(results, baseline_of):
    """Kernel rows: speed-ups over the reference and over dense SDPA; model rows: time over the baseline model."""
    lines = ['| case | impl | mode | ms (wall) | ms (CPU) | x vs reference | x vs sdpa-dense | peak MiB '
             '| mem vs reference |', '|---|---|---|---:|---:|---:|---:|---:|---:|']
    for r in results:
        if r.section == 'models':
            continue
        impl = r.impl + (' (baseline)' if baseline_of.get(r.case) == r.impl else '')
        lines.append(f'| {r.case} | {impl} | {r.mode} | {r.ms:.1f} | {r.extra["cpu_ms"]:.1f} '
                     f'| {fmt(r.speedup_vs_baseline, ".2f")} | {fmt(r.extra["speedup_vs_sdpa_dense"], ".2f")} '
                     f'| {fmt(r.peak_mib, ".1f")} | {fmt(r.memory_vs_baseline, ".2f")} |')
    lines += ['', '| train step | model | ms (wall) | ms (CPU) | time vs baseline | peak MiB | mem vs baseline |',
              '|---|---|---:|---:|---:|---:|---:|']
    for r in results:
        if r.section == 'models':
            model = r.impl + (' (baseline)' if baseline_of.get(r.case) == r.impl else '')
            lines.append(f'| {r.case} | {model} | {r.ms:.1f} | {r.extra["cpu_ms"]:.1f} '
                         f'| {fmt(r.extra["time_vs_baseline"], ".2f")} | {fmt(r.peak_mib, ".1f")} '
                         f'| {fmt(r.memory_vs_baseline, ".2f")} |')
    return '\n'.join(lines)


def _bars(ax, rows, case_of, value_of, ylabel, rotation=60, fontsize=6):
    """Grouped bars on a log scale: one group per case, one bar per implementation."""
    cases = list(dict.fromkeys(case_of(r) for r in rows))
    impls = list(dict.fromkeys(r.impl for r in rows))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        values = {case_of(r): value_of(r) for r in rows if r.impl == impl}
        ax.bar([c + i * width for c in range(len(cases))], [values.get(c, 0) for c in cases], width, label=impl)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels(cases, rotation=rotation, ha='right', fontsize=fontsize)
    ax.set_ylabel(ylabel)
    ax.set_yscale('log')
    ax.legend(fontsize=7)


def plot_cpu(results, section, path, title):
    """Kernel cases (forward, forward + backward) and model train steps, CPU milliseconds, log scale."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [('kernels, fwd', [r for r in results if r.section != 'models' and r.mode == 'fwd']),
              ('kernels, fwd+bwd', [r for r in results if r.section != 'models' and r.mode == 'fwd+bwd']),
              ('train steps', [r for r in results if r.section == 'models'])]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for ax, (label, rows) in zip(axes, panels):
        _bars(ax, rows, lambda r: r.case, lambda r: r.extra['cpu_ms'], 'CPU ms per call (lower is better)',
              rotation=50, fontsize=7)
        ax.set_title(label)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(results, section, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, mode in zip(axes, ('fwd', 'fwd+bwd')):
        rows = [r for r in results if r.mode == mode and r.ms]
        if section == 'models':
            for r in rows:
                ax.scatter(r.extra['params_m'], r.extra['img_per_s'])
                ax.annotate(r.impl, (r.extra['params_m'], r.extra['img_per_s']), fontsize=7)
            ax.set_xlabel('parameters (M)')
            ax.set_ylabel('images / s')
        else:
            _bars(ax, rows, lambda r: f'{r.case} {r.dtype}', lambda r: r.ms, 'ms (lower is better)')
        ax.set_title(f'{mode}')
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LEGEND = ('Times are medians; "x vs baseline" > 1 means faster than the baseline of the case, measured in the same '
          'run. GB/s counts the least traffic: forward = inputs read once + output written once; forward+backward '
          'adds dO read once + input gradients written once (model_cards/benchmarks/README.md).')
CPU_LEGEND = ('Medians of calls timed in turns (one call of every implementation per round), so that the load of a '
              'shared machine falls on all alike. Ratios are from process CPU time, which that load inflates less '
              'than wall time: "x vs reference" / "x vs sdpa-dense" > 1 means faster than it; "time vs baseline" < 1 '
              'means a train step faster than the baseline model\'s. Peak MiB: CPU memory allocated at the peak of one '
              'call, from the profiler\'s memory events (tools/benchlib/harness.py, cpu_peak_mib).')


def write_csv(results, path):
    """One line per result, its ``extra`` figures as columns of their own."""
    rows = [{k: v for k, v in r.as_dict().items() if k != 'extra'} | r.extra for r in results]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, 'w', newline='') as handle:
        writer = csv.DictWriter(handle, fields)
        writer.writeheader()
        writer.writerows(rows)


def write(results, baseline_of, section, args, device, table=markdown_table, plotter=plot, notes=None,
          legend=LEGEND):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    tag = f'-{slug(args.tag)}' if args.tag else ''
    stem = out / f'{device_kind(device)}-{section}{tag}{"-quick" if args.quick else ""}'
    header = {
        'device': name,
        'date': datetime.date.today().isoformat(),
        **versions(),
        'dtype': ' '.join(args.dtype),
        'section': section,
        'tag': args.tag,
        'quick': args.quick,
        'warmup': args.warmup,
        'iters': args.iters,
        **(notes or {}),
    }
    stem.with_suffix('.json').write_text(json.dumps({**header, 'results': [r.as_dict() for r in results]}, indent=1))
    write_csv(results, stem.with_suffix('.csv'))
    lines = [f'# {section} benchmark on {name}', '',
             ', '.join(f'{k}: {v}' for k, v in header.items() if k not in ('device', 'section')), '',
             legend, '', table(results, baseline_of), '']
    stem.with_suffix('.md').write_text('\n'.join(lines))
    plotter(results, section, stem.with_suffix('.png'), f'{section} on {name} ({" ".join(args.dtype)})')
    print(f'wrote {stem}.md / .json / .csv / .png')
    return stem


def plot_zoo(results, section, path, title):
    from benchlib.cards import plot_zoo as draw
    draw({r.impl: r.as_dict() for r in results if r.mode == 'fwd'}, path, title)


ZOO_LEGEND = ('One process, the variants one after another, each at its default input size (the paper\'s '
              'resolution). Throughput = batch / median time of the timed calls; "x vs baseline" > 1 means faster '
              'than the baseline, measured in the same run. Rows "not timed" are above --max-gmacs. The paper\'s '
              'top-1 comes from tools/benchlib/zoo.py; params and GMACs are measured on the code.')


def regenerate_cards(out, results=()):
    """The cards' generated blocks, README's zoo table and the zoo plots, from the code, tools/benchlib/zoo.py
    and the zoo results in ``out``; the params and GMACs of ``results`` (this run's) are not counted again."""
    from benchlib import cards, zoo
    figures = {r.impl: dict(params=r.extra['params'], gmacs=r.extra['gmacs'], license=r.extra['license'],
                            size=tuple(r.extra['size'])) for r in results if 'license' in r.extra}
    with tqdm(total=len(zoo.all_variants()), desc='cards: params and GMACs', unit='model',
              disable=len(figures) == len(zoo.all_variants())) as progress:
        written = cards.regenerate(out, figures=figures, progress=progress)
    for header, rows in cards.zoo_runs(out):
        threads = f', {header["threads"]} thread{"s" if header["threads"] != 1 else ""}' if 'threads' in header else ''
        cards.plot_zoo(rows, Path(out) / header['file'].replace('.json', '.png'),
                       f'attnzoo zoo on {header["device"]} ({header["date"]}, batch {header["batch"]}{threads}, fp32)')
    print('regenerated ' + ', '.join(str(p.relative_to(Path(__file__).resolve().parent.parent)) for p in written))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('section', choices=('kernels', 'models', 'cpu', 'cards', 'design', 'official'))
    parser.add_argument('variants', nargs='*', default=[],
                        help='official section: the attnzoo variants to time against their official code')
    parser.add_argument('--official-repo', default=None,
                        help='official section: a local checkout of the variants\' official repository (its top '
                             'folder; tools/benchlib/official.py says how it builds each variant)')
    parser.add_argument('--repeats', type=int, default=3,
                        help='official section: timed runs of --iters alternating rounds each, the order of the two '
                             'models swapped every run; the ratio is their median, their range is reported')
    parser.add_argument('--json', action='store_true', help='design section: the rows as JSON instead of a table')
    parser.add_argument('--na-kernels', nargs='+', choices=('v1', 'v2'), default=None,
                        help='kernels section: versions of the Triton neighborhood kernels to time (default: both)')
    parser.add_argument('--only', nargs='+', choices=KERNEL_SECTIONS, help='kernel sections to run (default: all)')
    parser.add_argument('--quick', action='store_true', help='tiny shapes: a smoke run, also on CPU')
    parser.add_argument('--dtype', nargs='+', choices=DTYPES, default=None,
                        help='one or more; default: bf16 and fp32 on CUDA, fp32 on CPU')
    parser.add_argument('--cases', default=None,
                        help="kernels / cpu sections: only cases whose name matches this regex (the cpu section's "
                             "train steps are named 'train step <size>x<size> b<batch>')")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--warmup', type=int, default=None, help='default: 1 with --family, else 3')
    parser.add_argument('--iters', type=int, default=None, help='timed calls (default: 10; with --family at most '
                                                                 'what fits in --budget-s)')
    parser.add_argument('--models', nargs='+', default=None,
                        help='models section: model names (default: cswin_tiny_224 unless --family is given)')
    parser.add_argument('--family', nargs='+', default=None,
                        help="models section: every variant of these families (tools/benchlib/zoo.py: biformer, "
                             "nat, ...; 'all' for the whole zoo, which also regenerates the cards, README table and "
                             "plot)")
    parser.add_argument('--baseline', default='resnet50', help='models section: the model every other is compared to')
    parser.add_argument('--batch', type=int, default=None, help='models / official sections: batch size (default: '
                                                                 '1 with --family, 4 in the official section, else 32)')
    parser.add_argument('--modes', nargs='+', default=None, choices=('fwd', 'fwd+bwd'),
                        help='models section (default: fwd with --family, else both)')
    parser.add_argument('--max-gmacs', type=float, default=None,
                        help='models section: list but do not time models above this many GMACs per image')
    parser.add_argument('--budget-s', type=float, default=None,
                        help='models section: at most as many timed calls as fit in this many seconds, at least '
                             'one (default with --family: 5)')
    parser.add_argument('--kernel-backends', nargs='+', default=['auto'], choices=('auto', 'triton', 'reference'),
                        help="models section: run each model (not the baseline) with the attention ops on each of "
                             "these (attnzoo.kernels.use_backend; 'auto': Triton on CUDA, the CPU kernels on CPU), "
                             "e.g. 'auto reference' for fused vs reference rows")
    parser.add_argument('--tag', default='', help='names the result files <device>-<section>-<tag> (e.g. a family)')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch threads (default: 1 with --family on CPU and in the official section, else '
                             'torch\'s)')
    parser.add_argument('--out', default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if args.section == 'cpu':
        args.device = 'cpu'
        if args.dtype is not None and len(args.dtype) > 1:
            parser.error(f'the cpu section runs one --dtype at a time, got {" ".join(args.dtype)}')
    if args.dtype is None:
        args.dtype = ['bf16', 'fp32'] if args.device.startswith('cuda') else ['fp32']
    zoo_run = args.family is not None
    if zoo_run:
        from benchlib import zoo
        try:
            families = zoo.FAMILIES if 'all' in args.family else [zoo.family(name) for name in args.family]
        except ValueError as exc:
            parser.error(str(exc))
        args.models = [name for fam in families for name in fam.variant_names()] + (args.models or [])
        args.tag = args.tag or ('zoo' if 'all' in args.family else 'zoo-' + '-'.join(args.family))
        if args.threads is None and not args.device.startswith('cuda'):
            # one thread: on a CPU shared with other work, two threads wait on each other and times jump
            # 10-30x from call to call; one thread per process gives steady, comparable figures
            args.threads = 1
    if args.variants and args.section != 'official':
        parser.error(f'variants ({" ".join(args.variants)}) are for the official section; the {args.section} section '
                     f'takes --models / --family')
    if args.section == 'official':
        args.device = 'cpu'
        args.threads = 1 if args.threads is None else args.threads
    args.models = args.models or ['cswin_tiny_224']
    args.warmup = (1 if zoo_run else 3) if args.warmup is None else args.warmup
    args.iters = 10 if args.iters is None else args.iters
    args.batch = ((1 if zoo_run else 4 if args.section == 'official' else 32) if args.batch is None
                  else args.batch)
    args.modes = args.modes or (['fwd'] if zoo_run else ['fwd', 'fwd+bwd'])
    args.budget_s = args.budget_s if args.budget_s is not None else (5. if zoo_run else None)
    check_args(args)
    return args


def check_args(args) -> None:
    """Raises a :class:`ToolError` for counts below one and, in the models section, unknown model names: before
    anything is timed."""
    check_at_least(args, {'batch': 1, 'iters': 1, 'warmup': 0, 'threads': 1, 'budget_s': 0., 'repeats': 1})
    if args.section == 'official':
        from benchlib.official import check_request
        try:
            check_request(args.variants, args.official_repo)
        except ValueError as exc:
            raise ToolError(str(exc)) from None
    if args.section == 'models':
        import timm
        from _models import unknown_model_message  # registers the attnzoo families with timm
        for option, names in (('--baseline', [args.baseline]), ('--models', args.models)):
            unknown = next((name for name in names if not timm.is_model(name)), None)
            if unknown is not None:
                raise ToolError(f'{option}: {unknown_model_message(unknown)}')


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtypes = [DTYPES[name] for name in args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.section == 'cards':
        regenerate_cards(args.out)
        return
    if args.section == 'design':
        run_design(args.json)
        return
    # the machine's load (1, 5, 15 min averages) says how far wall times are from an idle machine's
    notes = dict(cpu=cpu_model(), threads=torch.get_num_threads(), cpus=os.cpu_count(),
                 load_average_at_start=os.getloadavg())
    if args.section == 'cpu':
        results, baseline_of = run_cpu(args, device, dtypes[0])
        notes['load_average_at_end'] = os.getloadavg()
        print(cpu_table(results, baseline_of))
        write(results, baseline_of, args.section, args, device, table=cpu_table, plotter=plot_cpu, notes=notes,
              legend=CPU_LEGEND)
        return
    if args.section == 'official':
        run_official(args, device, notes)
        return
    if args.section == 'kernels':
        results, baseline_of = run_kernels(args, device, dtypes)
        notes['load_average_at_end'] = os.getloadavg()
        print(markdown_table(results, baseline_of))
        write(results, baseline_of, args.section, args, device, notes=notes)
        return
    results, baseline_of = run_models(args, device, dtypes)
    notes.update(load_average_at_end=os.getloadavg(), batch=args.batch, max_gmacs=args.max_gmacs,
                 budget_s=args.budget_s)
    print(models_table(results, baseline_of))
    zoo_run = args.family is not None
    write(results, baseline_of, args.section, args, device, table=models_table,
          plotter=plot_zoo if zoo_run else plot, notes=notes, legend=ZOO_LEGEND if zoo_run else LEGEND)
    if zoo_run and 'all' in args.family:
        if Path(args.out).resolve() == DEFAULT_OUT:
            regenerate_cards(args.out, results)
        else:   # the cards link their figures' files in model_cards/benchmarks/
            print(f'cards not regenerated: --out is not {DEFAULT_OUT}')


if __name__ == '__main__':
    run_cli(main)
