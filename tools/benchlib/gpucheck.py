"""The steps of ``tools/gpu_check.py``: what each checks or times, on the benchmark's own case definitions.

Every step appends plain-dict rows (``step``, ``case``, ``impl``, ``mode``, ``dtype`` and its figures, ``note``)
to the list it is given, so what it finished survives a step that runs out of time. A step stops starting new
work once ``ctx.deadline`` (``time.perf_counter()``) has passed and writes a row for each thing it did not run.
``ctx.dry`` (the dry run) takes tiny shapes on the CPU under the Triton interpreter.
"""
import os
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, List

import torch
import torch.nn.functional as F

import attnzoo.kernels
from attnzoo.kernels import neighborhood_attention_2d, routing_attention, use_backend
from attnzoo.kernels import _neighborhood_triton, _neighborhood_triton_v2

from . import neighborhood, routing, transnext
from .goals import NAT_S1
from .harness import call_of, device_hbm_bytes_per_s, fwd_bwd_bytes
from .neighborhood import NeighborhoodShape

# values and gradients against the float64 reference (as tests/test_neighborhood_attention.py; bf16 as NATTEN's)
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}
DTYPES = {'bf16': torch.bfloat16, 'fp32': torch.float32}


@dataclass
class Context:
    device: torch.device
    dry: bool
    deadline: float = float('inf')

    def out_of_time(self):
        return time.perf_counter() > self.deadline


def row(step, case, impl, mode='', dtype='', ctx=None, **figures):
    return dict(step=step, case=case, impl=impl, mode=mode, dtype=dtype, dry_run=bool(ctx and ctx.dry),
                note=figures.pop('note', ''), **figures)


def error_note(exc):
    return f'{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ""}'


def na_kernel(version):
    """The neighborhood kernel ``version`` ('v1' / 'v2') selected inside a block."""
    return attnzoo.kernels.use_na_kernel(version)


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- a: environment


def environment(ctx, rows):
    import platform
    import timm
    import triton
    facts = dict(python=platform.python_version(), torch=torch.__version__, triton=triton.__version__,
                 timm=timm.__version__, cuda=torch.version.cuda, interpreter=os.environ.get('TRITON_INTERPRET') == '1',
                 compute_sanitizer=shutil.which('compute-sanitizer'))
    if ctx.device.type == 'cuda':
        props = torch.cuda.get_device_properties(ctx.device)
        facts.update(device=props.name, sm_count=props.multi_processor_count,
                     memory_gib=round(props.total_memory / 2 ** 30, 1), capability=f'{props.major}.{props.minor}',
                     hbm_bytes_per_s=device_hbm_bytes_per_s(ctx.device))
    else:
        facts.update(device=f'CPU ({os.cpu_count()} cores)', sm_count=None, memory_gib=None)
    try:
        import natten
        facts['natten'] = f'{natten.__version__}, CUDA library {"present" if natten.HAS_LIBNATTEN else "absent"}'
    except ImportError as exc:
        facts['natten'] = f'absent: {error_note(exc)}'
    for key, value in facts.items():
        rows.append(row('environment', key, str(value), ctx=ctx))
    return f'{facts["device"]}: torch {facts["torch"]}, triton {facts["triton"]}, timm {facts["timm"]}'


# ----------------------------------------------------------------------------- b: correctness of every config


@dataclass
class CheckCase:
    name: str
    make_inputs: Callable       # (device, dtype) -> keyword arguments (leaves with requires_grad)
    op: Callable                # op(**inputs, backend=...)
    tuned: bool                 # the neighborhood kernels (autotuned: every config is forced)


def _na_case(shape: NeighborhoodShape):
    op = partial(neighborhood_attention_2d, kernel_size=shape.kernel, dilation=shape.dilation, border=shape.border)
    return CheckCase(shape.name, neighborhood.make_inputs(shape), op, tuned=True)


def _transnext_case(name, batch, size, heads, n_pool):
    op = partial(neighborhood_attention_2d, kernel_size=transnext.WINDOW, scale=1.0, border='zero')
    return CheckCase(name, transnext.make_call_inputs(batch, size, size, heads, n_pool), op, tuned=True)


def _routing_case(kernel_case):
    return CheckCase(kernel_case.name, kernel_case.make_inputs, routing_attention, tuned=False)


