"""Triton kernels of :func:`attnzoo.kernels.neighborhood_attention_2d` and their launchers.

Geometry. The map splits into ``dilation_h * dilation_w`` interleaved groups; inside a group the
window rule is the undilated one, so every kernel works in group coordinates (``pos' = pos //
dilation``) and a program owns a 2-D tile of one group. The window start is monotone in the query,
so the keys of a query tile form one rectangle (the tile plus a halo of ``kernel - 1``) and the
queries that see a key tile form another (its inverse neighborhood). Programs walk that rectangle
in blocks of ``BLOCK_ROWS`` rows by ``BLOCK_COLS`` (a power of two >= the rectangle's width)
columns and mask every (query, key) pair by the exact window rule.

Kernels:
- ``_forward_kernel``: per query tile, online softmax (base 2) over the window blocks and then the
  extra tokens (plus their per-query ``extra_bias``); writes the output and the log-sum-exp (base 2),
  no score matrix. A ``window_weight`` adds a second accumulator, ``sum_j w_j v_j`` over the same
  window blocks (the weights gathered by window position), to the normalised output.
- ``_backward_dq_kernel``: per query tile, recomputes the probabilities from the LSE; dQ, the
  softmax-backward term ``delta = rowsum(dO * O)`` (for the other kernels), the extra tokens' ``ds``
  as d_extra_bias and, when asked, each tile's partial d_rpb (summed over tiles by torch:
  deterministic, no atomics). With a window weight, O also holds ``sum_j w_j v_j``, which is not
  attention: a first pass over the window and the extra tokens computes ``dO . v_j`` (d_window_weight) and
  delta as ``sum_j p_j (dO . v_j)``, before the main pass (whose rpb histogram needs the final delta);
  ``rowsum(dO * O)`` less ``sum_j w_j (dO . v_j)`` would cancel in fp16 / bf16, where O is rounded.
- ``_backward_dkdv_kernel``: per key tile, loops over its inverse neighborhood; dK, dV (dV from the
  probabilities plus the window weights).
- ``_backward_extra_kernel``: per block of extra tokens, loops over every query of the image;
  d_extra_k, d_extra_v.
"""
import contextlib

import torch
import triton
import triton.language as tl

from ._dispatch import batch_chunks, dot_precision, needs_wide_offsets, triton_interpreted

LOG2E = 1.4426950408889634
LOG2E_IN_KERNEL = tl.constexpr(LOG2E)  # kernels read only constexpr globals
MIN_DOT = 16          # smallest tl.dot dimension on GPUs
EXTRA_BLOCK = 32      # extra (global) tokens per block
OP_NAME = 'neighborhood_attention_2d'


# ----------------------------------------------------------------------------- geometry helpers


@triton.jit
def _window_start(pos, group_len, KERNEL: tl.constexpr, CLAMP: tl.constexpr):
    """First key of the window of the query at ``pos`` (group coordinates); < 0 for a zero border."""
    start = pos - KERNEL // 2
    if CLAMP:
        start = tl.minimum(tl.maximum(start, 0), group_len - KERNEL)
    return start


@triton.jit
def _key_span(first, last, group_len, KERNEL: tl.constexpr, CLAMP: tl.constexpr):
    """Keys ``[lo, hi)`` inside the map seen by any of the queries ``first..last``."""
    lo = tl.maximum(_window_start(first, group_len, KERNEL, CLAMP), 0)
    hi = tl.minimum(_window_start(last, group_len, KERNEL, CLAMP) + KERNEL, group_len)
    return lo, hi


