"""TransNeXt's aggregated attention: the fused neighborhood op against the official native op sequence.

The issue's goal on a GPU: a training step of the fused path at least 2x the native path's, with at
most half its peak memory. Two levels, each timed forward (no grad) and forward + backward:

- kernel: one aggregated-attention call at TransNeXt-Tiny's stage-1 / stage-2 shapes (224 px: 56 x 56
  with 3 heads and 28 x 28 with 6, heads of 24, 3 x 3 zero-padded window, 49 pooled tokens, the local
  bias, the pool CPB bias ``[heads, H * W, 49]`` and the learnable tokens' window weight). Inputs are
  what the model hands the op: q, k / v as views of one kv projection, pooled k / v as views of the
  pooled projection, all of them leaves with gradients. Implementations:

  - ``attnzoo-triton`` (GPU) / ``attnzoo-cpu`` (CPU): ``neighborhood_attention_2d`` on the device's
    kernels, what ``attn_impl='fused'`` runs;
  - ``native``: the official ``attention_native.py`` sequence (``F.unfold`` of the keys and values,
    masked window logits, one softmax over window and pool, the window weight added after it), the
    baseline: what ``attn_impl='native'`` runs;
  - ``reference``: the op's PyTorch reference (a gather of every window).

- model: one ``transnext_micro`` / ``transnext_tiny`` at 224 px, the same weights switched between
  ``attn_impl='fused'`` and ``'native'`` (forward + backward = a training step's gradients of every
  parameter, returned rather than accumulated).
"""
from functools import partial
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

from attnzoo.kernels import neighborhood_attention_2d

from .harness import CpuCase, KernelCase

SECTION = 'neighborhood'
WINDOW = 3
HEAD_DIM = 24
# (name, batch, map size, heads, pooled tokens): TransNeXt-Tiny at 224 px (sr 8 / 4: 7 x 7 pools)
GPU_SHAPES = (('transnext_tiny aggregated s1 56x56 h3 d24 k3 +49 b128', 128, 56, 3, 49),
              ('transnext_tiny aggregated s2 28x28 h6 d24 k3 +49 b128', 128, 28, 6, 49))
CPU_SHAPES = (('transnext_tiny aggregated s1 56x56 h3 d24 k3 +49 b2', 2, 56, 3, 49),
              ('transnext_tiny aggregated s2 28x28 h6 d24 k3 +49 b2', 2, 28, 6, 49))
QUICK_SHAPE = ('transnext aggregated 9x9 h1 d24 k3 +4 b1', 1, 9, 1, 4)
GPU_MODELS = (('transnext_micro', 64), ('transnext_tiny', 64))      # (model, batch) at 224 px
CPU_MODELS = (('transnext_micro', 2), ('transnext_tiny', 2))
MODEL_SIZE = 224


def native_aggregated_attention(q, k, v, rpb, extra_k, extra_v, extra_bias, window_weight, **_):
    """Aggregated attention as the official ``attention_native.py`` computes it (after the projections),
    on the op's heads-last inputs: ``rpb`` is the op's ``[heads, 5, 5]`` table around the ``[heads, 9]``
    local bias, ``extra_bias`` ``[heads, H * W, L]``, ``window_weight`` ``[B, H, W, heads, 9]``; q scaled."""
    from attnzoo.backbones.transnext import local_window_context
    batch, height, width, heads, head_dim = q.shape
    local_len = WINDOW ** 2
    _, padding_mask = local_window_context(height, width, WINDOW, extra_k.shape[1], q.device)
    q = q.permute(0, 3, 1, 2, 4).flatten(2, 3)                                       # [B, heads, N, D]
    kv = torch.cat([k, v], dim=3).permute(0, 3, 4, 1, 2).reshape(batch, -1, height, width)
    k_local, v_local = F.unfold(kv, WINDOW, padding=WINDOW // 2).reshape(
        batch, 2 * heads, head_dim, local_len, -1).permute(0, 1, 4, 2, 3).chunk(2, dim=1)   # [B, heads, N, D, 9]
    local_bias = rpb[:, 1:1 + WINDOW, 1:1 + WINDOW].reshape(heads, 1, local_len)
    attn_local = ((q.unsqueeze(-2) @ k_local).squeeze(-2) + local_bias).masked_fill(padding_mask, float('-inf'))
    attn_pool = q @ extra_k.permute(0, 2, 3, 1) + extra_bias
    attn = torch.cat([attn_local, attn_pool], dim=-1).softmax(dim=-1)
    attn_local, attn_pool = attn[..., :local_len], attn[..., local_len:]
    weights = window_weight.permute(0, 3, 1, 2, 4).flatten(2, 3) + attn_local
    x_local = (weights.unsqueeze(-2) @ v_local.transpose(-2, -1)).squeeze(-2)
    out = x_local + attn_pool @ extra_v.transpose(1, 2)
    return out.unflatten(2, (height, width)).permute(0, 2, 3, 1, 4)