def check_cases(dry) -> List[CheckCase]:
    """The odd map first (partial tiles, rpb, dilation 2, extra tokens: where configs differ most), then an
    interior NAT stage-1 map, TransNeXt's call, the routing kernels at BiFormer-S stages 2 and 3."""
    if dry:
        return [_na_case(NeighborhoodShape('odd 11x9 h1 d16 k3 dil2 +rpb +3 b1', 1, 11, 9, 1, 16, 3, dilation=2,
                                           rpb=True, n_extra=3)),
                _na_case(NeighborhoodShape('interior 16x16 h1 d16 k3 b1', 1, 16, 16, 1, 16, 3)),
                _transnext_case(transnext.QUICK_SHAPE[0], *transnext.QUICK_SHAPE[1:]),
                _routing_case(routing.cases(True)[0])]
    biformer = [c for c in routing.cases(False) if c.name.startswith(('biformer224_s2', 'biformer224_s3'))]
    return [_na_case(NeighborhoodShape('odd 23x19 h2 d32 k7 dil2 +rpb +5 b2', 2, 23, 19, 2, 32, 7, dilation=2,
                                       rpb=True, n_extra=5)),
            _na_case(NeighborhoodShape('nat_tiny s1 interior 56x56 h2 d32 k7 b2', 2, 56, 56, 2, 32, 7)),
            _transnext_case('transnext_tiny call s2 28x28 h6 d24 k3 +49 b2', 2, 28, 6, 49)] \
        + [_routing_case(c) for c in biformer]


def compare_with_reference(case: CheckCase, device, dtype, backend='triton'):
    """Max abs error of the output and of every gradient against the float64 reference; whether all are within
    the dtype's tolerance (as torch.testing.assert_close, atol = rtol)."""
    inputs = case.make_inputs(device, dtype)
    leaves = {name: t for name, t in inputs.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    out = case.op(**inputs, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=out.dtype)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out, allow_unused=True)
    reference_inputs = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().double().requires_grad_(value.requires_grad)
        reference_inputs[name] = value
    reference_leaves = [reference_inputs[name] for name in leaves]
    expected = case.op(**reference_inputs, backend='reference')
    expected_grads = torch.autograd.grad(expected, reference_leaves, grad_out.double(), allow_unused=True)
    tol = TOLERANCE[dtype]
    errors, ok = {}, True
    for name, got, want in zip(['out'] + [f'd_{n}' for n in leaves], (out, *grads), (expected, *expected_grads)):
        if got is None or want is None:
            ok = ok and got is None and want is None
            continue
        got, want = got.detach(), want.detach()
        diff = (got.double() - want).abs()
        errors[name] = float(diff.max()) if diff.numel() else 0.0
        ok = ok and bool(torch.isfinite(got).all()) and bool((diff <= tol + tol * want.abs()).all())
    return ok, errors


def _config_name(version, config):
    layout = ' '.join(f'{name.lower()} {value}' for name, value in config.kwargs.items())
    return f'{version}: {layout} warps {config.num_warps} stages {config.num_stages}'


KERNEL_MODULES = {'v1': _neighborhood_triton, 'v2': _neighborhood_triton_v2}


def forced_configs(version, dry):
    """Every config of the tuned neighborhood kernels of ``version``; in the dry run one per tile geometry
    (the interpreter ignores warps and stages)."""
    configs = tuple(_neighborhood_triton.TILE_CONFIGS if version == 'v1' else _neighborhood_triton_v2.tile_configs())
    if dry:
        seen = {}
        for config in configs:
            seen.setdefault(tuple(sorted(config.kwargs.items())), config)
        configs = tuple(seen.values())
    return configs


def correctness(ctx, rows):
    """Every autotune config of both neighborhood kernels forced once per (case, dtype), the cases in order of
    value; the routing kernels (launch parameters by rule: nothing to force) at their own choice. Work is ordered
    for coverage within the cap: every case and dtype once (each version's first config, the routing kernels)
    before the other configs, which then run case by case, the odd map first."""
    dtypes = ('fp32',) if ctx.dry else ('bf16', 'fp32')
    configs = {version: forced_configs(version, ctx.dry) for version in KERNEL_MODULES}
    work, rest = [], []
    for case in check_cases(ctx.dry):
        for dtype in dtypes:
            if case.tuned:
                work += [(case, dtype, version, configs[version][0]) for version in KERNEL_MODULES]
                rest += [(case, dtype, version, config) for version in KERNEL_MODULES
                         for config in configs[version][1:]]
            else:
                work.append((case, dtype, 'rule', None))
    work += rest
    for case, dtype, kernel, config in work:
        impl = {'v1': 'attnzoo-triton', 'v2': 'attnzoo-triton-v2', 'rule': 'attnzoo-triton'}[kernel]
        name = _config_name(kernel, config) if config is not None else 'launch parameters by rule (no autotuning)'
        out = row('correctness', case.name, impl, mode=name, dtype=dtype, ctx=ctx)
        rows.append(out)
        if ctx.out_of_time():
            out['note'] = 'not run: the step\'s time cap was reached'
            continue
        forced = KERNEL_MODULES[kernel].forced_config(config) if config is not None else nullcontext()
        try:
            with forced, na_kernel(kernel if kernel != 'rule' else 'v1'):
                ok, errors = compare_with_reference(case, ctx.device, DTYPES[dtype])
            out.update(ok=ok, max_abs_error=errors)
            out['note'] = 'ok' if ok else 'MISMATCH: outside the tolerance or not finite'
        except Exception as exc:  # reported, the next config still runs
            out.update(ok=False, note=error_note(exc))
        sync(ctx.device)
    done = [r for r in rows if r['step'] == 'correctness' and 'ok' in r]
    return f'{sum(r["ok"] for r in done)} of {len(done)} run passed; {len(work) - len(done)} not run or absent'


