"""The GPU goals the project set itself, in one place, and how each is read from a GPU check's rows.

Each goal names where it was set (a family card or an issue), the rows of ``tools/gpu_check.py`` it compares
(step, tag, mode, implementation against a baseline implementation; a row's tag names what it stands for,
the same in the dry run's tiny stand-ins) and the threshold: a speed-up
(baseline time / time) at least ``min_speedup``, and where given a peak-memory ratio (memory / baseline
memory) at most ``max_memory``.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

NAT_S1 = 'NAT-T stage 1'   # the tag of the neighborhood case at NAT-Tiny's stage 1 (d32 k7 56 x 56, batch 64)


@dataclass(frozen=True)
class Goal:
    name: str
    source: str
    step: str
    tag: str
    mode: str
    impl: str
    baseline: str
    min_speedup: float
    max_memory: Optional[float] = None


GOALS = (
    Goal('BiFormer-S train step: fused >= 2x reference, peak memory <= 1/2', 'model_cards/biformer.md',
         'train steps', 'biformer_small', 'train', 'fused', 'reference', 2.0, 0.5),
    Goal('TransNeXt-T train step: fused >= 2x native, peak memory <= 1/2', 'model_cards/transnext.md',
         'train steps', 'transnext_tiny', 'train', 'fused', 'native', 2.0, 0.5),
    Goal('NA v2 fwd+bwd at NAT-T stage 1 >= 1.5x v1', 'issue 24', 'speed', NAT_S1, 'fwd+bwd',
         'attnzoo-triton-v2', 'attnzoo-triton', 1.5),
    Goal('NA v2 fwd+bwd at NAT-T stage 1 >= 2x FlexAttention', 'issue 24', 'speed', NAT_S1, 'fwd+bwd',
         'attnzoo-triton-v2', 'flex-tiled', 2.0),
)


def _row(rows, goal, impl):
    return next((r for r in rows if r['step'] == goal.step and r.get('tag') == goal.tag and r['mode'] == goal.mode
                 and r['impl'] == impl), None)


def evaluate(rows: List[Dict]) -> List[Dict]:
    """One row per goal: the measured ratios and ``met`` (True / False, None when not measured, with why)."""
    results = []
    for goal in GOALS:
        row, base = _row(rows, goal, goal.impl), _row(rows, goal, goal.baseline)
        result = dict(step='goals', case=goal.name, mode=goal.mode, impl=goal.impl, source=goal.source,
                      target=f'>= {goal.min_speedup:g}x' + (f', memory <= {goal.max_memory:g}x' if goal.max_memory
                                                              else ''),
                      speedup=None, memory_ratio=None, met=None, note='')
        missing = [name for name, r in ((goal.impl, row), (goal.baseline, base)) if r is None or not r.get('ms')]
        if missing:
            why = '; '.join(f'{name}: {(_row(rows, goal, name) or {}).get("note") or "no row"}' for name in missing)
            result['note'] = f'not measured ({why})'
            results.append(result)
            continue
        result['speedup'] = base['ms'] / row['ms']
        met = result['speedup'] >= goal.min_speedup
        if goal.max_memory is not None:
            if row.get('peak_mib') is not None and base.get('peak_mib'):
                result['memory_ratio'] = row['peak_mib'] / base['peak_mib']
                met = met and result['memory_ratio'] <= goal.max_memory
            else:
                met = None
                result['note'] = 'no peak memory (not a CUDA run)'
        result['met'] = met
        if row.get('dry_run'):
            result['note'] = 'dry run: tiny shapes on CPU, not a measurement'
            result['met'] = None
        results.append(result)
    return results
