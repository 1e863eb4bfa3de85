"""Neighborhood attention on CPU: query tiles against the union of their windows.

The reference gathers every query's ``kh x kw`` window (a ``kh * kw``-fold copy of K and V whose
backward scatters token by token). Here the map is cut into tiles of ``tile_h x tile_w`` queries;
the windows of one tile's queries all lie inside a ``(tile_h + kh - 1) x (tile_w + kw - 1)`` block
of keys (its *span*), so each tile is one small dense attention: its queries against its span
(and the extra tokens, in the same softmax) with an additive bias that holds the relative position
bias and -inf outside each query's window / the map. Spans start every ``tile`` tokens on a
zero-padded map, so they are strided windows (``unfold``) and their backward is a sum of a few
strided blocks, not a scatter. Dilation splits each axis into ``d`` interleaved groups, each an
undilated problem, handled as a batch dimension; a map no wider than a few windows is one tile, and a call that is
one tile per group with nothing but the window (NAT's 14x14 and 7x7 stages) is one dense attention per group, without
spans or chunks (:func:`_whole_map_forward`, :func:`_whole_map_backward`).

Per query this computes ``span_h * span_w`` logits instead of ``kh * kw`` (about 2x at k = 7);
in exchange every step is a dense (batched) matmul or a strided copy, which a CPU is fast at.
Forward and backward run chunk by chunk (:func:`_chunks`, about ``LOGITS_PER_CHUNK`` logits): a chunk's
K / V spans (``(span / tile) ** 2`` copies of its keys) are built from a zero-padded copy of the map
(K and V side by side: one copy) while they are in cache, and the backward adds its dK / dV spans straight
back onto such a map, so memory is a few copies of the map plus one chunk (the reference keeps
``kh * kw * head_dim`` per query for K and for V, plus its logits). Every chunk's tensors live in buffers
allocated once per call: fresh memory costs page faults (a fifth of a call when every chunk allocated its own).

The op's kernels interface (as the Triton kernels'): :func:`forward` returns the output and the
log-sum-exp of every query (tiles as the heads of PyTorch's fused CPU flash attention);
:func:`backward` recomputes the probabilities tile by tile and writes the gradients out with
batched matmuls (no autograd graph; nothing saved but the op's inputs and outputs).
"""
import collections
import functools
import itertools
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AxisTiling:
    """How one axis of ``length`` positions is cut into tiles.

    Dilation splits it into ``groups`` interleaved groups of at most ``group_length`` positions
    (shorter groups are padded at the end). Each group is covered by ``tiles`` tiles of ``tile``
    query slots, the first ``query_pad`` slots before the group's first position; tile ``i``'s
    keys are the ``span`` positions starting ``key_pad`` before its first query slot (positions
    outside the group are zero keys, masked out).
    """
    length: int
    kernel: int
    groups: int
    group_length: int
    tile: int
    tiles: int
    span: int
    query_pad: int
    key_pad: int

    @property
    def query_pad_after(self):
        return self.tiles * self.tile - self.query_pad - self.group_length

    @property
    def key_pad_after(self):
        """Zero keys after the group: the last span ends there."""
        return (self.tiles - 1) * self.tile + self.span - self.key_pad - self.group_length


def _covers_clamped_windows(kernel, tile, tiles, query_pad, group_length, shortest_group):
    """Whether every span holds the windows of its tile's queries under ``border="clamp"``. Windows
    shift inwards at the borders, so the first tile needs at least ``kernel // 2 + 1`` real
    queries and the last at least ``kernel - kernel // 2`` (in the shortest dilation group)."""
    last_tile_queries = shortest_group + query_pad - (tiles - 1) * tile
    return tile - query_pad > kernel // 2 and last_tile_queries >= kernel - kernel // 2


# A key slot of a span (its K and V rows copied into the chunk, their gradients added back) costs about as much as
# this many more query slots' logits: measured (forward + backward, one thread) at NAT's 14x14, 28x28 and 56x56
# maps, where it makes a 14x14 map one tile (20 % faster than 3x3 tiles) and leaves the larger ones unchanged.
SPAN_KEY_COST = 4


