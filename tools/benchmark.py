#!/usr/bin/env python3
"""Speed and memory of attnzoo's kernels and backbones, as ratios to a baseline measured in the same run.

    python tools/benchmark.py kernels                 # every kernel case, bf16 and fp32 on CUDA
    python tools/benchmark.py kernels --quick         # tiny shapes: a smoke run that works on CPU
    python tools/benchmark.py kernels --only routing  # one section
    python tools/benchmark.py kernels --cases 'k13|dil2' --dtype bf16   # cases whose name matches
    python tools/benchmark.py models --models cswin_tiny_224 nat_mini --baseline resnet50
    python tools/benchmark.py models --models biformer_tiny --baseline swin_tiny_patch4_window7_224 --tag biformer
    python tools/benchmark.py cpu                     # CPU kernels vs reference vs dense SDPA; NAT vs CSWin train steps
    python tools/benchmark.py cpu --threads 1         # fewer threads than cores: steadier on a loaded machine
    python tools/benchmark.py cpu --cases transnext --tag transnext   # TransNeXt fused vs native (calls, models)
    python tools/benchmark.py models --models dat_pp_tiny --kernel-backends auto reference  # fused vs reference

Results go to --out (default model_cards/benchmarks/) as <device>-<section>[-<tag>].md (a table),
.json (every number) and .png (a plot), the device named in each file.
"""
import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib.harness import (Result, cpu_peak_mib, markdown_table, run_case, time_call,  # noqa: E402
                              time_interleaved)

KERNEL_SECTIONS = ('neighborhood', 'routing')
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def cpu_model():
    """The processor's model name (Linux /proc/cpuinfo), else what the platform module knows."""
    try:
        with open('/proc/cpuinfo') as info:
            for line in info:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device):
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU {cpu_model()} x{os.cpu_count()}'


def slug(text):
    return re.sub(r'[^A-Za-z0-9]+', '-', text).strip('-').lower()


def kernel_cases(sections, quick, pattern=None):
    import importlib
    cases = []
    for section in sections:
        module = importlib.import_module(f'benchlib.{section}')
        cases.extend(case for case in module.cases(quick) if pattern is None or re.search(pattern, case.name))
    return cases


def run_kernels(args, device, dtypes):
    cases = kernel_cases(args.only or KERNEL_SECTIONS, args.quick, args.cases)
    total = sum(2 * len(case.impls) for case in cases) * len(dtypes)
    results = []
    with tqdm(total=total, desc='kernels', unit='run') as progress:
        for dtype in dtypes:
            for case in cases:
                progress.set_postfix_str(f'{case.section}: {case.name} {dtype}')
                results.extend(run_case(case, device, dtype, args.warmup, args.iters, progress))
    baseline_of = {case.name: case.baseline for case in cases}
    return results, baseline_of


def model_gmacs(name, size):
    """Multiply-adds of one forward pass at ``size``, counted on the meta device. Fused attention is
    switched off while the model is built and run (timm's SDPA and attnzoo's kernels alike): the
    counter has no formula for CPU / meta SDPA or for attnzoo's custom ops and would skip the
    attention matmuls; the explicit path computes the same thing."""
    import timm
    from timm.layers import set_fused_attn, use_fused_attn
    from torch.utils.flop_counter import FlopCounterMode
    from attnzoo.kernels import use_backend
    fused = use_fused_attn()
    set_fused_attn(False)
    try:
        with torch.device('meta'), use_backend('reference'):
            model = timm.create_model(name).eval()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                model(torch.randn(1, 3, *size))
    finally:
        set_fused_attn(fused)
    return counter.get_total_flops() / 2e9


def run_models(args, device, dtypes):
    results = []
    for dtype in dtypes:
        results += _run_models(args, device, dtype)
    return results, {r.case: args.baseline for r in results}


def _run_models(args, device, dtype):
    import timm
    import attnzoo.backbones  # noqa: F401  registers the attnzoo families
    from attnzoo.kernels import use_backend
    names = [args.baseline] + [n for n in args.models if n != args.baseline]
    results = []
    for name in tqdm(names, desc=f'models {dtype}', unit='model'):
        model = timm.create_model(name).to(device=device, dtype=dtype)
        size = tuple(model.pretrained_cfg['input_size'][1:])
        params = sum(p.numel() for p in model.parameters())
        gmacs = model_gmacs(name, size)
        x = torch.randn(args.batch, 3, *size, device=device, dtype=dtype)
        # the baseline runs once, on the default kernels; each other model once per --kernel-backends entry
        for kernel_backend in ['auto'] if name == args.baseline else args.kernel_backends:
            impl = name if kernel_backend == 'auto' else f'{name} ({kernel_backend} kernels)'
            for mode in ('fwd', 'fwd+bwd'):
                row = Result('models', f'{name} @{size[0]}x{size[1]} b{args.batch}', impl, mode,
                             str(dtype).replace('torch.', ''),
                             extra={'params_m': params / 1e6, 'gmacs': gmacs, 'kernel_backend': kernel_backend})
                model.train(mode != 'fwd')

                def step():
                    if mode == 'fwd':
                        with torch.no_grad():
                            model(x)
                    else:
                        model(x).float().sum().backward()
                try:
                    with use_backend(None if kernel_backend == 'auto' else kernel_backend):
                        row.ms, row.peak_mib = time_call(step, device, args.warmup, args.iters)
                    row.extra['img_per_s'] = args.batch / (row.ms * 1e-3)
                except Exception as exc:  # reported in the table, not fatal for the other models
                    row.error = f'{type(exc).__name__}: {str(exc).splitlines()[0][:160]}'
                results.append(row)
    base = {r.mode: r for r in results if r.impl == args.baseline}
    for row in results:
        if row.ms and base[row.mode].ms:
            row.speedup_vs_baseline = base[row.mode].ms / row.ms
        if row.peak_mib is not None and base[row.mode].peak_mib:
            row.memory_vs_baseline = row.peak_mib / base[row.mode].peak_mib
    return results