# ----------------------------------------------------------------------------- c: compute-sanitizer


def sanitizer_workload(device):
    """A small neighborhood fwd + bwd (rpb, clamp border, partial tiles, extra tokens) on v1 and v2 and a small
    routing fwd + bwd, under one forced config (the tuner's trial runs would multiply memcheck's time)."""
    cases = check_cases(dry=True)
    for version, module in KERNEL_MODULES.items():   # the neighborhood case on both kernels, routing once
        with module.forced_config(forced_configs(version, dry=True)[0]), na_kernel(version):
            for case in (cases[0], cases[-1]) if version == 'v1' else cases[:1]:
                inputs = case.make_inputs(device, torch.float32)
                out = case.op(**inputs, backend='triton')
                out.sum().backward()
    sync(device)


def sanitizer(ctx, rows, script):
    """``script --sanitizer-workload`` in a subprocess, under compute-sanitizer's memcheck where it can run,
    until the step's deadline."""
    timeout_s = max(1., ctx.deadline - time.perf_counter())
    tool = shutil.which('compute-sanitizer')
    command = [sys.executable, script, '--sanitizer-workload'] + (['--dry-run'] if ctx.dry else [])
    if tool and ctx.device.type == 'cuda':
        command = [tool, '--tool', 'memcheck', '--error-exitcode', '3'] + command
        what = 'compute-sanitizer memcheck'
    else:
        what = 'workload without compute-sanitizer (' + ('dry run' if ctx.dry else 'not on PATH') + ')'
    out = row('sanitizer', 'neighborhood + routing fwd+bwd', what, ctx=ctx)
    rows.append(out)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        out['note'] = f'not finished within {timeout_s:.0f} s'
        return out['note']
    out['seconds'] = time.perf_counter() - start
    log = (done.stdout + done.stderr).strip().splitlines()
    summary = next((line for line in reversed(log) if 'ERROR SUMMARY' in line), None)
    out['returncode'] = done.returncode
    out['ok'] = done.returncode == 0
    out['note'] = summary or ('workload ran' if done.returncode == 0 else 'FAILED: ' + ' | '.join(log[-3:]))
    if done.returncode != 0:
        out['log_tail'] = log[-40:]
    return out['note']


# ----------------------------------------------------------------------------- d: speed of the goal cases


def time_ms(fn, device):
    """Median milliseconds after warm-up: ``triton.testing.do_bench`` (CUDA events) on a GPU; one timed call
    after one warm-up elsewhere (the dry run times nothing worth reading)."""
    if device.type == 'cuda':
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode='median')
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def peak_mib(fn, device):
    """MiB above the allocation before one call, at the call's peak (None off CUDA)."""
    if device.type != 'cuda':
        return None
    sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def reread_bytes(inputs, out_bytes):
    """What a backward re-reads beyond the least traffic: q, k, v (or every input), O and dO once more."""
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor)) + 2 * out_bytes


def sdpa_dense_neighborhood(q, k, v, **_):
    """Dense attention over the whole map (not the same attention: the cost the window avoids)."""
    batch, height, width, heads, head_dim = q.shape
    q, k, v = (t.flatten(1, 2).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).unflatten(1, (height, width))


def _with_kernel(version, fn, **inputs):
    with na_kernel(version):
        return fn(**inputs)


