"""tools/benchmark.py end to end on tiny shapes: every implementation runs, results are written.

Speed is never asserted here (it is measured on a GPU by the tool itself); this checks that the tool
produces complete, well-formed results, so a GPU session only has to run it.
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tools'))
import benchmark  # noqa: E402
from benchlib import cards, provenance, zoo  # noqa: E402
from reference_params import OFFICIAL_PARAMS  # noqa: E402


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """--threads and the zoo runs set torch's thread count for the process: give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _load(out_dir, section):
    """The run's JSON, once its four files are there, each named by the device kind of the device it records."""
    files = sorted(Path(out_dir).glob(f'*-{section}*'))
    assert {f.suffix for f in files} == {'.json', '.md', '.csv', '.png'}, files
    report = json.loads(next(f for f in files if f.suffix == '.json').read_text())
    assert all(f.name.startswith(provenance.slug(report['device']) + '-') for f in files), (report['device'], files)
    return report


@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                    reason='the Triton rows need a GPU or TRITON_INTERPRET=1')
def test_kernel_section_quick(tmp_path):
    benchmark.main(['kernels', '--quick', '--threads', '1', '--warmup', '0', '--iters', '1', '--out', str(tmp_path)])
    report = _load(tmp_path, 'kernels')
    rows = report['results']
    assert {r['section'] for r in rows} == {'neighborhood', 'routing'}
    for row in rows:
        if (row['impl'].startswith('flex') and row['mode'] == 'fwd+bwd') or row['impl'] == 'natten':
            continue   # FlexAttention has no backward on CPU; NATTEN has no CPU kernels
        assert not row['error'] and row['ms'] > 0 and row['dtype'] == 'float32', row
        assert row['gbps'] > 0, row
    ours = [r for r in rows if r['impl'] == 'attnzoo-triton']
    assert len(ours) == 2 * len({r['case'] for r in rows})
    assert all(r['speedup_vs_baseline'] is not None for r in ours if r['mode'] == 'fwd')
    neighborhood = {r['impl'] for r in rows if r['section'] == 'neighborhood'}
    assert {'attnzoo-triton', 'flex-tiled', 'flex-raster', 'reference', 'native'} <= neighborhood
    # FlexAttention on every neighborhood case but TransNeXt's aggregated attention (it cannot add the window
    # weight after the softmax), which has the official native sequence as its baseline
    assert {r['case'] for r in rows if r['impl'] == 'flex-tiled'} == {r['case'] for r in rows
                                                                      if r['section'] == 'neighborhood'
                                                                      and 'aggregated' not in r['case']}
    assert {r['case'] for r in rows if r['impl'] == 'native'} == {r['case'] for r in rows if 'aggregated' in r['case']}


needs_triton = pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1' and not torch.cuda.is_available(),
                                  reason='the Triton rows need a GPU or TRITON_INTERPRET=1')


@needs_triton
@pytest.mark.parametrize('section', ['neighborhood', 'routing'])
def test_every_implementation_computes_the_same_attention(section):
    """A speed ratio means something only between implementations of one computation: every row's
    forward (FlexAttention's tiled and raster token orders included) equals the reference."""
    import importlib
    module = importlib.import_module(f'benchlib.{section}')
    for case in module.cases(quick=True):
        inputs = {name: (t.detach() if isinstance(t, torch.Tensor) else t)
                  for name, t in case.make_inputs(torch.device('cpu'), torch.float32).items()}
        reference = 'reference' if section == 'neighborhood' else 'gather-reference'
        expected = case.impls[reference](**inputs)
        for name, impl in case.impls.items():
            if name in ('natten', 'sdpa-dense'):   # natten: CUDA only; dense SDPA ignores the routing on purpose
                continue
            torch.testing.assert_close(impl(**inputs), expected, atol=1e-4, rtol=1e-4,
                                       msg=lambda m, n=name, c=case.name: f'{c} / {n}: {m}')


def test_byte_model_counts_each_tensor_once():
    """forward = inputs + output; forward+backward adds dO and the input gradients, nothing twice."""
    from benchlib.harness import fwd_bwd_bytes
    q, k, v = (torch.zeros(1, 4, 4, 1, 16, requires_grad=True) for _ in range(3))   # 1 KiB each
    index = torch.zeros(1, 4, 2, dtype=torch.int32)                                 # 32 B, no gradient
    inputs = dict(q=q, k=k, v=v, region_index=index)
    forward = 3 * 1024 + 32 + 1024
    assert fwd_bwd_bytes(inputs, forward, out_bytes=1024) == forward + 1024 + 3 * 1024


