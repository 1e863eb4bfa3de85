"""Benchmark cases of ``routing_attention`` (BiFormer's bi-level routing attention).

Implementations, all with the op's signature ``(q, k, v, region_index, regions, scale)`` on
heads-last ``[B, H, W, heads, D]`` tensors:

- ``attnzoo-triton``: the fused kernels;
- ``gather-reference``: BiFormer's own formulation (gather ``topk`` copies of the routed K/V
  regions, dense attention per region); the baseline;
- ``flex``: FlexAttention (compiled on CUDA) with a block mask from ``BlockMask.from_kv_blocks``;
  tokens are permuted region-major (each region padded to a power of two, or to a multiple of the
  128-token block) and back, and the mask is built from the routing on every call, since routing
  changes every forward: both are part of its cost. A mask is a set, so routing lists must not
  repeat a region (top-k lists never do);
- ``sdpa-dense``: ``scaled_dot_product_attention`` over the whole map (not the same attention: the
  dense cost routing is meant to avoid).

Shapes: BiFormer-T/S stages 1-3 at 224 px (batch 128, n_win 7, topk 1/4/16; T and S share the
stage shapes), ADE20K at 512 px (batch 16, n_win 8) and detection on an 800x1216 input (batch 2,
n_win 16, maps padded to the grid as BiFormer's ``auto_pad`` does). Head dim 32 everywhere; the
scale is BiFormer's ``dim ** -0.5`` of the full width.
"""
import functools
from dataclasses import dataclass
from typing import Dict, List

import torch
import torch.nn.functional as F

from attnzoo.kernels.routing import routing_attention, routing_attention_reference, routing_region_index

from .harness import KernelCase

SECTION = 'routing'
HEAD_DIM = 32
FLEX_BLOCK = 128
# Channels, heads and topk of BiFormer-T/S stages 1-3 (stage 4 is plain attention).
BIFORMER_STAGES = ((64, 2, 1), (128, 4, 4), (256, 8, 16))


@dataclass(frozen=True)
class RoutingShape:
    name: str
    batch: int
    height: int
    width: int
    heads: int
    n_win: int
    topk: int


def _ceil_div(value, divisor):
    return -(-value // divisor)


def stage_shapes(prefix, batch, input_hw, n_win):
    """Stages 1-3 of a BiFormer-T/S on an ``input_hw`` image (strides 4, 8, 16; padded convolutions
    round up), maps padded up to the region grid."""
    shapes = []
    for stage, (_, heads, topk) in enumerate(BIFORMER_STAGES, 1):
        stride = 2 ** (stage + 1)
        height, width = (_ceil_div(_ceil_div(size, stride), n_win) * n_win for size in input_hw)
        shapes.append(RoutingShape(f'{prefix}_s{stage}_{height}x{width}_topk{topk}_b{batch}', batch, height, width,
                                   heads, n_win, topk))
    return shapes


def shapes(quick: bool) -> List[RoutingShape]:
    if quick:
        return [RoutingShape('tiny_region4x4_topk2_b1', 1, 8, 8, 1, 2, 2),
                RoutingShape('tiny_region3x5_topk3_b1', 1, 6, 10, 1, 2, 3)]
    return (stage_shapes('biformer224', 128, (224, 224), 7) + stage_shapes('ade512', 16, (512, 512), 8)
            + stage_shapes('det800x1216', 2, (800, 1216), 16))


def make_inputs(shape: RoutingShape):
    def make(device, dtype) -> Dict[str, object]:
        generator = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(shape.batch, shape.height, shape.width, shape.heads, HEAD_DIM, device=device,
                               dtype=dtype, generator=generator).requires_grad_() for _ in range(3))
        regions = (shape.n_win, shape.n_win)
        return dict(q=q, k=k, v=v, region_index=routing_region_index(q, k, regions, shape.topk), regions=regions,
                    scale=(shape.heads * HEAD_DIM) ** -0.5)
    return make


def _min_bytes(inputs) -> int:
    """q, k, v read once, the output written once, the routing read once."""
    q = inputs['q']
    return 4 * q.numel() * q.element_size() + inputs['region_index'].numel() * inputs['region_index'].element_size()


def attnzoo_triton(q, k, v, region_index, regions, scale):
    return routing_attention(q, k, v, region_index, regions, scale, backend='triton')


