#!/usr/bin/env python3
"""One short GPU run that checks the fused kernels and measures the project's GPU goals.

    python tools/gpu_check.py                          # on a CUDA machine; within --budget-s (480 s)
    python tools/gpu_check.py --out /tmp/check --budget-s 300
    python tools/gpu_check.py --dry-run --out /tmp/d   # every step on CPU, Triton interpreter, tiny shapes

Steps, in order of value, each with its own time cap inside the budget (a step whose turn comes after the
budget is spent is skipped with a note; a step past its cap starts nothing new and writes a row for each
thing it did not run):

  a. environment: device, SMs, memory, library versions, natten and the v2 kernel present or not;
  b. correctness: every autotune config of the neighborhood kernels forced once per case and dtype, values
     and every gradient against the float64 reference; the routing kernels at BiFormer-S stages 2-3;
     TransNeXt's call (extra_bias, window_weight); the v2 kernel where attnzoo.kernels has use_na_kernel;
  c. compute-sanitizer memcheck (when on PATH) over a small neighborhood and routing fwd + bwd, in a subprocess;
  d. speed of the goal cases (triton.testing.do_bench medians, peak memory, % of HBM roofline, time to first
     call), against FlexAttention, dense SDPA, the official algorithms and NATTEN where present;
  e. train steps (bf16 autocast, 224 px, batch 32), fused vs reference (TransNeXt: native), Swin-T beside;
  f. the goals table (tools/benchlib/goals.py): each goal, the measured ratio, met or not.

After every step the results so far are written to <out>/gpu-check-<device>.json and .md (atomically), so
a run killed at its time limit keeps every step it finished.
"""
import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

# torch, triton and the project come in only after the arguments: the dry run must set TRITON_INTERPRET before
# anything imports triton, which reads it once
sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_OUT = Path(__file__).resolve().parent.parent / 'model_cards' / 'benchmarks'
# (step, cap in seconds), in order of value; the goals table always runs (it only reads the rows)
STEP_CAPS = (('environment', 20), ('correctness', 150), ('sanitizer', 60), ('speed', 150), ('train steps', 90))
MIN_STEP_S = 5       # a step needs at least this much of the budget to start
NO_CUDA = ('gpu_check: no CUDA device is visible to PyTorch ({torch}); this check measures the fused kernels on a '
           'GPU. Run it on a CUDA machine, or `python tools/gpu_check.py --dry-run --out DIR` to run every step on '
           'the CPU under the Triton interpreter with tiny shapes.')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument('--out', default=str(DEFAULT_OUT), help='folder of gpu-check-<device>.json / .md')
    parser.add_argument('--budget-s', type=float, default=480., help='seconds for all steps together')
    parser.add_argument('--dry-run', action='store_true',
                        help='every step on CPU under the Triton interpreter with tiny shapes (rows marked dry run)')
    parser.add_argument('--steps', nargs='+', choices=[name for name, _ in STEP_CAPS],
                        help='run only these steps (default: all; the goals table always)')
    parser.add_argument('--sanitizer-workload', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f'--budget-s must be positive, got {args.budget_s:g}')
    return args


def _fmt(value, spec='.3g'):
    if value is None or value == '':
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'NO'
    if isinstance(value, float):
        return format(value, spec)
    if isinstance(value, dict):
        return ', '.join(f'{k} {v:.2g}' for k, v in value.items())
    return str(value).replace('|', '/')


TABLES = {   # the columns of each step's table in the .md
    'environment': ('case', 'impl'),
    'correctness': ('case', 'impl', 'dtype', 'mode', 'ok', 'max_abs_error', 'note'),
    'sanitizer': ('case', 'impl', 'ok', 'seconds', 'note'),
    'speed': ('case', 'impl', 'mode', 'dtype', 'ms', 'speedup_vs_baseline', 'peak_mib', 'memory_vs_baseline',
              'roofline_pct', 'roofline_pct_with_rereads', 'first_call_s', 'note'),
    'train steps': ('case', 'impl', 'ms', 'img_per_s', 'peak_mib', 'speedup_vs_swin', 'first_call_s', 'note'),
    'goals': ('case', 'source', 'target', 'speedup', 'memory_ratio', 'met', 'note'),
}
LEGEND = {
    'speed': ('Medians of triton.testing.do_bench (CUDA events) after warm-up; "x vs baseline" > 1 is faster than '
              'the case\'s baseline. % roofline: the least traffic (inputs read once, output written once; fwd+bwd '
              'adds dO read once and every gradient written once) over the time, against the HBM peak; "with '
              're-reads" adds what a backward really reads again (every input, O and dO once more). first call: '
              'seconds of the first call (compile, autotuning, FlexAttention\'s compile and block mask). The "first '
              'call" rows time new map sizes one after another: a size of a tuned size class skips the tuning.'),
    'train steps': 'bf16 autocast, SGD step included; same weights for both paths of a model; peak memory above '
                   'the model and its inputs.',
    'goals': '"met": yes / NO; "-" where the run could not measure it (the note says why).',
}