def _ratio(numerator, denominator):
    return numerator / denominator if numerator and denominator else None


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
    def fmt(value, spec):
        return '-' if value is None else format(value, spec)
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


def write(results, baseline_of, section, args, device, table=markdown_table, plotter=plot, notes=None,
          legend=LEGEND):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    tag = f'-{slug(args.tag)}' if args.tag else ''
    stem = out / f'{slug(name)}-{section}{tag}{"-quick" if args.quick else ""}'
    header = {
        'device': name,
        'date': datetime.date.today().isoformat(),
        'torch': torch.__version__,
        'dtype': ' '.join(args.dtype),
        'section': section,
        'tag': args.tag,
        'quick': args.quick,
        'warmup': args.warmup,
        'iters': args.iters,
        **(notes or {}),
    }
    stem.with_suffix('.json').write_text(json.dumps({**header, 'results': [r.as_dict() for r in results]}, indent=1))
    lines = [f'# {section} benchmark on {name}', '',
             ', '.join(f'{k}: {v}' for k, v in header.items() if k not in ('device', 'section')), '',
             legend, '', table(results, baseline_of), '']
    stem.with_suffix('.md').write_text('\n'.join(lines))
    plotter(results, section, stem.with_suffix('.png'), f'{section} on {name} ({" ".join(args.dtype)})')
    print(f'wrote {stem}.md / .json / .png')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('section', choices=('kernels', 'models', 'cpu'))
    parser.add_argument('--only', nargs='+', choices=KERNEL_SECTIONS, help='kernel sections to run (default: all)')
    parser.add_argument('--quick', action='store_true', help='tiny shapes: a smoke run, also on CPU')
    parser.add_argument('--dtype', nargs='+', choices=DTYPES, default=None,
                        help='one or more; default: bf16 and fp32 on CUDA, fp32 on CPU')
    parser.add_argument('--cases', default=None,
                        help="kernels / cpu sections: only cases whose name matches this regex (the cpu section's "
                             "train steps are named 'train step <size>x<size> b<batch>')")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--models', nargs='+', default=['cswin_tiny_224'], help='models section: model names')
    parser.add_argument('--baseline', default='resnet50', help='models section: the model every other is compared to')
    parser.add_argument('--batch', type=int, default=32, help='models section: batch size')
    parser.add_argument('--kernel-backends', nargs='+', default=['auto'], choices=('auto', 'triton', 'reference'),
                        help="models section: run each model (not the baseline) with the attention ops on each of "
                             "these (attnzoo.kernels.use_backend; 'auto': Triton on CUDA, the CPU kernels on CPU), "
                             "e.g. 'auto reference' for fused vs reference rows")
    parser.add_argument('--tag', default='', help='names the result files <device>-<section>-<tag> (e.g. a family)')
    parser.add_argument('--threads', type=int, default=None, help='cpu section: torch threads (default: torch\'s)')
    parser.add_argument('--out', default=str(Path(__file__).resolve().parent.parent / 'model_cards' / 'benchmarks'))
    args = parser.parse_args(argv)
    if args.section == 'cpu':
        args.device = 'cpu'
        if args.dtype is not None and len(args.dtype) > 1:
            parser.error(f'the cpu section runs one --dtype at a time, got {" ".join(args.dtype)}')
    if args.dtype is None:
        args.dtype = ['bf16', 'fp32'] if args.device.startswith('cuda') else ['fp32']
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtypes = [DTYPES[name] for name in args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.section == 'cpu':
        # the machine's load (1, 5, 15 min averages) says how far wall times are from an idle machine's
        notes = dict(threads=torch.get_num_threads(), cpus=os.cpu_count(), load_average_at_start=os.getloadavg())
        results, baseline_of = run_cpu(args, device, dtypes[0])
        notes['load_average_at_end'] = os.getloadavg()
        print(cpu_table(results, baseline_of))
        write(results, baseline_of, args.section, args, device, table=cpu_table, plotter=plot_cpu, notes=notes,
              legend=CPU_LEGEND)
        return
    runner = run_kernels if args.section == 'kernels' else run_models
    results, baseline_of = runner(args, device, dtypes)
    print(markdown_table(results, baseline_of))
    write(results, baseline_of, args.section, args, device)


if __name__ == '__main__':
    main()
