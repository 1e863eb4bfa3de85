"""The design table of the Triton neighborhood-attention kernels: what each version computes per query, from the
launch parameters its own code uses (v1's autotuner configs and block-column rule, v2's band layout and pieces).

One row per (kernel version, kernel_size, dilation, head_dim, map, border) with, per query of the map (padding
of partial tiles and bands included, as the programs compute it):

- ``scored_per_query``: window logits computed (the tl.dot's N summed over blocks / pieces), vs
  ``needed_per_query`` (the window, ``kernel_size ** 2``); their ratio ``scored_over_needed``;
- ``exp_per_query``: exp2 evaluations (one per logit, plus v1's online-softmax rescale per block);
- ``dot_shapes``: the forward's ``M x N x K`` products (QK^T and P@V share them);
- ``bytes_read_per_query``: what the forward loads (masked loads read nothing): q, k and v elements in bf16,
  plus ``bias_bytes_per_query``, the window's bias with an rpb (float32, as NAT, DiNAT and TransNeXt hold it):
  the rpb gathered per in-window pair, or, in v2's interior bands, one row of its window table per query (its ``TABLE_KEYS``
  entries of ``WINDOW_TABLE_DTYPE``, -inf outside the window included; one table per head, read by every
  program: it stays in cache);
- ``dkdv_scored_per_key``: logits the dK / dV kernel recomputes per key (its loop over the queries whose
  windows hold the key tile / band: the inverse neighbourhood, larger at a clamped border);
- ``tile``: the query tile and key block (v1: the config with the fewest logits among those the autotuner
  tries; v2: its band layout) and the kernels the backward runs.

Extra tokens are not counted (both versions score them alike, in blocks of ``EXTRA_BLOCK``).
"""
import functools
import math
from typing import List

import torch

from attnzoo.kernels import _neighborhood_triton as v1
from attnzoo.kernels import _neighborhood_triton_v2 as v2
from attnzoo.kernels.neighborhood import NeighborhoodSpec, axis_neighbors

KERNEL_SIZES = tuple(range(3, 14))
DILATIONS = (1, 2)
HEAD_DIMS = (16, 24, 32, 64, 128)
MAPS = (7, 14, 28, 56, 112)
DTYPE_BYTES = 2   # bf16
RPB_BYTES = 4     # float32: the models' rpb parameters
TARGETS = {7: 2.6, 9: 2.1, 13: 2.7}   # v2, dilation 1: scored / needed (issue 24)
TRANSNEXT_TARGET = 7.2                # v2, TransNeXt's 3 x 3 zero-border window