def speed_cases(dry):
    """(case, implementations): the neighborhood cases with v1 / v2 / FlexAttention / dense SDPA / NATTEN,
    routing at BiFormer-S stages 1-3, TransNeXt-T stages 1-2 fused vs native."""
    natten = neighborhood.natten_available()
    if dry:
        na_shapes = [NeighborhoodShape('nat 14x14 h1 d32 k7 b1 (stands for NAT-T stage 1)', 1, 14, 14, 1, 32, 7)]
        route = routing.cases(True)[:1]
        calls = transnext.kernel_cases(True)
    else:
        na_shapes = [NeighborhoodShape('nat_tiny s1 56x56 h2 d32 k7 b64', 64, 56, 56, 2, 32, 7),
                     NeighborhoodShape('dinat_large_384 s3 24x24 h24 d32 k11 dil2 b32', 32, 24, 24, 24, 32, 11,
                                       dilation=2)]
        route = [c for c in routing.cases(False) if c.name.startswith('biformer224_s')]
        calls = [c for c in transnext.kernel_cases(False) if 'aggregated' in c.name]
    cases = []
    for shape in na_shapes:
        case = neighborhood.kernel_case(shape, natten, with_reference=False)
        impls = {'attnzoo-triton': partial(_with_kernel, 'v1', case.impls['attnzoo-triton']),
                 'attnzoo-triton-v2': partial(_with_kernel, 'v2', case.impls['attnzoo-triton']),
                 'flex-tiled': case.impls['flex-tiled'], 'sdpa-dense': sdpa_dense_neighborhood,
                 'natten': case.impls.get('natten')}
        case.impls = impls
        cases.append(case)
    for case in route:
        case.impls = {name: case.impls[name] for name in ('attnzoo-triton', 'gather-reference', 'flex')}
        cases.append(case)
    return cases + calls


def _absent_note(impl):
    if impl == 'natten':
        return 'absent: natten not importable or without its CUDA library (see the environment step)'
    return 'absent'


def speed(ctx, rows):
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    hbm = device_hbm_bytes_per_s(ctx.device)
    cases = speed_cases(ctx.dry)     # the first is NAT-T stage 1 (its stand-in in the dry run)
    for case in cases:
        if ctx.out_of_time():
            rows.append(row('speed', case.name, 'every implementation', ctx=ctx,
                            note='not run: the step\'s time cap was reached'))
            continue
        inputs = case.make_inputs(ctx.device, dtype)
        out_bytes = None
        for impl_name, impl in case.impls.items():
            for mode in ('fwd', 'fwd+bwd'):
                out = row('speed', case.name, impl_name, mode, str(dtype).replace('torch.', ''), ctx=ctx,
                          baseline=case.baseline, tag=NAT_S1 if case is cases[0] else '')
                rows.append(out)
                if impl is None:
                    out['note'] = _absent_note(impl_name)
                    continue
                if ctx.out_of_time():
                    out['note'] = 'not run: the step\'s time cap was reached'
                    continue
                try:
                    fn = call_of(impl, inputs, mode)
                    start = time.perf_counter()
                    result = fn()          # the first call: compiles, autotunes, builds masks
                    sync(ctx.device)
                    out['first_call_s'] = time.perf_counter() - start
                    if out_bytes is None and mode == 'fwd':
                        out_bytes = result.numel() * result.element_size()
                    out['ms'] = time_ms(fn, ctx.device)
                    out['peak_mib'] = peak_mib(fn, ctx.device)
                except Exception as exc:  # an implementation that cannot run a shape is reported
                    out['note'] = error_note(exc)
                    if ctx.device.type == 'cuda':
                        torch.cuda.empty_cache()
                    continue
                least = case.min_bytes(inputs)
                if least is not None and out_bytes is not None:
                    if mode == 'fwd+bwd':
                        least = fwd_bwd_bytes(inputs, least, out_bytes)
                    out['gbps'] = least / (out['ms'] * 1e-3) / 1e9
                    if hbm:
                        out['roofline_pct'] = 100 * least / (out['ms'] * 1e-3) / hbm
                        if mode == 'fwd+bwd':
                            rereads = least + reread_bytes(inputs, out_bytes)
                            out['roofline_pct_with_rereads'] = 100 * rereads / (out['ms'] * 1e-3) / hbm
        _ratios(rows, case)
        del inputs
    first_call_of_new_sizes(ctx, rows)
    return ''


def _ratios(rows, case):
    for mode in ('fwd', 'fwd+bwd'):
        mine = [r for r in rows if r['step'] == 'speed' and r['case'] == case.name and r['mode'] == mode]
        base = next((r for r in mine if r['impl'] == case.baseline and r.get('ms')), None)
        for r in mine:
            if base and r.get('ms'):
                r['speedup_vs_baseline'] = base['ms'] / r['ms']
            if base and r.get('peak_mib') is not None and base.get('peak_mib'):
                r['memory_vs_baseline'] = r['peak_mib'] / base['peak_mib']


