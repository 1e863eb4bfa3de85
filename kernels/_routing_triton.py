"""Triton kernels of :func:`attnzoo.kernels.routing_attention` (BiFormer's bi-level routing attention).

The tensors stay in their image layout, heads-last ``[B, H, W, heads, D]`` (any strides): a token
``t`` of region ``r`` sits at row ``(r // p_w) * region_h + t // region_w`` and column
``(r % p_w) * region_w + t % region_w``, so the kernels read routed regions in place instead of
gathering ``topk`` copies of K and V.

- forward: one program per (query block of a region, head, batch); the keys of the region's
  ``topk`` routed regions are walked as one flat list of ``topk * T`` tokens in ``BLOCK_N`` tiles
  (small regions share a tile, nothing is padded per region) with an online softmax. Writes the
  output and the log2-sum-exp of every query.
- backward, dQ (and delta = rowsum(dO * O)): the forward's loop again, per query block.
- backward, dK and dV: one program per (key block of a region, head, batch), looping over the
  queries of every region that routed to it (the inverse lists, built with a sort on the device),
  so every gradient is written once, without atomics.

Query tiles are padded to at least 16 rows (the MMA minimum) with masks, which keeps 4-token
regions (BiFormer stage 3 at 224 px) on tensor cores.
"""
import torch
import triton
import triton.language as tl

from ._dispatch import batch_chunks, check_heads_fit_grid, dot_precision, needs_wide_offsets, triton_interpreted

OP_NAME = 'routing_attention'
LOG2E = 1.4426950408889634
MIN_TILE = 16          # tl.dot needs M, N, K >= 16 on GPUs
TILE_BYTES = 8192      # rows x padded head_dim x element size of the largest operand tile
MAX_RESIDENT_TILE = 128
STREAM_TILE = 64       # rows of the tiles streamed through the loops
MAX_HEAD_DIM = 128


@triton.jit
def _token_yx(region, token, p_w, region_h, region_w):
    """Row and column of token ``token`` of region ``region`` (both row-major)."""
    y = (region // p_w) * region_h + token // region_w
    x = (region % p_w) * region_w + token % region_w
    return y, x


@triton.jit
def _resident_tokens(blocks, p_w, region_h, region_w, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """This program's region, head and batch, and its block of the region's tokens: (y, x, valid). The batch
    is 64-bit, the head too where ``WIDE`` (``head * s_h`` spans the image when heads are not the last axes)."""
    region = tl.program_id(0) // blocks
    offs = (tl.program_id(0) % blocks) * BLOCK + tl.arange(0, BLOCK)
    ys, xs = _token_yx(region, offs, p_w, region_h, region_w)
    head = tl.program_id(1)
    if WIDE:
        head = head.to(tl.int64)
    return region, head, tl.program_id(2).to(tl.int64), ys, xs, offs < region_h * region_w


@triton.jit
def _listed_tokens(region_list, start, n_tokens, p_w, region_h, region_w, BLOCK: tl.constexpr):
    """Tokens ``start`` .. ``start + BLOCK`` of the regions in ``region_list`` taken as one flat list
    of ``n_tokens`` tokens, region after region: (y, x, valid)."""
    tokens = region_h * region_w
    offs = start + tl.arange(0, BLOCK)
    valid = offs < n_tokens
    slot = offs // tokens
    region = tl.load(region_list + slot, mask=valid, other=0)
    ys, xs = _token_yx(region, offs - slot * tokens, p_w, region_h, region_w)
    return ys, xs, valid


@triton.jit
def _token_ptrs(base, ys, xs, s_y, s_x, s_d, offs_d, WIDE: tl.constexpr):
    """Pointers to a [tokens, head_dim] block of a heads-last map, tokens at (ys, xs); 64-bit offsets
    where one image spans 2**31 elements or more (``WIDE``), 32-bit (cheaper) otherwise."""
    if WIDE:
        ys = ys.to(tl.int64)
        xs = xs.to(tl.int64)
    return base + (ys * s_y + xs * s_x)[:, None] + offs_d[None, :] * s_d


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # The interpreter multiplies bf16 bit patterns in tl.dot; fp32 operands are exact there.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _routing_fwd_kernel(
        Q, K, V, O, LSE, INDEX,
        sq_b, sq_y, sq_x, sq_h, sq_d,
        sk_b, sk_y, sk_x, sk_h, sk_d,
        sv_b, sv_y, sv_x, sv_h, sv_d,
        so_b, so_y, so_x, so_h, so_d,
        slse_b, slse_h, width,
        sidx_b, sidx_r,
        p_w, region_h, region_w, topk, qk_scale_log2, query_blocks,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr):
    region, head, batch, qy, qx, m_valid = _resident_tokens(query_blocks, p_w, region_h, region_w, BLOCK_M, WIDE)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_ptrs = _token_ptrs(Q + batch * sq_b + head * sq_h, qy, qx, sq_y, sq_x, sq_d, offs_d, WIDE)
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)

    K += batch * sk_b + head * sk_h
    V += batch * sv_b + head * sv_h
    routed = INDEX + batch * sidx_b + region * sidx_r
    m_i = tl.full([BLOCK_M], float('-inf'), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    keys = topk * region_h * region_w
    for start in range(0, keys, BLOCK_N):
        ky, kx, n_valid = _listed_tokens(routed, start, keys, p_w, region_h, region_w, BLOCK_N)
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(_token_ptrs(K, ky, kx, sk_y, sk_x, sk_d, offs_d, WIDE), mask=kv_mask, other=0.0)
        v = tl.load(_token_ptrs(V, ky, kx, sv_y, sv_x, sv_d, offs_d, WIDE), mask=kv_mask, other=0.0)

        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale_log2
        s = tl.where(n_valid[None, :], s, float('-inf'))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST, PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = _token_ptrs(O + batch * so_b + head * so_h, qy, qx, so_y, so_x, so_d, offs_d, WIDE)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + batch * slse_b + head * slse_h + qy * width + qx, m_i + tl.log2(l_i), mask=m_valid)


