"""Routing attention on CPU: routed regions read whole, or one dense masked attention.

The reference (BiFormer's ``KVGather``) gathers the routed regions from a tensor expanded over
every query region, so its backward scatters into ``[B, n, n, tokens, heads, D]`` before summing:
most of its time. Two paths here, both plain PyTorch, differentiable by autograd:

- *gathered* (few routed regions, the usual case): K and V are laid out region-major with the
  heads outside (``[B * heads * n, tokens, D]``, one copy each), every query region's routed
  regions are taken with one ``index_select`` of whole regions (its backward is an ``index_add``
  of whole regions), then one batched matmul, softmax, matmul per query region;
- *dense* (routed regions a large share of the grid, regions of a few tokens, e.g. BiFormer's
  third stage, 16 of 49 regions of 2x2 tokens): attention over the whole map through PyTorch's
  fused CPU attention (``scaled_dot_product_attention``) with an additive mask built from the
  routing: ``log(count)`` for a region listed ``count`` times (a region listed twice enters the
  softmax twice, as gathering it twice does), ``-inf`` for regions not listed. Its mask is
  ``[B, HW, HW]``, which is chosen only while that is smaller than the gathered path's logits
  (``n <= heads * topk``), so memory stays below the reference's.
"""
import torch
import torch.nn.functional as F


def _region_major(x, regions):
    """``[B, H, W, heads, D]`` -> ``[B * heads * n, tokens, D]`` (a copy): heads outside, regions row-major."""
    batch, height, width, heads, head_dim = x.shape
    p_h, p_w = regions
    x = x.view(batch, p_h, height // p_h, p_w, width // p_w, heads, head_dim).permute(0, 5, 1, 3, 2, 4, 6)
    return x.reshape(batch * heads * p_h * p_w, (height // p_h) * (width // p_w), head_dim)


def _from_region_major(x, shape, regions):
    batch, height, width, heads, head_dim = shape
    p_h, p_w = regions
    x = x.view(batch, heads, p_h, p_w, height // p_h, width // p_w, head_dim).permute(0, 2, 4, 3, 5, 1, 6)
    return x.reshape(shape)


def _gathered(q, k, v, region_index, regions, scale):
    batch, _, _, heads, head_dim = q.shape
    n_regions, topk = regions[0] * regions[1], region_index.shape[-1]
    # routed region j of query region r, for batch b and head h, in the [B * heads * n] region axis
    offsets = torch.arange(batch * heads, device=q.device).view(batch, heads, 1, 1) * n_regions
    routed = (region_index.long()[:, None] + offsets).flatten()

    def routed_tokens(x):   # [B * heads * n, topk * tokens, D]: the routed regions, back to back
        x = _region_major(x, regions)
        return x.index_select(0, routed).view(x.shape[0], topk * x.shape[1], head_dim)

    queries = _region_major(q, regions) * scale
    logits = torch.bmm(queries, routed_tokens(k).transpose(1, 2))
    probs = logits.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    out = torch.bmm(probs, routed_tokens(v))
    return _from_region_major(out, q.shape, regions)


def _routing_mask(region_index, regions, height, width, dtype):
    """``[B, 1, HW, HW]`` additive mask: ``log(count)`` of the key's region in the query region's list."""
    batch, n_regions, _ = region_index.shape
    p_h, p_w = regions
    device = region_index.device
    counts = torch.zeros(batch, n_regions, n_regions, device=device, dtype=torch.promote_types(dtype, torch.float32))
    counts.scatter_add_(2, region_index.long(), counts.new_ones(region_index.shape))
    region_of_token = ((torch.arange(height, device=device) // (height // p_h))[:, None] * p_w
                       + torch.arange(width, device=device) // (width // p_w)).flatten()
    bias = counts.log()[:, region_of_token][:, :, region_of_token]
    return bias.unsqueeze(1).to(dtype)


def _dense(q, k, v, region_index, regions, scale):
    batch, height, width, heads, head_dim = q.shape
    mask = _routing_mask(region_index, regions, height, width, q.dtype)
    # [B, HW, heads, D] views as [B, heads, HW, D]: no copy, the fused kernel reads strides
    q_seq, k_seq, v_seq = (t.flatten(1, 2).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q_seq, k_seq, v_seq, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(q.shape)


def prefers_dense(n_regions, heads, topk):
    """The dense path when its ``[HW, HW]`` mask is no larger than the gathered logits
    (``heads * HW * topk * tokens``); measured faster there too (tools/benchmark.py cpu)."""
    return n_regions <= heads * topk


def routing_attention_cpu(q, k, v, region_index, regions, scale):
    """Arguments as :func:`routing_attention_reference`, already validated (``regions`` a pair,
    ``scale`` a float)."""
    n_regions, heads, topk = regions[0] * regions[1], q.shape[3], region_index.shape[-1]
    path = _dense if prefers_dense(n_regions, heads, topk) else _gathered
    return path(q, k, v, region_index, regions, scale)
