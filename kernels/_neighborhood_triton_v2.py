"""Version 2 of the Triton kernels of :func:`attnzoo.kernels.neighborhood_attention_2d`: banded.

Geometry (group coordinates, as v1: dilation splits the map into interleaved groups). A program owns
an 8 x 8 query tile and walks it in bands of ``BAND`` (2) rows x 8 columns. The window start is
monotone in the query and grows by at most one per step, so every window of a band lies inside a
rectangle of ``KEY_ROWS = kernel_h + BAND - 1`` rows x ``KEY_COLS = kernel_w + TILE_W - 1`` columns,
at the window start of the band's first query (clamped or not: the same rule). The rectangle's
keys, flattened row-major, are scored in at most three power-of-two pieces (``band_pieces``), so a
band scores ``KEY_ROWS * KEY_COLS`` keys rounded up to a multiple of 16 instead of a power-of-two
padded rectangle (at k 7: 112 keys for a window of 49, v1's 8 x 8 tile: 224).

Interior and border bands. In an interior band (``_band_is_interior``: every query inside its group and
its whole window too, so no window is shifted by a clamped border nor cut by a zero one) the window
mask and the rpb of each (query, rectangle key) pair are the same for every band: the launcher
precomputes them once per call as the window table (``window_table``: per head, ``BAND * TILE_W``
queries x the pieces' keys, base-2 rpb inside a window and -inf outside), which such a band reads
with one coalesced load per piece. Border bands compute the mask and gather the rpb per pair.

- ``_forward_kernel``: per band, every piece's logits, then one exact softmax over them (no online
  rescale inside the window), then the extra tokens with the online step (their count is a runtime
  value); ``window_weight``'s sum in the same pass. v1's launcher runs it with v1's forward kernel's
  arguments plus the window table.
- ``_backward_dq_kernel``: per band and piece, the probabilities from the LSE, dQ, with a window weight
  delta as ``sum_j p_j (dO . v_j)`` (as v1) and d_window_weight, the rpb-gradient histogram per band (one-hot
  products, deterministic); v1's launcher, arguments and the window table.
- ``_backward_dkdv_kernel``: per band of 2 x 8 keys, one flat loop over the queries that see them, in
  chunks of the smallest forward piece (interior bands: the forward's count of logits; clamped border
  bands: their larger inverse neighbourhood); v1's launcher and arguments.
- The extra tokens' gradients: v1's kernel. Everything is launched by v1's ``backward``.

Non-finite values stay where they belong: masked logits are selected away (``tl.where``, never an
added ``-inf``), and values / keys enter the products with their non-finite entries zeroed, so a NaN
or Inf of a key outside a query's window cannot reach it through ``0 * NaN``; a query whose window
holds a non-finite value gets NaN.
"""
import functools

import torch
import triton
import triton.language as tl

from . import _neighborhood_triton as v1
from ._dispatch import triton_interpreted
from ._neighborhood_triton import (LOG2E, MIN_DOT, TUNING_KEY, _dkdv_block, _dkdv_program, _extra_delta, _extra_dq,
                                   _extra_softmax, _finite_or_zero, _finite_part, _image_and_head, _in_window,
                                   _load_tokens, _query_span, _rpb_bias, _rpb_coord, _store_dkdv, _store_drpb_partial,
                                   _tile_of, _tile_tokens, _token_offsets, _window_start, _window_weight_offsets)

TILE_H, TILE_W = 8, 8     # queries of a program
BAND = 2                  # query rows of a band: BAND * TILE_W = 16 queries, the smallest tl.dot M
MAX_PIECES = 3
WINDOW_TABLE_DTYPE = torch.float32


def band_keys(kernel_h, kernel_w, band=BAND, tile_w=TILE_W):
    """Rows and columns of the key rectangle that holds every window of a band."""
    return kernel_h + band - 1, kernel_w + tile_w - 1


@functools.lru_cache(maxsize=None)   # the heuristics ask on every launch
def band_pieces(kernel_h, kernel_w, band=BAND, tile_w=TILE_W, max_pieces=MAX_PIECES):
    """Sizes of the pieces (powers of two >= 16, largest first, at most ``max_pieces``) that cover a band's
    ``rows * cols`` keys with the fewest scored keys (fewer pieces where equal)."""
    rows, cols = band_keys(kernel_h, kernel_w, band, tile_w)
    total = rows * cols
    best = [triton.next_power_of_2(max(total, MIN_DOT))]
    sizes = [MIN_DOT << i for i in range(triton.next_power_of_2(total).bit_length())]

    def search(left, chosen):
        nonlocal best
        if left <= 0:
            if (sum(chosen), len(chosen)) < (sum(best), len(best)):
                best = list(chosen)
            return
        if len(chosen) < max_pieces:
            for size in sizes:
                if not chosen or size <= chosen[-1]:
                    search(left - size, chosen + [size])
    search(total, [])
    return tuple(best)


def _band_meta(args):
    rows, cols = band_keys(args['KERNEL_H'], args['KERNEL_W'], args['BAND'], args['TILE_W'])
    pieces = band_pieces(args['KERNEL_H'], args['KERNEL_W'], args['BAND'], args['TILE_W'])
    pieces = pieces + (0,) * (MAX_PIECES - len(pieces))
    return dict(KEY_ROWS=rows, KEY_COLS=cols, PIECE_1=pieces[0], PIECE_2=pieces[1], PIECE_3=pieces[2],
                QUERY_CHUNK=min(p for p in pieces if p), TABLE_KEYS=sum(pieces))


