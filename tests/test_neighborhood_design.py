"""The design table of the Triton neighborhood kernels (tools/benchmark.py design): v2 meets the targets of
issue 24, and every figure follows the launch parameters the kernels use."""
import json
import sys
from pathlib import Path

import pytest
import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tools'))
import benchmark  # noqa: E402
from benchlib import design  # noqa: E402

from attnzoo.kernels import _neighborhood_triton as v1  # noqa: E402
from attnzoo.kernels import _neighborhood_triton_v2 as v2  # noqa: E402

KEYS = ('kernel', 'kernel_size', 'dilation', 'head_dim', 'map', 'scored_per_query', 'needed_per_query',
        'exp_per_query', 'dot_shapes', 'bytes_read_per_query', 'bias_bytes_per_query')


@pytest.fixture(scope='module')
def rows():
    return design.design_rows()


def test_cli_prints_every_row_as_json_and_as_a_table(capsys):
    benchmark.main(['design', '--json'])
    rows = json.loads(capsys.readouterr().out)
    assert {row['kernel'] for row in rows} == {'v1', 'v2'}
    assert {row['kernel_size'] for row in rows} == set(range(3, 14))
    assert {row['dilation'] for row in rows} == {1, 2} and {16, 128} <= {row['head_dim'] for row in rows}
    assert {7, 112} <= {row['map'] for row in rows}
    assert all(key in row for row in rows for key in KEYS)
    benchmark.main(['design'])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith('| kernel | kernel_size') and len(table) == len(rows) + 2


def test_v2_meets_the_targets(rows):
    """Scored / needed at the maps the 8 x 8 tile divides (NAT-T stage 1 at 224 px and twice that; smaller maps add
    the padding of partial tiles, which the table shows as it is)."""
    for row in rows:
        if row['kernel'] == 'v2' and row['dilation'] == 1 and row['map'] in (56, 112):
            target = (design.TARGETS.get(row['kernel_size']) if row['border'] == 'clamp'
                      else design.TRANSNEXT_TARGET if row['kernel_size'] == 3 else None)
            if target is not None:
                assert row['scored_over_needed'] <= target, row
    transnext = [row for row in rows if row['kernel'] == 'v2' and row['border'] == 'zero']
    assert transnext and all(row['scored_over_needed'] <= design.TRANSNEXT_TARGET for row in transnext)


def test_pieces_cover_the_band_in_few_powers_of_two():
    for kernel_h in range(1, 14):
        for kernel_w in range(1, 14):
            rows, cols = v2.band_keys(kernel_h, kernel_w)
            pieces = v2.band_pieces(kernel_h, kernel_w)
            assert sum(pieces) >= rows * cols and len(pieces) <= v2.MAX_PIECES
            assert all(p >= v1.MIN_DOT and p == triton.next_power_of_2(p) for p in pieces)
            # no piece is spare, and never more than one power-of-two block of the whole band would score
            assert sum(pieces) - rows * cols < min(pieces)
            assert sum(pieces) <= max(v1.MIN_DOT, triton.next_power_of_2(rows * cols))


def test_rows_follow_the_launch_parameters(monkeypatch):
    """A band of 4 rows or v1 tiles of 16 x 8 only: the rows change with the configs the kernels would launch."""
    before = {version: design.design_row(version, 7, 1, 32, 56) for version in ('v1', 'v2')}
    layout = dict(v2.tile_configs()[0].kwargs, BAND=4)
    monkeypatch.setattr(v2, 'tile_configs', lambda: [triton.Config(layout, num_warps=4)])
    monkeypatch.setattr(v1, 'TILE_CONFIGS', (triton.Config({'TILE_H': 16, 'TILE_W': 8, 'BLOCK_ROWS': 4}, num_warps=4),))
    after = {version: design.design_row(version, 7, 1, 32, 56) for version in ('v1', 'v2')}
    assert after['v2']['scored_per_query'] == sum(v2.band_pieces(7, 7, band=4)) != before['v2']['scored_per_query']
    assert after['v2']['dot_shapes'] == [f'32x{p}x32' for p in v2.band_pieces(7, 7, band=4)]
    # v1: 16 x 8 queries see up to (16 + 6) x (8 + 6) keys, in blocks of 4 rows x 16 columns
    assert after['v1']['scored_per_query'] != before['v1']['scored_per_query']
    assert after['v1']['dot_shapes'] == ['128x64x32'] and after['v1']['tile'].startswith('16x8 queries')


def test_bias_bytes_follow_the_window_table(monkeypatch):
    """The window's bias per query: v1 gathers each window's rpb; v2's interior bands read a row of the window table
    instead (every entry of its width), so a table of half the width halves that part."""
    assert design.design_row('v1', 7, 1, 32, 56)['bias_bytes_per_query'] == 49 * design.RPB_BYTES
    before = design.design_row('v2', 7, 1, 32, 56)
    monkeypatch.setattr(v2, 'WINDOW_TABLE_DTYPE', torch.float16)
    after = design.design_row('v2', 7, 1, 32, 56)
    interior, bands = design.v2_interior_bands(56, 56, (7, 7), (1, 1), 'clamp')
    assert 0 < interior < bands
    table_bytes = interior * v2.BAND * v2.TILE_W * sum(v2.band_pieces(7, 7)) * 4 / 56 ** 2
    assert before['bias_bytes_per_query'] - after['bias_bytes_per_query'] == pytest.approx(table_bytes / 2, abs=0.1)
    assert before['bytes_read_per_query'] - after['bytes_read_per_query'] == pytest.approx(table_bytes / 2, abs=0.1)


def test_kernel_section_times_the_chosen_versions():
    """tools/benchmark.py kernels: one fused row per version of --na-kernels, in every neighborhood case."""
    for versions, names in ((None, {'attnzoo-triton', 'attnzoo-triton-v2'}), (['v2'], {'attnzoo-triton-v2'})):
        cases = benchmark.kernel_cases(['neighborhood'], quick=True, na_kernels=versions)
        fused = [case for case in cases if any(name.startswith('attnzoo-triton') for name in case.impls)]
        assert fused and all({n for n in case.impls if n.startswith('attnzoo-triton')} == names for case in fused)
