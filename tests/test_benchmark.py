"""tools/benchmark.py end to end on tiny shapes: every implementation runs, results are written.

Speed is never asserted here (it is measured on a GPU by the tool itself); this checks that the tool
produces complete, well-formed results, so a GPU session only has to run it.
"""
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tools'))
import benchmark  # noqa: E402

# FlexAttention has no backward on CPU; everything else must run
CPU_LIMITATIONS = {('flex', 'fwd+bwd')}


def _load(out_dir, section):
    files = sorted(Path(out_dir).glob(f'*-{section}*'))
    assert {f.suffix for f in files} == {'.json', '.md', '.png'}, files
    return json.loads(next(f for f in files if f.suffix == '.json').read_text())


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not __import__('torch').cuda.is_available(),
                    reason='the Triton rows need a GPU or TRITON_INTERPRET=1')
def test_kernel_section_quick(tmp_path):
    benchmark.main(['kernels', '--quick', '--warmup', '0', '--iters', '1', '--out', str(tmp_path)])
    report = _load(tmp_path, 'kernels')
    rows = report['results']
    assert {r['section'] for r in rows} == {'neighborhood', 'routing'}
    for row in rows:
        if (row['impl'], row['mode']) in CPU_LIMITATIONS or row['impl'].startswith('natten'):
            continue
        assert not row['error'] and row['ms'] > 0, row
    ours = [r for r in rows if r['impl'] == 'attnzoo-triton']
    assert len(ours) == 2 * len({r['case'] for r in rows})
    assert all(r['speedup_vs_baseline'] is not None for r in ours if r['mode'] == 'fwd')


def test_model_section_quick(tmp_path):
    benchmark.main(['models', '--models', 'nat_mini', '--baseline', 'cswin_tiny_224', '--batch', '1',
                    '--warmup', '0', '--iters', '1', '--out', str(tmp_path)])
    rows = _load(tmp_path, 'models')['results']
    assert {(r['impl'], r['mode']) for r in rows} == {(m, mode) for m in ('cswin_tiny_224', 'nat_mini')
                                                      for mode in ('fwd', 'fwd+bwd')}
    for row in rows:
        assert not row['error'] and row['ms'] > 0 and row['extra']['gmacs'] > 0, row
    baseline = [r for r in rows if r['impl'] == 'cswin_tiny_224']
    assert all(r['speedup_vs_baseline'] == pytest.approx(1.0) for r in baseline)