def markdown(report):
    lines = [f'# GPU check on {report["device"]}' + (' (DRY RUN: tiny shapes on CPU, not a measurement)'
                                                       if report['dry_run'] else ''), '',
             ', '.join(f'{k}: {v}' for k, v in report.items() if k not in ('steps', 'rows', 'device')), '']
    for step in report['steps']:
        lines += [f'## {step["name"]}', '', f'{step["status"]} in {step["seconds"]:.0f} s. {step["note"]}'.strip(),
                  '']
        rows = [r for r in report['rows'] if r['step'] == step['name']]
        if not rows:
            continue
        if step['name'] in LEGEND:
            lines += [LEGEND[step['name']], '']
        columns = TABLES[step['name']]
        lines += ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
        lines += ['| ' + ' | '.join(_fmt(r.get(c)) for c in columns) + ' |' for r in rows]
        lines.append('')
    return '\n'.join(lines)


def write(report, out: Path, stem):
    from _checkpoints import write_files_atomically
    files = {f'{stem}.json': json.dumps(report, indent=1, default=str).encode(),
             f'{stem}.md': markdown(report).encode()}
    write_files_atomically(out, files)


def run_steps(args, device):
    from functools import partial

    import torch
    from benchlib import goals, gpucheck
    from benchlib.provenance import device_name, slug, versions
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = device_name(device) if device.type == 'cuda' else 'cpu dry run'
    stem = f'gpu-check-{slug(name)}'
    report = dict(device=name, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
                  dry_run=args.dry_run, budget_s=args.budget_s, **versions(), steps=[], rows=[])
    start = time.perf_counter()
    end = start + args.budget_s
    functions = {'environment': gpucheck.environment, 'correctness': gpucheck.correctness,
                 'sanitizer': partial(gpucheck.sanitizer, script=str(Path(__file__).resolve())),
                 'speed': gpucheck.speed, 'train steps': gpucheck.train_steps}
    for step_name, cap in STEP_CAPS:
        if args.steps and step_name not in args.steps:
            continue
        left = end - time.perf_counter()
        step = dict(name=step_name, cap_s=cap, status='skipped', seconds=0., note='')
        report['steps'].append(step)
        if left < MIN_STEP_S:
            step['note'] = f'skipped: {left:.0f} s of the {args.budget_s:.0f} s budget left'
            report['rows'].append(dict(step=step_name, case='(step)', impl='-', note=step['note'],
                                       dry_run=args.dry_run))
            write(report, out, stem)
            continue
        step_start = time.perf_counter()
        ctx = gpucheck.Context(device, args.dry_run, deadline=step_start + min(cap, left))
        print(f'gpu_check: {step_name} (cap {min(cap, left):.0f} s)', flush=True)
        try:
            step['note'] = functions[step_name](ctx, report['rows'])
            step['status'] = 'done'
        except Exception as exc:  # a broken step is reported; the later steps still run
            step['status'] = 'failed'
            step['note'] = gpucheck.error_note(exc)
        step['seconds'] = time.perf_counter() - step_start
        write(report, out, stem)
    report['rows'] += goals.evaluate(report['rows'])
    report['steps'].append(dict(name='goals', cap_s=0, status='done', seconds=0., note=''))
    report['total_s'] = time.perf_counter() - start
    write(report, out, stem)
    print(f'gpu_check: wrote {out / stem}.json / .md in {report["total_s"]:.0f} s')
    return report


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        # before anything imports triton: the interpreter is chosen at its import
        os.environ['TRITON_INTERPRET'] = '1'
    import torch
    if args.dry_run:
        device = torch.device('cpu')
        torch.set_num_threads(1)   # tiny shapes: more threads only wait on each other
    elif not torch.cuda.is_available():
        print(NO_CUDA.format(torch=torch.__version__), file=sys.stderr)
        return 2
    else:
        device = torch.device('cuda')
    if args.sanitizer_workload:
        from benchlib import gpucheck
        gpucheck.sanitizer_workload(device)
        return 0
    run_steps(args, device)
    return 0


if __name__ == '__main__':
    sys.exit(main())
