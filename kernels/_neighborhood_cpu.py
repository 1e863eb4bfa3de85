"""Neighborhood attention on CPU: query tiles against the union of their windows, as batched matmuls.

The reference gathers every query's ``kh x kw`` window (a ``kh * kw``-fold copy of K and V whose
backward scatters token by token). Here the map is cut into tiles of ``tile_h x tile_w`` queries;
the windows of one tile's queries all lie inside a ``(tile_h + kh - 1) x (tile_w + kw - 1)`` block
of keys (its *span*), so each tile is one small dense attention: ``q_tile @ k_span^T``, a mask for
the window / border rule and the relative position bias added, softmax (over the window and the
extra tokens together), ``@ v_span``. Spans start every ``tile`` tokens on a zero-padded map, so
they are strided views (``unfold``) and their backward is a fold, not a scatter. Dilation splits
each axis into ``d`` interleaved groups, each an undilated problem, handled as a batch dimension.

Per query this computes ``span_h * span_w`` logits instead of ``kh * kw`` (about 2.5x at k = 7);
in exchange every step is a dense batched matmul or a strided copy, which is what a CPU is fast at.
Memory is linear in the map: K / V spans are ``span / tile`` copies per axis of K / V, logits are
``span_h * span_w`` per query (the reference stores ``kh * kw * head_dim`` per query for K and V).

Differentiable through autograd of the copies, matmuls and softmax; the bias gather's backward
is a ``scatter_add`` into the small ``rpb`` table.
"""
import functools
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


