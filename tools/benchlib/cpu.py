"""The CPU section of tools/benchmark.py: what CI, the demo and every CPU user run.

Kernel cases (both ops, fp32 by default), each timed forward and forward + backward in one run:

- ``attnzoo-cpu``: the op as called by default on CPU tensors (its CPU kernels);
- ``reference``: the plain PyTorch reference (``backend="reference"``), the baseline;
- ``sdpa-dense``: ``scaled_dot_product_attention`` over the whole map, all ``HW x HW`` scores (not
  the same attention: the dense cost that local / routed attention is meant to avoid).

Shapes: NAT stage 1 at 224 px (``[2, 56, 56, 2, 32]``, kernel 7, rpb; also batch 8), a DiNAT-L
sized kernel 11 with dilation 2 on stage 2, and BiFormer-S's three routed stages at 224 px, batch 8
(56 / 28 / 14 maps, 7x7 regions, topk 1 / 4 / 16, BiFormer's ``dim ** -0.5`` scale). Then TransNeXt's
aggregated attention (``benchlib/transnext.py``): the op against the official native sequence (its
baseline) at TransNeXt-Tiny's stages 1-2, and TransNeXt-Micro / Tiny models fused vs native.

Model cases: one training step (forward, ``sum().backward()``) of ``nat_mini`` against
``cswin_tiny_224`` (about the same FLOPs at 224 px) at 224 px (batch 2) and 32 px (batch 16, the
demo's digits), and ``nat_mini`` again with the reference kernels (``use_backend("reference")``).

On a shared machine every case's implementations are timed in turns (one call of each per round)
and medians are reported: wall time, and process CPU time, which the other processes' load
inflates less. Peak memory: CPU memory allocated at the peak of one call (:func:`harness.cpu_peak_mib`).
"""
import contextlib
from functools import partial
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from attnzoo.kernels import neighborhood_attention_2d, routing_attention, routing_region_index

from . import transnext
from .harness import CpuCase

HEAD_DIM = 32


def sdpa_dense(q, k, v, scale=None, **_):
    """Full attention over the whole map, heads-last in and out."""
    batch, height, width, heads, head_dim = q.shape
    q, k, v = (t.reshape(batch, height * width, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out.transpose(1, 2).reshape(batch, height, width, heads, head_dim)


def _qkv(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen).to(dtype).requires_grad_() for _ in range(3)]


def neighborhood_case(name, shape, kernel, dilation=1):
    heads = shape[3]

    def make(dtype):
        q, k, v = _qkv(shape, dtype)
        rpb = (torch.randn(heads, 2 * kernel - 1, 2 * kernel - 1, generator=torch.Generator().manual_seed(1)) * 0.02)
        return dict(q=q, k=k, v=v, rpb=rpb.requires_grad_())

    op = partial(neighborhood_attention_2d, kernel_size=kernel, dilation=dilation)
    return CpuCase('neighborhood', name, make, {'attnzoo-cpu': op, 'reference': partial(op, backend='reference'),
                                                'sdpa-dense': sdpa_dense})


def routing_case(name, shape, n_win, topk):
    scale = (shape[3] * HEAD_DIM) ** -0.5

    def make(dtype):
        q, k, v = _qkv(shape, dtype)
        regions = (n_win, n_win)
        return dict(q=q, k=k, v=v, region_index=routing_region_index(q, k, regions, topk), regions=regions)

    op = partial(routing_attention, scale=scale)
    return CpuCase('routing', name, make, {'attnzoo-cpu': op, 'reference': partial(op, backend='reference'),
                                           'sdpa-dense': partial(sdpa_dense, scale=scale)})


def kernel_cases(quick: bool) -> List[CpuCase]:
    if quick:
        return [neighborhood_case('nat 14x14 h1 k7 b1', (1, 14, 14, 1, HEAD_DIM), 7),
                routing_case('biformer 8x8 h1 regions 2x2 topk2 b1', (1, 8, 8, 1, HEAD_DIM), 2, 2)
                ] + transnext.cpu_cases(quick)
    return [
        neighborhood_case('nat s1 56x56 h2 k7 b2', (2, 56, 56, 2, HEAD_DIM), 7),
        neighborhood_case('nat s1 56x56 h2 k7 b8', (8, 56, 56, 2, HEAD_DIM), 7),
        neighborhood_case('dinat-l s2 28x28 h12 k11 d2 b2', (2, 28, 28, 12, HEAD_DIM), 11, 2),
        routing_case('biformer-s s1 56x56 h2 topk1 b8', (8, 56, 56, 2, HEAD_DIM), 7, 1),
        routing_case('biformer-s s2 28x28 h4 topk4 b8', (8, 28, 28, 4, HEAD_DIM), 7, 4),
        routing_case('biformer-s s3 14x14 h8 topk16 b8', (8, 14, 14, 8, HEAD_DIM), 7, 16),
    ] + transnext.cpu_cases(quick)


def kernel_calls(case: CpuCase, dtype) -> Tuple[Dict[str, Callable], Dict[str, Callable]]:
    """Forward (no grad) and forward + backward calls of every implementation of ``case``."""
    inputs = case.make(dtype)
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def forward(impl):
        with torch.no_grad():
            impl(**inputs)

    def forward_backward(impl):
        out = impl(**inputs)
        torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)   # sdpa-dense takes no rpb

    return ({name: partial(forward, impl) for name, impl in case.impls.items()},
            {name: partial(forward_backward, impl) for name, impl in case.impls.items()})


# ----------------------------------------------------------------------------- models

MODEL_STEPS = (  # (input size, batch): the two settings
    (224, 2),
    (32, 16),
)
MODEL_BASELINE = 'cswin_tiny_224'
MODELS = ('nat_mini',)   # each also with the reference kernels
REFERENCE_SUFFIX = ' (reference kernels)'


def model_calls(size, batch, dtype) -> Dict[str, Callable]:
    """A training step of the baseline and every model at ``size`` px, and of every model with the
    reference kernels."""
    import timm
    import attnzoo.backbones  # noqa: F401  registers the attnzoo families
    from attnzoo.kernels import use_backend

    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    calls = {}
    for name in (MODEL_BASELINE,) + MODELS:
        model = timm.create_model(name).to(dtype=dtype).train()

        def step(model=model, backend=None):
            with use_backend(backend) if backend else contextlib.nullcontext():
                model(x).float().sum().backward()
            model.zero_grad(set_to_none=True)

        calls[name] = step
        if name != MODEL_BASELINE:
            calls[name + REFERENCE_SUFFIX] = partial(step, backend='reference')
    return calls
