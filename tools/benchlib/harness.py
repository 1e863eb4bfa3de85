"""Timing, memory and multiply-add harness shared by every benchmark section.

A section is a list of :class:`KernelCase` (the cpu section's: :class:`CpuCase`). Each case names
the implementations to compare and the baseline they are compared against; the harness times every
implementation's forward and forward+backward in the same run and reports ratios to the baseline,
peak memory and, on CUDA, achieved bandwidth against the device's HBM peak.

Byte model (the least HBM traffic any implementation could have; model_cards/benchmarks/kernel-cases.md):

    forward          = inputs read once + output written once                 (KernelCase.min_bytes)
    forward+backward = forward + dO read once + every input gradient written once

A real backward also re-reads q, k, v, the output and per-query statistics; those are not minimal
(a kernel could keep them on chip), so they are left out and "% of HBM roofline" is an upper bound
on how close to the memory limit an implementation could still get.
"""
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field, asdict
from typing import Callable, Dict, List, Optional

import torch

# HBM peak bandwidth (bytes/s) of the devices the project benchmarks on (vendor datasheets).
HBM_BYTES_PER_S = {
    'H100': 3.35e12,   # H100 SXM5 80GB HBM3
    'H200': 4.8e12,    # H200 SXM 141GB HBM3e
    'A100': 2.0e12,    # A100 SXM4 80GB
}


@dataclass
class KernelCase:
    """One problem shape and the implementations that solve it.

    ``make_inputs(device, dtype)`` returns the keyword arguments of every implementation (leaf
    tensors that need gradients have ``requires_grad`` set; every implementation uses all of them).
    ``min_bytes(inputs)`` is the least HBM traffic of the forward (inputs read once, output written
    once), or None where no byte model applies (a whole network); forward+backward adds :func:`fwd_bwd_bytes`.
    """
    section: str
    name: str
    make_inputs: Callable[[torch.device, torch.dtype], Dict[str, torch.Tensor]]
    impls: Dict[str, Callable[..., torch.Tensor]]
    baseline: str
    min_bytes: Callable[[Dict[str, torch.Tensor]], int]


@dataclass
class CpuCase:
    """One problem of the cpu section and the implementations that solve it, timed in turns on the CPU.
    ``make(dtype)`` returns the keyword arguments of every implementation (leaves that need gradients have
    ``requires_grad``); ``kind`` is the row's section ('neighborhood', 'routing', 'transnext model')."""
    kind: str
    name: str
    make: Callable[[torch.dtype], Dict[str, object]]
    impls: Dict[str, Callable[..., torch.Tensor]]
    baseline: str = 'reference'


@dataclass
class Result:
    section: str
    case: str
    impl: str
    mode: str
    dtype: str = ''
    ms: Optional[float] = None
    peak_mib: Optional[float] = None
    gbps: Optional[float] = None
    roofline_pct: Optional[float] = None
    speedup_vs_baseline: Optional[float] = None
    memory_vs_baseline: Optional[float] = None
    error: str = ''
    extra: dict = field(default_factory=dict)

    def as_dict(self):
        return asdict(self)


def device_hbm_bytes_per_s(device: torch.device) -> Optional[float]:
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    for key, bw in HBM_BYTES_PER_S.items():
        if key in name:
            return bw
    return None