def axis_tiling(length, kernel, dilation, border, tile):
    """The cheapest tiling of one axis with at least ``tile`` queries per tile, counting
    ``query slots * span`` (logits per row of tiles): either each dilation group as one tile whose
    span is the whole group, or tiles of ``t >= tile`` queries and spans of ``t + kernel - 1`` keys.
    For ``border="clamp"`` the padding slots are placed so that the shifted windows at both borders
    stay inside their spans (:func:`_covers_clamped_windows`)."""
    group_length, shortest = -(-length // dilation), length // dilation
    best = AxisTiling(length, kernel, dilation, group_length, group_length, 1, group_length, 0, 0)
    cost = group_length * group_length
    for t in range(tile, group_length):
        for query_pad in range(t if border == 'clamp' else 1):
            tiles = -(-(group_length + query_pad) // t)
            if tiles * t * (t + kernel - 1) >= cost:
                continue
            if border == 'clamp' and not _covers_clamped_windows(kernel, t, tiles, query_pad, group_length, shortest):
                continue
            best = AxisTiling(length, kernel, dilation, group_length, t, tiles, t + kernel - 1, query_pad,
                              query_pad + kernel // 2)
            cost = tiles * t * (t + kernel - 1)
    return best


def _axis_windows(axis: AxisTiling, border):
    """``inside`` (``[groups, tiles, tile, span]``: key slot in the query slot's window) and the
    relative-position-bias row of every (query slot, key slot), ``key' - query' + kernel - 1``.

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
    return inside, bias_row


@functools.lru_cache(maxsize=128)
def _tables(rows: AxisTiling, cols: AxisTiling, border, device):
    """Per-tile additive mask (0 inside the window, -inf outside) ``[gh, gw, nh, nw, T, S]`` and the
    flat rpb index of every logit (``row * (2 kw - 1) + col``; one past the table outside the window)."""
    inside_r, bias_r = _axis_windows(rows, border)
    inside_c, bias_c = _axis_windows(cols, border)

    def outer(op, a, b):   # [gh, nh, th, sh] x [gw, nw, tw, sw] -> [gh, gw, nh, nw, th * tw, sh * sw]
        out = op(a[:, None, :, None, :, None, :, None], b[None, :, None, :, None, :, None, :])
        return out.reshape(*out.shape[:4], rows.tile * cols.tile, rows.span * cols.span)

    inside = outer(torch.logical_and, inside_r, inside_c)
    mask = torch.zeros(inside.shape).masked_fill_(~inside, float('-inf'))
    bias_index = outer(torch.add, bias_r * (2 * cols.kernel - 1), bias_c)
    bias_index = bias_index.masked_fill_(~inside, (2 * rows.kernel - 1) * (2 * cols.kernel - 1))
    return mask.to(device), bias_index.flatten().to(device)


def _grouped(x, rows: AxisTiling, cols: AxisTiling):
    """``[B, H, W, heads, D]`` -> ``[B, heads, gh, gw, Lh, Lw, D]`` (a view unless the map needs padding
    to a multiple of the dilation): dilation group ``g`` of an axis holds positions ``g, g + d, ...``."""
    batch, height, width, heads, head_dim = x.shape
    pad_h, pad_w = rows.groups * rows.group_length - height, cols.groups * cols.group_length - width
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, 0, 0, pad_w, 0, pad_h))
    x = x.view(batch, rows.group_length, rows.groups, cols.group_length, cols.groups, heads, head_dim)
    return x.permute(0, 5, 2, 4, 1, 3, 6)


def _query_tiles(q, rows, cols):
    """``[B * heads * tiles, T, D]``: every tile's queries (a copy), padded slots zero."""
    x = _grouped(q, rows, cols)
    pads = (0, 0, cols.query_pad, cols.query_pad_after, rows.query_pad, rows.query_pad_after)
    if any(pads):
        x = F.pad(x, pads)
    batch, heads, head_dim = q.shape[0], q.shape[3], q.shape[4]
    x = x.reshape(batch, heads, rows.groups, cols.groups, rows.tiles, rows.tile, cols.tiles, cols.tile, head_dim)
    x = x.transpose(5, 6)
    return x.reshape(-1, rows.tile * cols.tile, head_dim)


class _KeySpans(torch.autograd.Function):
    """Every tile's span of keys, ``[B, heads, gh, gw, Lh, Lw, D]`` -> ``[B * heads * tiles, S, D]``
    (zero keys around each group, a copy of overlapping windows). The backward adds the span
    gradients back block by block: spans start every ``tile`` keys, so their ``tile x tile`` blocks
    land on a regular grid and ``ceil(span / tile) ** 2`` strided additions replace
    ``unfold``'s generic backward (measured 5x slower here)."""

    @staticmethod
    def forward(ctx, x, rows: AxisTiling, cols: AxisTiling):
        ctx.rows, ctx.cols, ctx.shape = rows, cols, x.shape
        pads = (0, 0, cols.key_pad, cols.key_pad_after, rows.key_pad, rows.key_pad_after)
        if any(pads):
            x = F.pad(x, pads)
        x = x.unfold(4, rows.span, rows.tile).unfold(5, cols.span, cols.tile)   # [B, heads, gh, gw, nh, nw, D, sh, sw]
        return x.permute(0, 1, 2, 3, 4, 5, 7, 8, 6).reshape(-1, rows.span * cols.span, x.shape[6])

    @staticmethod
    def backward(ctx, grad):
        rows, cols = ctx.rows, ctx.cols
        batch, heads, groups_h, groups_w, _, _, head_dim = ctx.shape
        blocks_h, blocks_w = -(-rows.span // rows.tile), -(-cols.span // cols.tile)
        # [.., nh, sh, nw, sw, D]: span key s of tile i sits at padded position i * tile + s
        grad = grad.view(batch, heads, groups_h, groups_w, rows.tiles, cols.tiles, rows.span, cols.span, head_dim)
        grad = grad.transpose(5, 6)
        padded = grad.new_zeros(batch, heads, groups_h, groups_w, (rows.tiles + blocks_h - 1) * rows.tile,
                                (cols.tiles + blocks_w - 1) * cols.tile, head_dim)
        for block_h in range(blocks_h):
            size_h = min(rows.tile, rows.span - block_h * rows.tile)
            for block_w in range(blocks_w):
                size_w = min(cols.tile, cols.span - block_w * cols.tile)
                target = padded[:, :, :, :, block_h * rows.tile:(block_h + rows.tiles) * rows.tile,
                                block_w * cols.tile:(block_w + cols.tiles) * cols.tile]
                target = target.unflatten(5, (cols.tiles, cols.tile)).unflatten(4, (rows.tiles, rows.tile))
                target[..., :size_h, :, :size_w, :] += grad[..., block_h * rows.tile:block_h * rows.tile + size_h, :,
                                                            block_w * cols.tile:block_w * cols.tile + size_w, :]
        lh, lw = rows.group_length, cols.group_length
        return padded[:, :, :, :, rows.key_pad:rows.key_pad + lh, cols.key_pad:cols.key_pad + lw], None, None


def _key_spans(k, rows, cols):
    """``[B * heads * tiles, S, D]``: every tile's span of keys (a copy of strided windows)."""
    return _KeySpans.apply(_grouped(k, rows, cols), rows, cols)


def _untile(out, q_shape, rows, cols):
    """``[B * heads * tiles, T, D]`` -> ``[B, H, W, heads, D]``."""
    batch, height, width, heads, head_dim = q_shape
    out = out.view(batch, heads, rows.groups, cols.groups, rows.tiles, cols.tiles, rows.tile, cols.tile, head_dim)
    out = out.permute(0, 4, 6, 2, 5, 7, 3, 1, 8)     # [B, nh, th, gh, nw, tw, gw, heads, D]
    out = out.reshape(batch, rows.tiles * rows.tile * rows.groups, cols.tiles * cols.tile * cols.groups, heads,
                      head_dim)
    # slot p of group g holds map position (p - query_pad) * d + g
    top, left = rows.query_pad * rows.groups, cols.query_pad * cols.groups
    return out[:, top:top + height, left:left + width]


def default_tile(kernel):
    """Queries per tile along an axis for a window of ``kernel``: measured on CPU (tools/benchmark.py cpu)."""
    return max(kernel // 2 + 1, 4)


def neighborhood_attention_2d_cpu(q, k, v, kernel_size, dilation, scale, rpb=None, border='clamp', extra_k=None,
                                  extra_v=None, tile=None):
    """Tiled neighborhood attention; arguments as :func:`neighborhood_attention_2d_reference`, already
    validated (``kernel_size`` and ``dilation`` pairs, ``scale`` a float). ``tile``: queries per tile
    ``(rows, cols)``, :func:`default_tile` per axis when None."""
    batch, height, width, heads, head_dim = q.shape
    if tile is None:
        tile = (default_tile(kernel_size[0]), default_tile(kernel_size[1]))
    rows = axis_tiling(height, kernel_size[0], dilation[0], border, tile[0])
    cols = axis_tiling(width, kernel_size[1], dilation[1], border, tile[1])
    mask, bias_index = _tables(rows, cols, border, q.device)

    queries = _query_tiles(q, rows, cols) * scale
    keys, values = _key_spans(k, rows, cols), _key_spans(v, rows, cols)
    mask = mask.flatten(0, 3)                                   # [tiles, T, S]
    logits = torch.bmm(queries, keys.transpose(1, 2)).view(batch, heads, *mask.shape)
    if rpb is not None:
        # masked logits index the -inf entry appended to every head's table
        table = torch.cat([rpb.flatten(1), rpb.new_full((heads, 1), float('-inf'))], 1)
        bias = table.gather(1, bias_index.expand(heads, -1)).view(heads, *mask.shape)
    else:
        bias = mask
    logits = logits + bias   # a float32 rpb promotes bf16 / fp16 logits, as in the reference
    if extra_k is not None:
        queries_flat = queries.view(batch, heads, -1, head_dim)                    # [B, heads, tiles * T, D]
        extra_logits = torch.matmul(queries_flat, extra_k.permute(0, 2, 3, 1))
        logits = torch.cat([logits.view(batch, heads, -1, logits.shape[-1]), extra_logits.to(logits.dtype)], -1)
    probs = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(q.dtype)
    span = rows.span * cols.span
    window_probs = probs[..., :span].reshape(-1, rows.tile * cols.tile, span)
    out = torch.bmm(window_probs, values)
    if extra_k is not None:
        out = out + torch.matmul(probs[..., span:], extra_v.transpose(1, 2)).view(out.shape)
    return _untile(out, q.shape, rows, cols)