def sdpa_dense(q, k, v, region_index, regions, scale):
    """Full attention over the whole map (ignores the routing)."""
    batch, height, width, heads, head_dim = q.shape
    q, k, v = (t.reshape(batch, height * width, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(batch, height, width, heads, head_dim)


class _FlexLayout:
    """Region-major token order for FlexAttention, and block masks from region routing.

    Region ``r`` occupies tokens ``[r * padded, r * padded + tokens)`` of a sequence padded to a
    multiple of the 128-token block; ``padded`` is a power of two (several regions per block) or
    a multiple of the block, so no region straddles blocks unevenly.
    """

    def __init__(self, shape, regions, device):
        self.batch, self.height, self.width, self.heads, self.head_dim = shape
        self.p_h, self.p_w = regions
        self.region_h, self.region_w = self.height // self.p_h, self.width // self.p_w
        self.tokens = self.region_h * self.region_w
        self.padded = (1 << (self.tokens - 1).bit_length() if self.tokens <= FLEX_BLOCK
                       else _ceil_div(self.tokens, FLEX_BLOCK) * FLEX_BLOCK)
        self.n_regions = self.p_h * self.p_w
        self.length = _ceil_div(self.n_regions * self.padded, FLEX_BLOCK) * FLEX_BLOCK
        self.slots = self.length // self.padded   # regions plus empty padding regions
        region_of_token = torch.arange(self.length, device=device) // self.padded
        # region_blocks[r, j] = 1 when region r has tokens in block j
        self.region_blocks = F.one_hot(region_of_token.view(-1, FLEX_BLOCK), self.slots).amax(1).T.float()

    def to_sequence(self, x):
        """``[B, H, W, heads, D]`` -> ``[B, heads, length, D]``."""
        x = x.reshape(self.batch, self.p_h, self.region_h, self.p_w, self.region_w, self.heads, self.head_dim)
        x = x.permute(0, 5, 1, 3, 2, 4, 6).reshape(self.batch, self.heads, self.n_regions, self.tokens, self.head_dim)
        x = F.pad(x, (0, 0, 0, self.padded - self.tokens)).flatten(2, 3)
        return F.pad(x, (0, 0, 0, self.length - self.n_regions * self.padded))

    def from_sequence(self, x):
        x = x[:, :, :self.n_regions * self.padded].unflatten(2, (self.n_regions, self.padded))[:, :, :, :self.tokens]
        x = x.reshape(self.batch, self.heads, self.p_h, self.p_w, self.region_h, self.region_w, self.head_dim)
        return x.permute(0, 2, 4, 3, 5, 1, 6).reshape(self.batch, self.height, self.width, self.heads, self.head_dim)

    def block_mask(self, region_index):
        from torch.nn.attention.flex_attention import BlockMask
        routed = torch.zeros(self.batch, self.slots, self.slots, dtype=torch.bool, device=region_index.device)
        routed[:, :self.n_regions].scatter_(2, region_index.long(), True)
        blocks = (self.region_blocks.T @ routed.float() @ self.region_blocks) > 0         # [B, q block, kv block]
        num_blocks = blocks.sum(-1, dtype=torch.int32)[:, None]
        indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)[:, None]
        padded, tokens = self.padded, self.tokens

        def mask_mod(b, h, q_idx, kv_idx):
            return routed[b, q_idx // padded, kv_idx // padded] & (kv_idx % padded < tokens)

        if tokens % FLEX_BLOCK == 0:   # every routed block is entirely valid: no mask_mod work
            return BlockMask.from_kv_blocks(torch.zeros_like(num_blocks), indices, num_blocks, indices,
                                            BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod)
        return BlockMask.from_kv_blocks(num_blocks, indices, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod)


@functools.lru_cache(maxsize=None)
def _flex_layout(shape, regions, device):
    return _FlexLayout(shape, regions, device)


class FlexRouting:
    """FlexAttention over region-major tokens; compiled on CUDA, once per case (eager elsewhere)."""

    def __init__(self):
        self._flex = None

    def _attention(self, device):
        if self._flex is None:
            from torch.nn.attention.flex_attention import flex_attention
            if device.type == 'cuda':
                # every case compiles its own graph; keep dynamo from falling back to eager after 8
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                self._flex = torch.compile(flex_attention, dynamic=False)
            else:
                self._flex = flex_attention
        return self._flex

    def __call__(self, q, k, v, region_index, regions, scale):
        layout = _flex_layout(tuple(q.shape), tuple(regions), q.device)
        out = self._attention(q.device)(*(layout.to_sequence(t) for t in (q, k, v)),
                                        block_mask=layout.block_mask(region_index), scale=scale)
        return layout.from_sequence(out)


def cases(quick: bool) -> List[KernelCase]:
    return [KernelCase(section=SECTION, name=shape.name, make_inputs=make_inputs(shape),
                       impls={'attnzoo-triton': attnzoo_triton, 'gather-reference': routing_attention_reference,
                              'flex': FlexRouting(), 'sdpa-dense': sdpa_dense},
                       baseline='gather-reference', min_bytes=_min_bytes)
            for shape in shapes(quick)]
