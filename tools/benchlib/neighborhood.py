"""Benchmark cases of neighborhood_attention_2d: attnzoo's Triton kernel, its PyTorch reference, compiled
FlexAttention with a neighborhood mask_mod (the baseline) and NATTEN where its CUDA library is present.

Shapes: NAT-Tiny stages 1-3 at 224 px (56², 28², 14², k=7, head_dim 32, rpb) and TransNeXt-Tiny stages
1-3 at 224 px (zero-padded 3x3 window, head_dim 24, 49 pooled tokens as extra keys, rpb), batch 128.
"""
from functools import partial

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attnzoo.kernels import neighborhood_attention_2d
from attnzoo.kernels.neighborhood import axis_neighbors

from .harness import KernelCase

SECTION = 'neighborhood'
# every case compiles flex_attention for its own mask and score mods, in grad and no-grad mode
FLEX_RECOMPILES = 64


def _axis_tables(length, kernel, dilation, border, device):
    """[query, key] tables of one axis: key in window, and the key's relative-position-bias index."""
    keys, valid, bias_index = axis_neighbors(length, kernel, dilation, border, device)
    allowed = torch.zeros(length, length, dtype=torch.bool, device=device)
    rel = torch.zeros(length, length, dtype=torch.long, device=device)
    rows = torch.arange(length, device=device)[:, None].expand_as(keys)
    allowed[rows[valid], keys[valid]] = True
    rel[rows[valid], keys[valid]] = bias_index[valid]
    return allowed, rel


class FlexNeighborhood:
    """FlexAttention with the window as a mask_mod and the rpb as a score_mod, extra tokens appended to the
    keys. Block mask and compiled function are built once per case and device."""

    def __init__(self, height, width, kernel, dilation, border, n_extra):
        self.geometry = (height, width, kernel, dilation, border)
        self.n_extra = n_extra
        self.built = {}

    def _build(self, device):
        height, width, kernel, dilation, border = self.geometry
        rows, rel_rows = _axis_tables(height, kernel, dilation, border, device)
        cols, rel_cols = _axis_tables(width, kernel, dilation, border, device)
        tokens = height * width

        def split(idx):
            inside = idx < tokens
            idx = torch.where(inside, idx, 0)
            return inside, idx // width, idx % width

        def mask_mod(b, h, q_idx, kv_idx):
            inside, ky, kx = split(kv_idx)
            return ~inside | (rows[q_idx // width, ky] & cols[q_idx % width, kx])

        def bias_mod(rpb, score, b, h, q_idx, kv_idx):
            inside, ky, kx = split(kv_idx)
            bias = rpb[h, rel_rows[q_idx // width, ky], rel_cols[q_idx % width, kx]]
            return score + torch.where(inside, bias, 0.0)

        block_mask = create_block_mask(mask_mod, None, None, tokens, tokens + self.n_extra, device=device)
        # the compiled kernel needs a GPU; CPU smoke runs take the eager (dense) path
        fn = torch.compile(flex_attention, dynamic=False) if device.type == 'cuda' else flex_attention
        return block_mask, bias_mod, fn

    def __call__(self, q, k, v, rpb=None, extra_k=None, extra_v=None):
        if q.device not in self.built:
            self.built[q.device] = self._build(q.device)
        block_mask, bias_mod, fn = self.built[q.device]
        if q.device.type == 'cpu' and not torch.is_grad_enabled():
            # FlexAttention refuses CPU inputs that require grad even under no_grad
            q, k, v, extra_k, extra_v = (t.detach() if t is not None else None for t in (q, k, v, extra_k, extra_v))
        batch, height, width, heads, head_dim = q.shape
        k, v = k.flatten(1, 2), v.flatten(1, 2)
        if extra_k is not None:
            k, v = torch.cat([k, extra_k], dim=1), torch.cat([v, extra_v], dim=1)
        out = fn(q.flatten(1, 2).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                 score_mod=partial(bias_mod, rpb) if rpb is not None else None, block_mask=block_mask)
        return out.transpose(1, 2).unflatten(1, (height, width))


def _natten_available():
    try:
        import natten
    except ImportError:
        return False
    return bool(natten.HAS_LIBNATTEN)


def _case(name, batch, height, heads, head_dim, kernel, border, n_extra, with_natten):
    def make_inputs(device, dtype):
        def leaf(*shape, dtype=dtype):
            return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
        inputs = dict(q=leaf(batch, height, height, heads, head_dim), k=leaf(batch, height, height, heads, head_dim),
                      v=leaf(batch, height, height, heads, head_dim),
                      rpb=leaf(heads, 2 * kernel - 1, 2 * kernel - 1, dtype=torch.float32))
        if n_extra:
            inputs.update(extra_k=leaf(batch, n_extra, heads, head_dim), extra_v=leaf(batch, n_extra, heads, head_dim))
        return inputs

    def min_bytes(inputs):
        q = inputs['q']
        return sum(t.numel() * t.element_size() for t in inputs.values()) + q.numel() * q.element_size()

    impls = {
        'attnzoo-triton': partial(neighborhood_attention_2d, kernel_size=kernel, border=border, backend='triton'),
        'reference': partial(neighborhood_attention_2d, kernel_size=kernel, border=border, backend='reference'),
        'flex': FlexNeighborhood(height, height, kernel, 1, border, n_extra),
    }
    if with_natten:
        def natten_no_rpb(q, k, v, rpb=None, extra_k=None, extra_v=None):
            return neighborhood_attention_2d(q, k, v, kernel, extra_k=extra_k, extra_v=extra_v, backend='natten')
        impls['natten-no-rpb'] = natten_no_rpb   # NATTEN >= 0.20 has no rpb: a lower bound of its cost
    return KernelCase(SECTION, name, make_inputs, impls, 'flex', min_bytes)


def cases(quick: bool):
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILES)
    natten = _natten_available()
    if quick:
        return [_case('nat 14x14 h1 d32 k7 b1', 1, 14, 1, 32, 7, 'clamp', 0, natten),
                _case('transnext 9x9 h1 d24 k3 +4 b1', 1, 9, 1, 24, 3, 'zero', 4, False)]
    # NAT-Tiny: 64 channels, heads 2 / 4 / 8, k = 7; TransNeXt-Tiny: 72 channels, heads 3 / 6 / 12,
    # 3x3 zero-padded window plus the 7x7 pooled tokens; both at 224 px, batch 128
    nat = [_case(f'nat_tiny s{stage} {size}x{size} h{heads} d32 k7 b128', 128, size, heads, 32, 7, 'clamp', 0, natten)
           for stage, size, heads in ((1, 56, 2), (2, 28, 4), (3, 14, 8))]
    transnext = [_case(f'transnext_tiny s{stage} {size}x{size} h{heads} d24 k3 +49 b128', 128, size, heads, 24, 3,
                       'zero', 49, False)
                 for stage, size, heads in ((1, 56, 3), (2, 28, 6), (3, 14, 12))]
    return nat + transnext