def make_call_inputs(batch, height, width, heads, n_pool, seed=0, weight_std=0.1):
    """``make(device, dtype)`` of one aggregated-attention call, laid out as the model makes it: q on its own,
    k / v heads-last views of one kv projection, the pooled k / v views of the pooled projection, the
    ``[heads, 9]`` local bias as the centre of the op's 5 x 5 rpb table, the pool bias ``[heads, H * W, L]``
    and the window weight ``[B, H, W, heads, 9]`` (``weight_std``; the biases float32, as under autocast)."""
    def make(device, dtype):
        gen = torch.Generator().manual_seed(seed)

        def randn(*shape, dtype=dtype):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        kv = randn(batch, height, width, 2, heads, HEAD_DIM).requires_grad_()
        kv_pool = randn(batch, n_pool, 2, heads, HEAD_DIM).requires_grad_()
        k, v = kv.unbind(3)
        extra_k, extra_v = kv_pool.unbind(2)
        return dict(q=randn(batch, height, width, heads, HEAD_DIM).requires_grad_(), k=k, v=v,
                    rpb=F.pad(randn(heads, WINDOW, WINDOW, dtype=torch.float32), (1, 1, 1, 1)).requires_grad_(),
                    extra_k=extra_k, extra_v=extra_v,
                    extra_bias=randn(heads, height * width, n_pool, dtype=torch.float32).requires_grad_(),
                    window_weight=(weight_std * randn(batch, height, width, heads, WINDOW ** 2)).requires_grad_())
    return make


def call_impls(fused_name: str, with_reference: bool) -> Dict[str, Callable]:
    op = partial(neighborhood_attention_2d, kernel_size=WINDOW, scale=1.0, border='zero')
    impls = {fused_name: partial(op, backend='triton' if fused_name == 'attnzoo-triton' else None),
             'native': native_aggregated_attention}
    if with_reference:
        impls['reference'] = partial(op, backend='reference')
    return impls


def _call_min_bytes(inputs):
    """Every input read once (k / v and the pooled k / v through their views), the output written once."""
    q = inputs['q']
    return sum(t.numel() * t.element_size() for t in inputs.values()) + q.numel() * q.element_size()


def kernel_cases(quick: bool) -> List[KernelCase]:
    """The kernels section (GPU; ``--quick`` on CPU under the Triton interpreter): calls, then models."""
    cases = [KernelCase(SECTION, name, make_call_inputs(batch, size, size, heads, n_pool),
                        call_impls('attnzoo-triton', with_reference=quick), 'native', _call_min_bytes)
             for name, batch, size, heads, n_pool in ((QUICK_SHAPE,) if quick else GPU_SHAPES)]
    if not quick:
        cases += [model_kernel_case(name, batch) for name, batch in GPU_MODELS]
    return cases


# ----------------------------------------------------------------------------- models


def set_attn_impl(model, attn_impl):
    from attnzoo.backbones.transnext import AggregatedAttention
    for module in model.modules():
        if isinstance(module, AggregatedAttention):
            module.attn_impl = attn_impl


def model_inputs_and_impls(name, batch) -> Tuple[Callable, Dict[str, Callable]]:
    """``make(device, dtype)``: the image (no gradient) and every parameter (leaves: forward + backward asks
    their gradients, a training step's); the ``fused`` / ``native`` implementations run the one model built
    there with its aggregated attention switched."""
    import timm
    import attnzoo.backbones  # noqa: F401  registers the models
    built = {}

    def make(device, dtype):
        model = built['model'] = timm.create_model(name).to(device=device, dtype=dtype).train()
        x = torch.randn(batch, 3, MODEL_SIZE, MODEL_SIZE, generator=torch.Generator().manual_seed(0))
        params = {f'param{i}': p for i, p in enumerate(model.parameters())}
        return dict(x=x.to(device=device, dtype=dtype), **params)

    def run(attn_impl, x, **_):
        set_attn_impl(built['model'], attn_impl)
        return built['model'](x)

    return make, {'fused': partial(run, 'fused'), 'native': partial(run, 'native')}


def model_kernel_case(name, batch) -> KernelCase:
    make, impls = model_inputs_and_impls(name, batch)
    return KernelCase(SECTION, f'{name} model {MODEL_SIZE}x{MODEL_SIZE} b{batch}', make, impls, 'native',
                      lambda inputs: None)   # no byte model for a whole network


def cpu_cases(quick: bool) -> List[CpuCase]:
    """The cpu section's TransNeXt cases (:class:`benchlib.harness.CpuCase`): calls, then models (not quick)."""
    cases = [CpuCase(SECTION, name, partial(_on_cpu, make_call_inputs(batch, size, size, heads, n_pool)),
                     call_impls('attnzoo-cpu', with_reference=True), baseline='native')
             for name, batch, size, heads, n_pool in ((QUICK_SHAPE,) if quick else CPU_SHAPES)]
    if not quick:
        for name, batch in CPU_MODELS:
            make, impls = model_inputs_and_impls(name, batch)
            cases.append(CpuCase('transnext model', f'{name} {MODEL_SIZE}x{MODEL_SIZE} b{batch}',
                                 partial(_on_cpu, make), impls, baseline='native'))
    return cases


def _on_cpu(make, dtype):
    return make(torch.device('cpu'), dtype)