@functools.lru_cache(maxsize=256)
def axis_tiling(length, kernel, dilation, border, tile):
    """The cheapest tiling of one axis with at least ``tile`` queries per tile, counting ``span * (query slots +
    SPAN_KEY_COST)`` per tile (logits and key copies per row of tiles): either each dilation group as one tile
    whose span is the whole group, or tiles of ``t >= tile`` queries and spans of ``t + kernel - 1`` keys.
    For ``border="clamp"`` the padding slots are placed so that the shifted windows at both borders
    stay inside their spans (:func:`_covers_clamped_windows`)."""
    group_length, shortest = -(-length // dilation), length // dilation
    best = AxisTiling(length, kernel, dilation, group_length, group_length, 1, group_length, 0, 0)
    cost = group_length * (group_length + SPAN_KEY_COST)
    for t in range(tile, group_length):
        if group_length * (t + kernel - 1) >= cost:   # the least any t' >= t can cost
            break
        for query_pad in range(t if border == 'clamp' else 1):
            tiles = -(-(group_length + query_pad) // t)
            if tiles * (t + SPAN_KEY_COST) * (t + kernel - 1) >= cost:
                continue
            if border == 'clamp' and not _covers_clamped_windows(kernel, t, tiles, query_pad, group_length, shortest):
                continue
            best = AxisTiling(length, kernel, dilation, group_length, t, tiles, t + kernel - 1, query_pad,
                              query_pad + kernel // 2)
            cost = tiles * (t + SPAN_KEY_COST) * (t + kernel - 1)
    return best


@functools.lru_cache(maxsize=256)
def _axis_windows(axis: AxisTiling, border):
    """``inside`` (``[groups, tiles, tile, span]``: key slot in the query slot's window), the
    relative-position-bias row of every (query slot, key slot), ``key' - query' + kernel - 1``
    (clamped into the table where the key is outside the window) and the key's row in the query's
    window, ``key' - start`` (clamped likewise). Small: one axis.

    Query slots past the end of their group (padding) see every key slot: their outputs are
    dropped, and a row with at least one finite logit keeps the softmax and its backward finite.
    """
    kernel = axis.kernel
    group = torch.arange(axis.groups)[:, None, None, None]
    group_length = (axis.length - group + axis.groups - 1) // axis.groups
    tile_start = (torch.arange(axis.tiles) * axis.tile)[None, :, None, None]              # in padded slots
    query = tile_start - axis.query_pad + torch.arange(axis.tile)[None, None, :, None]    # in-group position
    key = tile_start - axis.key_pad + torch.arange(axis.span)[None, None, None, :]
    start = query - kernel // 2
    if border == 'clamp':
        start = torch.minimum(start.clamp(min=0), group_length - kernel)
    real_query = (query >= 0) & (query < group_length)
    inside = (key >= start) & (key < start + kernel) & (key >= 0) & (key < group_length)
    inside = inside | ~real_query
    bias_row = (key - query + kernel - 1).clamp(0, 2 * kernel - 2).expand(inside.shape)
    window_row = (key - start).clamp(0, kernel - 1).expand(inside.shape)
    return inside, bias_row, window_row


def _grouped(x, rows: AxisTiling, cols: AxisTiling):
    """``[B, H, W, heads, C]`` -> ``[B, heads, gh, gw, Lh, Lw, C]`` (a view unless the map needs padding
    to a multiple of the dilation): dilation group ``g`` of an axis holds positions ``g, g + d, ...``."""
    batch, height, width, heads, channels = x.shape
    pad_h, pad_w = rows.groups * rows.group_length - height, cols.groups * cols.group_length - width
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
    x = x.view(batch, rows.group_length, rows.groups, cols.group_length, cols.groups, heads, channels)
    return x.permute(0, 5, 2, 4, 1, 3, 6)


def _ungrouped(x, shape, rows: AxisTiling, cols: AxisTiling):
    """Inverse of :func:`_grouped`: ``[B, heads, gh, gw, Lh, Lw, C]`` -> ``[B, H, W, heads, C]``, a contiguous copy
    (never a view: dK and dV come from one map, and the op's outputs must not share memory)."""
    batch, height, width, heads, channels = shape
    x = x.permute(0, 4, 2, 5, 3, 1, 6).reshape(batch, rows.group_length * rows.groups,
                                                cols.group_length * cols.groups, heads, channels)
    return x[:, :height, :width].clone(memory_format=torch.contiguous_format)


def _tiles(x, rows, cols, pad_value=0.0):
    """``[B, H, W, heads, C]`` -> ``[B * heads * tiles, T, C]`` (a copy): every tile's query slots,
    padding slots filled with ``pad_value``."""
    x = _grouped(x, rows, cols)
    pads = (0, 0, cols.query_pad, cols.query_pad_after, rows.query_pad, rows.query_pad_after)
    if any(pads):
        x = F.pad(x, pads, value=pad_value)
    batch, heads, channels = x.shape[0], x.shape[1], x.shape[-1]
    x = x.reshape(batch, heads, rows.groups, cols.groups, rows.tiles, rows.tile, cols.tiles, cols.tile, channels)
    return x.transpose(5, 6).reshape(-1, rows.tile * cols.tile, channels).contiguous()   # a view in edge cases


def _untile(x, shape, rows, cols):
    """Inverse of :func:`_tiles` (padding slots dropped): ``[B * heads * tiles, T, C]`` -> ``[B, H, W, heads, C]``."""
    batch, height, width, heads, channels = shape
    x = x.view(batch, heads, rows.groups, cols.groups, rows.tiles, cols.tiles, rows.tile, cols.tile, channels)
    x = x.permute(0, 4, 6, 2, 5, 7, 3, 1, 8)     # [B, nh, th, gh, nw, tw, gw, heads, C]
    x = x.reshape(batch, rows.tiles * rows.tile * rows.groups, cols.tiles * cols.tile * cols.groups, heads, channels)
    # slot p of group g holds map position (p - query_pad) * d + g
    top, left = rows.query_pad * rows.groups, cols.query_pad * cols.groups
    return x[:, top:top + height, left:left + width].contiguous()


def _padded_size(axis: AxisTiling):
    """Rows (columns) of a group's zero-padded map: room for every span, and for whole blocks of ``tile`` keys
    past the last one (:func:`_add_chunk_spans`)."""
    return (axis.tiles - 1 + -(-axis.span // axis.tile)) * axis.tile


def _padded_units(tensors, rows, cols):
    """``n`` tensors ``[B, H, W, heads, D]`` -> ``[B * heads * groups, Ph, Pw, n * D]`` (a copy, the tensors side by
    side in the channels, so that one copy builds the spans of all): every dilation group of every image and head
    on a zero-padded map, position ``p`` of a group at ``key_pad + p``, so that the span of tile ``(i, j)`` starts
    at ``(i * tile, j * tile)``: strided windows."""
    batch, _, _, heads, channels = tensors[0].shape
    padded = tensors[0].new_empty(batch, heads, rows.groups, cols.groups, _padded_size(rows), _padded_size(cols),
                                  len(tensors) * channels)
    bottom, right = rows.key_pad + rows.group_length, cols.key_pad + cols.group_length
    for border in (padded[..., :rows.key_pad, :, :], padded[..., bottom:, :, :],
                   padded[..., rows.key_pad:bottom, :cols.key_pad, :], padded[..., rows.key_pad:bottom, right:, :]):
        border.zero_()   # the zero keys only: the inside is written next
    inside = padded[..., rows.key_pad:bottom, cols.key_pad:right, :]
    for index, x in enumerate(tensors):
        inside[..., index * channels:(index + 1) * channels] = _grouped(x, rows, cols)
    return padded.view(-1, *padded.shape[-3:])


def _chunk_spans(padded, rows, cols, units, tile_rows, out):
    """The spans of the tiles in rows ``tile_rows`` of ``units`` (slices) of a map of ``parts`` tensors side by side
    (:func:`_padded_units`), copied into the front of ``out`` (``[parts, tiles, S, D]``): ``[parts, c, S, D]``, each
    part contiguous (a strided operand costs a matmul 30 %)."""
    x = padded[units].unfold(1, rows.span, rows.tile)[:, tile_rows]          # [n, r, Pw, C, sh]
    x = x.unfold(2, cols.span, cols.tile)[:, :, :cols.tiles]                  # [n, r, nw, C, sh, sw]
    parts, channels = out.shape[0], out.shape[-1]
    x = x.unflatten(3, (parts, channels)).permute(3, 0, 1, 2, 5, 6, 4)       # [parts, n, r, nw, sh, sw, D]
    spans = out[:, :x.shape[1] * x.shape[2] * x.shape[3]]
    spans.view(x.shape).copy_(x)
    return spans


def _add_chunk_spans(padded, grad, rows, cols, units, tile_rows):
    """Adjoint of :func:`_chunk_spans`: adds the spans' gradients ``[parts, c, S, D]`` onto ``padded``
    (``[parts, units, Ph, Pw, D]``, in place).

    A span covers ``ceil(span / tile)`` blocks of ``tile`` keys per axis that land on a regular grid, so the sum
    is one strided addition per block pair (``unfold``'s generic backward was 5x slower)."""
    n_rows = tile_rows.stop - tile_rows.start
    grad = grad.view(grad.shape[0], -1, n_rows, cols.tiles, rows.span, cols.span, grad.shape[-1])
    grad = grad.transpose(3, 4)                                                   # [parts, n, r, sh, nw, sw, D]
    target = padded[:, units]
    for block_h in range(-(-rows.span // rows.tile)):
        size_h = min(rows.tile, rows.span - block_h * rows.tile)
        top = (tile_rows.start + block_h) * rows.tile
        band = target[:, :, top:top + n_rows * rows.tile].unflatten(2, (n_rows, rows.tile))[:, :, :, :size_h]
        for block_w in range(-(-cols.span // cols.tile)):
            size_w = min(cols.tile, cols.span - block_w * cols.tile)
            left = block_w * cols.tile
            block = band[..., left:left + cols.tiles * cols.tile, :].unflatten(-2, (cols.tiles, cols.tile))
            block[..., :size_w, :] += grad[:, :, :, block_h * rows.tile:block_h * rows.tile + size_h, :,
                                           left:left + size_w]


def _unpadded(padded, shape, rows, cols):
    """Inverse of :func:`_padded_units` (padding dropped): ``[B * heads * groups, Ph, Pw, D]`` ->
    ``[B, H, W, heads, D]``."""
    batch, _, _, heads, _ = shape
    groups = padded.view(batch, heads, rows.groups, cols.groups, *padded.shape[1:])
    groups = groups[:, :, :, :, rows.key_pad:rows.key_pad + rows.group_length,
                    cols.key_pad:cols.key_pad + cols.group_length]
    return _ungrouped(groups, shape, rows, cols)


def default_tile(kernel):
    """Fewest queries per tile along an axis (the tiling may take more). Measured (forward + backward,
    one thread, tiles 4 to 14 on 28x28 and 56x56 maps, kernels 7, 11, 13): the smallest tiles that
    cover the clamped windows are fastest; larger ones compute more logits than they save in copies."""
    return max(kernel // 2 + 1, 4)


def _tilings(q, spec, tile):
    if tile is None:
        tile = tuple(default_tile(kernel) for kernel in spec.kernel_size)
    height, width = q.shape[1:3]
    return (axis_tiling(height, spec.kernel_size[0], spec.dilation[0], spec.border, tile[0]),
            axis_tiling(width, spec.kernel_size[1], spec.dilation[1], spec.border, tile[1]))


def _untile_rows(x, shape, rows: AxisTiling, cols: AxisTiling):
    """``[B, heads, tiles * T]`` (the logits' rows) -> ``[B, heads, H, W]``."""
    batch, height, width, heads, _ = shape
    x = _untile(x.reshape(-1, rows.tile * cols.tile, 1), (batch, height, width, heads, 1), rows, cols)
    return x[..., 0].permute(0, 3, 1, 2).contiguous()


def _slots(axis: AxisTiling):
    """The (query slot, key slot) table shape of one axis."""
    return axis.groups, axis.tiles, axis.tile, axis.span


def _slot_pairs(rows: AxisTiling, cols: AxisTiling, row_table, col_table, combine):
    """Per-axis ``[groups, tiles, tile, span]`` tables combined into ``[tiles, T, S]``, the layout of the
    tiled logits (tiles ordered (row group, column group, row tile, column tile), slots row-major)."""
    pairs = combine(row_table.view(*_slots(rows), 1, 1, 1, 1), col_table.view(1, 1, 1, 1, *_slots(cols)))
    return pairs.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(rows.groups * cols.groups * rows.tiles * cols.tiles,
                                                         rows.tile * cols.tile, rows.span * cols.span)


@functools.lru_cache(maxsize=64)
def _window_positions(rows: AxisTiling, cols: AxisTiling, border):
    """Where a query's window positions lie in its span (for ``window_weight``): ``position``
    (``[tiles, T, S]``, the row-major window position of every (query slot, key slot)) and ``inside``
    (the key slot is in the query's window, inside the map)."""
    inside_rows, _, position_rows = _axis_windows(rows, border)
    inside_cols, _, position_cols = _axis_windows(cols, border)
    kernel_w = cols.kernel
    position = _slot_pairs(rows, cols, position_rows, position_cols, lambda r, c: r * kernel_w + c)
    inside = _slot_pairs(rows, cols, inside_rows, inside_cols, torch.logical_and)
    return position, inside


# The tables below depend only on the call's geometry: cached (a few per map size and device; small next to
# the call's own tensors), built outside inference mode so any later call may use them, never written to.
GEOMETRY_CACHE_SIZE = 16


@functools.lru_cache(maxsize=GEOMETRY_CACHE_SIZE)
def _bias_index(rows: AxisTiling, cols: AxisTiling, border, device):
    """``[tiles, T, S]`` int64: the entry of every (query slot, key slot) in the flattened
    ``[2 kh - 1, 2 kw - 1]`` rpb table with one more entry appended, ``-inf``, which every key slot
    outside the query's window (or the map) reads: the bias is selected, so nothing of a masked slot's
    table entry (a NaN rpb included) reaches the query."""
    _, bias_rows, _ = _axis_windows(rows, border)
    _, bias_cols, _ = _axis_windows(cols, border)
    _, inside = _window_positions(rows, cols, border)
    table_w = 2 * cols.kernel - 1
    index = _slot_pairs(rows, cols, bias_rows, bias_cols, lambda r, c: r * table_w + c)
    with torch.inference_mode(False):
        return index.masked_fill(~inside, (2 * rows.kernel - 1) * table_w).to(device)


@functools.lru_cache(maxsize=GEOMETRY_CACHE_SIZE)
def _bias_slots(rows: AxisTiling, cols: AxisTiling, device):
    """``[T * S]`` int64: the entry of every (query slot, key slot) of a tile in the flattened ``[2 kh - 1, 2 kw - 1]``
    rpb table. The relative position of a key slot to a query slot is the same in every tile and dilation group;
    where the key is outside the query's window it is clamped into the table (such a logit's gradient is 0)."""
    def relative(axis):
        slots = torch.arange(axis.span)[None, :] - torch.arange(axis.tile)[:, None]
        return (slots + axis.query_pad - axis.key_pad + axis.kernel - 1).clamp(0, 2 * axis.kernel - 2)
    index = relative(rows)[:, None, :, None] * (2 * cols.kernel - 1) + relative(cols)[None, :, None, :]
    with torch.inference_mode(False):
        return index.flatten().to(device)


def _rpb_grad(grad_bias, rpb, rows: AxisTiling, cols: AxisTiling):
    """Adjoint of the bias's table lookup, from the gradient of the bias summed over the tiles:
    ``[heads, T, S]`` -> ``[heads, 2 kh - 1, 2 kw - 1]``."""
    table = grad_bias.new_zeros(rpb.shape[0], rpb[0].numel())
    table.index_add_(1, _bias_slots(rows, cols, grad_bias.device), grad_bias.flatten(1))
    return table.view(rpb.shape)


# The bias of a call with rpb, ``[heads, tiles, T, S]``, depends only on the rpb's values and the geometry: the
# forward and the backward of a training step (and every call in inference) build the same one. Kept for the
# last rpb tensors seen (its values checked on every use), up to BIAS_CACHE_BYTES in all.
BIAS_CACHE_BYTES = 64 << 20
_bias_cache = collections.OrderedDict()   # (id(rpb), geometry, dtype) -> (copy of rpb, bias)
_bias_cache_lock = threading.Lock()


def _rpb_bias(rpb, rows: AxisTiling, cols: AxisTiling, border, dtype):
    """The rpb at every (query slot, key slot) of every tile, -inf outside the windows: ``[heads, tiles, T, S]``."""
    key = (id(rpb), rows, cols, border, dtype, rpb.device)
    with _bias_cache_lock:
        entry = _bias_cache.get(key)
        if entry is not None and entry[0].shape == rpb.shape and entry[0].dtype == rpb.dtype \
                and torch.equal(entry[0], rpb):
            _bias_cache.move_to_end(key)
            return entry[1]
    index = _bias_index(rows, cols, border, rpb.device)
    with torch.inference_mode(False):
        table = torch.cat([rpb.detach().to(dtype).flatten(1), rpb.new_full((rpb.shape[0], 1), float('-inf'),
                                                                           dtype=dtype)], 1)
        bias = table.index_select(1, index.flatten()).view((-1,) + index.shape)
        entry = (rpb.detach().clone(), bias)
    size = bias.numel() * bias.element_size()
    with _bias_cache_lock:
        _bias_cache.pop(key, None)
        if size <= BIAS_CACHE_BYTES:
            _bias_cache[key] = entry
            while sum(cached.numel() * cached.element_size() for _, cached in _bias_cache.values()) > BIAS_CACHE_BYTES:
                _bias_cache.popitem(last=False)
    return bias


@functools.lru_cache(maxsize=GEOMETRY_CACHE_SIZE)
def _window_mask(rows: AxisTiling, cols: AxisTiling, border, device, dtype):
    """``[1, tiles, T, S]``: 0 inside each query slot's window, -inf outside (the bias without rpb)."""
    _, inside = _window_positions(rows, cols, border)
    with torch.inference_mode(False):
        return torch.zeros(inside.shape, dtype=dtype).masked_fill_(~inside, float('-inf')).unsqueeze(0).to(device)


def _bias(q, rpb, rows: AxisTiling, cols: AxisTiling, border):
    """The additive bias of every (query slot, key slot), ``[heads or 1, tiles, T, S]``, in float32 or wider."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, torch.float32),
                                rpb.dtype if rpb is not None else torch.float32)
    if rpb is None:
        return _window_mask(rows, cols, border, q.device, dtype)
    return _rpb_bias(rpb, rows, cols, border, dtype)


class _Tiled:
    """The tiled problem of one call: query tiles ``[B * heads * tiles, T, D]``, key / value spans
    ``[B * heads * tiles, S, D]`` and the additive bias of every (query slot, key slot): the rpb,
    and -inf outside the window (``[heads or 1, tiles, T, S]``, float32 or wider)."""

    def __init__(self, q, k, v, rpb, spec, tile):
        self.border = spec.border
        self.batch, self.heads = q.shape[0], q.shape[3]
        rows, cols = self.rows, self.cols = _tilings(q, spec, tile)
        self.tiles = rows.groups * cols.groups * rows.tiles * cols.tiles
        self.tile, self.span = rows.tile * cols.tile, rows.span * cols.span
        self.queries = _tiles(q, rows, cols)
        self.padded_keys_values = _padded_units((k, v), rows, cols)             # [units, Ph, Pw, 2 D]
        self.bias = _bias(q, rpb, rows, cols, spec.border)

    def spans(self, chunk, out):
        """The keys and values of the chunk's tiles, ``[2, tiles, S, D]``, copied into the front of ``out``
        (:meth:`chunk_buffer`)."""
        return _chunk_spans(self.padded_keys_values, self.rows, self.cols, chunk.units, chunk.tile_rows, out)

    def chunk_buffer(self, chunks, *shape, parts=None, dtype=None):
        """Room for the largest of ``chunks``' ``[tiles, *shape]`` tensors (``[parts, tiles, *shape]``), reused chunk
        after chunk (fresh memory for every chunk costs page faults)."""
        most = max(self.flat(chunk).stop - self.flat(chunk).start for chunk in chunks)
        return self.queries.new_empty(((parts,) if parts else ()) + (most,) + shape, dtype=dtype)

    def rpb_grad(self, grad_bias, rpb):
        """Adjoint of the bias's table lookup, from the gradient of the bias summed over the tiles:
        ``[heads, T, S]`` -> ``[heads, 2 kh - 1, 2 kw - 1]``."""
        return _rpb_grad(grad_bias, rpb, self.rows, self.cols)

    def extra_bias_rows(self, extra_bias):
        """``extra_bias`` ``[B or 1, heads or 1, H, W, L]`` in the logits' layout, ``[B or 1, heads or 1,
        tiles * T, L]``, in the bias's dtype (float32 or wider)."""
        tiles = _tiles(extra_bias.permute(0, 2, 3, 1, 4).to(self.bias.dtype), self.rows, self.cols)
        return tiles.view(extra_bias.shape[0], extra_bias.shape[1], -1, extra_bias.shape[-1])

    def untile_extra_rows(self, x, shape):
        """Inverse of :meth:`extra_bias_rows`: ``[B, heads, tiles * T, L]`` -> ``[B, heads, H, W, L]``."""
        batch, height, width, heads, _ = shape
        x = _untile(x.reshape(-1, self.tile, x.shape[-1]), (batch, height, width, heads, x.shape[-1]), self.rows,
                    self.cols)
        return x.permute(0, 3, 1, 2, 4)

    def window_weights(self, window_weight):
        """``window_weight`` ``[B, H, W, heads, kh * kw]`` spread over the spans: ``[B * heads * tiles, T, S]``
        (zero outside each query's window and the map), in the bias's dtype."""
        position, inside = _window_positions(self.rows, self.cols, self.border)
        weights = _tiles(window_weight.to(self.bias.dtype), self.rows, self.cols)     # [B * heads * tiles, T, K]
        weights = weights.view(-1, self.tiles, self.tile, weights.shape[-1])
        spread = torch.gather(weights, 3, position.expand(weights.shape[0], -1, -1, -1)) * inside
        return spread.view(-1, self.tile, self.span)

    def window_weight_grad(self, grad_spread, shape):
        """Adjoint of :meth:`window_weights`: ``[B * heads * tiles, T, S]`` -> ``[B, H, W, heads, kh * kw]``."""
        position, inside = _window_positions(self.rows, self.cols, self.border)
        grad_spread = (grad_spread.view(-1, self.tiles, self.tile, self.span) * inside)
        window = self.rows.kernel * self.cols.kernel
        grad = grad_spread.new_zeros(grad_spread.shape[0], self.tiles, self.tile, window)
        grad.scatter_add_(3, position.expand(grad.shape[0], -1, -1, -1), grad_spread)
        return _untile(grad.view(-1, self.tile, window), shape[:-1] + (window,), self.rows, self.cols)

    def tile_rows(self, x, pad_value=0.0):
        """``[B, H, W, heads]`` -> ``[B, heads, tiles * T, 1]``, the layout of the logits' rows."""
        batch, heads = x.shape[0], x.shape[3]
        return _tiles(x.unsqueeze(-1), self.rows, self.cols, pad_value).view(batch, heads, -1, 1)

    def untile_rows(self, x, shape):
        """``[B, heads, tiles * T]`` -> ``[B, heads, H, W]``."""
        return _untile_rows(x, shape, self.rows, self.cols)

    def flash_operands(self, chunk, keys, values, extra_k=None, extra_v=None, extra_rows=None):
        """Queries, keys, values and mask of one chunk for PyTorch's fused CPU flash attention, its heads as the
        batch and its tiles as the heads (``keys``, ``values``: the chunk's spans): the extra tokens join every
        tile's keys (unmasked, or with their per-query bias, ``extra_rows`` from :meth:`extra_bias_rows`)."""
        n_heads, head_dim = chunk.heads.stop - chunk.heads.start, keys.shape[-1]
        queries, keys, values = (x.view(n_heads, -1, x.shape[1], head_dim)
                                 for x in (self.queries[self.flat(chunk)], keys, values))
        bias = self.bias[chunk.heads if self.bias.shape[0] > 1 else slice(0, 1), chunk.tiles]   # [heads or 1, c, T, S]
        if extra_k is not None:
            def with_extra(spans, extra):
                extra = extra[chunk.image, :, chunk.heads].transpose(0, 1)[:, None]
                return torch.cat([spans, extra.expand(-1, spans.shape[1], -1, -1)], 2)
            keys, values = with_extra(keys, extra_k), with_extra(values, extra_v)
            if extra_rows is None:
                bias = F.pad(bias, (0, extra_k.shape[1]))
            else:
                rows = extra_rows[min(chunk.image, extra_rows.shape[0] - 1),
                                  chunk.heads if extra_rows.shape[1] > 1 else slice(0, 1), self.logit_rows(chunk)]
                rows = rows.view(rows.shape[0], -1, self.tile, rows.shape[-1])
                heads = max(bias.shape[0], rows.shape[0])
                bias = torch.cat([bias.expand(heads, -1, -1, -1), rows.expand(heads, -1, -1, -1)], -1)
        return queries, keys, values, bias

    def flat(self, chunk):
        """The chunk's tiles in the tiled tensors (``[B * heads * tiles, ...]``)."""
        n_heads = chunk.heads.stop - chunk.heads.start
        first = (chunk.image * self.heads + chunk.heads.start) * self.tiles
        return slice(first + chunk.tiles.start, first + (n_heads - 1) * self.tiles + chunk.tiles.stop)

    def logit_rows(self, chunk):
        """The chunk's rows in a head's ``[tiles * T]`` logits rows."""
        return slice(chunk.tiles.start * self.tile, chunk.tiles.stop * self.tile)

    def chunks(self, n_extra):
        """The steps of a pass over the tiles with ``n_extra`` extra tokens (:func:`_chunks`)."""
        return _chunks(self.batch, self.heads, self.rows, self.cols, self.tile * (self.span + n_extra))


LOG2E = 1.4426950408889634   # the op's lse is base 2 (the fused kernels' exp2 domain)
LOGITS_PER_CHUNK = 1 << 18   # logits per step of a pass (measured 2^14 to 2^20 at NAT's stage shapes, one thread)
WHOLE_MAP_LOGITS = 1 << 21   # logits per step of a whole-map backward (:func:`_whole_map_backward`)


def _forward(q, k, v, rpb, extra_k, extra_v, spec, extra_bias=None, window_weight=None, tile=None):
    rows, cols = _tilings(q, spec, tile)
    if _whole_map(q.shape[3], rows, cols, extra_k, extra_bias, window_weight):
        return _whole_map_forward(q, k, v, rpb, spec, rows, cols)
    batch, _, _, heads, head_dim = q.shape
    tiled = _Tiled(q, k, v, rpb, spec, tile)
    extra_rows = tiled.extra_bias_rows(extra_bias) if extra_bias is not None else None
    spread = tiled.window_weights(window_weight) if window_weight is not None else None
    out, lse = torch.empty_like(tiled.queries), []
    chunks = list(tiled.chunks(extra_k.shape[1] if extra_k is not None else 0))
    span_buffer = tiled.chunk_buffer(chunks, tiled.span, head_dim, parts=2)
    for chunk in chunks:
        keys, values = tiled.spans(chunk, span_buffer)
        flat = tiled.flat(chunk)
        queries, keys, all_values, bias = tiled.flash_operands(chunk, keys, values, extra_k, extra_v, extra_rows)
        out_c, lse_c = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(queries, keys, all_values, 0.0, False,
                                                                              attn_mask=bias, scale=spec.scale)
        out[flat] = out_c.reshape(-1, tiled.tile, head_dim)
        if spread is not None:
            out[flat] += torch.bmm(spread[flat], values.to(spread.dtype)).to(out.dtype)
        lse.append(lse_c.reshape(-1))
    out = _untile(out, q.shape, tiled.rows, tiled.cols)
    return out, (tiled.untile_rows(torch.cat(lse).view(batch, heads, -1), q.shape) * LOG2E).float()


@dataclass(frozen=True)
class Chunk:
    """One step of the forward or backward: tiles ``tiles`` (of every head's ``[tiles, T, S]`` logits) of heads
    ``heads`` of one image, which are the tile rows ``tile_rows`` of the padded maps ``units`` (``(image, head,
    dilation group)`` in that order): whole heads, whole groups of one head, or tile rows of one group."""
    image: int
    heads: slice
    tiles: slice
    units: slice
    tile_rows: slice


def _chunks(batch, heads, rows: AxisTiling, cols: AxisTiling, logits_per_tile):
    """The forward's and backward's steps of about ``LOGITS_PER_CHUNK`` logits (at least one tile row), each a
    contiguous slice of every tiled tensor (ordered image, head, group, tile row, tile column). Small maps take
    several heads per step: one Python step per few heads, not per head."""
    groups, per_group = rows.groups * cols.groups, rows.tiles * cols.tiles
    per_head = groups * per_group
    tiles = max(1, LOGITS_PER_CHUNK // logits_per_tile)
    every_row = slice(0, rows.tiles)
    if tiles >= per_head:
        step = tiles // per_head
        for image, head in itertools.product(range(batch), range(0, heads, step)):
            stop = min(head + step, heads)
            yield Chunk(image, slice(head, stop), slice(0, per_head),
                        slice((image * heads + head) * groups, (image * heads + stop) * groups), every_row)
    elif tiles >= per_group:
        step = tiles // per_group
        for image, head, group in itertools.product(range(batch), range(heads), range(0, groups, step)):
            stop, unit = min(group + step, groups), (image * heads + head) * groups
            yield Chunk(image, slice(head, head + 1), slice(group * per_group, stop * per_group),
                        slice(unit + group, unit + stop), every_row)
    else:
        step = max(1, tiles // cols.tiles)
        for image, head, group, row in itertools.product(range(batch), range(heads), range(groups),
                                                         range(0, rows.tiles, step)):
            stop, unit = min(row + step, rows.tiles), (image * heads + head) * groups + group
            yield Chunk(image, slice(head, head + 1),
                        slice(group * per_group + row * cols.tiles, group * per_group + stop * cols.tiles),
                        slice(unit, unit + 1), slice(row, stop))


def _chunked_backward(grad_out, q, k, v, rpb, extra_k, extra_v, spec, extra_bias, window_weight, flags, tile):
    """The backward: the probabilities recomputed by a softmax over the recomputed logits (cheaper on CPU than
    ``exp(logits - lse)`` from the op's float32 ``lse``, and exact in float64), a few tiles of one image and
    head at a time (contiguous slices of the tiled tensors, written straight into the gradients' buffers) so
    that the logits and their gradients stay in cache. PyTorch's fused CPU flash attention backward on the
    same tiles (tiles as heads) was measured slower, 37 vs 27 ms at ``[2, 56, 56, 2, 32]`` k 7 without rpb
    (one thread): its per-head overhead is large next to a tile's 16 x 100 logits (25.0 vs 23.3 ms after
    the chunk buffers). The softmax backward is PyTorch's (one pass per chunk), whose ``delta`` is
    ``sum_j P_j dP_j`` over the recomputed probabilities, not ``rowsum(dO * O)`` from the rounded output: a
    ``window_weight``'s term ``sum_j w_j v_j`` is not attention and would cancel there (at float16, where the
    term dominates O, that cost d_q 1 % of its scale); its gradient is ``dO . v_j``, the window part of the
    probabilities' gradient."""
    needs_rpb_grad, needs_extra_grad, needs_extra_bias_grad, needs_window_weight_grad = flags
    rows, cols = _tilings(q, spec, tile)
    if _whole_map(q.shape[3], rows, cols, extra_k, extra_bias, window_weight):
        return _whole_map_backward(grad_out, q, k, v, rpb, spec, needs_rpb_grad, rows, cols)
    batch, _, _, heads, head_dim = q.shape
    tiled = _Tiled(q, k, v, rpb, spec, tile)
    n_tiles, n_queries, n_keys = tiled.tiles, tiled.tile, tiled.span
    wide, low = tiled.bias.dtype, q.dtype
    n_extra = extra_k.shape[1] if extra_k is not None else 0

    grad_out = grad_out.to(low)
    grad_tiles = _tiles(grad_out, tiled.rows, tiled.cols)
    spread = tiled.window_weights(window_weight) if window_weight is not None else None
    extra_rows = tiled.extra_bias_rows(extra_bias) if extra_bias is not None else None   # [B|1, h|1, tiles * T, L]
    queries = tiled.queries                                                           # [B * heads * tiles, T, D]
    chunks = list(tiled.chunks(n_extra))
    # per-chunk tensors in buffers reused by every chunk: spans [2, c, S, D], their gradients, logits [c, T, S]
    span_buffer, grad_span_buffer = (tiled.chunk_buffer(chunks, n_keys, head_dim, parts=2) for _ in range(2))
    logits_buffer = tiled.chunk_buffer(chunks, n_queries, n_keys, dtype=wide)
    grad_probs_buffer = tiled.chunk_buffer(chunks, n_queries, n_keys)
    scaled_buffer = tiled.chunk_buffer(chunks, n_queries, head_dim, dtype=wide)

    dq = torch.empty_like(queries)
    grad_keys_values = tiled.padded_keys_values.new_zeros((2,) + tiled.padded_keys_values.shape[:-1] + (head_dim,),
                                                          dtype=wide)   # [2, units, Ph, Pw, D]: dK, dV
    grad_bias = tiled.bias.new_zeros(heads, n_queries, n_keys) if needs_rpb_grad else None
    grad_extra_rows = (queries.new_empty(batch, heads, n_tiles * n_queries, n_extra, dtype=wide)
                       if needs_extra_bias_grad else None)
    grad_spread = torch.empty_like(spread) if needs_window_weight_grad else None
    if needs_extra_grad:
        d_extra_k, d_extra_v = (q.new_zeros(batch, heads, n_extra, head_dim, dtype=wide) for _ in range(2))

    for chunk in chunks:
        image, heads_c, part = chunk.image, chunk.heads, chunk.tiles
        n_heads = heads_c.stop - heads_c.start
        flat, rows = tiled.flat(chunk), tiled.logit_rows(chunk)
        count = flat.stop - flat.start
        scaled = torch.mul(queries[flat].to(wide), spec.scale, out=scaled_buffer[:count])   # [c, T, D]
        keys_c, values_c = tiled.spans(chunk, span_buffer)                             # [c, S, D] each, in cache
        grad_c = grad_tiles[flat]
        bias = tiled.bias[heads_c if tiled.bias.shape[0] > 1 else slice(0, 1), part]
        logits = torch.baddbmm(bias.expand(n_heads, -1, -1, -1).reshape(-1, n_queries, n_keys), scaled,
                               keys_c.to(wide).transpose(1, 2), out=logits_buffer[:count])
        grad_probs = torch.bmm(grad_c, values_c.transpose(1, 2), out=grad_probs_buffer[:count]).to(wide)
        if grad_spread is not None:
            grad_spread[flat] = grad_probs
        if extra_k is not None:   # per head: [heads_c, chunk rows, L]
            extra_k_c, extra_v_c = (x[image, :, heads_c].transpose(0, 1) for x in (extra_k, extra_v))
            scaled_rows, grad_rows = scaled.view(n_heads, -1, head_dim), grad_c.view(n_heads, -1, head_dim)
            extra_logits = torch.bmm(scaled_rows, extra_k_c.to(wide).transpose(1, 2))
            if extra_rows is not None:
                extra_logits = extra_logits + extra_rows[min(image, extra_rows.shape[0] - 1),
                                                         heads_c if extra_rows.shape[1] > 1 else slice(0, 1), rows]
            logits = torch.cat([logits, extra_logits.view(-1, n_queries, n_extra)], -1)
            extra_grad_probs = torch.bmm(grad_rows, extra_v_c.transpose(1, 2)).to(wide)
            grad_probs = torch.cat([grad_probs, extra_grad_probs.view(-1, n_queries, n_extra)], -1)
        probs = torch.softmax(logits, -1, out=logits)
        grad_logits = torch.ops.aten._softmax_backward_data.out(grad_probs, probs, -1, wide, grad_input=grad_probs)
        window_grad = grad_logits[..., :n_keys]
        value_weights = probs[..., :n_keys] if spread is None else probs[..., :n_keys] + spread[flat]
        window_grad_low, scaled_low = window_grad.to(low), scaled.to(low)
        grad_spans = grad_span_buffer[:, :count]
        torch.bmm(window_grad_low.transpose(1, 2), scaled_low, out=grad_spans[0])
        torch.bmm(value_weights.to(low).transpose(1, 2), grad_c, out=grad_spans[1])
        _add_chunk_spans(grad_keys_values, grad_spans, tiled.rows, tiled.cols, chunk.units, chunk.tile_rows)
        torch.bmm(window_grad_low, keys_c, out=dq[flat])
        if grad_bias is not None:   # its table's gradient sums over the tiles: summed here, in cache
            per_head = window_grad.view(n_heads, -1, n_queries, n_keys)
            grad_bias[heads_c] += per_head[:, 0] if per_head.shape[1] == 1 else per_head.sum(1)   # sum(1): 4x slower
        if extra_k is not None:
            extra_grad = grad_logits[..., n_keys:].reshape(n_heads, -1, n_extra)    # [heads_c, chunk rows, L]
            dq[flat] += torch.bmm(extra_grad.to(low), extra_k_c).view(-1, n_queries, head_dim)
            if grad_extra_rows is not None:
                grad_extra_rows[image, heads_c, rows] = extra_grad
            if needs_extra_grad:   # sums over every query of the map: in float32 (or wider)
                d_extra_k[image, heads_c] += torch.bmm(extra_grad.transpose(1, 2), scaled_rows)
                extra_probs = probs[..., n_keys:].reshape(n_heads, -1, n_extra)
                d_extra_v[image, heads_c] += torch.bmm(extra_probs.transpose(1, 2), grad_rows.to(wide))
    dq = _untile(dq.mul_(spec.scale), q.shape, tiled.rows, tiled.cols)
    dk, dv = (_unpadded(g, q.shape, tiled.rows, tiled.cols).to(low) for g in grad_keys_values)
    d_rpb = tiled.rpb_grad(grad_bias, rpb).to(rpb.dtype).contiguous() if grad_bias is not None else None
    if needs_extra_grad:
        d_extra_k, d_extra_v = (g.transpose(1, 2).to(low).contiguous() for g in (d_extra_k, d_extra_v))
    else:
        d_extra_k = d_extra_v = None
    d_extra_bias = None
    if grad_extra_rows is not None:   # the bias adds to the logits: its gradient is theirs
        d_extra_bias = tiled.untile_extra_rows(grad_extra_rows.view(batch, heads, -1, n_extra), q.shape)
        broadcast = tuple(dim for dim in (0, 1) if extra_bias.shape[dim] == 1 and d_extra_bias.shape[dim] != 1)
        d_extra_bias = d_extra_bias.sum(broadcast, keepdim=True) if broadcast else d_extra_bias
        d_extra_bias = d_extra_bias.to(extra_bias.dtype).contiguous()
    d_window_weight = None
    if grad_spread is not None:
        d_window_weight = tiled.window_weight_grad(grad_spread, q.shape)
        d_window_weight = d_window_weight.to(window_weight.dtype)
    return dq, dk, dv, d_rpb, d_extra_k, d_extra_v, d_extra_bias, d_window_weight


def _whole_map(heads, rows: AxisTiling, cols: AxisTiling, extra_k, extra_bias, window_weight):
    """Whether the call is one dense attention per dilation group: one tile whose span is the whole group on both
    axes (a small map, or a window that covers most of it, :func:`axis_tiling`), nothing but the window, and one
    image's logits within ``WHOLE_MAP_LOGITS`` (a larger one takes the chunked path, whose memory stays bounded)."""
    one_tile = all(axis.tiles == 1 and axis.span == axis.tile == axis.group_length for axis in (rows, cols))
    logits = heads * rows.groups * cols.groups * (rows.tile * cols.tile) ** 2
    return (one_tile and logits <= WHOLE_MAP_LOGITS and extra_k is None and extra_bias is None
            and window_weight is None)


def _whole_map_forward(q, k, v, rpb, spec, rows, cols):
    """:func:`_forward` of a :func:`_whole_map` call: the queries of every dilation group against all its keys
    with the bias as an additive mask, in one call of PyTorch's fused CPU flash attention (heads and groups as its
    heads): no spans, no chunks. NAT's 14x14 and 7x7 maps (k 7) were 2.7 and 0.9 ms per forward in the tiled
    path's chunks, against 1.2 and 0.25 ms for the flash attention alone (one thread)."""
    batch, _, _, heads, head_dim = q.shape
    bias = _bias(q, rpb, rows, cols, spec.border)                                  # [heads or 1, groups, N, N]
    masks = bias.shape[0] * bias.shape[1]
    queries, keys, values = (_tiles(x, rows, cols).view(-1, masks, rows.tile * cols.tile, head_dim)
                             for x in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        queries, keys, values, 0.0, False, attn_mask=bias.view(1, masks, *bias.shape[2:]), scale=spec.scale)
    out = _untile(out.reshape(-1, rows.tile * cols.tile, head_dim), q.shape, rows, cols)
    return out, (_untile_rows(lse.reshape(batch, heads, -1), q.shape, rows, cols) * LOG2E).float()


def _whole_map_backward(grad_out, q, k, v, rpb, spec, needs_rpb_grad, rows, cols):
    """:func:`_chunked_backward` of a :func:`_whole_map` call, as plain batched matmuls over whole groups (the
    probabilities recomputed, PyTorch's softmax backward), a few images at a time (at most ``WHOLE_MAP_LOGITS``
    logits) so that large batches keep a bounded buffer; the rpb gradient is the logits' gradient summed over
    images and groups, then over the slot pairs of each table entry."""
    batch, _, _, heads, head_dim = q.shape
    bias = _bias(q, rpb, rows, cols, spec.border)                                  # [heads or 1, groups, N, N]
    wide, low = bias.dtype, q.dtype
    groups, n = bias.shape[1], bias.shape[2]
    per_image = heads * groups
    queries, keys, values, grad = (_tiles(x, rows, cols) for x in (q, k, v, grad_out.to(low)))   # [B * heads * groups, N, D]
    dq, dk, dv = (torch.empty_like(queries) for _ in range(3))
    grad_bias = bias.new_zeros(heads, groups, n, n) if needs_rpb_grad else None
    step = max(1, WHOLE_MAP_LOGITS // (per_image * n * n))
    for start in range(0, batch, step):
        images = slice(start * per_image, min(start + step, batch) * per_image)
        scaled = torch.mul(queries[images].to(wide), spec.scale)
        logits = torch.bmm(scaled, keys[images].to(wide).transpose(1, 2))
        logits.view(-1, heads, groups, n, n).add_(bias)
        probs = torch.softmax(logits, -1, out=logits)
        grad_probs = torch.bmm(grad[images], values[images].transpose(1, 2)).to(wide)
        grad_logits = torch.ops.aten._softmax_backward_data.out(grad_probs, probs, -1, wide, grad_input=grad_probs)
        grad_low = grad_logits.to(low)
        torch.bmm(grad_low, keys[images], out=dq[images])
        torch.bmm(grad_low.transpose(1, 2), scaled.to(low), out=dk[images])
        torch.bmm(probs.to(low).transpose(1, 2), grad[images], out=dv[images])
        if grad_bias is not None:
            grad_bias += grad_logits.view(-1, heads, groups, n, n).sum(0)
    dq, dk, dv = (_untile(x, q.shape, rows, cols) for x in (dq.mul_(spec.scale), dk, dv))
    d_rpb = None
    if grad_bias is not None:
        d_rpb = _rpb_grad(grad_bias.sum(1), rpb, rows, cols).to(rpb.dtype).contiguous()
    return dq, dk, dv, d_rpb, None, None, None, None


@torch.no_grad()
def forward(q, k, v, rpb, extra_k, extra_v, spec, extra_bias=None, window_weight=None, tile=None):
    """Output ``[B, H, W, heads, D]`` and base-2 log-sum-exp ``[B, heads, H, W]`` (float32) of checked
    arguments (``spec``: kernel_size, dilation, scale, border; ``extra_bias`` 5-D). ``tile``: fewest
    queries per tile ``(rows, cols)``, :func:`default_tile` when None.

    Every tile is one attention of its queries over its span (and the extra tokens) with the bias
    as an additive mask, in PyTorch's fused CPU flash attention, one call per chunk (tiles as its heads):
    measured 20-45% faster than batched matmuls and a softmax, and no logits in memory. An ``extra_bias`` joins the
    mask (which then holds a bias per query and extra token, batched if the bias is); a ``window_weight``
    adds one batched matmul of the weights spread over the spans with the values.

    A tile scores its queries against its whole span, so a non-finite key or value would reach the
    queries whose window does not hold it (a NaN logit plus -inf is NaN; 0 * NaN in P @ V), and then it
    makes their outputs non-finite: a fast output that is finite is the reference's (a key whose logits are
    all -inf leaks nothing). So the images whose output is not finite (found by a sum of the contiguous
    output, cheaper than summing the strided keys and values first) are computed again by the reference,
    which keeps each non-finite value in its windows."""
    out, lse = _forward(q, k, v, rpb, extra_k, extra_v, spec, extra_bias, window_weight, tile)
    faulty = _nonfinite_images((out,), ())
    if faulty is not None:
        q_i, k_i, v_i, extra_k_i, extra_v_i, window_weight_i = _images(faulty, q, k, v, extra_k, extra_v, window_weight)
        out[faulty], lse[faulty] = _reference_kernels().forward(q_i, k_i, v_i, rpb, extra_k_i, extra_v_i, spec,
                                                                _batched_images(faulty, extra_bias), window_weight_i)
    return out, lse


@torch.no_grad()
def backward(grad_out, q, k, v, rpb, extra_k, extra_v, out, lse, spec, needs_rpb_grad, needs_extra_grad,
             extra_bias=None, window_weight=None, needs_extra_bias_grad=False, needs_window_weight_grad=False,
             tile=None):
    """Gradients ``(dq, dk, dv, d_rpb, d_extra_k, d_extra_v, d_extra_bias, d_window_weight)`` (None where not
    asked for) from the forward's output (:func:`_chunked_backward`). Images with a non-finite
    query, key, value, output gradient or per-query bias / weight (whose NaN would reach the gradients of
    keys outside the windows) take the reference's backward, as in :func:`forward`. As there, such a value
    shows in the chunked backward's own gradients (it is a factor of a product that reaches a gradient of a
    query, key or value of its tile, whatever the probabilities: 0 * inf is NaN), so the inputs are searched
    only when a gradient is not finite."""
    needs_rpb_grad = rpb is not None and needs_rpb_grad
    needs_extra_grad = extra_k is not None and needs_extra_grad
    needs_extra_bias_grad = extra_bias is not None and needs_extra_bias_grad
    needs_window_weight_grad = window_weight is not None and needs_window_weight_grad
    batched_bias = extra_bias is not None and extra_bias.shape[0] == q.shape[0]
    flags = (needs_rpb_grad, needs_extra_grad, needs_extra_bias_grad, needs_window_weight_grad)
    chunked = _chunked_backward(grad_out, q, k, v, rpb, extra_k, extra_v, spec, extra_bias, window_weight, flags, tile)
    dq, dk, dv, d_rpb, d_extra_k, d_extra_v, d_extra_bias, d_window_weight = chunked
    if _nonfinite_images((dq, dk, dv, d_extra_k, d_extra_v, d_window_weight, d_extra_bias if batched_bias else None),
                         (d_rpb, None if batched_bias else d_extra_bias)) is None:
        return chunked
    faulty = _nonfinite_images((q, k, v, grad_out, window_weight, extra_bias if batched_bias else None),
                               (rpb, None if batched_bias else extra_bias))
    if faulty is None:   # finite inputs (the gradients overflowed): nothing to keep in its windows
        return chunked
    reference = _reference_kernels()
    grads = [torch.empty_like(q) for _ in range(3)] + [None] * 5
    for images, finite in ((~faulty, True), (faulty, False)):
        if not images.any():
            continue
        part = _images(images, grad_out, q, k, v, extra_k, extra_v, out, lse, window_weight)
        g_out, q_i, k_i, v_i, extra_k_i, extra_v_i, out_i, lse_i, window_weight_i = part
        extra_bias_i = _batched_images(images, extra_bias)
        if finite:
            part_grads = _chunked_backward(g_out, q_i, k_i, v_i, rpb, extra_k_i, extra_v_i, spec, extra_bias_i,
                                           window_weight_i, flags, tile)
        else:
            part_grads = reference.backward(g_out, q_i, k_i, v_i, rpb, extra_k_i, extra_v_i, out_i, lse_i, spec,
                                            needs_rpb_grad, needs_extra_grad, extra_bias_i, window_weight_i,
                                            needs_extra_bias_grad, needs_window_weight_grad)
        for index, grad in enumerate(part_grads):
            if grad is None:
                continue
            if index == 3 or (index == 6 and not batched_bias):   # shared by every image: gradients add up
                grads[index] = grad if grads[index] is None else grads[index] + grad
            else:
                if grads[index] is None:
                    grads[index] = grad.new_empty((q.shape[0],) + grad.shape[1:])
                grads[index][images] = grad
    return tuple(grads)


def _nonfinite_images(batched, shared):
    """``[B]`` bool: which images hold a non-finite value in one of the ``batched`` tensors (``[B, ...]``),
    every image if one of the ``shared`` ones does; None when all are finite (the usual case). Sums are
    cheap next to the attention; an overflowing sum of finite values only costs the slower path."""
    total = None
    for tensor in batched:
        if tensor is not None:
            sums = tensor.sum(tuple(range(1, tensor.dim())), dtype=torch.promote_types(tensor.dtype, torch.float32))
            total = sums if total is None else total + sums
    for tensor in shared:
        if tensor is not None:
            total = total + tensor.sum(dtype=torch.promote_types(tensor.dtype, torch.float32))
    faulty = ~torch.isfinite(total)
    return faulty if bool(faulty.any()) else None


def _images(images, *tensors):
    return [None if t is None else t[images] for t in tensors]


def _batched_images(images, extra_bias):
    """``extra_bias`` of some images: its own where it has a batch axis, else the one shared by all."""
    return extra_bias[images] if extra_bias is not None and extra_bias.shape[0] != 1 else extra_bias


def _reference_kernels():
    from .neighborhood import _ReferenceKernels   # the op's module imports this one
    return _ReferenceKernels