def test_model_gmacs_count_the_attention():
    """nat_mini's multiply-adds equal the official 2.7 GMACs only if the attention (a custom op the
    counter cannot see into) is counted through its reference."""
    import attnzoo.backbones  # noqa: F401
    assert benchmark.model_gmacs('nat_mini', (224, 224)) == pytest.approx(2.7, rel=0.01)


@pytest.mark.slow
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


def test_cpu_section_quick(tmp_path):
    """Every kernel case and train step row of the cpu section is timed, with its ratios and peak memory."""
    benchmark.main(['cpu', '--quick', '--threads', '1', '--warmup', '0', '--iters', '1', '--out', str(tmp_path)])
    report = _load(tmp_path, 'cpu')
    rows = report['results']
    assert report['threads'] >= 1 and len(report['load_average_at_start']) == 3
    kernel_rows = [r for r in rows if r['section'] != 'models']
    assert {r['section'] for r in kernel_rows} == {'neighborhood', 'routing'}
    # TransNeXt's aggregated attention: against its official native sequence instead of dense SDPA
    aggregated = [r for r in kernel_rows if 'aggregated' in r['case']]
    kernel_rows = [r for r in kernel_rows if 'aggregated' not in r['case']]
    assert {(r['impl'], r['mode']) for r in kernel_rows} == {(i, m) for i in ('attnzoo-cpu', 'reference', 'sdpa-dense')
                                                             for m in ('fwd', 'fwd+bwd')}
    assert {(r['impl'], r['mode']) for r in aggregated} == {(i, m) for i in ('attnzoo-cpu', 'reference', 'native')
                                                            for m in ('fwd', 'fwd+bwd')}
    for row in kernel_rows + aggregated:
        assert row['ms'] > 0 and row['extra']['cpu_ms'] > 0 and row['peak_mib'] > 0, row
        assert row['speedup_vs_baseline'] > 0, row
    assert all(row['extra']['speedup_vs_sdpa_dense'] > 0 for row in kernel_rows)
    model_rows = {r['impl']: r for r in rows if r['section'] == 'models'}
    assert set(model_rows) == {'cswin_tiny_224', 'nat_mini', 'nat_mini (reference kernels)'}
    assert model_rows['cswin_tiny_224']['extra']['time_vs_baseline'] == pytest.approx(1.0)
    assert all(r['extra']['time_vs_baseline'] > 0 and r['peak_mib'] > 0 for r in model_rows.values())


@pytest.mark.slow
def test_model_section_kernel_backends(tmp_path):
    """--kernel-backends: one row pair per backend for each model, the baseline once, on the default."""
    benchmark.main(['models', '--models', 'nat_mini', '--baseline', 'cswin_tiny_224', '--batch', '1',
                    '--kernel-backends', 'auto', 'reference', '--warmup', '0', '--iters', '1', '--out', str(tmp_path)])
    rows = _load(tmp_path, 'models')['results']
    assert {(r['impl'], r['extra']['kernel_backend']) for r in rows} == {
        ('cswin_tiny_224', 'auto'), ('nat_mini', 'auto'), ('nat_mini (reference kernels)', 'reference')}
    assert all(not r['error'] and r['ms'] > 0 and r['speedup_vs_baseline'] for r in rows)


def test_zoo_run_of_a_family(tmp_path):
    """models --family: every variant of the family once per mode, with the paper's facts, the measured
    figures and throughput; the files record the device, the library versions, the threads and the load."""
    # batch 2: SHViT's BatchNorm1d head cannot train on one image
    benchmark.main(['models', '--family', 'shvit', '--baseline', 'shvit_s1', '--modes', 'fwd', 'fwd+bwd',
                    '--batch', '2', '--warmup', '0', '--iters', '1', '--out', str(tmp_path)])
    report = _load(tmp_path, 'models-zoo-shvit')
    assert report['threads'] == 1 and report['batch'] == 2 and len(report['load_average_at_end']) == 3
    assert report['timm'] and report['torchvision'] and report['cpu']
    rows = report['results']
    shvit = zoo.family('shvit')
    assert {(r['impl'], r['mode']) for r in rows} == {(n, m) for n in shvit.variant_names() for m in ('fwd', 'fwd+bwd')}
    for row in rows:
        variant = shvit.variants[shvit.variant_names().index(row['impl'])]
        assert not row['error'] and row['extra']['img_per_s'] > 0 and row['extra']['timed_calls'] == 1, row
        assert row['extra']['paper_top1'] == variant.top1 and row['extra']['family'] == 'SHViT'
        assert round(row['extra']['params_m'] * 1e6) == OFFICIAL_PARAMS[row['impl']]
        assert row['case'].endswith(f'@{variant.resolution}x{variant.resolution} b2')
    csv_lines = next(tmp_path.glob('*.csv')).read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows) and 'img_per_s' in csv_lines[0]