def window_table(rpb, kernel_size, device, band=BAND, tile_w=TILE_W):
    """The interior bands' window mask and rpb, precomputed once per call: ``[heads, band * tile_w, keys]`` (one
    head, shared, without rpb), float32 (``WINDOW_TABLE_DTYPE``). Per query of a band (row-major) and key of its
    rectangle (row-major, the pieces' keys in a row), the base-2 rpb (zero without rpb) where the key is in the
    query's window, -inf where not.

    In an interior band every window starts ``kernel // 2`` before its query, as the rectangle starts at the
    band's first query's window: query (r, c) of the band sees the rectangle's rows r .. r + kernel_h - 1 and
    columns c .. c + kernel_w - 1, and the key ``kernel // 2`` rows and columns before a key position of
    the window is the query itself. An rpb of -inf is kept in its window as the smallest finite float32 (a zero
    probability either way)."""
    kernel_h, kernel_w = kernel_size
    rows, cols = band_keys(kernel_h, kernel_w, band, tile_w)
    key = torch.arange(sum(band_pieces(kernel_h, kernel_w, band, tile_w)), device=device)
    query = torch.arange(band * tile_w, device=device)
    dy = (key // cols)[None, :] - (query // tile_w)[:, None]     # the key's row in the query's window
    dx = (key % cols)[None, :] - (query % tile_w)[:, None]
    in_window = (key < rows * cols) & (dy >= 0) & (dy < kernel_h) & (dx >= 0) & (dx < kernel_w)
    if rpb is None:
        bias = torch.zeros((1,) + in_window.shape, dtype=WINDOW_TABLE_DTYPE, device=device)
    else:   # rpb[h, key - query + kernel - 1] per axis, scaled to base 2 as the kernels' _rpb_bias does
        rpb_y = (dy + kernel_h - 1 - kernel_h // 2).clamp(0, 2 * kernel_h - 2)
        rpb_x = (dx + kernel_w - 1 - kernel_w // 2).clamp(0, 2 * kernel_w - 2)
        bias = rpb[:, rpb_y, rpb_x].to(WINDOW_TABLE_DTYPE) * LOG2E
        bias = bias.clamp_min(torch.finfo(WINDOW_TABLE_DTYPE).min)
    return torch.where(in_window, bias, float('-inf')).contiguous()


def _table_options(rpb, spec, device):
    table = window_table(rpb, spec.kernel_size, device)
    return dict(table_ptr=table, stable_h=table.stride(0) if rpb is not None else 0)


# ----------------------------------------------------------------------------- a piece of a band


@triton.jit
def _non_finite_rows(x):
    """Per row of ``x``, whether it holds a NaN or Inf."""
    x = x.to(tl.float32)
    return tl.max(tl.where((x == x) & (tl.abs(x) != float('inf')), 0, 1), 1)


@triton.jit
def _band_is_interior(band_y, x0, len_y, len_x, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, BAND: tl.constexpr,
                      TILE_W: tl.constexpr):
    """Whether every query of the band lies in its dilation group and sees its whole window there, unshifted:
    each window then starts ``kernel // 2`` before its query (clamped and zero borders alike) and the band's
    window mask and rpb are the window table's, the same for every such band."""
    rows = (band_y - KERNEL_H // 2 >= 0) & (band_y + BAND - 1 + (KERNEL_H - 1 - KERNEL_H // 2) < len_y)
    cols = (x0 - KERNEL_W // 2 >= 0) & (x0 + TILE_W - 1 + (KERNEL_W - 1 - KERNEL_W // 2) < len_x)
    return rows & cols


@triton.jit
def _piece_window(key_row0, key_col0, q_y, q_x, q_valid, q_coord, win_y, win_x, len_y, len_x, interior, table_rows,
                  rpb_base, START: tl.constexpr, SIZE: tl.constexpr, KEY_ROWS: tl.constexpr, KEY_COLS: tl.constexpr,
                  KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, HAS_RPB: tl.constexpr):
    """Keys ``START .. START + SIZE`` of a band's rectangle (row-major): their coordinates, which lie in the map,
    the [queries, keys] window mask and the base-2 bias of the logits (rpb; zero without). An interior band reads
    mask and bias as one load of the window table (``table_rows``: its rows, -inf outside a window); a border band
    computes the mask and gathers the rpb. Their k and v are loaded where used (fewer live registers)."""
    n = START + tl.arange(0, SIZE)
    k_y = key_row0 + n // KEY_COLS
    k_x = key_col0 + n % KEY_COLS
    if interior:
        k_valid = n < KEY_ROWS * KEY_COLS
        bias = tl.load(table_rows + n[None, :])
        mask = bias != float('-inf')
    else:
        k_valid = (n < KEY_ROWS * KEY_COLS) & (k_y >= 0) & (k_y < len_y) & (k_x >= 0) & (k_x < len_x)
        # padding queries of a partial band lie outside the map: their rpb offsets fall outside the table
        mask = _in_window(q_y[:, None], q_x[:, None], win_y[:, None], win_x[:, None], k_y[None, :], k_x[None, :],
                          KERNEL_H, KERNEL_W) & k_valid[None, :] & q_valid[:, None]
        if HAS_RPB:
            bias = _rpb_bias(rpb_base, q_coord[:, None], _rpb_coord(k_y, k_x, KERNEL_W)[None, :], mask, KERNEL_H,
                             KERNEL_W)
        else:
            bias = tl.zeros(mask.shape, tl.float32)
    return k_y, k_x, k_valid, mask, bias


@triton.jit
def _piece_logits(q, k, mask, bias, qk_scale, PRECISION: tl.constexpr):
    """Base-2 logits of a piece's keys ``k``, -inf (selected, so a non-finite key outside a window stays out)
    where masked."""
    return tl.where(mask, tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias, float('-inf'))


@triton.jit
def _piece_scores(q, k_base, m_i, key_row0, key_col0, q_y, q_x, q_valid, q_coord, win_y, win_x, len_y, len_x, interior,
                  table_rows, rpb_base, qk_scale, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, offs_d,
                  START: tl.constexpr, SIZE: tl.constexpr, KEY_ROWS: tl.constexpr, KEY_COLS: tl.constexpr,
                  KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, HAS_RPB: tl.constexpr, HEAD_DIM: tl.constexpr,
                  AS_F32: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr):
    """The forward's first pass over a piece: its keys' coordinates and window mask, its logits, and the running
    maximum ``m_i`` with them."""
    k_y, k_x, k_valid, mask, bias = _piece_window(key_row0, key_col0, q_y, q_x, q_valid, q_coord, win_y, win_x, len_y,
                                                  len_x, interior, table_rows, rpb_base, START, SIZE, KEY_ROWS,
                                                  KEY_COLS, KERNEL_H, KERNEL_W, HAS_RPB)
    k = _load_tokens(k_base, k_y, k_x, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, k_valid, offs_d, HEAD_DIM,
                     AS_F32, WIDE)
    s = _piece_logits(q, k, mask, bias, qk_scale, PRECISION)
    return k_y, k_x, k_valid, mask, s, tl.maximum(m_i, tl.max(s, 1))


@triton.jit
def _piece_sums(s, m_ref, l_i, acc, acc_ww, poisoned, v_base, k_y, k_x, k_valid, mask, q_y, q_x, q_valid, win_y, win_x,
                ww_base, group_y, group_x, dil_h, dil_w, sv_y, sv_x, sv_d, sww_y, sww_x, sww_j, offs_d,
                HAS_WW: tl.constexpr, KERNEL_W: tl.constexpr, HEAD_DIM: tl.constexpr, AS_F32: tl.constexpr,
                WIDE: tl.constexpr, PRECISION: tl.constexpr):
    """The forward's second pass over a piece: adds its share of the softmax sum ``l_i``, of P @ V (the values
    enter with non-finite entries zeroed), of the window weight's sum, and which queries' windows hold a
    non-finite value."""
    v_raw = _load_tokens(v_base, k_y, k_x, group_y, group_x, dil_h, dil_w, sv_y, sv_x, sv_d, k_valid, offs_d,
                         HEAD_DIM, AS_F32, WIDE)
    v = _finite_or_zero(v_raw).to(v_raw.dtype)
    p = tl.exp2(s - m_ref[:, None])
    acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    if HAS_WW:
        ww_offs = _window_weight_offsets(q_y[:, None], q_x[:, None], win_y[:, None], win_x[:, None], k_y[None, :],
                                         k_x[None, :], group_y, group_x, dil_h, dil_w, sww_y, sww_x, sww_j, KERNEL_W,
                                         WIDE)
        ww = tl.load(ww_base + ww_offs, mask=mask, other=0.0).to(tl.float32)
        acc_ww += tl.dot(ww.to(v.dtype), v, input_precision=PRECISION)
    poisoned = tl.maximum(poisoned, tl.max(tl.where(mask & (_non_finite_rows(v_raw)[None, :] > 0), 1, 0), 1))
    return l_i + tl.sum(p, 1), acc, acc_ww, poisoned


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=['size_class'])
def _forward_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, rpb_ptr, ek_ptr, ev_ptr, eb_ptr, ww_ptr,
        sq_b, sq_y, sq_x, sq_h, sq_d, sk_b, sk_y, sk_x, sk_h, sk_d, sv_b, sv_y, sv_x, sv_h, sv_d,
        so_b, so_y, so_x, so_h, so_d, sek_b, sek_l, sek_h, sek_d, sev_b, sev_l, sev_h, sev_d,
        seb_b, seb_h, seb_y, seb_x, seb_l, sww_b, sww_y, sww_x, sww_h, sww_j,
        heads, height, width, dil_h, dil_w, size_class, n_extra, qk_scale, table_ptr, stable_h,
        HEAD_DIM: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, CLAMP: tl.constexpr,
        HAS_RPB: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_EXTRA_BIAS: tl.constexpr, HAS_WW: tl.constexpr,
        AS_F32: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BAND: tl.constexpr, KEY_ROWS: tl.constexpr,
        KEY_COLS: tl.constexpr, PIECE_1: tl.constexpr, PIECE_2: tl.constexpr, PIECE_3: tl.constexpr,
        TABLE_KEYS: tl.constexpr):
    pid_bh = tl.program_id(1)
    b, h = _image_and_head(pid_bh, heads, WIDE)
    group_y, group_x, y0, x0, len_y, len_x = _tile_of(tl.program_id(0), height, width, dil_h, dil_w, TILE_H, TILE_W)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    ww_base = ww_ptr + b * sww_b + h * sww_h
    rpb_base = rpb_ptr + h * (2 * KERNEL_H - 1) * (2 * KERNEL_W - 1)
    table_rows = table_ptr + h * stable_h + tl.arange(0, BAND * TILE_W)[:, None] * TABLE_KEYS
    key_col0 = _window_start(x0, len_x, KERNEL_W, CLAMP)
    for band_y in range(y0, tl.minimum(y0 + TILE_H, len_y), BAND):
        q_y, q_x, q_valid = _tile_tokens(band_y, x0, len_y, len_x, BAND, TILE_W)
        q = _load_tokens(q_base, q_y, q_x, group_y, group_x, dil_h, dil_w, sq_y, sq_x, sq_d, q_valid, offs_d,
                         HEAD_DIM, AS_F32, WIDE)
        win_y = _window_start(q_y, len_y, KERNEL_H, CLAMP)
        win_x = _window_start(q_x, len_x, KERNEL_W, CLAMP)
        key_row0 = _window_start(band_y, len_y, KERNEL_H, CLAMP)
        q_coord = _rpb_coord(q_y, q_x, KERNEL_W)
        interior = _band_is_interior(band_y, x0, len_y, len_x, KERNEL_H, KERNEL_W, BAND, TILE_W)
        # every piece's logits first: one exact softmax over the whole window
        m_i = tl.full((BAND * TILE_W,), float('-inf'), tl.float32)
        k_y1, k_x1, k_valid1, mask1, s1, m_i = _piece_scores(
            q, k_base, m_i, key_row0, key_col0, q_y, q_x, q_valid, q_coord, win_y, win_x, len_y, len_x, interior,
            table_rows, rpb_base, qk_scale, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, offs_d, 0, PIECE_1,
            KEY_ROWS, KEY_COLS, KERNEL_H, KERNEL_W, HAS_RPB, HEAD_DIM, AS_F32, WIDE, PRECISION)
        if PIECE_2 > 0:
            k_y2, k_x2, k_valid2, mask2, s2, m_i = _piece_scores(
                q, k_base, m_i, key_row0, key_col0, q_y, q_x, q_valid, q_coord, win_y, win_x, len_y, len_x, interior,
                table_rows, rpb_base, qk_scale, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, offs_d, PIECE_1,
                PIECE_2, KEY_ROWS, KEY_COLS, KERNEL_H, KERNEL_W, HAS_RPB, HEAD_DIM, AS_F32, WIDE, PRECISION)
        if PIECE_3 > 0:
            k_y3, k_x3, k_valid3, mask3, s3, m_i = _piece_scores(
                q, k_base, m_i, key_row0, key_col0, q_y, q_x, q_valid, q_coord, win_y, win_x, len_y, len_x, interior,
                table_rows, rpb_base, qk_scale, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, offs_d,
                PIECE_1 + PIECE_2, PIECE_3, KEY_ROWS, KEY_COLS, KERNEL_H, KERNEL_W, HAS_RPB, HEAD_DIM, AS_F32, WIDE,
                PRECISION)
        m_ref = tl.where(m_i == float('-inf'), 0.0, m_i)   # a padding query sees no key
        l_i = tl.zeros((BAND * TILE_W,), tl.float32)
        acc = tl.zeros((BAND * TILE_W, BLOCK_D), tl.float32)
        acc_ww = tl.zeros((BAND * TILE_W, BLOCK_D), tl.float32)   # sum_j w_j v_j, added after the normalisation
        poisoned = tl.zeros((BAND * TILE_W,), tl.int32)
        l_i, acc, acc_ww, poisoned = _piece_sums(
            s1, m_ref, l_i, acc, acc_ww, poisoned, v_base, k_y1, k_x1, k_valid1, mask1, q_y, q_x, q_valid, win_y,
            win_x, ww_base, group_y, group_x, dil_h, dil_w, sv_y, sv_x, sv_d, sww_y, sww_x, sww_j, offs_d, HAS_WW,
            KERNEL_W, HEAD_DIM, AS_F32, WIDE, PRECISION)
        if PIECE_2 > 0:
            l_i, acc, acc_ww, poisoned = _piece_sums(
                s2, m_ref, l_i, acc, acc_ww, poisoned, v_base, k_y2, k_x2, k_valid2, mask2, q_y, q_x, q_valid, win_y,
                win_x, ww_base, group_y, group_x, dil_h, dil_w, sv_y, sv_x, sv_d, sww_y, sww_x, sww_j, offs_d, HAS_WW,
                KERNEL_W, HEAD_DIM, AS_F32, WIDE, PRECISION)
        if PIECE_3 > 0:
            l_i, acc, acc_ww, poisoned = _piece_sums(
                s3, m_ref, l_i, acc, acc_ww, poisoned, v_base, k_y3, k_x3, k_valid3, mask3, q_y, q_x, q_valid, win_y,
                win_x, ww_base, group_y, group_x, dil_h, dil_w, sv_y, sv_x, sv_d, sww_y, sww_x, sww_j, offs_d, HAS_WW,
                KERNEL_W, HEAD_DIM, AS_F32, WIDE, PRECISION)
        if HAS_EXTRA:
            m_i, l_i, acc = _extra_softmax(q, q_y, q_x, q_valid, m_i, l_i, acc, ek_ptr + b * sek_b + h * sek_h,
                                           ev_ptr + b * sev_b + h * sev_h, eb_ptr + b * seb_b + h * seb_h, n_extra,
                                           qk_scale, group_y, group_x, dil_h, dil_w, sek_l, sek_d, sev_l, sev_d,
                                           seb_y, seb_x, seb_l, offs_d, HEAD_DIM, HAS_EXTRA_BIAS, AS_F32, WIDE,
                                           PRECISION, BLOCK_E)
        l_i = tl.where(l_i == 0, 1.0, l_i)   # only padding queries see no key; a NaN stays (and in the LSE)
        out = acc / l_i[:, None]
        if HAS_WW:
            out += acc_ww
        out = tl.where(poisoned[:, None] > 0, float('nan'), out)
        o_offs = _token_offsets(q_y, q_x, group_y, group_x, dil_h, dil_w, so_y, so_x, so_d, offs_d, WIDE)
        tl.store(o_ptr + b * so_b + h * so_h + o_offs, out.to(o_ptr.dtype.element_ty),
                 mask=q_valid[:, None] & (offs_d[None, :] < HEAD_DIM))
        lse_offs = (q_y * dil_h + group_y) * width + q_x * dil_w + group_x
        tl.store(lse_ptr + pid_bh.to(tl.int64) * height * width + lse_offs, m_i + tl.log2(l_i), mask=q_valid)


@triton.jit
def _piece_ww_delta(q, do, lse, k_base, v_base, k_valid, mask, bias, q_y, q_x, win_y, win_x, k_y, k_x, dww_base,
                    qk_scale, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, sv_y, sv_x, sv_d, sww_y, sww_x, sww_j,
                    offs_d, WW_GRAD: tl.constexpr, KERNEL_W: tl.constexpr, HEAD_DIM: tl.constexpr,
                    AS_F32: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr):
    """A piece's share of delta with a window weight, ``sum_j p_j (dO . v_j)`` (O also holds the window weight's
    sum, which is not attention, and O less that sum cancels in fp16 / bf16); stores those ``dO . v_j`` as
    d_window_weight when asked."""
    k = _load_tokens(k_base, k_y, k_x, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, k_valid, offs_d, HEAD_DIM,
                     AS_F32, WIDE)
    v = _load_tokens(v_base, k_y, k_x, group_y, group_x, dil_h, dil_w, sv_y, sv_x, sv_d, k_valid, offs_d, HEAD_DIM,
                     AS_F32, WIDE)
    p = tl.where(mask, tl.exp2(_piece_logits(q, k, mask, bias, qk_scale, PRECISION) - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)   # a non-finite v_j: its column, selected below
    if WW_GRAD:
        ww_offs = _window_weight_offsets(q_y[:, None], q_x[:, None], win_y[:, None], win_x[:, None], k_y[None, :],
                                         k_x[None, :], group_y, group_x, dil_h, dil_w, sww_y, sww_x, sww_j, KERNEL_W,
                                         WIDE)
        tl.store(dww_base + ww_offs, dp.to(dww_base.dtype.element_ty), mask=mask)
    return tl.sum(tl.where(mask, p * dp, 0.0), 1)


@triton.jit
def _piece_window_dq(q, do, lse, delta, k_base, v_base, dww_base, key_row0, key_col0, q_y, q_x, q_valid, q_coord,
                     win_y, win_x, len_y, len_x, interior, table_rows, rpb_base, qk_scale, group_y, group_x, dil_h,
                     dil_w, sk_y, sk_x, sk_d, sv_y, sv_x, sv_d, sww_y, sww_x, sww_j, offs_d, START: tl.constexpr,
                     SIZE: tl.constexpr, KEY_ROWS: tl.constexpr, KEY_COLS: tl.constexpr, KERNEL_H: tl.constexpr,
                     KERNEL_W: tl.constexpr, HAS_RPB: tl.constexpr, HAS_WW: tl.constexpr, WW_GRAD: tl.constexpr,
                     HEAD_DIM: tl.constexpr, AS_F32: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr):
    """dQ's first pass over a piece: its keys' coordinates, window mask and bias (``_piece_window``), and, with a
    window weight, the piece's share of delta."""
    k_y, k_x, k_valid, mask, bias = _piece_window(key_row0, key_col0, q_y, q_x, q_valid, q_coord, win_y, win_x, len_y,
                                                  len_x, interior, table_rows, rpb_base, START, SIZE, KEY_ROWS,
                                                  KEY_COLS, KERNEL_H, KERNEL_W, HAS_RPB)
    if HAS_WW:
        delta += _piece_ww_delta(q, do, lse, k_base, v_base, k_valid, mask, bias, q_y, q_x, win_y, win_x, k_y, k_x,
                                 dww_base, qk_scale, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, sv_y, sv_x,
                                 sv_d, sww_y, sww_x, sww_j, offs_d, WW_GRAD, KERNEL_W, HEAD_DIM, AS_F32, WIDE,
                                 PRECISION)
    return k_y, k_x, k_valid, mask, bias, delta


@triton.jit
def _rpb_histogram_band(ds, k_y, k_x, band_y, x0, BAND: tl.constexpr, TILE_W: tl.constexpr,
                        KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, BIAS_H: tl.constexpr, BIAS_W: tl.constexpr):
    """``[BIAS_H, BIAS_W]`` sums of a band piece's ``ds`` (zero outside the windows) per rpb entry.

    Per key and query row of the band, the rpb row is fixed and the rpb column picks one query column:
    a gather along the band's query columns lines the queries up by rpb column, and a one-hot product
    sums the keys into the rpb rows.
    """
    ds_t = tl.trans(ds)                                              # [keys, queries]
    bias_col = tl.arange(0, BIAS_W)[None, :]
    query_col = k_x[:, None] - x0 - bias_col + KERNEL_W - 1          # the query column of (key, rpb column)
    in_band = (query_col >= 0) & (query_col < TILE_W)
    drpb = tl.zeros((BIAS_H, BIAS_W), tl.float32)
    for row in tl.static_range(BAND):
        index = tl.where(in_band, row * TILE_W + query_col, 0)
        by_bias_col = tl.where(in_band, tl.gather(ds_t, index, axis=1), 0.0)   # [keys, BIAS_W]
        bias_row = k_y - (band_y + row) + KERNEL_H - 1
        one_hot = (bias_row[:, None] == tl.arange(0, BIAS_H)[None, :]).to(tl.float32)   # [keys, BIAS_H]
        drpb += tl.dot(tl.trans(one_hot), by_bias_col, input_precision='ieee')
    return drpb


@triton.jit
def _piece_dq(q, do, lse, delta, dq, drpb, k_base, v_base, k_valid, mask, bias, k_y, k_x, band_y, x0, qk_scale,
              group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, sv_y, sv_x, sv_d, offs_d, RPB_GRAD: tl.constexpr,
              BAND: tl.constexpr, TILE_W: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr,
              BIAS_H: tl.constexpr, BIAS_W: tl.constexpr, HEAD_DIM: tl.constexpr, AS_F32: tl.constexpr,
              WIDE: tl.constexpr, PRECISION: tl.constexpr):
    """dQ's second pass over a piece: adds its share of dQ (unscaled) and of the band's rpb gradient; k and v enter
    the products with their non-finite entries zeroed (masked pairs add exactly zero)."""
    k = _load_tokens(k_base, k_y, k_x, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, k_valid, offs_d, HEAD_DIM,
                     AS_F32, WIDE)
    v = _load_tokens(v_base, k_y, k_x, group_y, group_x, dil_h, dil_w, sv_y, sv_x, sv_d, k_valid, offs_d, HEAD_DIM,
                     AS_F32, WIDE)
    s = _piece_logits(q, k, mask, bias, qk_scale, PRECISION)
    p = tl.where(mask, tl.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(_finite_or_zero(v).to(v.dtype)), input_precision=PRECISION)
    ds = tl.where(mask, p * (dp - delta[:, None]), 0.0)
    # a non-finite key of a query's window makes its dQ non-finite (0 * Inf in the reference), others stay clean
    k, dq = _finite_part(k, mask, dq)
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    if RPB_GRAD:
        drpb += _rpb_histogram_band(ds, k_y, k_x, band_y, x0, BAND, TILE_W, KERNEL_H, KERNEL_W, BIAS_H, BIAS_W)
    return dq, drpb


@triton.jit(do_not_specialize=['size_class'])
def _backward_dq_kernel(
        q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, rpb_ptr, drpb_ptr, ek_ptr, ev_ptr,
        eb_ptr, deb_ptr, ww_ptr, dww_ptr,
        sq_b, sq_y, sq_x, sq_h, sq_d, sk_b, sk_y, sk_x, sk_h, sk_d, sv_b, sv_y, sv_x, sv_h, sv_d,
        so_b, so_y, so_x, so_h, so_d, sdo_b, sdo_y, sdo_x, sdo_h, sdo_d,
        sek_b, sek_l, sek_h, sek_d, sev_b, sev_l, sev_h, sev_d, sg_b, sg_y, sg_x, sg_h, sg_d,
        seb_b, seb_h, seb_y, seb_x, seb_l, sdeb_b, sdeb_h, sdeb_y, sdeb_x, sdeb_l,
        sww_b, sww_y, sww_x, sww_h, sww_j,
        heads, height, width, dil_h, dil_w, size_class, n_extra, qk_scale, scale, drpb_tiles, table_ptr, stable_h,
        HEAD_DIM: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, CLAMP: tl.constexpr,
        HAS_RPB: tl.constexpr, RPB_GRAD: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_EXTRA_BIAS: tl.constexpr,
        EXTRA_BIAS_GRAD: tl.constexpr, HAS_WW: tl.constexpr, WW_GRAD: tl.constexpr, AS_F32: tl.constexpr,
        WIDE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
        BIAS_H: tl.constexpr, BIAS_W: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BAND: tl.constexpr, KEY_ROWS: tl.constexpr,
        KEY_COLS: tl.constexpr, PIECE_1: tl.constexpr, PIECE_2: tl.constexpr, PIECE_3: tl.constexpr,
        TABLE_KEYS: tl.constexpr):
    pid_tile = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h = _image_and_head(pid_bh, heads, WIDE)
    group_y, group_x, y0, x0, len_y, len_x = _tile_of(pid_tile, height, width, dil_h, dil_w, TILE_H, TILE_W)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    dww_base = dww_ptr + b * sww_b + h * sww_h
    rpb_base = rpb_ptr + h * (2 * KERNEL_H - 1) * (2 * KERNEL_W - 1)
    table_rows = table_ptr + h * stable_h + tl.arange(0, BAND * TILE_W)[:, None] * TABLE_KEYS
    key_col0 = _window_start(x0, len_x, KERNEL_W, CLAMP)
    drpb = tl.zeros((BIAS_H, BIAS_W), tl.float32)
    for band_y in range(y0, tl.minimum(y0 + TILE_H, len_y), BAND):
        q_y, q_x, q_valid = _tile_tokens(band_y, x0, len_y, len_x, BAND, TILE_W)
        q = _load_tokens(q_base, q_y, q_x, group_y, group_x, dil_h, dil_w, sq_y, sq_x, sq_d, q_valid, offs_d,
                         HEAD_DIM, AS_F32, WIDE)
        do = _load_tokens(do_ptr + b * sdo_b + h * sdo_h, q_y, q_x, group_y, group_x, dil_h, dil_w, sdo_y, sdo_x,
                          sdo_d, q_valid, offs_d, HEAD_DIM, AS_F32, WIDE)
        win_y = _window_start(q_y, len_y, KERNEL_H, CLAMP)
        win_x = _window_start(q_x, len_x, KERNEL_W, CLAMP)
        key_row0 = _window_start(band_y, len_y, KERNEL_H, CLAMP)
        q_coord = _rpb_coord(q_y, q_x, KERNEL_W)
        interior = _band_is_interior(band_y, x0, len_y, len_x, KERNEL_H, KERNEL_W, BAND, TILE_W)
        stat_offs = pid_bh.to(tl.int64) * height * width + (q_y * dil_h + group_y) * width + q_x * dil_w + group_x
        lse = tl.load(lse_ptr + stat_offs, mask=q_valid, other=0.0)
        if HAS_WW:   # delta = sum_j p_j (dO . v_j), summed by the pieces below and the extra tokens
            delta = tl.zeros((BAND * TILE_W,), tl.float32)
            if HAS_EXTRA:
                delta = _extra_delta(delta, q, do, lse, q_y, q_x, q_valid, ek_ptr + b * sek_b + h * sek_h,
                                     ev_ptr + b * sev_b + h * sev_h, eb_ptr + b * seb_b + h * seb_h, n_extra,
                                     qk_scale, group_y, group_x, dil_h, dil_w, sek_l, sek_d, sev_l, sev_d, seb_y,
                                     seb_x, seb_l, offs_d, HEAD_DIM, HAS_EXTRA_BIAS, AS_F32, WIDE, PRECISION, BLOCK_E)
        else:
            o = _load_tokens(o_ptr + b * so_b + h * so_h, q_y, q_x, group_y, group_x, dil_h, dil_w, so_y, so_x, so_d,
                             q_valid, offs_d, HEAD_DIM, True, WIDE)
            delta = tl.sum(o * do.to(tl.float32), 1)
        # the windows and the final delta first: the rpb histogram needs it
        k_y1, k_x1, k_valid1, mask1, bias1, delta = _piece_window_dq(
            q, do, lse, delta, k_base, v_base, dww_base, key_row0, key_col0, q_y, q_x, q_valid, q_coord, win_y, win_x,
            len_y, len_x, interior, table_rows, rpb_base, qk_scale, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d,
            sv_y, sv_x, sv_d, sww_y, sww_x, sww_j, offs_d, 0, PIECE_1, KEY_ROWS, KEY_COLS, KERNEL_H, KERNEL_W, HAS_RPB,
            HAS_WW, WW_GRAD, HEAD_DIM, AS_F32, WIDE, PRECISION)
        if PIECE_2 > 0:
            k_y2, k_x2, k_valid2, mask2, bias2, delta = _piece_window_dq(
                q, do, lse, delta, k_base, v_base, dww_base, key_row0, key_col0, q_y, q_x, q_valid, q_coord, win_y,
                win_x, len_y, len_x, interior, table_rows, rpb_base, qk_scale, group_y, group_x, dil_h, dil_w, sk_y,
                sk_x, sk_d, sv_y, sv_x, sv_d, sww_y, sww_x, sww_j, offs_d, PIECE_1, PIECE_2, KEY_ROWS, KEY_COLS,
                KERNEL_H, KERNEL_W, HAS_RPB, HAS_WW, WW_GRAD, HEAD_DIM, AS_F32, WIDE, PRECISION)
        if PIECE_3 > 0:
            k_y3, k_x3, k_valid3, mask3, bias3, delta = _piece_window_dq(
                q, do, lse, delta, k_base, v_base, dww_base, key_row0, key_col0, q_y, q_x, q_valid, q_coord, win_y,
                win_x, len_y, len_x, interior, table_rows, rpb_base, qk_scale, group_y, group_x, dil_h, dil_w, sk_y,
                sk_x, sk_d, sv_y, sv_x, sv_d, sww_y, sww_x, sww_j, offs_d, PIECE_1 + PIECE_2, PIECE_3, KEY_ROWS,
                KEY_COLS, KERNEL_H, KERNEL_W, HAS_RPB, HAS_WW, WW_GRAD, HEAD_DIM, AS_F32, WIDE, PRECISION)
        tl.store(delta_ptr + stat_offs, delta, mask=q_valid)
        dq = tl.zeros((BAND * TILE_W, BLOCK_D), tl.float32)
        dq, drpb = _piece_dq(q, do, lse, delta, dq, drpb, k_base, v_base, k_valid1, mask1, bias1, k_y1, k_x1, band_y,
                             x0, qk_scale, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, sv_y, sv_x, sv_d, offs_d,
                             RPB_GRAD, BAND, TILE_W, KERNEL_H, KERNEL_W, BIAS_H, BIAS_W, HEAD_DIM, AS_F32, WIDE,
                             PRECISION)
        if PIECE_2 > 0:
            dq, drpb = _piece_dq(q, do, lse, delta, dq, drpb, k_base, v_base, k_valid2, mask2, bias2, k_y2, k_x2,
                                 band_y, x0, qk_scale, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, sv_y, sv_x,
                                 sv_d, offs_d, RPB_GRAD, BAND, TILE_W, KERNEL_H, KERNEL_W, BIAS_H, BIAS_W, HEAD_DIM,
                                 AS_F32, WIDE, PRECISION)
        if PIECE_3 > 0:
            dq, drpb = _piece_dq(q, do, lse, delta, dq, drpb, k_base, v_base, k_valid3, mask3, bias3, k_y3, k_x3,
                                 band_y, x0, qk_scale, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d, sv_y, sv_x,
                                 sv_d, offs_d, RPB_GRAD, BAND, TILE_W, KERNEL_H, KERNEL_W, BIAS_H, BIAS_W, HEAD_DIM,
                                 AS_F32, WIDE, PRECISION)
        if HAS_EXTRA:
            dq = _extra_dq(q, do, lse, delta, dq, q_y, q_x, q_valid, ek_ptr + b * sek_b + h * sek_h,
                           ev_ptr + b * sev_b + h * sev_h, eb_ptr + b * seb_b + h * seb_h,
                           deb_ptr + b * sdeb_b + h * sdeb_h, n_extra, qk_scale, group_y, group_x, dil_h, dil_w, sek_l,
                           sek_d, sev_l, sev_d, seb_y, seb_x, seb_l, sdeb_y, sdeb_x, sdeb_l, offs_d, HEAD_DIM,
                           HAS_EXTRA_BIAS, EXTRA_BIAS_GRAD, AS_F32, WIDE, PRECISION, BLOCK_E)
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
        HAS_RPB: tl.constexpr, HAS_WW: tl.constexpr, AS_F32: tl.constexpr, WIDE: tl.constexpr,
        PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr, BAND: tl.constexpr, QUERY_CHUNK: tl.constexpr):
    """Per band of keys, one flat loop over the queries that see them (``_query_span``: the band's
    rectangle inside the map, up to twice the window where a clamped border piles windows up), in chunks of
    ``QUERY_CHUNK`` queries (the smallest forward piece: an interior band's ``KEY_ROWS * KEY_COLS`` queries
    cost what its forward pieces cost)."""
    b, h, group_y, group_x, y0, x0, len_y, len_x, q_base, do_base, stat_base, rpb_base, ww_base = _dkdv_program(
        q_ptr, do_ptr, rpb_ptr, ww_ptr, sq_b, sq_h, sdo_b, sdo_h, sww_b, sww_h, heads, height, width, dil_h, dil_w,
        KERNEL_H, KERNEL_W, TILE_H, TILE_W, WIDE)
    offs_d = tl.arange(0, BLOCK_D)
    offs_c = tl.arange(0, QUERY_CHUNK)
    col_lo, col_hi = _query_span(x0, tl.minimum(x0 + TILE_W, len_x) - 1, len_x, KERNEL_W, CLAMP)
    span_cols = col_hi - col_lo
    for band_y in range(y0, tl.minimum(y0 + TILE_H, len_y), BAND):
        k_y, k_x, k_valid = _tile_tokens(band_y, x0, len_y, len_x, BAND, TILE_W)
        k = _load_tokens(k_ptr + b * sk_b + h * sk_h, k_y, k_x, group_y, group_x, dil_h, dil_w, sk_y, sk_x, sk_d,
                         k_valid, offs_d, HEAD_DIM, AS_F32, WIDE)
        v = _load_tokens(v_ptr + b * sv_b + h * sv_h, k_y, k_x, group_y, group_x, dil_h, dil_w, sv_y, sv_x, sv_d,
                         k_valid, offs_d, HEAD_DIM, AS_F32, WIDE)
        k_coord = _rpb_coord(k_y, k_x, KERNEL_W)
        row_lo, row_hi = _query_span(band_y, tl.minimum(band_y + BAND, len_y) - 1, len_y, KERNEL_H, CLAMP)
        span = (row_hi - row_lo) * span_cols
        dk = tl.zeros((BAND * TILE_W, BLOCK_D), tl.float32)
        dv = tl.zeros((BAND * TILE_W, BLOCK_D), tl.float32)
        for n0 in range(0, span, QUERY_CHUNK):
            n = n0 + offs_c
            q_y = row_lo + n // span_cols
            q_x = col_lo + n % span_cols
            q_valid = n < span
            dk, dv = _dkdv_block(k, v, k_y, k_x, k_valid, k_coord, q_y, q_x, q_valid, dk, dv, q_base, do_base, lse_ptr,
                                 delta_ptr, stat_base, rpb_base, ww_base, qk_scale, group_y, group_x, dil_h, dil_w,
                                 len_y, len_x, width, sq_y, sq_x, sq_d, sdo_y, sdo_x, sdo_d, sww_y, sww_x, sww_j,
                                 offs_d, HEAD_DIM, KERNEL_H, KERNEL_W, CLAMP, HAS_RPB, HAS_WW, AS_F32, WIDE, PRECISION)
        _store_dkdv(dk_ptr, dv_ptr, dk, dv, scale, b, h, k_y, k_x, k_valid, group_y, group_x, dil_h, dil_w, sg_b, sg_y,
                    sg_x, sg_h, sg_d, offs_d, HEAD_DIM, WIDE)


# ----------------------------------------------------------------------------- tuning and launches


def tile_configs():
    """The band layout (one: the design table's figures hold for every config) and the warps / stages tried."""
    layout = {'TILE_H': TILE_H, 'TILE_W': TILE_W, 'BAND': BAND}
    if triton_interpreted():  # one config: the interpreter cannot benchmark
        return [triton.Config(layout, num_warps=4, num_stages=1)]
    return [triton.Config(layout, num_warps=warps, num_stages=stages) for warps in (4, 8) for stages in (1, 2)]


def _tuned(kernel, key, names=('KEY_ROWS', 'KEY_COLS', 'PIECE_1', 'PIECE_2', 'PIECE_3', 'TABLE_KEYS'),
           **autotune_options):
    return triton.autotune(tile_configs(), key=key, **autotune_options)(triton.heuristics(
        {name: (lambda args, name=name: _band_meta(args)[name]) for name in names})(kernel))


_FORWARD = _tuned(_forward_kernel, TUNING_KEY + ['HAS_EXTRA', 'HAS_EXTRA_BIAS', 'HAS_WW'])
_BACKWARD_DQ = _tuned(_backward_dq_kernel, TUNING_KEY + ['HAS_EXTRA', 'RPB_GRAD', 'HAS_EXTRA_BIAS', 'HAS_WW'],
                      reset_to_zero=['drpb_ptr'])
_BACKWARD_DKDV = _tuned(_backward_dkdv_kernel, TUNING_KEY + ['HAS_WW'], names=('QUERY_CHUNK',))
TUNED_KERNELS = {'forward': _FORWARD, 'backward_dq': _BACKWARD_DQ, 'backward_dkdv': _BACKWARD_DKDV}


def forced_config(config):
    """v2's tuned kernels run ``config`` (one of :func:`tile_configs`) inside the block (see v1's)."""
    return v1.forced_config(config, TUNED_KERNELS)


def forward(q, k, v, rpb, extra_k, extra_v, spec, extra_bias=None, window_weight=None):
    """v1's ``forward`` on the banded forward kernel."""
    return v1.forward(q, k, v, rpb, extra_k, extra_v, spec, extra_bias, window_weight, forward_kernel=_FORWARD,
                      kernel_options=_table_options(rpb, spec, q.device))


def backward(grad_out, q, k, v, rpb, extra_k, extra_v, out, lse, spec, needs_rpb_grad, needs_extra_grad,
             extra_bias=None, window_weight=None, needs_extra_bias_grad=False, needs_window_weight_grad=False):
    """v1's ``backward`` on the banded dQ and dK / dV kernels (the extra tokens' gradients: v1's kernel)."""
    return v1.backward(grad_out, q, k, v, rpb, extra_k, extra_v, out, lse, spec, needs_rpb_grad, needs_extra_grad,
                       extra_bias, window_weight, needs_extra_bias_grad, needs_window_weight_grad,
                       dq_kernel=_BACKWARD_DQ, dkdv_kernel=_BACKWARD_DKDV,
                       dq_options=_table_options(rpb, spec, q.device))