@triton.jit
def _routing_bwd_dq_kernel(
        Q, K, V, O, DO, DQ, LSE, DELTA, INDEX,
        sq_b, sq_y, sq_x, sq_h, sq_d,
        sk_b, sk_y, sk_x, sk_h, sk_d,
        sv_b, sv_y, sv_x, sv_h, sv_d,
        so_b, so_y, so_x, so_h, so_d,
        sdo_b, sdo_y, sdo_x, sdo_h, sdo_d,
        sdq_b, sdq_y, sdq_x, sdq_h, sdq_d,
        slse_b, slse_h, width,
        sidx_b, sidx_r,
        p_w, region_h, region_w, topk, qk_scale_log2, scale, query_blocks,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr):
    region, head, batch, qy, qx, m_valid = _resident_tokens(query_blocks, p_w, region_h, region_w, BLOCK_M, WIDE)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    md_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(_token_ptrs(Q + batch * sq_b + head * sq_h, qy, qx, sq_y, sq_x, sq_d, offs_d, WIDE),
                mask=md_mask, other=0.0)
    do = tl.load(_token_ptrs(DO + batch * sdo_b + head * sdo_h, qy, qx, sdo_y, sdo_x, sdo_d, offs_d, WIDE),
                 mask=md_mask, other=0.0)
    o = tl.load(_token_ptrs(O + batch * so_b + head * so_h, qy, qx, so_y, so_x, so_d, offs_d, WIDE),
                mask=md_mask, other=0.0)
    # delta = rowsum(dO * O) is needed here and by the dK/dV kernel: computed once, stored for it.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    stat_offs = batch * slse_b + head * slse_h + qy * width + qx
    tl.store(DELTA + stat_offs, delta, mask=m_valid)
    lse = tl.load(LSE + stat_offs, mask=m_valid, other=0.0)

    K += batch * sk_b + head * sk_h
    V += batch * sv_b + head * sv_h
    routed = INDEX + batch * sidx_b + region * sidx_r
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    keys = topk * region_h * region_w
    for start in range(0, keys, BLOCK_N):
        ky, kx, n_valid = _listed_tokens(routed, start, keys, p_w, region_h, region_w, BLOCK_N)
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(_token_ptrs(K, ky, kx, sk_y, sk_x, sk_d, offs_d, WIDE), mask=kv_mask, other=0.0)
        v = tl.load(_token_ptrs(V, ky, kx, sv_y, sv_x, sv_d, offs_d, WIDE), mask=kv_mask, other=0.0)

        s = _dot(q, tl.trans(k), UPCAST, PRECISION) * qk_scale_log2
        p = tl.where(n_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), UPCAST, PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, UPCAST, PRECISION)

    dq_ptrs = _token_ptrs(DQ + batch * sdq_b + head * sdq_h, qy, qx, sdq_y, sdq_x, sdq_d, offs_d, WIDE)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _routing_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, QUERY_REGIONS, QUERY_OFFSETS,
        sq_b, sq_y, sq_x, sq_h, sq_d,
        sk_b, sk_y, sk_x, sk_h, sk_d,
        sv_b, sv_y, sv_x, sv_h, sv_d,
        sdo_b, sdo_y, sdo_x, sdo_h, sdo_d,
        sdk_b, sdk_y, sdk_x, sdk_h, sdk_d,
        sdv_b, sdv_y, sdv_x, sdv_h, sdv_d,
        slse_b, slse_h, width,
        regions_per_image, p_w, region_h, region_w, qk_scale_log2, scale, key_blocks,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, WIDE: tl.constexpr):
    region, head, batch, ky, kx, n_valid = _resident_tokens(key_blocks, p_w, region_h, region_w, BLOCK_N, WIDE)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    nd_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(_token_ptrs(K + batch * sk_b + head * sk_h, ky, kx, sk_y, sk_x, sk_d, offs_d, WIDE),
                mask=nd_mask, other=0.0)
    v = tl.load(_token_ptrs(V + batch * sv_b + head * sv_h, ky, kx, sv_y, sv_x, sv_d, offs_d, WIDE),
                mask=nd_mask, other=0.0)

    # The query regions that routed to this key region: QUERY_REGIONS[first:last] (one entry per
    # routing slot, so a region listed twice contributes twice, as in the gather formulation).
    list_id = batch * regions_per_image + region
    first = tl.load(QUERY_OFFSETS + list_id)
    last = tl.load(QUERY_OFFSETS + list_id + 1)
    Q += batch * sq_b + head * sq_h
    DO += batch * sdo_b + head * sdo_h
    stats = batch * slse_b + head * slse_h
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    queries = (last - first) * region_h * region_w
    for start in range(0, queries, BLOCK_M):
        qy, qx, m_valid = _listed_tokens(QUERY_REGIONS + first, start, queries, p_w, region_h, region_w, BLOCK_M)
        md_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(_token_ptrs(Q, qy, qx, sq_y, sq_x, sq_d, offs_d, WIDE), mask=md_mask, other=0.0)
        do = tl.load(_token_ptrs(DO, qy, qx, sdo_y, sdo_x, sdo_d, offs_d, WIDE), mask=md_mask, other=0.0)
        lse = tl.load(LSE + stats + qy * width + qx, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + stats + qy * width + qx, mask=m_valid, other=0.0)

        s_t = _dot(k, tl.trans(q), UPCAST, PRECISION) * qk_scale_log2
        p_t = tl.where(m_valid[None, :], tl.exp2(s_t - lse[None, :]), 0.0)
        dv += _dot(p_t.to(do.dtype), do, UPCAST, PRECISION)
        dp_t = _dot(v, tl.trans(do), UPCAST, PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q.dtype), q, UPCAST, PRECISION)

    dk_ptrs = _token_ptrs(DK + batch * sdk_b + head * sdk_h, ky, kx, sdk_y, sdk_x, sdk_d, offs_d, WIDE)
    dv_ptrs = _token_ptrs(DV + batch * sdv_b + head * sdv_h, ky, kx, sdv_y, sdv_x, sdv_d, offs_d, WIDE)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=nd_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=nd_mask)