def test_max_gmacs_lists_without_timing(tmp_path):
    benchmark.main(['models', '--models', 'shvit_s2', '--baseline', 'shvit_s1', '--max-gmacs', '0.3',
                    '--warmup', '0', '--iters', '1', '--batch', '1', '--modes', 'fwd', '--out', str(tmp_path)])
    rows = {r['impl']: r for r in _load(tmp_path, 'models')['results']}
    assert rows['shvit_s1']['ms'] > 0 and rows['shvit_s2']['ms'] is None
    assert rows['shvit_s2']['error'].startswith('not timed: 0 GMACs > --max-gmacs 0.3')


def test_unknown_family_is_refused(capsys):
    with pytest.raises(SystemExit):
        benchmark.parse_args(['models', '--family', 'swin'])
    assert "unknown family 'swin'; known: biformer" in capsys.readouterr().err


def test_cards_take_the_zoo_run(tmp_path):
    """cards.regenerate writes a zoo run's throughput, the device and the run's load into the cards'
    Numbers blocks and the README table, and leaves the hand-written rest alone (figures given, so
    nothing is counted here)."""
    import shutil
    import timm
    import attnzoo.backbones  # noqa: F401  registers the attnzoo families
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / 'model_cards', tmp_path / 'model_cards', ignore=shutil.ignore_patterns('*.png', '*.json'))
    shutil.copytree(root / 'configs', tmp_path / 'configs')
    shutil.copy(root / 'README.md', tmp_path / 'README.md')
    results = tmp_path / 'model_cards' / 'benchmarks'
    header = dict(device='CPU Test x2', date='2026-01-01', torch='2', dtype='fp32', batch=1, threads=1, iters=3,
                  warmup=1, load_average_at_start=[1.0, 2.0, 3.0], load_average_at_end=[1.5, 2.0, 3.0])
    rows = [dict(impl='shvit_s1', mode='fwd', ms=10.0, error='', extra=dict(img_per_s=100.0, params_m=6.3)),
            dict(impl='shvit_s2', mode='fwd', ms=None, error='not timed: 0 GMACs > --max-gmacs 0.3', extra={})]
    (results / 'cpu-test-x2-models-zoo.json').write_text(json.dumps({**header, 'results': rows}))
    figures = {v.name: dict(params=OFFICIAL_PARAMS[v.name], gmacs=1.0, size=(v.resolution,) * 2,
                            license=timm.get_pretrained_cfg(v.name).license) for v in zoo.all_variants()}
    before = (tmp_path / 'model_cards' / 'shvit.md').read_text()
    cards.regenerate(results, root=tmp_path, figures=figures)
    text = (tmp_path / 'model_cards' / 'shvit.md').read_text()
    numbers = cards.block(text, 'numbers')
    assert '| img/s, CPU Test x2 |' in numbers
    assert '| `shvit_s1` | 72.8 | 224 | 6,330,808 | 1.000 @224 | 100 |' in numbers
    assert '| `shvit_s2` |' in numbers and 'not timed |' in numbers and '| `shvit_s3` |' in numbers
    assert 'load average (1, 5, 15 min) 1.0, 2.0, 3.0 at the start' in numbers and '1 thread,' in numbers
    assert '"not timed": above the run\'s `--max-gmacs`' in numbers
    assert 'GPU: no GPU run exists yet' in numbers
    outside = lambda s: s.replace(cards.block(s, 'numbers'), '').split('\n---\n', 1)[1]  # noqa: E731
    assert outside(text) == outside(before)
    assert '| SHViT | `shvit_s1` | 6.33 | 1.00 @224 | 72.8 @224 |' in (tmp_path / 'README.md').read_text()