def _groups(length, dilation):
    """Lengths of the dilation groups of one axis."""
    return [(length - group + dilation - 1) // dilation for group in range(dilation)]


@functools.lru_cache(maxsize=None)
def _window_starts(group_len, kernel, border):
    """The window start (group coordinates, < 0 outside a zero border) of every query of a group: the op's
    own rule (``axis_neighbors``)."""
    _, _, bias_index = axis_neighbors(group_len, kernel, 1, border)
    return tuple((bias_index[:, 0] + torch.arange(group_len) - (kernel - 1)).tolist())


@functools.lru_cache(maxsize=None)
def _inverse_spans(group_len, kernel, border):
    """Per key of a group, the queries ``[lo, hi)`` whose windows hold it (what the kernels' ``_query_span``
    returns for one key), from the op's own window rule."""
    keys, valid, _ = axis_neighbors(group_len, kernel, 1, border)
    lo, hi = [group_len] * group_len, [0] * group_len
    for query, (row, row_valid) in enumerate(zip(keys.tolist(), valid.tolist())):
        for key, key_valid in zip(row, row_valid):
            if key_valid:
                lo[key], hi[key] = min(lo[key], query), max(hi[key], query + 1)
    return tuple(lo), tuple(hi)


def _query_spans(length, dilation, kernel, border, tile):
    """Per key tile of every group, the length of the query span that sees any of its keys."""
    spans = []
    for group_len in _groups(length, dilation):
        lo, hi = _inverse_spans(group_len, kernel, border)
        spans += [max(hi[first:first + tile]) - min(lo[first:first + tile]) for first in range(0, group_len, tile)]
    return spans


def _clip(lo, hi, length):
    return max(0, min(hi, length) - max(lo, 0))


def _window_keys(size, kernel, dilation, border):
    """Per axis, summed over the queries of every group: the keys of each query's window inside the map."""
    return sum(_clip(start, start + kernel, group_len) for group_len in _groups(size, dilation)
               for start in _window_starts(group_len, kernel, border))


def _unshifted(starts, first, count, kernel):
    """Whether the queries ``first .. first + count - 1`` of a group all exist and see their whole windows
    inside the group, each starting ``kernel // 2`` before its query: v2's interior band (per axis)."""
    return first + count <= len(starts) and all(
        starts[query] == query - kernel // 2 and starts[query] >= 0 and starts[query] + kernel <= len(starts)
        for query in range(first, first + count))


def _v1_axis(length, kernel, dilation, border, tile, block):
    """Per axis, summed over v1's tiles: (padded key positions scored, key positions loaded, blocks)."""
    scored = loaded = blocks = 0
    for group_len in _groups(length, dilation):
        starts = _window_starts(group_len, kernel, border)
        for first in range(0, group_len, tile):
            last = min(first + tile, group_len) - 1
            lo, hi = max(starts[first], 0), min(starts[last] + kernel, group_len)   # the kernels' _key_span
            n_blocks = math.ceil((hi - lo) / block)
            scored += n_blocks * block
            loaded += hi - lo
            blocks += n_blocks
    return scored, loaded, blocks


def _v1_dkdv(size, kernel, dilation, border):
    """Logits of v1's dK / dV kernel: per key tile, its query span in blocks (the config with the fewest)."""
    best = None
    for config in v1.TILE_CONFIGS:
        tile_h, tile_w, block_rows = (config.kwargs[name] for name in ('TILE_H', 'TILE_W', 'BLOCK_ROWS'))
        block_cols = v1._block_cols(dict(TILE_W=tile_w, KERNEL_W=kernel))
        rows = sum(math.ceil(span / block_rows) * block_rows
                   for span in _query_spans(size, dilation, kernel, border, tile_h))
        cols = sum(math.ceil(span / block_cols) * block_cols
                   for span in _query_spans(size, dilation, kernel, border, tile_w))
        scored = tile_h * tile_w * rows * cols
        best = scored if best is None else min(best, scored)
    return best


def _v2_dkdv(size, kernel, dilation, border):
    """Logits of v2's dK / dV kernel: per key band, its query span in chunks of ``QUERY_CHUNK``."""
    layout = v2.tile_configs()[0].kwargs
    chunk = v2._band_meta(dict(layout, KERNEL_H=kernel, KERNEL_W=kernel))['QUERY_CHUNK']   # the heuristics' value
    band_spans = _query_spans(size, dilation, kernel, border, layout['BAND'])
    col_spans = _query_spans(size, dilation, kernel, border, layout['TILE_W'])
    return layout['BAND'] * layout['TILE_W'] * sum(math.ceil(rows * cols / chunk) * chunk
                                                   for rows in band_spans for cols in col_spans)


def _v1_row(size, kernel, dilation, border, block_d):
    best = None
    for config in v1.TILE_CONFIGS:
        tile_h, tile_w, block_rows = (config.kwargs[name] for name in ('TILE_H', 'TILE_W', 'BLOCK_ROWS'))
        block_cols = v1._block_cols(dict(TILE_W=tile_w, KERNEL_W=kernel))
        rows = _v1_axis(size, kernel, dilation, border, tile_h, block_rows)
        cols = _v1_axis(size, kernel, dilation, border, tile_w, block_cols)
        queries = tile_h * tile_w
        scored = queries * rows[0] * cols[0]
        if best is None or scored < best['scored']:
            best = dict(scored=scored, loaded=rows[1] * cols[1], blocks=rows[2] * cols[2], queries=queries,
                        tile=f'{tile_h}x{tile_w} queries, key blocks {block_rows}x{block_cols}',
                        dots=[f'{queries}x{block_rows * block_cols}x{block_d}'])
    return dict(scored=best['scored'], exp=best['scored'] + best['queries'] * best['blocks'],
                loaded_keys=best['loaded'], tile=best['tile'], dots=best['dots'],
                bias_bytes=RPB_BYTES * _window_keys(size, kernel, dilation, border) ** 2,
                dkdv=_v1_dkdv(size, kernel, dilation, border))


def _v2_axis(length, kernel, dilation, border, tile, band, key_span):
    """Per axis, summed over v2's bands of every group (``band`` query rows of each ``tile``; along x a band is
    the tile's width): (bands, key positions loaded, interior bands: ``_unshifted``)."""
    bands = loaded = interior = 0
    for group_len in _groups(length, dilation):
        starts = _window_starts(group_len, kernel, border)
        for first in (y for y0 in range(0, group_len, tile) for y in range(y0, min(y0 + tile, group_len), band)):
            bands += 1
            loaded += _clip(starts[first], starts[first] + key_span, group_len)
            interior += _unshifted(starts, first, band, kernel)
    return bands, loaded, interior


def v2_interior_bands(height, width, kernel_size, dilation, border):
    """v2's interior bands (those that read the window table) and all its bands, per image and head."""
    layout = v2.tile_configs()[0].kwargs
    rows = _v2_axis(height, kernel_size[0], dilation[0], border, layout['TILE_H'], layout['BAND'], 0)
    cols = _v2_axis(width, kernel_size[1], dilation[1], border, layout['TILE_W'], layout['TILE_W'], 0)
    return rows[2] * cols[2], rows[0] * cols[0]


def _v2_row(size, kernel, dilation, border, block_d):
    layout = v2.tile_configs()[0].kwargs
    tile_h, tile_w, band = layout['TILE_H'], layout['TILE_W'], layout['BAND']
    key_rows, key_cols = v2.band_keys(kernel, kernel, band, tile_w)
    pieces = v2.band_pieces(kernel, kernel, band, tile_w)
    meta = v2._band_meta(dict(layout, KERNEL_H=kernel, KERNEL_W=kernel))   # what the kernels' heuristics pass
    bands, loaded_rows, interior_rows = _v2_axis(size, kernel, dilation, border, tile_h, band, key_rows)
    tiles_x, loaded_cols, interior_cols = _v2_axis(size, kernel, dilation, border, tile_w, tile_w, key_cols)
    queries = band * tile_w
    scored = queries * sum(pieces) * bands * tiles_x
    # interior bands read their window-table rows, the others gather the rpb of their (whole) windows' pairs
    interior_queries = queries * interior_rows * interior_cols
    table_bytes = interior_queries * meta['TABLE_KEYS'] * v2.WINDOW_TABLE_DTYPE.itemsize
    gathered = _window_keys(size, kernel, dilation, border) ** 2 - interior_queries * kernel * kernel
    return dict(scored=scored, exp=scored, loaded_keys=loaded_rows * loaded_cols,
                bias_bytes=table_bytes + RPB_BYTES * gathered,
                tile=f'{tile_h}x{tile_w} queries in bands of {band}x{tile_w}, keys {key_rows}x{key_cols} '
                     f'in pieces {"+".join(map(str, pieces))}; dk/dv: queries in chunks of {meta["QUERY_CHUNK"]}',
                dots=[f'{queries}x{piece}x{block_d}' for piece in pieces],
                dkdv=_v2_dkdv(size, kernel, dilation, border))


def design_row(version, kernel, dilation, head_dim, size, border='clamp'):
    q = torch.empty(1, size, size, 1, head_dim, device='meta')
    block_d = v1._common(q, NeighborhoodSpec((kernel, kernel), (dilation, dilation), 1.0, border))['BLOCK_D']
    figures = (_v1_row if version == 'v1' else _v2_row)(size, kernel, dilation, border, block_d)
    queries = size * size
    needed = kernel * kernel
    scored = figures['scored'] / queries
    # q once per query, k and v of every loaded key (a tile / band loads its keys once for all its queries)
    bytes_read = ((queries + 2 * figures['loaded_keys']) * head_dim * DTYPE_BYTES + figures['bias_bytes']) / queries
    return dict(kernel=version, kernel_size=kernel, dilation=dilation, head_dim=head_dim, map=size, border=border,
                scored_per_query=round(scored, 2), needed_per_query=needed,
                scored_over_needed=round(scored / needed, 3), exp_per_query=round(figures['exp'] / queries, 2),
                dot_shapes=figures['dots'], bytes_read_per_query=round(bytes_read, 1),
                bias_bytes_per_query=round(figures['bias_bytes'] / queries, 1),
                dkdv_scored_per_key=round(figures['dkdv'] / queries, 2), tile=figures['tile'])


def design_rows() -> List[dict]:
    """Every row: both versions, clamped windows 3..13 (NAT / DiNAT), and TransNeXt's 3 x 3 zero-border window."""
    rows = []
    for version in ('v1', 'v2'):
        for kernel in KERNEL_SIZES:
            for dilation in DILATIONS:
                for head_dim in HEAD_DIMS:
                    for size in MAPS:
                        if kernel * dilation <= size:
                            rows.append(design_row(version, kernel, dilation, head_dim, size))
        rows += [design_row(version, 3, 1, 24, size, 'zero') for size in MAPS]
    return rows


COLUMNS = ('kernel', 'kernel_size', 'dilation', 'head_dim', 'map', 'border', 'scored_per_query', 'needed_per_query',
           'scored_over_needed', 'exp_per_query', 'bytes_read_per_query', 'bias_bytes_per_query', 'dkdv_scored_per_key',
           'dot_shapes', 'tile')


def design_table(rows) -> str:
    """A markdown table of the rows."""
    lines = ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    for row in rows:
        lines.append('| ' + ' | '.join(', '.join(row[c]) if isinstance(row[c], list) else str(row[c])
                                       for c in COLUMNS) + ' |')
    return '\n'.join(lines)