def _tile(rows, cap):
    """Power-of-two tile covering ``rows``, at least the MMA minimum and at most ``cap``."""
    return max(MIN_TILE, min(cap, triton.next_power_of_2(rows)))


def _tiles(resident_rows, streamed_rows, head_dim, dtype):
    """Tile sizes and warp count of one kernel.

    ``resident_rows``: the tokens a program keeps for its whole loop (a region, or a part of it);
    ``streamed_rows``: the length of the routed token list it walks. An operand tile holds at most
    ``TILE_BYTES``, and 8 warps share the largest ones: both keep the kernels (nearly) free of
    register spills, as checked by compiling them for sm_80 and sm_90.
    """
    block_d = _tile(head_dim, MAX_HEAD_DIM)
    max_rows = TILE_BYTES // (block_d * dtype.itemsize)
    block_r = _tile(resident_rows, min(MAX_RESIDENT_TILE, max_rows))
    block_s = _tile(streamed_rows, min(STREAM_TILE, max_rows))
    num_warps = 8 if max(block_r, block_s) * block_d * dtype.itemsize >= TILE_BYTES else 4
    return block_r, block_s, block_d, num_warps


def _launch_options(dtype, num_warps, *tensors):
    """Compile-time options shared by the kernels of one call on ``tensors``."""
    interpreted = triton_interpreted()
    options = dict(UPCAST=interpreted and dtype == torch.bfloat16, PRECISION=dot_precision(dtype),
                   WIDE=needs_wide_offsets(*tensors))
    if not interpreted:   # launch tuning is meaningless (and partly unsupported) in the interpreter
        options.update(num_warps=num_warps, num_stages=2)
    return options


def _geometry(q, regions):
    batch, height, width, heads, head_dim = q.shape
    p_h, p_w = regions
    return batch, heads, head_dim, width, p_h * p_w, p_w, height // p_h, width // p_w