def fwd_bwd_bytes(inputs: Dict[str, torch.Tensor], fwd_bytes: int, out_bytes: int) -> int:
    """The forward's least traffic, plus dO read once and every input gradient written once."""
    grad_bytes = sum(t.numel() * t.element_size() for t in inputs.values()
                     if isinstance(t, torch.Tensor) and t.requires_grad)
    return fwd_bytes + out_bytes + grad_bytes


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, iters: int):
    """Median milliseconds per call and peak memory (MiB above the starting allocation; None on CPU)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    peak = None
    if device.type == 'cuda':
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    times.sort()
    return times[len(times) // 2], peak


def call_of(impl, inputs, mode):
    """``impl`` on ``inputs`` as one call of ``mode``: 'fwd' (no autograd) or 'fwd+bwd' (every input's gradient)."""
    grads = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def fwd():
        with torch.no_grad():
            return impl(**inputs)

    def fwd_bwd():
        out = impl(**inputs)
        torch.autograd.grad(out, grads, torch.ones_like(out))

    return fwd if mode == 'fwd' else fwd_bwd


def _output_bytes(case: KernelCase, inputs) -> Optional[int]:
    """Bytes of the output (dO has the same), from one forward of the baseline (or any that runs)."""
    for name in [case.baseline] + [n for n in case.impls if n != case.baseline]:
        try:
            with torch.no_grad():
                out = case.impls[name](**inputs)
        except Exception:  # noqa: BLE001  (an implementation that cannot run this shape)
            continue
        return out.numel() * out.element_size()
    return None


def run_case(case: KernelCase, device, dtype, warmup=3, iters=10, progress=None) -> List[Result]:
    inputs = case.make_inputs(device, dtype)
    hbm = device_hbm_bytes_per_s(device)
    out_bytes = _output_bytes(case, inputs)
    results = []
    for mode in ('fwd', 'fwd+bwd'):
        by_impl = {}
        for impl_name, impl in case.impls.items():
            row = Result(case.section, case.name, impl_name, mode, str(dtype).replace('torch.', ''))
            try:
                row.ms, row.peak_mib = time_call(call_of(impl, inputs, mode), device, warmup, iters)
            except Exception as exc:  # an implementation that cannot run a shape is reported, not fatal
                row.error = f'{type(exc).__name__}: {str(exc).splitlines()[0][:160]}'
                if device.type == 'cuda':
                    torch.cuda.empty_cache()
            nbytes = case.min_bytes(inputs) if row.ms is not None and out_bytes is not None else None
            if nbytes is not None:   # None: no byte model (a whole network)
                if mode == 'fwd+bwd':
                    nbytes = fwd_bwd_bytes(inputs, nbytes, out_bytes)
                row.gbps = nbytes / (row.ms * 1e-3) / 1e9
                if hbm:
                    row.roofline_pct = 100 * nbytes / (row.ms * 1e-3) / hbm
            by_impl[impl_name] = row
            results.append(row)
            if progress is not None:
                progress.update(1)
        base = by_impl.get(case.baseline)
        for row in by_impl.values():
            if base is not None and base.ms and row.ms:
                row.speedup_vs_baseline = base.ms / row.ms
            if base is not None and base.peak_mib and row.peak_mib is not None:
                row.memory_vs_baseline = row.peak_mib / base.peak_mib
    return results


def _fmt(value, spec):
    return '-' if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(results: List[Result], baseline_of: Dict[str, str]) -> str:
    lines = ['| case | impl | dtype | mode | ms | x vs baseline | peak MiB | mem vs baseline | GB/s | % HBM roofline '
             '| note |',
             '|---|---|---|---|---:|---:|---:|---:|---:|---:|---|']
    for r in results:
        impl = r.impl + (' (baseline)' if baseline_of.get(r.case) == r.impl else '')
        lines.append(f'| {r.case} | {impl} | {r.dtype} | {r.mode} | {_fmt(r.ms, ".3f")} '
                     f'| {_fmt(r.speedup_vs_baseline, ".2f")} '
                     f'| {_fmt(r.peak_mib, ".1f")} | {_fmt(r.memory_vs_baseline, ".2f")} | {_fmt(r.gbps, ".0f")} '
                     f'| {_fmt(r.roofline_pct, ".0f")} | {r.error} |')
    return '\n'.join(lines)


def model_gmacs(name, size):
    """Multiply-adds of one forward pass at ``size``, counted on the meta device. Fused attention is
    switched off while the model is built and run (timm's SDPA and attnzoo's kernels alike): the
    counter has no formula for CPU / meta SDPA or for the routing op and would skip their attention
    matmuls (the neighborhood op has one, equal to its reference's count); the explicit path computes
    the same thing."""
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


def cpu_peak_mib(fn: Callable[[], object]) -> float:
    """MiB allocated at the peak of one call of ``fn`` on the CPU, which keeps no allocator statistics:
    the profiler's memory events (every CPU allocation and free, inside custom ops and autograd
    included) carry the running total since profiling started."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'trace.json')
        prof.export_chrome_trace(path)
        with open(path) as trace:
            events = json.load(trace)['traceEvents']
    totals = [e['args']['Total Allocated'] for e in events if e.get('name') == '[memory]']
    return max(totals, default=0) / 2 ** 20


def time_interleaved(calls: Dict[str, Callable[[], object]], warmup: int, iters: int, progress=None):
    """Median wall and process-CPU milliseconds of every call, timed in turns (one call of each per
    round), so that the load of a shared machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    wall = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append((time.process_time() - start_cpu) * 1e3)
            wall[name].append((time.perf_counter() - start_wall) * 1e3)
        if progress is not None:
            progress.update(1)
    return ({name: statistics.median(t) for name, t in wall.items()},
            {name: statistics.median(t) for name, t in cpu.items()})