@triton.jit
def _query_span(first, last, group_len, KERNEL: tl.constexpr, CLAMP: tl.constexpr):
    """Queries ``[lo, hi)`` whose window holds any of the keys ``first..last``.

    Unclamped, key ``j`` is seen by the queries ``j - (KERNEL - 1 - KERNEL // 2) .. j + KERNEL // 2``.
    A clamped window stops shifting at either border, so every query before the centre of the
    first window sees keys ``[0, KERNEL)`` and every query past the centre of the last window sees
    the last ``KERNEL`` keys.
    """
    lo = tl.maximum(first - (KERNEL - 1 - KERNEL // 2), 0)
    hi = tl.minimum(last + KERNEL // 2, group_len - 1)
    if CLAMP:
        lo = tl.where(first < KERNEL, 0, lo)
        hi = tl.where(last >= group_len - KERNEL, group_len - 1, hi)
    return lo, hi + 1


@triton.jit
def _tile_of(pid, height, width, dil_h, dil_w, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Dilation group, first row / column (group coordinates) and group size of tile ``pid``."""
    tiles_x = tl.cdiv(tl.cdiv(width, dil_w), TILE_W)
    tiles_y = tl.cdiv(tl.cdiv(height, dil_h), TILE_H)
    tile_x = pid % tiles_x
    tile_y = (pid // tiles_x) % tiles_y
    group = pid // (tiles_x * tiles_y)
    group_y = group // dil_w
    group_x = group % dil_w
    len_y = (height - group_y + dil_h - 1) // dil_h
    len_x = (width - group_x + dil_w - 1) // dil_w
    return group_y, group_x, tile_y * TILE_H, tile_x * TILE_W, len_y, len_x


@triton.jit
def _image_and_head(pid_bh, heads, WIDE: tl.constexpr):
    """Image (64-bit: the batch offset always is) and head of program ``pid_bh`` of the batch * heads axis;
    the head 64-bit too where ``WIDE``: ``h * s_h`` spans the image when the heads are not the last axes."""
    h = pid_bh % heads
    if WIDE:
        h = h.to(tl.int64)
    return (pid_bh // heads).to(tl.int64), h


@triton.jit
def _tile_tokens(y0, x0, len_y, len_x, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Group coordinates of a tile's TILE_H x TILE_W tokens (row-major) and which lie inside the group."""
    offs = tl.arange(0, TILE_H * TILE_W)
    ys = y0 + offs // TILE_W
    xs = x0 + offs % TILE_W
    return ys, xs, (ys < len_y) & (xs < len_x)


@triton.jit
def _token_offsets(rows, cols, group_y, group_x, dil_h, dil_w, s_y, s_x, s_d, offs_d, WIDE: tl.constexpr):
    """Element offsets of a ``[tokens, BLOCK_D]`` tile at group coordinates (rows, cols) of one image and
    head; 64-bit where one image spans 2**31 elements or more (``WIDE``), 32-bit (cheaper) otherwise."""
    y = rows * dil_h + group_y
    x = cols * dil_w + group_x
    if WIDE:
        y = y.to(tl.int64)
        x = x.to(tl.int64)
    return y[:, None] * s_y + x[:, None] * s_x + offs_d[None, :] * s_d


@triton.jit
def _load_tokens(base, rows, cols, group_y, group_x, dil_h, dil_w, s_y, s_x, s_d, valid, offs_d,
                 HEAD_DIM: tl.constexpr, AS_F32: tl.constexpr, WIDE: tl.constexpr):
    """``[tokens, BLOCK_D]`` tile of the map tokens at group coordinates (rows, cols)."""
    offs = _token_offsets(rows, cols, group_y, group_x, dil_h, dil_w, s_y, s_x, s_d, offs_d, WIDE)
    tile = tl.load(base + offs, mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if AS_F32:  # the interpreter's bf16 tl.dot is wrong
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _load_extra(base, idx, n_extra, s_l, s_d, offs_d, HEAD_DIM: tl.constexpr, AS_F32: tl.constexpr):
    tile = tl.load(base + idx[:, None] * s_l + offs_d[None, :] * s_d,
                   mask=(idx[:, None] < n_extra) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if AS_F32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _in_window(q_y, q_x, win_y, win_x, k_y, k_x, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr):
    """Whether each key is in each query's window (arguments broadcast to a [queries, keys] grid)."""
    return (k_y >= win_y) & (k_y < win_y + KERNEL_H) & (k_x >= win_x) & (k_x < win_x + KERNEL_W)


@triton.jit
def _window_weight_offsets(q_y, q_x, win_y, win_x, k_y, k_x, group_y, group_x, dil_h, dil_w, s_y, s_x, s_j,
                           KERNEL_W: tl.constexpr, WIDE: tl.constexpr):
    """Offsets of ``window_weight[query, window position of key]`` (arguments broadcast to a grid); the
    position is row-major in the query's window, in group coordinates."""
    y = q_y * dil_h + group_y
    x = q_x * dil_w + group_x
    if WIDE:
        y = y.to(tl.int64)
        x = x.to(tl.int64)
    return y * s_y + x * s_x + ((k_y - win_y) * KERNEL_W + (k_x - win_x)) * s_j


@triton.jit
def _extra_bias_offsets(q_y, q_x, group_y, group_x, dil_h, dil_w, idx, s_y, s_x, s_l, WIDE: tl.constexpr):
    """Offsets of ``extra_bias[query, extra token]`` inside one image and head (arguments broadcast)."""
    y = q_y * dil_h + group_y
    x = q_x * dil_w + group_x
    if WIDE:
        y = y.to(tl.int64)
        x = x.to(tl.int64)
    return y * s_y + x * s_x + idx * s_l


@triton.jit
def _rpb_coord(y, x, KERNEL_W: tl.constexpr):
    """Linear position in a row-major rpb table: a key's minus a query's is the pair's table offset."""
    return y * (2 * KERNEL_W - 1) + x


@triton.jit
def _rpb_bias(rpb_base, q_coord, k_coord, mask, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr):
    """Relative position bias of each (query, key) pair (coords broadcast to a grid), scaled to base 2."""
    centre = (KERNEL_H - 1) * (2 * KERNEL_W - 1) + KERNEL_W - 1
    return tl.load(rpb_base + centre + (k_coord - q_coord), mask=mask, other=0.0).to(tl.float32) * LOG2E_IN_KERNEL


@triton.jit
def _rpb_histogram(ds, q_y, q_x, row0, col0, BLOCK_M: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                   BLOCK_COLS: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr,
                   BIAS_H: tl.constexpr, BIAS_W: tl.constexpr):
    """``[BIAS_H, BIAS_W]`` sums of ``ds`` (zero outside the windows) per relative-position-bias entry.

    The block's keys are ``BLOCK_ROWS`` rows of ``BLOCK_COLS`` columns from (row0, col0). Per
    query, the bias column of a key is its column minus the query's, so a gather along the key
    columns lines every query's keys up by bias column; the bias row depends only on (query row,
    key row) and a one-hot matmul sums those into the bias rows.
    """
    ds = tl.reshape(ds, (BLOCK_M, BLOCK_ROWS, BLOCK_COLS))
    bias_col = tl.arange(0, BIAS_W)
    key_col = bias_col[None, None, :] - (KERNEL_W - 1) + q_x[:, None, None] - col0
    key_col = tl.broadcast_to(key_col, (BLOCK_M, BLOCK_ROWS, BIAS_W))
    in_block = (key_col >= 0) & (key_col < BLOCK_COLS)
    by_bias_col = tl.where(in_block, tl.gather(ds, tl.where(in_block, key_col, 0), axis=2), 0.0)
    bias_row = row0 + tl.arange(0, BLOCK_ROWS)[None, :, None] - q_y[:, None, None] + KERNEL_H - 1
    one_hot = (bias_row == tl.arange(0, BIAS_H)[None, None, :]).to(tl.float32)
    one_hot = tl.reshape(one_hot, (BLOCK_M * BLOCK_ROWS, BIAS_H))
    by_bias_col = tl.reshape(by_bias_col, (BLOCK_M * BLOCK_ROWS, BIAS_W))
    return tl.dot(tl.trans(one_hot), by_bias_col, input_precision='ieee')


@triton.jit
def _store_drpb_partial(drpb_ptr, drpb, pid_bh, pid_tile, drpb_tiles, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr,
                        BIAS_H: tl.constexpr, BIAS_W: tl.constexpr):
    """Stores a dQ program's ``(2k-1) x (2k-1)`` rpb-gradient histogram (padded to BIAS_H x BIAS_W) into its own
    slot of the per-tile partials, which the launcher sums (deterministic: no atomics)."""
    bias_y = tl.arange(0, BIAS_H)[:, None]
    bias_x = tl.arange(0, BIAS_W)[None, :]
    offs = (pid_bh.to(tl.int64) * drpb_tiles + pid_tile) * (2 * KERNEL_H - 1) * (2 * KERNEL_W - 1)
    tl.store(drpb_ptr + offs + bias_y * (2 * KERNEL_W - 1) + bias_x, drpb,
             mask=(bias_y < 2 * KERNEL_H - 1) & (bias_x < 2 * KERNEL_W - 1))


@triton.jit
def _finite_part(x, mask, acc):
    """``x`` (``[tokens, D]``, the right operand of a dot whose left one, ``[rows, tokens]``, is zero outside
    ``mask``) with its non-finite entries zeroed, and ``acc`` (``[rows, D]``) NaN where a row's ``mask`` holds
    one: a masked token's NaN / Inf never meets a zero weight (0 * NaN), an unmasked one still makes its row
    non-finite, as in the reference. Only blocks holding a non-finite value pay for it."""
    bad = ~(tl.abs(x.to(tl.float32)) < float('inf'))
    if tl.max(tl.max(bad.to(tl.int32), 1), 0) > 0:
        hits = tl.dot(mask.to(tl.float32), bad.to(tl.float32), input_precision='ieee')
        acc = tl.where(hits > 0, float('nan'), acc)
        x = tl.where(bad, tl.zeros_like(x), x)
    return x, acc


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Folds one block of base-2 logits ``s`` (-inf where masked) and its values into (m, l, acc)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float('-inf'), 0.0, m_new)  # rows with nothing unmasked yet stay at 0
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _extra_softmax(q, q_y, q_x, q_valid, m_i, l_i, acc, ek_base, ev_base, eb_base, n_extra, qk_scale, group_y,
                   group_x, dil_h, dil_w, sek_l, sek_d, sev_l, sev_d, seb_y, seb_x, seb_l, offs_d,
                   HEAD_DIM: tl.constexpr, HAS_EXTRA_BIAS: tl.constexpr, AS_F32: tl.constexpr, WIDE: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_E: tl.constexpr):
    """Folds the extra tokens (plus their per-query ``extra_bias``) into the online softmax (m, l, acc)."""
    offs_e = tl.arange(0, BLOCK_E)
    for e0 in range(0, n_extra, BLOCK_E):
        ek = _load_extra(ek_base, e0 + offs_e, n_extra, sek_l, sek_d, offs_d, HEAD_DIM, AS_F32)
        ev = _load_extra(ev_base, e0 + offs_e, n_extra, sev_l, sev_d, offs_d, HEAD_DIM, AS_F32)
        s = tl.dot(q, tl.trans(ek), input_precision=PRECISION) * qk_scale
        e_valid = (e0 + offs_e < n_extra)[None, :]
        if HAS_EXTRA_BIAS:
            eb_offs = _extra_bias_offsets(q_y[:, None], q_x[:, None], group_y, group_x, dil_h, dil_w,
                                          (e0 + offs_e)[None, :], seb_y, seb_x, seb_l, WIDE)
            s += tl.load(eb_base + eb_offs, mask=e_valid & q_valid[:, None], other=0.0).to(tl.float32) \
                * LOG2E_IN_KERNEL
        s = tl.where(e_valid, s, float('-inf'))
        m_i, l_i, acc = _online_softmax_step(s, ev, m_i, l_i, acc, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _extra_probabilities(q, do, lse, e0, q_y, q_x, q_valid, ek_base, ev_base, eb_base, n_extra, qk_scale, group_y,
                         group_x, dil_h, dil_w, sek_l, sek_d, sev_l, sev_d, seb_y, seb_x, seb_l, offs_d,
                         HEAD_DIM: tl.constexpr, HAS_EXTRA_BIAS: tl.constexpr, AS_F32: tl.constexpr,
                         WIDE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr):
    """The block of extra tokens from ``e0``: their probabilities, ``dO . v_e``, keys and mask (per query)."""
    offs_e = e0 + tl.arange(0, BLOCK_E)
    ek = _load_extra(ek_base, offs_e, n_extra, sek_l, sek_d, offs_d, HEAD_DIM, AS_F32)
    ev = _load_extra(ev_base, offs_e, n_extra, sev_l, sev_d, offs_d, HEAD_DIM, AS_F32)
    s = tl.dot(q, tl.trans(ek), input_precision=PRECISION) * qk_scale
    mask = (offs_e < n_extra)[None, :] & q_valid[:, None]
    if HAS_EXTRA_BIAS:
        eb_offs = _extra_bias_offsets(q_y[:, None], q_x[:, None], group_y, group_x, dil_h, dil_w, offs_e[None, :],
                                      seb_y, seb_x, seb_l, WIDE)
        s += tl.load(eb_base + eb_offs, mask=mask, other=0.0).to(tl.float32) * LOG2E_IN_KERNEL
    p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(ev), input_precision=PRECISION)
    return p, dp, ek, mask


@triton.jit
def _extra_delta(delta, q, do, lse, q_y, q_x, q_valid, ek_base, ev_base, eb_base, n_extra, qk_scale, group_y, group_x,
                 dil_h, dil_w, sek_l, sek_d, sev_l, sev_d, seb_y, seb_x, seb_l, offs_d, HEAD_DIM: tl.constexpr,
                 HAS_EXTRA_BIAS: tl.constexpr, AS_F32: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    """Adds the extra tokens' share of delta, ``sum_e p_e (dO . v_e)``."""
    for e0 in range(0, n_extra, BLOCK_E):
        p, dp, _, _ = _extra_probabilities(q, do, lse, e0, q_y, q_x, q_valid, ek_base, ev_base, eb_base, n_extra,
                                           qk_scale, group_y, group_x, dil_h, dil_w, sek_l, sek_d, sev_l, sev_d,
                                           seb_y, seb_x, seb_l, offs_d, HEAD_DIM, HAS_EXTRA_BIAS, AS_F32, WIDE,
                                           PRECISION, BLOCK_E)
        delta += tl.sum(p * dp, 1)
    return delta


@triton.jit
def _extra_dq(q, do, lse, delta, dq, q_y, q_x, q_valid, ek_base, ev_base, eb_base, deb_base, n_extra, qk_scale,
              group_y, group_x, dil_h, dil_w, sek_l, sek_d, sev_l, sev_d, seb_y, seb_x, seb_l, sdeb_y, sdeb_x, sdeb_l,
              offs_d, HEAD_DIM: tl.constexpr, HAS_EXTRA_BIAS: tl.constexpr, EXTRA_BIAS_GRAD: tl.constexpr,
              AS_F32: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_E: tl.constexpr):
    """dQ's part from the extra tokens; stores their ``ds`` as d_extra_bias when asked."""
    for e0 in range(0, n_extra, BLOCK_E):
        p, dp, ek, mask = _extra_probabilities(q, do, lse, e0, q_y, q_x, q_valid, ek_base, ev_base, eb_base, n_extra,
                                               qk_scale, group_y, group_x, dil_h, dil_w, sek_l, sek_d, sev_l, sev_d,
                                               seb_y, seb_x, seb_l, offs_d, HEAD_DIM, HAS_EXTRA_BIAS, AS_F32, WIDE,
                                               PRECISION, BLOCK_E)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(ek.dtype), ek, input_precision=PRECISION)
        if EXTRA_BIAS_GRAD:   # the bias adds to the logit: its gradient is ds itself
            deb_offs = _extra_bias_offsets(q_y[:, None], q_x[:, None], group_y, group_x, dil_h, dil_w,
                                           (e0 + tl.arange(0, BLOCK_E))[None, :], sdeb_y, sdeb_x, sdeb_l, WIDE)
            tl.store(deb_base + deb_offs, ds, mask=mask)
    return dq


@triton.jit
def _dkdv_block(k, v, k_y, k_x, k_valid, k_coord, q_y, q_x, q_valid, dk, dv, q_base, do_base, lse_ptr, delta_ptr,
                stat_base, rpb_base, ww_base, qk_scale, group_y, group_x, dil_h, dil_w, len_y, len_x, width,
                sq_y, sq_x, sq_d, sdo_y, sdo_x, sdo_d, sww_y, sww_x, sww_j, offs_d,
                HEAD_DIM: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, CLAMP: tl.constexpr,
                HAS_RPB: tl.constexpr, HAS_WW: tl.constexpr, AS_F32: tl.constexpr, WIDE: tl.constexpr,
                PRECISION: tl.constexpr):
    """Adds one block of queries (group coordinates q_y, q_x) to a key tile's dK, dV (unscaled). A query that does
    not see a key adds exactly zero to it: ds is selected, and q / dO enter through ``_finite_part``."""
    q = _load_tokens(q_base, q_y, q_x, group_y, group_x, dil_h, dil_w, sq_y, sq_x, sq_d, q_valid, offs_d,
                     HEAD_DIM, AS_F32, WIDE)
    do = _load_tokens(do_base, q_y, q_x, group_y, group_x, dil_h, dil_w, sdo_y, sdo_x, sdo_d, q_valid,
                      offs_d, HEAD_DIM, AS_F32, WIDE)
    stat_offs = stat_base + (q_y * dil_h + group_y) * width + q_x * dil_w + group_x
    lse = tl.load(lse_ptr + stat_offs, mask=q_valid, other=0.0)
    delta = tl.load(delta_ptr + stat_offs, mask=q_valid, other=0.0)
    win_y = _window_start(q_y, len_y, KERNEL_H, CLAMP)
    win_x = _window_start(q_x, len_x, KERNEL_W, CLAMP)
    mask = _in_window(q_y[None, :], q_x[None, :], win_y[None, :], win_x[None, :], k_y[:, None], k_x[:, None],
                      KERNEL_H, KERNEL_W) & q_valid[None, :] & k_valid[:, None]
    s = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale      # [keys, queries]
    if HAS_RPB:
        s += _rpb_bias(rpb_base, _rpb_coord(q_y, q_x, KERNEL_W)[None, :], k_coord[:, None], mask,
                       KERNEL_H, KERNEL_W)
    p = tl.where(mask, tl.exp2(s - lse[None, :]), 0.0)
    if HAS_WW:   # out += sum_j w_j v_j: v_j's gradient gains w_j dO
        ww_offs = _window_weight_offsets(q_y[None, :], q_x[None, :], win_y[None, :], win_x[None, :],
                                         k_y[:, None], k_x[:, None], group_y, group_x, dil_h, dil_w, sww_y,
                                         sww_x, sww_j, KERNEL_W, WIDE)
        weight = p + tl.load(ww_base + ww_offs, mask=mask, other=0.0).to(tl.float32)
    else:
        weight = p
    dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds = tl.where(mask, p * (dp - delta[None, :]), 0.0)
    do, dv = _finite_part(do, mask, dv)
    dv += tl.dot(weight.to(do.dtype), do, input_precision=PRECISION)
    q, dk = _finite_part(q, mask, dk)
    dk += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_program(q_ptr, do_ptr, rpb_ptr, ww_ptr, sq_b, sq_h, sdo_b, sdo_h, sww_b, sww_h, heads, height, width, dil_h,
                  dil_w, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                  WIDE: tl.constexpr):
    """A dK / dV program's image and head, its key tile (``_tile_of``'s six values) and where its loop over the
    queries reads: the bases of q, dO, the statistics (LSE, delta), rpb and window weights."""
    pid_bh = tl.program_id(1)
    b, h = _image_and_head(pid_bh, heads, WIDE)
    group_y, group_x, y0, x0, len_y, len_x = _tile_of(tl.program_id(0), height, width, dil_h, dil_w, TILE_H, TILE_W)
    return (b, h, group_y, group_x, y0, x0, len_y, len_x, q_ptr + b * sq_b + h * sq_h, do_ptr + b * sdo_b + h * sdo_h,
            pid_bh.to(tl.int64) * height * width, rpb_ptr + h * (2 * KERNEL_H - 1) * (2 * KERNEL_W - 1),
            ww_ptr + b * sww_b + h * sww_h)


@triton.jit
def _store_dkdv(dk_ptr, dv_ptr, dk, dv, scale, b, h, k_y, k_x, k_valid, group_y, group_x, dil_h, dil_w, sg_b, sg_y,
                sg_x, sg_h, sg_d, offs_d, HEAD_DIM: tl.constexpr, WIDE: tl.constexpr):
    """Stores a key tile's dK (``dk`` unscaled) and dV."""
    offs = b * sg_b + h * sg_h + _token_offsets(k_y, k_x, group_y, group_x, dil_h, dil_w, sg_y, sg_x, sg_d, offs_d,
                                                WIDE)
    store_mask = k_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    tl.store(dk_ptr + offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=store_mask)


@triton.jit
def _finite_or_zero(x):
    """``x`` (float32) with its non-finite entries zeroed: what a product with a masked-out weight must see."""
    x = x.to(tl.float32)
    return tl.where((x == x) & (tl.abs(x) != float('inf')), x, 0.0)


# ----------------------------------------------------------------------------- kernels


def _block_cols(args):
    """Columns of a block of the other side: a power of two covering the tile plus its halo."""
    return max(MIN_DOT, triton.next_power_of_2(args['TILE_W'] + args['KERNEL_W'] - 1))


@triton.jit(do_not_specialize=['size_class'])
def _forward_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, rpb_ptr, ek_ptr, ev_ptr, eb_ptr, ww_ptr,
        sq_b, sq_y, sq_x, sq_h, sq_d, sk_b, sk_y, sk_x, sk_h, sk_d, sv_b, sv_y, sv_x, sv_h, sv_d,
        so_b, so_y, so_x, so_h, so_d, sek_b, sek_l, sek_h, sek_d, sev_b, sev_l, sev_h, sev_d,
        seb_b, seb_h, seb_y, seb_x, seb_l, sww_b, sww_y, sww_x, sww_h, sww_j,
        heads, height, width, dil_h, dil_w, size_class, n_extra, qk_scale,
        HEAD_DIM: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, CLAMP: tl.constexpr,
        HAS_RPB: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_EXTRA_BIAS: tl.constexpr, HAS_WW: tl.constexpr,
        AS_F32: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    BLOCK_M: tl.constexpr = TILE_H * TILE_W
    pid_bh = tl.program_id(1)
    b, h = _image_and_head(pid_bh, heads, WIDE)
    group_y, group_x, y0, x0, len_y, len_x = _tile_of(tl.program_id(0), height, width, dil_h, dil_w, TILE_H, TILE_W)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_ROWS * BLOCK_COLS)
    q_y, q_x, q_valid = _tile_tokens(y0, x0, len_y, len_x, TILE_H, TILE_W)
    q = _load_tokens(q_ptr + b * sq_b + h * sq_h, q_y, q_x, group_y, group_x, dil_h, dil_w, sq_y, sq_x, sq_d,
                     q_valid, offs_d, HEAD_DIM, AS_F32, WIDE)
    win_y = _window_start(q_y, len_y, KERNEL_H, CLAMP)
    win_x = _window_start(q_x, len_x, KERNEL_W, CLAMP)
    row_lo, row_hi = _key_span(y0, tl.minimum(y0 + TILE_H, len_y) - 1, len_y, KERNEL_H, CLAMP)
    col_lo, col_hi = _key_span(x0, tl.minimum(x0 + TILE_W, len_x) - 1, len_x, KERNEL_W, CLAMP)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    ww_base = ww_ptr + b * sww_b + h * sww_h
    rpb_base = rpb_ptr + h * (2 * KERNEL_H - 1) * (2 * KERNEL_W - 1)
    q_coord = _rpb_coord(q_y, q_x, KERNEL_W)

    m_i = tl.full((BLOCK_M,), float('-inf'), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    acc_ww = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)   # sum_j w_j v_j, added after the normalisation
    for row0 in range(row_lo, row_hi, BLOCK_ROWS):
        for col0 in range(col_lo, col_hi, BLOCK_COLS):
            k_y = row0 + offs_n // BLOCK_COLS
            k_x = col0 + offs_n % BLOCK_COLS
            k_valid = (k_y < row_hi) & (k_x < col_hi)
            k = _load_tokens(k_base, k_y, k_x, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, k_valid, offs_d,
                             HEAD_DIM, AS_F32, WIDE)
            v = _load_tokens(v_base, k_y, k_x, group_y, group_x, dil_h, dil_w, sv_y, sv_x, sv_d, k_valid, offs_d,
                             HEAD_DIM, AS_F32, WIDE)
            # padding queries of a partial tile lie outside the map: their rpb offsets fall outside the table
            mask = _in_window(q_y[:, None], q_x[:, None], win_y[:, None], win_x[:, None], k_y[None, :], k_x[None, :],
                              KERNEL_H, KERNEL_W) & k_valid[None, :] & q_valid[:, None]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            if HAS_RPB:
                s += _rpb_bias(rpb_base, q_coord[:, None], _rpb_coord(k_y, k_x, KERNEL_W)[None, :], mask,
                               KERNEL_H, KERNEL_W)
            s = tl.where(mask, s, float('-inf'))
            v, acc = _finite_part(v, mask, acc)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION)
            if HAS_WW:
                ww_offs = _window_weight_offsets(q_y[:, None], q_x[:, None], win_y[:, None], win_x[:, None],
                                                 k_y[None, :], k_x[None, :], group_y, group_x, dil_h, dil_w, sww_y,
                                                 sww_x, sww_j, KERNEL_W, WIDE)
                ww = tl.load(ww_base + ww_offs, mask=mask, other=0.0).to(tl.float32)
                acc_ww += tl.dot(ww.to(v.dtype), v, input_precision=PRECISION)
    if HAS_EXTRA:
        m_i, l_i, acc = _extra_softmax(q, q_y, q_x, q_valid, m_i, l_i, acc, ek_ptr + b * sek_b + h * sek_h,
                                       ev_ptr + b * sev_b + h * sev_h, eb_ptr + b * seb_b + h * seb_h, n_extra,
                                       qk_scale, group_y, group_x, dil_h, dil_w, sek_l, sek_d, sev_l, sev_d, seb_y,
                                       seb_x, seb_l, offs_d, HEAD_DIM, HAS_EXTRA_BIAS, AS_F32, WIDE, PRECISION,
                                       BLOCK_E)

    l_i = tl.where(l_i == 0, 1.0, l_i)  # only padding queries of partial tiles see no key; a NaN stays
    out = acc / l_i[:, None]
    if HAS_WW:
        out += acc_ww
    o_offs = _token_offsets(q_y, q_x, group_y, group_x, dil_h, dil_w, so_y, so_x, so_d, offs_d, WIDE)
    tl.store(o_ptr + b * so_b + h * so_h + o_offs, out.to(o_ptr.dtype.element_ty),
             mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM))
    lse_offs = (q_y * dil_h + group_y) * width + q_x * dil_w + group_x
    tl.store(lse_ptr + pid_bh.to(tl.int64) * height * width + lse_offs, m_i + tl.log2(l_i), mask=q_valid)


@triton.jit
def _dq_block(q, do, lse, k_base, v_base, rpb_base, q_y, q_x, q_valid, q_coord, win_y, win_x, k_y, k_x, k_valid,
              qk_scale, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, sv_y, sv_x, sv_d, offs_d,
              KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, HAS_RPB: tl.constexpr, HEAD_DIM: tl.constexpr,
              AS_F32: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr):
    """A block of a query tile's key rectangle, as both dQ passes need it: its keys, the window mask, the
    probabilities (from the LSE) and ``dO . v``."""
    k = _load_tokens(k_base, k_y, k_x, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, k_valid, offs_d, HEAD_DIM,
                     AS_F32, WIDE)
    v = _load_tokens(v_base, k_y, k_x, group_y, group_x, dil_h, dil_w, sv_y, sv_x, sv_d, k_valid, offs_d, HEAD_DIM,
                     AS_F32, WIDE)
    mask = _in_window(q_y[:, None], q_x[:, None], win_y[:, None], win_x[:, None], k_y[None, :], k_x[None, :],
                      KERNEL_H, KERNEL_W) & k_valid[None, :] & q_valid[:, None]
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if HAS_RPB:
        s += _rpb_bias(rpb_base, q_coord[:, None], _rpb_coord(k_y, k_x, KERNEL_W)[None, :], mask, KERNEL_H, KERNEL_W)
    p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return k, mask, p, dp


@triton.jit(do_not_specialize=['size_class'])
def _backward_dq_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, rpb_ptr, drpb_ptr, ek_ptr, ev_ptr,
        eb_ptr, deb_ptr, ww_ptr, dww_ptr,
        sq_b, sq_y, sq_x, sq_h, sq_d, sk_b, sk_y, sk_x, sk_h, sk_d, sv_b, sv_y, sv_x, sv_h, sv_d,
        so_b, so_y, so_x, so_h, so_d, sdo_b, sdo_y, sdo_x, sdo_h, sdo_d,
        sek_b, sek_l, sek_h, sek_d, sev_b, sev_l, sev_h, sev_d, sg_b, sg_y, sg_x, sg_h, sg_d,
        seb_b, seb_h, seb_y, seb_x, seb_l, sdeb_b, sdeb_h, sdeb_y, sdeb_x, sdeb_l,
        sww_b, sww_y, sww_x, sww_h, sww_j,
        heads, height, width, dil_h, dil_w, size_class, n_extra, qk_scale, scale, drpb_tiles,
        HEAD_DIM: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, CLAMP: tl.constexpr,
        HAS_RPB: tl.constexpr, RPB_GRAD: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_EXTRA_BIAS: tl.constexpr,
        EXTRA_BIAS_GRAD: tl.constexpr, HAS_WW: tl.constexpr, WW_GRAD: tl.constexpr, AS_F32: tl.constexpr,
        WIDE: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BIAS_H: tl.constexpr,
        BIAS_W: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    BLOCK_M: tl.constexpr = TILE_H * TILE_W
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = _image_and_head(pid_bh, heads, WIDE)
    group_y, group_x, y0, x0, len_y, len_x = _tile_of(pid_tile, height, width, dil_h, dil_w, TILE_H, TILE_W)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_ROWS * BLOCK_COLS)
    q_y, q_x, q_valid = _tile_tokens(y0, x0, len_y, len_x, TILE_H, TILE_W)
    q = _load_tokens(q_ptr + b * sq_b + h * sq_h, q_y, q_x, group_y, group_x, dil_h, dil_w, sq_y, sq_x, sq_d,
                     q_valid, offs_d, HEAD_DIM, AS_F32, WIDE)
    do = _load_tokens(do_ptr + b * sdo_b + h * sdo_h, q_y, q_x, group_y, group_x, dil_h, dil_w, sdo_y, sdo_x,
                      sdo_d, q_valid, offs_d, HEAD_DIM, AS_F32, WIDE)
    win_y = _window_start(q_y, len_y, KERNEL_H, CLAMP)
    win_x = _window_start(q_x, len_x, KERNEL_W, CLAMP)
    row_lo, row_hi = _key_span(y0, tl.minimum(y0 + TILE_H, len_y) - 1, len_y, KERNEL_H, CLAMP)
    col_lo, col_hi = _key_span(x0, tl.minimum(x0 + TILE_W, len_x) - 1, len_x, KERNEL_W, CLAMP)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    rpb_base = rpb_ptr + h * (2 * KERNEL_H - 1) * (2 * KERNEL_W - 1)
    q_coord = _rpb_coord(q_y, q_x, KERNEL_W)
    stat_offs = pid_bh.to(tl.int64) * height * width + (q_y * dil_h + group_y) * width + q_x * dil_w + group_x
    lse = tl.load(lse_ptr + stat_offs, mask=q_valid, other=0.0)
    if HAS_WW:
        # O holds sum_j w_j v_j besides the attention, which the softmax backward must not see: delta =
        # sum_j p_j (dO . v_j) over the window and the extra tokens (O less that sum cancels in fp16 / bf16). The
        # same dO . v_j are d_window_weight. A pass of its own: the rpb histogram of the main pass needs delta.
        dww_base = dww_ptr + b * sww_b + h * sww_h
        delta = tl.zeros((BLOCK_M,), tl.float32)
        for row0 in range(row_lo, row_hi, BLOCK_ROWS):
            for col0 in range(col_lo, col_hi, BLOCK_COLS):
                k_y = row0 + offs_n // BLOCK_COLS
                k_x = col0 + offs_n % BLOCK_COLS
                _, mask, p, dp = _dq_block(q, do, lse, k_base, v_base, rpb_base, q_y, q_x, q_valid, q_coord, win_y,
                                           win_x, k_y, k_x, (k_y < row_hi) & (k_x < col_hi), qk_scale, group_y,
                                           group_x, dil_h, dil_w, sk_y, sk_x, sk_d, sv_y, sv_x, sv_d, offs_d,
                                           KERNEL_H, KERNEL_W, HAS_RPB, HEAD_DIM, AS_F32, WIDE, PRECISION)
                delta += tl.sum(tl.where(mask, p * dp, 0.0), 1)
                if WW_GRAD:
                    ww_offs = _window_weight_offsets(q_y[:, None], q_x[:, None], win_y[:, None], win_x[:, None],
                                                     k_y[None, :], k_x[None, :], group_y, group_x, dil_h, dil_w,
                                                     sww_y, sww_x, sww_j, KERNEL_W, WIDE)
                    tl.store(dww_base + ww_offs, dp.to(dww_ptr.dtype.element_ty), mask=mask)
        if HAS_EXTRA:
            delta = _extra_delta(delta, q, do, lse, q_y, q_x, q_valid, ek_ptr + b * sek_b + h * sek_h,
                                 ev_ptr + b * sev_b + h * sev_h, eb_ptr + b * seb_b + h * seb_h, n_extra, qk_scale,
                                 group_y, group_x, dil_h, dil_w, sek_l, sek_d, sev_l, sev_d, seb_y, seb_x, seb_l,
                                 offs_d, HEAD_DIM, HAS_EXTRA_BIAS, AS_F32, WIDE, PRECISION, BLOCK_E)
    else:
        o = _load_tokens(o_ptr + b * so_b + h * so_h, q_y, q_x, group_y, group_x, dil_h, dil_w, so_y, so_x, so_d,
                         q_valid, offs_d, HEAD_DIM, True, WIDE)
        delta = tl.sum(o * do.to(tl.float32), 1)
    tl.store(delta_ptr + stat_offs, delta, mask=q_valid)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    drpb = tl.zeros((BIAS_H, BIAS_W), tl.float32)
    for row0 in range(row_lo, row_hi, BLOCK_ROWS):
        for col0 in range(col_lo, col_hi, BLOCK_COLS):
            k_y = row0 + offs_n // BLOCK_COLS
            k_x = col0 + offs_n % BLOCK_COLS
            k, mask, p, dp = _dq_block(q, do, lse, k_base, v_base, rpb_base, q_y, q_x, q_valid, q_coord, win_y, win_x,
                                       k_y, k_x, (k_y < row_hi) & (k_x < col_hi), qk_scale, group_y, group_x, dil_h,
                                       dil_w, sk_y, sk_x, sk_d, sv_y, sv_x, sv_d, offs_d, KERNEL_H, KERNEL_W, HAS_RPB,
                                       HEAD_DIM, AS_F32, WIDE, PRECISION)
            ds = tl.where(mask, p * (dp - delta[:, None]), 0.0)
            k, dq = _finite_part(k, mask, dq)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
            if RPB_GRAD:
                drpb += _rpb_histogram(ds, q_y, q_x, row0, col0, BLOCK_M, BLOCK_ROWS, BLOCK_COLS, KERNEL_H, KERNEL_W,
                                       BIAS_H, BIAS_W)
    if HAS_EXTRA:
        dq = _extra_dq(q, do, lse, delta, dq, q_y, q_x, q_valid, ek_ptr + b * sek_b + h * sek_h,
                       ev_ptr + b * sev_b + h * sev_h, eb_ptr + b * seb_b + h * seb_h, deb_ptr + b * sdeb_b + h * sdeb_h,
                       n_extra, qk_scale, group_y, group_x, dil_h, dil_w, sek_l, sek_d, sev_l, sev_d, seb_y, seb_x,
                       seb_l, sdeb_y, sdeb_x, sdeb_l, offs_d, HEAD_DIM, HAS_EXTRA_BIAS, EXTRA_BIAS_GRAD, AS_F32, WIDE,
                       PRECISION, BLOCK_E)

    dq_offs = _token_offsets(q_y, q_x, group_y, group_x, dil_h, dil_w, sg_y, sg_x, sg_d, offs_d, WIDE)
    tl.store(dq_ptr + b * sg_b + h * sg_h + dq_offs, (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM))
    if RPB_GRAD:
        _store_drpb_partial(drpb_ptr, drpb, pid_bh, pid_tile, drpb_tiles, KERNEL_H, KERNEL_W, BIAS_H, BIAS_W)


@triton.jit(do_not_specialize=['size_class'])
def _backward_dkdv_kernel(
        q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, rpb_ptr, ww_ptr,
        sq_b, sq_y, sq_x, sq_h, sq_d, sk_b, sk_y, sk_x, sk_h, sk_d, sv_b, sv_y, sv_x, sv_h, sv_d,
        sdo_b, sdo_y, sdo_x, sdo_h, sdo_d, sg_b, sg_y, sg_x, sg_h, sg_d, sww_b, sww_y, sww_x, sww_h, sww_j,
        heads, height, width, dil_h, dil_w, size_class, qk_scale, scale,
        HEAD_DIM: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, CLAMP: tl.constexpr,
        HAS_RPB: tl.constexpr, HAS_WW: tl.constexpr, AS_F32: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    BLOCK_N: tl.constexpr = TILE_H * TILE_W
    b, h, group_y, group_x, y0, x0, len_y, len_x, q_base, do_base, stat_base, rpb_base, ww_base = _dkdv_program(
        q_ptr, do_ptr, rpb_ptr, ww_ptr, sq_b, sq_h, sdo_b, sdo_h, sww_b, sww_h, heads, height, width, dil_h, dil_w,
        KERNEL_H, KERNEL_W, TILE_H, TILE_W, WIDE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_ROWS * BLOCK_COLS)
    k_y, k_x, k_valid = _tile_tokens(y0, x0, len_y, len_x, TILE_H, TILE_W)
    k = _load_tokens(k_ptr + b * sk_b + h * sk_h, k_y, k_x, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d,
                     k_valid, offs_d, HEAD_DIM, AS_F32, WIDE)
    v = _load_tokens(v_ptr + b * sv_b + h * sv_h, k_y, k_x, group_y, group_x, dil_h, dil_w, sv_y, sv_x, sv_d,
                     k_valid, offs_d, HEAD_DIM, AS_F32, WIDE)
    row_lo, row_hi = _query_span(y0, tl.minimum(y0 + TILE_H, len_y) - 1, len_y, KERNEL_H, CLAMP)
    col_lo, col_hi = _query_span(x0, tl.minimum(x0 + TILE_W, len_x) - 1, len_x, KERNEL_W, CLAMP)
    k_coord = _rpb_coord(k_y, k_x, KERNEL_W)

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for row0 in range(row_lo, row_hi, BLOCK_ROWS):
        for col0 in range(col_lo, col_hi, BLOCK_COLS):
            q_y = row0 + offs_m // BLOCK_COLS
            q_x = col0 + offs_m % BLOCK_COLS
            q_valid = (q_y < row_hi) & (q_x < col_hi)
            dk, dv = _dkdv_block(k, v, k_y, k_x, k_valid, k_coord, q_y, q_x, q_valid, dk, dv, q_base, do_base, lse_ptr,
                                 delta_ptr, stat_base, rpb_base, ww_base, qk_scale, group_y, group_x, dil_h, dil_w,
                                 len_y, len_x, width, sq_y, sq_x, sq_d, sdo_y, sdo_x, sdo_d, sww_y, sww_x, sww_j,
                                 offs_d, HEAD_DIM, KERNEL_H, KERNEL_W, CLAMP, HAS_RPB, HAS_WW, AS_F32, WIDE, PRECISION)

    _store_dkdv(dk_ptr, dv_ptr, dk, dv, scale, b, h, k_y, k_x, k_valid, group_y, group_x, dil_h, dil_w, sg_b, sg_y,
                sg_x, sg_h, sg_d, offs_d, HEAD_DIM, WIDE)


@triton.jit
def _backward_extra_kernel(
        q_ptr, do_ptr, lse_ptr, delta_ptr, ek_ptr, ev_ptr, dek_ptr, dev_ptr, eb_ptr,
        sq_b, sq_y, sq_x, sq_h, sq_d, sdo_b, sdo_y, sdo_x, sdo_h, sdo_d,
        sek_b, sek_l, sek_h, sek_d, sev_b, sev_l, sev_h, sev_d, sg_b, sg_l, sg_h, sg_d,
        seb_b, seb_h, seb_y, seb_x, seb_l,
        heads, height, width, n_extra, qk_scale, scale,
        HEAD_DIM: tl.constexpr, HAS_EXTRA_BIAS: tl.constexpr, AS_F32: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_bh = tl.program_id(1)
    b, h = _image_and_head(pid_bh, heads, WIDE)
    offs_e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    ek = _load_extra(ek_ptr + b * sek_b + h * sek_h, offs_e, n_extra, sek_l, sek_d, offs_d, HEAD_DIM, AS_F32)
    ev = _load_extra(ev_ptr + b * sev_b + h * sev_h, offs_e, n_extra, sev_l, sev_d, offs_d, HEAD_DIM, AS_F32)
    q_base = q_ptr + b * sq_b + h * sq_h
    do_base = do_ptr + b * sdo_b + h * sdo_h
    eb_base = eb_ptr + b * seb_b + h * seb_h
    stat_base = pid_bh.to(tl.int64) * height * width

    dek = tl.zeros((BLOCK_E, BLOCK_D), tl.float32)
    dev = tl.zeros((BLOCK_E, BLOCK_D), tl.float32)
    for m0 in range(0, height * width, BLOCK_M):
        token = m0 + offs_m
        q_valid = token < height * width
        q = _load_tokens(q_base, token // width, token % width, 0, 0, 1, 1, sq_y, sq_x, sq_d, q_valid, offs_d,
                         HEAD_DIM, AS_F32, WIDE)
        do = _load_tokens(do_base, token // width, token % width, 0, 0, 1, 1, sdo_y, sdo_x, sdo_d, q_valid, offs_d,
                          HEAD_DIM, AS_F32, WIDE)
        lse = tl.load(lse_ptr + stat_base + token, mask=q_valid, other=0.0)
        delta = tl.load(delta_ptr + stat_base + token, mask=q_valid, other=0.0)
        s = tl.dot(ek, tl.trans(q), input_precision=PRECISION) * qk_scale      # [extra, queries]
        mask = (offs_e < n_extra)[:, None] & q_valid[None, :]
        if HAS_EXTRA_BIAS:
            eb_offs = _extra_bias_offsets((token // width)[None, :], (token % width)[None, :], 0, 0, 1, 1,
                                          offs_e[:, None], seb_y, seb_x, seb_l, WIDE)
            s += tl.load(eb_base + eb_offs, mask=mask, other=0.0).to(tl.float32) * LOG2E_IN_KERNEL
        p = tl.where(mask, tl.exp2(s - lse[None, :]), 0.0)
        dev += tl.dot(p.to(do.dtype), do, input_precision=PRECISION)
        dp = tl.dot(ev, tl.trans(do), input_precision=PRECISION)
        ds = p * (dp - delta[None, :])
        dek += tl.dot(ds.to(q.dtype), q, input_precision=PRECISION)

    store_mask = (offs_e < n_extra)[:, None] & (offs_d[None, :] < HEAD_DIM)
    offs = b * sg_b + h * sg_h + offs_e[:, None] * sg_l + offs_d[None, :] * sg_d
    tl.store(dek_ptr + offs, (dek * scale).to(dek_ptr.dtype.element_ty), mask=store_mask)
    tl.store(dev_ptr + offs, dev.to(dev_ptr.dtype.element_ty), mask=store_mask)


# ----------------------------------------------------------------------------- tuning


# Every query / key tile shape, rows of the other side's block, warps and stages the tuner chooses from on a GPU.
TILE_CONFIGS = tuple(triton.Config({'TILE_H': tile_h, 'TILE_W': tile_w, 'BLOCK_ROWS': rows}, num_warps=warps,
                                   num_stages=stages)
                     for tile_h, tile_w in ((8, 8), (16, 8), (8, 16)) for rows in (1, 2) for warps in (4, 8)
                     for stages in (1, 2))
INTERPRETER_CONFIG = triton.Config({'TILE_H': 16, 'TILE_W': 8, 'BLOCK_ROWS': 4}, num_warps=4, num_stages=1)


def _tile_configs():
    """The configs to tune over: one in the interpreter, which cannot benchmark."""
    return [INTERPRETER_CONFIG] if triton_interpreted() else list(TILE_CONFIGS)


def _warps_for_tile(configs, named_args, **kwargs):
    """Warps per tile from ptxas spill counts for sm_90: 8 where the (queries x padded head dim)
    accumulators, or with float32 operands the scores of 32-column key blocks (windows of 11 and
    more), would spill on 4; 4 where they fit. The d_rpb histogram needs more registers, so the dQ
    kernel tries both when it runs."""
    float32 = named_args['q_ptr'].dtype == torch.float32

    def fits(config):
        big = config.kwargs['TILE_H'] * config.kwargs['TILE_W'] * kwargs['BLOCK_D'] >= 4096
        big = big or float32 and _block_cols(dict(config.kwargs, KERNEL_W=kwargs['KERNEL_W'])) >= 32
        return config.num_warps == 8 if big else config.num_warps == 4 or kwargs.get('RPB_GRAD', False)
    return [c for c in configs if fits(c)]


def _tuned(kernel, key, **autotune_options):
    return triton.autotune(_tile_configs(), key=key, prune_configs_by={'early_config_prune': _warps_for_tile},
                           **autotune_options)(triton.heuristics({'BLOCK_COLS': _block_cols})(kernel))


def size_class(batch, heads, height, width, dilation):
    """The tuning key's part of a call's size: what changes the best tile, each rounded up to a power of two,
    so a detector's or segmenter's next input size reuses a tuned config instead of benchmarking 12-24 again.
    The tile shape's fit depends on the dilation group's rows and columns, occupancy on the programs in
    flight (images * heads * tiles, counted in 64-token tiles and capped where any GPU is full)."""
    rows, cols = triton.cdiv(height, dilation[0]), triton.cdiv(width, dilation[1])
    programs = batch * heads * dilation[0] * dilation[1] * triton.cdiv(rows * cols, 64)
    rows, cols, programs = (triton.next_power_of_2(n).bit_length() for n in (rows, cols, min(programs, 2 ** 14)))
    return (rows * 32 + cols) * 32 + programs


TUNING_KEY = ['size_class', 'dil_h', 'dil_w', 'HEAD_DIM', 'KERNEL_H', 'KERNEL_W', 'CLAMP', 'HAS_RPB']
_FORWARD = _tuned(_forward_kernel, TUNING_KEY + ['HAS_EXTRA', 'HAS_EXTRA_BIAS', 'HAS_WW'])
_BACKWARD_DQ = _tuned(_backward_dq_kernel, TUNING_KEY + ['HAS_EXTRA', 'RPB_GRAD', 'HAS_EXTRA_BIAS', 'HAS_WW'],
                      reset_to_zero=['drpb_ptr'])
_BACKWARD_DKDV = _tuned(_backward_dkdv_kernel, TUNING_KEY + ['HAS_WW'])
TUNED_KERNELS = {'forward': _FORWARD, 'backward_dq': _BACKWARD_DQ, 'backward_dkdv': _BACKWARD_DKDV}


@contextlib.contextmanager
def forced_config(config, kernels=None):
    """Every tuned kernel of ``kernels`` (default: this module's; v2 passes its own) runs ``config`` (one of
    their configs) inside the block, untuned: how tools/gpu_check.py checks the configs the tuner would not
    pick on its shapes. Not thread-safe."""
    kernels = TUNED_KERNELS if kernels is None else kernels
    saved = {name: kernel.configs for name, kernel in kernels.items()}
    try:
        for kernel in kernels.values():
            kernel.configs = [config]
        yield
    finally:
        for name, kernel in kernels.items():
            kernel.configs = saved[name]


# ----------------------------------------------------------------------------- launchers


def _tiles(height, width, dilation, tile_h, tile_w):
    rows = triton.cdiv(triton.cdiv(height, dilation[0]), tile_h)
    cols = triton.cdiv(triton.cdiv(width, dilation[1]), tile_w)
    return dilation[0] * dilation[1] * rows * cols


def _common(q, spec, *tensors):
    """Compile-time parameters shared by every kernel of one call on ``q`` and ``tensors``."""
    kernel_h, kernel_w = spec.kernel_size
    return dict(
        HEAD_DIM=q.shape[-1], KERNEL_H=kernel_h, KERNEL_W=kernel_w, CLAMP=spec.border == 'clamp',
        AS_F32=triton_interpreted() and q.dtype == torch.bfloat16, WIDE=needs_wide_offsets(q, *tensors),
        PRECISION=dot_precision(q.dtype), BLOCK_D=max(MIN_DOT, triton.next_power_of_2(q.shape[-1])))


def _rows(tensor, rows):
    return tensor[rows] if tensor is not None else None


def _grid(spec, height, width, batch, heads):
    def grid(meta):
        return _tiles(height, width, spec.dilation, meta['TILE_H'], meta['TILE_W']), batch * heads
    return grid


def _full_extra_bias(extra_bias, q, extra_k):
    """``extra_bias`` (5-D, batch and heads possibly 1) as a ``[B, heads, H, W, L]`` view (stride 0 where
    broadcast): the kernels index it per (image, head) without a copy."""
    if extra_bias is None:
        return None
    batch, height, width, heads, _ = q.shape
    return extra_bias.expand(batch, heads, height, width, extra_k.shape[1])


def _or_placeholder(tensor, placeholder, dims):
    """``tensor`` and its strides, or a placeholder pointer and ``dims`` zero strides (the kernels do not
    read an absent input: its constexpr flag is off)."""
    return (tensor, tensor.stride()) if tensor is not None else (placeholder, (0,) * dims)


def forward(q, k, v, rpb, extra_k, extra_v, spec, extra_bias=None, window_weight=None, forward_kernel=_FORWARD,
            kernel_options=None):
    """Output ``[B, H, W, heads, D]`` (contiguous) and the base-2 log-sum-exp ``[B, heads, H, W]``.
    ``forward_kernel``: v1's or another with its arguments (``_neighborhood_triton_v2``) plus the keyword
    arguments ``kernel_options``."""
    batch, height, width, heads, _ = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, height, width), dtype=torch.float32, device=q.device)
    rpb = rpb.contiguous() if rpb is not None else None
    extra_bias = _full_extra_bias(extra_bias, q, extra_k)
    common = _common(q, spec, k, v, out, extra_bias, window_weight)
    for rows in batch_chunks(OP_NAME, batch, heads):   # batch * heads programs on grid axis y
        _forward_launch(q[rows], k[rows], v[rows], out[rows], lse[rows], rpb, _rows(extra_k, rows),
                        _rows(extra_v, rows), _rows(extra_bias, rows), _rows(window_weight, rows), spec, common,
                        forward_kernel, kernel_options or {})
    return out, lse


def _forward_launch(q, k, v, out, lse, rpb, extra_k, extra_v, extra_bias, window_weight, spec, common, kernel,
                    options):
    batch, height, width, heads, _ = q.shape
    ek, ev = (extra_k, extra_v) if extra_k is not None else (q[:, 0], q[:, 0])
    eb, eb_strides = _or_placeholder(extra_bias, q, 5)
    ww, ww_strides = _or_placeholder(window_weight, q, 5)
    kernel[_grid(spec, height, width, batch, heads)](
        q, k, v, out, lse, rpb if rpb is not None else q, ek, ev, eb, ww, *q.stride(), *k.stride(), *v.stride(),
        *out.stride(), *ek.stride(), *ev.stride(), *eb_strides, *ww_strides,
        heads, height, width, *spec.dilation, size_class(batch, heads, height, width, spec.dilation),
        extra_k.shape[1] if extra_k is not None else 0, spec.scale * LOG2E,
        HAS_RPB=rpb is not None, HAS_EXTRA=extra_k is not None, HAS_EXTRA_BIAS=extra_bias is not None,
        HAS_WW=window_weight is not None, BLOCK_E=EXTRA_BLOCK, **common, **options)


def backward(grad_out, q, k, v, rpb, extra_k, extra_v, out, lse, spec, needs_rpb_grad, needs_extra_grad,
             extra_bias=None, window_weight=None, needs_extra_bias_grad=False, needs_window_weight_grad=False,
             dq_kernel=_BACKWARD_DQ, dkdv_kernel=_BACKWARD_DKDV, dq_options=None):
    """Gradients ``(dq, dk, dv, d_rpb, d_extra_k, d_extra_v, d_extra_bias, d_window_weight)``; None where not
    asked for. ``dq_kernel``, ``dkdv_kernel``: v1's or others with their arguments (``_neighborhood_triton_v2``),
    the dQ kernel's plus the keyword arguments ``dq_options``."""
    batch, height, width, heads, _ = q.shape
    kernel_h, kernel_w = spec.kernel_size
    rpb = rpb.contiguous() if rpb is not None else None
    rpb_grad = rpb is not None and needs_rpb_grad
    extra_grad = extra_k is not None and needs_extra_grad
    bias_shape = extra_bias.shape if extra_bias is not None else None
    extra_bias = _full_extra_bias(extra_bias, q, extra_k)
    # the window weight's gradient shares its (contiguous) strides; positions outside the map stay zero
    window_weight = window_weight.contiguous() if window_weight is not None else None
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    delta = torch.empty_like(lse)
    # one slot per (image, head, tile) for the config with the most tiles; unused slots stay zero (a
    # placeholder per image without rpb gradient: the autotuner zeroes it between its trial runs)
    drpb_tiles = max(_tiles(height, width, spec.dilation, c.kwargs['TILE_H'], c.kwargs['TILE_W'])
                     for c in dq_kernel.configs) if rpb_grad else 0
    drpb_partial = torch.zeros((batch, heads, drpb_tiles, 2 * kernel_h - 1, 2 * kernel_w - 1) if rpb_grad
                               else (batch, 1), dtype=torch.float32, device=q.device)
    d_extra_k = torch.empty(extra_k.shape, dtype=q.dtype, device=q.device) if extra_grad else None
    d_extra_v = torch.empty(extra_v.shape, dtype=q.dtype, device=q.device) if extra_grad else None
    # per query, float32; summed over the dimensions the bias broadcasts over below
    d_extra_bias = (torch.empty(extra_bias.shape, dtype=torch.float32, device=q.device)
                    if extra_bias is not None and needs_extra_bias_grad else None)
    d_window_weight = (torch.zeros_like(window_weight) if window_weight is not None and needs_window_weight_grad
                       else None)
    common = _common(q, spec, k, v, out, grad_out, dq, extra_bias, d_extra_bias, window_weight)
    for rows in batch_chunks(OP_NAME, batch, heads):   # batch * heads programs on grid axis y
        _backward_launch(grad_out[rows], q[rows], k[rows], v[rows], out[rows], lse[rows], delta[rows], dq[rows],
                         dk[rows], dv[rows], rpb, drpb_partial[rows], rpb_grad, drpb_tiles,
                         _rows(extra_k, rows), _rows(extra_v, rows), _rows(d_extra_k, rows), _rows(d_extra_v, rows),
                         _rows(extra_bias, rows), _rows(d_extra_bias, rows), _rows(window_weight, rows),
                         _rows(d_window_weight, rows), spec, common, dq_kernel, dkdv_kernel, dq_options or {})
    d_rpb = drpb_partial.sum((0, 2)).to(rpb.dtype) if rpb_grad else None
    if d_extra_bias is not None:
        broadcast = tuple(dim for dim in (0, 1) if bias_shape[dim] == 1 and d_extra_bias.shape[dim] != 1)
        d_extra_bias = d_extra_bias.sum(broadcast, keepdim=True) if broadcast else d_extra_bias
        d_extra_bias = d_extra_bias.to(extra_bias.dtype).contiguous()
    return dq, dk, dv, d_rpb, d_extra_k, d_extra_v, d_extra_bias, d_window_weight


def _backward_launch(grad_out, q, k, v, out, lse, delta, dq, dk, dv, rpb, drpb_partial, rpb_grad, drpb_tiles, extra_k,
                     extra_v, d_extra_k, d_extra_v, extra_bias, d_extra_bias, window_weight, d_window_weight, spec,
                     common, dq_kernel, dkdv_kernel, dq_options):
    batch, height, width, heads, _ = q.shape
    kernel_h, kernel_w = spec.kernel_size
    rpb_arg = rpb if rpb is not None else q
    ek, ev = (extra_k, extra_v) if extra_k is not None else (q[:, 0], q[:, 0])
    eb, eb_strides = _or_placeholder(extra_bias, q, 5)
    deb, deb_strides = _or_placeholder(d_extra_bias, q, 5)
    ww, ww_strides = _or_placeholder(window_weight, q, 5)
    dww = d_window_weight if d_window_weight is not None else ww
    n_extra = extra_k.shape[1] if extra_k is not None else 0
    grid = _grid(spec, height, width, batch, heads)
    tune_size = size_class(batch, heads, height, width, spec.dilation)
    dq_kernel[grid](
        q, k, v, out, grad_out, lse, delta, dq, rpb_arg, drpb_partial, ek, ev, eb, deb, ww, dww,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *ek.stride(), *ev.stride(),
        *dq.stride(), *eb_strides, *deb_strides, *ww_strides,
        heads, height, width, *spec.dilation, tune_size, n_extra, spec.scale * LOG2E, spec.scale, drpb_tiles,
        HAS_RPB=rpb is not None, RPB_GRAD=rpb_grad, HAS_EXTRA=extra_k is not None,
        HAS_EXTRA_BIAS=extra_bias is not None, EXTRA_BIAS_GRAD=d_extra_bias is not None,
        HAS_WW=window_weight is not None, WW_GRAD=d_window_weight is not None,
        BLOCK_E=EXTRA_BLOCK, BIAS_H=max(MIN_DOT, triton.next_power_of_2(2 * kernel_h - 1)),
        BIAS_W=max(MIN_DOT, triton.next_power_of_2(2 * kernel_w - 1)), **common, **dq_options)
    dkdv_kernel[grid](
        q, k, v, grad_out, lse, delta, dk, dv, rpb_arg, ww,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *ww_strides,
        heads, height, width, *spec.dilation, tune_size, spec.scale * LOG2E, spec.scale, HAS_RPB=rpb is not None,
        HAS_WW=window_weight is not None, **common)
    if d_extra_k is not None:
        _backward_extra_kernel[(triton.cdiv(n_extra, EXTRA_BLOCK), batch * heads)](
            q, grad_out, lse, delta, extra_k, extra_v, d_extra_k, d_extra_v, eb,
            *q.stride(), *grad_out.stride(), *extra_k.stride(), *extra_v.stride(), *d_extra_k.stride(), *eb_strides,
            heads, height, width, n_extra, spec.scale * LOG2E, spec.scale, HAS_EXTRA_BIAS=extra_bias is not None,
            BLOCK_E=EXTRA_BLOCK, BLOCK_M=64,
            **{name: common[name] for name in ('HEAD_DIM', 'AS_F32', 'WIDE', 'PRECISION', 'BLOCK_D')})
