"""tools/gpu_check.py: the dry run of every step (so the GPU script cannot rot), files that survive a kill, the
message without CUDA, the goals table's reading of rows and the v2 kernel's rows where the switch exists."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TOOLS = Path(__file__).resolve().parent.parent / 'tools'
sys.path.insert(0, str(TOOLS))
import gpu_check  # noqa: E402
from benchlib import gpucheck, goals  # noqa: E402

STEM = 'gpu-check-cpu-dry-run'


def run_dry(out, *extra, wait=True):
    command = [sys.executable, str(TOOLS / 'gpu_check.py'), '--dry-run', '--out', str(out), *extra]
    if wait:
        return subprocess.run(command, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_dry_run_runs_every_step_and_writes_the_files(tmp_path):
    done = run_dry(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / f'{STEM}.json').read_text())
    markdown = (tmp_path / f'{STEM}.md').read_text()
    assert 'DRY RUN' in markdown
    steps = {step['name']: step for step in report['steps']}
    assert list(steps) == [name for name, _ in gpu_check.STEP_CAPS] + ['goals']
    assert all(step['status'] == 'done' for step in steps.values()), \
        [(step['name'], step['status'], step['note']) for step in steps.values()]
    rows = report['rows']
    assert all(row['dry_run'] for row in rows if row['step'] != 'goals')
    checked = [r for r in rows if r['step'] == 'correctness' and r['impl'].startswith('attnzoo-triton')]
    # one row per distinct tile geometry of each neighborhood kernel and case in the dry run, all run and within
    # tolerance
    for version in ('v1', 'v2'):
        geometries = len(gpucheck.forced_configs(version, dry=True))
        assert len([r for r in checked if r['mode'].startswith(f'{version}: ')]) == 3 * geometries, version
    assert all(r['ok'] for r in checked), [r for r in checked if not r['ok']]
    assert {'out', 'd_q', 'd_k', 'd_v', 'd_rpb', 'd_extra_k', 'd_extra_v'} <= set(checked[0]['max_abs_error'])
    assert [r['ok'] for r in rows if r['step'] == 'sanitizer'] == [True]
    speed = [r for r in rows if r['step'] == 'speed']
    # no implementation disappears: absent ones (natten without its CUDA library, v2 before its merge) say so
    for impl in ('attnzoo-triton', 'attnzoo-triton-v2', 'flex-tiled', 'sdpa-dense', 'natten'):
        assert any(r['impl'] == impl for r in speed), impl
    assert all(r.get('ms') or r['note'] for r in speed if not r['case'].startswith('first call'))
    assert all(r.get('first_call_s') for r in speed if r['case'].startswith('first call'))
    trained = [r for r in rows if r['step'] == 'train steps']
    assert {r['tag'] for r in trained} == {gpucheck.TRAIN_BASELINE, *gpucheck.TRAIN_MODELS}
    assert all(r.get('ms') for r in trained), [r for r in trained if not r.get('ms')]
    assert len([r for r in rows if r['step'] == 'goals']) == len(goals.GOALS)


def test_a_kill_keeps_the_files_of_the_finished_steps(tmp_path):
    process = run_dry(tmp_path, '--steps', 'environment', 'correctness', wait=False)
    markdown = tmp_path / f'{STEM}.md'
    try:
        deadline = time.monotonic() + 300
        while not markdown.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, 'the run ended before it could be killed'
        os.killpg(process.pid, signal.SIGKILL)   # as a time limit would, in the middle of the correctness step
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    report = json.loads((tmp_path / f'{STEM}.json').read_text())
    assert [step['name'] for step in report['steps']] == ['environment']
    assert report['steps'][0]['status'] == 'done'
    assert any(row['case'] == 'torch' and row['impl'] == torch.__version__ for row in report['rows'])
    assert '## environment' in markdown.read_text()


def test_without_cuda_it_says_so_and_exits(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert gpu_check.main(['--out', str(tmp_path)]) == 2
    assert 'no CUDA device' in capsys.readouterr().err and '--dry-run' in gpu_check.NO_CUDA
    assert not list(tmp_path.iterdir())


def _speed_row(impl, ms, peak=None, tag=goals.NAT_S1, mode='fwd+bwd', step='speed', dry=False):
    return dict(step=step, tag=tag, case='c', mode=mode, impl=impl, ms=ms, peak_mib=peak, dry_run=dry, note='')


def test_goals_read_the_rows():
    rows = [_speed_row('attnzoo-triton', 3.0), _speed_row('attnzoo-triton-v2', 1.5), _speed_row('flex-tiled', 2.0),
            _speed_row('fused', 10.0, 100.0, 'biformer_small', 'train', 'train steps'),
            _speed_row('reference', 25.0, 150.0, 'biformer_small', 'train', 'train steps')]
    by_name = {row['case']: row for row in goals.evaluate(rows)}
    v1 = by_name['NA v2 fwd+bwd at NAT-T stage 1 >= 1.5x v1']
    assert v1['speedup'] == pytest.approx(2.0) and v1['met'] is True
    flex = by_name['NA v2 fwd+bwd at NAT-T stage 1 >= 2x FlexAttention']
    assert flex['speedup'] == pytest.approx(4 / 3) and flex['met'] is False
    biformer = by_name['BiFormer-S train step: fused >= 2x reference, peak memory <= 1/2']
    assert biformer['speedup'] == pytest.approx(2.5) and biformer['memory_ratio'] == pytest.approx(2 / 3)
    assert biformer['met'] is False        # fast enough, but not half the memory
    transnext = by_name['TransNeXt-T train step: fused >= 2x native, peak memory <= 1/2']
    assert transnext['met'] is None and 'no row' in transnext['note']


def test_speed_rows_run_each_kernel_version(monkeypatch):
    import attnzoo.kernels
    chosen = []

    @contextlib.contextmanager
    def use_na_kernel(version):
        chosen.append(version)
        yield

    monkeypatch.setattr(attnzoo.kernels, "use_na_kernel", use_na_kernel)
    case = gpucheck.speed_cases(dry=True)[0]
    assert case.impls['attnzoo-triton-v2'] is not None
    inputs = case.make_inputs(torch.device('cpu'), torch.float32)
    with torch.no_grad():
        case.impls['attnzoo-triton-v2'](**inputs)
        case.impls['attnzoo-triton'](**inputs)
    assert chosen == ['v2', 'v1']


def test_a_spent_budget_skips_with_notes(tmp_path):
    """A step past its cap writes a "not run" row for what it left; a step whose turn comes after the budget is
    spent is skipped with a note: no row disappears."""
    done = run_dry(tmp_path, '--budget-s', '8', '--steps', 'environment', 'correctness', 'speed')
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / f'{STEM}.json').read_text())
    steps = {step['name']: step for step in report['steps']}
    assert steps['environment']['status'] == steps['correctness']['status'] == 'done'
    assert steps['speed']['status'] == 'skipped' and 'budget' in steps['speed']['note']
    correctness = [r for r in report['rows'] if r['step'] == 'correctness']
    assert any('time cap' in r['note'] for r in correctness)
    assert all('ok' in r or r['note'] for r in correctness)
    assert any(r['step'] == 'speed' and 'skipped' in r['note'] for r in report['rows'])