def forward(q, k, v, region_index, regions, scale):
    """Output ``[B, H, W, heads, D]`` and the per-query log2-sum-exp ``[B, heads, H, W]`` (float32)."""
    batch, heads = q.shape[0], q.shape[3]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, q.shape[1], q.shape[2]), dtype=torch.float32, device=q.device)
    check_heads_fit_grid(OP_NAME, heads)                 # heads on grid axis y
    for rows in batch_chunks(OP_NAME, batch, 1):         # images on grid axis z
        _forward_launch(q[rows], k[rows], v[rows], out[rows], lse[rows], region_index[rows], regions, scale)
    return out, lse


def _forward_launch(q, k, v, out, lse, region_index, regions, scale):
    batch, heads, head_dim, width, n_regions, p_w, region_h, region_w = _geometry(q, regions)
    tokens, topk = region_h * region_w, region_index.shape[-1]
    block_m, block_n, block_d, num_warps = _tiles(tokens, topk * tokens, head_dim, q.dtype)
    query_blocks = triton.cdiv(tokens, block_m)
    _routing_fwd_kernel[(n_regions * query_blocks, heads, batch)](
        q, k, v, out, lse, region_index,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        lse.stride(0), lse.stride(1), width,
        region_index.stride(0), region_index.stride(1),
        p_w, region_h, region_w, topk, scale * LOG2E, query_blocks,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        **_launch_options(q.dtype, num_warps, q, k, v, out))


def inverse_routing(region_index, n_regions):
    """For every key region, the query regions that routed to it, as CSR lists.

    Returns ``query_regions`` (int32, ``B * n_regions * topk``: query region ids grouped by
    (batch, key region)) and ``offsets`` (int32, ``B * n_regions + 1``): the list of key region
    ``j`` of image ``b`` is ``query_regions[offsets[b * n_regions + j]:offsets[b * n_regions + j + 1]]``.
    Built with a sort on the index's device; duplicates in a routing list stay duplicated.
    """
    batch, _, topk = region_index.shape
    device = region_index.device
    image = torch.arange(batch, device=device).view(batch, 1, 1)
    key_list = (region_index.long() + image * n_regions).flatten()   # entry b*n*topk + r*topk + slot
    sorted_keys, order = torch.sort(key_list, stable=True)
    query_regions = (order % (n_regions * topk)) // topk
    # searchsorted rather than bincount + cumsum: bincount syncs with the host on CUDA
    offsets = torch.searchsorted(sorted_keys, torch.arange(batch * n_regions + 1, device=device), out_int32=True)
    return query_regions.to(torch.int32), offsets


def backward(grad_out, q, k, v, out, lse, region_index, regions, scale):
    """Gradients of q, k and v (each ``[B, H, W, heads, D]`` in the input dtype)."""
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty_like(lse)
    check_heads_fit_grid(OP_NAME, q.shape[3])             # heads on grid axis y
    for rows in batch_chunks(OP_NAME, q.shape[0], 1):     # images on grid axis z
        _backward_launch(grad_out[rows], q[rows], k[rows], v[rows], out[rows], lse[rows], delta[rows],
                         region_index[rows], dq[rows], dk[rows], dv[rows], regions, scale)
    return dq, dk, dv


def _backward_launch(grad_out, q, k, v, out, lse, delta, region_index, dq, dk, dv, regions, scale):
    batch, heads, head_dim, width, n_regions, p_w, region_h, region_w = _geometry(q, regions)
    tokens, topk = region_h * region_w, region_index.shape[-1]
    # dQ: query tiles cover (part of) a region and walk its routed keys, as in the forward; dK/dV:
    # key tiles cover (part of) a region and walk the queries of the regions routed to it.
    resident, streamed, block_d, num_warps = _tiles(tokens, topk * tokens, head_dim, q.dtype)
    options = _launch_options(q.dtype, num_warps, q, k, v, out, grad_out, dq)
    query_blocks = triton.cdiv(tokens, resident)
    _routing_bwd_dq_kernel[(n_regions * query_blocks, heads, batch)](
        q, k, v, out, grad_out, dq, lse, delta, region_index,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *dq.stride(),
        lse.stride(0), lse.stride(1), width,
        region_index.stride(0), region_index.stride(1),
        p_w, region_h, region_w, topk, scale * LOG2E, scale, query_blocks,
        HEAD_DIM=head_dim, BLOCK_M=resident, BLOCK_N=streamed, BLOCK_D=block_d, **options)

    query_regions, offsets = inverse_routing(region_index, n_regions)
    key_blocks = triton.cdiv(tokens, resident)
    _routing_bwd_dkdv_kernel[(n_regions * key_blocks, heads, batch)](
        q, k, v, grad_out, dk, dv, lse, delta, query_regions, offsets,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        lse.stride(0), lse.stride(1), width,
        n_regions, p_w, region_h, region_w, scale * LOG2E, scale, key_blocks,
        HEAD_DIM=head_dim, BLOCK_M=streamed, BLOCK_N=resident, BLOCK_D=block_d, **options)