# map sizes a detector meets one after another (batch 2, 2 heads): the first two share a size class
NEW_SIZES = ((50, 76), (48, 72), (100, 152))
DRY_NEW_SIZES = ((13, 13), (14, 15))


def first_call_of_new_sizes(ctx, rows):
    """Time to the first call (fwd + bwd) of the neighborhood op at sizes a detector meets one after another:
    the first pays compile + tuning, the next sizes of the same size class reuse the tuned config."""
    dtype = torch.float32 if ctx.dry else torch.bfloat16
    for height, width in DRY_NEW_SIZES if ctx.dry else NEW_SIZES:
        out = row('speed', f'first call nat k7 {height}x{width} h2 d32 b2', 'attnzoo-triton', 'fwd+bwd',
                  str(dtype).replace('torch.', ''), ctx=ctx)
        rows.append(out)
        if ctx.out_of_time():
            out['note'] = 'not run: the step\'s time cap was reached'
            continue
        shape = NeighborhoodShape('first call', 2, height, width, 2, 32, 7, rpb=True)
        inputs = neighborhood.make_inputs(shape)(ctx.device, dtype)
        out['size_class'] = _neighborhood_triton.size_class(2, 2, height, width, (1, 1))
        start = time.perf_counter()
        with na_kernel('v1'):
            call_of(partial(neighborhood_attention_2d, kernel_size=7, backend='triton'), inputs, 'fwd+bwd')()
        sync(ctx.device)
        out['first_call_s'] = time.perf_counter() - start


# ----------------------------------------------------------------------------- e: train steps

# the models with a goal first: a first call on the fused path compiles and tunes the kernels of every stage
TRAIN_MODELS = ('biformer_small', 'transnext_tiny', 'nat_tiny', 'dinat_tiny', 'dat_pp_tiny')
TRAIN_BASELINE = 'swin_tiny_patch4_window7_224'


def _paths(name):
    """(path name, context) pairs of a model: the fused ops against the reference (TransNeXt: its native)."""
    if name == TRAIN_BASELINE:
        return (('timm', None),)
    if name.startswith('transnext'):
        return (('fused', 'fused'), ('native', 'native'))
    return (('fused', None), ('reference', 'reference'))


def train_steps(ctx, rows, models=TRAIN_MODELS):
    import timm
    import attnzoo.backbones  # noqa: F401  registers the models
    size, batch = (32, 2) if ctx.dry else (224, 32)   # 2: BiFormer's head norm needs more than one image
    for name in (TRAIN_BASELINE,) + tuple(models):
        case = f'train step {name} {size}x{size} b{batch}'
        paths = _paths(name)
        if ctx.out_of_time():
            rows.extend(row('train steps', case, path, 'train', 'bf16 autocast', ctx=ctx, tag=name,
                            note='not run: the step\'s time cap was reached') for path, _ in paths)
            continue
        size_option = dict(img_size=size) if name == TRAIN_BASELINE else {}   # Swin's attention masks are sized
        model = timm.create_model(name, num_classes=10, **size_option).to(ctx.device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        images = torch.randn(batch, 3, size, size, device=ctx.device)
        labels = torch.randint(0, 10, (batch,), device=ctx.device)

        def step():
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for path, switch in paths:
            out = row('train steps', case, path, 'train', 'bf16 autocast', ctx=ctx, tag=name)
            rows.append(out)
            if ctx.out_of_time():
                out['note'] = 'not run: the step\'s time cap was reached'
                continue
            if name.startswith('transnext'):
                transnext.set_attn_impl(model, switch)
                context = nullcontext()
            else:
                context = use_backend(switch)
            try:
                with context:
                    start = time.perf_counter()
                    step()
                    sync(ctx.device)
                    out['first_call_s'] = time.perf_counter() - start
                    out['ms'] = time_ms(step, ctx.device)
                    out['peak_mib'] = peak_mib(step, ctx.device)
                out['img_per_s'] = batch / (out['ms'] * 1e-3)
            except Exception as exc:  # reported; the other path and models still run
                out['note'] = error_note(exc)
        del model, optimizer
        if ctx.device.type == 'cuda':
            torch.cuda.empty_cache()
    base = next((r for r in rows if r['step'] == 'train steps' and r['impl'] == 'timm' and r.get('ms')), None)
    for r in rows:
        if r['step'] == 'train steps' and base and r.get('ms'):
            r['speedup_vs_swin'] = base['ms'] / r['ms']
    return ('dry run: "fused" runs the ops\' CPU kernels, what a CPU tensor gets (the Triton interpreter would '
            'take minutes per model)' if ctx.dry else '')
